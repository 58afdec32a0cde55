"""The rotation monitor's sums in compiled passes: the same numbers as the eager sums, chosen by the step's rule."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import lightning_layca as ll
from lightning_layca import auto_choice
from lightning_layca.measurement import MeasurementSums
from tests.implementations import fail_compiling
from tests.tiny_modules import LAYERS, TinyCNN, cosine_distance_fp64, layer_weights, loader, make_trainer


def reference_sums(x: torch.Tensor, y: torch.Tensor, difference: bool) -> list[float]:
    """Independent reference: the three inner products of the flattened tensors, formed densely in float64."""
    y64 = y.double().flatten()
    u = x.double().flatten() - (y64 if difference else 0)
    return [float(u @ y64), float(y64 @ y64), float(u @ u)]


def layers_and_snapshots() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Layers that take the compiled pass (a matrix, a channels-last convolution kernel) and some that cannot."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 6), (4, 3, 3, 3), (7, 1), (5, 9)]
    initial = [torch.randn(s, generator=g) for s in shapes]
    initial[1] = initial[1].to(memory_format=torch.channels_last)
    layers = [w0 + 0.05 * torch.randn(w0.shape, generator=g) for w0 in initial]
    layers[1] = layers[1].to(memory_format=torch.channels_last)
    # A strided slice is no dense block: its sums are eager whatever the implementation.
    wide = torch.randn(5, 18, generator=g)
    layers[3], initial[3] = wide[:, ::2], (wide[:, ::2] + 0.01).contiguous()
    # A channels-last layer against a snapshot in the default layout: the same shape, elements in another order.
    snapshot = torch.randn(6, 2, 3, 3, generator=g)
    layers.append((snapshot + 0.05).to(memory_format=torch.channels_last))
    initial.append(snapshot)
    return layers, initial


@pytest.mark.parametrize("difference", [False, True], ids=["distances", "step"])
def test_compiled_sums_equal_a_dense_float64_reference(difference: bool) -> None:
    layers, initial = layers_and_snapshots()
    sums = MeasurementSums("compiled")
    got = sums(layers, initial, difference=difference)
    assert sums.in_use == "compiled"
    assert got.dtype == torch.float64 and got.shape == (5, 3)
    for row, x, y in zip(got.tolist(), layers, initial, strict=True):
        # Products of float32 numbers are exact in float64: only the order of the additions differs.
        assert row == pytest.approx(reference_sums(x, y, difference), rel=1e-13, abs=1e-13)
    eager = MeasurementSums("eager")(layers, initial, difference=difference)
    assert torch.allclose(got, eager, rtol=1e-13, atol=1e-13)


def test_compiled_distances_take_the_snapshots_known_squares_and_form_two_products() -> None:
    # A snapshot's <w0, w0> never changes: a rotation monitor passes it from its first measure on, and the compiled
    # pass forms <w, w0> and <w, w> only, as the eager sums do. Without it, a pass of the kernel over the snapshots
    # alone forms it with the same arithmetic: the sums are the same bits either way.
    layers, initial = layers_and_snapshots()
    sums = MeasurementSums("compiled")
    first = sums(layers, initial)
    again = sums(layers, initial, y_squares=first[:, 1].clone())
    assert sums.in_use == "compiled"
    assert torch.equal(again, first)
    for row, x, y in zip(again.tolist(), layers, initial, strict=True):
        assert row == pytest.approx(reference_sums(x, y, difference=False), rel=1e-13, abs=1e-13)
    # Without the squares, the pass over the snapshots alone forms <w0, w0> as the kernel forms its products: a layer
    # equal to its snapshot has its three sums the same bits (its <w, w0> and <w, w> from the pass over both).
    copies = [w0.clone(memory_format=torch.preserve_format) for w0 in initial]
    same = sums(copies, initial)
    assert torch.equal(same[:, 1], same[:, 0]) and torch.equal(same[:, 1], same[:, 2])
    # The squares are taken as given, for the layers of the compiled pass and the eager ones alike.
    given = torch.arange(1.0, 6.0, dtype=torch.float64)
    taken = sums(layers, initial, y_squares=given)
    assert taken[:, 1].tolist() == given.tolist()
    assert torch.equal(taken[:, [0, 2]], first[:, [0, 2]])


def test_auto_compiles_once_the_eager_sums_have_taken_as_long_as_a_compilation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layers, initial = layers_and_snapshots()
    sums = MeasurementSums()  # "auto"
    sums(layers, initial)
    assert sums.in_use == "eager"  # 10 s of eager sums have not been spent yet
    monkeypatch.setattr(auto_choice, "AUTO_COMPILE_AFTER_SECONDS", 0.0)
    first = sums(layers, initial)
    assert sums.in_use == "eager"  # this measure's time completes the eager phase: a trial starts
    second = sums(layers, initial)
    assert sums.in_use == "compiled"  # a trial starts with the compiled sums
    assert torch.allclose(first, second, rtol=1e-13, atol=1e-13)
    # The step sums follow the choice of the distances; only the distances are timed.
    sums(layers, initial, difference=True)
    assert sums.in_use == "compiled"


def test_eager_never_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auto_choice, "AUTO_COMPILE_AFTER_SECONDS", 0.0)
    layers, initial = layers_and_snapshots()
    sums = MeasurementSums("eager")
    for _ in range(3):
        sums(layers, initial)
        assert sums.in_use == "eager"


def test_a_failed_compilation_warns_once_and_measures_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    fail_compiling(monkeypatch, "no C++ compiler found", forget_ready=True)
    layers, initial = layers_and_snapshots()
    sums = MeasurementSums("compiled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [sums(layers, initial) for _ in range(2)]
    messages = [str(w.message) for w in caught]
    assert messages == [
        "Layca: the compiled measurement is not available for torch.float32 layers on cpu (RuntimeError: no C++ "
        "compiler found); the rotation monitor measures with the eager sums. Pass implementation='eager' to skip the "
        "attempt."
    ]
    assert sums.in_use == "eager"
    assert torch.equal(got[0], MeasurementSums("eager")(layers, initial))


def fit_history(tmp_path: Path, callback: ll.LayerRotationMonitor) -> dict[str, list[tuple[int, float]]]:
    model = TinyCNN()
    make_trainer(tmp_path, callbacks=[callback], log_every_n_steps=2).fit(model, loader())
    return {"history": callback.history, "final": layer_weights(model)}  # type: ignore[dict-item]


def test_monitor_with_compiled_sums_logs_what_the_eager_sums_give(tmp_path: Path) -> None:
    compiled = ll.LayerRotationMonitor(implementation="compiled")
    eager = ll.LayerRotationMonitor(implementation="eager")
    a, b = fit_history(tmp_path / "c", compiled), fit_history(tmp_path / "e", eager)
    assert compiled.layers.sums.in_use == "compiled" and eager.layers.sums.in_use == "eager"
    initial = layer_weights(TinyCNN())
    for layer in LAYERS:
        steps_a, values_a = zip(*a["history"][layer], strict=True)
        steps_b, values_b = zip(*b["history"][layer], strict=True)
        assert steps_a == steps_b
        assert values_a == pytest.approx(values_b, rel=1e-9, abs=1e-12)
        assert values_a[-1] == pytest.approx(cosine_distance_fp64(a["final"][layer], initial[layer]), abs=1e-9)


def test_layca_callback_passes_its_implementation_to_the_monitor_and_refuses_a_bad_one() -> None:
    assert ll.LaycaCallback(implementation="eager").layers.sums.implementation == "eager"
    assert ll.LayerRotationMonitor().layers.sums.implementation == "auto"
    with pytest.raises(ValueError, match=r"LayerRotationMonitor: `implementation` must be one of .*, got 'fast'"):
        ll.LayerRotationMonitor(implementation="fast")  # type: ignore[arg-type]
