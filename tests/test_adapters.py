"""Adapted layers (peft LoRA and DoRA): the effective weight's rotation in factored form against a dense float64
computation, the not-moved warning, and real peft models under both callbacks."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_layca as ll
from lightning_layca.adapters import AdaptedLayers, AdapterStart, adapters_of, effective_measures

peft = pytest.importorskip("peft")


def base_model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Unflatten(1, (16, 1)), nn.Conv1d(16, 8, 1), nn.Flatten(), nn.Linear(8, 3)
    )
    return net.to(dtype)


def lora(
    dora: bool, dtype: torch.dtype = torch.float32, targets: tuple[str, ...] = ("0", "3", "5"), head: bool = False
) -> nn.Module:
    """LoRA (or DoRA) on the model's layers ``targets``; with ``head``, the last layer trained in full."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), use_dora=dora, modules_to_save=["5"] if head else None
    )
    return peft.get_peft_model(base_model(dtype), config)


def dense_effective(adapter) -> torch.Tensor:
    """The effective weight, materialised in float64 (the reference)."""
    m = adapter.module
    w = m.base_layer.weight.detach().double().flatten(1)
    b = m.lora_B[adapter.key].weight.detach().double().flatten(1)
    a = m.lora_A[adapter.key].weight.detach().double().flatten(1)
    v = w + m.scaling[adapter.key] * b @ a
    if adapter.key in getattr(m, "lora_magnitude_vector", {}):
        magnitude = m.lora_magnitude_vector[adapter.key].weight.detach().double().flatten()
        v = (magnitude / v.norm(dim=1))[:, None] * v
    return v


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_factored_cosines_equal_the_dense_ones_per_layer_and_unit_with_nonzero_b_at_start(dora: bool):
    model = lora(dora, torch.float64)
    perturb(model, 1)  # B non-zero at the start (as PiSSA/OLoRA-style initialisations have it)
    adapters = adapters_of(model)
    assert [a.name for a in adapters] == [f"base_model.model.{i}.weight" for i in (0, 3, 5)]
    starts = [AdapterStart(a) for a in adapters]
    before = [dense_effective(a) for a in adapters]
    perturb(model, 2)
    for adapter, start, v0 in zip(adapters, starts, before, strict=True):
        v = dense_effective(adapter)
        measured = effective_measures(adapter, start)
        cosine = float((v * v0).sum() / (v.norm() * v0.norm()))
        units = (v * v0).sum(1) / (v.norm(dim=1) * v0.norm(dim=1))
        assert abs(measured.cosine - cosine) < 1e-10
        assert (measured.unit_cosines - units).abs().max() < 1e-10
        assert 1 - cosine > 1e-3  # the adapters did move: the comparison is not between ones
        if dora:
            m = adapter.module.lora_magnitude_vector[adapter.key].weight.detach().double().flatten()
            change = float((m - start.magnitude).norm() / start.magnitude.norm())
            assert measured.magnitude_change == pytest.approx(change, rel=1e-12)
            assert measured.magnitude_change > 0
        else:
            assert measured.magnitude_change is None


def test_a_zero_b_at_start_measures_zero_rotation_then_the_dense_value():
    model = lora(False, torch.float64)
    adapter = adapters_of(model)[0]
    assert not adapter.module.lora_B["default"].weight.any()  # peft's default: B = 0
    start = AdapterStart(adapter)
    assert effective_measures(adapter, start).cosine == 1.0
    v0 = dense_effective(adapter)
    perturb(model, 3)
    v = dense_effective(adapter)
    assert abs(effective_measures(adapter, start).cosine - float((v * v0).sum() / (v.norm() * v0.norm()))) < 1e-10


def test_the_not_moved_warning_names_a_frozen_b_and_stays_silent_otherwise():
    model = lora(False)
    layers = AdaptedLayers("Monitor", unmoved_after=3)
    layers.bind(model)
    model.base_model.model[0].lora_B["default"].weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(1, 3):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
            assert layers.check_unmoved(step) == []
    optimizer.step()
    with pytest.warns(UserWarning, match=r"has not moved: \['base_model.model.0.weight'\]") as record:
        assert layers.check_unmoved(3) == ["base_model.model.0.weight"]
    assert len(record) == 1
    assert layers.check_unmoved(4) == []  # once


class Regression(L.LightningModule):
    def __init__(self, dora: bool, head: bool) -> None:
        super().__init__()
        self.net = lora(dora, targets=("0", "3") if head else ("0", "3", "5"), head=head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(64, 12, generator=g), torch.randn(64, 3, generator=g)), 8)


