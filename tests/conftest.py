"""Test-suite settings shared by every test module."""

from __future__ import annotations

import os

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
