"""Cost of Layca around ``torch.optim.Muon``: one optimizer step of Layca(Muon) against one step of Muon alone.

On the hidden matrices of a small transformer-like stack (``--layers`` square matrices of ``--width``, and as many
``4 width x width`` ones), with fixed random gradients, the configurations run interleaved, the order rotated every
round, and the table gives the median time of one step and its ratio to Muon alone. Layca's eager path and its
compiled path (which, around Muon, works after Muon's own step: Newton-Schulz is a matrix iteration the kernels do not
take) are both timed.

Run from the repository root::

    python -m benchmarks.muon_step_cost
    python -m benchmarks.muon_step_cost --width 256 --layers 4 --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning_layca as ll


def matrices(width: int, layers: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    shapes = [(width, width), (4 * width, width)] * layers
    params = [torch.nn.Parameter(torch.randn(*shape) / shape[1] ** 0.5) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def configurations(width: int, layers: int) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    def muon() -> torch.optim.Optimizer:
        return torch.optim.Muon(matrices(width, layers), lr=0.02)

    def layca(implementation: str) -> Callable[[], torch.optim.Optimizer]:
        def build() -> torch.optim.Optimizer:
            params = matrices(width, layers)
            named = [(f"layer{i}.weight", p) for i, p in enumerate(params)]
            return ll.Layca(torch.optim.Muon(params, lr=0.02), named, implementation=implementation)

        return build

    return {"Muon": muon, "Layca(Muon), eager": layca("eager"), "Layca(Muon), compiled": layca("compiled")}


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optimizers = {name: build() for name, build in configurations(args.width, args.layers).items()}
    for optimizer in optimizers.values():  # warm-up (compilation, state creation)
        for _ in range(3):
            optimizer.step()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizers[name].step()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["Muon"])
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
        f"{torch.__version__}, {args.threads} thread(s); {args.layers} x ({args.width}x{args.width} + "
        f"{4 * args.width}x{args.width}) float32 matrices; median of {args.rounds} rounds of {args.steps} steps",
        "",
        "| optimizer | ms per step | ratio to Muon |",
        "|---|---:|---:|",
    ]
    for name in names:
        median = statistics.median(times[name])
        lines.append(f"| {name} | {1e3 * median:.2f} | {median / base:.3f} |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
