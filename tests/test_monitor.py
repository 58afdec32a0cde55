"""Specification of LayerRotationMonitor: what it measures, when, and what reaches each logger."""

from __future__ import annotations

import csv
import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

import lightning_layca as ll
from lightning_layca.callbacks.monitor import FIGURE_FILENAME
from lightning_layca.callbacks.output import LAYERS_PER_CHART, layout
from lightning_layca.callbacks.strategies import check_strategy
from lightning_layca.tags import STEP_ROTATION
from tests.tiny_modules import (
    LAYERS,
    UNITS,
    TinyCNN,
    cosine_distance_fp64,
    layer_weights,
    loader,
    make_trainer,
    read_events,
)

STEPS_PER_EPOCH = 8  # 32 samples, batches of 4


def read_csv(log_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two epochs of SGD, TensorBoard + CSV loggers, Lightning's own logging interval of 2 steps."""
    root = tmp_path_factory.mktemp("tb_run")
    model = TinyCNN()
    initial = layer_weights(TinyCNN())
    monitor = ll.LayerRotationMonitor()
    tb, csv_logger = TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")
    trainer = make_trainer(root, logger=[tb, csv_logger], callbacks=[monitor], log_every_n_steps=2)
    trainer.fit(model, loader())
    return SimpleNamespace(
        model=model,
        initial=initial,
        final=layer_weights(model),
        monitor=monitor,
        events=read_events(Path(tb.log_dir)),
        tb_dir=Path(tb.log_dir),
        csv_rows=read_csv(csv_logger.log_dir),
    )


def test_rotation_scalars_equal_independent_cosine_distance_of_final_weights(tb_run: SimpleNamespace) -> None:
    for layer in LAYERS:
        events = tb_run.events.Scalars(f"Rotation/{layer}")
        assert [e.step for e in events] == list(range(1, 2 * STEPS_PER_EPOCH, 2))
        expected = cosine_distance_fp64(tb_run.final[layer], tb_run.initial[layer])
        assert expected > 1e-3  # the layers did move
        assert events[-1].value == pytest.approx(expected, abs=1e-5)
        assert tb_run.monitor.last_rotation[layer] == pytest.approx(expected, abs=1e-5)


def test_rotation_scalars_share_the_step_axis_of_self_log(tb_run: SimpleNamespace) -> None:
    loss_steps = [e.step for e in tb_run.events.Scalars("train_loss")]
    for layer in LAYERS:
        assert [e.step for e in tb_run.events.Scalars(f"Rotation/{layer}")] == loss_steps


def test_summary_scalars_are_mean_min_and_max_over_layers(tb_run: SimpleNamespace) -> None:
    per_layer = [[e.value for e in tb_run.events.Scalars(f"Rotation/{layer}")] for layer in LAYERS]
    columns = list(zip(*per_layer, strict=True))
    for stat, reduce in (("mean", lambda v: sum(v) / len(v)), ("min", min), ("max", max)):
        values = [e.value for e in tb_run.events.Scalars(f"Rotation_summary/{stat}")]
        assert values == pytest.approx([reduce(c) for c in columns], abs=1e-6)


def test_history_attribute_holds_every_logged_value(tb_run: SimpleNamespace) -> None:
    for layer in LAYERS:
        logged = [(e.step, e.value) for e in tb_run.events.Scalars(f"Rotation/{layer}")]
        history = tb_run.monitor.history[layer]
        assert [s for s, _ in history] == [s for s, _ in logged]
        assert [v for _, v in history] == pytest.approx([v for _, v in logged], abs=1e-7)


def test_csv_logger_receives_the_same_rotation_scalars(tb_run: SimpleNamespace) -> None:
    rows = [r for r in tb_run.csv_rows if r.get("Rotation/head")]
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * STEPS_PER_EPOCH, 2))
    for layer in LAYERS:
        tb_values = [e.value for e in tb_run.events.Scalars(f"Rotation/{layer}")]
        assert [float(r[f"Rotation/{layer}"]) for r in rows] == pytest.approx(tb_values, abs=1e-6)


