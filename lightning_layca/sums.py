"""The sums every measurement and every Layca step is computed from: three inner products per layer or per unit.

For tensors ``x`` (what is measured) and ``y`` (what it is measured against: the weights before a step, or the
initial weights), every quantity the library reports or uses is a function of

``a = <u, y>``, ``b = <y, y>``, ``c = <u, u>``, with ``u = x - y`` (a step) or ``u = x`` (a position),

per layer (the tensor seen as one vector) or per unit (each row of the tensor seen as ``(units, -1)``): the Layca step
(:mod:`lightning_layca.step`), the cosine distance to the initial weights, the angle a step turned a layer and the
per-unit angles (:mod:`lightning_layca.rotation`). They are formed in float64, where the products of float32 (or
lower precision) numbers are exact and ``u = x - y`` is rounded to 53 bits, so a difference of sums such as
``||D_perp||^2 = c - a^2 / b`` keeps the inputs' precision even for a mostly radial step.

Sums over parts add up to the sums over the whole: a process holding a shard of a layer sums over its shard and
:func:`lightning_layca.distributed.full_sums` (the seam, the identity without sharding) adds the parts. Nothing else
in the package computes these sums: the compiled kernels trace :func:`matrix_sums`, whose arithmetic is that of
:func:`row_sums` (one products-and-sums function for both, over the rows or over the whole matrix).

Example:
    >>> w = torch.tensor([[3.0, 4.0]])
    >>> float64_sums([w + torch.tensor([[0.0, 1.0]])], [w], difference=True).tolist()  # a step D = (0, 1)
    [[4.0, 25.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = [
    "LANES",
    "SUM_BLOCK_ELEMENTS",
    "Scratch",
    "as_rows",
    "block_elements",
    "float64_sums",
    "matrix_sums",
    "row_blocks",
    "row_sums",
    "row_view",
    "unit_counts",
]

SUM_BLOCK_ELEMENTS = 2**18
"""Sums convert this many elements to float64 at a time (2 MiB per operand): the temporaries stay bounded whatever the
size of a layer. Measured on the 2-core CPU (ResNet-18 shapes, sums and update of a Layca step): 2**18 took 19.8 ms with
2 threads and 33.7 ms with 1, 2**16 took 30 and 32.6 ms, 2**20 21.2 and 40.9 ms."""


LANES = 4
"""The rows of a layer's lane view (:func:`lightning_layca.compiling.kernel_view`): four equal runs of its memory that
:func:`matrix_sums` reads side by side. A compiled reduction over one run of memory adds into one chain of vector
registers and keeps too few loads in flight to read at the memory's speed; over four runs at once its loop issues four
independent loads per operand and adds the four products before the chain. Measured on the AVX-512 CPU of
``benchmarks/README.md`` (one 512 x 4608 layer and its snapshot read from memory, 1 thread): a rotation monitor's
sums 0.94 -> 0.58 ns per element (``torch.dot`` of the two in float32: 0.48), SGD with momentum's Layca kernel 5.78 ->
4.95 ms."""


def row_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(units, -1)``, one row per output unit (slice along dim 0); a tensor of rank < 2 is one unit.

    An empty shard (``(0, ...)``) keeps its 0 rows. The result is a view of ``x`` where one exists.

    Example:
        >>> row_view(torch.zeros(4, 3, 2)).shape, row_view(torch.zeros(5)).shape
        (torch.Size([4, 6]), torch.Size([1, 5]))
    """
    return x.flatten(1) if x.ndim >= 2 else x.reshape(1, -1)


