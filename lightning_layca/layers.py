"""The layer registry of a :class:`~lightning_layca.Layca`: which parameters are layers, and their initial norms.

Which are stepped now is part of it too.

* **Candidates**: the selected layers (``include``/``exclude``, ``ndim >= 2``; see :mod:`lightning_layca.selection`)
  among the optimizer's parameters and the frozen parameters that may be trained later, in ``named_parameters``
  order, which is depth order. A param group added later (fine-tuning) adds its new layers in their place.
* **Controlled**: the candidates stepped now, in a param group and trainable; recomputed cheaply before every step.
* **Initial norms**: recorded when a layer is first controlled (frozen until then, so its weights are its initial
  weights), by ONE recorder (:meth:`LayerRegistry.record_initial_norms`) fed with float64 squared norms per unit: from
  the registry's own sums for full tensors, from the step's own sums for sharded layers (no collective of their own).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Any

import torch

from lightning_layca.distributed import is_dtensor, local_shard, reduce_sums, shard_layout
from lightning_layca.selection import filter_layers, select_layers
from lightning_layca.sums import float64_sums

__all__ = ["LayerRegistry"]


class LayerRegistry:
    """The candidate layers of one optimizer, the controlled ones, and their initial norms (see the module docstring).

    Args:
        base_params: The wrapped optimizer's parameters, in its order.
        named_parameters: ``(name, parameter)`` pairs naming every parameter of the optimizer (and frozen ones that may
            be trained later); ``None`` names them ``"param{i}"``.
        include: ``fnmatch`` patterns (a list).
        exclude: ``fnmatch`` patterns (a list).
        per_unit: Whether initial norms are also kept per unit (``granularity="unit"``).

    Raises:
        TypeError: For ``named_parameters`` that are not ``(name, parameter)`` pairs.
        ValueError: For a parameter the names do not cover, a pattern that matches nothing, no layer, or a complex or
            sparse layer.
    """

    def __init__(
        self,
        base_params: list[torch.Tensor],
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
        include: list[str],
        exclude: list[str],
        per_unit: bool,
    ) -> None:
        self.include, self.exclude, self.per_unit = include, exclude, per_unit
        self._named = _name_parameters(base_params, named_parameters)
        in_optimizer = {id(p) for p in base_params}
        # A frozen parameter outside the optimizer may be added to it later (fine-tuning): it is a candidate layer.
        eligible = [(name, p) for name, p in self._named.values() if id(p) in in_optimizer or not p.requires_grad]
        layers = select_layers(eligible, include=include or None, exclude=exclude or None, trainable_only=False)
        if not layers:
            raise ValueError(
                "Layca: no parameter selected as a layer (default: parameters with ndim >= 2). "
                f"Available names: {', '.join(name for name, _ in eligible)}."
            )
        for name, p in layers:
            _check_layer(name, p)
        self.names: list[str] = [name for name, _ in layers]
        """Parameter names of the candidate layers, in depth order."""
        self.params: list[torch.Tensor] = [p for _, p in layers]
        self.initial_norms: list[float | None] = [None] * len(layers)
        """Per candidate, its initial norm (``None`` until it is first controlled)."""
        self.initial_unit_norms: list[torch.Tensor | None] = [None] * len(layers)
        """With ``per_unit``: per candidate, its initial norm per unit (float64, on the CPU)."""
        self.controlled: list[int] = []
        """Indices of the candidates stepped now, in depth order."""
        self.param_group_of: dict[int, int] = {}
        """Candidate index -> index of the param group that holds it (candidates in a param group only)."""
        self.joining: list[int] = []
        """Sharded candidates controlled from the coming step whose initial norms the step's sums will give."""
        self._key: Hashable = None

    # ------------------------------------------------------------------ which layers are stepped
    def update(self, param_groups: list[dict[str, Any]]) -> bool:
        """Recompute the controlled layers (in a param group and trainable); return whether they changed.

        Layers controlled for the first time get their initial norms now (full tensors) or from the coming step's
        sums (sharded layers, listed in :attr:`joining`).
        """
        key = (
            tuple(id(group["params"]) for group in param_groups),
            tuple(len(group["params"]) for group in param_groups),
            tuple(p.requires_grad for p in self.params),
        )
        if key == self._key:
            return False
        group_of = {id(p): g for g, group in enumerate(param_groups) for p in group["params"]}
        self.param_group_of = {i: group_of[id(p)] for i, p in enumerate(self.params) if id(p) in group_of}
        self.controlled = [i for i in self.param_group_of if self.params[i].requires_grad]
        joining = [i for i in self.controlled if not self.has_initial_norms(i)]
        if any(is_dtensor(self.params[i]) for i in joining):
            self.joining = joining
        else:
            self.joining = []
            if joining:
                self._measure_initial_norms(joining)
        self._key = key
        return True

    def invalidate(self) -> None:
        """Have the next :meth:`update` recompute everything (after a state was loaded)."""
        self._key = None

    def has_initial_norms(self, i: int) -> bool:
        """Whether candidate ``i``'s initial norms (per unit too, with ``per_unit``) are known."""
        return self.initial_norms[i] is not None and (not self.per_unit or self.initial_unit_norms[i] is not None)

    def add(self, params: list[torch.Tensor]) -> bool:
        """Take in the parameters of a param group added to the optimizer; return whether candidates were added.

        Parameters the selection rule accepts (patterns need not match among them) take their place in depth order.
        """
        known = {id(p) for p in self.params}
        new = []
        for p in params:
            if id(p) not in self._named:
                self._named[id(p)] = (f"param{len(self._named)}", p)
            if id(p) not in known:
                new.append(self._named[id(p)])
        selected = filter_layers(new, self.include, self.exclude)
        for name, p in selected:
            _check_layer(name, p)
        if not selected:
            return False
        order = {id(p): k for k, (_, p) in enumerate(self._named.values())}
        rows = list(zip(self.names, self.params, self.initial_norms, self.initial_unit_norms, strict=True))
        rows += [(name, p, None, None) for name, p in selected]
        rows.sort(key=lambda row: order[id(row[1])])
        self.names = [row[0] for row in rows]
        self.params = [row[1] for row in rows]
        self.initial_norms = [row[2] for row in rows]
        self.initial_unit_norms = [row[3] for row in rows]
        self._key = None
        return True

    # ------------------------------------------------------------------ initial norms: one recorder
    def record_initial_norms(self, indices: list[int], unit_squares: list[torch.Tensor]) -> None:
        """Record the initial norms of candidates from their squared norms per unit (float64).

        Args:
            indices: The candidates.
            unit_squares: Per candidate, ``<w, w>`` of each of its units (one value for the whole layer is accepted
                with ``per_unit=False``), full sums.

        Raises:
            ValueError: For a layer whose weights are all zero or not finite.
        """
        for i, squares in zip(indices, unit_squares, strict=True):
            squares = squares.to(device="cpu", dtype=torch.float64)
            norm = math.sqrt(float(squares.sum()))
            if not norm > 0 or not math.isfinite(norm):
                raise ValueError(
                    f"Layca: layer {self.names[i]!r} has weights of norm {norm}; Layca cannot rotate a zero (or "
                    f"non-finite) vector. Initialise it differently or leave it to the base optimizer with "
                    f"exclude={self.names[i]!r}."
                )
            self.initial_norms[i] = norm
            if self.per_unit:
                self.initial_unit_norms[i] = squares.sqrt()
        self.joining = [i for i in self.joining if i not in set(indices)]

    def _measure_initial_norms(self, indices: list[int]) -> None:
        """Float64 sums over each process's part, through the seam: one collective when the layers are sharded."""
        layers = [self.params[i].detach() for i in indices]
        layout = shard_layout(layers)
        local = [local_shard(p) for p in layers]
        squares = float64_sums(local, local, per_unit=True)[:, 1:2]  # per local unit: <w, w>
        full = reduce_sums(squares, layout, per_unit=True).squeeze(1)
        self.record_initial_norms(indices, list(full.split(list(layout.rows))))

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """The registry's part of Layca's state: layer names, initial norms and the granularity they were taken at."""
        return {
            "layer_names": list(self.names),
            "initial_norms": list(self.initial_norms),
            "initial_unit_norms": list(self.initial_unit_norms),
            "granularity": self._granularity,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (checked first with :meth:`check`)."""
        self.initial_norms = [None if x is None else float(x) for x in state["initial_norms"]]
        self.initial_unit_norms = list(state.get("initial_unit_norms", [None] * len(self.names)))
        self._key = None

    def check(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` when ``state`` was saved for other layers or another granularity."""
        if list(state["layer_names"]) != self.names:
            raise ValueError(
                f"Layca: the state dict was saved for layers {state['layer_names']!r}, but this optimizer controls "
                f"{self.names!r}."
            )
        if state.get("granularity", "layer") != self._granularity:
            raise ValueError(
                f"Layca: the state dict was saved with granularity={state.get('granularity', 'layer')!r}, but "
                f"this optimizer has granularity={self._granularity!r}."
            )

    @property
    def _granularity(self) -> str:
        return "unit" if self.per_unit else "layer"


def _name_parameters(
    base_params: list[torch.Tensor], named_parameters: Iterable[tuple[str, torch.Tensor]] | None
) -> dict[int, tuple[str, torch.Tensor]]:
    """Return ``id(parameter) -> (name, parameter)`` in ``named_parameters`` order (tied weights: first name)."""
    if named_parameters is None:
        return {id(p): (f"param{i}", p) for i, p in enumerate(base_params)}
    named: dict[int, tuple[str, torch.Tensor]] = {}
    for pair in named_parameters:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TypeError(f"Layca: `named_parameters` must yield (name, parameter) pairs, got {pair!r}.")
        named.setdefault(id(pair[1]), pair)
    missing = [i for i, p in enumerate(base_params) if id(p) not in named]
    if missing:
        shapes = ", ".join(f"#{i} {tuple(base_params[i].shape)}" for i in missing[:10])
        raise ValueError(
            f"Layca: {len(missing)} parameter(s) of the optimizer are not named by `named_parameters` ({shapes}). "
            "Pass the named_parameters() of the module whose parameters the optimizer trains."
        )
    return named


def _check_layer(name: str, p: torch.Tensor) -> None:
    if p.is_complex() or not p.is_floating_point():
        raise ValueError(f"Layca: layer {name!r} has dtype {p.dtype}; only real floating-point layers rotate.")
    if p.is_sparse:
        raise ValueError(f"Layca: layer {name!r} is sparse; exclude it (exclude={name!r}).")
