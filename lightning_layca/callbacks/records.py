"""What a rotation monitor keeps of its measurements: the curves of every layer, through checkpoints.

:class:`RotationRecords` holds, by layer display name, the rotation at every logging step (``history``), the update
ratio at every logging step (``update_ratio_history``) and the rotation at the end of every training epoch
(``epoch_rotation``, the rotation figure's data, on an axis of its own so that layers that join later line up). It
runs on every process, issues no collective, and its :meth:`~RotationRecords.state` is plain lists of numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_layca.selection import layer_display_name

__all__ = ["Points", "RotationRecords"]

Points = dict[str, list[tuple[int, float]]]
"""Layer display name -> ``[(x, value), ...]``."""


def _points(raw: Mapping[str, Sequence[Sequence[Any]]]) -> Points:
    return {name: [(int(x), float(v)) for x, v in points] for name, points in raw.items()}


class RotationRecords:
    """The curves a monitor measured, by layer display name (see :class:`~lightning_layca.LayerRotationMonitor`).

    Attributes:
        history: ``[(step, cosine distance), ...]`` at every logging step since the layer was monitored.
        update_ratio_history: ``[(step, log10 ||dW|| / ||W||), ...]`` at every logging step.
        epoch_rotation: ``[(epochs completed, cosine distance), ...]`` from ``(0, 0.0)``, at every epoch end.
        epochs: The x axis of ``epoch_rotation`` (epochs completed), kept apart for layers that join later.
    """

    def __init__(self) -> None:
        self.history: Points = {}
        self.update_ratio_history: Points = {}
        self.epoch_rotation: Points = {}
        self.epochs: list[int] = []

    def restart_epochs(self) -> None:
        """The first fit starts: its weights are the initial ones, at rotation 0 after 0 epochs."""
        self.epoch_rotation, self.epochs = {}, [0]

    def add_step(self, step: int, rotation: Mapping[str, float], update_ratios: Mapping[str, float]) -> None:
        """Record a logging step: the rotation of every layer, and the update ratio of those whose step was measured."""
        for name, value in rotation.items():
            self.history.setdefault(name, []).append((step, value))
        for name, value in update_ratios.items():
            self.update_ratio_history.setdefault(name, []).append((step, value))

    def add_epoch(self, epochs_done: int, rotation: Mapping[str, float]) -> None:
        """Record the rotation of every layer at the end of an epoch."""
        self.epochs.append(epochs_done)
        for name, value in rotation.items():
            self.epoch_rotation.setdefault(name, []).append((epochs_done, value))

    def join(self, joined: Sequence[str], order: Sequence[str]) -> None:
        """Layers that joined were frozen until now: their rotation was 0 at every epoch end so far.

        Args:
            joined: The parameter names of the layers that joined.
            order: The parameter names of every monitored layer, in depth order (for the figure's colours).
        """
        for name in joined:
            self.epoch_rotation[layer_display_name(name)] = [(e, 0.0) for e in self.epochs]
        if joined:
            self.epoch_rotation = {name: self.epoch_rotation[name] for name in map(layer_display_name, order)}

    def epoch_curves(self) -> dict[str, list[float]]:
        """Layer display name -> its rotation at every epoch of :attr:`epochs` (the rotation figure's curves)."""
        return {name: [v for _, v in points] for name, points in self.epoch_rotation.items()}

    def last_rotation(self) -> dict[str, float]:
        """Layer display name -> its latest rotation in :attr:`history`."""
        return {name: points[-1][1] for name, points in self.history.items() if points}

    def state(self) -> dict[str, Any]:
        """The records as plain lists (a checkpoint's part)."""
        return {
            "epochs": list(self.epochs),
            "history": {k: list(v) for k, v in self.history.items()},
            "epoch_rotation": {k: list(v) for k, v in self.epoch_rotation.items()},
            "update_ratio_history": {k: list(v) for k, v in self.update_ratio_history.items()},
        }

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (``update_ratio_history`` is absent from checkpoints of earlier versions)."""
        self.history = _points(state["history"])
        self.epoch_rotation = _points(state["epoch_rotation"])
        self.epochs = [int(e) for e in state["epochs"]]
        self.update_ratio_history = _points(state.get("update_ratio_history", {}))
