"""Adaptive optimizers and the equilibrium rate on MNIST-1D: AdamW, Layca around AdamW, and plain SGD.

Carbonnelle and De Vleeschouwer (arXiv:1806.01603) report that adaptive methods generalise worse than SGD and that
Layca closes most of that gap. The equilibrium rate (``rotation_rate="equilibrium"``) gives every layer, from the first
step, the angular update that AdamW with weight decay reaches only once its layers' norms have settled. This script
trains, on the alpha experiment's setup (``reproduce_alpha.py``: the same data, model, 40 epochs, batch size and step
decay of the learning rate):

* AdamW at torch's defaults: lr 1e-3, betas (0.9, 0.999), weight decay 1e-2;
* Layca around that AdamW at rotation rate 3^-5 (every layer turns by atan(3^-5) per step at the initial lr);
* Layca around that AdamW at its equilibrium rate, ``sqrt(2 lr wd (1 - beta1) / (1 + beta1))``, per layer;
* the same per output unit (``granularity="unit"``);
* plain SGD (no momentum, no weight decay) at lr 3^-1, the best learning rate of the alpha experiment;

from seeds 0, 1 and 2. Every run records its test and training accuracy, every layer's rotation (cosine distance to
its initial weights) at every epoch end, and, every few optimizer steps, the tangent of the angle every layer turned
in that step (``Step_rotation/<layer>``) and its norm (``Weight_norm/<layer>``), as the monitor logs them.

Each finished run is appended at once to a JSON-lines file, and runs already there are skipped, so an interrupted
experiment resumes where it stopped and ``--report-only`` builds the report and the figures from whatever has finished.

Run from the repository root::

    python -m benchmarks.adaptive_equilibrium                 # 15 runs; writes docs/results/ and docs/images/
    python -m benchmarks.adaptive_equilibrium --quick         # 5 runs, one seed
    python -m benchmarks.adaptive_equilibrium --report-only   # report and figures from the saved runs
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a file: make `benchmarks`, `examples` and `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
from lightning.pytorch.loggers import Logger

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
    relative_lr,
    run_command,
    run_missing,
)
from examples.mnist1d_cnn import MNIST1DDataModule
from lightning_layca.argument_types import EQUILIBRIUM
from lightning_layca.figures import rotation_curves_figure, save_png
from lightning_layca.selection import layer_display_name

__all__ = ["Config", "config_of", "configurations", "load_records", "main", "report", "train_one"]

ADAMW_LR = 1e-3
ADAMW_BETAS = (0.9, 0.999)
ADAMW_WEIGHT_DECAY = 1e-2
"""torch.optim.AdamW's defaults: what AdamW means to whoever does not tune it."""
ADAPTIVE_ROTATION_RATE = 3**-5
SGD_LR = 3**-1
"""Plain SGD's best learning rate in the alpha experiment (docs/results/alpha_experiment.md)."""
RATE_EVERY = 8
"""Optimizer steps between two measurements of the per-step rotation rates and norms."""
FULL_OUTPUTS = (
    ROOT / "docs" / "results" / "adaptive_equilibrium.jsonl",
    ROOT / "docs" / "results" / "adaptive_equilibrium.md",
    ROOT / "docs" / "images" / "adaptive_rotation_curves.png",
    ROOT / "docs" / "images" / "adaptive_rates.png",
)
QUICK_OUTPUTS = (
    ROOT / "benchmarks" / "results" / "adaptive_quick.jsonl",
    ROOT / "benchmarks" / "results" / "adaptive_quick.md",
    ROOT / "benchmarks" / "results" / "adaptive_quick_rotation.png",
    ROOT / "benchmarks" / "results" / "adaptive_quick_rates.png",
)


