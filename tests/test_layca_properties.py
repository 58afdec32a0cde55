"""Invariants of a Layca step, checked with hypothesis over random shapes, rates and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lightning_layca as ll
from tests.implementations import IMPLEMENTATIONS

# The properties hold for every gradient scale drawn, the tiny ones too, about which Layca warns (steps near float32's
# rounding floor).
pytestmark = pytest.mark.filterwarnings("ignore:Layca. the base optimizer's steps .* within 100x:UserWarning")

shapes = st.lists(st.integers(1, 9), min_size=2, max_size=4).filter(lambda s: math.prod(s) >= 2)
rates = st.floats(1e-4, 2.0)
# Base steps from ~3e-5 ||w|| up: well above float32's rounding floor (about 4 * 2**-24 * ||w||), below which a layer
# does not move at all (tests/test_layca_robustness.py).
scales = st.floats(1e-4, 1e6)


def angle(u: torch.Tensor, v: torch.Tensor) -> float:
    """Angle between two vectors, computed robustly in float64 (atan2 of the sine and cosine parts)."""
    u, v = u.double().flatten(), v.double().flatten()
    unit = v / torch.linalg.vector_norm(v)
    along = torch.dot(u, unit)
    across = torch.linalg.vector_norm(u - along * unit)
    return math.atan2(float(across), float(along))


def layer_shape(shape: list[int], implementation: str) -> list[int]:
    """The drawn shape, or for a compiled step the shape with its last dimension times 4.

    The compiled kernels take a layer whose size is a multiple of 4 (its lane view, ``compiling.kernel_view``); any
    other takes the eager step, which the eager runs test (and ``tests/test_layca_compiled.py`` checks that such a
    layer takes it). Scaled so, every compiled run steps its layer with a kernel (:func:`one_step` checks it).
    """
    return shape if implementation == "eager" else [*shape[:-1], 4 * shape[-1]]


def one_step(
    shape: list[int],
    rho: float,
    grad_scale: float,
    seed: int,
    momentum: float = 0.0,
    decay: float = 0.0,
    implementation: str = "eager",
):
    shape = layer_shape(shape, implementation)
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Parameter(torch.randn(shape, generator=generator))
    bias = torch.nn.Parameter(torch.randn(shape[0], generator=generator))
    twin_bias = torch.nn.Parameter(bias.detach().clone())
    base = torch.optim.SGD([layer, bias], lr=0.3, momentum=momentum, weight_decay=decay)
    opt = ll.Layca(base, [("layer", layer), ("bias", bias)], rotation_rate=rho, implementation=implementation)
    twin = torch.optim.SGD([twin_bias], lr=0.3, momentum=momentum, weight_decay=decay)
    before = layer.detach().double().clone()
    layer.grad = torch.randn(shape, generator=generator) * grad_scale
    bias.grad = torch.randn(shape[0], generator=generator)
    twin_bias.grad = bias.grad.clone()
    opt.step()
    twin.step()
    # A compiled run stepped its layer with a kernel, an eager run without one.
    assert (opt.describe()["layer"] == "eager") == (implementation == "eager"), opt.describe()
    return before, layer.detach().double(), bias.detach(), twin_bias.detach()


def tangential_step_clears_the_floor(
    shape: list[int], grad_scale: float, seed: int, implementation: str, decay: float = 0.0
) -> bool:
    """Whether the first step of :func:`one_step` has a part orthogonal to ``w`` 10x above float32's rounding floor.

    The gradient is drawn as :func:`one_step` draws it. A random gradient can point almost along ``w`` (likelier in a
    layer of two weights), and a step whose orthogonal part is below the floor does not move the layer at all: that
    case is tested in tests/test_layca_robustness.py, not here.
    """
    shape = layer_shape(shape, implementation)
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator).double().flatten()
    torch.randn(shape[0], generator=generator)  # the bias
    grad = (torch.randn(shape, generator=generator) * grad_scale).double().flatten()
    step = -0.3 * (grad + decay * w)  # SGD's first step, lr 0.3
    tangential = (step - (step @ w) / (w @ w) * w).norm()
    return bool(tangential > 10 * 4 * 2**-24 * (w.norm() + step.norm()))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=60, deadline=None)
@given(shape=shapes, rho=rates, grad_scale=scales, seed=st.integers(0, 2**16))
def test_norm_preserved(implementation: str, shape: list[int], rho: float, grad_scale: float, seed: int) -> None:
    before, after, _, _ = one_step(shape, rho, grad_scale, seed, implementation=implementation)
    n0, n1 = float(torch.linalg.vector_norm(before)), float(torch.linalg.vector_norm(after))
    assert abs(n1 - n0) <= 1e-6 * n0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=60, deadline=None)
@given(shape=shapes, rho=rates, grad_scale=scales, seed=st.integers(0, 2**16))
def test_each_step_rotates_by_atan_rho(
    implementation: str, shape: list[int], rho: float, grad_scale: float, seed: int
) -> None:
    before, after, _, _ = one_step(shape, rho, grad_scale, seed, implementation=implementation)
    assume(tangential_step_clears_the_floor(shape, grad_scale, seed, implementation))
    assert abs(angle(after, before) - math.atan(rho)) <= 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=60, deadline=None)
@given(shape=shapes, rho=rates, grad_scale=scales, seed=st.integers(0, 2**16))
def test_step_before_reprojection_is_orthogonal_with_norm_rho_w(
    implementation: str, shape: list[int], rho: float, grad_scale: float, seed: int
) -> None:
    before, after, _, _ = one_step(shape, rho, grad_scale, seed, implementation=implementation)
    norm = torch.linalg.vector_norm(before)
    # Undo the re-projection: before it, the weights had norm ||w|| * sqrt(1 + rho^2).
    moved = after * (math.sqrt(1 + rho * rho) * norm / torch.linalg.vector_norm(after))
    step = (moved - before).flatten()
    # Weights are float32: their rounding (~6e-8 * ||w||) bounds what can be resolved, so tolerances are in ||w||.
    radial = float(torch.dot(step, before.flatten()) / norm)
    assert abs(radial) <= 1e-6 * float(norm)
    assert abs(float(torch.linalg.vector_norm(step)) - rho * float(norm)) <= 1e-6 * float(norm)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=30, deadline=None)
@given(shape=shapes, rho=rates, seed=st.integers(0, 2**16), momentum=st.sampled_from([0.0, 0.9]))
def test_non_layer_parameters_match_the_base_optimizer_alone(
    implementation: str, shape: list[int], rho: float, seed: int, momentum: float
) -> None:
    _, _, bias, twin_bias = one_step(shape, rho, 1.0, seed, momentum, decay=1e-2, implementation=implementation)
    assert torch.equal(bias, twin_bias)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=40, deadline=None)
@given(shape=shapes, rho=rates, grad_scale=st.floats(1e-2, 1e2), seed=st.integers(0, 2**16))
def test_weight_decay_dominated_step_keeps_norm_and_angle(
    implementation: str, shape: list[int], rho: float, grad_scale: float, seed: int
) -> None:
    # weight decay 0.05 makes the step mostly radial (||D|| up to ~10x ||D_perp||); Layca projects the radial part out.
    before, after, _, _ = one_step(shape, rho, grad_scale, seed, decay=0.05, implementation=implementation)
    n0, n1 = float(torch.linalg.vector_norm(before)), float(torch.linalg.vector_norm(after))
    assert abs(n1 - n0) <= 1e-6 * n0
    assume(tangential_step_clears_the_floor(shape, grad_scale, seed, implementation, decay=0.05))
    assert abs(angle(after, before) - math.atan(rho)) <= 1e-5


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=30, deadline=None)
@given(shape=shapes, rho=rates, grad_scale=st.floats(1e-4, 1e-3), seed=st.integers(0, 2**16))
def test_almost_purely_radial_step_keeps_norm_and_angle(
    implementation: str, shape: list[int], rho: float, grad_scale: float, seed: int
) -> None:
    # Weight decay 0.05 with gradients of 1e-4 to 1e-3: ||D|| is up to about 1000x ||D_perp||, where forming
    # ||D||^2 - <D, w>^2 / ||w||^2 in float32 would leave nothing of the tangential part.
    before, after, _, _ = one_step(shape, rho, grad_scale, seed, decay=0.05, implementation=implementation)
    n0, n1 = float(torch.linalg.vector_norm(before)), float(torch.linalg.vector_norm(after))
    assert abs(n1 - n0) <= 1e-6 * n0
    assume(tangential_step_clears_the_floor(shape, grad_scale, seed, implementation, decay=0.05))
    assert abs(angle(after, before) - math.atan(rho)) <= 1e-5


@settings(max_examples=30, deadline=None)
@given(alpha=st.floats(-0.99, 0.99), n_layers=st.integers(1, 30))
def test_depth_decay_is_monotone_and_ends_at_one(alpha: float, n_layers: int) -> None:
    m = ll.DepthDecay(alpha).multipliers([f"l{i}" for i in range(n_layers)], step=0, epoch=0)
    assert len(m) == n_layers
    assert all(0 < x <= 1 for x in m)
    if alpha > 0:
        assert m[-1] == 1.0 and m == sorted(m)
    else:
        assert m[0] == 1.0 and m == sorted(m, reverse=True)
