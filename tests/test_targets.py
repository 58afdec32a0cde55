"""Closed-loop rotation targets: the target curve, the controller, its warnings, its state and its Lightning glue.

Distances are checked against an independent float64 computation from the weights and copies of the initial weights
taken by the test, never against the controller's own numbers alone.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

import lightning_layca as ll
from benchmarks.per_unit_targets import build_rows, train_rows
from lightning_layca.targets import scheduled_lrs
from tests.tiny_modules import TinyCNN, loader, make_trainer

TWO_PERCENT = 0.02


def cosine_distance(w: torch.Tensor, w0: torch.Tensor) -> float:
    """Reference: ``1 - <w, w0> / (|w| |w0|)`` in float64."""
    a, b = w.detach().double().reshape(-1), w0.detach().double().reshape(-1)
    return float(1.0 - a.dot(b) / (a.norm() * b.norm()))


class TwoLayers(nn.Module):
    def __init__(self, head_gradient_scale: float = 1.0, dead_head: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(12, 24, bias=False)
        self.head = nn.Linear(24, 4, bias=False)
        self.scale = head_gradient_scale
        self.dead_head = dead_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(x))
        out = self.head(h)
        if self.dead_head:  # the head gets an exactly zero gradient, the body still learns
            return h[:, :4] + 0.0 * out
        return out


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(256, 12, generator=g), torch.randint(0, 4, (256,), generator=g)


def train(
    model: TwoLayers,
    optimizer: ll.Layca,
    steps: range,
    scheduler: Any = None,
) -> None:
    x, y = data()
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)
        index = torch.randint(0, 256, (32,), generator=g)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        if model.head.weight.grad is not None:
            model.head.weight.grad *= model.scale
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def build(
    target: ll.RotationTarget,
    steps: int,
    head_gradient_scale: float = 1.0,
    dead_head: bool = False,
    granularity: str = "layer",
) -> tuple[TwoLayers, ll.Layca, Any]:
    torch.manual_seed(0)
    model = TwoLayers(head_gradient_scale, dead_head)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(base, milestones=[steps // 2], gamma=0.2)
    optimizer = ll.Layca(
        base,
        model.named_parameters(),
        target=target,
        implementation="eager",
        granularity=granularity,  # type: ignore[arg-type]
    )
    optimizer.targets.set_horizon(steps, scheduled_lrs(base.param_groups, [(scheduler, True, 1)], steps, steps))
    return model, optimizer, scheduler


# ---------------------------------------------------------------------------------------------- the loop
def test_two_layers_one_with_ten_times_the_gradient_reach_the_same_target_within_two_percent() -> None:
    steps, final = 200, 0.4
    model, optimizer, scheduler = build(ll.RotationTarget(final), steps, head_gradient_scale=10.0)
    initial = [model.body.weight.detach().clone(), model.head.weight.detach().clone()]
    train(model, optimizer, range(steps), scheduler)
    reached = [cosine_distance(w, w0) for w, w0 in zip([model.body.weight, model.head.weight], initial, strict=True)]
    assert reached == pytest.approx([final, final], rel=TWO_PERCENT)
    # The controller measured what the reference measures (float64 sums of the same tensors).
    assert optimizer.targets is not None
    assert optimizer.targets.distances == pytest.approx(reached, abs=1e-12)


def test_the_target_curve_follows_the_integral_of_the_learning_rate_or_the_steps() -> None:
    steps = 100
    _, optimizer, _ = build(ll.RotationTarget(0.5), steps)
    controller = optimizer.targets
    assert controller is not None
    # lr 0.1 for 50 steps then 0.02: the integral after 50 steps is 5 / (5 + 1) of the total.
    assert controller.target_distance(0, 0, 50) == pytest.approx(0.5 * 5 / 6, rel=1e-12)
    assert controller.target_distance(0, 0, 75) == pytest.approx(0.5 * 5.5 / 6, rel=1e-12)
    assert controller.target_distance(0, 0, steps) == 0.5
    _, linear, _ = build(ll.RotationTarget(0.5, shape="linear"), steps)
    assert linear.targets is not None
    assert linear.targets.target_distance(0, 0, 50) == pytest.approx(0.25, rel=1e-12)


def test_a_layer_with_a_zero_gradient_is_held_warned_once_and_never_nan() -> None:
    steps = 60
    model, optimizer, scheduler = build(ll.RotationTarget(0.3, interval=5), steps, dead_head=True)
    head0 = model.head.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, optimizer, range(steps), scheduler)
    stuck = [w for w in caught if "did not move" in str(w.message)]
    assert len(stuck) == 1 and "head.weight" in str(stuck[0].message) and "body.weight" not in str(stuck[0].message)
    assert torch.equal(model.head.weight, head0)  # a zero gradient: Layca leaves the layer where it was
    assert optimizer.targets is not None
    gains = optimizer.targets.layer_gains()
    assert all(math.isfinite(g) for g in gains)
    # Held, not wound up: the head's rate never rose above the one it started with.
    first = build(ll.RotationTarget(0.3, interval=5), steps, dead_head=True)[1].rotation_rates()["head.weight"]
    assert gains[1] <= first
    assert cosine_distance(model.body.weight, build(ll.RotationTarget(0.3), steps)[0].body.weight) > 0.1


def test_a_target_beyond_what_the_steps_left_can_reach_is_warned_with_the_reachable_distance() -> None:
    steps = 40
    model, optimizer, scheduler = build(ll.RotationTarget(1.5, interval=10, max_rate=0.01), steps)
    with pytest.warns(UserWarning, match=r"cannot reach their final rotation target") as record:
        train(model, optimizer, range(steps), scheduler)
    (message,) = [str(w.message) for w in record if "cannot reach" in str(w.message)]
    assert "body.weight" in message and "head.weight" in message
    # The bound: every step left at max_rate, along a great circle, from where the layer is at step 10.
    reachable = float(message.split("reachable ")[1].split(")")[0])
    assert 0 < reachable < 0.02


@pytest.mark.parametrize("steer", [False, True])
def test_resume_from_a_state_dict_is_bit_identical_to_the_uninterrupted_run(steer: bool) -> None:
    steps, cut = 60, 27  # the cut falls inside a control interval
    target = ll.RotationTarget(0.3, interval=10, steer=steer, max_rate=0.05 if steer else 1.0)
    model, optimizer, scheduler = build(target, steps)
    train(model, optimizer, range(steps), scheduler)

    first, first_optimizer, first_scheduler = build(target, steps)
    train(first, first_optimizer, range(cut), first_scheduler)
    saved = (first.state_dict(), first_optimizer.state_dict(), first_scheduler.state_dict())
    torch.manual_seed(123)  # other initial weights: only the state can make the runs agree
    resumed = TwoLayers()
    base = torch.optim.SGD(resumed.parameters(), lr=0.1)
    resumed_scheduler = torch.optim.lr_scheduler.MultiStepLR(base, milestones=[steps // 2], gamma=0.2)
    resumed_optimizer = ll.Layca(base, resumed.named_parameters(), target=target, implementation="eager")
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    resumed_scheduler.load_state_dict(saved[2])
    train(resumed, resumed_optimizer, range(cut, steps), resumed_scheduler)

    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    straight, again = optimizer.state_dict()["layca"]["target"], resumed_optimizer.state_dict()["layca"]["target"]
    assert straight["gains"] == again["gains"] and straight["steered"] == again["steered"]
    assert (min(straight["steered"]) > 0) == steer  # at max_rate=0.05 both layers are steered


def test_without_a_horizon_the_first_step_says_how_to_give_one() -> None:
    model = TwoLayers()
    optimizer = ll.Layca(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), target=ll.RotationTarget()
    )
    model(torch.randn(2, 12)).sum().backward()
    with pytest.raises(ValueError, match=r"targets.set_horizon"):
        optimizer.step()


# ---------------------------------------------------------------------------------------------- steering
def anchor(model: TwoLayers, strength: float = 1.0) -> None:
    """Add ``strength * (w - w0)`` to the body's gradient: a basin around its initial weights pulls it back."""
    weight, start = model.body.weight, model.body.weight.detach().clone()
    weight.register_hook(lambda grad: grad + strength * (weight.detach() - start))


