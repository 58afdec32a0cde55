"""The paper's layer-rotation figure, and the update-ratio figure: one curve per layer, coloured first to last layer.

matplotlib is an optional dependency (the ``plot`` extra, ``pip install lightning-layca[plot]``) and is imported only
when a figure is drawn. Figures are drawn on matplotlib's Agg canvas without ``pyplot``, so no GUI backend is ever
selected and no figure is left registered in a global figure manager.

Example:
    >>> fig = rotation_curves_figure([0, 1, 2], {"conv1": [0.0, 0.2, 0.3], "fc": [0.0, 0.1, 0.12]})
    >>> render_rgb(fig).shape[2]
    3
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PLOT_EXTRA_HINT",
    "colour_bar_ticks",
    "render_rgb",
    "rotation_curves_figure",
    "save_png",
    "update_ratio_figure",
    "write_png",
]

PLOT_EXTRA_HINT = "pip install 'lightning-layca[plot]'"
"""How to install what figures need."""


def _require_matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.ticker
        from matplotlib.figure import Figure
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"Drawing the layer rotation figure needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}"
        ) from err
    return matplotlib, Figure


def rotation_curves_figure(
    epochs: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    title: str = "Layer rotation curves",
    ax: Any | None = None,
    targets: Mapping[str, Sequence[float]] | None = None,
) -> Any:
    """Draw one line per layer (x = epoch, y = cosine distance to the initial weights), coloured by depth.

    Args:
        epochs: The x coordinates, shared by every curve.
        curves: Layer name -> one cosine distance per epoch, in depth order (input first).
        title: The axes title.
        ax: A ``matplotlib.axes.Axes`` to draw on (one panel of a larger figure); by default a new figure with one
            axes is made.
        targets: Layer name -> its rotation target at each of the last ``len(values)`` epochs, drawn dashed in the
            layer's colour (a closed-loop target beside the rotation it steers).

    Returns:
        The ``matplotlib.figure.Figure`` drawn on, with a colour bar from the first layer to the last next to the axes
        that names the layers (see :func:`colour_bar_ticks`).

    Raises:
        ModuleNotFoundError: When matplotlib is missing (install the ``plot`` extra).
    """
    matplotlib, _ = _require_matplotlib()
    fig, ax = _layer_curves(
        {name: (list(epochs), list(values)) for name, values in curves.items()}, title, "epoch",
        "cosine distance to initialisation", ax,
    )  # fmt: skip
    colormap, norm = matplotlib.colormaps["viridis"], _depth_norm(matplotlib, len(curves))
    for depth, name in enumerate(curves):
        target = list((targets or {}).get(name, []))
        if target:
            xs = list(epochs)[-len(target) :]
            ax.plot(xs, target[-len(xs) :], color=colormap(norm(depth)), linewidth=1.0, linestyle="--")
    top = max([1.0] + [v * 1.05 for values in curves.values() for v in values if v == v])
    ax.set_ylim(0.0, top)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return fig


def update_ratio_figure(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    reference: float,
    title: str = "Update-to-data ratio",
    ax: Any | None = None,
) -> Any:
    """Draw one line per layer of ``log10 ||dW|| / ||W||`` over the logging steps, coloured by depth, and a reference.

    Args:
        curves: Layer name -> ``[(step, log10 ratio), ...]``, in depth order (input first).
        reference: The y of the dashed horizontal reference line (the usual -3).
        title: The axes title.
        ax: A ``matplotlib.axes.Axes`` to draw on; by default a new figure with one axes is made.

    Returns:
        The ``matplotlib.figure.Figure`` drawn on, with the colour bar of :func:`rotation_curves_figure`.

    Example:
        >>> fig = update_ratio_figure({"conv1": [(0, -2.5), (10, -3.1)], "fc": [(0, -2.9), (10, -3.4)]}, -3.0)
        >>> render_rgb(fig).shape[2]
        3
    """
    fig, ax = _layer_curves(
        {name: ([x for x, _ in points], [y for _, y in points]) for name, points in curves.items()},
        title, "step", "log10 ||dW|| / ||W||", ax,
    )  # fmt: skip
    ax.axhline(reference, color="black", linestyle="--", linewidth=1.0, label=f"reference {reference:g}")
    ax.legend(loc="upper right", fontsize="small")
    return fig


def _layer_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str, ax: Any
) -> tuple[Any, Any]:
    """One line per layer coloured by depth (viridis, input first), labelled axes, and a colour bar naming layers."""
    matplotlib, figure_class = _require_matplotlib()
    ticks = colour_bar_ticks(list(curves))
    if ax is None:
        width, dpi = 6.4, 100
        fig = figure_class(figsize=(width, 4.0), dpi=dpi)
        # Fixed margins rather than tight_layout, which renders the figure once more just to measure it. On the right,
        # room for the colour bar's layer names (about 6.5 pixels a character in the small font) and its label.
        names_px = 6.5 * max((len(name) for name in ticks.values()), default=0) + 28
        fig.subplots_adjust(left=0.11, right=1 - names_px / (width * dpi), bottom=0.12, top=0.92)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    colormap = matplotlib.colormaps["viridis"]
    norm = _depth_norm(matplotlib, len(curves))
    for depth, (xs, ys) in enumerate(curves.values()):
        ax.plot(list(xs), list(ys), color=colormap(norm(depth)), linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=colormap)
    bar = fig.colorbar(mappable, ax=ax)
    bar.set_ticks(list(ticks), labels=list(ticks.values()), fontsize="small")
    bar.set_label("layer (input → output)")
    return fig, ax


def _depth_norm(matplotlib: Any, layers: int) -> Any:
    """The colour scale of depth: layer index 0 (input) to ``layers - 1`` (output)."""
    return matplotlib.colors.Normalize(vmin=0, vmax=max(layers - 1, 1))


MAX_NAMED_LAYERS = 8
"""Up to this many layers, the colour bar names every layer; beyond, the first and the last."""

_MAX_TICK_LABEL = 22


def colour_bar_ticks(layers: Sequence[str]) -> dict[int, str]:
    """Return the colour bar's ticks: layer index -> name, for every layer when few, else the first and the last.

    A name longer than 22 characters keeps its end (``…`` + the last 21), where layers' names differ.

    Example:
        >>> colour_bar_ticks(["net.conv1", "net.conv2", "net.fc"])
        {0: 'net.conv1', 1: 'net.conv2', 2: 'net.fc'}
        >>> colour_bar_ticks([f"blocks.{i}.mlp.fc1" for i in range(12)])
        {0: 'blocks.0.mlp.fc1', 11: 'blocks.11.mlp.fc1'}
    """
    shown = range(len(layers)) if len(layers) <= MAX_NAMED_LAYERS else [0, len(layers) - 1]
    return {i: _shorten(layers[i]) for i in shown}


def _shorten(name: str) -> str:
    return name if len(name) <= _MAX_TICK_LABEL else "…" + name[-(_MAX_TICK_LABEL - 1) :]


def render_rgb(fig: Any) -> Any:
    """Render ``fig`` on an Agg canvas and return its pixels as a ``(height, width, 3)`` uint8 numpy array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    import numpy as np

    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG file (parent folders created) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def write_png(image: Any, path: str | Path) -> Path:
    """Write an ``(height, width, 3)`` uint8 image, such as :func:`render_rgb` returns, as a PNG file.

    Encoding pixels already rendered costs a fraction of :func:`save_png`, which renders the figure again.
    """
    from matplotlib.image import imsave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, image)
    return path
