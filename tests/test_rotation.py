"""Specification of the rotation measurements: per-layer cosine distances, per-unit angles, device-side histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks._allocations import LiveTensorBytes
from lightning_layca.compiling import kernel_view
from lightning_layca.rotation import (
    RotationMeter,
    angle_histograms,
    cosine_distances,
    unit_angles,
    update_ratios_from_sums,
)
from lightning_layca.sums import float64_sums, matrix_sums


def reference_distance(w: torch.Tensor, w0: torch.Tensor) -> float:
    a, b = w.double().flatten(), w0.double().flatten()
    return float(1.0 - a.dot(b) / (a.norm() * b.norm()))


def rotate_rows(w0: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each row of ``w0`` by its angle, in the plane of the row and a direction orthogonal to it."""
    rows = w0.double()
    other = torch.randn_like(rows)
    other -= (other * rows).sum(1, keepdim=True) / (rows * rows).sum(1, keepdim=True) * rows
    other *= rows.norm(dim=1, keepdim=True) / other.norm(dim=1, keepdim=True)
    theta = torch.deg2rad(degrees.double()).unsqueeze(1)
    return rows * torch.cos(theta) + other * torch.sin(theta)


def test_a_layers_lane_view_holds_its_memory_in_four_runs_and_gives_its_sums() -> None:
    g = torch.Generator().manual_seed(0)
    layer = torch.randn(24, 5, 3, 3, generator=g).to(memory_format=torch.channels_last)
    snapshot = (layer + 0.1 * torch.randn(layer.shape, generator=g)).to(memory_format=torch.channels_last)
    view, other = kernel_view(layer), kernel_view(snapshot)
    assert view is not None and other is not None and view.shape == (4, 270)
    assert view.data_ptr() == layer.data_ptr() and view.is_contiguous()  # memory order, no copy
    # The four runs side by side, and over memory order: the dense float64 inner products (exact products of float32
    # numbers; only the order of the additions differs).
    u, y = layer.double().flatten(), snapshot.double().flatten()
    expected = torch.tensor([[float(u @ y)], [float(y @ y)], [float(u @ u)]], dtype=torch.float64)
    for lanes in (True, False):
        got = matrix_sums(view.double(), other.double(), lanes=lanes)
        assert torch.allclose(got, expected, rtol=1e-14, atol=0)
    # A layer whose size is not a multiple of 4 has no lane view.
    assert kernel_view(torch.zeros(3, 5)) is None and kernel_view(torch.zeros(2, 2)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_distances_match_float64_reference_for_mixed_shapes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 3, 3, 3), (64, 128), (10, 64), (5, 7, 2)]
    w0 = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    w = [x + 0.3 * torch.randn(x.shape, generator=g, dtype=dtype) for x in w0]
    d = cosine_distances(w, w0)
    assert d.dtype == torch.float64 and d.shape == (len(shapes),)
    expected = [reference_distance(a, b) for a, b in zip(w, w0, strict=True)]
    tolerance = 1e-12  # float64 sums: the products of float32 numbers are exact
    assert d.tolist() == pytest.approx(expected, abs=tolerance)


def test_a_meter_measures_every_logging_step_against_a_float64_reference() -> None:
    # From the second measure on the meter reuses the snapshot's <w0, w0>: the distances must stay those of a float64
    # computation from scratch as the weights move, for layers larger than one block of the sums (2**18 elements).
    g = torch.Generator().manual_seed(3)
    shapes = [(600, 512), (64, 3, 3, 3), (10, 20)]
    w0 = [torch.randn(s, generator=g) for s in shapes]
    layers = [x.clone() for x in w0]
    meter = RotationMeter(layers, w0)
    for scale in (0.0, 1e-4, 0.3):
        for w in layers:
            w.add_(torch.randn(w.shape, generator=g), alpha=scale)  # in place, as an optimizer steps
        expected = [reference_distance(w, x) for w, x in zip(layers, w0, strict=True)]
        assert meter.measure(distances=True).distances == pytest.approx(expected, abs=1e-12)


def test_known_squares_of_y_give_the_same_sums() -> None:
    g = torch.Generator().manual_seed(4)
    ys = [torch.randn(s, generator=g) for s in [(300, 1000), (7, 5)]]
    xs = [y + torch.randn(y.shape, generator=g) for y in ys]
    full = float64_sums(xs, ys)
    assert torch.equal(float64_sums(xs, ys, y_squares=full[:, 1].clone()), full)
    with pytest.raises(ValueError, match="y_squares"):
        float64_sums(xs, ys, per_unit=True, y_squares=full[:, 1])


