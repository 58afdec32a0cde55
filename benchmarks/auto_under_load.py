"""Which step the default, ``implementation="auto"``, ends on when the machine is loaded part of the time.

Each run is a fresh Python process that steps ``Layca(SGD(momentum=0.9))`` with the default implementation on a
parameter set (ResNet-18 shapes by default, synthetic gradients set once: the step alone, back to back) for
``--seconds`` of wall time, recording per step which implementation it took. Meanwhile this script starts a second
process that loads every core (``--load-threads`` threads of float32 matrix products) from ``--load-start`` seconds
after the run starts until ``--load-stop``; the window moves by ``--load-shift`` seconds from run to run, so that the
load starts and stops at different moments of the eager phase, the compilation and the trials. After the run, on a
machine no longer loaded by this script, the same process times the eager and the compiled step (fresh optimizers,
interleaved blocks, process CPU time, medians) to tell which one is faster; the report gives, per run, where the
default ended, how often it changed implementation, and how many steps after its first trial it spent on the slower
implementation outside trials (in the longest stretch, and in all).

Run from the repository root::

    python -m benchmarks.auto_under_load --runs 10 --out benchmarks/results/auto_under_load_cpu.md
    python -m benchmarks.auto_under_load --code /path/to/other/checkout   # the rule of another version

The runs import ``lightning_layca`` (and this script) from ``--code``, whose ``benchmarks/`` must hold this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import publish
from benchmarks.step_cost import machine_description

ROOT = Path(__file__).resolve().parent.parent


def load(threads: int) -> None:
    """Keep ``threads`` cores busy until killed."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(512, 512)
    while True:
        a = torch.tanh(a @ a)