def test_steering_takes_a_layer_its_gradient_pulls_back_to_the_target_where_the_rate_alone_cannot() -> None:
    steps, final = 200, 0.3
    ends = {}
    for steer in (False, True):
        model, optimizer, scheduler = build(ll.RotationTarget(final, steer=steer), steps)
        initial = [model.body.weight.detach().clone(), model.head.weight.detach().clone()]
        anchor(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, optimizer, range(steps), scheduler)
        layers = [model.body.weight, model.head.weight]
        ends[steer] = [cosine_distance(w, w0) for w, w0 in zip(layers, initial, strict=True)]
        unreachable = [str(w.message) for w in caught if "cannot reach" in str(w.message)]
        assert optimizer.targets is not None
        if not steer:  # rates alone: the anchored body stays near its start (measured 0.008), and is warned about
            assert ends[steer][0] < 0.05 and len(unreachable) == 1 and "body.weight" in unreachable[0]
            assert optimizer.targets.steered == [0.0, 0.0]
            continue
        # Steered: both layers within 3 % of the target (measured: body 0.305, head 0.297), nothing unreachable.
        assert ends[steer] == pytest.approx([final, final], rel=0.03) and not unreachable
        # The steering is a rotation: every layer keeps its norm (Layca's invariant) to float32 rounding.
        for w, w0 in zip(layers, initial, strict=True):
            assert float(w.detach().double().norm()) == pytest.approx(float(w0.double().norm()), rel=1e-6)
        # The anchored body needed far more steering than the head, which its rate takes there.
        body, head = optimizer.targets.steered
        assert body > 5 * head and body > 30.0
        assert optimizer.targets.distances == pytest.approx(ends[steer], abs=1e-12)