def test_angle_histograms_have_one_count_per_output_unit_every_epoch(tb_run: SimpleNamespace) -> None:
    for layer in LAYERS:
        events = tb_run.events.Histograms(f"Unit_angle/{layer}")
        assert [e.step for e in events] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
        last = events[-1].histogram_value
        assert sum(last.bucket) == UNITS[layer]
        w = tb_run.final[layer].reshape(UNITS[layer], -1).double()
        w0 = tb_run.initial[layer].reshape(UNITS[layer], -1).double()
        cos = (w * w0).sum(1) / (w.norm(dim=1) * w0.norm(dim=1))
        angles = torch.rad2deg(torch.acos(cos))
        assert last.min == pytest.approx(float(angles.min()), abs=1e-3)
        assert last.max == pytest.approx(float(angles.max()), abs=1e-3)
        assert last.sum == pytest.approx(float(angles.sum()), abs=1e-3 * UNITS[layer])


def test_rotation_curves_figure_goes_to_tensorboard_and_to_a_png(tb_run: SimpleNamespace) -> None:
    images = tb_run.events.Images("Rotation_curves")
    assert [e.step for e in images] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert images[-1].width > 100 and images[-1].height > 100
    png = tb_run.tb_dir / FIGURE_FILENAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_epoch_rotation_starts_at_zero_and_ends_at_the_final_distance(tb_run: SimpleNamespace) -> None:
    for layer in LAYERS:
        points = tb_run.monitor.epoch_rotation[layer]
        assert [e for e, _ in points] == [0, 1, 2]
        assert points[0][1] == 0.0
        expected = cosine_distance_fp64(tb_run.final[layer], tb_run.initial[layer])
        assert points[-1][1] == pytest.approx(expected, abs=1e-5)


def matching(regexes: list[str], tag_names: list[str]) -> list[str]:
    """The tags a custom-scalars multiline chart shows: those any of its regexes finds (as TensorBoard's backend)."""
    return [tag for tag in tag_names if any(re.search(regex, tag) for regex in regexes)]


def test_custom_scalars_layout_charts_every_written_rotation_tag_and_the_summaries_as_bands(
    tb_run: SimpleNamespace,
) -> None:
    from tensorboard.plugins.custom_scalar import layout_pb2

    (event,) = tb_run.events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    written = tb_run.events.Tags()["scalars"]
    charts = [chart for category in layout.category for chart in category.chart]
    curves = [matching(list(chart.multiline.tag), written) for chart in charts if chart.HasField("multiline")]
    assert curves == [[f"Rotation/{layer}" for layer in LAYERS]]
    # As TensorBoard shows a category: its multiline charts in order, then its margin charts last first.
    shown = [
        chart
        for category in layout.category
        for chart in [c for c in category.chart if c.HasField("multiline")]
        + [c for c in category.chart if c.HasField("margin")][::-1]
    ]
    bands = [chart.margin.series[0] for chart in shown if chart.HasField("margin")]
    quantities = ["Rotation", "Step_rotation", "Update_ratio", "Update_ratio_tangential", "Update_ratio_radial"]
    quantities.append("Weight_norm")
    assert [(b.value, b.lower, b.upper) for b in bands] == [
        (f"{q}_summary/mean", f"{q}_summary/min", f"{q}_summary/max") for q in quantities
    ]
    assert {tag for band in bands for tag in (band.value, band.lower, band.upper)} <= set(written)


def test_custom_scalars_charts_hold_a_few_neighbouring_layers_each() -> None:
    layers = [f"net.{i}" for i in range(14)]
    categories = layout(layers, [STEP_ROTATION], per_layer=True)
    for quantity in ("Rotation", "Step_rotation"):
        (category,) = [charts for title, charts in categories.items() if title.startswith(quantity)]
        multiline = [tags for kind, tags in category.values() if kind == "Multiline"]
        all_tags = [f"{quantity}/{name}" for name in layers] + [f"{quantity}/net.1x", "Other/net.1"]
        assert [matching(regexes, all_tags) for regexes in multiline] == [
            [f"{quantity}/net.{i}" for i in chunk] for chunk in (range(0, 6), range(6, 12), range(12, 14))
        ]
    assert LAYERS_PER_CHART == 6


