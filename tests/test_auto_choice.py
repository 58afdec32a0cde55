"""The default implementation, ``"auto"``: the rule that chooses between the eager and the compiled step, replayed
with injected step times (no test here is timed), and the steps on which it changes implementation."""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import lightning_layca as ll
from lightning_layca import auto_choice
from tests.tiny_modules import TinyCNN, loader, make_trainer

TRIAL = 2 * auto_choice.AUTO_TRIAL_BLOCKS * auto_choice.AUTO_BLOCK_STEPS
"""Steps of one trial."""
FIRST, LONGEST = auto_choice.AUTO_REVISIT_STEPS


def replay(choice: auto_choice.AutoChoice, seconds: Callable[[bool, int], float], steps: int) -> list[bool]:
    """Step ``steps`` times, each taking ``seconds(compiled, step)``; return, per step, whether it was compiled.

    Checks at every step that :meth:`~lightning_layca.auto_choice.AutoChoice.record` says whether the implementation
    changed.
    """
    taken = []
    for step in range(steps):
        compiled = choice.compiled
        taken.append(compiled)
        changed = choice.record(seconds(compiled, step))
        assert changed == (choice.compiled != compiled), step
    return taken


def steps_to_compile(eager_seconds: float) -> int:
    """Eager steps of ``eager_seconds`` before the first trial."""
    choice, steps = auto_choice.AutoChoice(), 0
    while not choice.compiled:
        choice.record(eager_seconds)
        steps += 1
    return steps


def longest_run(taken: list[bool], value: bool, start: int = 0) -> int:
    """The longest run of consecutive steps from ``start`` that took ``value``."""
    longest = run = 0
    for x in taken[start:]:
        run = run + 1 if x == value else 0
        longest = max(longest, run)
    return longest


def test_eager_steps_until_they_have_cost_a_compilation_then_a_trial_in_alternating_turns() -> None:
    eager = auto_choice.AUTO_COMPILE_AFTER_SECONDS / 4
    taken = replay(auto_choice.AutoChoice(), lambda compiled, step: eager / (2 if compiled else 1), 4 + TRIAL + 10)
    assert taken[:4] == [False] * 4
    turns = taken[4 : 4 + TRIAL]  # the compiled step takes the first turn
    assert (
        turns
        == ([True] * auto_choice.AUTO_BLOCK_STEPS + [False] * auto_choice.AUTO_BLOCK_STEPS)
        * auto_choice.AUTO_TRIAL_BLOCKS
    )
    assert taken[4 + TRIAL :] == [True] * 10


@pytest.mark.parametrize("compiled_over_eager", [0.5, 0.95, 1.05, 2.0])
def test_the_faster_implementation_is_chosen_and_kept_between_trials(compiled_over_eager: float) -> None:
    choice = auto_choice.AutoChoice()
    start = steps_to_compile(1.0)
    taken = replay(choice, lambda compiled, step: compiled_over_eager if compiled else 1.0, start + TRIAL + FIRST - 1)
    assert choice.trials == 1 and choice.chosen == (compiled_over_eager < 1)
    assert set(taken[start + TRIAL :]) == {compiled_over_eager < 1}


def test_the_first_step_of_a_turn_is_not_counted() -> None:
    # A compilation (seconds) in the first compiled step, a re-allocation in the first eager one: the others decide.
    start = steps_to_compile(0.02)
    choice = auto_choice.AutoChoice()

    def seconds(compiled: bool, step: int) -> float:
        first_of_turn = step >= start and (step - start) % auto_choice.AUTO_BLOCK_STEPS == 0
        return 30.0 if first_of_turn and compiled else (0.01 if compiled else 0.02)

    replay(choice, seconds, start + TRIAL)
    assert choice.trials == 1 and choice.chosen


@pytest.mark.parametrize("offset", range(0, TRIAL, 3))
def test_a_load_that_starts_or_stops_during_a_trial_does_not_change_the_choice(offset: int) -> None:
    # The compiled step takes 0.6 of the eager one; from some step of the trial on (or until it), every step takes
    # four times as long. A mean over each implementation's steps would see the eager turns loaded and the compiled
    # ones not (or the reverse), depending on where the load starts; the ratio of neighbouring turns does not.
    for loaded_from_offset in (True, False):
        start = steps_to_compile(1.0)
        choice = auto_choice.AutoChoice()

        def seconds(compiled: bool, step: int, on: bool = loaded_from_offset, start: int = start) -> float:
            loaded = (step >= start + offset) == on
            return (0.6 if compiled else 1.0) * (4.0 if loaded and step >= start else 1.0)

        replay(choice, seconds, start + TRIAL)
        assert choice.trials == 1 and choice.chosen, (offset, loaded_from_offset)


