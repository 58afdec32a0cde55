"""The seam between sharded and unsharded training: local partial sums become full sums in one place.

* **Full copies** (single device, DDP and its spawn/fork variants): every rank computes the same Layca step and the
  same rotation from the same all-reduced gradients, so the callbacks need no collective of their own; the
  initial-weight snapshot is taken in ``on_fit_start``, after DDP has broadcast rank 0's weights.
* **Sharded weights** (Lightning's ``ModelParallelStrategy``: FSDP2's ``fully_shard`` and tensor parallelism, whose
  parameters are ``DTensor`` objects): each rank holds a slice of every layer. Every quantity the callbacks need is a
  sum over a layer's (or a unit's) elements, so each rank sums over its local shard and :func:`full_sums`, the one seam
  from local partial sums to full sums, adds the ranks' parts with ONE ``all_reduce`` for all layers together. A rank
  that holds an element in several copies (a mesh dimension on which the layer is replicated) counts it once per
  copy, so the sum is divided by the number of copies (:attr:`ShardLayout.copies`). Without sharding the seam is the
  identity and issues no collective.
* **Refused** (by the callbacks, :mod:`lightning_layca.callbacks.strategies`): FSDP1 and DeepSpeed, whose flat
  parameter buffers hide the layers.

What this relies on (torch 2.4 to 2.13; ``tests/test_fsdp.py`` exercises each point):

* A ``DTensor`` parameter's ``to_local()`` is the rank's block, sharing storage with the parameter: the Layca update
  writes it in place. FSDP2 shards dim 0 in ``torch.chunk`` sizes, so a layer with fewer rows than ranks has empty
  ``(0, ...)`` shards, whose gradient may be an empty ``DTensor`` or ``None``.
* With tensor parallelism under FSDP2 a column-wise layer's dim 0 is ``_StridedShard`` over the data-parallel ranks
  and ``Shard(0)`` over the tensor-parallel ones; a row-wise layer is ``Shard(0), Shard(1)``. Each rank's block is
  still one box of the global tensor, whose offset ``compute_local_shape_and_global_offset`` gives.
* A layer ``fully_shard``-ed over a sub-mesh (the data-parallel one) is held whole by every rank outside that mesh
  (the tensor-parallel ranks): such elements have ``world_size / mesh.size()`` copies, times the sizes of the mesh's
  ``Replicate`` dimensions.
* ``torch._foreach_norm`` and ``torch.dot`` accept ``DTensor`` inputs but return partial results, one collective per
  layer when read: the callbacks reduce local tensors instead.

Every rank builds the same list of layers in the same order (a rank with an empty shard, or no gradient, contributes
zeros: layers are never filtered by ``grad is None``), so every rank issues the same collectives in the same order.
Only global rank 0 writes logs and figures; no collective is ever guarded by a rank check.

Pure torch: which Lightning strategies are supported is the callbacks' concern
(:mod:`lightning_layca.callbacks.strategies`).

Example:
    >>> layout = shard_layout([torch.ones(3, 2)])  # a plain tensor: not sharded
    >>> layout.sharded, full_sums(torch.tensor([[6.0]]), layout.divisors()).tolist()
    (False, [[6.0]])
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "ShardLayout",
    "full_sums",
    "gather_full",
    "is_dtensor",
    "local_shard",
    "reduce_sums",
    "several_processes",
    "shard_layout",
    "shard_of",
]


def _dtensor_module(name: str) -> Any:
    """``torch.distributed.tensor.<name>``, or its torch 2.4 location ``torch.distributed._tensor.<name>``."""
    for package in ("torch.distributed.tensor", "torch.distributed._tensor"):
        try:
            return importlib.import_module(f"{package}{name}")
        except ImportError:
            continue
    return None


def _dtensor_type() -> type | None:
    module = _dtensor_module("")
    return None if module is None else getattr(module, "DTensor", None)


_DTENSOR = _dtensor_type()


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a tensor sharded or replicated over a device mesh)."""
    return _DTENSOR is not None and isinstance(tensor, _DTENSOR)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """Return this rank's local part of ``tensor`` (``tensor`` itself when it is not a ``DTensor``).

    The local part shares storage with the parameter: writing to it in place updates the parameter.
    """
    if is_dtensor(tensor):
        return tensor.to_local()  # type: ignore[attr-defined, no-any-return]
    return tensor


