"""The paper's alpha experiment at small scale: MNIST-1D, an 8-layer 1-D CNN, Layca against plain SGD.

Carbonnelle and De Vleeschouwer (arXiv:1806.01603) train with Layca while slowing the first layers (alpha > 0) or the
last layers (alpha < 0) and find uniform rotation (alpha = 0) best, |alpha| = 0.6 clearly worse, and Layca at least as
good as plain SGD without weight decay at its best learning rate. This script repeats that comparison on a problem a
2-core CPU trains in seconds:

* data: MNIST-1D (the ``mnist1d`` package's standard set: 4000 training and 1000 test signals of length 40, generator
  seed 42), through ``examples.mnist1d_cnn.MNIST1DDataModule``; accuracy is measured on the 1000 test signals once,
  after the last epoch;
* model: ``examples.mnist1d_cnn.MNIST1DCNN`` with seven 3-tap convolutions of the same width and a linear head (eight
  layers), no biases, batch norm without affine parameters;
* training: plain SGD (no momentum, no weight decay) and a step decay of the learning rate (x0.2 at 50% and 75% of the
  epochs) for every run. Layca runs wrap that SGD (base lr 1: only the relative lr matters) with ``LaycaCallback``;
* grid: Layca with alpha in {-0.6, -0.3, 0, 0.3, 0.6} at rotation rate 3**-3, rotation rate in {3**-2, ..., 3**-5} at
  alpha 0, and SGD with lr in {1, 3**-1, 3**-2, 3**-3}: 12 distinct configurations (alpha 0 at 3**-3 belongs to both
  Layca sweeps), seeds 0, 1 and 2. A seed sets the initial weights and the order of the batches; the data stay fixed.

Each finished run is appended at once to a JSON-lines file, and runs already there are skipped, so an interrupted
experiment resumes where it stopped and ``--report-only`` builds the table and the figure from whatever has finished.
The table gives test accuracy (mean ± sample standard deviation over seeds) and differences of means with their
standard error; the figure puts the layer rotation curves (averaged over seeds) of alpha = -0.6, 0 and +0.6 side by
side.

Run from the repository root::

    python -m benchmarks.reproduce_alpha                 # 36 runs; writes docs/results/ and docs/images/
    python -m benchmarks.reproduce_alpha --quick         # 5 runs, one seed, about five minutes
    python -m benchmarks.reproduce_alpha --report-only   # table and figure from the saved runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file: make `benchmarks`, `examples` and `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L

import lightning_layca as ll
from benchmarks._mnist1d_experiment import (
    BATCH_SIZE,
    CONVOLUTIONS,
    DATA_SEED,
    DECAY_AT,
    DECAY_FACTOR,
    DIFFERENCE_NOTE,
    EPOCHS,
    LAYCA_IMPLEMENTATION,
    NUM_SAMPLES,
    ROOT,
    SEEDS,
    SETUP_KEYS,
    TRAIN_SPLIT,
    WIDTH,
    ExperimentCNN,
    add_common_arguments,
    check_common_arguments,
    difference,
    fit,
    load_records,
    machine_line,
    mean_std,
    pct,
    power_of_three,
    quiet_lightning,
    run_command,
    run_missing,
)
from examples.mnist1d_cnn import MNIST1DDataModule
from lightning_layca.figures import rotation_curves_figure, save_png

__all__ = [  # what the tests and other experiments use; the shared pieces are re-exported from here
    "BATCH_SIZE",
    "DATA_SEED",
    "NUM_SAMPLES",
    "ROOT",
    "SEEDS",
    "TRAIN_SPLIT",
    "AlphaExperimentCNN",
    "Config",
    "config_of",
    "configurations",
    "curves_figure",
    "difference",
    "load_records",
    "main",
    "quiet_lightning",
    "report",
    "train_one",
]

ALPHAS = (-0.6, -0.3, 0.0, 0.3, 0.6)
ROTATION_RATES = (3**-2, 3**-3, 3**-4, 3**-5)
SGD_LRS = (1.0, 3**-1, 3**-2, 3**-3)
BEST_ROTATION_RATE = 3**-3
QUICK_ALPHAS = (-0.6, 0.0, 0.6)
QUICK_SGD_LRS = (3**-1, 3**-2)
FIGURE_ALPHAS = (-0.6, 0.0, 0.6)
# docs/reproduction.md quotes the report's tables (tests/test_reproduce_alpha.py checks that they match the runs).
FULL_OUTPUTS = (
    ROOT / "docs" / "results" / "alpha_experiment.jsonl",
    ROOT / "docs" / "results" / "alpha_experiment.md",
    ROOT / "docs" / "images" / "alpha_curves.png",
)
QUICK_OUTPUTS = (
    ROOT / "benchmarks" / "results" / "alpha_quick.jsonl",
    ROOT / "benchmarks" / "results" / "alpha_quick.md",
    ROOT / "benchmarks" / "results" / "alpha_quick.png",
)


# ---------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One training configuration: Layca at (alpha, rotation_rate) or plain SGD at ``lr``."""

    method: str  # "layca" or "sgd"
    alpha: float | None = None
    rotation_rate: float | None = None
    lr: float = 1.0

    @property
    def label(self) -> str:
        if self.method == "sgd":
            return f"SGD, lr = {power_of_three(self.lr)}"
        assert self.alpha is not None and self.rotation_rate is not None
        return f"Layca, alpha = {signed(self.alpha)}, rotation rate = {power_of_three(self.rotation_rate)}"


