"""The fast Layca step equals the float64 per-tensor reference (tests/reference.py) over 20 training steps."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lightning_layca as ll
from lightning_layca.step.eager import rotate_eager
from lightning_layca.step.sgd_form import FORMS
from tests.implementations import IMPLEMENTATIONS, fail_compiling
from tests.reference import ReferenceLayca, depth_decay_multipliers, layca_update

STEPS = 20
RTOL = 1e-5  # relative error of every parameter tensor, float32 fast path vs float64 reference

OPTIMIZERS: dict[str, Callable[[list[dict]], torch.optim.Optimizer]] = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1),
    "sgd_momentum": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=1e-3, momentum=0.5),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),  # every layer a multiple of 4 elements: "compiled" takes them all
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups with different learning rates: the head's lr is half the body's."""
    head = [p for n, p in model.named_parameters() if n.startswith("8.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("8.")]
    return [{"params": body}, {"params": head, "lr_scale": 0.5}]


def scale_head_lr(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if "lr_scale" in group:
            group["lr"] *= group["lr_scale"]


LAYERS = ["0.weight", "3.weight", "6.weight", "8.weight"]
SCHEDULES: dict[str, tuple[ll.RotationSchedule, list[float]]] = {
    "depth_decay_+0.4": (ll.DepthDecay(alpha=0.4), depth_decay_multipliers(0.4, len(LAYERS))),
    "depth_decay_-0.4": (ll.DepthDecay(alpha=-0.4), depth_decay_multipliers(-0.4, len(LAYERS))),
    "by_name": (ll.ByName({"0.*": 2.0, "8.*": 0.25}, default=0.5), [2.0, 0.5, 0.5, 0.25]),
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("schedule_name", list(SCHEDULES))
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_fast_step_matches_float64_reference(optimizer_name: str, schedule_name: str, implementation: str) -> None:
    schedule, multipliers = SCHEDULES[schedule_name]
    model = make_model()
    reference_model = copy.deepcopy(model).double()

    base = OPTIMIZERS[optimizer_name](param_groups(model))
    scale_head_lr(base)
    fast = ll.Layca(
        base, model.named_parameters(), rotation_rate=0.05, schedule=schedule, implementation=implementation
    )
    fast_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(fast, T_max=STEPS)

    reference_base = OPTIMIZERS[optimizer_name](param_groups(reference_model))
    scale_head_lr(reference_base)
    reference_layers = [dict(reference_model.named_parameters())[name] for name in LAYERS]
    reference = ReferenceLayca(reference_base, reference_layers, 0.05, multipliers)
    reference_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(reference_base, T_max=STEPS)
    assert fast.layer_names == LAYERS

    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(8, 3, 8, 8, generator=generator)
        y = torch.randint(0, 5, (8,), generator=generator)
        fast.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
            q.grad = p.grad.double()
        fast.step()
        reference.step()
        fast_scheduler.step()
        reference_scheduler.step()

    for (name, p), q in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        assert relative_error(p.detach(), q.detach()) < RTOL, name
    # The scheduler really moved the rate: the final cosine-annealed lr is near zero.
    assert fast.param_groups[0]["lr"] < 1e-3 * fast.reference_lr


def test_rates_follow_schedule_and_relative_lr() -> None:
    model = make_model()
    base = torch.optim.SGD(param_groups(model), lr=0.2)
    scale_head_lr(base)
    opt = ll.Layca(base, model.named_parameters(), rotation_rate=0.1, schedule=ll.DepthDecay(alpha=0.4))
    # The head's group runs at half the body's learning rate, so it rotates at half the rate.
    expected = [0.1 * m * g for m, g in zip(depth_decay_multipliers(0.4, 4), [1, 1, 1, 0.5], strict=True)]
    opt.step()  # fixes the reference learning rate
    assert list(opt.rotation_rates().values()) == pytest.approx(expected, rel=1e-12)
    for group in base.param_groups:
        group["lr"] *= 0.25
    assert list(opt.rotation_rates().values()) == pytest.approx([0.25 * r for r in expected], rel=1e-12)


# ------------------------------------------------------------------ the precision of the update, per layer
U32 = 2.0**-24


def eager_against_reference(radial: float, tangential: float, rho: float, seed: int) -> tuple[float, float]:
    """One eager step of a float32 layer with a step of the given radial and tangential sizes (relative to ||w||).

    Returns the distance of the result to the float64 reference (:func:`tests.reference.layca_update`) rounded to
    float32, and ``u * n0``.
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 40, generator=gen)
    direction = torch.randn(96, 40, generator=gen).double()
    w64 = w.double()
    direction -= (direction * w64).sum() / (w64 * w64).sum() * w64  # orthogonal to w
    step = radial * w64 + tangential * w64.norm() * direction / direction.norm()
    p = (w64 + step).float()
    n0 = float(w64.norm())
    expected = layca_update(w, p, rho, n0).float().view_as(w)
    f64 = {"dtype": torch.float64}
    rotate_eager([p], [w], torch.tensor([rho], **f64), torch.ones(1, **f64), torch.tensor([n0], **f64))
    return float((p.double() - expected.double()).norm()), U32 * n0


@pytest.mark.parametrize("seed", range(4))
def test_eager_update_of_a_tangential_step_is_within_a_few_float32_roundings_of_the_reference(seed: int) -> None:
    # Typical steps: mostly tangential, rho well below 1. The update may be formed in float32 in place
    # (step.rule.single_precision_suffices): at most 5 roundings of n0, plus the reference's own rounding.
    for radial, tangential, rho in ((0.0, 1e-2, 0.05), (-1e-3, 1e-3, 0.2), (-5e-4, 1e-2, 0.9)):
        error, ulp = eager_against_reference(radial, tangential, rho, seed)
        assert error <= 6 * ulp, (radial, tangential, rho, error / ulp)


@pytest.mark.parametrize("seed", range(4))
def test_eager_update_of_a_mostly_radial_step_scaled_up_keeps_float64_precision(seed: int) -> None:
    # ||D|| about 500 times ||D_perp||, rho 0.5: k2 * D and k1 * w cancel by a factor of about 250, so a float32 update
    # would be off by hundreds of roundings. The eager update forms it in float64 and rounds it once.
    error, ulp = eager_against_reference(-5e-2, 1e-4, 0.5, seed)
    assert error <= 2 * ulp, error / ulp


def layca_against_reference(
    radial: float, tangential: float, rho: float, seed: int, implementation: str, sgd_form: str | None = None
) -> tuple[float, float, str]:
    """As :func:`eager_against_reference`, through ``Layca`` around SGD (lr 1): the path the implementation takes.

    Returns the distance to the float64 reference rounded to float32, ``u * n0`` and the layer's path. The reference
    is formed from the step the path sees: ``fl(w + D)`` after SGD's own step, ``D`` itself where the kernel takes
    SGD's step. ``sgd_form`` pins the form of SGD's compiled step (the machine's measured one without it).
    """
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 40, generator=gen)
    direction = torch.randn(96, 40, generator=gen).double()
    w64 = w.double()
    direction -= (direction * w64).sum() / (w64 * w64).sum() * w64
    grad = -(radial * w64 + tangential * w64.norm() * direction / direction.norm()).float()
    layer = nn.Parameter(w.clone())
    opt = ll.Layca(torch.optim.SGD([layer], lr=1.0), [("w", layer)], rotation_rate=rho, implementation=implementation)
    if sgd_form is not None:
        opt.plan.sgd_forms.load({"cpu/float32": sgd_form})
    layer.grad = grad.clone()
    opt.step()
    path = opt.describe()["w"]
    after_base = w64 - grad.double() if path == "compiled+base" else (w - grad).double()
    expected = layca_update(w, after_base, rho, float(w64.norm())).float().view_as(w)
    return float((layer.detach().double() - expected.double()).norm()), U32 * float(w64.norm()), path


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_path_updates_a_tangential_step_within_a_few_float32_roundings(implementation: str) -> None:
    for seed in range(2):
        for radial, tangential, rho in ((0.0, 1e-2, 0.05), (-1e-3, 1e-3, 0.2), (-5e-4, 1e-2, 0.9)):
            error, ulp, _ = layca_against_reference(radial, tangential, rho, seed, implementation)
            assert error <= 6 * ulp, (radial, tangential, rho, error / ulp)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_every_path_keeps_float64_precision_for_a_mostly_radial_step_scaled_up(implementation: str) -> None:
    # The cancellation of test_eager_update_of_a_mostly_radial_step_scaled_up_keeps_float64_precision, on every path:
    # a float32 update would be off by hundreds of roundings; each path forms this one in float64.
    for seed in range(2):
        error, ulp, path = layca_against_reference(-5e-2, 1e-4, 0.5, seed, implementation)
        assert path == {"eager": "eager"}.get(implementation, path)
        assert error <= 2 * ulp, (path, error / ulp)


@pytest.mark.parametrize("sgd_form", FORMS)
def test_both_forms_of_sgds_compiled_step_keep_float64_precision_for_a_mostly_radial_step(sgd_form: str) -> None:
    # Per layer SGD's compiled step takes one call or two halves (lightning_layca.step.sgd_form), each forming this
    # update in float64 after its single-precision kernel declined it; and a tangential step within a few roundings.
    for seed in range(2):
        error, ulp, path = layca_against_reference(-5e-2, 1e-4, 0.5, seed, "compiled", sgd_form)
        assert path == "compiled+base"
        assert error <= 2 * ulp, (sgd_form, error / ulp)
        error, ulp, _ = layca_against_reference(-5e-4, 1e-2, 0.9, seed, "compiled", sgd_form)
        assert error <= 6 * ulp, (sgd_form, error / ulp)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS[1:])
def test_the_float64_update_is_formed_uncompiled_when_its_kernel_fails_to_compile(
    implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The update halves (which form the float64 update) fail to compile; the kernels before them compiled.
    fail_compiling(monkeypatch, "no compiler for the update half", lambda name: name.endswith("update"))
    with pytest.warns(UserWarning, match="no compiler for the update half"):
        error, ulp, path = layca_against_reference(-5e-2, 1e-4, 0.5, 0, implementation)
    assert path.startswith("compiled")
    assert error <= 2 * ulp, error / ulp
