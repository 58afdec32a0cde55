"""Cost of layer-rotation monitoring: one monitor update against one SGD step, and end-to-end ``Trainer.fit``.

Part 1 (micro): on the parameter shapes of ResNet-18 (built by hand, no torchvision), one monitor update (every
layer's cosine distance to its snapshot, moved to the host once) and the full measurement of a logging step (the
same, plus the latest step's sums, from which its angle, update ratio and its two parts, and the norm come; one host
transfer) against one ``SGD(lr, momentum=0.9, foreach=True)`` step on the same parameters (and, for reference, one
step without momentum), interleaved, medians. The update is the meter's (the snapshot's ``<w0, w0>`` kept from its
first measure), with the eager sums and with the compiled ones (``implementation="compiled"``, what
``implementation="auto"`` takes once it pays: :mod:`lightning_layca.measurement`; ``--eager-only`` leaves them out);
the distances formed from scratch are timed beside it. Target: an update costs at most one base SGD step (0.5x with
the compiled sums).

Part 2 (end to end): ``Trainer.fit`` of a small CNN on synthetic data with plain SGD, with ``LayerRotationMonitor``
and with ``LaycaCallback``, all at the Trainer's default ``log_every_n_steps=50`` and with a TensorBoard logger (the
monitor writes its histograms and figure at every epoch end). The three configurations run interleaved, the order
rotated every round; the table gives medians and ratios to plain SGD. Target: the monitor adds at most 3%.
Between logging steps the monitor's hook only compares two integers; part 2 also times a monitor whose interval is
larger than the run (no logging step at all) to show that.

Run from the repository root::

    python -m benchmarks.monitor_cost                 # CPU, or CUDA when present
    python -m benchmarks.monitor_cost --device cpu --rounds 5 --steps 200
    OMP_NUM_THREADS=1 python -m benchmarks.monitor_cost --device cpu --skip-fit --clock cpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._shapes import SHAPE_SETS
from lightning_layca.measurement import MeasurementSums
from lightning_layca.rotation import RotationMeter, cosine_distances


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(fn: Callable[[], Any], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    _sync(device)
    t0 = clock()
    fn()
    _sync(device)
    return (clock() - t0) * 1e3


def micro(device: torch.device, repeats: int, clock: str = "wall", compiled: bool = True) -> list[str]:
    g = torch.Generator().manual_seed(0)
    shapes = SHAPE_SETS["resnet18"]()
    params = [torch.randn(shape, generator=g).to(device).requires_grad_() for _, shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
    layers = [p for p in params if p.ndim >= 2]
    snapshot = [p.detach().clone() for p in layers]
    # The base step is the one the step-cost benchmark and the examples use, SGD with momentum 0.9 (5 memory
    # streams); plain SGD without momentum (3 streams) is timed beside it for reference.
    sgd = torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=True)
    plain_sgd = torch.optim.SGD(params, lr=1e-3, foreach=True)

    meter = RotationMeter(layers, snapshot)

    def monitor_update() -> None:
        meter.measure(distances=True)

    def distances_from_scratch() -> None:
        cosine_distances(layers, snapshot).tolist()

    before = [p.detach().clone() for p in layers]  # the copy the monitor takes before a logging step's update
    positions = list(range(len(layers)))

    def logging_step_measurement() -> None:
        meter.measure(distances=True, steps=positions, before=before)

    rows: dict[str, Callable[[], Any]] = {
        "SGD step (foreach, momentum 0.9)": sgd.step,
        "SGD step (foreach, no momentum)": plain_sgd.step,
        "monitor update (the meter: the snapshot's <w0, w0> kept from its first measure)": monitor_update,
        "cosine distances from scratch (three products per element)": distances_from_scratch,
        "logging step: rotation + step (angle, update ratio, norm)": logging_step_measurement,
    }
    compile_seconds = None
    if compiled:
        compiled_meter = RotationMeter(layers, snapshot, MeasurementSums("compiled"))
        start = time.perf_counter()
        compiled_meter.measure(distances=True, steps=positions, before=before)  # compiles both kernels
        compile_seconds = time.perf_counter() - start
        rows["monitor update, compiled sums (implementation='compiled')"] = lambda: compiled_meter.measure(True)
        rows["logging step, compiled sums"] = lambda: compiled_meter.measure(True, steps=positions, before=before)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(3):
        for fn in rows.values():
            fn()
    names = list(rows)
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_time(rows[name], device, CLOCKS[clock]))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    n_params = sum(p.numel() for p in params)
    lines = [
        f"### One monitor update vs one SGD step, ResNet-18 shapes ({n_params:,} parameters, {len(layers)} layers), "
        f"{device.type}, {repeats} interleaved repeats, {clock} clock, {torch.get_num_threads()} thread(s)",
        "",
        "| | median ms | ratio to SGD step |",
        "|---|---:|---:|",
    ]
    for name in names:
        lines.append(f"| {name} | {med[name]:.3f} | {med[name] / med[names[0]]:.2f} |")
    if compile_seconds is not None:
        lines += [
            "",
            f"The first compiled measurement took {compile_seconds:.1f} s (wall clock): the compilation of its two "
            "kernels (one layer per call and four per call), once per process and Inductor cache.",
        ]
    return lines


def _fit_runner(device: torch.device, steps: int, epochs: int) -> Callable[[str], float]:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_layca as ll

    g = torch.Generator().manual_seed(0)
    batch = 32
    x = torch.randn(steps * batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (steps * batch,), generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)

    class SmallCNN(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(128, 10),
            )  # fmt: skip

        def training_step(self, b: Any, i: int) -> torch.Tensor:
            loss = F.cross_entropy(self.net(b[0]), b[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    callbacks: dict[str, Callable[[], list[Any]]] = {
        "plain SGD": lambda: [],
        "+ LayerRotationMonitor": lambda: [ll.LayerRotationMonitor()],
        "+ LayerRotationMonitor, no logging step": lambda: [ll.LayerRotationMonitor(log_every_n_steps=10**9)],
        "+ LaycaCallback": lambda: [ll.LaycaCallback()],
    }

    hook_seconds: dict[str, float] = {}

    def run(name: str) -> float:
        hook_seconds.clear()
        with tempfile.TemporaryDirectory() as root:
            trainer = L.Trainer(
                accelerator=device.type,
                devices=1,
                max_epochs=epochs,
                logger=TensorBoardLogger(root),
                callbacks=[_timed_hooks(cb, hook_seconds) for cb in callbacks[name]()],
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                default_root_dir=root,
            )
            model = SmallCNN()
            t0 = time.perf_counter()
            trainer.fit(model, data)
            return time.perf_counter() - t0

    run.names = list(callbacks)  # type: ignore[attr-defined]
    run.hook_seconds = hook_seconds  # type: ignore[attr-defined]
    return run


_HOOKS = ("setup", "on_fit_start", "on_train_epoch_start", "on_train_batch_start", "on_before_optimizer_step",
          "on_train_batch_end", "on_train_epoch_end", "on_save_checkpoint")  # fmt: skip


def _timed_hooks(callback: Any, seconds: dict[str, float]) -> Any:
    """Make ``callback`` add the wall time spent in each of its own hooks to ``seconds[hook]``.

    The wrappers are instance attributes, which Lightning finds first when it calls a hook by name; hooks the
    callback inherits unchanged from ``Callback`` are left alone.
    """
    from lightning.pytorch.callbacks import Callback

    for hook in _HOOKS:
        if getattr(type(callback), hook) is getattr(Callback, hook):
            continue
        bound = getattr(callback, hook)

        def timed(*args: Any, _bound: Any = bound, _hook: str = hook, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _bound(*args, **kwargs)
            finally:
                seconds[_hook] = seconds.get(_hook, 0.0) + time.perf_counter() - start

        setattr(callback, hook, timed)
    return callback


def end_to_end(device: torch.device, rounds: int, steps: int, epochs: int) -> list[str]:
    run = _fit_runner(device, steps, epochs)
    names: list[str] = run.names  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {name: [] for name in names}
    in_hooks: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for name in names:  # warm-up round, not timed
        run(name)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(run(name))
            in_hooks[name].append(dict(run.hook_seconds))  # type: ignore[attr-defined]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med[names[0]]
    lines = [
        f"### `Trainer.fit`, small CNN, {epochs} epoch(s) x {steps} steps of batch 32 (3x32x32), {device.type}, "
        f"default log_every_n_steps=50, TensorBoard logger, {rounds} interleaved rounds",
        "",
        "| configuration | median s | ratio to plain SGD | overhead |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        lines.append(f"| {name} | {med[name]:.3f} | {med[name] / base:.3f} | {100 * (med[name] / base - 1):+.1f}% |")
    # Whole-fit times of a few seconds vary by several percent from run to run; the time spent inside the
    # callbacks' own hooks is measured directly and set against the plain fit.
    lines += [
        "",
        "Time spent inside the callback's own hooks (median over rounds), against the plain-SGD fit:",
        "",
        "| configuration | logging steps ms | epoch ends ms | all hooks ms | share of plain fit |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names[1:]:
        per_hook = {h: statistics.median(r.get(h, 0.0) for r in in_hooks[name]) for h in _HOOKS}
        total = statistics.median(sum(r.values()) for r in in_hooks[name])
        lines.append(
            f"| {name} | {1e3 * per_hook['on_train_batch_end']:.1f} | {1e3 * per_hook['on_train_epoch_end']:.1f} | "
            f"{1e3 * total:.1f} | {100 * total / base:.2f}% |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=50, help="interleaved repeats of the micro benchmark")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the end-to-end benchmark")
    parser.add_argument("--steps", type=int, default=200, help="training steps per epoch end to end")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip-fit", action="store_true", help="run the micro benchmark only")
    parser.add_argument(
        "--eager-only", action="store_true", help="micro benchmark: leave out the rows with the compiled sums"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="micro benchmark: wall clock, or the process's CPU time (with OMP_NUM_THREADS=1 on a shared machine: "
        "time other jobs take is not counted)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(micro(device, args.repeats, args.clock, not args.eager_only)))
    print(f"load average after the micro benchmark: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.skip_fit:
        print()
        print("\n".join(end_to_end(device, args.rounds, args.steps, args.epochs)))


if __name__ == "__main__":
    main()