def test_steering_never_turns_a_layer_with_a_zero_gradient() -> None:
    steps = 60
    model, optimizer, scheduler = build(ll.RotationTarget(0.3, interval=5, steer=True), steps, dead_head=True)
    head0 = model.head.weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, optimizer, range(steps), scheduler)
    stuck = [str(w.message) for w in caught if "did not move" in str(w.message)]
    assert len(stuck) == 1 and "head.weight" in stuck[0]
    assert torch.equal(model.head.weight, head0)
    assert optimizer.targets is not None and optimizer.targets.steered[1] == 0.0


def test_per_unit_steering_takes_every_unit_of_an_anchored_layer_to_the_target() -> None:
    steps, final = 200, 0.3
    model, optimizer, scheduler = build_rows(steps, steer=True)
    initial = model.body.weight.detach().clone()
    weight = model.body.weight
    weight.register_hook(lambda grad: grad + (weight.detach() - initial))
    train_rows(model, optimizer, range(steps), scheduler)
    reached = unit_distances(model.body.weight, initial)
    assert reached.tolist() == pytest.approx([final] * 16, rel=0.03)
    norms = model.body.weight.detach().double().norm(dim=1)
    torch.testing.assert_close(norms, initial.double().norm(dim=1), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"final": 2.5}, r"`final` must be a cosine distance .* \(0, 2\), got 2.5"),
        ({"final": 0}, r"`final` must be .* got 0"),
        ({"final": float("nan")}, r"got nan"),
        ({"final": 0.4, "shape": "cosine"}, r"`shape` must be one of 'lr_integral', 'linear', got 'cosine'"),
        ({"final": 0.4, "interval": 0}, r"`interval` must be a positive integer, got 0"),
        ({"final": 0.4, "max_rate": 0.0}, r"`max_rate` must be a number in \(0, 1000\], got 0.0"),
        ({"final": 0.4, "min_rate": 0.5, "max_rate": 0.1}, r"`min_rate` \(0.5\) must not exceed `max_rate` \(0.1\)"),
        ({"final": {}}, r"non-empty mapping"),
        ({"final": {"head*": 3.0}}, r"pattern 'head\*'.* got 3.0"),
        ({"final": 0.4, "default": 0.2}, r"`default` goes with a mapping"),
        ({"final": {"head*": 0.2}, "last_layer": 0.1}, r"`last_layer` goes with a number"),
    ],
)
def test_bad_arguments_are_refused_naming_the_value(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ll.RotationTarget(**kwargs)
    with pytest.raises(TypeError, match="`steer` must be True or False, got 'yes'"):
        ll.RotationTarget(0.4, steer="yes")  # type: ignore[arg-type]


def test_patterns_are_checked_against_the_layers_and_a_target_refuses_a_schedule() -> None:
    model = TwoLayers()
    with pytest.raises(ValueError, match=r"pattern 'tail\*' matches no layer. Available layers: body.weight"):
        ll.Layca(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model.named_parameters(),
            target=ll.RotationTarget({"tail*": 0.2}, default=0.1),
        )
    with pytest.raises(ValueError, match=r"no pattern of `final` matches layers \['body.weight'\]"):
        ll.Layca(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model.named_parameters(),
            target=ll.RotationTarget({"head*": 0.2}),
        )
    with pytest.raises(ValueError, match="`schedule` must be None with a target"):
        ll.LaycaCallback(schedule=ll.Uniform(), target=ll.RotationTarget())
    with pytest.raises(TypeError, match="`target` must be a RotationTarget"):
        ll.LaycaCallback(target=0.4)  # type: ignore[arg-type]


def test_finals_by_name_and_by_depth() -> None:
    assert ll.RotationTarget({"head*": 0.2}, default=0.5).finals(["body", "head"]) == [0.5, 0.2]
    assert ll.RotationTarget(0.6, last_layer=0.2).finals(["a", "b", "c", "d", "e"]) == pytest.approx(
        [0.6, 0.5, 0.4, 0.3, 0.2], abs=1e-15
    )


def test_scheduled_lrs_steps_the_schedulers_ahead_and_puts_everything_back() -> None:
    param = nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    per_epoch = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[2], gamma=0.5)
    profile = scheduled_lrs(optimizer.param_groups, [(per_epoch, False, 1)], total_steps=12, steps_per_epoch=4)
    assert profile == [[1.0] * 8 + [0.5] * 4]
    assert optimizer.param_groups[0]["lr"] == 1.0 and per_epoch.last_epoch == 0


