"""Specification of the monitor with layers that join later: frozen when the fit starts, trained from some epoch on.

Fine-tuning freezes a backbone and unfreezes it later, by Lightning's ``BackboneFinetuning`` (which adds a parameter
group) or by flipping ``requires_grad`` on parameters that are already in the optimizer. The monitor measures those
layers from their first step on, against their weights at the first fit start, and a layer that stays frozen costs no
snapshot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_layca as ll
from tests.tiny_modules import TinyCNN, cosine_distance_fp64, loader, make_trainer, read_events

STEPS_PER_EPOCH = 8
BACKBONE = ["backbone.0", "backbone.3"]
ALL_LAYERS = [*BACKBONE, "head"]


class BackboneCNN(TinyCNN):
    """TinyCNN with its feature extractor named ``backbone``; the optimizer takes what is trainable when it is made.

    ``unfreeze_at``: freeze the backbone when a fit starts and flip it back to trainable at that epoch's start, the
    parameters staying in the optimizer throughout (``None``: leave freezing to a fine-tuning callback).
    """

    def __init__(self, unfreeze_at: int | None = None) -> None:
        super().__init__()
        del self.features
        head = self.head
        del self.head  # registered again after the backbone: named_parameters() in depth order
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU())
        self.head = head
        self.unfreeze_at = unfreeze_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def setup(self, stage: str) -> None:
        if self.unfreeze_at is not None:
            self.backbone.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        if self.unfreeze_at is not None and self.current_epoch >= self.unfreeze_at:
            self.backbone.requires_grad_(True)

    def configure_optimizers(self) -> Any:
        if self.unfreeze_at is not None:  # every parameter; SGD skips those without a gradient
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=self.momentum)


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removesuffix(".weight"): p.detach().clone() for n, p in module.named_parameters() if p.ndim >= 2}


class SnapshotCount(L.Callback):
    """Records the monitor's layers and the number of snapshot tensors it holds at every epoch end."""

    def __init__(self, monitor: ll.LayerRotationMonitor) -> None:
        self.monitor = monitor
        self.seen: list[tuple[list[str], int]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append((list(self.monitor.layer_names), len(self.monitor.state_dict()["initial"])))


@pytest.mark.parametrize("monitor_first", [True, False], ids=["monitor-first", "finetuning-first"])
def test_backbone_unfrozen_by_backbone_finetuning_is_monitored_from_the_first_fit_weights(
    tmp_path: Path, monitor_first: bool
) -> None:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=4)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    spy = SnapshotCount(monitor)
    callbacks = [monitor, finetuning, spy] if monitor_first else [finetuning, monitor, spy]
    tb = TensorBoardLogger(tmp_path, name="tb")
    model = BackboneCNN()
    initial = weights(BackboneCNN())
    make_trainer(tmp_path, logger=tb, callbacks=callbacks, max_epochs=3).fit(model, loader())

    # Epoch 0: only the head is monitored, and only its snapshot is held; the backbone joins in epoch 1.
    assert spy.seen[0] == (["head.weight"], 1)
    assert spy.seen[1] == (["backbone.0.weight", "backbone.3.weight", "head.weight"], 3)
    final = weights(model)
    for layer in ALL_LAYERS:
        expected = cosine_distance_fp64(final[layer], initial[layer])
        assert expected > 1e-4  # it did train (the backbone at a tenth of the head's learning rate, growing)
        assert monitor.last_rotation[layer] == pytest.approx(expected, abs=1e-6)
    events = read_events(Path(tb.log_dir))
    for layer in BACKBONE:
        assert [e.step for e in events.Scalars(f"Rotation/{layer}")] == [11, 15, 19, 23]
        assert [s for s, _ in monitor.history[layer]] == [11, 15, 19, 23]
        points = monitor.epoch_rotation[layer]
        assert [e for e, _ in points] == [0, 1, 2, 3]
        assert [v for _, v in points[:2]] == [0.0, 0.0]  # frozen before epoch 1: its true rotation
        assert points[2][1] > 1e-5
    assert [e.step for e in events.Scalars("Rotation/head")] == [3, 7, 11, 15, 19, 23]
    assert list(monitor.epoch_rotation) == ALL_LAYERS  # depth order: the figure colours by depth
    assert len(events.Images("Rotation_curves")) == 3


def test_layers_that_stay_frozen_are_not_monitored_and_cost_no_snapshot(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=4, figure=False)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor], max_epochs=1)
    trainer.fit(BackboneCNN(unfreeze_at=5), loader())
    assert monitor.layer_names == ["head.weight"]
    state = monitor.state_dict()
    assert len(state["initial"]) == 1 and state["initial"][0].shape == (3, 8)
    assert set(monitor.history) == {"head"}