def signed(x: float) -> str:
    """``-0.6``, ``0``, ``+0.6``."""
    return "0" if x == 0 else f"{x:+.1f}"


def alpha_sweep(alphas: Sequence[float] = ALPHAS) -> list[Config]:
    return [Config("layca", alpha=a, rotation_rate=BEST_ROTATION_RATE) for a in alphas]


def rate_sweep(rates: Sequence[float] = ROTATION_RATES) -> list[Config]:
    return [Config("layca", alpha=0.0, rotation_rate=r) for r in rates]


def sgd_sweep(lrs: Sequence[float] = SGD_LRS) -> list[Config]:
    return [Config("sgd", lr=lr) for lr in lrs]


def table_groups(quick: bool) -> list[tuple[str, list[Config]]]:
    """The table's sections: the alpha sweep, the rotation-rate sweep (full run only) and the SGD sweep."""
    if quick:
        return [
            (f"Layca, alpha sweep (rotation rate {power_of_three(BEST_ROTATION_RATE)})", alpha_sweep(QUICK_ALPHAS)),
            ("Plain SGD, learning-rate sweep", sgd_sweep(QUICK_SGD_LRS)),
        ]
    return [
        (f"Layca, alpha sweep (rotation rate {power_of_three(BEST_ROTATION_RATE)})", alpha_sweep()),
        ("Layca, rotation-rate sweep (alpha = 0)", rate_sweep()),
        ("Plain SGD, learning-rate sweep", sgd_sweep()),
    ]


def configurations(quick: bool) -> list[Config]:
    """Every distinct configuration of the experiment, in table order (a configuration in two sweeps runs once)."""
    unique: dict[Config, None] = {}
    for _, configs in table_groups(quick):
        unique.update(dict.fromkeys(configs))
    return list(unique)


# ---------------------------------------------------------------------------------------------- one run
class AlphaExperimentCNN(ExperimentCNN):
    """The 8-layer MNIST-1D CNN trained with plain SGD (no momentum, no weight decay) and a step decay of the lr."""

    def __init__(self, width: int, lr: float, epochs: int) -> None:
        super().__init__(width, epochs)
        self.lr = lr

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.0, weight_decay=0.0)


