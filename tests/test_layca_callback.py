"""Specification of LaycaCallback: Lightning steps the Layca wrapper with every Trainer feature it combines with."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision

import lightning_layca as ll
from tests.tiny_modules import (
    LAYER_PARAMS,
    LAYERS,
    TinyCNN,
    TwoOptimizerCNN,
    cosine_distance_fp64,
    layer_weights,
    loader,
    make_trainer,
    read_events,
)

RHO = 0.05
ONE_STEP = 1.0 - 1.0 / math.sqrt(1.0 + RHO**2)  # cosine distance after one step: the angle is atan(rho)


class WeightSpy(L.Callback):
    """Records, for every training batch, whether the layers moved and how many Layca steps ran."""

    def __init__(self, callback: ll.LaycaCallback) -> None:
        self.callback = callback
        self.moved: list[bool] = []
        self.layca_steps: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.before = layer_weights(pl_module)
        self.step_count = self.callback.laycas[0].step_count

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        after = layer_weights(pl_module)
        self.moved.append(not all(torch.equal(after[k], self.before[k]) for k in after))
        self.layca_steps.append(self.callback.laycas[0].step_count - self.step_count)


def norms(module: torch.nn.Module) -> list[float]:
    return [float(w.double().norm()) for w in layer_weights(module).values()]


def test_wraps_the_optimizer_keeps_the_scheduler_and_logs_rates(tmp_path: Path) -> None:
    callback = ll.LaycaCallback(
        rotation_rate=RHO, log_every_n_steps=1, figure=False, angle_histograms=False, per_layer_detail=True
    )
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, logger=tb, callbacks=[callback, LearningRateMonitor()], max_epochs=2)
    model = TinyCNN(scheduler=True)
    trainer.fit(model, loader())

    (layca,) = trainer.optimizers
    assert isinstance(layca, ll.Layca) and isinstance(layca.optimizer, torch.optim.SGD)
    assert layca.layer_names == LAYER_PARAMS and callback.laycas == {0: layca}
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer.param_groups is layca.param_groups  # StepLR drives the wrapper's learning rate
    assert layca.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)

    events = read_events(Path(tb.log_dir))
    scalars = events.Tags()["scalars"]
    assert [t for t in scalars if t.startswith("lr-")] == ["lr-SGD"]  # the learning rate is logged once
    # Lightning stepped the wrapper: after the first step every layer turned by exactly atan(rho).
    for layer in LAYERS:
        first = events.Scalars(f"Rotation/{layer}")[0]
        assert (first.step, first.value) == (0, pytest.approx(ONE_STEP, abs=1e-6))
    # The rate follows the relative learning rate: rho in epoch 0, rho / 2 in epoch 1, on every logging step.
    for layer in LAYERS:
        rates = [(e.step, e.value) for e in events.Scalars(f"Rotation_rate/{layer}")]
        assert rates == [(step, pytest.approx(RHO if step < 8 else RHO / 2, rel=1e-6)) for step in range(16)]
    assert callback.last_rates == pytest.approx(dict.fromkeys(LAYERS, RHO / 2))
    assert norms(model) == pytest.approx(norms(TinyCNN()), rel=1e-5)


def test_manual_optimization_wraps_only_the_selected_optimizer(tmp_path: Path) -> None:
    callback = ll.LaycaCallback(rotation_rate=RHO, optimizers=0, log_every_n_steps=1, figure=False)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[callback], max_epochs=1, limit_train_batches=3)
    trainer.fit(TwoOptimizerCNN(), loader())
    features_opt, head_opt = trainer.optimizers
    assert isinstance(features_opt, ll.Layca) and isinstance(head_opt, torch.optim.Adam)
    assert features_opt.layer_names == ["features.0.weight", "features.3.weight"]
    assert features_opt.step_count == 3
    first = {layer: points[0][1] for layer, points in callback.history.items()}
    assert first["features.0"] == pytest.approx(ONE_STEP, abs=1e-6)
    assert first["features.3"] == pytest.approx(ONE_STEP, abs=1e-6)
    assert first["head"] != pytest.approx(ONE_STEP, abs=1e-6)  # Adam alone


def test_manual_optimization_wraps_every_optimizer_by_default(tmp_path: Path) -> None:
    callback = ll.LaycaCallback(rotation_rate=RHO, figure=False)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[callback], max_epochs=1, limit_train_batches=2)
    trainer.fit(TwoOptimizerCNN(), loader())
    assert [type(o.optimizer) for o in trainer.optimizers] == [torch.optim.SGD, torch.optim.Adam]
    assert [o.layer_names for o in trainer.optimizers] == [LAYER_PARAMS[:2], LAYER_PARAMS[2:]]


def test_gradient_accumulation_and_clipping_step_the_wrapper_once_per_accumulated_batch(tmp_path: Path) -> None:
    callback = ll.LaycaCallback(rotation_rate=RHO, figure=False)
    spy = WeightSpy(callback)
    trainer = make_trainer(
        tmp_path,
        logger=False,
        callbacks=[callback, spy],
        max_epochs=1,
        accumulate_grad_batches=2,
        gradient_clip_val=1e-3,
    )
    model = TinyCNN()
    trainer.fit(model, loader())
    assert spy.layca_steps == [0, 1] * 4 and spy.moved == [False, True] * 4
    assert norms(model) == pytest.approx(norms(TinyCNN()), rel=1e-5)


def test_float16_gradscaler_skipped_step_leaves_the_weights_unchanged(tmp_path: Path) -> None:
    # Trainer(precision="16-mixed") on CPU falls back to bf16; the plugin gives real float16 autocast + GradScaler.
    callback = ll.LaycaCallback(rotation_rate=RHO, log_every_n_steps=1, figure=False)
    spy = WeightSpy(callback)
    trainer = make_trainer(
        tmp_path,
        logger=False,
        callbacks=[callback, spy],
        max_epochs=1,
        limit_train_batches=4,
        plugins=[MixedPrecision("16-mixed", "cpu")],
    )
    trainer.fit(TinyCNN(inf_loss_batches=[1]), loader())
    assert isinstance(trainer.precision_plugin.scaler, torch.amp.GradScaler)
    assert spy.moved == [True, False, True, True]
    assert spy.layca_steps == [1, 0, 1, 1]
    history = callback.history["head"]
    assert history[0][1] == pytest.approx(ONE_STEP, abs=1e-6)
    assert history[1][1] == history[0][1]  # the skipped step changed nothing


def test_bfloat16_mixed_precision_trains_with_layca(tmp_path: Path) -> None:
    callback = ll.LaycaCallback(rotation_rate=RHO, log_every_n_steps=1, figure=False)
    trainer = make_trainer(
        tmp_path, logger=False, callbacks=[callback], max_epochs=1, limit_train_batches=3, precision="bf16-mixed"
    )
    model = TinyCNN()
    trainer.fit(model, loader())
    assert callback.laycas[0].step_count == 3
    assert callback.history["head"][0][1] == pytest.approx(ONE_STEP, abs=1e-6)
    assert norms(model) == pytest.approx(norms(TinyCNN()), rel=1e-5)


def rotation_rows(log_dir: str) -> dict[int, dict[str, float]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return {
            int(r["step"]): {k: float(v) for k, v in r.items() if k.startswith("Rotation/") and v}
            for r in csv.DictReader(f)
            if r.get("Rotation/head")
        }


# "compiled": the kernel takes SGD's step; its state (the momentum buffers) goes through the checkpoint as SGD's.
@pytest.mark.parametrize("implementation", ["auto", "compiled"])
def test_resuming_from_a_checkpoint_is_bit_identical_to_training_straight(tmp_path: Path, implementation: str) -> None:
    def run(root: Path, max_epochs: int, ckpt_path: str | None = None) -> tuple[Any, ...]:
        callback = ll.LaycaCallback(
            rotation_rate=RHO,
            log_every_n_steps=3,
            figure=False,
            angle_histograms=False,
            implementation=implementation,  # type: ignore[arg-type]
        )
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
        csv_logger = CSVLogger(root, name="csv")
        trainer = make_trainer(
            root, logger=csv_logger, callbacks=[callback, checkpoint], max_epochs=max_epochs, enable_checkpointing=True
        )
        model = TinyCNN(scheduler=True)
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return model, callback, rotation_rows(csv_logger.log_dir)

    straight_model, straight, straight_rows = run(tmp_path / "straight", 4)
    run(tmp_path / "first", 2)
    resumed_model, resumed, resumed_rows = run(tmp_path / "resumed", 4, str(tmp_path / "first" / "ckpt" / "last.ckpt"))

    for (name, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.history == straight.history
    assert resumed.epoch_rotation == straight.epoch_rotation
    assert resumed_rows and all(straight_rows[step] == row for step, row in resumed_rows.items())
    assert min(resumed_rows) > 8  # the resumed run logged only its own epochs
    assert resumed.laycas[0].step_count == straight.laycas[0].step_count == 32
    # Measured from the true initialisation, not from the checkpoint's weights.
    final, initial = layer_weights(resumed_model), layer_weights(TinyCNN())
    assert resumed.measure() == pytest.approx(
        {layer: cosine_distance_fp64(final[layer], initial[layer]) for layer in LAYERS}, abs=1e-5
    )


def test_fit_twice_keeps_the_first_snapshot_and_wraps_once(tmp_path: Path) -> None:
    callback = ll.LaycaCallback(rotation_rate=RHO, log_every_n_steps=1, figure=False)
    model = TinyCNN()
    initial = layer_weights(model)
    make_trainer(tmp_path, logger=False, callbacks=[callback], max_epochs=1, limit_train_batches=2).fit(model, loader())
    second = make_trainer(tmp_path, logger=False, callbacks=[callback], max_epochs=1, limit_train_batches=2)
    second.fit(model, loader())
    (layca,) = second.optimizers
    assert isinstance(layca, ll.Layca) and not isinstance(layca.optimizer, ll.Layca)
    assert layca.step_count == 4  # the step count carries over to the new wrapper
    final = layer_weights(model)
    assert callback.measure() == pytest.approx(
        {layer: cosine_distance_fp64(final[layer], initial[layer]) for layer in LAYERS}, abs=1e-5
    )
    assert callback.last_rotation["head"] > 3 * ONE_STEP


def test_an_optimizer_already_wrapped_by_the_user_is_not_wrapped_again(tmp_path: Path) -> None:
    class AlreadyWrapped(TinyCNN):
        def configure_optimizers(self) -> Any:
            return ll.Layca(torch.optim.SGD(self.parameters(), lr=0.1), self.named_parameters(), rotation_rate=0.01)

    callback = ll.LaycaCallback(rotation_rate=RHO, figure=False)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[callback], max_epochs=1, limit_train_batches=1)
    already = r"optimizer 0 is already a Layca \(rotation_rate=0\.01, .*rotation_rate=0\.05 and"
    with pytest.warns(UserWarning, match=already):
        trainer.fit(AlreadyWrapped(), loader())
    (layca,) = trainer.optimizers
    assert callback.laycas == {0: layca} and layca.rotation_rate == 0.01
    assert isinstance(layca.optimizer, torch.optim.SGD)


def test_validation_and_test_loops_run_with_the_wrapper(tmp_path: Path) -> None:
    callback = ll.LaycaCallback(rotation_rate=RHO, figure=False)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[callback], max_epochs=1, limit_train_batches=2)
    model = TinyCNN()
    trainer.fit(model, loader(), loader(n=8))
    weights = layer_weights(model)
    (validated,) = trainer.validate(model, loader(n=8), verbose=False)
    (tested,) = trainer.test(model, loader(n=8), verbose=False)
    assert math.isfinite(validated["val_loss"]) and math.isfinite(tested["test_loss"])
    assert all(torch.equal(weights[k], v) for k, v in layer_weights(model).items())


def test_an_optimizer_index_out_of_range_fails_when_the_fit_starts(tmp_path: Path) -> None:
    # Under manual optimization, how many optimizers the module has is known once `configure_optimizers` has run.
    callback = ll.LaycaCallback(optimizers=[0, 2])
    with pytest.raises(MisconfigurationException, match=r"names optimizer\(s\) \[2\], but `configure_optimizers` "):
        make_trainer(tmp_path, logger=False, callbacks=[callback]).fit(TwoOptimizerCNN(), loader())


class NoOptimizerCNN(TinyCNN):
    def configure_optimizers(self) -> None:
        return None


def test_configure_optimizers_returning_none_is_refused_saying_that_there_is_no_optimizer_to_wrap(
    tmp_path: Path,
) -> None:
    trainer = make_trainer(tmp_path, logger=False, callbacks=[ll.LaycaCallback()])
    with (
        pytest.warns(UserWarning, match=r"configure_optimizers` returned `None`"),
        pytest.raises(
            MisconfigurationException,
            match=r"^LaycaCallback: `NoOptimizerCNN.configure_optimizers` returned None: there is no optimizer to "
            r"wrap\. LaycaCallback needs it to return one",
        ),
    ):
        trainer.fit(NoOptimizerCNN(), loader())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rotation_rate": 0.0}, r"`rotation_rate` must be a number in \(0, 1000\].*got 0.0"),
        ({"rotation_rate": float("nan")}, r"`rotation_rate` must be a number in \(0, 1000\].*got nan"),
        ({"optimizers": [-1]}, r"`optimizers` must be None .*got \[-1\]"),
        ({"optimizers": []}, r"`optimizers` must be None .*got \[\]"),
        ({"log_every_n_steps": -2}, "`log_every_n_steps` must be a positive integer or None, got -2"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ll.LaycaCallback(**kwargs)


def test_a_schedule_of_the_wrong_type_is_refused_as_by_the_optimizer() -> None:
    # One check for every owner: the same exception type and words from LaycaCallback, Layca and the schedules.
    for make in (
        lambda: ll.LaycaCallback(schedule=0.5),  # type: ignore[arg-type]
        lambda: ll.LayerWarmup(3, schedule=0.5),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=r"`schedule` must be a RotationSchedule instance, got 0.5"):
            make()


class PerStepDecay(TinyCNN):
    """SGD whose learning rate is divided by (1 + step / 4) after every optimizer step."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + step / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def test_rates_are_logged_on_the_rotation_logging_steps_as_the_rate_of_the_step_logged_there(tmp_path: Path) -> None:
    callback = ll.LaycaCallback(
        rotation_rate=RHO, log_every_n_steps=3, figure=False, angle_histograms=False, per_layer_detail=True
    )
    tb = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(tmp_path, logger=tb, callbacks=[callback], max_epochs=2).fit(PerStepDecay(), loader())
    events = read_events(Path(tb.log_dir))
    for layer in LAYERS:
        rotation_steps = [e.step for e in events.Scalars(f"Rotation/{layer}")]
        assert rotation_steps == [2, 5, 8, 11, 14]
        rates = [(e.step, e.value) for e in events.Scalars(f"Rotation_rate/{layer}")]
        # Optimizer step s (counted from 0) runs after s scheduler steps: its rate is rho / (1 + s / 4).
        assert rates == [(s, pytest.approx(RHO / (1 + s / 4), rel=1e-6)) for s in rotation_steps]
    assert callback.last_rates == pytest.approx(dict.fromkeys(LAYERS, RHO / (1 + 14 / 4)), rel=1e-6)


