"""When ``implementation="auto"`` compiles, and which implementation it keeps: one rule for every room that compiles.

Compiling costs seconds once per process and saves a fraction of every call after it: worth it for a long fit, not
for a short one, and nobody knows in advance how long a fit is. :class:`AutoChoice` is that decision, fed with the
time of each step (of the Layca step, :mod:`lightning_layca.plan`; of a rotation monitor's measurement,
:mod:`lightning_layca.measurement`): pure Python, it can be replayed with any timings.
"""

from __future__ import annotations

import statistics
from typing import Literal

__all__ = ["AUTO_BLOCK_STEPS", "AUTO_COMPILE_AFTER_SECONDS", "AUTO_REVISIT_STEPS", "AUTO_TRIAL_BLOCKS", "AutoChoice"]

AUTO_COMPILE_AFTER_SECONDS = 10.0
"""``implementation="auto"`` compiles once the eager steps of an optimizer have taken this long in total (a
compilation takes a few seconds from Inductor's on-disk cache, 15 to 25 seconds without it, on a 2-core CPU). A fit
that would not have repaid the compilation never compiles, and one that does pays it at most once more than needed:
the classic rule for renting skis until their price has been spent on rent."""

AUTO_BLOCK_STEPS = 5
"""A comparison of the two implementations (a *trial*) gives them turns of this many steps each, alternately; the
first step of a turn is not counted (it follows the other implementation: a compilation, buffers allocated anew)."""

AUTO_TRIAL_BLOCKS = 4
"""Turns of each implementation in one trial (``2 * AUTO_TRIAL_BLOCKS * AUTO_BLOCK_STEPS`` steps in all)."""

AUTO_REVISIT_STEPS = (100, 1600)
"""After a trial, the chosen implementation runs this many steps before the next trial: the first number after the
first trial and after a trial that changed the choice, doubled after each trial that confirmed it, up to the
second. No choice, right or wrong, is kept longer than the second number of steps without a new trial."""


class AutoChoice:
    """When ``implementation="auto"`` takes the compiled step: eager first, compiled once it pays, the faster kept.

    Compiling costs seconds once per process, and saves a fraction of every step: worth it for a long fit, not for a
    short one, and nobody knows in advance how long a fit is. So the eager step runs first while its time is added up;
    once it reaches :data:`AUTO_COMPILE_AFTER_SECONDS` a *trial* starts: the compiled and the eager step take turns
    of :data:`AUTO_BLOCK_STEPS` steps, :data:`AUTO_TRIAL_BLOCKS` turns each. Each turn is summed up by the median of
    its timed steps, each pair of neighbouring turns by the ratio compiled / eager of theirs, and the compiled step
    is chosen when the median of these ratios is below 1. A load that comes and goes (a data loader, another job)
    slows both turns of a pair alike, except in the two pairs where it starts and stops, which the median of seven
    ratios outvotes. A choice is never final: after :data:`AUTO_REVISIT_STEPS` steps (twice as many each time a
    trial confirms the choice, up to a bound) another trial runs, so a choice that load got wrong is corrected within
    a bounded number of steps, at the price of a few turns of the slower implementation per revisit (at most
    ``AUTO_TRIAL_BLOCKS * AUTO_BLOCK_STEPS`` steps every ``AUTO_REVISIT_STEPS[1]``: 1.2 % of the steps once the
    choice is settled).

    Times are host wall-clock times, measured on CPU only (where a kernel has finished when its call returns): of the
    whole step, the base optimizer's included, around torch's optimizers (whose closure Layca evaluates first, so that
    the forward and backward passes are not counted; the compiled step may take the base step itself), of the Layca
    part of the step around other optimizers. :meth:`record` takes them one step at a time, so the rule can be
    replayed with any timings.

    Example:
        >>> choice = AutoChoice()
        >>> choice.record(AUTO_COMPILE_AFTER_SECONDS / 2), choice.compiled
        (False, False)
        >>> choice.record(AUTO_COMPILE_AFTER_SECONDS / 2), choice.compiled  # changed: a trial starts, compiled first
        (True, True)
    """

    def __init__(self) -> None:
        self.phase: Literal["eager", "trial", "chosen"] = "eager"
        """``"eager"`` before the first trial, ``"trial"`` during one, ``"chosen"`` between trials."""
        self.compiled = False
        """Whether the compiled step is to be taken now."""
        self.chosen = False
        """What the latest trial chose (``True``: compiled)."""
        self.trials = 0
        """Trials completed."""
        self.eager_seconds = 0.0
        self.turn: list[float] = []
        """The timed steps of the current turn."""
        self.turns: list[float] = []
        """The median step of every completed turn of the current trial (they alternate)."""
        self.turn_steps = 0
        self.steps_to_trial = 0
        self.revisit_after = AUTO_REVISIT_STEPS[0]

    @property
    def measuring(self) -> bool:
        """Whether :meth:`record` needs the time of the coming step (between trials it only counts steps)."""
        return self.phase != "chosen"

    def record(self, seconds: float) -> bool:
        """Count one step and its time; return whether the implementation changes (the buckets must be rebuilt)."""
        if self.phase == "eager":
            self.eager_seconds += seconds
            return self.eager_seconds >= AUTO_COMPILE_AFTER_SECONDS and self._start_trial()
        if self.phase == "chosen":
            self.steps_to_trial -= 1
            return self.steps_to_trial <= 0 and self._start_trial()
        if self.turn_steps > 0:  # the first step of a turn follows the other implementation: not counted
            self.turn.append(seconds)
        self.turn_steps += 1
        if self.turn_steps < AUTO_BLOCK_STEPS:
            return False
        self.turns.append(statistics.median(self.turn))
        self.turn, self.turn_steps = [], 0
        if len(self.turns) < 2 * AUTO_TRIAL_BLOCKS:
            self.compiled = not self.compiled
            return True
        return self._choose()

    def _start_trial(self) -> bool:
        self.phase, self.turn, self.turns, self.turn_steps = "trial", [], [], 0
        self.compiled = not self.compiled  # the other implementation takes the first turn
        return True

    def _choose(self) -> bool:
        # The last turn was the current implementation's; turns alternate backwards from it.
        compiled_turn = [self.compiled == (k % 2 == (len(self.turns) - 1) % 2) for k in range(len(self.turns))]
        ratios = [
            (a / b if compiled_turn[k] else b / a) if min(a, b) > 0 else 1.0
            for k, (a, b) in enumerate(zip(self.turns, self.turns[1:], strict=False))
        ]
        faster = statistics.median(ratios) < 1.0
        confirmed = self.trials > 0 and faster == self.chosen
        first, longest = AUTO_REVISIT_STEPS
        self.revisit_after = min(2 * self.revisit_after, longest) if confirmed else first
        self.phase, self.steps_to_trial, self.chosen = "chosen", self.revisit_after, faster
        self.trials += 1
        changed = faster != self.compiled
        self.compiled = faster
        return changed