# ---------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One training configuration: ``"adamw"``, ``"layca-adamw"`` (at ``rotation_rate``, per ``granularity``) or
    ``"sgd"``."""

    method: str
    lr: float
    weight_decay: float
    rotation_rate: float | str | None = None
    granularity: str | None = None

    @property
    def label(self) -> str:
        if self.method == "sgd":
            return f"SGD, lr = {power_of_three(self.lr)}"
        if self.method == "adamw":
            return "AdamW"
        assert self.rotation_rate is not None
        rate = (
            "equilibrium rate"
            if self.rotation_rate == EQUILIBRIUM
            else "rate " + power_of_three(float(self.rotation_rate))
        )
        return f"Layca(AdamW), {rate}" + (", per unit" if self.granularity == "unit" else "")

    @property
    def uses_adamw(self) -> bool:
        return self.method in ("adamw", "layca-adamw")


ADAMW = Config("adamw", ADAMW_LR, ADAMW_WEIGHT_DECAY)
LAYCA_FIXED = Config("layca-adamw", ADAMW_LR, ADAMW_WEIGHT_DECAY, ADAPTIVE_ROTATION_RATE, "layer")
LAYCA_EQUILIBRIUM = Config("layca-adamw", ADAMW_LR, ADAMW_WEIGHT_DECAY, EQUILIBRIUM, "layer")
LAYCA_EQUILIBRIUM_UNIT = Config("layca-adamw", ADAMW_LR, ADAMW_WEIGHT_DECAY, EQUILIBRIUM, "unit")
SGD = Config("sgd", SGD_LR, 0.0)


def configurations(quick: bool = False) -> list[Config]:
    """The five configurations, in table order (``--quick`` runs them all, from one seed)."""
    return [ADAMW, LAYCA_FIXED, LAYCA_EQUILIBRIUM, LAYCA_EQUILIBRIUM_UNIT, SGD]


def adamw_equilibrium_rate(lr: float) -> float:
    """AdamW's equilibrium angular update at learning rate ``lr`` (the formula ``rotation_rate="equilibrium"`` uses)."""
    beta1 = ADAMW_BETAS[0]
    return math.sqrt(2 * lr * ADAMW_WEIGHT_DECAY * (1 - beta1) / (1 + beta1))


# ---------------------------------------------------------------------------------------------- one run
class AdaptiveExperimentCNN(ExperimentCNN):
    """The 8-layer MNIST-1D CNN trained by AdamW (``optimizer="adamw"``) or plain SGD, with the step decay."""

    def __init__(self, width: int, epochs: int, optimizer: str, lr: float, weight_decay: float) -> None:
        super().__init__(width, epochs)
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay

    def make_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, betas=ADAMW_BETAS, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.0, weight_decay=self.weight_decay)


class ScalarRecorder(Logger):
    """A logger that keeps in memory the scalars whose tag starts with one of ``prefixes``: tag -> [(step, value)]."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)
        self.series: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for tag, value in metrics.items():
            if tag.startswith(self.prefixes):
                self.series.setdefault(tag, []).append((-1 if step is None else int(step), float(value)))


def significant(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (the saved curves need no more)."""
    return float(f"{x:.{digits}g}")


