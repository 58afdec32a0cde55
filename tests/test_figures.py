"""The paper's figure: its colour bar names the layers, and the names fit in the picture."""

from __future__ import annotations

import pytest

from lightning_layca.figures import MAX_NAMED_LAYERS, render_rgb, rotation_curves_figure, update_ratio_figure


def colour_bar_labels(fig: object) -> list[str]:
    _, bar = fig.axes  # type: ignore[attr-defined]
    return [label.get_text() for label in bar.get_yticklabels()]


@pytest.mark.parametrize(
    ("layers", "named"),
    [
        (["net.conv1", "net.conv2", "net.fc"], ["net.conv1", "net.conv2", "net.fc"]),
        ([f"blocks.{i}.attn.qkv" for i in range(12)], ["blocks.0.attn.qkv", "blocks.11.attn.qkv"]),
        (["only"], ["only"]),
    ],
    ids=["few-layers-all-named", "many-layers-first-and-last", "one-layer"],
)
def test_the_colour_bar_names_the_layers(layers: list[str], named: list[str]) -> None:
    epochs = [0, 1, 2]
    fig = rotation_curves_figure(epochs, {name: [0.0, 0.1 * i, 0.2 * i] for i, name in enumerate(layers)})
    assert colour_bar_labels(fig) == named
    assert len(layers) <= MAX_NAMED_LAYERS or len(named) == 2


def test_long_layer_names_keep_their_end_and_fit_in_the_figure() -> None:
    layers = [f"encoder.layers.{i}.self_attention.out_projection" for i in range(3)]
    fig = rotation_curves_figure([0, 1], {name: [0.0, 0.5] for name in layers})
    labels = colour_bar_labels(fig)
    assert labels == ["…" + name[-21:] for name in layers]
    width = render_rgb(fig).shape[1]
    _, bar = fig.axes
    renderer = fig.canvas.get_renderer()
    rightmost = max(label.get_window_extent(renderer).x1 for label in [*bar.get_yticklabels(), bar.yaxis.label])
    assert rightmost <= width, (rightmost, width)


def test_the_update_ratio_figure_draws_every_layer_and_the_reference_line() -> None:
    curves = {f"layer{i}": [(0, -2.0 - 0.1 * i), (10, -3.2 - 0.1 * i)] for i in range(12)}
    fig = update_ratio_figure(curves, reference=-3.0)
    ax, _ = fig.axes
    lines = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]
    assert lines[:12] == [([0, 10], [y for _, y in points]) for points in curves.values()]
    (reference,) = lines[12:]
    assert reference[1] == [-3.0, -3.0]  # a horizontal line at -3 across the axes
    assert colour_bar_labels(fig) == ["layer0", "layer11"]
    assert ax.get_ylabel() == "log10 ||dW|| / ||W||"
