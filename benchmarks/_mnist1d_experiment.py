"""What the MNIST-1D experiments share: the data, the 8-layer CNN, one Lightning fit, saved runs and their statistics.

``reproduce_alpha.py`` (the paper's alpha experiment) and ``adaptive_equilibrium.py`` (adaptive optimizers and the
equilibrium rate) train the same model on the same data for the same budget, differing only in the optimizer and
the callbacks. Both save one JSON line per finished run, skip the runs already saved (so an interrupted experiment
resumes), and compare configurations by their mean test accuracy over seeds with the standard error of the
difference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch

from examples.mnist1d_cnn import MNIST1DCNN, MNIST1DDataModule

ROOT = Path(__file__).resolve().parent.parent
SEEDS = (0, 1, 2)
DATA_SEED = 42
EPOCHS = 40
WIDTH = 32
CONVOLUTIONS = 7  # and the linear head: eight layers
BATCH_SIZE = 128
NUM_SAMPLES = 5000
TRAIN_SPLIT = 0.8
DECAY_AT = (0.5, 0.75)
DECAY_FACTOR = 0.2
LAYCA_IMPLEMENTATION = "eager"
"""Layca's step in every experiment: the eager one, which produced the saved runs. ``"auto"`` takes the compiled step
once the eager steps have taken some seconds of wall time, so on a shared machine a run's rounding, and with it the
outcome of a run that loses classes, would depend on the load."""
SETUP_KEYS = ("epochs", "width", "batch_size", "num_samples", "limit_train_batches")
"""Record fields that must agree for runs to be compared (and for a saved run to count as done)."""


# ---------------------------------------------------------------------------------------------- model and training
def decay_milestones(epochs: int) -> list[int]:
    """The epochs after which the learning rate is multiplied by :data:`DECAY_FACTOR` (50% and 75% of the epochs)."""
    return sorted({max(1, round(f * epochs)) for f in DECAY_AT})


def relative_lr(epoch: int, epochs: int) -> float:
    """The learning rate during ``epoch`` (0-based) relative to the initial one, under the step decay."""
    return DECAY_FACTOR ** sum(epoch >= m for m in decay_milestones(epochs))


class ExperimentCNN(MNIST1DCNN):
    """The 8-layer MNIST-1D CNN (seven convolutions of one width, a linear head) with a step decay of the lr.

    Subclasses choose the optimizer (:meth:`make_optimizer`).

    Args:
        width: Channels of every convolution.
        epochs: Length of training, which places the decays.
    """

    def __init__(self, width: int, epochs: int) -> None:
        super().__init__(channels=(width,) * CONVOLUTIONS)
        self.epochs = epochs

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over ``self.parameters()``."""
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer()
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=decay_milestones(self.epochs), gamma=DECAY_FACTOR
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def make_datamodule(setup: dict[str, Any]) -> MNIST1DDataModule:
    """MNIST-1D as every run sees it: generated once from :data:`DATA_SEED` (a run's seed sets the batch order)."""
    datamodule = MNIST1DDataModule(setup["num_samples"], TRAIN_SPLIT, setup["batch_size"], seed=DATA_SEED)
    datamodule.setup("fit")
    return datamodule


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-Trainer banners and the warnings this setup triggers on purpose (no TensorBoard)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no TensorBoardLogger is attached.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            yield
    finally:
        logger.setLevel(level)


