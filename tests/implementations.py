"""The Layca implementations that every test of the step's arithmetic runs on: they must agree on every behaviour.

``"compiled"`` takes two forms: around ``torch.optim.SGD`` its kernel takes the SGD step itself (no snapshot), around
any other optimizer it works after the optimizer's step, from a snapshot. The third entry runs the second form around
SGD too: a test whose id contains :data:`AFTER_STEP` gets Layca's SGD kernel switched off (``tests/conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

AFTER_STEP = "compiled-after-step"

IMPLEMENTATIONS = ["eager", "compiled", pytest.param("compiled", id=AFTER_STEP)]


class SubclassedSGD(torch.optim.SGD):
    """torch's SGD under a type of its own: Layca's compiled step then runs after its step, as for any optimizer."""