def test_cosine_distances_of_bfloat16_layers_are_summed_in_float64() -> None:
    g = torch.Generator().manual_seed(1)
    w0 = [torch.randn(256, 256, generator=g).bfloat16(), torch.randn(300, generator=g).reshape(30, 10).bfloat16()]
    w = [(x.float() + 0.1 * torch.randn(x.shape, generator=g)).bfloat16() for x in w0]
    d = cosine_distances(w, w0)
    assert d.dtype == torch.float64
    # Inputs are exactly representable in float64, so only float64 accumulation error remains.
    assert d.tolist() == pytest.approx([reference_distance(a, b) for a, b in zip(w, w0, strict=True)], abs=1e-12)


def test_cosine_distances_of_identical_orthogonal_and_opposite_weights() -> None:
    w0 = [torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, -1.0]])]
    w = [w0[0].clone(), torch.tensor([[0.0, 5.0]]), -w0[2]]
    assert cosine_distances(w, w0).tolist() == pytest.approx([0.0, 1.0, 2.0], abs=1e-7)


def test_cosine_distances_reject_mismatched_layers() -> None:
    with pytest.raises(ValueError, match=r"layer #0 has weights \(2, 3\)"):
        cosine_distances([torch.zeros(2, 3)], [torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="2 weight tensors but 1 initial"):
        cosine_distances([torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)])


def test_unit_angles_recover_known_per_row_rotations_in_degrees() -> None:
    torch.manual_seed(3)
    w0 = torch.randn(6, 20)
    degrees = torch.tensor([0.0, 0.5, 10.0, 45.0, 90.0, 170.0])
    w = rotate_rows(w0, degrees).float()
    assert unit_angles(w, w0).tolist() == pytest.approx(degrees.tolist(), abs=2e-4)


def test_unit_angles_resolve_tiny_rotations() -> None:
    torch.manual_seed(4)
    w0 = torch.randn(4, 512)
    degrees = torch.full((4,), 0.01)
    w = rotate_rows(w0, degrees).float()
    assert unit_angles(w, w0).tolist() == pytest.approx(degrees.tolist(), rel=0.05)


def test_unit_angles_count_one_angle_per_output_unit_of_a_convolution() -> None:
    torch.manual_seed(5)
    w0 = torch.randn(16, 3, 3, 3)
    w = w0 + 0.1 * torch.randn_like(w0)
    angles = unit_angles(w, w0)
    assert angles.shape == (16,)
    rows, rows0 = w.reshape(16, -1).double(), w0.reshape(16, -1).double()
    cos = (rows * rows0).sum(1) / (rows.norm(dim=1) * rows0.norm(dim=1))
    assert angles.tolist() == pytest.approx(torch.rad2deg(torch.acos(cos)).tolist(), abs=1e-3)


def test_unit_angles_of_zero_rows_are_zero() -> None:
    w0 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert unit_angles(w, w0).tolist() == [0.0, 0.0]


def test_angle_histograms_match_numpy_histogram_and_count_every_value() -> None:
    g = torch.Generator().manual_seed(6)
    values = [torch.rand(1000, generator=g) * 30, torch.rand(7, generator=g) * 3 + 1]
    hists = angle_histograms(values, bins=12)
    for v, h in zip(values, hists, strict=True):
        counts, edges = np.histogram(v.double().numpy(), bins=12, range=(h.min, h.max))
        assert h.num == v.numel() and sum(h.bucket_counts) == v.numel()
        assert h.bucket_counts == counts.tolist()
        assert h.bucket_limits == pytest.approx(edges[1:].tolist(), rel=1e-12)
        assert h.min == pytest.approx(float(v.min())) and h.max == pytest.approx(float(v.max()))
        assert h.sum == pytest.approx(float(v.double().sum()), rel=1e-6)
        assert h.sum_squares == pytest.approx(float(v.double().square().sum()), rel=1e-6)


def test_angle_histogram_of_equal_values_puts_them_in_one_bin() -> None:
    (h,) = angle_histograms([torch.zeros(5)], bins=4)
    assert h.min == 0.0 and h.max == 0.0
    assert all(math.isfinite(x) and x > 0 for x in h.bucket_limits) and h.bucket_limits == sorted(h.bucket_limits)
    assert sum(h.bucket_counts) == 5 and max(h.bucket_counts) == 5


@pytest.mark.parametrize("bins", [0, -3, 2.5, True])
def test_angle_histograms_reject_bad_bin_counts(bins: object) -> None:
    with pytest.raises(ValueError, match=f"`bins` must be a positive integer, got {bins!r}"):
        angle_histograms([torch.zeros(3)], bins=bins)  # type: ignore[arg-type]


