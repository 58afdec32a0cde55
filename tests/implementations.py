"""The Layca implementations that every test of the step's arithmetic runs on: they must agree on every behaviour.

``"compiled"`` takes two forms: around ``torch.optim.SGD`` its kernel takes the SGD step itself (no snapshot), around
any other optimizer it works after the optimizer's step, from a snapshot. The third entry runs the second form around
SGD too: a test whose id contains :data:`AFTER_STEP` gets Layca's SGD kernel switched off (``tests/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

AFTER_STEP = "compiled-after-step"

IMPLEMENTATIONS = ["eager", "compiled", pytest.param("compiled", id=AFTER_STEP)]


class SubclassedSGD(torch.optim.SGD):
    """torch's SGD under a type of its own: Layca's compiled step then runs after its step, as for any optimizer."""


def fail_compiling(
    monkeypatch: pytest.MonkeyPatch,
    message: str,
    kernels: Callable[[str], bool] = lambda name: True,
    forget_ready: bool = False,
    layers_per_call: int | None = None,
) -> None:
    """Make every compilation of the kernels whose name ``kernels`` accepts raise ``RuntimeError(message)``.

    With ``layers_per_call``, only their compilations for that many layers per call fail.

    As a compiler that went missing would: at the first compilation (with ``forget_ready``, which also forgets which
    kernels were found ready, so that they are compiled again) or at a later one (otherwise: the kernels compiled so
    far stay ready, and the failure comes when one is called). The other kernels compile as before; everything is put
    back after the test.
    """
    from lightning_layca import compiling

    compile_kernel = compiling._compiled_layers

    def compiled(parallel: bool, per_unit: bool, variant: str, size: int) -> Callable[..., object]:
        if not kernels(variant) or layers_per_call not in (None, size):
            return compile_kernel(parallel, per_unit, variant, size)

        def fail(*args: object) -> None:
            raise RuntimeError(message)

        return fail

    monkeypatch.setattr(compiling, "_ready", {} if forget_ready else dict(compiling._ready))
    monkeypatch.setattr(compiling, "_optional_failed", {} if forget_ready else dict(compiling._optional_failed))
    monkeypatch.setattr(compiling, "_compiled_layers", compiled)


def record_compilations(monkeypatch: pytest.MonkeyPatch) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """Record the ``(kernel name, layers per call)`` the compiled step compiles or calls, from now to the test's end.

    Returns two sets, filled as the test runs: those asked for while ``compiled_step_ready`` (or the trial of SGD's
    forms, ``lightning_layca.step.sgd_form``) checks kernels (compiled on stand-in layers), and those asked for by the
    calls of a step. Which kernels earlier tests of the process made
    ready is forgotten, so that they are checked again.
    """
    from lightning_layca import compiling
    from lightning_layca.step import compiled as compiled_step
    from lightning_layca.step import sgd_form

    readied: set[tuple[str, int]] = set()
    called: set[tuple[str, int]] = set()
    inside = [False]
    ready, compile_layers = compiling.kernels_ready, compiling._compiled_layers

    def kernels_ready(*args: Any, **kwargs: Any) -> bool:
        inside[0] = True
        try:
            return ready(*args, **kwargs)
        finally:
            inside[0] = False

    def compiled(parallel: bool, per_unit: bool, variant: str, size: int) -> Callable[..., object]:
        (readied if inside[0] else called).add((variant, size))
        return compile_layers(parallel, per_unit, variant, size)

    monkeypatch.setattr(compiling, "_ready", {})
    monkeypatch.setattr(compiling, "_optional_failed", {})
    monkeypatch.setattr(compiling, "_compiled_layers", compiled)
    monkeypatch.setattr(compiled_step, "kernels_ready", kernels_ready)
    monkeypatch.setattr(sgd_form, "kernels_ready", kernels_ready)
    return readied, called


def forget_sgd_measurements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which of SGD's compiled forms the process measured faster (``lightning_layca.step.sgd_form``), so that
    the next optimizer that needs it measures again; put back after the test."""
    from lightning_layca.step import sgd_form

    monkeypatch.setattr(sgd_form, "_measured", {})
