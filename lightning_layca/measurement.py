"""How a rotation monitor forms its sums: eagerly, or in compiled passes once compiling pays, by the rule of the step.

A logging step of a rotation monitor measures every layer against its initial weights: the float64 sums of
:func:`lightning_layca.sums.float64_sums`, from which the cosine distances come
(:func:`lightning_layca.rotation.distances_from_sums`). The eager sums convert each layer and its snapshot to float64
block by block and form the products with separate operators; a compiled pass (the same
:func:`~lightning_layca.sums.matrix_sums` arithmetic traced by Inductor, compiled and called by
:mod:`lightning_layca.compiling` as the step's kernels are) reads both once and converts in registers, about three
times faster on a CPU, but its compilation takes seconds. :class:`MeasurementSums` chooses between them as
``implementation`` says, with the rule of the Layca step's ``implementation="auto"``
(:class:`~lightning_layca.auto_choice.AutoChoice`): eager first, compiled once the eager sums have taken
:data:`~lightning_layca.auto_choice.AUTO_COMPILE_AFTER_SECONDS` in total, the faster of the two kept, and the choice
revisited. Both give the same numbers up to the order of float64 additions (a relative difference of about
``1e-16``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import cast

import torch

from lightning_layca.argument_types import Implementation, check_implementation
from lightning_layca.auto_choice import AutoChoice
from lightning_layca.compiling import (
    AUTO_DEVICE_TYPES,
    SUPPORTED_DTYPES,
    KernelSpec,
    call_kernels,
    kernel_view,
    kernels_ready,
    parallel_kernel,
    register_kernel,
    stand_in_layer,
)
from lightning_layca.distributed import several_processes
from lightning_layca.sums import float64_sums, matrix_sums

__all__ = ["DISTANCES", "STEP_SUMS", "MeasurementSums"]

DISTANCES, STEP_SUMS = "distance_sums", "step_sums"
"""The kernels of a measurement: the sums of each layer against its initial weights (without ``<w0, w0>``, see
:meth:`MeasurementSums.__call__`), and of its latest step."""


def _distance_sums(weights: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """``(<w, w0>, 0, <w, w>)`` of a layer's view, float64, ``(3, 1)`` (traced and compiled).

    :func:`float64_sums` without ``difference``, in one pass that reads the layer and its snapshot once, with ``<w0,
    w0>`` known (a snapshot never changes): two products per element. Called with the snapshot as both arguments, its
    first sum is ``<w0, w0>``.
    """
    return matrix_sums(weights.double(), initial.double(), y_squares=False)


def _step_sums(weights: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """``(<D, w>, <w, w>, <D, D>)`` of a layer's step ``D = w' - w``, ``before`` being ``w`` (traced and compiled).

    :func:`float64_sums` with ``difference``.
    """
    previous = before.double()
    return matrix_sums(weights.double() - previous, previous)


def _stand_in(
    device: torch.device, dtype: torch.dtype, per_unit: bool, shape: tuple[int, int], rule: list[torch.Tensor]
) -> list[torch.Tensor]:
    params, weights, _ = stand_in_layer(device, dtype, shape)
    return [params, weights]


for _name, _body in ((DISTANCES, _distance_sums), (STEP_SUMS, _step_sums)):
    register_kernel(
        _name,
        KernelSpec(
            _body,
            _stand_in,
            what="the compiled measurement",
            instead="the rotation monitor measures with the eager sums",
        ),
    )


class MeasurementSums:
    """The sums of a rotation monitor's measurements, eager or compiled (a ``lightning_layca.rotation.PairSums``).

    Args:
        implementation: ``"auto"`` (default): eager sums first, compiled ones once they pay, on CPU (the step's
            rule, :class:`~lightning_layca.auto_choice.AutoChoice`, timed on the distances of logging steps);
            ``"eager"``: never compile; ``"compiled"``: compiled sums from the first measurement, on any device.

    Layers of another dtype than float32, bfloat16 and float16, or without a lane view (their memory not one dense
    block, or their size not a multiple of 4: ``lightning_layca.compiling.kernel_view``), or laid out otherwise than
    their snapshot, are always summed eagerly; so is everything when a compilation fails (after one warning).

    Example:
        >>> sums = MeasurementSums("eager")
        >>> sums([torch.ones(2, 3)], [torch.ones(2, 3)]).tolist()
        [[6.0, 6.0, 6.0]]
        >>> sums.in_use
        'eager'
    """

    def __init__(self, implementation: Implementation = "auto") -> None:
        check_implementation("MeasurementSums", implementation)
        self.implementation: Implementation = implementation
        self.choice = AutoChoice()
        """When ``"auto"`` compiles, and which sums it takes (the step's rule, one record per measure of distances)."""
        self.in_use: str = "eager"
        """``"eager"`` or ``"compiled"``: the sums of the latest measurement (``"compiled"`` when any layer's were)."""
        self._unavailable = False

    def __call__(
        self,
        xs: Sequence[torch.Tensor],
        ys: Sequence[torch.Tensor],
        difference: bool = False,
        y_squares: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ``(a, b, c)`` of every pair, ``(len(xs), 3)`` float64, as :func:`~lightning_layca.sums.float64_sums`.

        Args:
            xs: The layers (a process's local shards under sharding), detached.
            ys: Their initial weights, or (``difference``) their weights before the latest step.
            difference: Whether the sums are of the step ``x - y`` (see :func:`~lightning_layca.sums.float64_sums`).
            y_squares: ``<y, y>`` of every ``y``, when known (the sums then skip that product; the compiled
                distances always do, and form it once in a pass over ``ys`` alone without it).
        """
        if not xs:
            return torch.zeros((0, 3), dtype=torch.float64)
        # In a run of several processes "auto" keeps the eager sums: the processes would decide each by its own timings,
        # and their measurements (the monitor's state, the same on every process) would differ in their last bits.
        timed = (
            not difference
            and self.implementation == "auto"
            and self.choice.measuring
            and _on_cpu(xs)
            and not several_processes()
        )
        start = time.perf_counter() if timed else 0.0
        sums = self._sums(xs, ys, difference, y_squares)
        if timed:
            self.choice.record(time.perf_counter() - start)
        return sums

    def _sums(
        self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], difference: bool, y_squares: torch.Tensor | None
    ) -> torch.Tensor:
        positions, views, others = self._kernel_views(xs, ys)
        parallel = [parallel_kernel(xs[i]) for i in positions]
        if not positions or not self._ready(xs[positions[0]], parallel, difference):
            self.in_use = "eager"
            return float64_sums(xs, ys, difference=difference, y_squares=y_squares)
        variant = STEP_SUMS if difference else DISTANCES

        def sums_of(firsts: list[torch.Tensor], seconds: list[torch.Tensor]) -> list[torch.Tensor]:
            """Each pair's sums, in order; fewer should a compilation fail (the layers left take the eager sums)."""
            out: list[torch.Tensor] = []
            pairs = zip(firsts, seconds, strict=True)
            call_kernels(zip(parallel[: len(firsts)], [variant] * len(firsts), pairs, strict=True), False, out)
            return out

        measured = sums_of(views, others)
        if not difference and y_squares is None:  # the distances' <y, y>, from a pass of their kernel over ys alone
            # Two tensor objects: the same one twice would be another compiled graph (Dynamo's duplicate inputs).
            snapshots = others[: len(measured)]
            square_sums = sums_of(snapshots, [other.detach() for other in snapshots])
            pairs = zip(measured, square_sums, strict=False)
            measured = [torch.cat([part[:1], square[:1], part[2:]]) for part, square in pairs]
        rows: list[torch.Tensor | None] = [None] * len(xs)
        for i, part in zip(positions, measured, strict=False):
            rows[i] = part.view(1, 3)
        rest = [i for i, row in enumerate(rows) if row is None]  # no kernel view, or a failed compilation
        if rest:
            squares = None if y_squares is None else y_squares[rest]
            eager = float64_sums([xs[i] for i in rest], [ys[i] for i in rest], difference=difference, y_squares=squares)
            for i, row in zip(rest, eager.to(xs[0].device).split(1), strict=True):
                rows[i] = row
        self.in_use = "compiled"
        sums = torch.cat(cast(list[torch.Tensor], rows))
        if not difference and y_squares is not None:
            sums[:, 1] = y_squares  # the kernel leaves zeros in their place
        return sums

    def _kernel_views(
        self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]
    ) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """The layers whose sums are compiled this time, and the views of them and of their snapshots the kernels take.

        None unless the implementation says so now; the views are :func:`~lightning_layca.compiling.kernel_view`'s.
        """
        positions: list[int] = []
        views: list[torch.Tensor] = []
        others: list[torch.Tensor] = []
        if self._unavailable or self.implementation == "eager":
            return positions, views, others
        first = xs[0]
        if self.implementation == "auto" and (not self.choice.compiled or first.device.type not in AUTO_DEVICE_TYPES):
            return positions, views, others
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            # The same layout, element for element: a view follows memory order, so a channels-last layer against a
            # contiguous snapshot would pair different elements.
            if (x.device, x.dtype) != (first.device, first.dtype) or x.dtype not in SUPPORTED_DTYPES:
                continue
            if (y.dtype, y.shape, y.stride()) != (x.dtype, x.shape, x.stride()):
                continue
            view, other = kernel_view(x), kernel_view(y)
            if view is not None and other is not None:
                positions.append(i)
                views.append(view)
                others.append(other)
        return positions, views, others

    def _ready(self, first: torch.Tensor, parallel: list[bool], difference: bool) -> bool:
        """Whether the kernels are compiled (compiling them the first time; kernels_ready keeps the answer)."""
        variant = STEP_SUMS if difference else DISTANCES
        with torch.no_grad():
            ready = kernels_ready(first.device, first.dtype, [(p, variant) for p in parallel])
        self._unavailable = not ready
        return ready


def _on_cpu(xs: Sequence[torch.Tensor]) -> bool:
    """Whether the sums of these layers can be timed on the host without synchronising (CPU tensors)."""
    return all(x.device.type == "cpu" for x in xs)