def test_without_tensorboard_it_warns_once_and_logs_scalars_to_the_csv_logger(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=4)
    csv_logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, logger=csv_logger, callbacks=[monitor], max_epochs=1)
    model = TinyCNN()
    with pytest.warns(UserWarning, match="no TensorBoardLogger is attached") as record:
        trainer.fit(model, loader())
    assert sum("TensorBoardLogger" in str(w.message) for w in record) == 1
    rows = [r for r in read_csv(csv_logger.log_dir) if r.get("Rotation/head")]
    assert [int(r["step"]) for r in rows] == [3, 7]
    expected = cosine_distance_fp64(layer_weights(model)["head"], layer_weights(TinyCNN())["head"])
    assert float(rows[-1]["Rotation/head"]) == pytest.approx(expected, abs=1e-5)
    assert (Path(csv_logger.log_dir) / FIGURE_FILENAME).is_file()


def test_without_any_logger_it_still_measures_and_writes_the_png_in_the_root_dir(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=1, angle_histograms=False)
    model = TinyCNN()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path, logger=False, callbacks=[monitor], max_epochs=1).fit(model, loader())
    assert not [w for w in record if "TensorBoardLogger" in str(w.message)], "no logger was asked for: no warning"
    assert [s for s, _ in monitor.history["features.0"]] == list(range(STEPS_PER_EPOCH))
    final, initial = layer_weights(model), layer_weights(TinyCNN())
    assert monitor.measure() == pytest.approx(
        {layer: cosine_distance_fp64(final[layer], initial[layer]) for layer in LAYERS}, abs=1e-5
    )
    assert (tmp_path / FIGURE_FILENAME).is_file()


def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=1, figure=False)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor], max_epochs=1, accumulate_grad_batches=2)
    model = TinyCNN()
    trainer.fit(model, loader())
    assert trainer.global_step == STEPS_PER_EPOCH // 2
    assert [s for s, _ in monitor.history["head"]] == [0, 1, 2, 3]
    expected = cosine_distance_fp64(layer_weights(model)["head"], layer_weights(TinyCNN())["head"])
    assert monitor.last_rotation["head"] == pytest.approx(expected, abs=1e-5)


def test_include_and_exclude_select_the_monitored_layers(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(exclude="head.*", figure=False)
    make_trainer(tmp_path, logger=False, callbacks=[monitor], max_epochs=1, limit_train_batches=2).fit(
        TinyCNN(), loader()
    )
    assert monitor.layer_names == ["features.0.weight", "features.3.weight"]
    assert set(monitor.last_rotation) == {"features.0", "features.3"}


def test_validation_and_test_loops_do_not_measure(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=1, figure=False)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor], max_epochs=1, limit_train_batches=3)
    model = TinyCNN()
    trainer.fit(model, loader(), loader(n=8))
    history = {k: list(v) for k, v in monitor.history.items()}
    trainer.validate(model, loader(n=8), verbose=False)
    trainer.test(model, loader(n=8), verbose=False)
    assert monitor.history == history
    assert len(history["head"]) == 3


