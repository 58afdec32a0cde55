"""Bad input is rejected when the wrapper is built, with a message naming the bad value and what is accepted."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_layca as ll


@pytest.fixture
def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def test_not_an_optimizer(model: nn.Sequential) -> None:
    with pytest.raises(TypeError, match=r"wraps a torch.optim.Optimizer instance, got list"):
        ll.Layca(list(model.parameters()), model.named_parameters())  # type: ignore[arg-type]


def test_wrapping_twice(model: nn.Sequential) -> None:
    opt = ll.Layca(sgd(model), model.named_parameters())
    with pytest.raises(TypeError, match="already wrapped"):
        ll.Layca(opt, model.named_parameters())


@pytest.mark.parametrize("rate", [0.0, -0.1, 1001.0, 1e200, math.inf, math.nan, True, "0.1"])
def test_bad_rotation_rate(model: nn.Sequential, rate: object) -> None:
    with pytest.raises(ValueError, match=r"`rotation_rate` must be a number in \(0, 1000\].*, got"):
        ll.Layca(sgd(model), model.named_parameters(), rotation_rate=rate)  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_pattern_matching_nothing_lists_the_names(model: nn.Sequential, option: str) -> None:
    with pytest.raises(ValueError, match=rf"`{option}` pattern 'head\.\*' matches no .*0\.weight, 0\.bias, 2\.weight"):
        ll.Layca(sgd(model), model.named_parameters(), **{option: "head.*"})


def test_by_name_pattern_matching_nothing_lists_the_layers(model: nn.Sequential) -> None:
    with pytest.raises(ValueError, match=r"ByName: pattern 'fc\*' matches no layer\. Available names: 0\.weight, 2"):
        ll.Layca(sgd(model), model.named_parameters(), schedule=ll.ByName({"fc*": 0.5}))


@pytest.mark.parametrize("alpha", [1.0, -1.0, 1.5, math.nan, "0.5"])
def test_depth_decay_alpha_outside_open_interval(alpha: object) -> None:
    with pytest.raises(ValueError, match=r"`alpha` must be a number in the open interval \(-1, 1\), got"):
        ll.DepthDecay(alpha)  # type: ignore[arg-type]


def test_zero_layer_is_named_and_exclude_suggested(model: nn.Sequential) -> None:
    nn.init.zeros_(model[2].weight)
    with pytest.raises(ValueError, match=r"layer '2\.weight' has weights of norm 0\.0.*exclude='2\.weight'"):
        ll.Layca(sgd(model), model.named_parameters())


def test_parameters_not_named(model: nn.Sequential) -> None:
    extra = nn.Parameter(torch.randn(3, 3))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    with pytest.raises(ValueError, match=r"1 parameter\(s\) of the optimizer are not named .*#4 \(3, 3\)"):
        ll.Layca(opt, model.named_parameters())


def test_named_parameters_must_be_pairs(model: nn.Sequential) -> None:
    with pytest.raises(TypeError, match="must yield \\(name, parameter\\) pairs"):
        ll.Layca(sgd(model), list(model.parameters()))  # type: ignore[arg-type]


def test_schedule_must_be_a_rotation_schedule(model: nn.Sequential) -> None:
    with pytest.raises(TypeError, match="`schedule` must be a RotationSchedule instance, got"):
        ll.Layca(sgd(model), model.named_parameters(), schedule=lambda *a: [1.0])  # type: ignore[arg-type]


def test_no_layer_selected(model: nn.Sequential) -> None:
    with pytest.raises(ValueError, match="no parameter selected as a layer"):
        ll.Layca(sgd(model), model.named_parameters(), exclude="*.weight")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ll.ByName({}), "non-empty mapping"),
        (lambda: ll.ByName({"a": -1.0}), "multiplier of pattern 'a' must be a finite non-negative number"),
        (lambda: ll.EpochSwitch([ll.Uniform()], milestones=[3]), "one milestone fewer than schedules"),
        (lambda: ll.EpochSwitch([ll.Uniform(), ll.Uniform()], milestones=[0]), "strictly increasing positive"),
        (lambda: ll.LayerWarmup(0), "`warmup_steps` must be a positive integer, got 0"),
    ],
)
def test_schedule_arguments_are_validated(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_schedule_output_is_reported(model: nn.Sequential) -> None:
    class Broken(ll.RotationSchedule):
        def multipliers(self, layers, step, epoch):
            return [1.0]

    opt = ll.Layca(sgd(model), model.named_parameters(), schedule=Broken())
    with pytest.raises(ValueError, match=r"returned \[1\.0\]; expected 2 finite non-negative multipliers"):
        opt.step()
