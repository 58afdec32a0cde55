"""Several rotation callbacks on one Trainer: every tag gets one value per step, whatever the combination."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_layca as ll
from tests.tiny_modules import LAYER_PARAMS, LAYERS, TinyCNN, loader, make_trainer, read_events

STEPS = 16  # two epochs of 8 steps, a logging step every 2


def fit_with(tmp_path: Path, callbacks: list[Any]) -> Any:
    tb = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(tmp_path, logger=tb, callbacks=callbacks, log_every_n_steps=2).fit(TinyCNN(), loader())
    return read_events(Path(tb.log_dir))


def steps_by_tag(events: Any) -> dict[str, list[int]]:
    tags = events.Tags()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in tags["scalars"]}
    steps.update({tag: [e.step for e in events.Histograms(tag)] for tag in tags["histograms"]})
    steps.update({tag: [e.step for e in events.Images(tag)] for tag in tags["images"]})
    return steps


def assert_one_value_per_step(events: Any) -> None:
    repeated = {tag: s for tag, s in steps_by_tag(events).items() if len(s) != len(set(s))}
    assert not repeated, f"tags written twice at one step: {sorted(repeated)}"


def mean_over(history: dict[str, list[tuple[int, float]]], layers: list[str]) -> list[float]:
    """Independent reference: the mean over ``layers`` at every logged step, from the callback's own history."""
    columns = zip(*([v for _, v in history[n]] for n in layers), strict=True)
    return [math.fsum(c) / len(layers) for c in columns]


def test_two_monitors_on_different_layers_write_each_tag_once_per_step(tmp_path: Path) -> None:
    features = ll.LayerRotationMonitor(include=LAYER_PARAMS[:2])
    head = ll.LayerRotationMonitor(include="head.weight")
    events = fit_with(tmp_path, [features, head])
    assert_one_value_per_step(events)
    # Each monitor's summary is the mean of its own layers, under its own label.
    for label, monitor, layers in (
        ("features.0.weight+features.3.weight", features, LAYERS[:2]),
        ("head.weight", head, LAYERS[2:]),
    ):
        logged = events.Scalars(f"Rotation_summary/{label}/mean")
        assert [e.step for e in logged] == list(range(1, STEPS, 2))
        assert [e.value for e in logged] == pytest.approx(mean_over(monitor.history, layers), abs=1e-6)
        assert len(events.Images(f"Rotation_curves/{label}")) == 2
        assert (Path(events.path) / f"layer_rotation_curves_{label.replace('+', '_')}.png").is_file()
    assert "Rotation_summary/mean" not in events.Tags()["scalars"]


def test_layca_callback_and_monitor_together_measure_each_layer_once(tmp_path: Path) -> None:
    layca = ll.LaycaCallback(rotation_rate=0.05)
    monitor = ll.LayerRotationMonitor()
    with pytest.warns(
        UserWarning, match=r"LaycaCallback on the same Trainer measures and logs layers .* measures nothing"
    ):
        events = fit_with(tmp_path, [monitor, layca])  # in either order
    assert_one_value_per_step(events)
    for layer in LAYERS:
        assert [e.step for e in events.Scalars(f"Rotation/{layer}")] == list(range(1, STEPS, 2))
        assert len(events.Histograms(f"Unit_angle/{layer}")) == 2  # one per epoch
    # The one measurement is the LaycaCallback's (the rates beside it), unlabelled as it is the only one.
    assert [e.value for e in events.Scalars("Rotation_summary/mean")] == pytest.approx(
        mean_over(layca.history, LAYERS), abs=1e-6
    )
    assert [e.value for e in events.Scalars("Rotation_rate_summary/mean")] == pytest.approx([0.05] * 8, rel=1e-6)
    assert monitor.history == {} and monitor.measure() == {}


def test_a_monitor_beside_a_layca_callback_on_some_layers_measures_the_others(tmp_path: Path) -> None:
    layca = ll.LaycaCallback(rotation_rate=0.05, include=LAYER_PARAMS[:2])
    monitor = ll.LayerRotationMonitor()
    with pytest.warns(UserWarning, match=r"leaves them out.* measures the others"):
        events = fit_with(tmp_path, [layca, monitor])
    assert_one_value_per_step(events)
    assert sorted(layca.history) == LAYERS[:2] and sorted(monitor.history) == ["head"]
    for label, callback, layers in (
        ("features.0.weight+features.3.weight", layca, LAYERS[:2]),
        ("LayerRotationMonitor", monitor, ["head"]),
    ):
        logged = [e.value for e in events.Scalars(f"Rotation_summary/{label}/mean")]
        assert logged == pytest.approx(mean_over(callback.history, layers), abs=1e-6)


def test_two_plain_monitors_share_overlapping_layers_first_come_first_measured(tmp_path: Path) -> None:
    head = ll.LayerRotationMonitor(include="head.weight", figure=False)
    rest = ll.LayerRotationMonitor(exclude="features.0.weight", figure=False)
    with pytest.warns(UserWarning, match=r"layers \['head'\]; this monitor leaves them out"):
        events = fit_with(tmp_path, [head, rest])
    assert_one_value_per_step(events)
    assert sorted(head.history) == ["head"] and sorted(rest.history) == ["features.3"]
    assert {"Rotation_summary/head.weight/mean", "Rotation_summary/LayerRotationMonitor-features.0.weight/mean"} <= set(
        events.Tags()["scalars"]
    )
