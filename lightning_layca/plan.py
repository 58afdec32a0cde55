"""The step plan: which implementation steps which layer, in which bucket, with which snapshot.

The controlled layers are split into **buckets**: layers of one device and dtype, in depth order, cut into runs of a
few MiB on CPU when they take the eager step, so that a bucket stays cache-resident across its passes (the compiled
kernels read each layer on their own: their layers stay in one bucket, so that consecutive layers share calls). A
bucket is not a torch param group: a param group is the wrapped optimizer's, a bucket the plan's. Each layer of a
bucket takes one **path**:

* ``"compiled+base"``: the compiled kernel takes the base optimizer's step and the Layca step together (around
  ``torch.optim.SGD``, ``Adam``, ``AdamW``; see :mod:`lightning_layca.step.families`); no snapshot is needed;
* ``"compiled"``: the base optimizer steps, then the compiled kernel turns its step into a Layca step, from a snapshot;
* ``"eager"``: the base optimizer steps, then the eager step (:mod:`lightning_layca.step.eager`), from a snapshot.
  Sharded layers take it under ``"auto"``, with their sums combined through the seam.

With ``implementation="compiled"``, sharded layers take either compiled path in two halves around the seam's one
collective: their local sums (having taken the base step's state, on ``"compiled+base"``), then the update from the
full sums.

The fallback chain is that order: a layer whose base step the kernel cannot take at some step (no readable gradient,
a state it cannot read) takes the base step and the next path at that step; a kernel that fails to compile gives its
layers to the eager step. :meth:`StepPlan.describe` tells which path each layer takes. With
``implementation="auto"`` the eager path is taken until :class:`~lightning_layca.auto_choice.AutoChoice` decides for
the compiled one. A plan made
with an ``eager_reason`` (a per-unit rotation target: its rates are per row, the kernels take one rate per layer)
gives every layer the eager path, whatever the implementation.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.optim import Optimizer

from lightning_layca.auto_choice import AutoChoice
from lightning_layca.compiling import kernel_view, parallel_kernel, scalars, unit_view
from lightning_layca.distributed import ShardLayout, local_shard, shard_layout
from lightning_layca.layers import LayerRegistry
from lightning_layca.step.compiled import use_compiled_step
from lightning_layca.step.families import family_of
from lightning_layca.step.sgd_form import SgdForms
from lightning_layca.sums import unit_counts

__all__ = [
    "COMPILED",
    "EAGER",
    "WITH_BASE",
    "Bucket",
    "StepPlan",
    "local_unit_norms",
]

EAGER, COMPILED, WITH_BASE = "eager", "compiled", "compiled+base"
"""The paths a layer can take (see the module docstring)."""

CPU_BUCKET_BYTES: int | None = 4 * 2**20
"""On CPU, layers that take the eager step are stepped in buckets of at most this many bytes (a larger layer forms its
own), so that a bucket stays cache-resident across the passes of one step; ``None``: one bucket per device and dtype.
Layers that take a compiled path form one bucket per device and dtype whatever this says."""


@dataclass
class Bucket:
    """Controlled layers of one device and dtype, their snapshot buffers, paths and device-side values.

    Positions index the bucket's layers; ``indices`` maps them to the registry's candidates.
    """

    indices: list[int]
    params: list[torch.Tensor]
    previous: list[torch.Tensor]
    """Per layer, its snapshot: the weights before the base step (this process's shard of a sharded layer)."""
    shapes: list[tuple[torch.device, torch.dtype, torch.Size]]
    """The device, dtype and shape of each layer (local shard) when the bucket was built."""
    initial_norms: torch.Tensor
    """Per layer, or per unit (rows of the bucket's layers, concatenated) with ``granularity="unit"``."""
    near_floor: torch.Tensor
    """Per layer: whether a step of the layer (of one of its units) came near the rounding floor."""
    row_layer: torch.Tensor | None = None
    """With ``granularity="unit"``: the position of the layer each row belongs to."""
    eligible: bool = False
    """Whether the compiled step may take these layers (``implementation="auto"`` times the buckets that are)."""
    paths: list[str] = field(default_factory=list)
    """Per layer, its path (see the module docstring)."""
    views: list[torch.Tensor | None] = field(default_factory=list)
    """Per layer, the 2-D view of its weights the compiled kernels read (``None`` on the eager path)."""
    parallel: list[bool] = field(default_factory=list)
    norm_scalars: list[torch.Tensor] = field(default_factory=list)
    flag_scalars: list[torch.Tensor] = field(default_factory=list)
    rate_scalars: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    """``rho`` and the relative learning rate of every layer, as the compiled kernels read them."""
    rates: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    relative_lrs: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    rates_version: int = -1
    kept: list[int] = field(default_factory=list)
    """Positions whose snapshot holds the weights before the latest step."""
    hyper_values: list[tuple[float, ...]] = field(default_factory=list)
    hyper_rows: list[torch.Tensor] = field(default_factory=list)
    subsets: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    """Device index tensors of a subset of the layers: their positions, their rows, and per row the position of its
    layer in the subset (built once per subset)."""

    @property
    def per_unit(self) -> bool:
        """Whether the layers step per unit."""
        return self.row_layer is not None

    def at(self, path: str) -> list[int]:
        """The positions of the layers on ``path``."""
        return [j for j, p in enumerate(self.paths) if p == path]

    def local(self) -> list[torch.Tensor]:
        """The layers as this process holds them (detached local shards of sharded layers)."""
        # The local part detached, rather than the DTensor: a DTensor's detach dispatches, a tensor's does not.
        return [local_shard(p).detach() for p in self.params]

    def subset(self, chosen: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Device index tensors of the layers at ``chosen``: positions, rows, and per row its layer in the subset."""
        key = tuple(chosen)
        if key not in self.subsets:
            device = self.near_floor.device
            at = torch.tensor(key, dtype=torch.long)
            if self.row_layer is None:
                self.subsets[key] = at.to(device), at.to(device), None
            else:
                counts = unit_counts(self.local())  # not the snapshots: empty on "compiled+base" (see snapshot)
                starts = [sum(counts[:j]) for j in range(len(counts))]
                rows = torch.cat([torch.arange(starts[j], starts[j] + counts[j]) for j in key])
                row_layer = torch.repeat_interleave(torch.arange(len(key)), torch.tensor([counts[j] for j in key]))
                self.subsets[key] = at.to(device), rows.to(device), row_layer.to(device)
        return self.subsets[key]

    def snapshot(self, positions: Sequence[int]) -> None:
        """Copy the current weights of the layers at ``positions`` into their snapshots.

        Layers on the ``"compiled+base"`` path have a snapshot only at the steps that need one (allocated then,
        released at the next step that does not): their memory is not held between logging steps.
        """
        for j in set(self.at(WITH_BASE)).difference(positions):
            if self.previous[j].numel():
                self.previous[j] = torch.empty(0, device=self.previous[j].device, dtype=self.previous[j].dtype)
        for j in positions:
            if self.previous[j].shape != self.shapes[j][2]:
                self.previous[j] = torch.empty_like(local_shard(self.params[j]).detach())
        if len(positions) == len(self.params):
            torch._foreach_copy_(self.previous, self.local())
        elif positions:
            torch._foreach_copy_(
                [self.previous[j] for j in positions], [local_shard(self.params[j]).detach() for j in positions]
            )


class StepPlan:
    """The buckets of the controlled layers and the path of each layer (see the module docstring).

    Args:
        implementation: ``"auto"``, ``"eager"`` or ``"compiled"``.
        per_unit: Whether layers step per unit.
        eager_reason: Why every layer must take the eager path (``None``: none); with ``implementation="compiled"``
            it is given in a warning.
    """

    def __init__(self, implementation: str, per_unit: bool, eager_reason: str | None = None) -> None:
        self.eager_reason = eager_reason
        """Why every layer takes the eager path, or ``None``."""
        if eager_reason is not None and implementation == "compiled":
            warnings.warn(f"Layca: implementation='compiled' does not apply: {eager_reason}.", stacklevel=3)
        self.implementation = implementation
        self.per_unit = per_unit
        self.auto = AutoChoice() if implementation == "auto" else None
        self.buckets: list[Bucket] | None = None
        self._stepped: list[Bucket] | None = None  # the buckets of the latest step, with the weights they kept
        self._switching = False
        self.layout: ShardLayout | None = None
        """How the step's layers lie over the processes, when some are sharded (``None`` otherwise)."""
        self.sgd_forms = SgdForms()
        """Per (device type, dtype), whether SGD's ``"compiled+base"`` layers take one call or two halves
        (:mod:`lightning_layca.step.sgd_form`): chosen at their first compiled step, kept in the state dict."""

    def invalidate(self) -> None:
        """Rebuild the buckets at the next step (the controlled layers changed)."""
        self.buckets = self._stepped = None

    def switch(self) -> None:
        """Rebuild the buckets at the next step, for the other implementation (``"auto"``).

        Until then the buckets of the latest step stay, with the weights they kept before it
        (:meth:`weights_before_last_step`): a logging step that changes implementation still has them.
        """
        self._switching = True

    def __getstate__(self) -> dict[str, object]:
        # Snapshot buffers are scratch space, rebuilt at the next step.
        return {**self.__dict__, "buckets": None, "_stepped": None}

    def for_step(self, registry: LayerRegistry, optimizer: Optimizer) -> list[Bucket]:
        """The buckets of the coming step, which then holds the weights before it (:meth:`weights_before_last_step`)."""
        self._stepped = self._coming(registry, optimizer)
        return self._stepped

    def _coming(self, registry: LayerRegistry, optimizer: Optimizer) -> list[Bucket]:
        """The buckets of the coming step: built anew when a layer's device, dtype or shape changed."""
        buckets = self.buckets
        if (
            buckets is None
            or self._switching
            or any(
                (x.device, x.dtype, x.shape) != shape
                for b in buckets
                for x, shape in zip(b.local(), b.shapes, strict=True)
            )
        ):
            buckets = self.buckets = self._build(registry, optimizer)
            self._switching = False
        return buckets

    def describe(self, registry: LayerRegistry, optimizer: Optimizer) -> dict[str, str]:
        """Return ``{layer name: path}`` of every controlled layer for the coming step (see the module docstring).

        The latest step's buckets, and the weights they kept before it, stay until the next step.
        """
        buckets = self._coming(registry, optimizer)
        return {registry.names[b.indices[j]]: path for b in buckets for j, path in enumerate(b.paths)}

    def weights_before_last_step(self, registry: LayerRegistry) -> dict[str, torch.Tensor]:
        """The snapshots that hold the weights before the latest step, keyed by parameter name (no copy)."""
        return {registry.names[b.indices[j]]: b.previous[j] for b in self._stepped or [] for j in b.kept}

    def _build(self, registry: LayerRegistry, optimizer: Optimizer) -> list[Bucket]:
        params = registry.params
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i in registry.controlled:
            by_key[(params[i].device, params[i].dtype)].append(i)
        order = [i for indices in by_key.values() for i in indices]
        layout = shard_layout([params[i] for i in order])
        self.layout = layout if layout.sharded else None
        position = {i: k for k, i in enumerate(order)}
        # Sharded layers take the compiled step when asked for (the two halves of their kernels around the one
        # collective: see stepping.rotate_sharded); "auto" times no sharded step and keeps them eager.
        if self.layout is None:
            compiled_now = self.auto is None or self.auto.compiled
        else:
            compiled_now = self.implementation == "compiled"
        family = family_of(optimizer)
        chunks: list[tuple[list[int], bool]] = []
        for (device, dtype), indices in by_key.items():
            eligible = self.eager_reason is None and use_compiled_step(self.implementation, device, dtype)
            # The eager step's passes stay in cache within a bucket of a few MiB; a compiled kernel reads each layer
            # on its own, and its calls group consecutive layers across the whole bucket (fewer calls).
            one_bucket = eligible and compiled_now
            limit = CPU_BUCKET_BYTES if device.type == "cpu" and not one_bucket else None
            chunks.extend((chunk, eligible) for chunk in _chunks(indices, params, limit))
        buckets = []
        for indices, eligible in chunks:
            device = params[indices[0]].device
            local = [local_shard(params[i].detach()) for i in indices]
            row_layer = None
            # A sharded layer joining at this step gets its initial norm from the step's own sums (NaN until then).
            if self.per_unit:
                norms = torch.cat([local_unit_norms(registry, i, layout, position[i]) for i in indices])
                counts = torch.tensor([layout.local_rows[position[i]] for i in indices], device=device)
                row_layer = torch.repeat_interleave(torch.arange(len(indices), device=device), counts)
            else:
                norms = torch.tensor([_nan_if_none(registry.initial_norms[i]) for i in indices], dtype=torch.float64)
            bucket = Bucket(
                indices=indices,
                params=[params[i] for i in indices],
                previous=[torch.empty_like(x) for x in local],
                shapes=[(x.device, x.dtype, x.shape) for x in local],
                initial_norms=norms.to(device),
                near_floor=torch.zeros(len(indices), dtype=torch.bool, device=device),
                row_layer=row_layer,
                eligible=eligible and self.layout is None,
                paths=[EAGER] * len(indices),
                views=[None] * len(indices),
                parallel=[False] * len(indices),
            )
            if eligible and compiled_now:
                view = unit_view if self.per_unit else kernel_view
                for j, (i, x) in enumerate(zip(indices, local, strict=True)):
                    if view(x) is None:
                        continue
                    group = optimizer.param_groups[registry.param_group_of[i]]
                    bucket.paths[j] = WITH_BASE if family is not None and family.supports(group) else COMPILED
                    bucket.views[j] = view(x)
                    bucket.parallel[j] = parallel_kernel(x)
                for j in bucket.at(WITH_BASE):  # no snapshot until one is needed (see Bucket.snapshot)
                    bucket.previous[j] = torch.empty(0, device=device, dtype=local[j].dtype)
                counts_ = unit_counts(local) if self.per_unit else None
                norms_ = bucket.initial_norms
                bucket.norm_scalars = [n.clone() for n in norms_.split(counts_)] if counts_ else scalars(norms_)
                bucket.flag_scalars = scalars(bucket.near_floor)
                if EAGER in bucket.paths and bucket.paths != [EAGER] * len(indices):
                    bucket.subset(bucket.at(EAGER))  # index tensors built now, not in a step (that would sync)
            buckets.append(bucket)
        return buckets


def _chunks(indices: list[int], layers: list[torch.Tensor], max_bytes: int | None) -> list[list[int]]:
    """Split consecutive layer indices into runs of at most ``max_bytes`` (a larger layer forms its own run)."""
    if max_bytes is None:
        return [indices]
    out: list[list[int]] = [[]]
    size = 0
    for i in indices:
        nbytes = layers[i].numel() * layers[i].element_size()
        if out[-1] and size + nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(i)
        size += nbytes
    return out


def local_unit_norms(registry: LayerRegistry, i: int, layout: ShardLayout, position: int) -> torch.Tensor:
    """The initial norms of the units of layer ``i`` this process holds (NaN while the layer has not joined)."""
    norms = registry.initial_unit_norms[i]
    if norms is None:
        return torch.full((layout.local_rows[position],), math.nan, dtype=torch.float64)
    start = layout.row_starts[position]
    return norms[start : start + layout.local_rows[position]]


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value
