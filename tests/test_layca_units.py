"""granularity="unit": every output unit of a layer turns by atan(rho) per step and keeps its own initial norm."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lightning_layca as ll
from tests.implementations import IMPLEMENTATIONS
from tests.reference import layca_unit_update

RHO = 0.07

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 5)
    )


def row_angles(after: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    a, b = after.double().flatten(1), before.double().flatten(1)
    dot = (a * b).sum(1)
    across = torch.linalg.vector_norm(a - (dot / (b * b).sum(1)).unsqueeze(1) * b, dim=1)
    return torch.atan2(across * b.norm(dim=1), dot)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_every_unit_turns_by_atan_rho_and_keeps_its_norm_as_the_float64_reference(
    optimizer_name: str, implementation: str
) -> None:
    model = make_model()
    reference_model = copy.deepcopy(model).double()
    layers = ["0.weight", "3.weight", "5.weight"]
    opt = ll.Layca(
        OPTIMIZERS[optimizer_name](model.parameters()),
        model.named_parameters(),
        rotation_rate=RHO,
        granularity="unit",
        implementation=implementation,
    )
    reference_base = OPTIMIZERS[optimizer_name](reference_model.parameters())
    reference_params = dict(reference_model.named_parameters())
    unit_norms = {n: reference_params[n].detach().flatten(1).norm(dim=1).tolist() for n in layers}
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(8, 3, 8, 8, generator=generator)
        y = torch.randint(0, 5, (8,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
            q.grad = p.grad.double()
        before = {n: dict(model.named_parameters())[n].detach().clone() for n in layers}
        reference_before = {n: reference_params[n].detach().clone() for n in layers}
        opt.step()
        with torch.no_grad():
            reference_base.step()
            for n in layers:
                q = reference_params[n]
                q.copy_(layca_unit_update(reference_before[n], q, RHO, unit_norms[n], torch.float32))
        params = dict(model.named_parameters())
        for n in layers:
            w = params[n].detach()
            # A unit the reference leaves in place (a dead ReLU unit: zero gradient) stays; every other unit turns by
            # exactly atan(rho).
            moved = (reference_params[n].detach() != reference_before[n]).flatten(1).any(dim=1).tolist()
            expected = [math.atan(RHO) if m else 0.0 for m in moved]
            assert row_angles(w, before[n]).tolist() == pytest.approx(expected, abs=1e-6)
            assert sum(moved) >= w.shape[0] // 2
            assert w.double().flatten(1).norm(dim=1).tolist() == pytest.approx(unit_norms[n], rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        error = float((p.detach().double() - q.detach()).norm() / q.detach().norm())
        assert error < 1e-5, name


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_unit_with_zero_gradient_under_weight_decay_stays_while_the_others_move(implementation: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 6)
    opt = ll.Layca(
        torch.optim.SGD([layer.weight], lr=0.1, momentum=0.9, weight_decay=5e-4),
        [("weight", layer.weight)],
        rotation_rate=RHO,
        granularity="unit",
        implementation=implementation,
    )
    for _ in range(10):
        layer.weight.grad = torch.randn(6, 32)
        layer.weight.grad[2] = 0.0  # unit 2 only decays: a purely radial step
        before = layer.weight.detach().clone()
        opt.step()
        angles = row_angles(layer.weight.detach(), before).tolist()
        assert angles[2] < math.radians(0.01)
        assert [a for k, a in enumerate(angles) if k != 2] == pytest.approx([math.atan(RHO)] * 5, abs=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_non_finite_unit_is_frozen_alone(implementation: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    opt = ll.Layca(
        torch.optim.SGD([layer.weight], lr=0.1),
        [("weight", layer.weight)],
        rotation_rate=RHO,
        granularity="unit",
        implementation=implementation,
    )
    layer.weight.grad = torch.randn(4, 8)
    layer.weight.grad[1, 3] = float("nan")
    before = layer.weight.detach().clone()
    opt.step()
    assert torch.equal(layer.weight.detach()[1], before[1])
    assert torch.isfinite(layer.weight).all()
    assert row_angles(layer.weight.detach(), before)[[0, 2, 3]].tolist() == pytest.approx(
        [math.atan(RHO)] * 3, abs=1e-6
    )


def test_unit_norms_round_trip_through_the_state_dict() -> None:
    model = make_model()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), granularity="unit")
    norms = [t.clone() for t in opt.initial_unit_norms]
    model2 = make_model()
    with torch.no_grad():
        for p in model2.parameters():
            p.mul_(2.0)
    other = ll.Layca(torch.optim.SGD(model2.parameters(), lr=0.1), model2.named_parameters(), granularity="unit")
    other.load_state_dict(opt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.initial_unit_norms, norms, strict=True))
    layer_opt = ll.Layca(torch.optim.SGD(model2.parameters(), lr=0.1), model2.named_parameters())
    with pytest.raises(ValueError, match="granularity='unit'"):
        layer_opt.load_state_dict(opt.state_dict())


def test_bad_granularity_is_refused() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="`granularity` must be 'layer' or 'unit', got 'row'"):
        ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), granularity="row")