def _local_block(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shape and global offset of the block of ``tensor`` (a DTensor) this rank holds."""
    shape, offset = _dtensor_module("._utils").compute_local_shape_and_global_offset(
        tensor.shape,
        tensor.device_mesh,  # type: ignore[attr-defined]
        tensor.placements,  # type: ignore[attr-defined]
    )
    return tuple(shape), tuple(offset)


def _copies(tensor: torch.Tensor, world_size: int) -> int:
    """How many ranks hold each element of ``tensor``.

    A DTensor's elements are held once per coordinate of its mesh's ``Replicate`` dimensions, and once per rank
    outside its mesh (a layer that FSDP shards over the data-parallel ranks only is held in full by each
    tensor-parallel rank). A plain tensor is held by every rank.
    """
    if not is_dtensor(tensor):
        return world_size
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    copies = world_size // mesh.size()
    for dim, placement in enumerate(tensor.placements):  # type: ignore[attr-defined]
        if placement.is_partial():
            raise ValueError(
                f"A parameter has a partial placement ({placement}) on its mesh: its local values are not parts of "
                "the weights, so a layer's rotation cannot be computed from them."
            )
        if placement.is_replicate():
            copies *= mesh.size(dim)
    return int(copies)


@dataclass(frozen=True)
class ShardLayout:
    """How a list of tensors lies over the ranks: enough to turn local partial sums into full sums.

    Attributes:
        sharded: Whether any tensor is a ``DTensor``; when not, the other fields describe full local tensors and
            :func:`full_sums` is the identity.
        copies: Per tensor, how many ranks hold each of its elements.
        rows: Per tensor, its global size along dim 0 (its number of units).
        row_starts: Per tensor, the global index of the first unit this rank holds (part of).
        local_rows: Per tensor, how many units this rank holds (part of); 0 for an empty shard.
    """

    sharded: bool
    copies: tuple[int, ...]
    rows: tuple[int, ...]
    row_starts: tuple[int, ...]
    local_rows: tuple[int, ...]

    def subset(self, positions: Sequence[int]) -> ShardLayout:
        """The layout of the tensors at ``positions`` (in that order)."""
        return ShardLayout(
            self.sharded,
            tuple(self.copies[k] for k in positions),
            tuple(self.rows[k] for k in positions),
            tuple(self.row_starts[k] for k in positions),
            tuple(self.local_rows[k] for k in positions),
        )

    def divisors(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Per tensor, the number of copies to divide a full sum by, as float64 on ``device``; ``None`` unsharded."""
        if not self.sharded:
            return None
        return torch.tensor(self.copies, dtype=torch.float64, device=device)

    def row_divisors(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """Per global unit of every tensor in turn, the number of copies (float64 on ``device``); ``None`` unsharded."""
        if not self.sharded:
            return None
        counts = torch.tensor(self.rows, device=device)
        return torch.repeat_interleave(torch.tensor(self.copies, dtype=torch.float64, device=device), counts)

    def scatter_rows(self, local: Sequence[torch.Tensor]) -> torch.Tensor:
        """Place per-unit local sums at their global units: ``(sum(rows), k)``, zero where this rank holds nothing.

        Args:
            local: Per tensor, a ``(local_rows, k)`` tensor of sums over this rank's part of each of its units.
        """
        k = local[0].shape[1]
        out = local[0].new_zeros((sum(self.rows), k))
        base = 0
        for values, rows, start in zip(local, self.rows, self.row_starts, strict=True):
            out[base + start : base + start + values.shape[0]] = values
            base += rows
        return out

    def local_rows_of(self, full: torch.Tensor) -> list[torch.Tensor]:
        """Split per-unit full values (``(sum(rows), ...)``) into each tensor's units held by this rank."""
        out = []
        base = 0
        for rows, start, n in zip(self.rows, self.row_starts, self.local_rows, strict=True):
            out.append(full[base + start : base + start + n])
            base += rows
        return out


def shard_layout(tensors: Sequence[torch.Tensor]) -> ShardLayout:
    """Describe how ``tensors`` (parameters, in the same order on every rank) lie over the ranks.

    Raises:
        ValueError: For a ``DTensor`` with a partial placement.
    """
    sharded = any(is_dtensor(t) for t in tensors)
    world_size = dist.get_world_size() if sharded else 1
    copies, rows, starts, local_rows = [], [], [], []
    for t in tensors:
        n_rows = int(t.shape[0]) if t.ndim else 1
        copies.append(_copies(t, world_size))
        rows.append(n_rows)
        if is_dtensor(t):
            shape, offset = _local_block(t)
            starts.append(int(offset[0]) if shape else 0)
            local_rows.append(int(shape[0]) if shape else 1)
        else:
            starts.append(0)
            local_rows.append(n_rows)
    return ShardLayout(sharded, tuple(copies), tuple(rows), tuple(starts), tuple(local_rows))


def full_sums(partial: torch.Tensor, divisors: torch.Tensor | None) -> torch.Tensor:
    """Turn local partial sums into full sums: THE seam between sharded and unsharded training.

    Args:
        partial: ``(n, k)`` (or ``(n,)``) sums over this rank's local part of each of ``n`` layers (or units), in
            the same order on every rank; float64 keeps the result within a few ulps of an unsharded sum.
        divisors: ``None`` when nothing is sharded (the result is ``partial`` itself, and no collective is issued);
            else per entry the number of ranks holding each element (:meth:`ShardLayout.divisors`).

    Returns:
        The full sums, shaped like ``partial``: with sharding ``partial`` itself, summed over all ranks in place
        with ONE ``all_reduce`` and divided by ``divisors``.
    """
    if divisors is None:
        return partial
    if partial.device.type == "cpu" and dist.get_backend() == dist.Backend.NCCL:
        # Shards kept on the CPU (FSDP2's CPU offload) under an NCCL process group, which reduces CUDA tensors only.
        summed = partial.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        partial = summed.cpu()
    else:
        dist.all_reduce(partial, op=dist.ReduceOp.SUM)
    return partial / (divisors.unsqueeze(-1) if partial.ndim > 1 else divisors)


def gather_full(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Assemble the full tensor whose local part on this rank is ``local``, laid out like the DTensor ``like``.

    A collective (every rank must call it, in the same order); ``local`` itself when ``like`` is not a DTensor.
    """
    if not is_dtensor(like):
        return local
    full = (
        type(like)
        .from_local(  # type: ignore[attr-defined]
            local,
            like.device_mesh,  # type: ignore[attr-defined]
            like.placements,  # type: ignore[attr-defined]
            run_check=False,
            shape=like.shape,
            stride=like.stride(),
        )
        .full_tensor()
    )
    return full  # type: ignore[no-any-return]


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return this rank's block of ``full``, laid out like the DTensor ``like`` (no collective); ``full`` otherwise."""
    if not is_dtensor(like):
        return full
    shape, offset = _local_block(like)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))]


