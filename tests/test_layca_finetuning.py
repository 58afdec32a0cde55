"""Layers that join later: Lightning's BackboneFinetuning with LaycaCallback, in both callback orders, and resume."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint
from torch import nn
from torch.nn import functional as F

import lightning_layca as ll
from tests.tiny_modules import loader, make_trainer

RHO = 0.05
BACKBONE = ["backbone.0.weight", "backbone.3.weight"]
LAYERS = [*BACKBONE, "head.weight"]


class FineTuned(L.LightningModule):
    """A backbone (trained from epoch 1 by BackboneFinetuning) under a head trained from the start."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1, momentum=0.9)


class ResumableBackboneFinetuning(BackboneFinetuning):
    """BackboneFinetuning that also unfreezes the backbone when a fit resumes after the unfreeze epoch.

    Lightning's own restores the backbone's parameter group on resume but leaves its parameters frozen, so even
    without Layca a resumed run would not match an uninterrupted one.
    """

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        super().finetune_function(pl_module, epoch, optimizer)
        if epoch > self.unfreeze_backbone_at_epoch:
            self.make_trainable(pl_module.backbone)


class StepSpy(L.Callback):
    """Records, around every optimizer step, each layer's angle, norm and the rate Layca announced for it."""

    def __init__(self, layca_callback: ll.LaycaCallback) -> None:
        self.layca_callback = layca_callback
        self.records: list[dict[str, tuple[float, float, float]]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        params = dict(pl_module.named_parameters())
        self.before = {name: params[name].detach().double().clone() for name in LAYERS}
        self.rates = self.layca_callback.laycas[0].rotation_rates()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        params = dict(pl_module.named_parameters())
        record = {}
        for name in LAYERS:
            w, w0 = params[name].detach().double().flatten(), self.before[name].flatten()
            across = torch.linalg.vector_norm(w - torch.dot(w, w0) / torch.dot(w0, w0) * w0)
            turned = math.atan2(float(across) * float(w0.norm()), float(torch.dot(w, w0)))
            record[name] = (turned, float(w.detach().norm()), self.rates.get(name, 0.0))
        self.records.append(record)


def callbacks(layca_first: bool, tmp_path: Path | None = None) -> tuple[ll.LaycaCallback, list[L.Callback]]:
    layca = ll.LaycaCallback(rotation_rate=RHO, figure=False, angle_histograms=False)
    finetuning = ResumableBackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5)
    ordered: list[L.Callback] = [layca, finetuning] if layca_first else [finetuning, layca]
    if tmp_path is not None:
        ordered.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1))
    return layca, ordered


@pytest.fixture(scope="module", params=[True, False], ids=["layca_first", "finetuning_first"])
def finetuned_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp_path = tmp_path_factory.mktemp("finetune")
    layca, ordered = callbacks(request.param, tmp_path)
    spy = StepSpy(layca)
    model = FineTuned()
    initial = {name: p.detach().double().clone() for name, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, callbacks=[*ordered, spy], max_epochs=3, enable_checkpointing=True, logger=False)
    trainer.fit(model, loader())
    return request.param, tmp_path, layca, spy, model, initial, trainer


def test_unfrozen_backbone_layers_join_layca_and_turn_by_atan_of_their_rate(finetuned_run: Any) -> None:
    _, _, layca, spy, _, initial, trainer = finetuned_run
    steps_per_epoch = len(spy.records) // 3
    assert layca.laycas[0].controlled_layer_names == LAYERS
    assert len(trainer.optimizers[0].param_groups) == 2
    for step, record in enumerate(spy.records):
        for name in LAYERS:
            turned, norm, rate = record[name]
            if name in BACKBONE and step < steps_per_epoch:
                assert (turned, rate) == (0.0, 0.0)  # frozen: not touched, not controlled
            else:
                assert rate > 0
                assert turned == pytest.approx(math.atan(rate), abs=1e-6)
            assert norm == pytest.approx(float(initial[name].norm()), rel=1e-6)
    # BackboneFinetuning adds the backbone at a tenth of the head's lr and multiplies it by 1.5 each epoch: measured
    # against the same reference lr, the backbone's rotation rate follows (0.1, then 0.15 times the head's).
    head_rate = spy.records[-1]["head.weight"][2]
    assert spy.records[steps_per_epoch][BACKBONE[0]][2] == pytest.approx(0.1 * RHO, rel=1e-9)
    assert spy.records[-1][BACKBONE[0]][2] == pytest.approx(0.15 * head_rate, rel=1e-9)


def test_resuming_after_the_unfreeze_is_bit_identical(finetuned_run: Any) -> None:
    layca_first, tmp_path, _, _, model, _, _ = finetuned_run
    (checkpoint,) = (tmp_path / "ckpt").glob("epoch=1-*.ckpt")
    _, ordered = callbacks(layca_first)
    resumed = FineTuned()
    trainer = make_trainer(tmp_path / "resumed", callbacks=ordered, max_epochs=3, logger=False)
    trainer.fit(resumed, loader(), ckpt_path=checkpoint)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_layca_checkpoint_resumes_into_the_bare_base_optimizer(finetuned_run: Any) -> None:
    # Without LaycaCallback the checkpoint is a plain SGD state dict with an extra "layca" entry: it loads, and
    # training goes on with SGD alone (Lightning warns that the checkpoint's LaycaCallback is missing).
    _, tmp_path, _, _, _, _, _ = finetuned_run
    (checkpoint,) = (tmp_path / "ckpt").glob("epoch=1-*.ckpt")
    model = FineTuned()
    trainer = make_trainer(
        tmp_path / "bare",
        callbacks=[ResumableBackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5)],
        max_epochs=3,
        logger=False,
    )
    with pytest.warns(UserWarning, match="LaycaCallback"):
        trainer.fit(model, loader(), ckpt_path=checkpoint)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 2
    assert trainer.global_step == 3 * len(loader())


def test_a_plain_checkpoint_resumed_with_the_callback_keeps_counting_steps(tmp_path: Path) -> None:
    model = FineTuned()
    trainer = make_trainer(tmp_path, max_epochs=1, logger=False, enable_checkpointing=True)
    trainer.fit(model, loader())
    (checkpoint,) = Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt")
    layca = ll.LaycaCallback(rotation_rate=RHO, schedule=ll.LayerWarmup(100), figure=False, angle_histograms=False)
    resumed = make_trainer(tmp_path / "resumed", callbacks=[layca], max_epochs=2, logger=False)
    resumed.fit(FineTuned(), loader(), ckpt_path=checkpoint)
    # 8 steps in the plain run, 8 under Layca: a LayerWarmup reads step 16, not 8.
    assert layca.laycas[0].step_count == 2 * len(loader())
    assert layca.laycas[0].epoch == 1


def test_only_biases_trained_steps_without_any_layer_until_one_joins() -> None:
    # BitFit-style: every weight frozen and out of the optimizer; the biases train. Layca steps them untouched.
    model = FineTuned()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    opt = ll.Layca(
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model.named_parameters()
    )
    assert opt.controlled_layer_names == [] and opt.layer_names == LAYERS
    x, y = next(iter(loader()))
    F.cross_entropy(model.head(model.backbone(x)), y).backward()
    opt.step()
    assert opt.rotation_rates() == {}
    model.head.weight.requires_grad_(True)
    opt.add_param_group({"params": [model.head.weight], "lr": 0.1})
    assert opt.controlled_layer_names == ["head.weight"]
    assert opt.rotation_rates() == {"head.weight": pytest.approx(ll.DEFAULT_ROTATION_RATE)}
