"""Which parameters are *layers*: the weight tensors whose rotation is measured and controlled.

A layer is a trainable real floating-point parameter of rank >= 2 (a Linear, Conv or Embedding kernel), taken in
``named_parameters()`` order, which is the model's depth order. ``include`` and ``exclude`` refine the selection with
``fnmatch`` patterns on parameter names; a pattern that matches nothing is a mistake and raises an error that lists the
available names.

Layers can also join later: fine-tuning freezes part of a model at the start and trains it from some epoch on
(``requires_grad`` flipped, a parameter group added). ``select_layers(..., trainable_only=False)`` returns the
*candidates*, every parameter the rules accept whether it is trainable now or not; the callers watch them and start
controlling or measuring a candidate when it first becomes trainable. Complex parameters are never layers: a rotation
of a complex vector needs a conjugated inner product and a different notion of angle, so they are left out by default
and an error when ``include`` names one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch

from lightning_layca.argument_types import as_patterns, check_patterns_match

__all__ = ["filter_layers", "layer_display_name", "select_layers"]


def select_layers(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    trainable_only: bool = True,
) -> list[tuple[str, torch.Tensor]]:
    """Select the layers among named parameters.

    Args:
        named_parameters: ``(name, parameter)`` pairs, for example ``model.named_parameters()``.
        include: Patterns; when given, exactly the parameters whose name matches one of them are selected, whatever
            their rank (``include="fc.*"`` selects ``fc.bias`` too; use ``"fc.weight"``).
        exclude: Patterns; matching parameters are never layers.
        trainable_only: Whether only parameters with ``requires_grad`` count. With ``False`` the result holds the
            candidate layers, frozen ones included, and ``include`` may name a frozen parameter: the callbacks use
            this to pick up layers that fine-tuning unfreezes later.

    Returns:
        The selected ``(name, parameter)`` pairs, in the given order. By default (no ``include``), parameters that
        are not real floating-point (complex, integer) are left out.

    Raises:
        ValueError: When a pattern matches no parameter name, or ``include`` selects a parameter that is not real
            floating-point (complex, integer).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> [name for name, _ in select_layers(model.named_parameters(), exclude="2.*")]
        ['0.weight']
        >>> _ = model[0].requires_grad_(False)  # frozen now, trained later
        >>> [name for name, _ in select_layers(model.named_parameters())]
        ['2.weight']
        >>> [name for name, _ in select_layers(model.named_parameters(), trainable_only=False)]
        ['0.weight', '2.weight']
    """
    named = [(name, p) for name, p in named_parameters if p.requires_grad or not trainable_only]
    names = [name for name, _ in named]
    include_patterns = as_patterns("`include`", include)
    exclude_patterns = as_patterns("`exclude`", exclude)
    kind = "trainable parameter" if trainable_only else "parameter"
    check_patterns_match("`include`", include_patterns, names, kind)
    check_patterns_match("`exclude`", exclude_patterns, names, kind)

    return filter_layers(named, include_patterns, exclude_patterns)


def filter_layers(
    named: Iterable[tuple[str, torch.Tensor]], include: Sequence[str], exclude: Sequence[str]
) -> list[tuple[str, torch.Tensor]]:
    """The selection rule of :func:`select_layers` without its check that every pattern matches something.

    For parameters that join later (a param group added by fine-tuning), among which a pattern need not match.

    Args:
        named: ``(name, parameter)`` pairs.
        include: Patterns (a list, see :func:`~lightning_layca.argument_types.as_patterns`).
        exclude: Patterns.

    Raises:
        ValueError: When ``include`` selects a parameter that is not real floating-point (complex, integer).
    """

    def chosen(name: str, p: torch.Tensor) -> bool:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            return False
        if include:
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in include):
                return False
            if not _is_real_floating(p):
                raise ValueError(
                    f"`include` selects parameter {name!r}, which has dtype {p.dtype}: only real floating-point "
                    "parameters can be layers (a complex vector's angle needs a conjugated inner product). Leave it "
                    f"out of `include`, or add exclude={name!r}."
                )
            return True
        return p.ndim >= 2 and _is_real_floating(p)

    return [(name, p) for name, p in named if chosen(name, p)]


def _is_real_floating(p: torch.Tensor) -> bool:
    return p.is_floating_point() and not p.is_complex()


def layer_display_name(parameter_name: str) -> str:
    """Return the name under which a layer is logged: the parameter name without a trailing ``.weight``.

    Example:
        >>> layer_display_name("features.0.weight"), layer_display_name("embedding")
        ('features.0', 'embedding')
    """
    return parameter_name.removesuffix(".weight")
