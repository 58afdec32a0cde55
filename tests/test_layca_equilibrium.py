"""rotation_rate="equilibrium": each group rotates at the angular update its optimizer reaches at equilibrium."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import lightning_layca as ll
from lightning_layca.step.families import equilibrium_rate


def two_groups(model: nn.Module, **second: float) -> list[dict]:
    """The first layer in one group, the rest in another with its own hyper-parameters."""
    first = [p for n, p in model.named_parameters() if n.startswith("0.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("0.")]
    return [{"params": first}, {"params": rest, **second}]


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def test_adamw_groups_rotate_at_their_own_equilibrium_rate() -> None:
    net = model()
    base = torch.optim.AdamW(two_groups(net, lr=3e-3, weight_decay=0.2), lr=1e-3, betas=(0.8, 0.99), weight_decay=0.05)
    opt = ll.Layca(base, net.named_parameters(), rotation_rate="equilibrium", schedule=ll.ByName({"4.*": 0.5}))
    first = math.sqrt(2 * 1e-3 * 0.05 * 0.2 / 1.8)
    rest = math.sqrt(2 * 3e-3 * 0.2 * 0.2 / 1.8)
    assert list(opt.rotation_rates().values()) == pytest.approx([first, rest, 0.5 * rest], rel=1e-12)


def test_sgd_momentum_rate_follows_the_scheduler() -> None:
    net = model()
    base = torch.optim.SGD(two_groups(net, weight_decay=1e-3), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = ll.Layca(base, net.named_parameters(), rotation_rate="equilibrium")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    for lr in (0.1, 0.025):
        expected = [math.sqrt(2 * lr * 5e-4 / 1.9)] + [math.sqrt(2 * lr * 1e-3 / 1.9)] * 2
        assert list(opt.rotation_rates().values()) == pytest.approx(expected, rel=1e-12)
        net(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        scheduler.step()
    # And the step turns each layer by atan of that rate.
    before = net[0].weight.detach().double().clone()
    net(torch.randn(4, 6)).square().mean().backward()
    rate = opt.rotation_rates()["0.weight"]
    opt.step()
    after = net[0].weight.detach().double()
    cos = float(torch.dot(before.flatten(), after.flatten()) / (before.norm() * after.norm()))
    assert math.acos(min(cos, 1.0)) == pytest.approx(math.atan(rate), abs=1e-5)


@pytest.mark.parametrize(
    ("make_base", "message"),
    [
        (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-2), "not of Adam"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), r"needs weight decay: .*weight_decay=0\.0"),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0), r"needs weight decay"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=1e-4), "dampening=0.5"),
    ],
    ids=["adam", "sgd_without_decay", "adamw_without_decay", "sgd_dampening"],
)
def test_configurations_without_an_equilibrium_are_refused_at_construction(make_base, message: str) -> None:
    net = model()
    with pytest.raises(ValueError, match=message):
        ll.Layca(make_base(net.parameters()), net.named_parameters(), rotation_rate="equilibrium")


def equilibrium_angle_of_a_scale_invariant_layer(
    optimizer: str, lr: float, wd: float, beta: float, steps: int
) -> float:
    """Train one layer on random gradients orthogonal to it, of norm 1/||w||, as scale-invariant layers get them;
    return the mean angle per step (radians) over the last quarter of the run."""
    generator = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(1024, generator=generator))
    if optimizer == "sgd":
        base: torch.optim.Optimizer = torch.optim.SGD([w], lr=lr, momentum=beta, weight_decay=wd)
    else:
        base = torch.optim.AdamW([w], lr=lr, betas=(beta, 0.999), weight_decay=wd)
    angles = []
    for _ in range(steps):
        before = w.detach().clone()
        g = torch.randn(1024, generator=generator)
        g -= torch.dot(g, before) / torch.dot(before, before) * before
        w.grad = g / before.norm()
        base.step()
        cos = float(torch.dot(before, w.detach()) / (before.norm() * w.detach().norm()))
        angles.append(math.acos(min(cos, 1.0)))
    return sum(angles[-steps // 4 :]) / (steps // 4)


@pytest.mark.parametrize(
    ("optimizer", "lr", "wd", "beta", "steps"),
    [("sgd", 0.5, 0.01, 0.9, 3000), ("sgd", 0.5, 0.01, 0.0, 3000), ("adamw", 1e-2, 0.1, 0.9, 6000)],
)
def test_the_formulas_match_a_simulated_equilibrium(optimizer: str, lr: float, wd: float, beta: float, steps: int):
    # An independent check of the formulas: the optimizer alone, run to equilibrium (many times its time constant).
    group = {"lr": lr, "weight_decay": wd, "momentum": beta, "dampening": 0, "betas": (beta, 0.999)}
    base = (torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW)([nn.Parameter(torch.ones(1))], lr=lr)
    measured = equilibrium_angle_of_a_scale_invariant_layer(optimizer, lr, wd, beta, steps)
    assert measured == pytest.approx(equilibrium_rate(base, group), rel=0.03)


def test_yaml_rotation_rate_equilibrium_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from examples.cli import main

    monkeypatch.setattr(sys, "argv", ["examples.cli"])
    root = Path(__file__).resolve().parents[1]
    override = tmp_path / "equilibrium.yaml"
    callback = {"class_path": "lightning_layca.LaycaCallback", "init_args": {"rotation_rate": "equilibrium"}}
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    cli = main(["--config", str(root / "examples/configs/mnist1d_layca.yaml"), "--config", str(override)], run=False)
    (layca,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LaycaCallback)]
    assert layca.rotation_rate == "equilibrium"


def test_near_floor_advice_under_equilibrium_does_not_say_the_step_ignores_the_learning_rate() -> None:
    net = model()
    opt = ll.Layca(
        torch.optim.SGD(net.parameters(), lr=1e-7, weight_decay=1e-4),
        net.named_parameters(),
        rotation_rate="equilibrium",
    )
    net(torch.randn(16, 6)).square().mean().backward()
    with pytest.warns(UserWarning, match="Under rotation_rate='equilibrium' the learning rate also sets"):
        opt.step()