def unit_counts(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Return the number of units (rows of :func:`row_view`) of every tensor."""
    return [t.shape[0] if t.ndim >= 2 else 1 for t in tensors]


def row_sums(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(<u, y>, <y, y>, <u, u>)`` of every row of two 2-D tensors, stacked as ``(3, rows)``.

    The arithmetic of :func:`float64_sums` per block, and of the compiled kernels' per-unit sums (:func:`matrix_sums`).
    """
    return _inner_products(u, y, _per_row)


def _inner_products(
    u: torch.Tensor,
    y: torch.Tensor,
    inner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y_squares: bool = True,
) -> torch.Tensor:
    """``(<u, y>, <y, y>, <u, u>)``, each formed by ``inner``, stacked on a new first dimension.

    Without ``y_squares`` the ``<y, y>`` is not formed (the caller knows it) and zeros stand in its place.
    """
    uy, uu = inner(u, y), inner(u, u)
    return torch.stack([uy, inner(y, y) if y_squares else torch.zeros_like(uy), uu])


def _per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(1)


def _over_all(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum((0, 1)).unsqueeze(0)


def _over_lanes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The rows' products added element by element, then summed: the rows of a lane view read side by side."""
    total = a[0] * b[0]
    for row in range(1, a.shape[0]):
        total = total + a[row] * b[row]
    return total.sum().unsqueeze(0)


def matrix_sums(
    u: torch.Tensor, y: torch.Tensor, per_unit: bool = False, lanes: bool = True, y_squares: bool = True
) -> torch.Tensor:
    """:func:`row_sums` of a layer seen as a matrix: ``(3, rows)`` per unit, or over the whole matrix as ``(3, 1)``.

    The sums every compiled kernel forms (the step's and the monitor's), on float64 operands. A layer's sums are one
    reduction over every element rather than a sum of its rows' sums: Inductor can then form a value the kernel also
    stores (a momentum buffer) in the reduction's own loop (see :mod:`lightning_layca.step.compiled`). With ``lanes``
    a layer seen as :data:`LANES` rows (its lane view) is summed over the four rows side by side: the products of the
    four rows are added element by element, then summed (the same sums, added in another order). A kernel that
    stores a value of every element in the loop of its sums passes ``lanes=False``: Inductor cannot store the four
    rows' elements in the loop that reads them side by side, and stores them in a loop of its own. Without
    ``y_squares`` (over the whole matrix only) ``<y, y>`` is not formed: zeros stand in its place, for a caller that
    knows it (a rotation monitor's snapshot), as :func:`float64_sums` takes it.

    Example:
        >>> matrix_sums(torch.ones(2, 3), torch.ones(2, 3)).tolist()
        [[6.0], [6.0], [6.0]]
        >>> matrix_sums(torch.ones(4, 3), torch.ones(4, 3)).tolist()
        [[12.0], [12.0], [12.0]]
    """
    if per_unit:
        if not y_squares:
            raise ValueError("matrix_sums: y_squares=False is for the sums over the whole matrix, not per unit.")
        return row_sums(u, y)
    lane_view = lanes and u.shape[0] == LANES  # a constant of the compiled code
    return _inner_products(u, y, _over_lanes if lane_view else _over_all, y_squares)


def block_elements(device: torch.device) -> int:
    """How many elements the eager passes take at a time on ``device`` (see :data:`SUM_BLOCK_ELEMENTS`).

    On accelerators a block is a kernel launch: blocks of 2**24 elements (one per layer for most layers) keep the
    launches per step few (not measured on a GPU yet).
    """
    return SUM_BLOCK_ELEMENTS if device.type == "cpu" else 2**24


def row_blocks(rows: torch.Tensor) -> Iterator[tuple[slice, slice]]:
    """The blocks of a 2-D tensor (:func:`as_rows`) the eager passes take: whole rows, or pieces of a long row."""
    size = block_elements(rows.device)
    per_block = max(1, size // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], per_block):
        for first in range(0, rows.shape[1], size):  # a long row in pieces
            yield slice(start, start + per_block), slice(first, first + size)


def as_rows(x: torch.Tensor, per_unit: bool) -> torch.Tensor:
    """``x`` as the rows the eager passes read: its units (:func:`row_view`), or one row for a contiguous layer."""
    rows = row_view(x.detach())
    return rows if per_unit or not rows.is_contiguous() else rows.reshape(1, -1)


class Scratch:
    """Two buffers of a block (:func:`row_blocks`) of the largest of ``tensors``, reused from block to block.

    Converting a block into buffers that stay allocated avoids, per block, the allocation (and on CPU the page
    faults) of two fresh float64 tensors: on the 2-core CPU that took a third of the eager sums' time.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> None:
        largest = max((t.numel() for t in tensors), default=0)
        device = tensors[0].device if tensors else torch.device("cpu")
        size = min(largest, block_elements(device))
        self.buffers = torch.empty((2, max(size, 1)), dtype=dtype, device=device)

    def copies(self, *blocks: torch.Tensor) -> list[torch.Tensor]:
        """Copies of up to two blocks (2-D tensors) in the buffers' dtype, in them (valid until the next call)."""
        out = []
        for buffer, block in zip(self.buffers, blocks, strict=False):
            if block.numel() > buffer.numel():  # never for the blocks of row_blocks: kept correct for any block
                buffer = torch.empty(block.numel(), dtype=buffer.dtype, device=block.device)
            out.append(buffer[: block.numel()].view(block.shape).copy_(block))
        return out


def float64_sums(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    per_unit: bool = False,
    difference: bool = False,
    y_squares: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``(a, b, c) = (<u, y>, <y, y>, <u, u>)`` per pair of tensors (or per unit), formed and summed in float64.

    ``u = x - y`` with ``difference`` (``x`` the weights after a step, ``y`` before it), else ``u = x``. The tensors
    are converted block by block (:data:`SUM_BLOCK_ELEMENTS`); an empty shard contributes zeros.

    Args:
        xs: One tensor per layer (a process's local shards under sharding).
        ys: The tensors they are measured against, same shapes.
        per_unit: Sums per unit (rows of :func:`row_view`, every tensor's rows concatenated) rather than per tensor.
        difference: Whether ``u = x - y``.
        y_squares: ``<y, y>`` of every tensor, when known already (the ``b`` these sums returned for the same ``ys``
            before, such as an initial snapshot's, which never changes): ``(tensors,)`` float64, returned as ``b``
            instead of being formed again, which saves one of the three products of every element. Per tensor only.

    Returns:
        ``(tensors, 3)`` or ``(units, 3)``, float64, on the first tensor's device.
    """
    if y_squares is not None and (per_unit or y_squares.shape != (len(ys),)):
        raise ValueError(
            f"float64_sums: y_squares must hold one <y, y> per tensor ({len(ys)},) and per_unit be False; got shape "
            f"{tuple(y_squares.shape)} with per_unit={per_unit}."
        )
    out = []
    scratch = Scratch(xs)
    known = None if y_squares is None else torch.zeros((), dtype=torch.float64, device=scratch.buffers.device)
    for x, y in zip(xs, ys, strict=True):
        rows_x, rows_y = as_rows(x, per_unit), as_rows(y, per_unit)
        if rows_x.shape != rows_y.shape:  # one of them not contiguous: both as units
            rows_x, rows_y = row_view(x.detach()), row_view(y.detach())
        parts = []
        for block in row_blocks(rows_x):
            if x.dtype == torch.float64:  # the blocks themselves: never written to
                v, u = rows_y[block], rows_x[block]
                u = u - v if difference else u
            else:  # exact float64 copies, in buffers reused from block to block
                v, u = scratch.copies(rows_y[block], rows_x[block])
                u = u.sub_(v) if difference else u
            if per_unit:
                parts.append((block[0].start, row_sums(u, v).T))
            else:  # one BLAS dot per product: faster than the row reductions for a single row
                u, v = u.reshape(-1), v.reshape(-1)
                square = torch.dot(v, v) if known is None else known  # a known <y, y>: set after the blocks
                parts.append((0, torch.stack([torch.dot(u, v), square, torch.dot(u, u)]).unsqueeze(0)))
        sums = rows_x.new_zeros((rows_x.shape[0] if per_unit else 1, 3), dtype=torch.float64)
        for start, values in parts:
            sums[start : start + values.shape[0]] += values
        out.append(sums)
    result = torch.cat(out)
    if y_squares is not None:
        result[:, 1] = y_squares.to(result.device)
    return result