def train_one(config: Config, seed: int, datamodule: MNIST1DDataModule, setup: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration from one seed; return its record: accuracy, rotation per epoch, rates and norms."""
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule.seed = seed  # the order of the batches; the data were generated once, from DATA_SEED
    optimizer = "sgd" if config.method == "sgd" else "adamw"
    model = AdaptiveExperimentCNN(setup["width"], setup["epochs"], optimizer, config.lr, config.weight_decay)
    initial_norms = {
        layer_display_name(name): float(p.detach().norm()) for name, p in ll.select_layers(model.named_parameters())
    }
    monitor: ll.LayerRotationMonitor
    if config.method == "layca-adamw":
        assert config.rotation_rate is not None and config.granularity in ("layer", "unit")
        monitor = ll.LaycaCallback(
            rotation_rate=config.rotation_rate,  # type: ignore[arg-type]
            granularity=config.granularity,  # type: ignore[arg-type]
            implementation=LAYCA_IMPLEMENTATION,
            log_every_n_steps=RATE_EVERY,
            log_rates=False,
            angle_histograms=False,
            figure=False,
            per_layer_detail=True,
        )
    else:
        monitor = ll.LayerRotationMonitor(
            log_every_n_steps=RATE_EVERY, angle_histograms=False, figure=False, per_layer_detail=True
        )
    recorder = ScalarRecorder(("Step_rotation/", "Weight_norm/"))
    result = fit(model, datamodule, setup, [monitor], loggers=[recorder])
    series = recorder.series.items()
    rates = {tag.removeprefix("Step_rotation/"): pts for tag, pts in series if tag.startswith("Step_rotation/")}
    norms = {tag.removeprefix("Weight_norm/"): pts for tag, pts in series if tag.startswith("Weight_norm/")}
    steps = [step for step, _ in next(iter(rates.values()), [])]
    return {
        **asdict(config),
        "seed": seed,
        **setup,
        **{k: result[k] for k in ("test_acc", "test_loss", "train_acc", "train_loss", "steps_per_epoch")},
        "rotation": {name: [v for _, v in points] for name, points in monitor.epoch_rotation.items()},
        "initial_norms": initial_norms,
        "rate_steps": steps,
        "rates": {name: [significant(v, 3) for _, v in pts] for name, pts in rates.items()},
        "norms": {name: [significant(v, 4) for _, v in pts] for name, pts in norms.items()},
        **{k: result[k] for k in ("seconds", "threads")},
    }


# ---------------------------------------------------------------------------------------------- saved runs
def config_of(record: dict[str, Any]) -> Config:
    keys = ("method", "lr", "weight_decay", "rotation_rate", "granularity")
    return Config(*(record[k] for k in keys))


def by_config(records: Sequence[dict[str, Any]]) -> dict[Config, list[dict[str, Any]]]:
    grouped: dict[Config, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        grouped.setdefault(config_of(r), []).append(r)
    return grouped


def step_lr(config: Config, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The learning rate of ``config`` at optimizer step ``step`` (0-based) under the step decay."""
    return config.lr * relative_lr(step // steps_per_epoch, epochs)


# ---------------------------------------------------------------------------------------------- report
def final_rotation(record: dict[str, Any]) -> list[float]:
    return [curve[-1] for curve in record["rotation"].values()]


def accuracy_row(config: Config, runs: list[dict[str, Any]]) -> str:
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


def epoch_rates(record: dict[str, Any], epoch: int) -> list[float]:
    """Every layer's mean measured rate over the logged steps of ``epoch`` (1-based)."""
    per_epoch = record["steps_per_epoch"]
    chosen = [i for i, s in enumerate(record["rate_steps"]) if s // per_epoch == epoch - 1]
    return [statistics.fmean(curve[i] for i in chosen) for curve in record["rates"].values()] if chosen else []


def rate_cell(runs: list[dict[str, Any]], epoch: int) -> str:
    """Median over layers (lowest to highest layer) of the layers' mean rate in ``epoch``, each a mean over seeds."""
    per_run = [sorted(epoch_rates(r, epoch)) for r in runs]
    if not per_run or not per_run[0]:
        return ""
    median = statistics.fmean(statistics.median(rates) for rates in per_run)
    lowest = statistics.fmean(rates[0] for rates in per_run)
    highest = statistics.fmean(rates[-1] for rates in per_run)
    return f"{median:.2e} ({lowest:.2e} to {highest:.2e})"


def norm_growth(runs: list[dict[str, Any]]) -> str:
    """Final norm over initial norm of every layer: lowest to highest layer, mean over seeds."""
    ratios = [sorted(r["norms"][name][-1] / r["initial_norms"][name] for name in r["norms"]) for r in runs]
    return f"{statistics.fmean(x[0] for x in ratios):.3f} to {statistics.fmean(x[-1] for x in ratios):.3f}"


def rate_epochs(epochs: int) -> list[int]:
    """The epochs the rate table shows (1-based): the first, the last before each decay, the last."""
    return sorted({1, *(m for m in (round(f * epochs) for f in DECAY_AT) if m >= 1), epochs})


def rate_rows(grouped: dict[Config, list[dict[str, Any]]], epochs: int) -> list[str]:
    shown = rate_epochs(epochs)
    rows = []
    for config in configurations():
        runs = grouped.get(config, [])
        if runs:
            cells = " | ".join(rate_cell(runs, e) for e in shown)
            rows.append(f"| {config.label} | {cells} | {norm_growth(runs)} |")
    lrs = [ADAMW_LR * relative_lr(e - 1, epochs) for e in shown]
    equilibrium = " | ".join(f"{adamw_equilibrium_rate(lr):.2e}" for lr in lrs)
    rows.append(f"| AdamW's equilibrium rate at that epoch's lr (formula) | {equilibrium} | |")
    return rows


def layer_rows(runs: list[dict[str, Any]], epochs: int) -> list[str]:
    """One row per layer: its mean measured rate in the rate table's epochs and its final norm over its initial norm,
    each averaged over seeds."""
    rows = []
    shown = rate_epochs(epochs)
    for i, name in enumerate(runs[0]["rates"]):
        per_epoch = [[epoch_rates(r, e) for r in runs] for e in shown]
        rates = " | ".join(
            f"{statistics.fmean(v[i] for v in values):.2e}" if all(values) else "" for values in per_epoch
        )
        growth = statistics.fmean(r["norms"][name][-1] / r["initial_norms"][name] for r in runs)
        rotation = statistics.fmean(r["rotation"][name][-1] for r in runs)
        rows.append(f"| {name} | {rates} | {growth:.3f} | {rotation:.3f} |")
    return rows


def comparisons(grouped: dict[Config, list[dict[str, Any]]]) -> list[str]:
    """The differences the paper's claim is about: AdamW against SGD, and each Layca(AdamW) against both."""
    pairs = [
        (ADAMW, SGD),
        (LAYCA_FIXED, ADAMW),
        (LAYCA_EQUILIBRIUM, ADAMW),
        (LAYCA_EQUILIBRIUM_UNIT, ADAMW),
        (LAYCA_FIXED, SGD),
        (LAYCA_EQUILIBRIUM, SGD),
        (LAYCA_EQUILIBRIUM_UNIT, SGD),
        (LAYCA_EQUILIBRIUM_UNIT, LAYCA_EQUILIBRIUM),
        (LAYCA_FIXED, LAYCA_EQUILIBRIUM),
    ]
    return [
        f"- {a.label} minus {b.label}: {difference(grouped[a], grouped[b])}"
        for a, b in pairs
        if a in grouped and b in grouped
    ]


def per_layer_section(grouped: dict[Config, list[dict[str, Any]]], epochs: int) -> list[str]:
    """AdamW's and SGD's layers one by one: how their rates and norms moved."""
    lines = []
    for config in (ADAMW, SGD):
        runs = grouped.get(config, [])
        if not runs:
            continue
        shown = " | ".join(f"rate, epoch {e}" for e in rate_epochs(epochs))
        lines += [
            f"### {config.label}, layer by layer",
            "",
            f"| layer | {shown} | final norm / initial norm | final rotation |",
            "|---|" + "---|" * (len(rate_epochs(epochs)) + 2),
            *layer_rows(runs, epochs),
            "",
        ]
    return lines


def report(records: Sequence[dict[str, Any]], quick: bool) -> list[str]:
    """The Markdown report: setup, accuracy table, rate table, the differences behind the paper's claim."""
    grouped = by_config(records)
    setup = {k: records[0][k] for k in SETUP_KEYS} if records else {}
    epochs = setup.get("epochs", EPOCHS)
    decay = ", ".join(f"{round(f * epochs)}" for f in DECAY_AT)
    shown = " | ".join(f"epoch {e}" for e in rate_epochs(epochs))
    lines = [
        "# Adaptive optimizers and the equilibrium rate on MNIST-1D",
        "",
        f"- data: MNIST-1D, {setup.get('num_samples', NUM_SAMPLES)} signals ({TRAIN_SPLIT:.0%} training, the rest "
        f"test), generator seed {DATA_SEED}",
        f"- model: 1-D CNN, {CONVOLUTIONS} convolutions of width {setup.get('width', WIDTH)} and a linear head "
        "(8 layers), no biases, batch norm without affine parameters",
        f"- training: {epochs} epochs, batch size {setup.get('batch_size', BATCH_SIZE)}, lr x{DECAY_FACTOR} after "
        f"epochs {decay}; AdamW: lr {ADAMW_LR:g}, betas {ADAMW_BETAS}, weight decay {ADAMW_WEIGHT_DECAY:g}; Layca "
        f"wraps that AdamW; SGD: momentum 0, weight decay 0"
        + (f"; {setup['limit_train_batches']} batches per epoch" if setup.get("limit_train_batches") else ""),
        "- test accuracy: mean ± sample standard deviation over seeds, in %; rotation: cosine distance of each "
        "layer's final weights to its initial weights, mean over layers (lowest to highest layer), mean over seeds",
        f"- rates: `Step_rotation`, the tangent of the angle a layer turned in one optimizer step, measured "
        f"every {RATE_EVERY} steps",
        machine_line(records),
        f"- command: `{run_command('adaptive_equilibrium.py', setup, quick)}`",
        "",
        "## Test accuracy",
        "",
        "| configuration | test accuracy (%) | seeds | per seed | train accuracy (%) | final rotation |",
        "|---|---|---|---|---|---|",
        *(accuracy_row(c, grouped.get(c, [])) for c in configurations(quick)),
        "",
        "## Per-step rotation rates and norms",
        "",
        "Each layer's measured rate averaged over the logged steps of an epoch; the median over the 8 layers (in "
        "parentheses the lowest and the highest layer), averaged over seeds. Norm: each layer's final norm over its "
        "initial norm, lowest to highest layer, averaged over seeds.",
        "",
        f"| configuration | {shown} | final norm / initial norm |",
        "|---|" + "---|" * (len(rate_epochs(epochs)) + 1),
        *rate_rows(grouped, epochs),
        "",
        *per_layer_section(grouped, epochs),
        "## Differences of mean test accuracy",
        "",
        DIFFERENCE_NOTE,
        "",
        *(comparisons(grouped) or ["- (not enough runs yet)"]),
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- figures
def mean_curves(runs: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """Layer -> the mean over runs of their curves under ``key`` (runs of one setup have curves of one length)."""
    return {
        name: [statistics.fmean(v) for v in zip(*(r[key][name] for r in runs), strict=True)] for name in runs[0][key]
    }


def seeds_note(runs: list[dict[str, Any]]) -> str:
    return f"mean of {len(runs)} seeds" if len(runs) > 1 else "1 seed"


def rotation_figure(records: Sequence[dict[str, Any]]) -> Any:
    """One panel per configuration: every layer's rotation per epoch, averaged over seeds."""
    from matplotlib.figure import Figure

    grouped = by_config(records)
    configs = configurations()
    fig = Figure(figsize=(4.6 * len(configs), 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(configs), squeeze=False)[0]
    for ax, config in zip(axes, configs, strict=True):
        runs = grouped.get(config, [])
        if not runs:
            ax.set_title(config.label)
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            continue
        curves = mean_curves(runs, "rotation")
        epochs = list(range(len(next(iter(curves.values())))))
        rotation_curves_figure(epochs, curves, title=f"{config.label}\n({seeds_note(runs)})", ax=ax)
    for ax in axes:
        ax.set_ylim(0.0, max(max(a.get_ylim()[1] for a in axes), 1.0))
    return fig


def rates_figure(records: Sequence[dict[str, Any]]) -> Any:
    """Per-step rates (top, log scale) and norms relative to the initial ones (bottom), one column per configuration.

    Every line is a layer, coloured from the first (dark) to the last (yellow), averaged over seeds; the dashed line is
    AdamW's equilibrium rate at the learning rate of each step.
    """
    import matplotlib
    from matplotlib.figure import Figure

    grouped = by_config(records)
    configs = configurations()
    fig = Figure(figsize=(4.6 * len(configs), 7.2), dpi=100, layout="constrained")
    axes = fig.subplots(2, len(configs), squeeze=False, sharey="row")
    colormap = matplotlib.colormaps["viridis"]
    for column, config in enumerate(configs):
        top, bottom = axes[0][column], axes[1][column]
        top.set_title(config.label)
        runs = grouped.get(config, [])
        if not runs:
            top.text(0.5, 0.5, "not run", ha="center", va="center", transform=top.transAxes)
            continue
        top.set_title(f"{config.label}\n({seeds_note(runs)})")
        steps = [s + 1 for s in runs[0]["rate_steps"]]  # the logged step's 0-based index -> steps taken
        rates = mean_curves(runs, "rates")
        relative = {
            name: [
                statistics.fmean(v)
                for v in zip(*([x / r["initial_norms"][name] for x in r["norms"][name]] for r in runs), strict=True)
            ]
            for name in runs[0]["norms"]
        }
        n = len(rates)
        for depth, name in enumerate(rates):
            color = colormap(depth / max(n - 1, 1))
            top.plot(steps, rates[name], color=color, linewidth=0.8)
            bottom.plot(steps, relative[name], color=color, linewidth=1.2)
        if config.uses_adamw:
            equilibrium = [
                adamw_equilibrium_rate(step_lr(config, s, runs[0]["steps_per_epoch"], runs[0]["epochs"])) for s in steps
            ]
            top.plot(steps, equilibrium, color="black", linestyle="--", linewidth=1.2, label="AdamW's equilibrium")
            top.legend(loc="upper right", fontsize="small")
        top.set_yscale("log")
        top.grid(True, which="both", alpha=0.3)
        bottom.grid(True, alpha=0.3)
        bottom.set_xlabel("optimizer step")
    axes[0][0].set_ylabel("rotation per step (tan of the angle)")
    axes[1][0].set_ylabel("layer norm / initial norm")
    layers = max((len(r["rates"]) for r in records), default=1)
    mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, max(layers - 1, 1)), cmap=colormap)
    bar = fig.colorbar(mappable, ax=axes[:, -1].tolist())
    bar.set_label("layer index (input → output)")
    return fig


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_common_arguments(parser, quick_help="the five configurations from one seed")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the rotation curves")
    parser.add_argument("--rates-figure", type=Path, default=None, help="PNG of the per-step rates and norms")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    defaults = QUICK_OUTPUTS if args.quick else FULL_OUTPUTS
    args.results = args.results or defaults[0]
    args.table = args.table or defaults[1]
    args.figure = args.figure or defaults[2]
    args.rates_figure = args.rates_figure or defaults[3]
    return args


def write_outputs(records: Sequence[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    lines = report(records, args.quick)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text("\n".join(lines) + "\n")
    save_png(rotation_figure(records), args.figure)
    save_png(rates_figure(records), args.rates_figure)
    return lines


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Run the missing runs (unless ``--report-only``), then write the report and the figures; return the report."""
    args = parse_args(argv)
    records = run_missing(args, configurations(args.quick), config_of, train_one)
    lines = write_outputs(records, args)
    print("\n".join(lines))
    print(f"wrote {args.table}, {args.figure} and {args.rates_figure}")
    return lines


if __name__ == "__main__":
    main()
