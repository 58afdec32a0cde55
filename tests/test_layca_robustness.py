"""Degenerate gradients never put NaN or inf into the weights, and the other layers keep stepping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_layca as ll


def three_layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def angle(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double().flatten(), v.double().flatten()
    return math.atan2(
        float(torch.linalg.vector_norm(u - torch.dot(u, v) / torch.dot(v, v) * v)), float(torch.dot(u, v) / v.norm())
    )


def step_with_middle_gradient(optimizer: str, middle_grad: torch.Tensor | float) -> tuple[list, list]:
    """One step where the middle layer's gradient is replaced; returns the layer weights before and after."""
    model = three_layers()
    base = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    }[optimizer](model.parameters())
    opt = ll.Layca(base, model.named_parameters(), rotation_rate=0.1)
    model(torch.randn(4, 6)).square().mean().backward()
    model[2].weight.grad.fill_(middle_grad) if isinstance(middle_grad, float) else model[2].weight.grad.copy_(
        middle_grad
    )
    before = [p.detach().clone() for p in opt._layers]
    opt.step()
    after = [p.detach().clone() for p in opt._layers]
    return before, after


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam"])
@pytest.mark.parametrize("middle_grad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_gradient_freezes_only_that_layer(optimizer: str, middle_grad: float) -> None:
    before, after = step_with_middle_gradient(optimizer, middle_grad)
    assert all(torch.isfinite(w).all() for w in after)
    assert torch.equal(after[1], before[1])
    for i in (0, 2):
        assert angle(after[i], before[i]) == pytest.approx(math.atan(0.1), abs=1e-5)


def test_one_nan_element_freezes_the_whole_layer() -> None:
    grad = torch.ones(8, 8)
    grad[3, 4] = float("nan")
    before, after = step_with_middle_gradient("sgd", grad)
    assert torch.equal(after[1], before[1])


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum"])
def test_zero_gradient_leaves_the_layer_in_place(optimizer: str) -> None:
    before, after = step_with_middle_gradient(optimizer, 0.0)
    assert torch.equal(after[1], before[1])
    assert angle(after[0], before[0]) == pytest.approx(math.atan(0.1), abs=1e-5)


def test_vanishing_gradient_below_eps_does_not_move_the_layer() -> None:
    # SGD step of 0.1 * 1e-30: ||D_perp|| is far below EPS = 1e-7, so the layer stays where it is.
    before, after = step_with_middle_gradient("sgd", torch.randn(8, 8) * 1e-30)
    assert torch.equal(after[1], before[1])
    assert angle(after[2], before[2]) == pytest.approx(math.atan(0.1), abs=1e-5)


def test_small_gradient_rotates_by_the_full_angle() -> None:
    # The point of Layca: no vanishing-gradient effect. A 1e-4 gradient rotates exactly as a large one.
    before, after = step_with_middle_gradient("sgd", torch.randn(8, 8) * 1e-4)
    assert angle(after[1], before[1]) == pytest.approx(math.atan(0.1), abs=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam"])
def test_large_gradient_rotates_by_the_full_angle(optimizer: str) -> None:
    # 1e15 is far beyond any sane gradient, yet its float32 sums of squares do not overflow: the step is exact.
    before, after = step_with_middle_gradient(optimizer, torch.randn(8, 8) * 1e15)
    assert angle(after[1], before[1]) == pytest.approx(math.atan(0.1), abs=1e-5)
    assert float(after[1].double().norm()) == pytest.approx(float(before[1].double().norm()), rel=1e-6)


def test_huge_gradient_under_adam_never_corrupts_weights() -> None:
    # Adam's own second moment overflows at 1e30 (its step is then 0): no NaN anywhere, other layers step.
    before, after = step_with_middle_gradient("adam", torch.randn(8, 8) * 1e30)
    assert all(torch.isfinite(w).all() for w in after)
    assert angle(after[2], before[2]) == pytest.approx(math.atan(0.1), abs=1e-5)


def test_huge_gradient_under_sgd_never_corrupts_weights() -> None:
    # An SGD step of 1e29 per element overflows float32 sums of squares: that layer is frozen, the others step.
    before, after = step_with_middle_gradient("sgd", torch.randn(8, 8) * 1e30)
    assert all(torch.isfinite(w).all() for w in after)
    assert torch.equal(after[1], before[1])
    assert angle(after[0], before[0]) == pytest.approx(math.atan(0.1), abs=1e-5)


def test_skipped_base_step_leaves_everything_unchanged() -> None:
    model = three_layers()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients: SGD skips every parameter
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_skipped_step_under_grad_scaler_leaves_weights_unchanged() -> None:
    model = three_layers()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.named_parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.randn(4, 6)).square().mean()
    scaler.scale(loss * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert scaler.get_scale() < 2.0**16
    # The next, finite step goes through the wrapper and rotates the layers.
    opt.zero_grad()
    scaler.scale(model(torch.randn(4, 6)).square().mean()).backward()
    scaler.step(opt)
    assert angle(model[0].weight.detach(), before[0]) == pytest.approx(math.atan(opt.rotation_rate), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_dtypes_step_correctly_in_one_optimizer(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    low = nn.Parameter(torch.randn(16, 32).to(dtype))
    high = nn.Parameter(torch.randn(16, 32))
    bias = nn.Parameter(torch.randn(16).to(dtype))
    opt = ll.Layca(
        torch.optim.SGD([low, high, bias], lr=0.1, momentum=0.9),
        [("low", low), ("high", high), ("bias", bias)],
        rotation_rate=0.05,
    )
    n_low, n_high = float(low.detach().double().norm()), float(high.detach().double().norm())
    # Initial norms are accumulated in float32, not rounded to the layer's dtype.
    assert opt.initial_norms == pytest.approx([n_low, n_high], rel=1e-6)
    for _ in range(5):
        before = [low.detach().clone(), high.detach().clone()]
        low.grad = torch.randn_like(low)
        high.grad = torch.randn_like(high)
        bias.grad = torch.randn_like(bias)
        opt.step()
        assert low.dtype == dtype and high.dtype == torch.float32
        # float32 layer: exact to float32; low-precision layer: within its own rounding (2^-8 relative for bf16).
        assert angle(high.detach(), before[1]) == pytest.approx(math.atan(0.05), abs=1e-5)
        assert float(high.detach().double().norm()) == pytest.approx(n_high, rel=1e-6)
        resolution = 2**-7 if dtype == torch.bfloat16 else 2**-10
        assert angle(low.detach(), before[0]) == pytest.approx(math.atan(0.05), abs=2 * resolution)
        assert float(low.detach().double().norm()) == pytest.approx(n_low, rel=resolution)
