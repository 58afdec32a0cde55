"""Overhead of ``LaycaCallback`` in a 2-process CPU DDP fit, next to the same overhead in one process, in one run.

Four fits of the same MLP on the same random data, with the same per-process batch:

* ``ddp`` / ``ddp + LaycaCallback``: ``strategy="ddp_spawn"``, 2 CPU processes over gloo;
* ``1 process`` / ``1 process + LaycaCallback``: ``devices=1``.

Every fit logs to TensorBoard at the Trainer's default ``log_every_n_steps=50`` (the callback measures and logs the
rotation on those steps). On global rank 0, a timing callback measures the time (``--clock wall``, or ``cpu``: the
process's CPU time, which a shared machine's preemption does not inflate) from the start of batch ``--warmup`` to
the end of the last batch: process start-up, DDP setup and the end-of-epoch histograms and figure are
not part of the per-step time. The four fits are repeated ``--repeats`` times, interleaved with the order rotated
every round, and the table reports medians and the ratio with/without the callback.

Run from the repository root::

    python -m benchmarks.ddp_overhead
    python -m benchmarks.ddp_overhead --steps 200 --repeats 5 --out benchmarks/results/ddp_overhead.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import publish
from lightning_layca import LaycaCallback

ROTATION_RATE = 3**-3
CONFIGS = ("ddp", "ddp + LaycaCallback", "1 process", "1 process + LaycaCallback")


class MLP(L.LightningModule):
    """784 -> 512 -> 512 -> 512 -> 10 with ReLU, SGD with momentum: four layers, 0.93 M parameters."""

    def __init__(self, batch_size: int, n_batches: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            *(nn.Linear(784, 512), nn.ReLU()),
            *(nn.Linear(512, 512), nn.ReLU()),
            *(nn.Linear(512, 512), nn.ReLU()),
            nn.Linear(512, 10),
        )
        self.batch_size = batch_size
        self.n_batches = n_batches

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        g = torch.Generator().manual_seed(1)
        n = self.batch_size * self.n_batches * world
        dataset = TensorDataset(torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class StepTimer(Callback):
    """On global rank 0, time batches ``warmup`` to the last and write seconds per step to ``path``."""

    def __init__(self, warmup: int, path: Path, clock: str) -> None:
        self.warmup = warmup
        self.path = path
        self.clock = clock
        self._start = 0.0
        self._batches = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx == self.warmup:
            self._start = CLOCKS[self.clock]()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._batches = idx + 1 - self.warmup
        if trainer.is_global_zero and idx + 1 == trainer.num_training_batches:
            self.path.write_text(str((CLOCKS[self.clock]() - self._start) / self._batches))


def fit_once(config: str, steps: int, warmup: int, batch_size: int, clock: str, workdir: Path) -> float:
    """Run one fit of ``config`` and return its seconds per step (global rank 0)."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    result = run_dir / "seconds_per_step.txt"
    callbacks: list[Callback] = [StepTimer(warmup, result, clock)]
    if config.endswith("LaycaCallback"):
        callbacks.insert(0, LaycaCallback(rotation_rate=ROTATION_RATE))
    distributed = config.startswith("ddp")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2 if distributed else 1,
        strategy="ddp_spawn" if distributed else "auto",
        max_epochs=1,
        logger=TensorBoardLogger(run_dir, name="logs"),
        callbacks=callbacks,
        default_root_dir=run_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    trainer.fit(MLP(batch_size, steps + warmup))
    return float(result.read_text())


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each fit")
    parser.add_argument("--batch-size", type=int, default=64, help="batch per process")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the four fits")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall clock, or rank 0's process CPU time (on a shared CPU: preemption by other jobs is not counted)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the one-process fits (each DDP process gets cores / processes, 1 on 2 cores)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats, args.batch_size, args.threads) < 1 or args.warmup < 0:
        parser.error(
            "--steps, --repeats, --batch-size and --threads must be positive and --warmup non-negative, got "
            f"steps={args.steps}, repeats={args.repeats}, batch-size={args.batch_size}, threads={args.threads}, "
            f"warmup={args.warmup}."
        )
    torch.set_num_threads(args.threads)

    load_before = load_average()
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as workdir:
        for round_ in range(args.repeats):
            order = CONFIGS[round_ % len(CONFIGS) :] + CONFIGS[: round_ % len(CONFIGS)]
            for config in order:
                times[config].append(
                    fit_once(config, args.steps, args.warmup, args.batch_size, args.clock, Path(workdir))
                )
    load_after = load_average()

    median = {c: statistics.median(t) for c, t in times.items()}
    lines = [
        f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"lightning {L.__version__}",
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
        f"- MLP 784-512-512-512-10 (0.93 M parameters), SGD momentum 0.9, batch {args.batch_size} per process, "
        f"{args.steps} timed steps after {args.warmup}, TensorBoard every 50 steps; {args.repeats} rounds, medians",
        f"- clock: {args.clock}; torch threads: {args.threads} in the one-process fits, Lightning's default in the DDP "
        "processes (cores / processes)",
        "",
        "| fit | ms per step (median) | runs (ms) | with / without LaycaCallback |",
        "|---|---:|---|---:|",
    ]
    for config in CONFIGS:
        base = config.removesuffix(" + LaycaCallback")
        ratio = f"{median[config] / median[base]:.3f}" if config != base else ""
        runs = ", ".join(f"{1e3 * t:.1f}" for t in times[config])
        lines.append(f"| {config} | {1e3 * median[config]:.2f} | {runs} | {ratio} |")
    return publish(lines, args.out)


if __name__ == "__main__":
    main()
