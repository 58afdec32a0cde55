"""Layer rotation, measured: cosine distances to the initial weights, per-unit angles, the angle of one step.

Pure torch, no Lightning: the monitoring callbacks call this module on logging steps only. Every measurement is a
function of the float64 sums of :mod:`lightning_layca.sums` (the sums the Layca step uses), combined across processes
by the seam (:func:`lightning_layca.distributed.full_sums`, the identity without sharding), so full tensors and
sharded ones are measured by the same code:

* ``d_l = 1 - <w_l, w0_l> / (||w_l|| * ||w0_l||)`` (:func:`cosine_distances`, :func:`distances_from_sums`);
* the angle in degrees between each output unit's current and initial weights (:func:`unit_angles`,
  :func:`angles_from_sums`);
* how far one step turned each layer, as ``tan`` of the angle, and its norm after it (:func:`step_rotation`,
  :func:`step_rotation_from_sums`);
* the update-to-data ratio of one step, ``log10 ||dW|| / ||W||``, and its exact split into a tangential and a radial
  part (:func:`update_ratios_from_sums`), from the same sums as the step's angle;
* :class:`RotationMeter`: everything one logging step needs, for a list of layers and their initial snapshot, with
  one host transfer and, under sharding, ONE ``all_reduce``;
* :func:`angle_histograms` bins angles on the device; only bin counts and a few numbers cross to the host.

Example:
    >>> w0 = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    >>> w = [torch.tensor([[1.0, 1.0], [0.0, 1.0]])]
    >>> [round(d, 4) for d in cosine_distances(w, w0).tolist()]
    [0.1835]
    >>> unit_angles(w[0], w0[0]).tolist()
    [45.0, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lightning_layca.argument_types import check_positive_int
from lightning_layca.distributed import (
    ShardLayout,
    full_sums,
    gather_full,
    local_shard,
    reduce_sums,
    shard_layout,
)
from lightning_layca.sums import float64_sums

__all__ = [
    "AngleHistogram",
    "Measured",
    "PairSums",
    "RotationMeter",
    "angle_histograms",
    "angles_from_sums",
    "cosine_distances",
    "distances_from_sums",
    "step_rotation",
    "step_rotation_from_sums",
    "unit_angles",
    "update_ratios_from_sums",
]


def distances_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """Cosine distances ``1 - <w, w0> / (||w|| ||w0||)`` from the sums ``float64_sums(w, w0)``.

    NaN where a norm is zero or a sum is not finite.

    Example:
        >>> distances_from_sums(torch.tensor([[0.0, 1.0, 4.0]], dtype=torch.float64)).tolist()
        [1.0]
    """
    dot, initial_sq, weight_sq = sums.unbind(-1)
    norms = (weight_sq * initial_sq).sqrt()
    measurable = torch.isfinite(sums).all(-1) & (norms > 0) & torch.isfinite(norms)
    return torch.where(measurable, 1.0 - dot / torch.where(measurable, norms, 1.0), torch.nan)


def angles_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between current and initial weights from the per-unit sums ``float64_sums(w, w0)``.

    ``atan2(||w_perp|| * ||w0||, <w, w0>)`` with ``||w_perp||^2 = <w, w> - <w, w0>^2 / <w0, w0>``, accurate for small
    angles where ``acos`` of a cosine close to 1 is not: 0 for a unit whose current or initial weights are all zero,
    NaN for one with non-finite sums.

    Example:
        >>> angles_from_sums(torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 2.0]], dtype=torch.float64)).tolist()
        [90.0, 45.0]
    """
    dot, initial_sq, weight_sq = sums.unbind(-1)
    safe_sq0 = torch.where(initial_sq > 0, initial_sq, 1.0)
    perpendicular_sq = (weight_sq - dot.square() / safe_sq0).clamp_min(0.0)
    angles = torch.rad2deg(torch.atan2(perpendicular_sq.sqrt() * safe_sq0.sqrt(), dot))
    defined = (initial_sq > 0) & (weight_sq > 0)
    return torch.where(torch.isfinite(sums).all(-1), torch.where(defined, angles, 0.0), torch.nan)


