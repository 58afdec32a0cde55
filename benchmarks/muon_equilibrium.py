"""Muon's equilibrium angle per step: ``rotation_rate="equilibrium"`` against a simulation of Muon alone.

One scale-invariant layer under ``torch.optim.Muon`` (lr 0.05, weight decay 0.1), random gradients orthogonal to
the weights and of norm ``1 / ||w||``; the simulated angle is the mean tan of the angle per step over the last
quarter of the run. The table gives it per shape and momentum, the equilibrium rate Layca sets, their ratio, and the
ratio to the momentum buffers' own correlation (the orthogonalisation taken as linear).

Run from the repository root::

    python -m benchmarks.muon_equilibrium
    python -m benchmarks.muon_equilibrium --steps 4000 --seeds 3
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_layca.step.equilibrium import muon_correlation
from lightning_layca.step.families import equilibrium_rate

LR, WD = 0.05, 0.1


def simulated_angle(shape: tuple[int, int], momentum: float, nesterov: bool, steps: int, seed: int) -> float:
    """The mean tan of Muon's angle per step over the last quarter of ``steps``."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(*shape, generator=generator))
    muon = torch.optim.Muon([w], lr=LR, weight_decay=WD, momentum=momentum, nesterov=nesterov)
    tans = []
    for _ in range(steps):
        before = w.detach().double().clone()
        g = torch.randn(*shape, generator=generator)
        g -= (g * w.detach()).sum() / w.detach().square().sum() * w.detach()
        w.grad = g / w.detach().norm()
        muon.step()
        after = w.detach().double()
        along = (after * before).sum() / before.norm()
        tans.append(float((after - along * before / before.norm()).norm() / along))
    return sum(tans[-(steps // 4) :]) / (steps // 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    print(f"# lr {LR}, weight decay {WD}, {args.steps} steps, mean of {args.seeds} seed(s)")
    print("| shape | momentum | nesterov | simulated | formula | simulated / formula | simulated / linear |")
    print("|---|---|---|---|---|---|---|")
    for shape in ((64, 32), (64, 16), (16, 64), (64, 64)):
        for momentum, nesterov in ((0.9, True), (0.9, False), (0.95, True), (0.0, False)):
            w = torch.nn.Parameter(torch.zeros(shape))
            muon = torch.optim.Muon([w], lr=LR, weight_decay=WD, momentum=momentum, nesterov=nesterov)
            formula = equilibrium_rate(muon, muon.param_groups[0])
            linear = math.sqrt(2 * LR * WD / muon_correlation(momentum, nesterov))
            seeds = [simulated_angle(shape, momentum, nesterov, args.steps, s) for s in range(args.seeds)]
            measured = sum(seeds) / len(seeds)
            print(
                f"| {shape[0]} x {shape[1]} | {momentum} | {nesterov} | {measured:.5f} | {formula:.5f} "
                f"| {measured / formula:.3f} | {measured / linear:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