def test_rates_under_a_step_decay_are_step_functions_at_the_rotation_resolution(tmp_path: Path) -> None:
    callback = ll.LaycaCallback(
        rotation_rate=RHO, log_every_n_steps=4, figure=False, angle_histograms=False, per_layer_detail=True
    )
    tb = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(tmp_path, logger=tb, callbacks=[callback], max_epochs=2).fit(TinyCNN(scheduler=True), loader())
    events = read_events(Path(tb.log_dir))
    rates = [(e.step, e.value) for e in events.Scalars("Rotation_rate/head")]
    assert rates == [(step, pytest.approx(RHO if step < 8 else RHO / 2, rel=1e-6)) for step in (3, 7, 11, 15)]


RHO_HEAD = 0.02


def run_two_callbacks(root: Path, max_epochs: int, ckpt_path: str | None = None) -> tuple[Any, ...]:
    """A GAN-like fit: one LaycaCallback per optimizer (features: SGD at RHO, head: Adam at RHO_HEAD)."""
    features = ll.LaycaCallback(rotation_rate=RHO, optimizers=0, include=LAYER_PARAMS[:2], log_every_n_steps=1)
    head = ll.LaycaCallback(rotation_rate=RHO_HEAD, optimizers=1, include="head.weight", log_every_n_steps=1)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
    trainer = make_trainer(
        root, logger=False, callbacks=[features, head, checkpoint], max_epochs=max_epochs, enable_checkpointing=True
    )
    model = TwoOptimizerCNN()
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model, features, head


