"""Mistakes the callbacks can see only with the model are reported in `setup`, before anything is logged."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_layca as ll
from tests.tiny_modules import TinyCNN, loader, make_trainer, read_events


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
    # Lightning opens the writer just before the callbacks' `setup`: its folder exists, but holds nothing.
    assert [p.name for p in Path(logger.log_dir).iterdir() if not p.name.startswith("events.out.tfevents")] == []
    tags = read_events(Path(logger.log_dir)).Tags()
    assert not any(tags[kind] for kind in ("scalars", "tensors", "histograms", "images")), tags


def test_a_pattern_that_matches_only_a_frozen_parameter_is_accepted_in_setup(tmp_path: Path) -> None:
    model = TinyCNN()
    model.head.requires_grad_(False)
    monitor = ll.LayerRotationMonitor(include=["features.*.weight", "head.weight"], angle_histograms=False)
    trainer = make_trainer(tmp_path, logger=False, max_epochs=1, callbacks=[monitor], limit_train_batches=2)
    monitor.setup(trainer, model, "fit")  # the frozen head may be trained later: not a mistake
    with pytest.raises(ValueError, match=r"`include` pattern 'tail\*' matches no parameter"):
        ll.LayerRotationMonitor(include="tail*").setup(trainer, model, "fit")
