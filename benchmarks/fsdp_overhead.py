"""Cost of the Layca step and of the monitor's logging step under FSDP2, against the plain sharded optimizer step.

Two CPU processes over gloo (``torch.multiprocessing``), one MLP sharded with FSDP2's ``fully_shard`` (every layer's
rows split between the processes, parameters and gradients are ``DTensor``\\ s). After one backward pass the
gradients stay fixed, and each process times, interleaved round after round:

* ``sharded SGD step``: ``torch.optim.SGD(momentum=0.9).step()`` on the sharded parameters, the baseline;
* ``Layca(SGD) step``: the same optimizer wrapped in :class:`~lightning_layca.Layca` (its base step, the float64 sums
  over the local shards, one ``all_reduce``, the update of each shard);
* ``monitor logging step``: :meth:`~lightning_layca.LayerRotationMonitor.measure`, the cosine distance of every layer
  to its initial weights (local sums, one ``all_reduce``, one host transfer), which the monitor runs on logging steps
  only.

A barrier precedes every timed call so that both processes start together; the time of a call is the slower
process's. The report gives medians over the rounds and the ratios to the sharded SGD step.

Run from the repository root::

    python -m benchmarks.fsdp_overhead
    python -m benchmarks.fsdp_overhead --width 2048 --depth 8 --rounds 50 --out benchmarks/results/fsdp_overhead.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

if __package__ in (None, ""):  # run as a file: make `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_layca import Layca, LayerRotationMonitor

ROTATION_RATE = 3**-3
MEASURES = ("sharded SGD step", "Layca(SGD) step", "monitor logging step")


def build(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def timed(call: Callable[[], Any]) -> float:
    """Seconds the slower process spent in ``call``, after a barrier."""
    dist.barrier()
    start = time.perf_counter()
    call()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def worker(rank: int, world_size: int, args: argparse.Namespace, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    model = build(args.width, args.depth)
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, args.width, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()  # the gradients stay fixed from here on

    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    layca = Layca(
        torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9),
        named_parameters=model.named_parameters(),
        rotation_rate=ROTATION_RATE,
    )
    monitor = LayerRotationMonitor()
    monitor.bind(model)
    calls: dict[str, Callable[[], Any]] = {
        "sharded SGD step": sgd.step,
        "Layca(SGD) step": layca.step,
        "monitor logging step": monitor.measure,
    }
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in MEASURES}
    for round_ in range(args.rounds):
        order = MEASURES[round_ % len(MEASURES) :] + MEASURES[: round_ % len(MEASURES)]
        for name in order:
            times[name].append(timed(calls[name]))
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024, help="width of the MLP's hidden layers")
    parser.add_argument("--depth", type=int, default=6, help="hidden layers")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the one backward pass")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds of the three calls")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    if min(args.width, args.depth, args.batch_size, args.rounds) < 1 or args.warmup < 0:
        parser.error("--width, --depth, --batch-size and --rounds must be positive and --warmup non-negative.")
    world_size = 2
    load_before = load_average()
    with tempfile.TemporaryDirectory() as workdir:
        init_file, out = os.path.join(workdir, "init"), os.path.join(workdir, "times.pt")
        mp.spawn(worker, args=(world_size, args, init_file, out), nprocs=world_size, join=True)
        times: dict[str, list[float]] = torch.load(out)
    load_after = load_average()

    parameters = args.depth * (args.width * args.width + args.width) + 10 * args.width + 10
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["sharded SGD step"]
    lines = [
        f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"{world_size} processes over gloo, 1 torch thread each",
        f"- load average (1, 5, 15 min) before: {load_before}; after: {load_after}",
        f"- MLP {args.depth} x {args.width} + head ({parameters / 1e6:.2f} M parameters), every Linear "
        f"`fully_shard`-ed over {world_size} processes; {args.rounds} rounds after {args.warmup}, interleaved; "
        "medians of the slower process",
        "",
        "| call | ms (median) | quartiles (ms) | / sharded SGD step |",
        "|---|---:|---|---:|",
    ]
    for name in MEASURES:
        q1, _, q3 = statistics.quantiles(times[name], n=4)
        lines.append(
            f"| {name} | {1e3 * median[name]:.2f} | {1e3 * q1:.2f} - {1e3 * q3:.2f} | {median[name] / base:.2f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return report


if __name__ == "__main__":
    main()