@pytest.mark.parametrize(
    ("dora", "callback", "head"),
    [(False, "monitor", False), (True, "monitor", False), (False, "layca", True), (True, "layca", False)],
    ids=["lora-monitor", "dora-monitor", "lora-layca-with-head", "dora-layca-adapters-only"],
)
def test_peft_model_under_both_callbacks_logs_the_effective_rotation(
    dora: bool, callback: str, head: bool, tmp_path: Path
):
    module = Regression(dora, head)
    adapters = adapters_of(module)
    starts = [dense_effective(a) for a in adapters]
    if callback == "monitor":
        cb: ll.LayerRotationMonitor = ll.LayerRotationMonitor(log_every_n_steps=1, unmoved_adapter_steps=4)
    else:
        cb = ll.LaycaCallback(rotation_rate=0.01, log_every_n_steps=1, unmoved_adapter_steps=4)
    trainer = L.Trainer(
        max_epochs=2,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*has not moved.*")
        trainer.fit(module, data())
    names = [f"net.base_model.model.{i}" for i in ((0, 3) if head else (0, 3, 5))]
    assert [n for n in cb.last_rotation if "lora_" in n or "base_layer" in n] == []  # not layers of their own
    for name, adapter, v0 in zip(names, adapters, starts, strict=True):
        v = dense_effective(adapter)
        expected = 1 - float((v * v0).sum() / (v.norm() * v0.norm()))
        assert cb.last_rotation[name] == pytest.approx(expected, rel=1e-4, abs=1e-9)
        assert expected > 1e-6
    (metrics,) = Path(trainer.log_dir).glob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert all((f"Magnitude_change/{n}" in header) == dora for n in names)
    if dora:
        assert all(v > 0 for v in cb.layers.magnitude_changes.values())
    if callback == "layca" and head:  # Layca controls the head; the base optimizer trains the adapters
        (layca,) = trainer.optimizers
        assert isinstance(layca, ll.Layca)
        assert list(layca.describe()) == ["net.base_model.model.5.modules_to_save.default.weight"]
        assert cb.last_step_rates["net.base_model.model.5.modules_to_save.default"] == pytest.approx(0.01, rel=1e-5)
    elif callback == "layca":  # nothing but adapters: the optimizer steps as it is
        assert not isinstance(trainer.optimizers[0], ll.Layca)


def test_a_resumed_fit_measures_adapters_from_the_start_of_the_first_fit(tmp_path: Path):
    module = Regression(dora=True, head=False)
    adapters = adapters_of(module)
    starts = [dense_effective(a) for a in adapters]
    kwargs = {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "default_root_dir": tmp_path,
    }
    trainer = L.Trainer(max_epochs=1, callbacks=[ll.LayerRotationMonitor(log_every_n_steps=1)], **kwargs)
    trainer.fit(module, data())
    (checkpoint,) = Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt")
    resumed = Regression(dora=True, head=False)  # the same initial weights: only the checkpoint moves them
    monitor = ll.LayerRotationMonitor(log_every_n_steps=1)
    L.Trainer(max_epochs=2, callbacks=[monitor], **kwargs).fit(resumed, data(), ckpt_path=checkpoint)
    for adapter, v0 in zip(adapters_of(resumed), starts, strict=True):
        v = dense_effective(adapter)
        expected = 1 - float((v * v0).sum() / (v.norm() * v0.norm()))
        assert monitor.last_rotation[adapter.name.removesuffix(".weight")] == pytest.approx(expected, rel=1e-4)


def test_measure_cost_benchmark_prints_every_row_at_a_tiny_size():
    from benchmarks import adapter_measure_cost

    lines = adapter_measure_cost.main(["--size", "16", "--rank", "2", "--rounds", "1", "--repeats", "1"])
    rows = [line.split(" | ")[0] for line in lines if line.startswith("| ") and "time / factored" not in line]
    assert rows == ["| factored", "| dense, start kept", "| dense, start recomputed"]


def test_the_monitor_warns_once_during_a_fit_naming_the_adapter_whose_b_is_frozen(tmp_path: Path):
    module = Regression(dora=False, head=False)
    module.net.base_model.model[3].lora_B["default"].weight.requires_grad_(False)
    monitor = ll.LayerRotationMonitor(log_every_n_steps=1, unmoved_adapter_steps=4)
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        default_root_dir=tmp_path,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    with pytest.warns(
        UserWarning, match=r"after 4 optimizer steps .* has not moved: \['net.base_model.model.3.weight'\]"
    ):
        trainer.fit(module, data())
    assert monitor.last_rotation["net.base_model.model.3"] == 0.0
    assert monitor.last_rotation["net.base_model.model.0"] > 0.0