def test_a_choice_that_load_got_wrong_is_revisited_and_corrected() -> None:
    # Every compiled turn of the first trial is loaded (the worst case): the eager step is chosen, wrongly; the
    # next trial, on a quiet machine, goes back to the compiled step.
    start = steps_to_compile(1.0)

    def seconds(compiled: bool, step: int) -> float:
        in_first_trial = start <= step < start + TRIAL
        return 0.5 * (3.0 if in_first_trial else 1.0) if compiled else 1.0

    choice = auto_choice.AutoChoice()
    taken = replay(choice, seconds, start + 2 * TRIAL + FIRST)
    assert choice.trials == 2 and choice.chosen and choice.compiled
    assert longest_run(taken, False, start + TRIAL) == FIRST  # the next trial starts with a compiled turn


def test_each_trial_that_confirms_the_choice_doubles_the_interval_up_to_the_bound() -> None:
    start = steps_to_compile(1.0)
    choice = auto_choice.AutoChoice()
    intervals = []
    for _ in range(8):
        steps = 0
        trials = choice.trials
        while choice.trials == trials:
            replay(choice, lambda compiled, step: 0.5 if compiled else 1.0, 1)
            steps += 1
        intervals.append(steps)
    expected = [start + TRIAL] + [min(FIRST * 2**k, LONGEST) + TRIAL for k in range(7)]
    assert intervals == expected


def test_under_random_bursts_of_load_the_slower_step_is_never_kept_longer_than_the_bound() -> None:
    # Bursts of 1 to 400 steps, each step 1x to 6x as long, on a third of the steps: whatever a trial concludes, the
    # slower (eager) step never runs longer than the longest interval between trials and a turn of the next trial.
    rng = random.Random(0)
    load = []
    while len(load) < 30_000:
        load += [rng.uniform(1.0, 6.0) if rng.random() < 1 / 3 else 1.0] * rng.randint(1, 400)
    choice = auto_choice.AutoChoice()
    taken = replay(choice, lambda compiled, step: (0.02 if compiled else 0.04) * load[step], len(load))
    start = steps_to_compile(0.04)
    assert longest_run(taken, False, start) <= LONGEST + auto_choice.AUTO_BLOCK_STEPS
    assert sum(taken[start:]) / len(taken[start:]) > 0.9  # and the compiled step is taken most of the time


# ----------------------------------------------------------------------- changing implementation on a logging step


@pytest.mark.parametrize("bucket_bytes", [None, 64])
def test_the_weights_before_a_step_that_changes_implementation_stay_available(
    monkeypatch: pytest.MonkeyPatch, bucket_bytes: int | None
) -> None:
    # With 64-byte buckets the eager step takes each layer in a bucket of its own and the compiled step all of them in
    # one: the plan changes its buckets with the implementation, and no step may lose the weights before it.
    from lightning_layca import plan

    monkeypatch.setattr(plan, "CPU_BUCKET_BYTES", bucket_bytes)
    monkeypatch.setattr(auto_choice, "AUTO_COMPILE_AFTER_SECONDS", 0.0)  # the first step starts the trial
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    layca = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    for step in range(2):
        before = {name: p.detach().clone() for name, p in model.named_parameters() if p.ndim >= 2}
        model(torch.randn(4, 6)).sum().backward()
        layca.keep_weights_before_next_step()
        layca.step()
        assert layca.plan.auto is not None and layca.plan.auto.compiled  # the trial's compiled steps
        assert set(layca.describe().values()) == {"compiled+base"}  # the next step's paths
        kept = layca.weights_before_last_step()
        assert sorted(kept) == sorted(before)
        for name, weights in before.items():
            assert torch.equal(kept[name], weights), (step, name)
        layca.zero_grad()


def logged_rows(log_dir: str) -> dict[int, dict[str, float]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        rows: dict[int, dict[str, float]] = {}
        for r in csv.DictReader(f):
            rows.setdefault(int(r["step"]), {}).update({k: float(v) for k, v in r.items() if v and k != "step"})
        return rows


def test_a_logging_step_that_changes_implementation_logs_every_quantity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The only step of the fit starts the trial (the next would be compiled): it must log what an eager fit logs.
    def fit(implementation: str) -> dict[int, dict[str, float]]:
        callback = ll.LaycaCallback(
            rotation_rate=0.05, log_every_n_steps=1, figure=False, angle_histograms=False, implementation=implementation
        )
        logger = CSVLogger(tmp_path / implementation, name="csv")
        trainer = make_trainer(tmp_path / implementation, logger=logger, callbacks=[callback], max_steps=1)
        torch.manual_seed(0)
        trainer.fit(TinyCNN(), loader())
        return logged_rows(logger.log_dir)

    eager = fit("eager")
    monkeypatch.setattr(auto_choice, "AUTO_COMPILE_AFTER_SECONDS", 0.0)
    auto = fit("auto")
    assert sorted(auto) == sorted(eager) == [0]
    assert sorted(auto[0]) == sorted(eager[0])  # every quantity of the step, whatever its tag
    assert auto[0] == pytest.approx(eager[0], rel=1e-6, abs=1e-9)
