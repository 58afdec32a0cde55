"""Closed-loop rotation targets on the MNIST-1D study: does every layer end where it is told, and what does it buy?

The setup is the one of ``reproduce_alpha.py`` (the 8-layer MNIST-1D CNN, plain SGD without momentum or weight decay
wrapped by Layca, 40 epochs, the learning rate x0.2 at 50% and 75% of the epochs, seeds 0, 1 and 2), with
``LaycaCallback(target=RotationTarget(...))`` in place of a fixed rotation rate:

* uniform final targets 0.2, 0.4, 0.6 and 0.8 (every layer), shaped by the integral of the learning rate;
* depth profiles: 0.6 for the first layer down to 0.2 for the last, linearly in depth, and the reverse.

Per run it records the test accuracy and every layer's final rotation, and prints for each target and seed the ratio
of the largest to the smallest final rotation and their mean (uniform targets), or each layer's deviation from its
target (the profile). The report compares test accuracy with uniform-rate Layca at its best rate and plain SGD at its
best learning rate, read from the saved runs of ``reproduce_alpha.py`` (``docs/results/alpha_experiment.jsonl``: the
same data, model, schedule, seeds and epochs).

``--overhead`` times the controller itself: the seconds spent in its measurement and rate updates (at the default
interval) against the whole fit's, on one run.

Run from the repository root::

    python -m benchmarks.rotation_targets               # 15 runs; docs/results/rotation_targets.{jsonl,md}
    python -m benchmarks.rotation_targets --report-only
    python -m benchmarks.rotation_targets --overhead --seeds 0
    python -m benchmarks.rotation_targets --trace docs/results/target_trace.json --trace-final 0.4 --seeds 0
    python -m benchmarks.rotation_targets --trace-report docs/results/target_trace_*.json

``--trace`` records every control interval of one run per seed (each layer's rate, distance, target and the
controller's estimate of the fraction of its turning that became distance) and prints a summary per phase of the
learning rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks`, `examples` and `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L

import lightning_layca as ll
from benchmarks._mnist1d_experiment import (
    DIFFERENCE_NOTE,
    LAYCA_IMPLEMENTATION,
    ROOT,
    SETUP_KEYS,
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
    run_missing,
    setup_of,
)
from benchmarks.reproduce_alpha import AlphaExperimentCNN
from examples.mnist1d_cnn import MNIST1DDataModule
from lightning_layca import target_controller as controller_module
from lightning_layca.figures import save_png

UNIFORM = (0.2, 0.4, 0.6, 0.8)
PROFILES = ((0.6, 0.2), (0.2, 0.6))
ALPHA_RUNS = ROOT / "docs" / "results" / "alpha_experiment.jsonl"
RESULTS = ROOT / "docs" / "results" / "rotation_targets.jsonl"
TABLE = ROOT / "docs" / "results" / "rotation_targets.md"
RATIO_LIMIT = 1.15
MEAN_TOLERANCE = 0.03


@dataclass(frozen=True)
class Config:
    """A uniform final target (``last`` None) or a depth profile from ``final`` (first layer) to ``last``."""

    final: float
    last: float | None = None
    steer: bool = False

    @property
    def label(self) -> str:
        steered = ", steered" if self.steer else ""
        if self.last is None:
            return f"target {self.final:g} (uniform{steered})"
        return f"target {self.final:g} -> {self.last:g} (depth profile{steered})"


FIGURE = ROOT / "docs" / "images" / "target_curves.png"
FIGURE_CONFIGS = (Config(0.2), Config(0.6), Config(0.6, 0.2))


def curves_figure(records: Sequence[dict[str, Any]], seed: int = 0, steer: bool = False) -> Any:
    """One panel per configuration of :data:`FIGURE_CONFIGS` (one seed, steered or not): every layer's rotation, its
    target dashed."""
    from matplotlib.figure import Figure

    from lightning_layca.figures import rotation_curves_figure

    fig = Figure(figsize=(5.2 * len(FIGURE_CONFIGS), 4.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(FIGURE_CONFIGS), squeeze=False)[0]
    for ax, plain in zip(axes, FIGURE_CONFIGS, strict=True):
        config = Config(plain.final, plain.last, steer)
        runs = [r for r in records if config_of(r) == config and r["seed"] == seed]
        if not runs:
            ax.set_title(config.label)
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
            continue
        (run,) = runs
        epochs = list(range(len(next(iter(run["rotation"].values())))))
        rotation_curves_figure(
            epochs, run["rotation"], title=f"{config.label}, seed {seed}", ax=ax, targets=run["targets"]
        )
    return fig


def configurations() -> list[Config]:
    plain = [Config(f) for f in UNIFORM] + [Config(*p) for p in PROFILES]
    return plain + [Config(c.final, c.last, steer=True) for c in plain]


def config_of(record: dict[str, Any]) -> Config:
    return Config(record["final"], record["last"], record.get("steer", False))


def train_one(
    config: Config, seed: int, datamodule: MNIST1DDataModule, setup: dict[str, Any], max_rate: float = 1.0
) -> dict[str, Any]:
    """Train one target from one seed; return its record (accuracy, final rotation and target of every layer)."""
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule.seed = seed
    model = AlphaExperimentCNN(setup["width"], 1.0, setup["epochs"])
    callback = ll.LaycaCallback(
        target=ll.RotationTarget(config.final, last_layer=config.last, max_rate=max_rate, steer=config.steer),
        implementation=LAYCA_IMPLEMENTATION,
        log_rates=False,
        angle_histograms=False,
        figure=False,
    )
    result = fit(model, datamodule, setup, [callback])
    return {
        **asdict(config),
        "seed": seed,
        **setup,
        **{k: result[k] for k in ("test_acc", "test_loss", "train_acc", "train_loss")},
        "rotation": {name: [v for _, v in points] for name, points in callback.epoch_rotation.items()},
        "targets": dict(callback.epoch_targets),
        "steered_degrees": {
            name: angle
            for layca in callback.laycas.values()
            if layca.targets is not None
            for name, angle in zip(layca.targets.names, layca.targets.steered, strict=True)
        },
        **{k: result[k] for k in ("seconds", "threads")},
    }


def final_rotation(record: dict[str, Any]) -> list[float]:
    return [curve[-1] for curve in record["rotation"].values()]


def final_targets(record: dict[str, Any]) -> list[float]:
    return [curve[-1] for curve in record["targets"].values()]


def tracking_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Per target and seed: the spread and mean of the final rotation (uniform), or each layer's deviation."""
    lines = [
        "| target | seed | final rotation, first to last layer | max / min | mean (or largest deviation) | met "
        "| steered, degrees, least to most |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r.get("steer", False), r["last"] is not None, r["final"], r["seed"])):
        final = final_rotation(r)
        values = " ".join(f"{v:.3f}" for v in final)
        ratio = max(final) / min(final)
        steered = list(r.get("steered_degrees", {}).values())
        steering = f"{min(steered):.0f} to {max(steered):.0f}" if r.get("steer", False) and steered else ""
        if r["last"] is None:
            mean = statistics.fmean(final)
            met = ratio <= RATIO_LIMIT and abs(mean - r["final"]) <= MEAN_TOLERANCE
            summary = f"{mean:.3f}"
        else:
            deviation = max(abs(v - t) for v, t in zip(final, final_targets(r), strict=True))
            met = deviation <= MEAN_TOLERANCE
            summary = f"{deviation:.3f}"
        lines.append(
            f"| {config_of(r).label} | {r['seed']} | {values} | {ratio:.3f} | {summary} | {'yes' if met else 'no'} "
            f"| {steering} |"
        )
    return lines


def accuracy_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Test accuracy of each target against the best uniform rate and the best plain SGD of the saved runs."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        grouped.setdefault(config_of(r).label, []).append(r)
    baselines: dict[str, list[dict[str, Any]]] = {}
    setup = {k: records[0][k] for k in SETUP_KEYS} if records else {}
    for r in load_records(ALPHA_RUNS):
        if any(r[k] != v for k, v in setup.items()):  # another study: not comparable
            continue
        if r["method"] == "layca" and r["alpha"] == 0.0:
            baselines.setdefault(f"Layca, uniform rate {power_of_three(r['rotation_rate'])}", []).append(r)
        elif r["method"] == "sgd":
            baselines.setdefault(f"SGD, lr {power_of_three(r['lr'])}", []).append(r)

    def best(prefix: str) -> str:
        return max(
            (k for k in baselines if k.startswith(prefix)),
            key=lambda k: statistics.fmean(x["test_acc"] for x in baselines[k]),
        )

    if not baselines:
        return ["No saved uniform-rate or SGD runs of this setup to compare with."]
    best_layca, best_sgd = best("Layca"), best("SGD")
    lines = [
        "| configuration | test accuracy (%) | seeds | per seed | mean final rotation (min to max) |",
        "|---|---:|---:|---|---|",
    ]
    order = [c.label for c in configurations()] + [best_layca, best_sgd]
    runs = {**grouped, best_layca: baselines[best_layca], best_sgd: baselines[best_sgd]}
    for label in order:
        if label not in runs:
            lines.append(f"| {label} | not run | 0 | | |")
            continue
        rs = sorted(runs[label], key=lambda r: r["seed"])
        acc = [r["test_acc"] for r in rs]
        finals = [final_rotation(r) for r in rs]
        mean = statistics.fmean(statistics.fmean(f) for f in finals)
        low = statistics.fmean(min(f) for f in finals)
        high = statistics.fmean(max(f) for f in finals)
        per_seed = ", ".join(f"{100 * a:.1f}" for a in acc)
        lines.append(
            f"| {label} | **{pct(*mean_std(acc))}** | {len(rs)} | {per_seed} | {mean:.3f} ({low:.3f} to {high:.3f}) |"
        )
    lines += ["", "Differences of mean test accuracy:", ""]
    for label in [c.label for c in configurations()]:
        if label in grouped:
            lines.append(
                f"- {label} minus best uniform rate ({best_layca}): {difference(grouped[label], runs[best_layca])}"
            )
            lines.append(f"- {label} minus best SGD ({best_sgd}): {difference(grouped[label], runs[best_sgd])}")
    lines += ["", DIFFERENCE_NOTE]
    return lines


def report(records: Sequence[dict[str, Any]]) -> str:
    return "\n".join(
        [
            "# Closed-loop rotation targets on MNIST-1D",
            "",
            "Written by `python -m benchmarks.rotation_targets` (`--report-only` rebuilds it from the saved runs).",
            "",
            machine_line(records),
            "",
            "## Final rotation against the target",
            "",
            f"Met: uniform targets with max/min <= {RATIO_LIMIT} and the mean within {MEAN_TOLERANCE} of the target; "
            f"the depth profile with every layer within {MEAN_TOLERANCE} of its own target.",
            "",
            *tracking_lines(records),
            "",
            "## Test accuracy",
            "",
            *accuracy_lines(records),
            "",
        ]
    )


def overhead(args: argparse.Namespace) -> None:
    """Time the controller's own work (measurements and rate updates) against the fit, at the default interval."""
    spent = [0.0]

    def timed(method: Any) -> Any:
        def run(self: Any, *a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(self, *a, **k)
            finally:
                spent[0] += time.perf_counter() - start

        return run

    controller = controller_module.TargetController
    controller.after_step = timed(controller.after_step)  # type: ignore[method-assign]
    controller.prepare = timed(controller.prepare)  # type: ignore[method-assign]
    import torch

    torch.set_num_threads(args.threads)
    setup = setup_of(args)
    from benchmarks._mnist1d_experiment import make_datamodule

    datamodule = make_datamodule(setup)
    with quiet_lightning():
        for seed in args.seeds:
            for steer in (False, True):
                spent[0] = 0.0
                record = train_one(Config(0.4, steer=steer), seed, datamodule, setup)
                share = spent[0] / record["seconds"]
                print(
                    f"seed {seed}{', steered' if steer else ''}: fit {record['seconds']:.1f} s, controller "
                    f"{spent[0]:.3f} s ({100 * share:.2f} % of the fit), interval {ll.RotationTarget().interval} "
                    f"steps, torch threads {torch.get_num_threads()}",
                    flush=True,
                )


def trace(args: argparse.Namespace, final: float, path: Path) -> None:
    """Record every control interval of one run per seed (uniform ``final``): each layer's rate, distance, target."""
    import json

    import torch

    rows: list[dict[str, Any]] = []
    original = controller_module.TargetController.after_step

    def traced(self: Any, layca: Any, *a: Any, **k: Any) -> Any:
        chose = original(self, layca, *a, **k)
        if chose:
            efficiency = [
                p[0] / s[0] if s and s[0] > 0 else None for p, s in zip(self._progress, self._spent, strict=True)
            ]
            rows.append(
                {
                    "step": layca.step_count,
                    "relative_lr": float(layca.param_groups[0]["lr"]) / float(layca.reference_lr),
                    "gain": dict(zip(self.names, self.layer_gains(), strict=True)),
                    "distance": dict(zip(self.names, self.distances, strict=True)),
                    "target": dict(zip(self.names, self.targets, strict=True)),
                    "efficiency": dict(zip(self.names, efficiency, strict=True)),
                }
            )
        return chose

    controller_module.TargetController.after_step = traced  # type: ignore[method-assign]
    torch.set_num_threads(args.threads)
    setup = setup_of(args)
    from benchmarks._mnist1d_experiment import make_datamodule

    datamodule = make_datamodule(setup)
    with quiet_lightning():
        for seed in args.seeds:
            rows.clear()
            record = train_one(Config(final), seed, datamodule, setup, args.trace_max_rate)
            out = path.with_name(f"{path.stem}_seed{seed}{path.suffix}")
            out.write_text(json.dumps({"record": record, "intervals": rows, "max_rate": args.trace_max_rate}))
            print(f"seed {seed}: {len(rows)} intervals -> {out}", flush=True)
            print(trace_summary(json.loads(out.read_text())), flush=True)


def trace_summary(saved: dict[str, Any], layers: Sequence[str] = ("net.conv1.weight", "net.fc.weight")) -> str:
    """Per phase of constant learning rate, for ``layers``: distance (mean, sd, last), rate, efficiency, at max_rate."""
    rows, record, max_rate = saved["intervals"], saved["record"], saved["max_rate"]
    lines = [
        f"max_rate {max_rate:g}: test accuracy {100 * record['test_acc']:.1f} %, training accuracy "
        f"{100 * record['train_acc']:.1f} %, final rotation "
        + ", ".join(f"{name} {curve[-1]:.3f}" for name, curve in record["rotation"].items())
    ]
    phases: list[list[dict[str, Any]]] = []
    for row in rows:
        if not phases or phases[-1][-1]["relative_lr"] != row["relative_lr"]:
            phases.append([])
        phases[-1].append(row)
    for name in layers:
        for phase in phases:
            d = [r["distance"][name] for r in phase]
            rho = [r["gain"][name] * r["relative_lr"] for r in phase]
            e = [r["efficiency"][name] for r in phase if r["efficiency"][name] is not None]
            capped = sum(r["gain"][name] >= max_rate * (1 - 1e-9) for r in phase)
            lines.append(
                f"  {name}, steps {phase[0]['step']}-{phase[-1]['step']} (relative lr {phase[0]['relative_lr']:g}): "
                f"distance mean {statistics.mean(d):.3f} sd {statistics.pstdev(d):.3f} max {max(d):.3f} "
                f"last {d[-1]:.3f} "
                f"(target last {phase[-1]['target'][name]:.3f}), rho mean {statistics.mean(rho):.3g}, "
                f"efficiency mean {statistics.mean(e):.3f} (first {e[0]:.3f}, last {e[-1]:.3f}), "
                f"at max_rate {capped}/{len(phase)} intervals"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "not offered: use --seeds and --epochs")
    parser.add_argument("--overhead", action="store_true", help="time the controller on one run per seed")
    parser.add_argument(
        "--figure",
        type=Path,
        default=None,
        help=f"PNGs of rotation and targets, plain and steered (docs: {FIGURE}, ..._steered.png)",
    )
    parser.add_argument(
        "--trace", type=Path, default=None, help="JSON of every control interval of a uniform --trace-final target"
    )
    parser.add_argument("--trace-final", type=float, default=0.4)
    parser.add_argument("--trace-report", type=Path, nargs="*", help="summarise saved --trace files")
    parser.add_argument("--trace-max-rate", type=float, default=1.0, help="the target's max_rate in --trace runs")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if args.trace_report:
        import json

        for path in args.trace_report:
            print(path)
            print(trace_summary(json.loads(path.read_text())))
        return
    if args.trace is not None:
        trace(args, args.trace_final, args.trace)
        return
    args.results = args.results or RESULTS
    args.table = args.table or TABLE
    if args.overhead:
        overhead(args)
        return
    records = run_missing(args, configurations(), config_of, train_one)
    text = report(records)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    if args.figure is not None:
        save_png(curves_figure(records), args.figure)
        save_png(curves_figure(records, steer=True), args.figure.with_name(f"{args.figure.stem}_steered.png"))
    print(text)


if __name__ == "__main__":
    main()