def reduce_sums(local: torch.Tensor, layout: ShardLayout | None, per_unit: bool = False) -> torch.Tensor:
    """The seam for the sums of a list of tensors: local sums in, full sums out (``local`` itself unsharded).

    Args:
        local: ``(tensors, k)``, or with ``per_unit`` ``(local units, k)`` (every tensor's local rows concatenated),
            sums over this process's part of each tensor (unit), for the tensors :func:`shard_layout` described.
        layout: Their layout; ``None`` or unsharded: no collective.
        per_unit: Whether the sums are per unit.

    Returns:
        ``(tensors, k)``, or with ``per_unit`` ``(global units, k)`` (every tensor's units, all of them): the full sums,
        the same on every process, from ONE ``all_reduce``.
    """
    if layout is None or not layout.sharded:
        return local
    if per_unit:
        rows = list(local.split(list(layout.local_rows)))
        return full_sums(layout.scatter_rows(rows), layout.row_divisors(local.device))
    return full_sums(local, layout.divisors(local.device))


def several_processes() -> bool:
    """Whether this process is one of several of a ``torch.distributed`` run (DDP's replicas, FSDP's shards).

    Such processes must not decide anything by their own timings where the decision changes the arithmetic
    (``implementation="auto"``): each would decide at other steps, or otherwise, and DDP's replicas would no longer be
    bit-identical.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