# ---------------------------------------------------------------------------------------------- Lightning
def fit_logged(
    tmp_path: Path, target: ll.RotationTarget, **kwargs: Any
) -> tuple[TinyCNN, ll.LaycaCallback, ll.Layca, list[dict[str, str]]]:
    """A 2-epoch fit of the tiny CNN under ``target``, logging every other step to CSV: model, callback, Layca, rows."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    callback = ll.LaycaCallback(target=target, log_every_n_steps=2, figure=False, angle_histograms=False, **kwargs)
    logger = CSVLogger(tmp_path, name="csv")
    model = TinyCNN(scheduler=True)
    make_trainer(tmp_path, logger=logger, callbacks=[callback], max_epochs=2).fit(model, loader())
    (layca,) = callback.laycas.values()
    assert layca.targets is not None
    return model, callback, layca, list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))


def test_callback_logs_the_target_beside_the_rotation_and_shares_the_monitors_initial_weights(tmp_path: Path) -> None:
    _, callback, layca, rows = fit_logged(tmp_path, ll.RotationTarget(0.05, interval=2))
    # One copy of the initial weights: the monitor's own tensors, none of the controller's.
    assert all(any(t is w0 for w0 in callback.layers.initial) for t in layca.targets.initial.values())
    assert layca.state_dict()["layca"]["target"]["initial"] == {}
    names = [ll.layer_display_name(n) for n in layca.layer_names]
    logged = {n: [float(r[f"Rotation_target/{n}"]) for r in rows if r.get(f"Rotation_target/{n}")] for n in names}
    assert all(len(v) == 8 for v in logged.values())  # 16 steps, every other one logged
    # Logged after steps 2, 4, ..., 16: the lr integral of StepLR (0.1 for 8 steps, then 0.05) so far over its total.
    integral = [0.1 * min(t, 8) + 0.05 * max(0, t - 8) for t in range(2, 17, 2)]
    expected = [0.05 * x / integral[-1] for x in integral]
    assert all(v == pytest.approx(expected, rel=1e-9) for v in logged.values())
    assert list(callback.epoch_targets) == names and all(len(v) == 3 for v in callback.epoch_targets.values())
    assert not any(key.startswith("Rotation_steered") for key in rows[0])  # no steering, no steering chart
    assert "Rotation_steered" not in callback.per_step_quantities()


def test_callback_logs_the_angle_a_steering_target_turned_each_layer_by(tmp_path: Path) -> None:
    target = ll.RotationTarget(0.05, interval=2, max_rate=1e-3, steer=True)  # held at a tiny rate: steered
    model, callback, layca, rows = fit_logged(tmp_path, target, per_layer_detail=True)
    assert layca.targets is not None
    for i, name in enumerate(layca.layer_names):
        column = f"Rotation_steered/{ll.layer_display_name(name)}"
        logged = [float(r[column]) for r in rows if r.get(column)]
        assert len(logged) == 8 and logged == sorted(logged) and logged[0] > 0  # a running total, in degrees
        assert logged[-1] == pytest.approx(layca.targets.steered[i], rel=1e-12)
    largest = [float(r["Rotation_steered_summary/max"]) for r in rows if r.get("Rotation_steered_summary/max")]
    assert largest[-1] == pytest.approx(max(layca.targets.steered), rel=1e-12)  # the summary, written by default
    assert "Rotation_steered" in callback.per_step_quantities()  # a summary chart of its own in the layout
    # Where the rate alone (1e-3) could not, every layer ends near the target (float64 reference): within 15 %,
    # measured 0.045 for all three (steering closes half the error per interval and trails a target rising this fast).
    params, initial = (
        dict(model.named_parameters()),
        dict(zip(callback.layers.names, callback.layers.initial, strict=True)),
    )
    reached = [cosine_distance(params[name], initial[name]) for name in layca.layer_names]
    assert reached == pytest.approx([0.05] * len(reached), rel=0.15)


def test_callback_runs_a_per_unit_target_on_the_monitors_initial_weights(tmp_path: Path) -> None:
    target = ll.RotationTarget(0.05, interval=2)
    callback = ll.LaycaCallback(
        target=target, granularity="unit", log_every_n_steps=2, figure=False, angle_histograms=False
    )
    model = TinyCNN(scheduler=True)
    make_trainer(tmp_path, logger=False, callbacks=[callback], max_epochs=2).fit(model, loader())
    (layca,) = callback.laycas.values()
    assert layca.targets is not None and set(layca.describe().values()) == {"eager"}
    assert layca.state_dict()["layca"]["target"]["initial"] == {}  # the monitor's snapshots, shared
    params = dict(model.named_parameters())
    for i, name in enumerate(layca.layer_names):  # measured at the last step, unit by unit (float64 reference)
        reference = unit_distances(params[name], layca.targets.initial[i]).tolist()
        assert layca.targets.unit_distances[i] == pytest.approx(reference, abs=1e-12)
        assert len(reference) == params[name].shape[0] and all(math.isfinite(d) for d in reference)


def test_rotation_target_is_configurable_from_yaml(tmp_path: Path) -> None:
    from examples.cli import main

    target = {
        "class_path": "lightning_layca.RotationTarget",
        "init_args": {"final": 0.4, "shape": "linear", "steer": True},
    }
    callback = {"class_path": "lightning_layca.LaycaCallback", "init_args": {"target": target, "schedule": None}}
    override = tmp_path / "target.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "mnist1d_layca.yaml"
    import sys

    argv, sys.argv = sys.argv, ["examples.cli"]
    try:
        cli = main(["--config", str(config), "--config", str(override)], run=False)
    finally:
        sys.argv = argv
    (layca,) = [c for c in cli.trainer.callbacks if isinstance(c, ll.LaycaCallback)]
    assert repr(layca.target) == repr(ll.RotationTarget(0.4, shape="linear", steer=True))


# ---------------------------------------------------------------------------------------------- distributed
@pytest.fixture(scope="module", params=[False, True], ids=["rates", "steered"])
def ddp_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.ddp_helpers import DDPProbe, RotationNet
    from tests.ddp_helpers import make_trainer as make_ddp_trainer
    from tests.test_ddp import _load_run

    root = tmp_path_factory.mktemp("ddp_target")
    steer = request.param  # steered: held at a tiny rate, so that every control interval steers
    target = ll.RotationTarget(0.05, interval=3, steer=steer, max_rate=1e-3 if steer else 1.0)
    make_ddp_trainer(root, [ll.LaycaCallback(target=target), DDPProbe(root / "probe")]).fit(RotationNet(batch_size=4))
    return steer, _load_run(root)


def test_ddp_ranks_seeded_differently_stay_bit_identical_under_a_target_with_no_collective(ddp_target: Any) -> None:
    from tests.ddp_helpers import assert_same

    steer, run = ddp_target
    rank0, rank1 = run.ranks
    assert rank0["built_checksum"] != rank1["built_checksum"]
    assert torch.equal(rank0["weights"], rank1["weights"])  # also asserted in the hook, after an all_gather
    assert_same(rank0["end_layca"], rank1["end_layca"], "layca state")
    assert rank0["end_layca"][0]["target"]["distances"][0][0] > 0  # the controller did measure
    assert rank0["layca_step_collectives"] == [0] * rank0["global_step"]  # every rank computes the same alone
    assert (min(rank0["end_layca"][0]["target"]["steered"]) > 0) == steer


@pytest.fixture(scope="module", params=["layca_target", "layca_target_steer"])
def fsdp_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 2-process FSDP2 fit under a target (steering or not), and the same fit in one process."""
    from tests.fsdp_helpers import fit_single
    from tests.test_fsdp import _launch, _load_run

    run = request.param
    single = tmp_path_factory.mktemp(f"single_{run}")
    fit_single(single, run, "sgd")
    return run, _launch(tmp_path_factory.mktemp(f"fsdp_{run}"), run), _load_run(single)