def step_rotation_from_sums(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tan`` of the angle a step turned each layer (unit), and its norm after it, from ``(a, b, c)`` of the step.

    With ``a = <D, w_before>``, ``b = ||w_before||^2``, ``c = ||D||^2`` (``float64_sums(w, w_before,
    difference=True)``): ``tan = sqrt(c - a^2 / b) * sqrt(b) / (b + a)``, the tangential part of the step over the
    radial part of the new weights, and the norm ``sqrt(b + 2 a + c)``. This is the unit of Layca's rate ``rho``:
    under Layca it equals the rate the step used.

    Example:
        >>> # from (1, 0) to (1, 1)
        >>> tan, norm = step_rotation_from_sums(torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64))
        >>> tan.tolist(), [round(x, 6) for x in norm.tolist()]
        ([1.0], [1.414214])
    """
    a, b, c = sums.unbind(-1)
    tangential = (c - a.square() / b).clamp_min(0.0).sqrt()
    return tangential * b.sqrt() / (b + a), (b + 2 * a + c).clamp_min(0.0).sqrt()


def update_ratios_from_sums(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log10 of the update-to-data ratio of a step, total, tangential and radial, from ``(a, b, c)`` of the step.

    With ``a = <D, w>``, ``b = ||w||^2``, ``c = ||D||^2`` (``w`` the weights before the step, ``D`` the step; the sums
    :func:`step_rotation_from_sums` takes), the step splits into its part along ``w``, of norm ``|a| / sqrt(b)``, and
    its part orthogonal to ``w``, of norm ``sqrt(c - a^2 / b)``; their squares add up to ``c`` exactly. Divided by
    ``||w|| = sqrt(b)``:

    * total ``r = sqrt(c / b)``, radial ``r_rad = |a| / b``, tangential ``r_tan = sqrt(c / b - a^2 / b^2)``, so
      ``r_tan^2 + r_rad^2 = r^2`` (up to the rounding of float64);
    * the tangential part and the step's angle ``theta`` (:func:`step_rotation_from_sums`) are related by
      ``r_tan = tan(theta) * (1 + a / b)``: ``r_tan = sin(theta)`` for a step that keeps the norm (Layca), and
      ``r_tan ~ tan(theta)`` for any step small against the weights.

    Returned as log10 (``-inf`` for a part that is exactly zero, NaN where ``b`` is 0 or a sum is not finite).

    Example:
        >>> # from (1, 0) to (1.001, 0.001): a tangential and a radial part of 1e-3 each
        >>> total, tangential, radial = update_ratios_from_sums(torch.tensor([[1e-3, 1.0, 2e-6]], dtype=torch.float64))
        >>> [round(x, 4) for x in (total.item(), tangential.item(), radial.item())]
        [-2.8495, -3.0, -3.0]
    """
    a, b, c = sums.unbind(-1)
    valid = torch.isfinite(sums).all(-1) & (b > 0)
    safe_b = torch.where(valid, b, 1.0)
    total_sq = c / safe_b
    radial = a.abs() / safe_b
    tangential_sq = (total_sq - radial.square()).clamp_min(0.0)
    # log10 of a square root as half the log10 of the square: no rounding of the root in between.
    total, tangential = 0.5 * total_sq.log10(), 0.5 * tangential_sq.log10()
    return (
        torch.where(valid, total, torch.nan),
        torch.where(valid, tangential, torch.nan),
        torch.where(valid, radial.log10(), torch.nan),
    )


