"""Specification of layer selection: which parameters are layers, and which may become layers later."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import lightning_layca as ll
from tests.tiny_modules import TinyCNN, loader, make_trainer


class WithSpectralFilter(nn.Module):
    """A real model with one complex-valued weight (a learned filter applied in the frequency domain)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(8, 8)
        self.spectral = nn.Parameter(torch.randn(5, 8, dtype=torch.complex64))
        self.head = nn.Linear(8, 2)


def names(pairs: list[tuple[str, torch.Tensor]]) -> list[str]:
    return [name for name, _ in pairs]


def test_complex_parameters_are_not_layers_by_default() -> None:
    model = WithSpectralFilter()
    assert names(ll.select_layers(model.named_parameters())) == ["encoder.weight", "head.weight"]
    assert names(ll.select_layers(model.named_parameters(), trainable_only=False)) == ["encoder.weight", "head.weight"]


def test_include_naming_a_complex_parameter_is_an_error_that_names_it_and_says_why() -> None:
    model = WithSpectralFilter()
    with pytest.raises(
        ValueError, match=r"parameter 'spectral', which has dtype torch\.complex64.*real floating-point.*exclude="
    ):
        ll.select_layers(model.named_parameters(), include=["encoder.weight", "spectral"])
    with pytest.raises(ValueError, match=r"parameter 'spectral', which has dtype torch\.complex64"):
        ll.select_layers(model.named_parameters(), include="*")
    assert names(ll.select_layers(model.named_parameters(), include="*", exclude="spectral")) == [
        "encoder.weight",
        "encoder.bias",
        "head.weight",
        "head.bias",
    ]


def test_frozen_parameters_are_candidates_only_when_asked() -> None:
    model = WithSpectralFilter()
    model.encoder.requires_grad_(False)
    assert names(ll.select_layers(model.named_parameters())) == ["head.weight"]
    assert names(ll.select_layers(model.named_parameters(), trainable_only=False)) == ["encoder.weight", "head.weight"]
    # `include` may name a frozen parameter when frozen ones are candidates; otherwise it matches nothing.
    assert names(ll.select_layers(model.named_parameters(), include="encoder.weight", trainable_only=False)) == [
        "encoder.weight"
    ]
    with pytest.raises(ValueError, match=r"'encoder\.weight' matches no trainable parameter"):
        ll.select_layers(model.named_parameters(), include="encoder.weight")


class ComplexCNN(TinyCNN):
    """TinyCNN with a complex parameter that takes part in the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) @ self.phase.abs()


def test_the_monitor_skips_complex_parameters_and_refuses_one_named_by_include(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=1, figure=False)
    make_trainer(tmp_path, logger=False, callbacks=[monitor], max_epochs=1, limit_train_batches=2).fit(
        ComplexCNN(), loader()
    )
    assert monitor.layer_names == ["features.0.weight", "features.3.weight", "head.weight"]
    assert len(monitor.history["head"]) == 2

    named = ll.LayerRotationMonitor(include="phase", figure=False)
    trainer: L.Trainer = make_trainer(tmp_path, logger=False, callbacks=[named], max_epochs=1)
    with pytest.raises(ValueError, match=r"parameter 'phase', which has dtype torch\.complex64"):
        trainer.fit(ComplexCNN(), loader())