def test_fsdp2_target_run_equals_one_process_with_one_more_all_reduce_per_control_interval(fsdp_target: Any) -> None:
    from tests.fsdp_helpers import TARGET_INTERVAL
    from tests.test_fsdp import WEIGHT_TOL

    run, sharded, single = fsdp_target
    reference = single.ranks[0]
    steps = reference["global_step"]
    assert steps == 16
    expected_target = reference["end_layca"][0]["target"]
    for rank in sharded.ranks:
        assert rank["global_step"] == steps
        for key, w in reference["weights"].items():
            torch.testing.assert_close(rank["weights"][key], w, rtol=WEIGHT_TOL, atol=WEIGHT_TOL * float(w.abs().max()))
        target = rank["end_layca"][0]["target"]
        for key in ("distances", "gains"):  # per layer, one entry per unit (one unit per layer here)
            flat = [x for row in target[key] for x in row]
            assert flat == pytest.approx([x for row in expected_target[key] for x in row], rel=1e-5)
        assert target["steered"] == pytest.approx(expected_target["steered"], rel=1e-5)
        # The step's one all_reduce, and one more on the steps that end a control interval (and the last step); a
        # steering target at its max_rate steers at every one after the first step, and measures the layers again.
        controls = [(s + 1) % TARGET_INTERVAL == 0 or s + 1 == steps for s in range(steps)]
        steering = run == "layca_target_steer"
        assert rank["layca_all_reduces"] == [1 + int(c) + int(c and steering) for c in controls]
    assert reference["layca_all_reduces"] == [0] * steps
    assert all(angle > 0 for angle in expected_target["steered"]) == (run == "layca_target_steer")


