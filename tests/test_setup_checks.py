"""Mistakes the callbacks can see only with the model are reported in `setup`, before anything is logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_layca as ll
from tests.tiny_modules import TinyCNN, TwoOptimizerCNN, loader, make_trainer, read_events


def assert_nothing_logged(logger: TensorBoardLogger) -> None:
    # Lightning opens the writer just before the callbacks' `setup`: its folder exists, but holds nothing.
    assert [p.name for p in Path(logger.log_dir).iterdir() if not p.name.startswith("events.out.tfevents")] == []
    tags = read_events(Path(logger.log_dir)).Tags()
    assert not any(tags[kind] for kind in ("scalars", "tensors", "histograms", "images")), tags


@pytest.mark.parametrize("callback_class", [ll.LayerRotationMonitor, ll.LaycaCallback])
@pytest.mark.parametrize(("argument", "pattern"), [("include", "head.weightt"), ("exclude", "neck.*")])
def test_a_pattern_that_matches_no_parameter_stops_the_fit_before_anything_is_logged(
    callback_class: type[ll.LayerRotationMonitor], argument: str, pattern: str, tmp_path: Path
) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[callback_class(**{argument: pattern})])
    with pytest.raises(ValueError, match=rf"`{argument}` pattern '{pattern}' matches no parameter\. Available names: "):
        trainer.fit(TinyCNN(), loader())
    assert trainer.global_step == 0
    assert_nothing_logged(logger)


TYPO = {"neck.*": 0.5}
SCHEDULES_WITH_A_TYPO = {
    "ByName": lambda: ll.ByName(TYPO),
    "EpochSwitch": lambda: ll.EpochSwitch([ll.Uniform(), ll.ByName(TYPO)], milestones=[1]),
    "LayerWarmup": lambda: ll.LayerWarmup(2, ll.EpochSwitch([ll.ByName(TYPO)], milestones=[])),
}


@pytest.mark.parametrize("schedule", SCHEDULES_WITH_A_TYPO.values(), ids=SCHEDULES_WITH_A_TYPO.keys())
def test_a_schedule_pattern_that_matches_no_layer_stops_the_fit_before_anything_is_logged(
    schedule: Any, tmp_path: Path
) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    callback = ll.LaycaCallback(schedule=schedule())
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[callback])
    model = TinyCNN()
    names = r"features\.0\.weight, features\.3\.weight, head\.weight\.$"
    message = r"ByName: pattern 'neck\.\*' matches no layer\. Available names: " + names
    with pytest.raises(ValueError, match=message):
        callback.setup(trainer, model, "fit")  # where `include` is checked
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, loader())
    assert trainer.global_step == 0
    assert_nothing_logged(logger)


def test_an_optimizer_index_that_automatic_optimization_cannot_have_stops_the_fit_before_anything_is_logged(
    tmp_path: Path,
) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[ll.LaycaCallback(optimizers=[0, 5])])
    with pytest.raises(
        MisconfigurationException, match=r"`optimizers=\[0, 5\]` names optimizer\(s\) \[5\], but TinyCNN "
    ):
        trainer.fit(TinyCNN(), loader())
    assert trainer.global_step == 0
    assert_nothing_logged(logger)


def test_an_optimizer_index_is_not_refused_in_setup_under_manual_optimization(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, logger=False, callbacks=[])
    ll.LaycaCallback(optimizers=1).setup(trainer, TwoOptimizerCNN(), "fit")  # how many it returns is not known yet


def test_a_pattern_that_matches_only_a_frozen_parameter_is_accepted_in_setup(tmp_path: Path) -> None:
    model = TinyCNN()
    model.head.requires_grad_(False)
    monitor = ll.LayerRotationMonitor(include=["features.*.weight", "head.weight"], angle_histograms=False)
    trainer = make_trainer(tmp_path, logger=False, max_epochs=1, callbacks=[monitor], limit_train_batches=2)
    monitor.setup(trainer, model, "fit")  # the frozen head may be trained later: not a mistake
    with pytest.raises(ValueError, match=r"`include` pattern 'tail\*' matches no parameter"):
        ll.LayerRotationMonitor(include="tail*").setup(trainer, model, "fit")
