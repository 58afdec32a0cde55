"""Degenerate gradients never put NaN or inf into the weights, and the other layers keep stepping."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import lightning_layca as ll
from tests.implementations import IMPLEMENTATIONS


def three_layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def angle(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double().flatten(), v.double().flatten()
    return math.atan2(
        float(torch.linalg.vector_norm(u - torch.dot(u, v) / torch.dot(v, v) * v)), float(torch.dot(u, v) / v.norm())
    )


def step_with_middle_gradient(
    optimizer: str, middle_grad: torch.Tensor | float, implementation: str = "eager"
) -> tuple[list, list]:
    """One step where the middle layer's gradient is replaced; returns the layer weights before and after."""
    model = three_layers()
    base = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    }[optimizer](model.parameters())
    opt = ll.Layca(base, model.named_parameters(), rotation_rate=0.1, implementation=implementation)
    model(torch.randn(4, 6)).square().mean().backward()
    model[2].weight.grad.fill_(middle_grad) if isinstance(middle_grad, float) else model[2].weight.grad.copy_(
        middle_grad
    )
    before = [p.detach().clone() for p in opt.layers.params]
    opt.step()
    after = [p.detach().clone() for p in opt.layers.params]
    return before, after


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam"])
@pytest.mark.parametrize("middle_grad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_non_finite_gradient_freezes_only_that_layer(optimizer: str, middle_grad: float, implementation: str) -> None:
    before, after = step_with_middle_gradient(optimizer, middle_grad, implementation)
    assert all(torch.isfinite(w).all() for w in after)
    assert torch.equal(after[1], before[1])
    for i in (0, 2):
        assert angle(after[i], before[i]) == pytest.approx(math.atan(0.1), abs=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_one_nan_element_freezes_the_whole_layer(implementation: str) -> None:
    grad = torch.ones(8, 8)
    grad[3, 4] = float("nan")
    before, after = step_with_middle_gradient("sgd", grad, implementation)
    assert torch.equal(after[1], before[1])


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_gradient_leaves_the_layer_in_place(optimizer: str, implementation: str) -> None:
    before, after = step_with_middle_gradient(optimizer, 0.0, implementation)
    assert torch.equal(after[1], before[1])
    assert angle(after[0], before[0]) == pytest.approx(math.atan(0.1), abs=1e-5)


# The fused SGD kernel sees the tiny step exactly (it never forms fl(w + D)), finds it below the floor, and warns.
@pytest.mark.filterwarnings("ignore:Layca. the base optimizer's steps for layer")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vanishing_gradient_below_the_rounding_floor_does_not_move_the_layer(implementation: str) -> None:
    # SGD step of 0.1 * 1e-30: fl(w + D) == w (and far below the floor when D is known exactly): the layer stays.
    before, after = step_with_middle_gradient("sgd", torch.randn(8, 8) * 1e-30, implementation)
    assert torch.equal(after[1], before[1])
    assert angle(after[2], before[2]) == pytest.approx(math.atan(0.1), abs=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_step_that_rounds_to_nothing_is_reported_on_every_path(implementation: str) -> None:
    # A loss scaled by 1e-9: SGD's step (~1e-11) is below float32's resolution of `w + D`, so fl(w + D) == w and no
    # weight moves. The kernels that take SGD's step see it exactly and flag it; the path that works from a snapshot
    # sees no step at all, and must say so too, not freeze the layers silently.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), implementation=implementation)
    before = [p.detach().clone() for p in model.parameters()]
    loss = 1e-9 * torch.nn.functional.cross_entropy(model(torch.randn(32, 16)), torch.randint(0, 4, (32,)))
    loss.backward()
    with pytest.warns(UserWarning, match=r"layer\(s\) '0\.weight', '2\.weight' are within 100x"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_layer_with_a_zero_learning_rate_stays_without_a_warning(implementation: str) -> None:
    # Frozen on purpose (lr 0 in its param group): a zero step with a gradient is not a step lost to rounding.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    groups = [{"params": list(model[0].parameters()), "lr": 0.0}, {"params": list(model[2].parameters())}]
    opt = ll.Layca(torch.optim.SGD(groups, lr=0.1), model.named_parameters(), implementation=implementation)
    before, other = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    torch.nn.functional.cross_entropy(model(torch.randn(32, 16)), torch.randint(0, 4, (32,))).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(model[0].weight, before)
    assert angle(model[2].weight.detach(), other) > 1e-3  # the other layer turns


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_small_gradient_rotates_by_the_full_angle(implementation: str) -> None:
    # The point of Layca: no vanishing-gradient effect. A 1e-4 gradient rotates exactly as a large one.
    before, after = step_with_middle_gradient("sgd", torch.randn(8, 8) * 1e-4, implementation)
    assert angle(after[1], before[1]) == pytest.approx(math.atan(0.1), abs=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_large_gradient_rotates_by_the_full_angle(optimizer: str, implementation: str) -> None:
    # 1e15 is far beyond any sane gradient, yet its float32 sums of squares do not overflow: the step is exact.
    before, after = step_with_middle_gradient(optimizer, torch.randn(8, 8) * 1e15, implementation)
    assert angle(after[1], before[1]) == pytest.approx(math.atan(0.1), abs=1e-5)
    assert float(after[1].double().norm()) == pytest.approx(float(before[1].double().norm()), rel=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_huge_gradient_under_adam_never_corrupts_weights(implementation: str) -> None:
    # Adam's own second moment overflows at 1e30 (its step is then 0): no NaN anywhere, other layers step.
    before, after = step_with_middle_gradient("adam", torch.randn(8, 8) * 1e30, implementation)
    assert all(torch.isfinite(w).all() for w in after)
    assert angle(after[2], before[2]) == pytest.approx(math.atan(0.1), abs=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_huge_gradient_under_sgd_rotates_the_layer_with_float64_sums(implementation: str) -> None:
    # Every implementation accumulates in float64, where the squares of a 1e29 step do not overflow (float32 sums
    # would): the layer turns by the full angle at constant norm, without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before, after = step_with_middle_gradient("sgd", torch.randn(8, 8) * 1e30, implementation)
    for w, w0 in zip(after, before, strict=True):
        assert angle(w, w0) == pytest.approx(math.atan(0.1), abs=1e-5)
        assert float(w.double().norm()) == pytest.approx(float(w0.double().norm()), rel=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_skipped_base_step_leaves_everything_unchanged(implementation: str) -> None:
    model = three_layers()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), implementation=implementation)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # no gradients: SGD skips every parameter
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_skipped_step_under_grad_scaler_leaves_weights_unchanged(implementation: str) -> None:
    model = three_layers()
    opt = ll.Layca(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        model.named_parameters(),
        implementation=implementation,
    )
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


@pytest.mark.filterwarnings("ignore:Layca. the base optimizer's steps for layer")  # bf16/fp16 rounding: expected
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mixed_dtypes_step_correctly_in_one_optimizer(dtype: torch.dtype, implementation: str) -> None:
    torch.manual_seed(0)
    low = nn.Parameter(torch.randn(16, 32).to(dtype))
    high = nn.Parameter(torch.randn(16, 32))
    bias = nn.Parameter(torch.randn(16).to(dtype))
    opt = ll.Layca(
        torch.optim.SGD([low, high, bias], lr=0.1, momentum=0.9),
        [("low", low), ("high", high), ("bias", bias)],
        rotation_rate=0.05,
        implementation=implementation,
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


# ---------------------------------------------------------------------------------------------------------- rounding


def per_step_angles_of_an_unused_layer(
    make_base, steps: int = 30, dtype: torch.dtype = torch.float32, implementation: str = "eager"
) -> tuple[list[float], list[float]]:
    """Train one layer while another gets exact zero gradients; return both layers' angle (radians) at every step."""
    torch.manual_seed(0)
    used = nn.Linear(64, 64)
    unused = nn.Linear(256, 256).to(dtype)
    nn.init.normal_(unused.weight, std=0.05)  # ||w|| = 12.8: rounding noise of w + D far above an absolute 1e-7
    named = [("used.weight", used.weight), ("used.bias", used.bias), ("unused.weight", unused.weight)]
    opt = ll.Layca(make_base([p for _, p in named]), named, rotation_rate=3**-3, implementation=implementation)
    x = torch.randn(32, 64)
    unused.weight.grad = torch.zeros_like(unused.weight)  # as DDP's find_unused_parameters or a masked head leave it
    used_angles, unused_angles = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)  # the unused layer keeps an exact zero gradient
        used(x).square().mean().backward()
        before = [used.weight.detach().clone(), unused.weight.detach().clone()]
        opt.step()
        used_angles.append(angle(used.weight.detach(), before[0]))
        unused_angles.append(angle(unused.weight.detach(), before[1]))
    return used_angles, unused_angles


@pytest.mark.parametrize(
    "make_base",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=5e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
    ],
    ids=["sgd_momentum_wd", "sgd_wd", "adamw"],
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_gradient_under_weight_decay_does_not_turn_the_layer(make_base, implementation: str) -> None:
    # Weight decay alone is a purely radial step: only float32 rounding of w + D has a tangential part, and scaling
    # that up to a full Layca step used to turn the layer by atan(rho) = 2.1 degrees every step.
    used, unused = per_step_angles_of_an_unused_layer(make_base, implementation=implementation)
    assert max(unused) < math.radians(0.01)
    assert used == pytest.approx([math.atan(3**-3)] * len(used), abs=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_gradient_of_a_bfloat16_layer_uses_bfloat16_precision(implementation: str) -> None:
    # A 1 % radial step in bfloat16 leaves rounding noise of about 0.2 % of ||w|| in D: above float32's floor, below
    # bfloat16's, so the layer must be judged by the precision it is stored in.
    _, unused = per_step_angles_of_an_unused_layer(
        lambda p: torch.optim.SGD(p, lr=1.0, weight_decay=0.01),
        steps=5,
        dtype=torch.bfloat16,
        implementation=implementation,
    )
    assert max(unused) == 0.0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_small_base_learning_rate_warns_once_per_run_naming_the_layers(implementation: str) -> None:
    torch.manual_seed(0)
    model = three_layers()
    opt = ll.Layca(
        torch.optim.SGD(model.parameters(), lr=1e-7), model.named_parameters(), implementation=implementation
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(16, 6)).square().mean().backward()
            opt.step()
    messages = [str(w.message) for w in caught if "rounding" in str(w.message)]
    assert len(messages) == 1
    assert "'0.weight', '2.weight', '4.weight'" in messages[0]
    assert "Raise the base optimizer's learning rate" in messages[0]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_annealed_learning_rate_does_not_warn(implementation: str) -> None:
    # At the end of a schedule the base step is tiny, but so is Layca's: rounding stays as small as at the start.
    torch.manual_seed(0)
    model = three_layers()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), implementation=implementation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1e-7 if step > 0 else 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 6)).square().mean().backward()
            opt.step()
            scheduler.step()


# ---------------------------------------------------------------------------------------------------- edge configs


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_huge_effective_rate_turns_a_quarter_turn_without_overflow(implementation: str) -> None:
    # rho = 1e200: rho^2 overflows float64, hypot(1, rho) does not. The layer turns by atan(1e200) = pi/2.
    model = three_layers()
    opt = ll.Layca(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model.named_parameters(),
        rotation_rate=1.0,
        schedule=ll.ByName({"*": 1e200}),
        implementation=implementation,
    )
    model(torch.randn(4, 6)).square().mean().backward()
    before = [p.detach().clone() for p in opt.layers.params]
    opt.step()
    for w, w0, n0 in zip(opt.layers.params, before, opt.initial_norms, strict=True):
        assert torch.isfinite(w).all()
        assert float(w.detach().double().norm()) == pytest.approx(n0, rel=1e-6)
        assert angle(w.detach(), w0) == pytest.approx(math.pi / 2, abs=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_group_without_layers_may_have_zero_learning_rate(implementation: str) -> None:
    model = three_layers()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = ll.Layca(
        torch.optim.SGD([{"params": weights, "lr": 0.1}, {"params": biases, "lr": 0.0}]),
        model.named_parameters(),
        rotation_rate=0.1,
        implementation=implementation,
    )
    model(torch.randn(4, 6)).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert angle(model[0].weight.detach(), before[0]) == pytest.approx(math.atan(0.1), abs=1e-5)
    assert torch.equal(model[0].bias.detach(), before[1])


def test_layer_group_with_zero_learning_rate_is_refused() -> None:
    model = three_layers()
    with pytest.raises(ValueError, match=r"learning rates of the param groups holding layers \(\[0.0\]\)"):
        ll.Layca(torch.optim.SGD(model.parameters(), lr=0.0), model.named_parameters())


def rates_over(opt: ll.Layca, model: nn.Module, scheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(opt.rotation_rates()["0.weight"])
        opt.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        scheduler.step()
    return rates


def test_one_cycle_peaks_at_the_base_rotation_rate() -> None:
    # OneCycleLR starts at max_lr / 25: measured from there, the rate peaked at 25x rotation_rate (43 degrees a step).
    model = three_layers()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), rotation_rate=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=20)
    rates = rates_over(opt, model, scheduler, 20)
    assert max(rates) == pytest.approx(0.1, rel=1e-9)
    assert rates[0] == pytest.approx(0.1 / 25, rel=1e-9)


def test_cyclic_lr_peaks_at_the_base_rate_with_its_max_lr_as_reference() -> None:
    # CyclicLR keeps max_lr on the scheduler, not in the group: the reference is given explicitly (LaycaCallback
    # reads it from the scheduler).
    model = three_layers()
    opt = ll.Layca(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), rotation_rate=0.1, reference_lr=0.4
    )
    scheduler = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.4, step_size_up=5)
    rates = rates_over(opt, model, scheduler, 12)
    assert max(rates) == pytest.approx(0.1, rel=1e-9)
    assert min(rates) == pytest.approx(0.1 * 0.01 / 0.4, rel=1e-9)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mostly_radial_step_below_the_floor_stays_silently_on_every_path(implementation: str) -> None:
    # Weight decay 0.05 with a gradient 1e-9 across w: D is 0.015 ||w|| along -w, its tangential part 3e-10 ||w||,
    # far below float32's floor (4 * 2**-24 * ||w||, about 2.4e-7 ||w||). Every path leaves the layer in place and
    # none warns: weight decay's pull is not a learning rate too small for rounding (the warning's advice).
    torch.manual_seed(0)
    layer = nn.Parameter(torch.randn(4, 6))
    across = torch.randn(4, 6)
    across -= (across * layer.detach()).sum() / layer.detach().square().sum() * layer.detach()
    layer.grad = 1e-9 * across / across.norm() * layer.detach().norm()
    opt = ll.Layca(
        torch.optim.SGD([layer], lr=0.3, weight_decay=0.05),
        [("w", layer)],
        rotation_rate=0.1,
        implementation=implementation,
    )
    before = layer.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(layer.detach(), before)
