"""The layers' initial weights, their distance from them, and the rotation that moves a layer along that distance.

A rotation target (:mod:`lightning_layca.targets`) needs, for every controlled layer, its weights at the start of
training: to measure how far it has turned (the cosine distance ``1 - <w, w0> / (||w|| ||w0||)``, from float64 sums
of this process's shard, added over processes through the one seam when sharded) and, when it steers, to turn the
layer further along the great circle through ``w0``. :class:`StartWeights` keeps them, one copy of its own or the
monitor's snapshots shared, by the layer's index among the controller's candidate layers.

Example:
    >>> import torch
    >>> start = StartWeights(per_unit=False)
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    >>> start.snapshot([0], [w])
    >>> with torch.no_grad():
    ...     _ = w.copy_(torch.tensor([0.0, 1.0]))
    >>> start.distances([0], [w])
    [[1.0]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_layca.distributed import local_shard, reduce_sums, shard_layout
from lightning_layca.rotation import distances_from_sums
from lightning_layca.sums import float64_sums, row_view, unit_counts

__all__ = ["StartWeights", "distances_of", "plane_rotation"]


def distances_of(sums: torch.Tensor) -> list[float]:
    """Each unit's cosine distance from its ``(units, 3)`` sums ``(<w, w0>, <w0, w0>, <w, w>)``.

    The monitor's :func:`~lightning_layca.rotation.distances_from_sums`, except that a unit whose current or initial
    weights are all zero is at distance 0 rather than NaN: a control loop needs a number.
    """
    _, initial_sq, current_sq = sums.unbind(1)
    distances = torch.where(initial_sq * current_sq > 0, distances_from_sums(sums), 0.0)
    return [float(x) for x in distances.tolist()]


def plane_rotation(sums: torch.Tensor, deltas: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, beta)`` per unit such that ``alpha w + beta w0`` is ``w`` turned by ``delta`` away from ``w0``.

    In the plane of ``w`` and ``w0``, keeping ``||w||``: with ``phi`` the angle between them,
    ``alpha = cos(delta) + cos(phi) sin(delta) / sin(phi)`` and ``beta = -sin(delta) ||w|| / (||w0|| sin(phi))``, so
    the angle becomes ``phi + delta`` (a negative ``delta`` turns towards ``w0``). A unit with ``phi = 0`` (no plane),
    a zero norm or ``delta = 0`` gets ``(1, 0)``: left as it is.

    Args:
        sums: ``(units, 3)`` float64 sums ``(<w, w0>, <w0, w0>, <w, w>)`` of the whole layer (all processes).
        deltas: The angle (radians) to turn each unit by.
    """
    dot, initial_sq, current_sq = sums.unbind(1)
    delta = torch.tensor(list(deltas), dtype=torch.float64, device=sums.device)
    scale = (initial_sq * current_sq).sqrt()
    usable = (scale > 0) & (delta != 0)
    cosine = torch.where(usable, dot / torch.where(usable, scale, 1.0), 1.0).clamp(-1.0, 1.0)
    sine = (1.0 - cosine * cosine).clamp_min(0.0).sqrt()
    usable &= sine > 0
    safe_sine = torch.where(usable, sine, 1.0)
    ratio = (current_sq / torch.where(usable, initial_sq, 1.0)).sqrt()
    alpha = torch.where(usable, torch.cos(delta) + cosine * torch.sin(delta) / safe_sine, 1.0)
    beta = torch.where(usable, -torch.sin(delta) * ratio / safe_sine, 0.0)
    return alpha, beta


class StartWeights:
    """Every candidate layer's initial weights (this process's shard), owned or shared, and the distance from them.

    Args:
        per_unit: Whether distances and rotations are per output unit (rows of
            :func:`lightning_layca.sums.row_view`) rather than per layer.
    """

    def __init__(self, per_unit: bool) -> None:
        self.per_unit = per_unit
        self.tensors: dict[int, torch.Tensor] = {}
        """Candidate index -> its initial weights (this process's shard)."""
        self.owned: set[int] = set()
        """The indices whose initial weights are copies of this object's own (saved in its state)."""

    def reindex(self, old: Sequence[str], names: Sequence[str]) -> None:
        """The candidates were ``old`` and are now ``names``: keep the weights of the names in both."""
        self.tensors = {names.index(old[i]): t for i, t in self.tensors.items() if old[i] in names}
        self.owned = {names.index(old[i]) for i in self.owned if old[i] in names}

    def share(self, names: Sequence[str], weights: Mapping[str, torch.Tensor]) -> None:
        """Use these initial weights (by layer name, e.g. a monitor's snapshots) instead of copies of its own."""
        for name, tensor in weights.items():
            if name in names:
                i = list(names).index(name)
                self.tensors[i] = tensor
                self.owned.discard(i)

    def snapshot(self, indices: Sequence[int], params: Sequence[torch.Tensor]) -> None:
        """Copy the weights of the layers at ``indices`` that have no initial weights yet."""
        for i in indices:
            if i not in self.tensors:
                self.tensors[i] = local_shard(params[i].detach()).clone()
                self.owned.add(i)

    def units(self, param: torch.Tensor) -> int:
        """How many loops a layer is: its units (rows, the global count if sharded) with ``per_unit``, else 1."""
        return unit_counts([param])[0] if self.per_unit else 1

    def sums(self, indices: Sequence[int], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer at ``indices``, its ``(units, 3)`` float64 sums ``(<w, w0>, <w0, w0>, <w, w>)``.

        One collective if sharded; one unit per layer unless ``per_unit``.
        """
        chosen = [params[i] for i in indices]
        local = float64_sums(
            [local_shard(p.detach()) for p in chosen], [self.tensors[i] for i in indices], self.per_unit
        )
        layout = shard_layout(chosen)
        full = reduce_sums(local, layout if layout.sharded else None, self.per_unit)
        return list(full.split([self.units(p) for p in chosen]))

    def distances(self, indices: Sequence[int], params: Sequence[torch.Tensor]) -> list[list[float]]:
        """The cosine distance to their initial weights of the layers at ``indices`` (per unit with ``per_unit``)."""
        return [distances_of(layer) for layer in self.sums(indices, params)] if indices else []

    def rotate(self, i: int, param: torch.Tensor, deltas: Sequence[float], sums: torch.Tensor) -> None:
        """Turn layer ``i`` (each unit by its ``delta``) in the plane of its weights and initial weights, in place.

        ``w <- alpha w + beta w0`` (:func:`plane_rotation`), computed in float64 and rounded once to the layer's
        dtype, on this process's shard (``sums`` are the whole layer's).
        """
        weights = local_shard(param.detach())
        if weights.numel() == 0:
            return
        alpha, beta = plane_rotation(sums, deltas)
        rows = row_view(weights) if self.per_unit else weights.reshape(1, -1)
        start = row_view(self.tensors[i]) if self.per_unit else self.tensors[i].reshape(1, -1)
        device = rows.device
        turned = alpha.to(device)[:, None] * rows.double() + beta.to(device)[:, None] * start.double()
        weights.copy_(turned.reshape(weights.shape))

    def state(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The initial weights it owns, by layer name (shared ones are their owner's to save)."""
        return {names[i]: self.tensors[i].clone() for i in sorted(self.owned)}

    def load(self, names: Sequence[str], state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state`; weights shared with a monitor are left to the monitor, which restores its own."""
        for name, tensor in state.items():
            i = list(names).index(name)
            if i in self.tensors and i not in self.owned:
                continue
            self.tensors[i] = tensor.detach().clone()
            self.owned.add(i)