def test_the_rotation_curves_figure_draws_each_target_dashed_in_its_layers_colour() -> None:
    from lightning_layca.figures import rotation_curves_figure

    curves = {"a": [0.0, 0.1, 0.3], "b": [0.0, 0.2, 0.25]}
    targets = {"a": [0.0, 0.15, 0.3], "b": [0.0, 0.15, 0.3]}
    fig = rotation_curves_figure([0, 1, 2], curves, targets=targets)
    (ax,) = [a for a in fig.axes if a.get_lines()]
    solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in dashed] == list(targets.values())
    assert [line.get_color() for line in dashed] == [line.get_color() for line in solid]


def test_the_study_script_runs_every_configuration_and_reports_the_tracking(tmp_path: Path) -> None:
    from benchmarks import rotation_targets as study

    results, table = tmp_path / "runs.jsonl", tmp_path / "table.md"
    options = ["--seeds", "0", "--epochs", "1", "--width", "4", "--num-samples", "300", "--limit-train-batches", "2"]
    study.main([*options, "--results", str(results), "--table", str(table)])
    text = table.read_text()
    for config in study.configurations():
        assert text.count(f"| {config.label} | 0 |") == 1  # one tracking row per configuration and seed
    assert "No saved uniform-rate or SGD runs of this setup" in text


