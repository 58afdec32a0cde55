"""Memory the callbacks cost, in copies of the weights: peak RSS and checkpoint size of fits with and without them.

Four fits of the same MLP (``--depth`` layers ``Linear(width, width)``; the default 3 x 4096 x 4096 is 50.3 M
parameters, 201 MB in float32) on the same random data, SGD with momentum 0.9, a TensorBoard logger, no figure:

* ``no callback``: the reference;
* ``LayerRotationMonitor without histograms``: ``angle_histograms=False``;
* ``LayerRotationMonitor``: with the epoch-end ``Unit_angle`` histograms;
* ``LaycaCallback``: Layca around the SGD (``implementation="eager"``), with the monitor's histograms;
* ``LaycaCallback compiled``: the same with ``implementation="compiled"``, whose kernel takes SGD's step itself and
  keeps no buffer of the weights before the step (except on logging steps, for the monitor's rates).

Each fit runs in a fresh Python process (the configurations are interleaved, the order rotated every round), so its
peak resident set size (``ru_maxrss``) is its own. The report gives, per configuration, the median peak over rounds,
the extra peak over ``no callback`` divided by the size of the weights ("copies of the weights"), and the size of the
checkpoint the fit writes at its end (measured after the peak) in the same unit. What the callbacks keep is known
exactly; the extra peak adds what they allocate for a while (epoch-end histograms, Layca's step):

* the monitor keeps one snapshot of every monitored layer (one copy; frozen layers none);
* Layca keeps the weights before the step in a buffer as large as the layers (one more copy), except where its
  compiled kernel takes SGD's step itself: then only on the monitor's logging steps (its rates need the weights before
  the step), released at the next step, so the peak still holds it once.

After each fit, the temporaries of the callback's two transient allocations are also counted exactly, operator by
operator (:class:`benchmarks._allocations.LiveTensorBytes`): the epoch-end angle histograms (monitor configurations)
and one more Layca step (``LaycaCallback``), as a peak in MiB and in copies of the largest layer. Under a dispatch
mode ``torch.compile`` runs a function eagerly, so for ``LaycaCallback compiled`` the step's allocations are added up
by ``torch.profiler`` instead (a bound on their peak).

Run from the repository root::

    python -m benchmarks.memory                                   # 50 M parameters, 2 rounds
    python -m benchmarks.memory --width 1024 --rounds 1           # small and quick
    python -m benchmarks.memory --configs "no callback,LaycaCallback"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: make `benchmarks` and `lightning_layca` importable
    sys.path.insert(0, str(ROOT))

CONFIGS = (
    "no callback",
    "LayerRotationMonitor without histograms",
    "LayerRotationMonitor",
    "LaycaCallback",
    "LaycaCallback compiled",
)


def _callbacks(config: str) -> list[Any]:
    import lightning_layca as ll

    if config == "no callback":
        return []
    if config == "LayerRotationMonitor without histograms":
        return [ll.LayerRotationMonitor(angle_histograms=False, figure=False)]
    if config == "LayerRotationMonitor":
        return [ll.LayerRotationMonitor(figure=False)]
    if config == "LaycaCallback":
        return [ll.LaycaCallback(figure=False, implementation="eager")]
    if config == "LaycaCallback compiled":  # the kernel takes SGD's step: no buffer of the weights before the step
        return [ll.LaycaCallback(figure=False, implementation="compiled")]
    raise SystemExit(f"unknown configuration {config!r}; accepted: {', '.join(CONFIGS)}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fit_once(config: str, width: int, depth: int, batch: int, steps: int, root: Path) -> dict[str, Any]:
    """Run one fit of ``config`` in this process; return its peak RSS, the weights' size and the checkpoint's."""
    import logging
    import warnings

    import lightning as L
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.net = nn.Sequential(*layers[:-1])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    g = torch.Generator().manual_seed(1)
    data = DataLoader(
        TensorDataset(torch.randn(steps * batch, width, generator=g), torch.randn(steps * batch, width, generator=g)),
        batch_size=batch,
    )
    model = MLP()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=TensorBoardLogger(root, name="logs"),
        callbacks=_callbacks(config),
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    rss_at_start = _rss_bytes()
    trainer.fit(model, data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    checkpoint = root / "last.ckpt"
    trainer.save_checkpoint(checkpoint)  # after the peak was read: saving is not part of the fit
    checkpoint_bytes = checkpoint.stat().st_size
    checkpoint.unlink()
    return {
        "config": config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes,
        "largest_layer_bytes": max(p.numel() * p.element_size() for p in model.parameters()),
        "rss_at_fit_start": rss_at_start,
        "peak_rss": peak,
        "checkpoint_bytes": checkpoint_bytes,
        **_transient_temporaries(trainer),
    }


def _transient_temporaries(trainer: Any) -> dict[str, int]:
    """Peak bytes of the temporaries of the epoch-end histograms and of one Layca step, counted exactly."""
    import lightning_layca as ll
    from benchmarks._allocations import LiveTensorBytes
    from lightning_layca.rotation import angle_histograms

    found: dict[str, int] = {}
    for callback in trainer.callbacks:
        if isinstance(callback, ll.LayerRotationMonitor) and callback.angle_histograms:
            with LiveTensorBytes() as tracker:
                # What the epoch end computes before writing: the angles of every unit, then their histograms.
                angle_histograms(callback.layers.unit_angles(), bins=callback.histogram_bins)
            found["histogram_temporaries"] = tracker.peak
        if isinstance(callback, ll.LaycaCallback):
            layca = callback.laycas[0]  # the last batch's gradients are still there; the fit is over
            if callback.implementation == "compiled":
                # Under a dispatch mode torch.compile runs the function eagerly: the profiler counts what the compiled
                # kernels allocate instead (every allocation in the step, added up: a bound on their peak).
                found["layca_step_temporaries"] = _allocated_bytes(layca.step)
            else:
                with LiveTensorBytes() as tracker:
                    layca.step()
                found["layca_step_temporaries"] = tracker.peak
    return found


def _allocated_bytes(step: Any) -> int:
    """Bytes allocated on the CPU while ``step()`` runs, all allocations added up (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return int(sum(max(0, event.self_cpu_memory_usage) for event in prof.key_averages()))


def _run_child(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``config`` in a fresh interpreter (its own peak RSS) and return what it measured."""
    with tempfile.TemporaryDirectory() as root:
        command = [sys.executable, "-m", "benchmarks.memory", "--child", config, "--root", root]
        command += ["--width", str(args.width), "--depth", str(args.depth)]
        command += ["--batch", str(args.batch), "--steps", str(args.steps)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{config!r} failed:\n{done.stderr[-4000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    """The markdown table: medians over rounds, extras in copies of the weights."""
    first = next(iter(results.values()))[0]
    weight_bytes = first["weight_bytes"]
    mib = 2**20
    peak = {c: statistics.median(r["peak_rss"] for r in runs) for c, runs in results.items()}
    start = {c: statistics.median(r["rss_at_fit_start"] for r in runs) for c, runs in results.items()}
    ckpt = {c: statistics.median(r["checkpoint_bytes"] for r in runs) for c, runs in results.items()}
    base = next(iter(results))
    lines = [
        f"### MLP {args.depth} x Linear({args.width}, {args.width}): {first['parameters']:,} parameters, weights "
        f"{weight_bytes / mib:.1f} MiB; 1 epoch of {args.steps} steps of batch {args.batch}, SGD momentum 0.9, "
        f"TensorBoard logger; {args.rounds} round(s), medians",
        "",
        "| configuration | RSS at fit start MiB | peak RSS MiB | extra peak, copies of the weights | checkpoint MiB "
        "| extra checkpoint, copies of the weights |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in results:
        extra = (peak[c] - peak[base]) / weight_bytes
        extra_ckpt = (ckpt[c] - ckpt[base]) / weight_bytes
        lines.append(
            f"| {c} | {start[c] / mib:.0f} | {peak[c] / mib:.0f} | {extra:+.2f} | {ckpt[c] / mib:.1f} | "
            f"{extra_ckpt:+.2f} |"
        )
    spread = ", ".join(
        f"{c} {(max(r['peak_rss'] for r in runs) - min(r['peak_rss'] for r in runs)) / mib:.0f}"
        for c, runs in results.items()
    )
    lines += ["", f"Spread of the peak over rounds (max - min, MiB): {spread}.", ""]
    largest = first["largest_layer_bytes"]
    for key, what in (
        ("histogram_temporaries", "the epoch-end angle histograms"),
        ("layca_step_temporaries", "a Layca step"),
    ):
        for c, runs in results.items():
            if key in runs[0]:
                tracked = runs[0][key]  # exact, the same in every round
                lines.append(
                    f"- temporaries of {what} ({c}), counted operator by operator: peak {tracked / mib:.1f} MiB "
                    f"= {tracked / weight_bytes:.3f} copies of the weights = {tracked / largest:.3f} of the largest "
                    f"layer ({largest / mib:.1f} MiB)"
                )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (one epoch)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the fits")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, from: {', '.join(CONFIGS)} (the first is the reference)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this markdown file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one fit, in this process
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(fit_once(args.child, args.width, args.depth, args.batch, args.steps, args.root)))
        return []
    import torch

    from benchmarks.step_cost import machine_description

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise SystemExit(f"unknown configuration(s) {unknown}; accepted: {', '.join(CONFIGS)}")
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    head = machine_description(torch.device("cpu"))
    for r in range(args.rounds):
        for config in configs[r % len(configs) :] + configs[: r % len(configs)]:
            results[config].append(_run_child(config, args))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = ["## Memory of the callbacks (`benchmarks/memory.py`)", "", *head, "", *report(results, args), ""]
    lines.append(f"- load average at the end: {load}")
    from benchmarks._report import publish

    publish(lines, args.out)
    return lines


if __name__ == "__main__":
    main()