def test_measure_before_any_fit_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"before the first `Trainer\.fit`"):
        ll.LayerRotationMonitor().measure()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_every_n_steps": 0}, "`log_every_n_steps` must be a positive integer or None, got 0"),
        ({"every_n_epochs": 1.5}, "`every_n_epochs` must be a positive integer, got 1.5"),
        ({"histogram_bins": -1}, "`histogram_bins` must be a positive integer, got -1"),
        ({"include": [3]}, r"`include` must be a string or a list of strings, got \[3\]"),
        ({"exclude": 3}, r"LayerRotationMonitor: `exclude` must be a string or a list of strings, got 3"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ll.LayerRotationMonitor(**kwargs)


def test_a_pattern_that_matches_nothing_fails_when_the_fit_starts(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(include="decoder.*")
    with pytest.raises(ValueError, match=r"'decoder\.\*' matches no parameter"):
        make_trainer(tmp_path, logger=False, callbacks=[monitor]).fit(TinyCNN(), loader())


@pytest.mark.parametrize(
    "strategy",
    [FSDPStrategy(), object.__new__(DeepSpeedStrategy)],
    ids=["FSDPStrategy", "DeepSpeedStrategy"],
)
def test_sharded_strategies_are_refused_in_setup(strategy: Any) -> None:
    name = type(strategy).__name__
    with pytest.raises(MisconfigurationException, match=f"LayerRotationMonitor does not support the `{name}`"):
        ll.LayerRotationMonitor().setup(SimpleNamespace(strategy=strategy), TinyCNN(), "fit")  # type: ignore[arg-type]


def test_single_device_and_ddp_strategies_are_accepted() -> None:
    check_strategy(SingleDeviceStrategy("cpu"), "LayerRotationMonitor")
    check_strategy(DDPStrategy(), "LayerRotationMonitor")


def test_state_dict_keeps_the_initial_weights_on_cpu(tb_run: SimpleNamespace) -> None:
    state = tb_run.monitor.state_dict()
    assert state["layer_names"] == ["features.0.weight", "features.3.weight", "head.weight"]
    for layer, snapshot in zip(LAYERS, state["initial"], strict=True):
        assert snapshot.device.type == "cpu"
        assert torch.equal(snapshot, tb_run.initial[layer])


class PutInfIntoHead(L.Callback):
    """At the end of the given (epoch, batch), before the monitor measures, writes an inf into the head's weights."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if (trainer.current_epoch, args[-1]) == self.at:
            with torch.no_grad():
                pl_module.head.weight[0, 0] = float("inf")


def test_non_finite_weights_are_logged_as_nan_and_skipped_in_histograms_with_one_warning_per_layer(
    tmp_path: Path,
) -> None:
    # An inf in the head at the last batch of epoch 0; in epoch 1 the NaN loss spreads NaN into every layer.
    monitor = ll.LayerRotationMonitor(log_every_n_steps=4)
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, logger=tb, callbacks=[PutInfIntoHead(0, STEPS_PER_EPOCH - 1), monitor])
    with pytest.warns(UserWarning) as record:
        trainer.fit(TinyCNN(), loader())
    assert trainer.current_epoch == 2  # the fit completed

    skipped = [str(w.message) for w in record if "non-finite" in str(w.message)]
    assert len(skipped) == 3  # once per layer, though the layers stay non-finite
    assert "'head'" in skipped[0] and {"'features.0'", "'features.3'"} == {s.split()[2] for s in skipped[1:]}

    events = read_events(Path(tb.log_dir))
    head = [(e.step, e.value) for e in events.Scalars("Rotation/head")]
    assert [s for s, _ in head] == [3, 7, 11, 15]
    assert head[0][1] > 0 and all(math.isnan(v) for _, v in head[1:])
    assert [math.isnan(v) for _, v in monitor.history["features.0"]] == [False, False, True, True]
    summary = [e.value for e in events.Scalars("Rotation_summary/mean")]
    assert len(summary) == 2  # the mean of finite layers, while there are any
    # Epoch 0: the head's histogram is skipped, the features' are written; epoch 1: every layer is skipped.
    assert "Unit_angle/head" not in events.Tags()["histograms"]
    assert [e.step for e in events.Histograms("Unit_angle/features.0")] == [STEPS_PER_EPOCH]
    assert math.isnan(monitor.epoch_rotation["head"][-1][1])
    assert len(events.Images("Rotation_curves")) == 2  # the figure is still drawn
