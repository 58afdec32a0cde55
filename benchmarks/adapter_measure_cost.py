"""Cost of measuring an adapted layer's rotation: factored form against materialising the effective weight.

One LoRA layer (``peft``'s Linear, built in code) of ``--size x --size`` at rank ``--rank``, float32, with factors
moved away from their start. Each measurement gives the per-layer cosine and the per-unit cosines of the effective
weight ``W0 + s B A`` to its start:

* factored (``lightning_layca.adapters.effective_measures``): one ``m x r`` product with the base weight, the rest on
  ``m x r`` and ``r x r`` matrices; it keeps the start's factors, ``W0 A0^T`` and row norms;
* dense, start kept: materialise ``V = W0 + s B A`` and compare with a stored ``V0`` (``m x n`` kept);
* dense, start recomputed: materialise ``V`` and ``V0`` from the start's factors.

The three run interleaved, the order rotated every round; the table gives the median time and the memory each keeps.

Run from the repository root::

    python -m benchmarks.adapter_measure_cost
    python -m benchmarks.adapter_measure_cost --size 1024 --rank 8 --rounds 7 --repeats 20
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

from lightning_layca.adapters import AdapterStart, adapters_of, effective_measures


def dense_measure(
    v0: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float
) -> tuple[float, torch.Tensor]:
    """The per-layer and per-unit cosines of ``V = W + s B A`` to ``V0``, materialising ``V``."""
    v = torch.addmm(w, b, a, alpha=s)
    units = (v * v0).sum(1, dtype=torch.float64)
    norms, norms0 = v.square().sum(1, dtype=torch.float64), v0.square().sum(1, dtype=torch.float64)
    return float(units.sum() / (norms.sum() * norms0.sum()).sqrt()), units / (norms * norms0).sqrt()


def main(argv: list[str] | None = None) -> list[str]:
    import peft

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(args.size, args.size)),
        peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["0"]),
    )
    (adapter,) = adapters_of(model)
    start = AdapterStart(adapter)
    w, a0, b0, s, _ = adapter.matrices()
    v0 = torch.addmm(w, b0, a0, alpha=s)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.01 * torch.randn_like(p))
    w, a, b, s, _ = adapter.matrices()

    candidates: dict[str, Callable[[], object]] = {
        "factored": lambda: effective_measures(adapter, start),
        "dense, start kept": lambda: dense_measure(v0, w, a, b, s),
        "dense, start recomputed": lambda: dense_measure(torch.addmm(w, start.b, start.a, alpha=s), w, a, b, s),
    }
    kept = {
        "factored": sum(
            t.numel() * t.element_size()
            for t in (start.a, start.b, start.base_rows, start.base_a0, start.rows0)
            if t is not None
        ),
        "dense, start kept": v0.numel() * v0.element_size(),
        "dense, start recomputed": (a0.numel() + b0.numel()) * a0.element_size(),
    }
    names = list(candidates)
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            begin = time.perf_counter()
            for _ in range(args.repeats):
                candidates[name]()
            times[name].append((time.perf_counter() - begin) / args.repeats)
    factored = statistics.median(times["factored"])
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
        f"{torch.__version__}, {args.threads} thread(s); LoRA {args.size}x{args.size}, rank {args.rank}, float32; "
        f"median of {args.rounds} rounds of {args.repeats} measurements",
        "",
        "| measurement | ms | time / factored | kept beside the adapter (KiB) |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        median = statistics.median(times[name])
        lines.append(f"| {name} | {1e3 * median:.3f} | {median / factored:.2f} | {kept[name] / 1024:.0f} |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
