"""lightning_layca: see and control how fast each layer of a network learns.

Layer rotation (the cosine distance of each layer's weights to their initialisation) predicts generalisation;
Layca turns any optimizer's step into a step that rotates every layer by a chosen angle. See Carbonnelle and
De Vleeschouwer, "On layer-level control of DNN training and its impact on generalization", arXiv:1806.01603.
"""

from lightning_layca.callbacks import LaycaCallback, LayerRotationMonitor
from lightning_layca.layca import DEFAULT_ROTATION_RATE, Layca
from lightning_layca.schedules import ByName, DepthDecay, EpochSwitch, LayerWarmup, RotationSchedule, Uniform
from lightning_layca.selection import layer_display_name, select_layers

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
    "RotationSchedule",
    "Uniform",
    "__version__",
    "layer_display_name",
    "select_layers",
]
