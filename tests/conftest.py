"""Test-suite settings shared by every test module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

try:
    from hypothesis import settings
except ImportError:  # a machine that runs only the CUDA tests (benchmarks/gpu_check.sh) may lack hypothesis
    settings = None

# On CI (CI=true) property tests draw the same examples on every run, so a landing never depends on a lucky draw;
# locally they draw new examples each run and keep exploring.
if settings is not None:
    settings.register_profile("ci", derandomize=True)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _compiled_step_after_the_base_step(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests parametrised with ``tests.implementations.AFTER_STEP``: no kernel that takes the base step itself.

    The family table lists the optimizers whose step the kernel takes; without an entry, every optimizer steps by
    itself and the compiled kernel works after its step.
    """
    from tests.implementations import AFTER_STEP

    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and AFTER_STEP in callspec.id:
        from lightning_layca.step import families

        monkeypatch.setattr(families, "FAMILIES", ())


_MASTER_PORT_OUTSIDE = os.environ.get("MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_distributed_port_left_behind() -> Iterator[None]:
    """A distributed fit leaves no ``MASTER_PORT`` behind for the next one in this process.

    Lightning's launchers set ``MASTER_PORT`` in the launching process (a port free at that moment) and leave it there;
    every later fit in the process, and each subprocess it starts, would reuse that port. With the test files spread
    over several pytest processes (``make test``), another process may have bound it since: after each test the
    variable is back to what the environment had, so each fit picks a free port of its own.
    """
    yield
    if _MASTER_PORT_OUTSIDE is None:
        os.environ.pop("MASTER_PORT", None)
    else:
        os.environ["MASTER_PORT"] = _MASTER_PORT_OUTSIDE
