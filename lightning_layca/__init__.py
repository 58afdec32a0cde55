"""lightning_layca: see and control how fast each layer of a network learns.

Layer rotation (the cosine distance of each layer's weights to their initialisation) predicts generalisation;
Layca turns any optimizer's step into a step that rotates every layer by a chosen angle. See Carbonnelle and
De Vleeschouwer, "On layer-level control of DNN training and its impact on generalization", arXiv:1806.01603.

The optimizer (:class:`Layca`) and the mathematics import without Lightning; the callbacks, which need it, are
imported when first used (``lightning_layca.LaycaCallback``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_layca.argument_types import DEFAULT_ROTATION_RATE
from lightning_layca.layca import Layca
from lightning_layca.muon import MuonWithAdamW
from lightning_layca.schedule_free import ScheduleFree
from lightning_layca.schedules import ByName, DepthDecay, EpochSwitch, LayerWarmup, RotationSchedule, Uniform
from lightning_layca.selection import layer_display_name, select_layers
from lightning_layca.targets import RotationTarget

if TYPE_CHECKING:
    from lightning_layca.callbacks import LaycaCallback, LayerRotationMonitor

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ROTATION_RATE",
    "ByName",
    "DepthDecay",
    "EpochSwitch",
    "Layca",
    "LaycaCallback",
    "LayerRotationMonitor",
    "LayerWarmup",
    "MuonWithAdamW",
    "RotationSchedule",
    "RotationTarget",
    "ScheduleFree",
    "Uniform",
    "__version__",
    "layer_display_name",
    "select_layers",
]

_CALLBACKS = ("LaycaCallback", "LayerRotationMonitor")


def __getattr__(name: str) -> Any:
    # The callbacks import Lightning: only when asked for, so that the optimizer alone does not need it.
    if name in _CALLBACKS:
        from lightning_layca import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
