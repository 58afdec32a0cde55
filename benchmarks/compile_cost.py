"""What compiling the Layca step costs, and whether a short fit pays for it.

Part 1: the time to compile the fused step (``compiled_step_ready``) for each kernel (after the base step: float32
multithreaded, float32 single-threaded, bfloat16 single-threaded; with the base step inside: SGD with momentum
multithreaded and single-threaded, Adam multithreaded: each its two halves), one after the other in a fresh process:
once into an empty Inductor cache (a cold compilation, as on a new machine) and once more from the cache that run filled
(as in every later process). The first kernel of the process also pays for importing and starting Inductor.

Part 2: end-to-end short fits, each in a fresh process: a plain training loop (forward, backward, step) of an MLP of
``--layers`` square layers of width ``--width`` for ``--steps`` steps, under ``Layca(SGD(momentum=0.9))`` with
``implementation="eager"``, ``"compiled"`` (compiles at the first step; its kernel takes SGD's step) and ``"auto"``
(the default: eager until the steps have cost :data:`~lightning_layca.auto_choice.AUTO_COMPILE_AFTER_SECONDS`),
interleaved over ``--repeats`` rounds, with a warm Inductor cache. The table gives the median fit time and its ratio
to the eager fit.

Run from the repository root::

    python -m benchmarks.compile_cost
    python -m benchmarks.compile_cost --steps 300 --width 1024 --layers 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_COMPILE_PROBE = """
import json, time, torch
from lightning_layca.step import base_compiled, compiled as compiled_step
out = {}
for name, dtype, parallel, variant in (
    ("float32 multithreaded, after the base step", torch.float32, True, None),
    ("float32 single-threaded, after the base step", torch.float32, False, None),
    ("bfloat16 single-threaded, after the base step", torch.bfloat16, False, None),
    ("float32 multithreaded, SGD momentum step inside", torch.float32, True, "sgd_momentum"),
    ("float32 single-threaded, SGD momentum step inside", torch.float32, False, "sgd_momentum"),
    ("float32 multithreaded, Adam/AdamW step inside", torch.float32, True, "adam"),
):
    t0 = time.perf_counter()
    # The kernels a layer of that form calls (per layer: its two halves).
    if variant:
        variants, threads = base_compiled.base_step_kernels([variant], [parallel], sharded=False, per_unit=False)
    else:
        variants, threads = [], [parallel]
    ok = compiled_step.compiled_step_ready(torch.device("cpu"), dtype, threads, variants=variants)
    out[name] = time.perf_counter() - t0 if ok else None
print(json.dumps(out))
"""

_FIT = """
import json, sys, time, torch
from torch import nn
import lightning_layca as ll
implementation, steps, width, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())], nn.Linear(width, 10))
opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model.named_parameters(),
               implementation=implementation)
x, y = torch.randn(64, width), torch.randint(0, 10, (64,))
t0 = time.perf_counter()
for _ in range(steps):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
seconds = time.perf_counter() - t0
compiled = any(path.startswith("compiled") for path in opt.describe().values())
print(json.dumps({"seconds": seconds, "compiled_at_end": compiled}))
"""


def _run(code: str, args: Sequence[str], cache_dir: str) -> dict[str, object]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Run both parts, print the report and return its lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=300, help="steps of each short fit")
    parser.add_argument("--width", type=int, default=1024, help="width of the MLP's square layers")
    parser.add_argument("--layers", type=int, default=4, help="number of square layers")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the short fits")
    parser.add_argument("--out", default=None, help="markdown file to write the report to")
    args = parser.parse_args(argv)

    import torch  # imported here so that `--help` is quick

    lines = [
        "# Compilation cost of the Layca step",
        "",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} cores; "
        f"load average at start: {_load()}",
        "",
        "| kernel | cold compile s (empty cache) | warm compile s (from the cache) |",
        "|---|---:|---:|",
    ]
    with tempfile.TemporaryDirectory(prefix="compile_cost_") as cache:
        cold = _run(_COMPILE_PROBE, [], cache)
        warm = _run(_COMPILE_PROBE, [], cache)
        for name in cold:
            lines.append(f"| {name} | {cold[name]:.1f} | {warm[name]:.1f} |")
        print("\n".join(lines), flush=True)

        elements = args.layers * args.width * args.width + args.width * 10
        header = [
            "",
            f"Short fits: {args.steps} steps of an MLP with {args.layers} x Linear({args.width}, {args.width}) and a "
            f"head ({elements:,} layer elements), batch 64, each in a fresh process, warm Inductor cache, "
            f"{args.repeats} interleaved rounds:",
            "",
            "| implementation | fit s (median) | runs | x eager | compiled at the end |",
            "|---|---:|---|---:|---|",
        ]
        names = ["eager", "compiled", "auto"]
        runs: dict[str, list[dict[str, object]]] = {name: [] for name in names}
        for r in range(args.repeats):
            for name in names[r % 3 :] + names[: r % 3]:
                runs[name].append(_run(_FIT, [name, str(args.steps), str(args.width), str(args.layers)], cache))
        seconds = {name: [float(x["seconds"]) for x in runs[name]] for name in names}  # type: ignore[arg-type]
        medians = {name: statistics.median(seconds[name]) for name in names}
        rows = []
        for name in names:
            each = ", ".join(f"{s:.2f}" for s in seconds[name])
            compiled = ", ".join(str(x["compiled_at_end"]) for x in runs[name])
            rows.append(
                f"| {name} | {medians[name]:.2f} | {each} | {medians[name] / medians['eager']:.2f} | {compiled} |"
            )
        lines += [*header, *rows, "", f"- load average at the end: {_load()}"]
        print("\n".join([*header, *rows]), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