def train_one(config: Config, seed: int, datamodule: MNIST1DDataModule, setup: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration from one seed; return its record (accuracy, losses, per-epoch rotation)."""
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule.seed = seed  # the order of the batches; the data were generated once, from DATA_SEED
    model = AlphaExperimentCNN(setup["width"], config.lr, setup["epochs"])
    monitor: ll.LayerRotationMonitor
    if config.method == "layca":
        assert config.alpha is not None and config.rotation_rate is not None
        monitor = ll.LaycaCallback(
            rotation_rate=config.rotation_rate,
            schedule=ll.DepthDecay(config.alpha),
            implementation=LAYCA_IMPLEMENTATION,
            log_rates=False,
            angle_histograms=False,
            figure=False,
        )
    else:
        monitor = ll.LayerRotationMonitor(angle_histograms=False, figure=False)
    result = fit(model, datamodule, setup, [monitor])
    return {
        **asdict(config),
        "seed": seed,
        **setup,
        **{k: result[k] for k in ("test_acc", "test_loss", "train_acc", "train_loss")},
        "rotation": {name: [v for _, v in points] for name, points in monitor.epoch_rotation.items()},
        **{k: result[k] for k in ("seconds", "threads")},
    }


# ---------------------------------------------------------------------------------------------- saved runs
def config_of(record: dict[str, Any]) -> Config:
    return Config(record["method"], record["alpha"], record["rotation_rate"], record["lr"])


def by_config(records: Sequence[dict[str, Any]]) -> dict[Config, list[dict[str, Any]]]:
    grouped: dict[Config, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        grouped.setdefault(config_of(r), []).append(r)
    return grouped


# ---------------------------------------------------------------------------------------------- report
def final_rotation(record: dict[str, Any]) -> list[float]:
    return [curve[-1] for curve in record["rotation"].values()]


def table_row(config: Config, runs: list[dict[str, Any]]) -> str:
    if not runs:
        return f"| {config.label} | not run | 0 | | | |"
    test = [r["test_acc"] for r in runs]
    train = [r["train_acc"] for r in runs]
    rotation = [statistics.fmean(final_rotation(r)) for r in runs]
    lowest = statistics.fmean(min(final_rotation(r)) for r in runs)
    highest = statistics.fmean(max(final_rotation(r)) for r in runs)
    seeds = ", ".join(f"{100 * a:.1f}" for a in test)
    return (
        f"| {config.label} | **{pct(*mean_std(test))}** | {len(runs)} | {seeds} | {pct(*mean_std(train))} | "
        f"{statistics.fmean(rotation):.3f} ({lowest:.3f} to {highest:.3f}) |"
    )


def comparisons(grouped: dict[Config, list[dict[str, Any]]]) -> list[str]:
    """The differences the paper's claims are about: alpha = 0 against the others, best Layca against best SGD."""
    base = Config("layca", alpha=0.0, rotation_rate=BEST_ROTATION_RATE)
    lines: list[str] = []
    if base in grouped:
        for other in alpha_sweep():
            if other != base and other in grouped:
                gap = difference(grouped[base], grouped[other])
                lines.append(f"- alpha = 0 minus alpha = {signed(other.alpha or 0.0)}: {gap}")
    sweep = [c for c in alpha_sweep() if c in grouped]
    best_alpha = max(sweep, key=lambda c: statistics.fmean(r["test_acc"] for r in grouped[c]), default=base)
    if best_alpha != base:
        for other in sweep:
            if other != best_alpha and abs(other.alpha or 0.0) == max(abs(a) for a in ALPHAS):
                gap = difference(grouped[best_alpha], grouped[other])
                lines.append(
                    f"- best of the alpha sweep (alpha = {signed(best_alpha.alpha or 0.0)}) minus alpha = "
                    f"{signed(other.alpha or 0.0)}: {gap}"
                )
    layca = {c: rs for c, rs in grouped.items() if c.method == "layca"}
    sgd = {c: rs for c, rs in grouped.items() if c.method == "sgd"}
    if layca and sgd:
        best_layca = max(layca, key=lambda c: statistics.fmean(r["test_acc"] for r in layca[c]))
        best_sgd = max(sgd, key=lambda c: statistics.fmean(r["test_acc"] for r in sgd[c]))
        if base in layca:
            lines.append(f"- {base.label} minus best SGD ({best_sgd.label}): {difference(layca[base], sgd[best_sgd])}")
        if best_layca != base:
            lines.append(
                f"- best Layca ({best_layca.label}) minus best SGD ({best_sgd.label}): "
                f"{difference(layca[best_layca], sgd[best_sgd])}"
            )
    return lines


def report(records: Sequence[dict[str, Any]], quick: bool) -> list[str]:
    """The Markdown report: setup, one table per sweep, the differences behind the paper's claims."""
    grouped = by_config(records)
    setup = {k: records[0][k] for k in SETUP_KEYS} if records else {}
    decay = ", ".join(f"{round(f * setup.get('epochs', EPOCHS))}" for f in DECAY_AT)
    lines = [
        "# The paper's alpha experiment on MNIST-1D",
        "",
        f"- data: MNIST-1D, {setup.get('num_samples', NUM_SAMPLES)} signals ({TRAIN_SPLIT:.0%} training, the rest "
        f"test), generator seed {DATA_SEED}",
        f"- model: 1-D CNN, {CONVOLUTIONS} convolutions of width {setup.get('width', WIDTH)} and a linear head "
        "(8 layers), no biases, batch norm without affine parameters",
        f"- training: {setup.get('epochs', EPOCHS)} epochs, batch size {setup.get('batch_size', BATCH_SIZE)}, plain "
        f"SGD (momentum 0, weight decay 0), lr x{DECAY_FACTOR} after epochs {decay}; Layca wraps that SGD (base lr 1)"
        + (f"; {setup['limit_train_batches']} batches per epoch" if setup.get("limit_train_batches") else ""),
        "- test accuracy: mean ± sample standard deviation over seeds, in %; rotation: cosine distance of each "
        "layer's final weights to its initial weights, mean over layers (lowest to highest layer), mean over seeds",
        machine_line(records),
        f"- command: `{run_command('reproduce_alpha.py', setup, quick)}`",
        "",
    ]
    for title, configs in table_groups(quick):
        lines += [
            f"## {title}",
            "",
            "| configuration | test accuracy (%) | seeds | per seed | train accuracy (%) | final rotation |",
            "|---|---|---|---|---|---|",
            *(table_row(c, grouped.get(c, [])) for c in configs),
            "",
        ]
    lines += [
        "## Differences of mean test accuracy",
        "",
        DIFFERENCE_NOTE,
        "",
        *(comparisons(grouped) or ["- (not enough runs yet)"]),
        "",
    ]
    return lines


def curves_figure(records: Sequence[dict[str, Any]], alphas: Sequence[float] = FIGURE_ALPHAS) -> Any:
    """One panel per alpha (Layca at the best rotation rate): every layer's rotation per epoch, averaged over seeds."""
    from matplotlib.figure import Figure

    grouped = by_config(records)
    fig = Figure(figsize=(5.2 * len(alphas), 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(alphas), squeeze=False)[0]
    for ax, alpha in zip(axes, alphas, strict=True):
        runs = grouped.get(Config("layca", alpha=alpha, rotation_rate=BEST_ROTATION_RATE), [])
        title = f"Layca, alpha = {signed(alpha)}"
        if not runs:
            ax.set_title(title)
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            continue
        names = list(runs[0]["rotation"])
        # Runs of one setup have curves of the same length (load_records checks the setup).
        curves = {
            name: [statistics.fmean(v) for v in zip(*(r["rotation"][name] for r in runs), strict=True)]
            for name in names
        }
        epochs = list(range(len(next(iter(curves.values())))))
        seeds = f"mean of {len(runs)} seeds" if len(runs) > 1 else "1 seed"
        rotation_curves_figure(epochs, curves, title=f"{title} ({seeds})", ax=ax)
    return fig


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_common_arguments(parser, quick_help="one seed, alpha in {-0.6, 0, 0.6}, two SGD lrs")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the rotation curves")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    defaults = QUICK_OUTPUTS if args.quick else FULL_OUTPUTS
    args.results = args.results or defaults[0]
    args.table = args.table or defaults[1]
    args.figure = args.figure or defaults[2]
    return args


def write_outputs(records: Sequence[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = report(records, args.quick)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text("\n".join(lines) + "\n")
    save_png(curves_figure(records), args.figure)
    return lines


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Run the missing runs (unless ``--report-only``), then write the table and the figure; return the table."""
    args = parse_args(argv)
    records = run_missing(args, configurations(args.quick), config_of, train_one)
    lines = write_outputs(records, args)
    print("\n".join(lines))
    print(f"wrote {args.table} and {args.figure}")
    return lines


if __name__ == "__main__":
    main()
