"""Which parameters are *layers*: the weight tensors whose rotation is measured and controlled.

A layer is a trainable parameter of rank >= 2 (a Linear, Conv or Embedding kernel), taken in ``named_parameters()``
order, which is the model's depth order. ``include`` and ``exclude`` refine the selection with ``fnmatch`` patterns on
parameter names; a pattern that matches nothing is a mistake and raises an error that lists the available names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch

__all__ = ["layer_display_name", "select_layers"]


def as_patterns(what: str, patterns: object) -> list[str]:
    """Return ``patterns`` (``None``, one pattern or a sequence of them) as a list; ``ValueError`` otherwise.

    ``what`` names the argument in the message, for example ``"LayerRotationMonitor: `include`"``.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{what} must be a string or a list of strings, got {patterns!r}.")
    return list(patterns)


def select_layers(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    trainable_only: bool = True,
) -> list[tuple[str, torch.Tensor]]:
    """Select the layers among named parameters.

    Args:
        named_parameters: ``(name, parameter)`` pairs, for example ``model.named_parameters()``.
        include: Patterns; when given, exactly the trainable parameters whose name matches one of them are
            selected, whatever their rank (``include="fc.*"`` selects ``fc.bias`` too; use ``"fc.weight"``).
        exclude: Patterns; matching parameters are never layers.
        trainable_only: Consider only parameters with ``requires_grad`` (the default). ``False`` also considers
            frozen ones, which may be trained later (fine-tuning callbacks unfreeze them).

    Returns:
        The selected ``(name, parameter)`` pairs, in the given order.

    Raises:
        ValueError: When a pattern matches no parameter name.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> [name for name, _ in select_layers(model.named_parameters(), exclude="2.*")]
        ['0.weight']
    """
    named = [(name, p) for name, p in named_parameters if p.requires_grad or not trainable_only]
    names = [name for name, _ in named]
    include_patterns = as_patterns("`include`", include)
    exclude_patterns = as_patterns("`exclude`", exclude)
    for what, patterns in (("include", include_patterns), ("exclude", exclude_patterns)):
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                raise ValueError(
                    f"`{what}` pattern {pattern!r} matches no {'trainable ' if trainable_only else ''}parameter. "
                    f"Available names: {', '.join(names)}."
                )

    def chosen(name: str, p: torch.Tensor) -> bool:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude_patterns):
            return False
        if include_patterns:
            return any(fnmatch.fnmatchcase(name, pattern) for pattern in include_patterns)
        return p.ndim >= 2

    return [(name, p) for name, p in named if chosen(name, p)]


def layer_display_name(parameter_name: str) -> str:
    """Return the name under which a layer is logged: the parameter name without a trailing ``.weight``.

    Example:
        >>> layer_display_name("features.0.weight"), layer_display_name("embedding")
        ('features.0', 'embedding')
    """
    return parameter_name.removesuffix(".weight")