def fit(
    model: L.LightningModule,
    datamodule: MNIST1DDataModule,
    setup: dict[str, Any],
    callbacks: list[L.Callback],
    loggers: list[Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``setup["epochs"]``; return the accuracy and loss fields of a record and the seconds.

    Test accuracy and loss are measured once, on the held-out signals, after the last epoch; training accuracy and
    loss are those Lightning accumulated over the last epoch.
    """
    limit = setup["limit_train_batches"]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=setup["epochs"],
        logger=loggers or False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=setup["epochs"],  # test accuracy once, after the last epoch
        limit_train_batches=1.0 if limit is None else limit,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    metrics = trainer.callback_metrics
    return {
        "test_acc": float(metrics["val/acc"]),
        "test_loss": float(metrics["val/loss"]),
        "train_acc": float(metrics["train/acc"]),
        "train_loss": float(metrics["train/loss_epoch"]),
        "steps_per_epoch": int(trainer.num_training_batches),
        "seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------- saved runs
def load_records(path: Path) -> list[dict[str, Any]]:
    """Read the saved runs; all must share one setup (epochs, width, ...), or the comparison would be meaningless."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    setups = {tuple(r[k] for k in SETUP_KEYS) for r in records}
    if len(setups) > 1:
        raise ValueError(
            f"{path} holds runs of {len(setups)} different setups {sorted(setups, key=str)} (fields {SETUP_KEYS}); "
            "use another --results file or --fresh."
        )
    return records


def check_setup(path: Path, records: Sequence[dict[str, Any]], setup: dict[str, Any]) -> None:
    """Refuse to add runs of ``setup`` to saved runs of another setup."""
    if records and any(records[0][k] != v for k, v in setup.items()):
        raise ValueError(
            f"{path} holds runs of another setup ({ {k: records[0][k] for k in SETUP_KEYS} }) than "
            f"this one ({setup}); use another --results file or --fresh."
        )


def append_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def print_progress(i: int, total: int, label: str, seed: int, record: dict[str, Any]) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
    print(
        f"[{stamp}] {i}/{total} {label}, seed {seed}: test accuracy {100 * record['test_acc']:.1f}%, "
        f"{record['seconds']:.0f} s",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")


def difference(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> str:
    """Difference of mean test accuracy (points) with its standard error, and whether it exceeds twice that error."""
    ma, sa = mean_std([r["test_acc"] for r in a])
    mb, sb = mean_std([r["test_acc"] for r in b])
    diff = 100 * (ma - mb)
    if math.isnan(sa) or math.isnan(sb):
        return f"{diff:+.1f} points (one seed: no error estimate)"
    se = 100 * math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if se == 0:
        return f"{diff:+.2f} points (no spread over seeds)"
    verdict = "distinguishable" if abs(diff) > 2 * se else "not distinguishable"
    return f"{diff:+.2f} ± {se:.2f} points, {diff / se:+.1f} standard errors ({verdict})"


DIFFERENCE_NOTE = (
    "With their standard error sqrt(s1²/n1 + s2²/n2) over seeds (s: sample standard deviation, n: seeds); a "
    "difference within two standard errors is counted as not distinguishable from seed noise."
)


def power_of_three(x: float) -> str:
    """Write ``x`` as ``3^k`` when it is a power of three (``1``, ``3^-2``), else with four significant digits."""
    k = round(math.log(x, 3))
    if math.isclose(x, 3.0**k, rel_tol=1e-9):
        return "1" if k == 0 else f"3^{k}"
    return f"{x:.4g}"


# ---------------------------------------------------------------------------------------------- report and options
def machine_line(records: Sequence[dict[str, Any]]) -> str:
    """``- N runs, M min of training in total on <machine> (...)``: what the runs cost, and where."""
    seconds = sum(r["seconds"] for r in records)
    threads = ", ".join(str(t) for t in sorted({r["threads"] for r in records})) or "no"
    return (
        f"- {len(records)} runs, {seconds / 60:.1f} min of training in total on {platform.machine()} "
        f"({os.cpu_count()} logical CPUs, torch threads: {threads}), torch {torch.__version__}, "
        f"lightning {L.__version__}"
    )


def run_command(script: str, setup: dict[str, Any], quick: bool) -> str:
    """The command that runs this setup (options at their default left out)."""
    defaults = {"epochs": EPOCHS, "width": WIDTH, "batch_size": BATCH_SIZE, "num_samples": NUM_SAMPLES}
    options = ["--quick"] if quick else []
    for key, value in setup.items():
        if value is not None and value != defaults.get(key):
            options.append(f"--{key.replace('_', '-')} {value}")
    return " ".join([f"python -m benchmarks.{script.removesuffix('.py')}", *options])


def add_common_arguments(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The options every MNIST-1D experiment takes: mode, seeds, setup, threads and output paths."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--report-only", action="store_true", help="write the report and figures from saved runs")
    parser.add_argument("--fresh", action="store_true", help="delete the saved runs first")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--width", type=int, default=WIDTH, help="channels of every convolution")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="MNIST-1D signals, train and test")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="batches per epoch (tests)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: the convolutions are small)"
    )
    parser.add_argument("--results", type=Path, default=None, help="JSON lines, one per run")
    parser.add_argument("--table", type=Path, default=None, help="Markdown report")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse non-positive sizes, and fill in the default seeds."""
    for name in ("epochs", "width", "batch_size", "num_samples", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.limit_train_batches is not None and args.limit_train_batches < 1:
        parser.error(f"--limit-train-batches must be a positive integer, got {args.limit_train_batches}")
    args.seeds = args.seeds if args.seeds is not None else list(SEEDS[:1] if args.quick else SEEDS)


def setup_of(args: argparse.Namespace) -> dict[str, Any]:
    """The setup fields of a record, from the command line."""
    return {
        "epochs": args.epochs,
        "width": args.width,
        "batch_size": args.batch_size,
        "num_samples": args.num_samples,
        "limit_train_batches": args.limit_train_batches,
    }


def run_missing(
    args: argparse.Namespace,
    configurations: Sequence[Any],
    config_of: Callable[[dict[str, Any]], Any],
    train_one: Callable[[Any, int, MNIST1DDataModule, dict[str, Any]], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Load the saved runs and, unless ``--report-only``, train every missing (configuration, seed), saving each run
    as soon as it has finished; return all the runs.

    ``configurations`` have a ``label``; ``config_of`` reads a record's configuration back; ``train_one(config, seed,
    datamodule, setup)`` returns a record.
    """
    torch.set_num_threads(args.threads)
    if args.fresh and args.results.exists() and not args.report_only:
        args.results.unlink()
    records = load_records(args.results)
    if args.report_only:
        return records
    setup = setup_of(args)
    check_setup(args.results, records, setup)
    done = {(config_of(r), r["seed"]) for r in records}
    todo = [(c, s) for c in configurations for s in args.seeds if (c, s) not in done]
    print(f"{len(done)} runs saved in {args.results}, {len(todo)} to go", flush=True)
    if todo:
        datamodule = make_datamodule(setup)
        with quiet_lightning():
            for i, (config, seed) in enumerate(todo, start=1):
                record = train_one(config, seed, datamodule, setup)
                append_record(args.results, record)
                records.append(record)
                print_progress(i, len(todo), config.label, seed, record)
    return records
