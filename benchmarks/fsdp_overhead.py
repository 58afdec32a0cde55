"""Cost of the Layca step and of the monitor's logging step under FSDP2, against the plain sharded optimizer step.

One fit of an MLP under Lightning's ``ModelParallelStrategy`` on 2 CPU processes over gloo (every ``Linear``
``fully_shard``-ed: each process holds half the rows of every layer, parameters and gradients are ``DTensor``
objects), with ``LaycaCallback`` around SGD with momentum and ``log_every_n_steps=1`` (``--log-every-n-steps``), so
that every step is a logging step. In every process, after ``--warmup`` steps, a timing callback measures per
optimizer step:

* ``sharded SGD step``: the baseline, torch's ``SGD.step`` on every sharded parameter: taken, between the closure and
  the Layca step, by an ``SGD`` of the same hyperparameters on copies of the parameters, with the same gradients
  (with ``implementation="compiled"`` the kernels take the base step of the layers themselves, so the wrapped
  optimizer's own step only steps the rest);
* ``Layca(SGD) step``: the whole ``Layca.step`` (the base step, float64 sums over the local shards, one
  ``all_reduce``, the update of each shard; a snapshot of each shard where the base optimizer steps it);
* ``monitor logging step``: the callback's ``on_train_batch_end`` on a logging step (cosine distances, step rates
  and norms from local sums with one ``all_reduce``, one host transfer, the scalars handed to the logger).

The report gives, per measure, the median over the timed steps of the slower process's time (``--clock wall``, or
``cpu``: each process's CPU time, which other jobs sharing the machine do not inflate), and its ratio to the sharded
SGD step. Lightning starts one copy of this script per extra process, so run it as a script, from the
repository root::

    python -m benchmarks.fsdp_overhead
    python -m benchmarks.fsdp_overhead --width 1024 --depth 6 --steps 60 --out benchmarks/results/fsdp_overhead.md
    python -m benchmarks.fsdp_overhead --clock cpu --implementation compiled --sections

``--sections`` also times the parts of the Layca step (snapshot, local sums, the collective, the update).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import publish
from lightning_layca import Layca, LaycaCallback

ROTATION_RATE = 3**-3
MEASURES = ("sharded SGD step", "Layca(SGD) step", "monitor logging step")
BASE_SECTION = "  of which: the wrapped optimizer's step"
SECTIONS: dict[str, tuple[str, str] | None] = {
    BASE_SECTION: None,  # timed around the wrapped optimizer's step
    "  of which: snapshot of the shards": ("lightning_layca.layca", "take_snapshots"),
    "  of which: base step's state and local sums (compiled+base)": ("lightning_layca.stepping", "_base_sums"),
    "  of which: local sums (compiled, eager)": ("lightning_layca.stepping", "_local_sums"),
    "  of which: the collective (full sums)": ("lightning_layca.stepping", "reduce_sums"),
    "  of which: update of the shards (compiled)": ("lightning_layca.stepping", "sharded_update_compiled"),
    "  of which: update of the shards (compiled+base)": ("lightning_layca.stepping", "base_update_compiled"),
    "  of which: update of the shards (eager)": ("lightning_layca.stepping", "_rotate_eager"),
}
"""With ``--sections``: the parts of the Layca step timed apart (the functions the step calls for them; a function the
step does not call on its path counts 0)."""
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class ShardedMLP(L.LightningModule):
    """``depth`` hidden ``Linear(width, width)`` + ReLU and a 10-way head, each ``Linear`` sharded with FSDP2."""

    def __init__(self, width: int, depth: int, batch_size: int, n_batches: int) -> None:
        super().__init__()
        self.width, self.depth, self.batch_size, self.n_batches = width, depth, batch_size, n_batches
        self.net: nn.Sequential | None = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(self.depth):
            layers += [nn.Linear(self.width, self.width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(self.width, 10))
        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        assert self.net is not None
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        n = self.batch_size * self.n_batches * self.trainer.world_size
        data = TensorDataset(torch.randn(n, self.width, generator=g), torch.randint(0, 10, (n,), generator=g))
        return DataLoader(data, batch_size=self.batch_size)


class StepCost(Callback):
    """Time the base step, the Layca step and the monitor's batch end of every step after ``warmup``, per process.

    Lightning hands the optimizer step a closure that runs forward and backward; its time is taken out of both steps.
    """

    def __init__(self, warmup: int, out_dir: Path, clock: str, sections: bool = False) -> None:
        self.warmup = warmup
        self.out_dir = out_dir
        self.clock = CLOCKS[clock]
        self.sections = SECTIONS if sections else {}
        self.times: dict[str, list[float]] = {name: [] for name in (*MEASURES, *self.sections)}
        self._step = 0
        self._closure = 0.0
        self._base = 0.0
        self._sgd = 0.0
        self._in_sections = dict.fromkeys(self.sections, 0.0)

    def _time_sections(self) -> None:
        """Wrap each function of :data:`SECTIONS` so that its time in the step is added up (looked up at call time)."""
        import importlib

        for name, where in self.sections.items():
            if where is None:
                continue
            module_name, function = where
            module = importlib.import_module(module_name)
            if not hasattr(module, function):  # not in this version of the package
                continue
            original = getattr(module, function)

            def timed(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                start = self.clock()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self._in_sections[_name] += self.clock() - start

            setattr(module, function, timed)

    def _record(self, name: str, seconds: float) -> None:
        if self._step >= self.warmup:
            self.times[name].append(seconds)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (layca,) = [opt for opt in trainer.optimizers if isinstance(opt, Layca)]
        base_step, layca_step = layca.optimizer.step, layca.step

        def timed_base(closure: Callable[[], Any] | None = None) -> Any:
            # Layca evaluates the closure (forward and backward) before the base step around torch's optimizers;
            # around others the base step calls it: its time is taken out either way.
            closure_before, start = self._closure, self.clock()
            result = base_step(closure)
            self._base = self.clock() - start - (self._closure - closure_before)
            return result

        params = [p for group in layca.optimizer.param_groups for p in group["params"]]
        copies = [p.detach().clone() for p in params]
        keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "fused")
        hyper = {k: layca.optimizer.param_groups[0][k] for k in keys}
        baseline = torch.optim.SGD(copies, **hyper)

        def baseline_step() -> None:
            """Torch's SGD step on copies of every parameter, with their gradients (outside the Layca step)."""
            for copy, p in zip(copies, params, strict=True):
                copy.grad = p.grad
            start = self.clock()
            baseline.step()
            self._sgd = self.clock() - start
            for copy in copies:
                copy.grad = None

        def timed_layca(closure: Callable[[], Any] | None = None) -> Any:
            def timed_closure() -> Any:
                start = self.clock()
                result = closure()  # type: ignore[misc]
                baseline_step()
                self._closure += self.clock() - start
                return result

            self._closure = 0.0
            start = self.clock()
            result = layca_step(None if closure is None else timed_closure)
            total = self.clock() - start
            self._record("sharded SGD step", self._sgd)
            self._record("Layca(SGD) step", total - self._closure)
            if BASE_SECTION in self.sections:
                self._in_sections[BASE_SECTION] = self._base
            for name in self.sections:
                self._record(name, self._in_sections[name])
                self._in_sections[name] = 0.0
            return result

        self._time_sections()
        layca.optimizer.step = timed_base  # type: ignore[method-assign]
        layca.step = timed_layca  # type: ignore[method-assign]
        callback = next(cb for cb in trainer.callbacks if isinstance(cb, LaycaCallback))  # type: ignore[attr-defined]
        batch_end = callback.on_train_batch_end

        def timed_batch_end(*args: Any, **kwargs: Any) -> Any:
            start = self.clock()
            result = batch_end(*args, **kwargs)
            self._record("monitor logging step", self.clock() - start)
            return result

        callback.on_train_batch_end = timed_batch_end  # type: ignore[method-assign]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._step += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.times))
        trainer.strategy.barrier()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024, help="width of the hidden layers")
    parser.add_argument("--depth", type=int, default=6, help="hidden layers")
    parser.add_argument("--batch-size", type=int, default=32, help="batch per process")
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall clock, or each process's CPU time (on a shared CPU: preemption by other jobs is not counted, nor "
        "is waiting for the other process in a collective)",
    )
    parser.add_argument(
        "--implementation", choices=["auto", "eager", "compiled"], default="auto", help="Layca's step implementation"
    )
    parser.add_argument(
        "--sections",
        action="store_true",
        help="also time the parts of the Layca step: snapshot, local sums, the collective, the update",
    )
    parser.add_argument(
        "--log-every-n-steps",
        type=int,
        default=1,
        help="the Trainer's logging interval: 1 makes every step a logging step (the callback keeps a copy of the "
        "weights before each); above --warmup + --steps no step logs, and the last row times the callback's batch end "
        "between logging steps",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the processes meet (default: a new one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    if min(args.width, args.depth, args.batch_size, args.steps, args.log_every_n_steps) < 1 or args.warmup < 0:
        parser.error(
            "--width, --depth, --batch-size, --steps and --log-every-n-steps must be positive and --warmup "
            "non-negative."
        )
    if args.workdir is None:  # chosen once, by the first process: the others are started with it
        args.workdir = Path(tempfile.mkdtemp(prefix="fsdp_overhead_"))
        sys.argv += ["--workdir", str(args.workdir)]
    world_size = 2
    load_before = load_average()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=ModelParallelStrategy(
            data_parallel_size=world_size, tensor_parallel_size=1, timeout=timedelta(seconds=300)
        ),
        max_epochs=1,
        log_every_n_steps=args.log_every_n_steps,
        logger=TensorBoardLogger(args.workdir, name="logs"),
        callbacks=[
            LaycaCallback(
                rotation_rate=ROTATION_RATE,
                angle_histograms=False,
                figure=False,
                implementation=args.implementation,
            ),
            StepCost(args.warmup, args.workdir / "times", args.clock, args.sections),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(ShardedMLP(args.width, args.depth, args.batch_size, args.warmup + args.steps))
    if trainer.global_rank != 0:
        return None
    load_after = load_average()

    per_rank = [json.loads((args.workdir / "times" / f"rank{r}.json").read_text()) for r in range(world_size)]
    measures = [*MEASURES[:2], *(SECTIONS if args.sections else ()), MEASURES[2]]
    slower = {name: [max(values) for values in zip(*(t[name] for t in per_rank), strict=True)] for name in measures}
    median = {name: statistics.median(values) for name, values in slower.items()}
    base = median["sharded SGD step"]
    parameters = args.depth * (args.width * args.width + args.width) + 10 * args.width + 10
    logging = (
        "every one a logging step"
        if args.log_every_n_steps == 1
        else f"log_every_n_steps={args.log_every_n_steps}"
        + (" (no logging step)" if args.log_every_n_steps > args.warmup + args.steps else "")
    )
    lines = [
        f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"lightning {L.__version__}; {world_size} processes over gloo",
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
        f"- MLP {args.depth} x {args.width} + head ({parameters / 1e6:.2f} M parameters), every Linear "
        f"`fully_shard`-ed over {world_size} processes; SGD momentum 0.9, batch {args.batch_size} per process; "
        f"{args.steps} timed steps after {args.warmup}, {logging}; clock: {args.clock}; medians of "
        f"the slower process; Layca implementation={args.implementation!r}",
        "",
        "| measure | ms per step (median) | quartiles (ms) | / sharded SGD step |",
        "|---|---:|---|---:|",
    ]

    def label(name: str) -> str:
        if name == MEASURES[2] and args.log_every_n_steps > args.warmup + args.steps:
            return "monitor batch end (no logging step)"
        return name

    for name in measures:
        q1, _, q3 = statistics.quantiles(slower[name], n=4)
        lines.append(
            f"| {label(name)} | {1e3 * median[name]:.2f} | {1e3 * q1:.2f} - {1e3 * q3:.2f} "
            f"| {median[name] / base:.2f} |"
        )
    return publish(lines, args.out)


if __name__ == "__main__":
    main()
