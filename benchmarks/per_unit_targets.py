"""Per-unit rotation targets on a toy: does every unit reach its target, and how small may a unit be?

A two-layer network (a body of 16 units, ReLU, a head of 4 units, no biases) learns random labels of Gaussian inputs
with SGD (lr 0.1, x0.2 at half of 200 steps); Layca controls the body alone under ``RotationTarget(0.3)``, and the
body's units 8-15 get 10x the gradient. Printed per setting: every unit's final cosine distance to its initial
weights (float64, from the weights), and the largest relative deviation from the target:

* ``granularity="unit"``: one loop per unit (units of 48 weights, batches of 128);
* ``granularity="layer"``: one rate for the body, which leaves the units far apart;
* ``granularity="unit"`` with small noisy units (12 weights, batches of 32).

Run from the repository root (a few seconds)::

    python -m benchmarks.per_unit_targets
"""

from __future__ import annotations

import os
import platform
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import lightning_layca as ll
from lightning_layca.targets import scheduled_lrs

STEPS, FINAL = 200, 0.3


class Rows(nn.Module):
    """A body of 16 units (no bias) and a head of 4; the body's rows 8-15 get 10x the gradient (row 0 none with
    ``dead_row``). The toy of this benchmark and of ``tests/test_targets.py``."""

    def __init__(self, fan_in: int = 48, dead_row: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(fan_in, 16, bias=False)
        self.head = nn.Linear(16, 4, bias=False)
        rows = torch.ones(16, 1)
        rows[8:] = 10.0
        if dead_row:
            rows[0] = 0.0
        self.body.weight.register_hook(lambda grad: grad * rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def build_rows(
    steps: int,
    fan_in: int = 48,
    implementation: str = "eager",
    dead_row: bool = False,
    interval: int = 10,
    seed: int = 0,
    granularity: str = "unit",
    steer: bool = False,
) -> tuple[Rows, ll.Layca, Any]:
    """The body of :class:`Rows` under ``RotationTarget(FINAL)`` (the head trained by SGD alone, lr 0.1, x0.2 at half
    of ``steps``); returns the model, the optimizer and the learning-rate scheduler."""
    torch.manual_seed(seed)
    model = Rows(fan_in, dead_row)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(base, milestones=[steps // 2], gamma=0.2)
    optimizer = ll.Layca(
        base,
        model.named_parameters(),
        include="body.weight",
        target=ll.RotationTarget(FINAL, interval=interval, steer=steer),
        implementation=implementation,  # type: ignore[arg-type]
        granularity=granularity,  # type: ignore[arg-type]
    )
    assert optimizer.targets is not None
    optimizer.targets.set_horizon(steps, scheduled_lrs(base.param_groups, [(scheduler, True, 1)], steps, steps))
    return model, optimizer, scheduler


def train_rows(model: Rows, optimizer: ll.Layca, steps: range, scheduler: Any, batch: int = 128) -> None:
    """Train on random labels of 512 Gaussian inputs, the batch of each step drawn from a seed of its own."""
    fan_in = model.body.weight.shape[1]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, fan_in, generator=g), torch.randint(0, 4, (512,), generator=g)
    for step in steps:
        index = torch.randint(0, 512, (batch,), generator=torch.Generator().manual_seed(1000 + step))
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def run(granularity: str, fan_in: int, batch: int) -> torch.Tensor:
    """Train once; return every body unit's final cosine distance to its initial weights (float64)."""
    model, optimizer, scheduler = build_rows(STEPS, fan_in, granularity=granularity)
    initial = model.body.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_rows(model, optimizer, range(STEPS), scheduler, batch)
    a, b = model.body.weight.detach().double(), initial.double()
    return 1.0 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def main() -> None:
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, load {os.getloadavg()}")
    for granularity, fan_in, batch in (("unit", 48, 128), ("layer", 48, 128), ("unit", 12, 32)):
        d = run(granularity, fan_in, batch)
        off = ((d - FINAL).abs() / FINAL).max().item()
        outside = int(((d - FINAL).abs() > 0.03 * FINAL).sum())
        print(
            f"granularity={granularity}, {fan_in} weights per unit, batch {batch}: units {d.min().item():.3f} to "
            f"{d.max().item():.3f}, largest deviation {100 * off:.1f} % of the target {FINAL}, "
            f"{outside} of 16 units more than 3 % away"
        )


if __name__ == "__main__":
    main()