def test_the_study_script_traces_every_control_interval_and_summarises_it_per_phase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from benchmarks import rotation_targets as study

    options = ["--seeds", "0", "--epochs", "4", "--width", "4", "--num-samples", "1000", "--limit-train-batches", "5"]
    study.main([*options, "--trace", str(tmp_path / "trace.json"), "--trace-max-rate", "0.5"])
    saved = json.loads((tmp_path / "trace_seed0.json").read_text())
    assert [row["step"] for row in saved["intervals"]] == [10, 20]  # every interval of 4 x 5 steps
    assert all(0 < g <= 0.5 for row in saved["intervals"] for g in row["gain"].values())
    capsys.readouterr()
    study.main(["--trace-report", str(tmp_path / "trace_seed0.json")])
    text = capsys.readouterr().out
    assert "max_rate 0.5" in text and "net.conv1.weight, steps 10-" in text and "net.fc.weight, steps 20-20" in text


def test_a_resumed_fit_under_a_target_continues_the_uninterrupted_one_bit_identically(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    class StopAfter(L.Callback):  # an interruption: the fit is configured for 3 epochs and stops after `epochs`
        def __init__(self, epochs: int) -> None:
            self.epochs = epochs

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.current_epoch + 1 >= self.epochs:
                trainer.should_stop = True

    def fit(root: Path, epochs: int, ckpt_path: str | None = None) -> tuple[TinyCNN, ll.LaycaCallback]:
        callback = ll.LaycaCallback(
            target=ll.RotationTarget(0.05, interval=3), figure=False, angle_histograms=False, log_every_n_steps=1
        )
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
        model = TinyCNN(scheduler=True)
        callbacks = [callback, StopAfter(epochs), checkpoint]
        trainer = make_trainer(root, logger=False, callbacks=callbacks, max_epochs=3, enable_checkpointing=True)
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return model, callback

    straight, straight_callback = fit(tmp_path / "straight", 3)
    fit(tmp_path / "first", 2)  # the horizon and learning-rate profile of the resumed fit come from the checkpoint
    resumed, resumed_callback = fit(tmp_path / "resumed", 3, str(tmp_path / "first" / "ckpt" / "last.ckpt"))
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    (first,), (second,) = straight_callback.laycas.values(), resumed_callback.laycas.values()
    assert first.layca_state()["target"] == second.layca_state()["target"]


def unit_distances(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """Reference: every row's ``1 - <w, w0> / (|w| |w0|)`` in float64."""
    a, b = w.detach().double().flatten(1), w0.detach().double().flatten(1)
    return 1.0 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_under_unit_granularity_every_unit_reaches_the_target_with_rows_of_ten_times_the_gradient() -> None:
    steps, final = 200, 0.3
    model, optimizer, scheduler = build_rows(steps)
    initial = model.body.weight.detach().clone()
    train_rows(model, optimizer, range(steps), scheduler)
    reached = unit_distances(model.body.weight, initial)
    # Every unit, those with 1x and those with 10x the gradient, within 3 % of the target (measured: 2.2 % at most).
    assert reached.tolist() == pytest.approx([final] * 16, rel=0.03)
    norms = model.body.weight.detach().double().norm(dim=1)  # every unit kept its own initial norm
    torch.testing.assert_close(norms, initial.double().norm(dim=1), rtol=1e-6, atol=0)
    assert optimizer.targets is not None  # the controller measured what the reference measures, unit by unit
    assert optimizer.targets.unit_distances[0] == pytest.approx(reached.tolist(), abs=1e-12)
    # The same toy with one rate per layer: the units end far apart (measured 0.008 to 0.574).
    layer, layer_optimizer, layer_scheduler = build_rows(steps, granularity="layer")
    train_rows(layer, layer_optimizer, range(steps), layer_scheduler)
    spread = unit_distances(layer.body.weight, initial)
    assert float(spread.max() / spread.min()) > 10


def test_a_per_unit_target_takes_the_eager_step_and_says_so() -> None:
    with pytest.warns(UserWarning, match="implementation='compiled' does not apply"):
        optimizer = build_rows(20, implementation="compiled")[1]
    assert optimizer.describe() == {"body.weight": "eager"}
    assert build_rows(20, implementation="auto")[1].describe() == {"body.weight": "eager"}


def test_a_per_unit_target_holds_a_zero_gradient_row_warns_once_and_never_nan() -> None:
    steps = 60
    model, optimizer, scheduler = build_rows(steps, dead_row=True, interval=5)
    row0 = model.body.weight[0].detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_rows(model, optimizer, range(steps), scheduler)
    stuck = [str(w.message) for w in caught if "did not move" in str(w.message)]
    assert len(stuck) == 1 and "body.weight (units 0)" in stuck[0]
    assert torch.equal(model.body.weight[0], row0)  # a zero gradient: the unit stays where it was
    assert torch.isfinite(model.body.weight).all()
    assert optimizer.targets is not None
    rates = optimizer.targets.gains[0]
    assert rates is not None and all(math.isfinite(g) for g in rates)
    first = build_rows(steps, dead_row=True, interval=5)[1].rotation_rates()["body.weight"]
    assert rates[0] <= first  # held, not wound up
    assert not math.isnan(sum(optimizer.targets.distances))


def test_a_per_unit_target_resumes_bit_identically() -> None:
    steps, cut = 60, 27
    model, optimizer, scheduler = build_rows(steps)
    train_rows(model, optimizer, range(steps), scheduler)
    first, first_optimizer, first_scheduler = build_rows(steps)
    train_rows(first, first_optimizer, range(cut), first_scheduler)
    saved = (first.state_dict(), first_optimizer.state_dict(), first_scheduler.state_dict())
    resumed, resumed_optimizer, resumed_scheduler = build_rows(steps, seed=123)  # only the state can agree
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    resumed_scheduler.load_state_dict(saved[2])
    train_rows(resumed, resumed_optimizer, range(cut, steps), resumed_scheduler)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    straight, again = optimizer.layca_state()["target"], resumed_optimizer.layca_state()["target"]
    assert {k: v for k, v in straight.items() if k != "initial"} == {k: v for k, v in again.items() if k != "initial"}
    assert all(torch.equal(straight["initial"][k], again["initial"][k]) for k in straight["initial"])
    with pytest.raises(ValueError, match="per_unit"):  # a layer-granularity optimizer refuses the per-unit state
        build_rows(steps, granularity="layer")[1].targets.load(saved[1]["layca"]["target"])