def cosine_distances(weights: Sequence[torch.Tensor], initial: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return the cosine distance of every layer to its initial weights (float64, on the first layer's device).

    Args:
        weights: The current weights, one tensor per layer (any shape; each is seen as one vector).
        initial: The initial weights, same shapes, devices and dtypes as ``weights``.

    Returns:
        One distance per layer; ``nan`` for a layer whose current or initial weights are all zero or not finite.

    Example:
        >>> cosine_distances([torch.tensor([0.0, 2.0])], [torch.tensor([1.0, 0.0])]).tolist()
        [1.0]
    """
    if len(weights) != len(initial):
        raise ValueError(f"cosine_distances: got {len(weights)} weight tensors but {len(initial)} initial tensors.")
    for i, (w, w0) in enumerate(zip(weights, initial, strict=True)):
        if w.shape != w0.shape or w.device != w0.device or w.dtype != w0.dtype:
            raise ValueError(
                f"cosine_distances: layer #{i} has weights {tuple(w.shape)} {w.dtype} on {w.device} but initial "
                f"weights {tuple(w0.shape)} {w0.dtype} on {w0.device}; they must match."
            )
    if not weights:
        return torch.zeros(0, dtype=torch.float64)
    return distances_from_sums(float64_sums(weights, initial))


def unit_angles(weights: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Return the angle in degrees between each output unit's current and initial weights (float64).

    A unit is one row of the weight tensor seen as ``(out_features, -1)`` (one output neuron, or one convolution
    filter); see :func:`angles_from_sums`. The sums are taken in blocks, so temporaries stay a few MiB whatever the
    size of the layer.

    Example:
        >>> unit_angles(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])).tolist()
        [90.0]
    """
    return angles_from_sums(float64_sums([weights], [initial], per_unit=True))


def step_rotation(
    weights: Sequence[torch.Tensor], before: Sequence[torch.Tensor], units: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return how far each layer (unit) turned in one step, as ``tan`` of the angle, and its norm after it.

    See :func:`step_rotation_from_sums`; ``units`` measures every output unit (rows of all layers concatenated).

    Example:
        >>> tan, norm = step_rotation([torch.tensor([[1.0, 1.0]])], [torch.tensor([[1.0, 0.0]])])
        >>> tan.tolist(), [round(x, 6) for x in norm.tolist()]
        ([1.0], [1.414214])
    """
    return step_rotation_from_sums(float64_sums(weights, before, per_unit=units, difference=True))


class PairSums(Protocol):
    """What forms the sums of a measurement: :func:`~lightning_layca.sums.float64_sums`, or another way to them.

    :class:`lightning_layca.measurement.MeasurementSums` forms them in compiled passes once that pays.
    """

    def __call__(
        self,
        xs: Sequence[torch.Tensor],
        ys: Sequence[torch.Tensor],
        *,
        difference: bool = False,
        y_squares: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(a, b, c)`` per pair, ``(len(xs), 3)`` float64 (as :func:`~lightning_layca.sums.float64_sums`)."""
        ...


@dataclass
class Measured:
    """What one :meth:`RotationMeter.measure` call measured (host numbers; unit tangents stay a tensor)."""

    distances: list[float] = field(default_factory=list)
    tans: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    update_ratios: list[float] = field(default_factory=list)
    """log10 of ``||dW|| / ||W||`` of the step of each layer of ``steps`` (see :func:`update_ratios_from_sums`)."""
    tangential_ratios: list[float] = field(default_factory=list)
    radial_ratios: list[float] = field(default_factory=list)
    unit_tans: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


class RotationMeter:
    """Measure a list of layers against their initial snapshot, sharded or not, through one seam call.

    Args:
        layers: The layers (parameters; ``DTensor`` under sharding), in the same order on every process.
        initial: Their initial weights: this process's local shard of each (the whole tensor unsharded).
        sums: What forms the per-layer sums of the distances and of the steps (default:
            :func:`~lightning_layca.sums.float64_sums`); the per-unit sums are always eager.
    """

    def __init__(
        self, layers: Sequence[torch.Tensor], initial: Sequence[torch.Tensor], sums: PairSums | None = None
    ) -> None:
        self.layers = list(layers)
        self.initial = list(initial)
        self.sums: PairSums = float64_sums if sums is None else sums
        self.layout: ShardLayout = shard_layout(self.layers)
        # <w0, w0> of every local snapshot, from the first measure of distances on: a snapshot never changes, so the
        # later ones form two products per element instead of three.
        self._initial_squares: torch.Tensor | None = None

    def measure(
        self,
        distances: bool,
        steps: Sequence[int] = (),
        unit_steps: Sequence[int] = (),
        before: Sequence[torch.Tensor] = (),
        unit_before: Sequence[torch.Tensor] = (),
    ) -> Measured:
        """Measure what a logging step needs, with one host transfer and at most ONE all_reduce.

        Args:
            distances: Whether to measure every layer's cosine distance to its initial weights.
            steps: Positions of the layers whose latest step to measure (``tan`` of its angle, norm after it, update
                ratios), from the one set of step sums.
            unit_steps: Positions of the layers whose latest step to measure per unit (rows concatenated).
            before: The weights before the step of the layers at ``steps`` (local shards).
            unit_before: Likewise for ``unit_steps``.
        """
        out = Measured()
        local = [local_shard(p.detach()) for p in self.layers]
        if not (distances and local) and not steps and not unit_steps:
            return out
        device = local[0].device
        layout = self.layout
        parts: list[torch.Tensor] = []
        divisors: list[torch.Tensor] = []
        all_divisors = layout.divisors(device)
        if distances:
            sums = self.sums(local, self.initial, y_squares=self._initial_squares)
            self._initial_squares = sums[:, 1].clone()
            parts.append(sums)
            divisors += [all_divisors] if all_divisors is not None else []
        if steps:
            parts.append(self.sums([local[k] for k in steps], before, difference=True))
            divisors += [all_divisors[list(steps)]] if all_divisors is not None else []
        if unit_steps:
            sub = layout.subset(unit_steps)
            rows = float64_sums([local[k] for k in unit_steps], unit_before, per_unit=True, difference=True)
            parts.append(sub.scatter_rows(list(rows.split(list(sub.local_rows)))))
            row_divisors = sub.row_divisors(device)
            divisors += [row_divisors] if row_divisors is not None else []
        full = full_sums(torch.cat([p.to(device) for p in parts]), torch.cat(divisors) if divisors else None)
        pieces = iter(full.split([len(part) for part in parts]))
        if distances:
            out.distances = distances_from_sums(next(pieces)).tolist()
        if steps:
            step_sums = next(pieces)
            tans, norms = step_rotation_from_sums(step_sums)
            total, tangential, radial = update_ratios_from_sums(step_sums)
            # One host transfer for the five per-layer numbers.
            host = torch.stack([tans, norms, total, tangential, radial]).tolist()
            out.tans, out.norms, out.update_ratios, out.tangential_ratios, out.radial_ratios = host
        if unit_steps:
            out.unit_tans, _ = step_rotation_from_sums(next(pieces))
        return out

    def unit_angles(self) -> list[torch.Tensor]:
        """Per layer, the angle in degrees each of its units turned (every unit, on every process).

        Under sharding each process sums over its part of each unit; one all_reduce of three float64 numbers per unit
        gives every process the full sums.
        """
        local = [local_shard(p.detach()) for p in self.layers]
        full = reduce_sums(float64_sums(local, self.initial, per_unit=True), self.layout, per_unit=True)
        return list(angles_from_sums(full).split(list(self.layout.rows)))

    def full_initial(self) -> list[torch.Tensor | None]:
        """The snapshot for a checkpoint: full tensors on the CPU (sharded: gathered, a collective, kept on rank 0)."""
        if not self.layout.sharded:
            return [t.detach().cpu() for t in self.initial]
        keep = torch.distributed.get_rank() == 0
        full = []
        for w0, p in zip(self.initial, self.layers, strict=True):
            gathered = gather_full(w0, p)  # a collective, one layer at a time
            full.append(gathered.cpu() if keep else None)
        return full


@dataclass
class AngleHistogram:
    """A histogram in the form TensorBoard's raw histograms take (``SummaryWriter.add_histogram_raw``)."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    """Right edge of every bin."""
    bucket_counts: list[float]


def angle_histograms(values: Sequence[torch.Tensor], bins: int = 30) -> list[AngleHistogram]:
    """Bin each 1-D tensor of values on its device with ``torch.histc``.

    The range of each histogram is the range of its values (widened when they are all equal). Two host transfers in
    total, whatever the number of tensors: the ranges, then the counts.

    Args:
        values: One non-empty 1-D tensor of finite values per histogram, for example :func:`unit_angles` of every
            layer.
        bins: Number of bins (positive).

    Returns:
        One :class:`AngleHistogram` per tensor; its counts add up to the number of values.

    Raises:
        ValueError: When a tensor holds inf or NaN (it has no finite range to bin).

    Example:
        >>> h = angle_histograms([torch.tensor([0.0, 1.0, 1.0, 2.0])], bins=2)[0]
        >>> h.bucket_limits, h.bucket_counts
        ([1.0, 2.0], [1.0, 3.0])
    """
    check_positive_int("angle_histograms", "bins", bins)
    if not values:
        return []
    device = values[0].device
    stats = torch.stack(
        [
            torch.stack([v.min(), v.max(), v.sum(), v.square().sum()]).to(device=device, dtype=torch.float64)
            for v in values
        ]
    ).tolist()  # one host transfer for every range
    for i, (lo, hi, _, _) in enumerate(stats):
        if not (math.isfinite(lo) and math.isfinite(hi)):  # min and max propagate NaN
            raise ValueError(
                f"angle_histograms: tensor #{i} holds non-finite values (min {lo}, max {hi}); bin finite values only."
            )
    counts: list[torch.Tensor] = []
    limits: list[list[float]] = []
    for v, (lo, hi, _, _) in zip(values, stats, strict=True):
        if not hi > lo:
            hi = lo + max(abs(lo), 1.0) * 1e-6
        counts.append(torch.histc(v.float(), bins=bins, min=lo, max=hi).to(device))
        width = (hi - lo) / bins
        limits.append([lo + width * (k + 1) for k in range(bins)])
    host_counts = torch.stack(counts).tolist()  # one host transfer for every count
    return [
        AngleHistogram(
            min=lo,
            max=hi,
            num=int(v.numel()),
            sum=total,
            sum_squares=squares,
            bucket_limits=edges,
            bucket_counts=[float(c) for c in bucket_counts],
        )
        for v, (lo, hi, total, squares), edges, bucket_counts in zip(values, stats, limits, host_counts, strict=True)
    ]
