"""Lightning callbacks: monitor layer rotation with any optimizer, or train with Layca and monitor it."""

from lightning_layca.callbacks.layca_callback import LaycaCallback
from lightning_layca.callbacks.monitor import LayerRotationMonitor

__all__ = ["LaycaCallback", "LayerRotationMonitor"]