def reference(spec: str, blocks: int = 4, block: int = 10) -> dict[str, float]:
    """Median step (ms, process CPU time) of the eager and the compiled ``Layca(SGD)``, in interleaved blocks."""
    import torch

    from benchmarks.step_cost import make_param_set
    from lightning_layca import Layca

    optimizers = {}
    for implementation in ("eager", "compiled"):
        pset = make_param_set(spec, torch.device("cpu"))
        base = torch.optim.SGD(pset.params, lr=0.01, momentum=0.9)
        optimizers[implementation] = Layca(base, pset.named, rotation_rate=3**-3, implementation=implementation)
        optimizers[implementation].step()  # the compiled one compiles (or finds its kernels compiled)
    times: dict[str, list[float]] = {k: [] for k in optimizers}
    for _ in range(blocks):
        for implementation, optimizer in optimizers.items():
            optimizer.step()
            start = time.process_time()
            for _ in range(block):
                optimizer.step()
            times[implementation].append((time.process_time() - start) / block * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def child(spec: str, seconds: float, out: Path) -> None:
    """One run: step the default for ``seconds``, then time both implementations; write JSON to ``out``."""
    import torch

    from benchmarks.step_cost import make_param_set
    from lightning_layca import Layca

    pset = make_param_set(spec, torch.device("cpu"))
    optimizer = Layca(torch.optim.SGD(pset.params, lr=0.01, momentum=0.9), pset.named, rotation_rate=3**-3)
    auto = optimizer.plan.auto
    assert auto is not None
    taken, wall, cpu, started = [], [], [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        compiled = bool(auto.compiled)  # what this step takes: the plan was built (or is rebuilt) for it
        if compiled and not any(taken):  # the first compiled step: tell the script (--load-at-trial)
            out.with_suffix(".trial").touch()
        t0, c0 = time.perf_counter(), time.process_time()
        optimizer.step()
        taken.append(compiled)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    result: dict[str, Any] = {"taken": taken, "wall": wall, "cpu": cpu, "trials": getattr(auto, "trials", None)}
    out.write_text(json.dumps(result))
    result["reference_ms"] = reference(spec)
    out.write_text(json.dumps(result))


def analyse(result: dict[str, Any]) -> dict[str, Any]:
    """Where a run ended, its changes of implementation, and the steps it spent on the slower one outside trials."""
    taken: list[bool] = result["taken"]
    ref = result["reference_ms"]
    faster = ref["compiled"] < ref["eager"]
    first = taken.index(True) if True in taken else len(taken)
    changes = [k for k in range(1, len(taken)) if taken[k] != taken[k - 1]]
    # A stretch of one implementation longer than any trial turn is a choice (not a turn): count those on the slower.
    runs, start = [], first
    for k in [*changes, len(taken)]:
        if k > start:
            runs.append((taken[start], k - start))
        start = k
    turn = 10  # longer than a turn of any version's trial
    slower = [n for value, n in runs if value != faster and n > turn]
    # Where the run ended: the implementation of its last stretch longer than a trial's turn (a run that stops in the
    # middle of a trial ends on the choice of the one before).
    choices = [value for value, n in runs if n > turn] or [taken[-1]]
    return {
        "steps": len(taken),
        "first compiled step": first if first < len(taken) else None,
        "changes": len(changes),
        "final": "compiled" if choices[-1] else "eager",
        "faster": "compiled" if faster else "eager",
        "eager ms": ref["eager"],
        "compiled ms": ref["compiled"],
        "slower, longest stretch": max(slower, default=0),
        "slower, all stretches": sum(slower),
        "steps after the first compiled step": len(taken) - first,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--set", default="resnet18", help="parameter set (benchmarks/_shapes.py)")
    parser.add_argument("--runs", type=int, default=10, help="fresh processes, one after the other")
    parser.add_argument("--seconds", type=float, default=60.0, help="wall time each run steps the default")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the stepping process")
    parser.add_argument("--load-threads", type=int, default=2, help="threads of the loading process")
    parser.add_argument("--load-start", type=float, default=6.0, help="seconds into the first run the load starts")
    parser.add_argument("--load-stop", type=float, default=36.0, help="seconds into the first run the load stops")
    parser.add_argument("--load-shift", type=float, default=2.0, help="the load window moves by this much per run")
    parser.add_argument(
        "--load-at-trial",
        type=float,
        default=None,
        help="instead of the window: load for this many seconds from the run's first compiled step on (the moment "
        "a one-off comparison of the two steps is most exposed to)",
    )
    parser.add_argument("--code", default=str(ROOT), help="checkout whose lightning_layca the runs import")
    parser.add_argument("--out", default=None, help="markdown file to write the report to")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if args.child is not None:
        child(args.set, args.seconds, Path(args.child))
        return ""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": f"{args.code}{os.pathsep}{ROOT}"}
    import torch

    torch.set_num_threads(args.threads)
    lines = [f"# `implementation='auto'` under intermittent load: {args.set}, {args.runs} fresh processes", ""]
    lines += machine_description(torch.device("cpu"))
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.code, capture_output=True, text=True)
    lines.append(f"- code of the runs: {args.code} ({code.stdout.strip() or 'not a git checkout'})")
    window = (
        f"from the first compiled step for {args.load_at_trial:g} s"
        if args.load_at_trial is not None
        else f"from {args.load_start:g} s to {args.load_stop:g} s into the run, the window shifted by "
        f"{args.load_shift:g} s per run"
    )
    lines += [
        f"- each run: {args.seconds:g} s of back-to-back default steps, {args.threads} torch thread(s); load: "
        f"{args.load_threads} busy threads {window}",
        "",
        "| run | load window (s) | load avg at start | steps | first compiled step | changes | final | faster "
        "(eager / compiled ms, CPU time) | slower kept: longest stretch, all (steps) |",
        "|---:|---|---|---:|---:|---:|---|---|---|",
    ]
    ended_faster, worst = 0, 0
    for run in range(args.runs):
        out = Path(f"/tmp/auto_under_load_{os.getpid()}_{run}.json")
        start, stop = args.load_start + run * args.load_shift, args.load_stop + run * args.load_shift
        load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        proc = subprocess.Popen(  # run from the checkout measured: `-m` puts the working directory first on the path
            [sys.executable, "-m", "benchmarks.auto_under_load", "--child", str(out), "--set", args.set,
             "--seconds", str(args.seconds)],
            cwd=args.code, env=env,
        )  # fmt: skip
        t0 = time.perf_counter()
        if args.load_at_trial is not None:
            trial = out.with_suffix(".trial")
            while not trial.exists() and proc.poll() is None:
                time.sleep(0.05)
            start = time.perf_counter() - t0
            stop = start + args.load_at_trial
        time.sleep(max(0.0, start - (time.perf_counter() - t0)))
        loader = subprocess.Popen(
            [sys.executable, "-c", f"from benchmarks.auto_under_load import load; load({args.load_threads})"],
            cwd=ROOT, env=env,
        )  # fmt: skip
        time.sleep(max(0.0, stop - (time.perf_counter() - t0)))
        loader.kill()
        loader.wait()
        proc.wait()
        start, stop = round(start, 1), round(stop, 1)
        a = analyse(json.loads(out.read_text()))
        ended_faster += a["final"] == a["faster"]
        worst = max(worst, a["slower, longest stretch"])
        lines.append(
            f"| {run + 1} | {start:g}-{stop:g} | {load_avg} | {a['steps']} | {a['first compiled step']} | "
            f"{a['changes']} | {a['final']} | {a['faster']} ({a['eager ms']:.1f} / {a['compiled ms']:.1f}) | "
            f"{a['slower, longest stretch']}, {a['slower, all stretches']} |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        f"Ended on the faster implementation: {ended_faster} of {args.runs} runs; longest stretch on the slower one "
        f"after the first compiled step (trial turns not counted): {worst} steps.",
        f"- load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]
    return publish(lines, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
