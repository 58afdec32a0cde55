"""The Layca implementations that every test of the step's arithmetic runs on: they must agree on every behaviour."""

from __future__ import annotations

IMPLEMENTATIONS = ["eager", "compiled"]