def test_two_layca_callbacks_one_per_optimizer_train_at_their_own_rates_and_resume_exactly(tmp_path: Path) -> None:
    straight_model, straight_features, straight_head = run_two_callbacks(tmp_path / "straight", 4)
    run_two_callbacks(tmp_path / "first", 2)
    ckpt = tmp_path / "first" / "ckpt" / "last.ckpt"
    states = torch.load(ckpt, weights_only=False)["callbacks"]
    assert states["LaycaCallback{'optimizers': [0]}"]["layer_names"] == LAYER_PARAMS[:2]
    assert states["LaycaCallback{'optimizers': [1]}"]["layer_names"] == ["head.weight"]
    resumed_model, resumed_features, resumed_head = run_two_callbacks(tmp_path / "resumed", 4, str(ckpt))

    # Each callback turned its own layers by atan of its own rate at the first step.
    one_step = {rho: 1.0 - 1.0 / math.sqrt(1.0 + rho**2) for rho in (RHO, RHO_HEAD)}
    for layer in ("features.0", "features.3"):
        assert straight_features.history[layer][0] == (0, pytest.approx(one_step[RHO], abs=1e-6))
    assert straight_head.history["head"][0] == (0, pytest.approx(one_step[RHO_HEAD], abs=1e-6))
    assert straight_features.last_rates == pytest.approx({"features.0": RHO, "features.3": RHO})
    assert straight_head.last_rates == pytest.approx({"head": RHO_HEAD})
    # The resumed fit continues the uninterrupted one exactly, each callback from its own state.
    for (name, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_features.history == straight_features.history
    assert resumed_head.history == straight_head.history
    assert resumed_features.epoch_rotation == straight_features.epoch_rotation
    assert resumed_features.laycas[0].step_count == resumed_head.laycas[1].step_count == 32


def test_two_monitors_with_different_layers_share_a_trainer_and_keep_separate_states(tmp_path: Path) -> None:
    features = ll.LayerRotationMonitor(include=LAYER_PARAMS[:2], figure=False)
    head = ll.LayerRotationMonitor(include="head.weight", figure=False)
    assert features.state_key != head.state_key
    assert ll.LayerRotationMonitor().state_key == "LayerRotationMonitor"  # checkpoints written before keys had fields
    trainer = make_trainer(tmp_path, logger=False, callbacks=[features, head], max_epochs=1, limit_train_batches=2)
    trainer.fit(TinyCNN(), loader())
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    states = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert states[features.state_key]["layer_names"] == LAYER_PARAMS[:2]
    assert states[head.state_key]["layer_names"] == ["head.weight"]
