"""Rotation schedules: the paper's formulas and the time-varying schedules' timing."""

from __future__ import annotations

import pytest

import lightning_layca as ll
from tests.reference import depth_decay_multipliers

LAYERS = [f"layer{i}" for i in range(11)]


@pytest.mark.parametrize("alpha", [-0.9, -0.6, -0.3, 0.0, 0.3, 0.6, 0.9])
def test_depth_decay_matches_the_paper(alpha: float) -> None:
    got = ll.DepthDecay(alpha).multipliers(LAYERS, step=0, epoch=0)
    assert got == pytest.approx(depth_decay_multipliers(alpha, len(LAYERS)), rel=1e-12)


def test_depth_decay_extremes_span_five_powers() -> None:
    m = ll.DepthDecay(0.6).multipliers(LAYERS, step=0, epoch=0)
    assert m[0] == pytest.approx(0.4**5, rel=1e-12) and m[-1] == 1.0


def test_uniform_and_single_layer() -> None:
    assert ll.Uniform().multipliers(LAYERS, 0, 0) == [1.0] * 11
    assert ll.DepthDecay(0.5).multipliers(["only"], 0, 0) == [1.0]


def test_by_name_first_match_wins() -> None:
    s = ll.ByName({"layer1*": 0.5, "layer10": 2.0}, default=0.25)
    s.validate(LAYERS)
    m = s.multipliers(LAYERS, 0, 0)
    assert m[0] == 0.25 and m[1] == 0.5 and m[10] == 0.5


def test_epoch_switch_changes_key_only_at_milestones() -> None:
    s = ll.EpochSwitch([ll.DepthDecay(-0.6), ll.DepthDecay(-0.3), ll.Uniform()], milestones=[5, 10])
    keys = [s.cache_key(0, epoch) for epoch in range(12)]
    assert len(set(keys)) == 3 and keys[4] != keys[5] and keys[9] != keys[10]
    assert s.multipliers(LAYERS, 0, 12) == [1.0] * 11
    assert s.multipliers(LAYERS, 0, 7) == pytest.approx(depth_decay_multipliers(-0.3, 11))


def test_layer_warmup_ramps_linearly_then_stays_constant() -> None:
    s = ll.LayerWarmup(4, ll.ByName({"layer0": 0.5}))
    assert [s.multipliers(LAYERS, step, 0)[0] for step in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert s.cache_key(3, 0) == s.cache_key(100, 7)


def test_repr_shows_arguments() -> None:
    assert repr(ll.DepthDecay(0.25)) == "DepthDecay(alpha=0.25)"