def test_include_may_name_a_layer_that_is_frozen_when_the_fit_starts(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(include="backbone.3.weight", log_every_n_steps=4, figure=False)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor], max_epochs=2)
    model = BackboneCNN(unfreeze_at=1)
    trainer.fit(model, loader())
    assert monitor.layer_names == ["backbone.3.weight"]
    assert [s for s, _ in monitor.history["backbone.3"]] == [11, 15]
    expected = cosine_distance_fp64(weights(model)["backbone.3"], weights(BackboneCNN())["backbone.3"])
    assert monitor.last_rotation["backbone.3"] == pytest.approx(expected, abs=1e-5)


def test_a_model_that_is_all_frozen_at_the_start_logs_nothing_until_a_layer_joins(tmp_path: Path) -> None:
    class AllFrozen(BackboneCNN):
        def setup(self, stage: str) -> None:
            self.requires_grad_(False)

        def on_train_epoch_start(self) -> None:
            self.requires_grad_(self.current_epoch >= 1)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=self.lr)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss if loss.requires_grad else None  # type: ignore[return-value]

    monitor = ll.LayerRotationMonitor(log_every_n_steps=4, angle_histograms=False)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor], max_epochs=2)
    trainer.fit(AllFrozen(), loader())
    assert monitor.layer_names == ["backbone.0.weight", "backbone.3.weight", "head.weight"]
    assert {layer: [s for s, _ in h] for layer, h in monitor.history.items()} == {
        layer: [11, 15] for layer in ALL_LAYERS
    }
    assert all(points[:2] == [(0, 0.0), (1, 0.0)] for points in monitor.epoch_rotation.values())


def run_with_checkpoints(root: Path, max_epochs: int, ckpt_path: str | None = None) -> tuple[Any, ...]:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=3, figure=False)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer(
        root, logger=False, callbacks=[monitor, checkpoint], max_epochs=max_epochs, enable_checkpointing=True
    )
    model = BackboneCNN(unfreeze_at=1)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model, monitor


@pytest.mark.parametrize("resume_epoch", [0, 1], ids=["before-the-unfreeze", "after-the-unfreeze"])
def test_resuming_restores_which_layers_joined_and_their_snapshots_exactly(tmp_path: Path, resume_epoch: int) -> None:
    straight_model, straight = run_with_checkpoints(tmp_path / "straight", 3)
    (ckpt,) = (tmp_path / "straight" / "ckpt").glob(f"epoch={resume_epoch}-*.ckpt")
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["LayerRotationMonitor"]
    assert len(saved["layer_names"]) == (1 if resume_epoch == 0 else 3)
    resumed_model, resumed = run_with_checkpoints(tmp_path / "resumed", 3, str(ckpt))

    for (name, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.layer_names == straight.layer_names
    assert resumed.history == straight.history
    assert resumed.epoch_rotation == straight.epoch_rotation
    for a, b in zip(resumed.state_dict()["initial"], straight.state_dict()["initial"], strict=True):
        assert torch.equal(a, b)
    initial = weights(BackboneCNN())
    for layer, snapshot in zip(ALL_LAYERS, resumed.state_dict()["initial"], strict=True):
        assert torch.equal(snapshot, initial[layer])  # the first fit's weights, whenever the layer joined


def test_layca_rates_of_layers_that_join_later_are_logged_from_their_first_logging_step(tmp_path: Path) -> None:
    rho = 0.05
    callback = ll.LaycaCallback(
        rotation_rate=rho, log_every_n_steps=4, figure=False, angle_histograms=False, per_layer_detail=True
    )
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(
        tmp_path, logger=tb, callbacks=[callback, BackboneFinetuning(unfreeze_backbone_at_epoch=1)], max_epochs=3
    )
    trainer.fit(BackboneCNN(), loader())
    events = read_events(Path(tb.log_dir))
    for layer in BACKBONE:
        rates = [(e.step, e.value) for e in events.Scalars(f"Rotation_rate/{layer}")]
        assert [s for s, _ in rates] == [e.step for e in events.Scalars(f"Rotation/{layer}")] == [11, 15, 19, 23]
        # BackboneFinetuning adds the backbone at a tenth of the head's lr, then doubles it each epoch (its default).
        assert [v for _, v in rates] == pytest.approx([0.1 * rho] * 2 + [0.2 * rho] * 2, rel=1e-6)
    head = [(e.step, e.value) for e in events.Scalars("Rotation_rate/head")]
    assert head == [(s, pytest.approx(rho, rel=1e-6)) for s in (3, 7, 11, 15, 19, 23)]