def test_unit_angles_of_rows_holding_inf_or_nan_are_nan_and_the_other_rows_are_measured() -> None:
    w0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    w = torch.tensor([[float("inf"), 0.0], [float("nan"), 1.0], [1.0, 1.0], [float("-inf"), 0.0]])
    angles = unit_angles(w, w0)
    assert [math.isnan(a) for a in angles.tolist()] == [True, True, False, True]
    assert angles[2].item() == pytest.approx(45.0, abs=1e-5)


def test_cosine_distance_of_a_layer_holding_inf_or_nan_is_nan_and_the_others_are_measured() -> None:
    w0 = [torch.ones(2, 2), torch.ones(2, 2), torch.ones(2, 2)]
    w = [torch.tensor([[float("inf"), 1.0], [1.0, 1.0]]), torch.tensor([[float("nan"), 1.0], [1.0, 1.0]]), -w0[2]]
    d = cosine_distances(w, w0).tolist()
    assert math.isnan(d[0]) and math.isnan(d[1])
    assert d[2] == pytest.approx(2.0, abs=1e-7)


def test_cosine_distance_of_a_finite_layer_whose_float32_norm_overflows_is_measured_exactly() -> None:
    # ||w|| overflows float32 though every weight is finite: float32 sums would read 1 - <w, w0> / inf = 1 (or NaN);
    # the float64 sums give the true distance, 1 - 1/sqrt(2).
    w0 = [torch.tensor([[1.0, 0.0]])]
    w = [torch.tensor([[3e38, 3e38]])]
    assert cosine_distances(w, w0).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-12)


def test_angle_histograms_refuse_non_finite_values_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"angle_histograms: tensor #1 holds non-finite values"):
        angle_histograms([torch.zeros(3), torch.tensor([1.0, float("nan")])])


def test_unit_angles_temporaries_are_bounded_whatever_the_layer_size() -> None:
    # The epoch-end histograms must not cost a multiple of the largest layer: rows are processed in blocks of about
    # 2**20 elements (4 MiB in float32). Measured: 8.0 MiB for this 32 MiB layer (64 MiB when the whole layer was
    # processed at once).
    g = torch.Generator().manual_seed(7)
    w0 = torch.randn(4096, 2048, generator=g)
    w = w0 + 0.1 * torch.randn(w0.shape, generator=g)
    tracker = LiveTensorBytes()
    with tracker:
        angles = unit_angles(w, w0)
    assert tracker.peak <= 3 * 4 * 2**20
    rows, rows0 = w.double(), w0.double()
    cos = (rows * rows0).sum(1) / (rows.norm(dim=1) * rows0.norm(dim=1))
    assert angles.tolist() == pytest.approx(torch.rad2deg(torch.acos(cos)).tolist(), abs=1e-3)


@pytest.mark.parametrize("radial_scale", [0.0, 1e-4, 1.0, -0.3])
def test_update_ratio_splits_exactly_into_tangential_and_radial_parts(radial_scale: float) -> None:
    g = torch.Generator().manual_seed(3)
    before = [torch.randn(64, 32, generator=g), torch.randn(8, 3, 3, 3, generator=g)]
    # A step with a chosen share along the weights: from orthogonal (0) to mostly radial (1, -0.3).
    steps = [1e-3 * torch.randn(w.shape, generator=g) + radial_scale * 1e-3 * w for w in before]
    after = [w + d for w, d in zip(before, steps, strict=True)]
    total, tangential, radial = update_ratios_from_sums(float64_sums(after, before, difference=True))
    for k, (w, w_after) in enumerate(zip(before, after, strict=True)):
        # Independent reference in float64: project the step actually taken (rounded in float32) on the weights.
        w64, d64 = w.double().flatten(), (w_after.double() - w.double()).flatten()
        along = torch.dot(d64, w64) / torch.dot(w64, w64) * w64
        expected = [float((x.norm() / w64.norm()).log10()) for x in (d64, d64 - along, along)]
        got = [float(total[k]), float(tangential[k]), float(radial[k])]
        if radial_scale == 0.0:
            assert got[:2] == pytest.approx(expected[:2], abs=1e-9)
            assert got[2] < got[0] - 1  # a random step is nearly orthogonal to 64 * 32 weights
        else:
            assert got == pytest.approx(expected, abs=1e-9)
        assert 10 ** (2 * got[1]) + 10 ** (2 * got[2]) == pytest.approx(10 ** (2 * got[0]), rel=1e-12)
