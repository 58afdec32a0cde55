"""Where the time of the eager Layca step goes: its blocks timed apart, on one parameter set.

The eager step (``implementation="eager"``, and the default's first steps) is, after the base optimizer's step, the
float64 sums of every layer (``step.eager.step_sums``), the rule (``step.rule.coefficients``) and the update
(``step.eager.update``); before it, a snapshot of the weights. This script times each block on the layers of a
parameter set (ResNet-18 shapes by default; every layer moved by a small random step, the weights restored before
every repetition), as the median process CPU time over ``--repeats`` repetitions, the whole
``step.eager.rotate_eager``, and a whole ``Layca(SGD foreach)`` eager step on the set beside the SGD step alone.
Run it against two checkouts back to back to compare them::

    PYTHONPATH=. python -m benchmarks.eager_blocks --threads 1
    PYTHONPATH=/path/to/other/checkout python -m benchmarks.eager_blocks --threads 1
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._shapes import SHAPE_SETS
from lightning_layca import Layca
from lightning_layca.step import eager
from lightning_layca.step.rule import coefficients, unit_roundoff


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--set", default="resnet18", choices=sorted(SHAPE_SETS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    previous = [torch.randn(s, generator=gen) / s[1] ** 0.5 for _, s in SHAPE_SETS[args.set]() if len(s) >= 2]
    moved = [w + 1e-3 * torch.randn(w.shape, generator=gen) * w.abs().mean() for w in previous]
    layers = [w.clone() for w in moved]
    f64 = {"dtype": torch.float64}
    n = len(layers)
    rates, relative_lrs = torch.full((n,), 3**-3, **f64), torch.ones(n, **f64)
    norms = torch.stack([w.double().norm() for w in previous])

    def timed(block: Callable[[], object]) -> float:
        times = []
        for _ in range(args.repeats):
            torch._foreach_copy_(layers, moved)
            start = time.process_time()
            block()
            times.append(time.process_time() - start)
        return statistics.median(times) * 1e3

    sums = eager.step_sums(layers, previous, False)
    a, b, c = sums.unbind(1)
    k1, k2, _ = coefficients(a, b, c, rates, relative_lrs, norms, unit_roundoff(torch.float32))
    rows = {
        "snapshot (copy of the weights)": lambda: torch._foreach_copy_(previous, layers),
        "sums (float64)": lambda: eager.step_sums(layers, previous, False),
        "rule": lambda: coefficients(a, b, c, rates, relative_lrs, norms, unit_roundoff(torch.float32)),
        "update (float64)": lambda: eager.update(layers, previous, k1, k2),
    }
    if "single" in inspect.signature(eager.update).parameters:
        rows["update (float32, where the terms do not cancel)"] = lambda: eager.update(
            layers, previous, k1, k2, single=[True] * n
        )
    rows["rotate_eager (sums, rule, update)"] = lambda: eager.rotate_eager(layers, previous, rates, relative_lrs, norms)
    # The whole step as a user runs it: Layca(SGD(momentum=0.9, foreach=True), implementation="eager") on the full set
    # (biases and normalisation weights included), with its snapshot, base step, buckets and checks.
    named = [(name, torch.randn(s, generator=gen).requires_grad_()) for name, s in SHAPE_SETS[args.set]()]
    for _, p in named:
        p.grad = 1e-2 * torch.randn(p.shape, generator=gen)
    base = torch.optim.SGD([p for _, p in named], lr=0.01, momentum=0.9, foreach=True)
    whole = Layca(base, named, rotation_rate=3**-3, implementation="eager")
    whole.step()
    rows["Layca(SGD foreach) eager, whole step"] = whole.step
    rows["SGD foreach alone, same tensors"] = base.step
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# eager blocks: {args.set}, {n} layers, {sum(w.numel() for w in layers):,} elements")
    print(f"- code: {Path(eager.__file__).resolve().parent.parent.parent}; torch {torch.__version__}, "
          f"{args.threads} thread(s); load average at start: {load}")  # fmt: skip
    print("\n| block | median ms (process CPU time) |\n|---|---:|")
    for name, block in rows.items():
        print(f"| {name} | {timed(block):.1f} |")
    print(f"\n- load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
