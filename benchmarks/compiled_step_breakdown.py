"""Where the time of the compiled Layca step goes: kernels, Dynamo's wrappers, the base step, Python.

For the compiled rows of ``step_cost`` (``Layca(SGD foreach)``, ``Layca(SGD fused)``, ``Layca(AdamW fused)``) on a
parameter set (ResNet-18 shapes by default), this prints

1. the process CPU time per step of each compiled Layca row and of the base optimizers alone (median of blocks);
2. a ``torch.profiler`` breakdown of a few steps of each compiled Layca row, per step: the compiled kernels' own code
   (Inductor's ``CompiledFxGraph`` calls), Dynamo's and AOTAutograd's wrappers around them (the compiled region less
   the kernels: guards, cache lookup, the runtime wrappers), the wrapped optimizer's own step (the parameters Layca
   does not rotate: biases, normalisation weights) and the rest of ``Layca.step`` (its Python and small eager ops),
   with the number of compiled calls per step. The profiler adds its own cost to every recorded event, so the
   wrapper and Python shares are upper bounds;
3. without the profiler: the cost of one compiled call on a tiny layer (2 x 3 elements, so almost all of it is the
   call's overhead), times the calls per step: Dynamo's overhead per step;
4. the same compiled rows with one layer per compiled call and with :data:`LAYERS_PER_CALL`, alternated in one
   process (blocks of steps, medians), with the profiler's breakdown of each: Dynamo's overhead per step before and
   after batching layers into calls;
5. the wrapped optimizer stepping the non-rotated parameters alone (process CPU time), on the process's threads and
   as Layca runs it (:func:`~lightning_layca.stepping.small_steps_on_one_thread`).

Run from the repository root::

    python -m benchmarks.compiled_step_breakdown                 # ResNet-18 shapes, 1 thread
    python -m benchmarks.compiled_step_breakdown --threads 2

The report goes to ``benchmarks/results/compiled_step_breakdown_<threads>thread.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.step_cost import _load, build_rows, machine_description, make_param_set
from lightning_layca import compiling
from lightning_layca.step.base_compiled import base_step_kernels, rotate_base_compiled
from lightning_layca.step.compiled import BASE_KERNELS, LayerScalars, compiled_step_ready, scalars
from lightning_layca.stepping import small_steps_on_one_thread

ROWS = ("Layca(SGD foreach) compiled", "Layca(SGD fused) compiled", "Layca(AdamW fused) compiled")
BASES = ("SGD foreach", "SGD fused", "AdamW fused")
KERNEL_EVENT = "## Call CompiledFxGraph"
REGION_EVENT = "Torch-Compiled Region"


def cpu_ms_per_step(step: Callable[[], object], blocks: int = 5, block: int = 4) -> float:
    """Median over ``blocks`` of the process CPU time per step of ``block`` consecutive steps."""
    means = []
    for _ in range(blocks):
        start = time.process_time()
        for _ in range(block):
            step()
        means.append((time.process_time() - start) / block * 1e3)
    return statistics.median(means)


def profile_breakdown(step: Callable[[], object], steps: int) -> dict[str, float]:
    """Per step (ms): the total, the kernels, Dynamo's wrappers, the base step, the rest; and compiled calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    total = kernels = region = base = 0.0
    calls = 0
    for event in prof.key_averages():
        name = event.key
        if name == "Optimizer.step#Layca.step":
            total += event.cpu_time_total
        elif name.startswith(KERNEL_EVENT):
            kernels += event.self_cpu_time_total
        elif name.startswith(REGION_EVENT):
            region += event.cpu_time_total
            calls += event.count
        elif name.startswith("Optimizer.step#"):
            base += event.cpu_time_total
    # The compiled region holds the kernels, its own wrappers, and the cache lookup is recorded beside it.
    lookup = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup")
    wrappers = region - kernels + lookup
    per = 1e3 * steps
    return {
        "total": total / per,
        "kernels": kernels / per,
        "wrappers": wrappers / per,
        "base": base / per,
        "rest": (total - kernels - wrappers - base) / per,
        "calls": calls / steps,
    }


def _tiny_layer(rows: int = 2, columns: int = 3) -> list[torch.Tensor]:
    """The arguments of SGD with momentum's kernel for a tiny layer (its call is then almost all overhead)."""
    gen = torch.Generator().manual_seed(rows * 100 + columns)
    p, g, buf = (torch.randn(rows, columns, generator=gen) for _ in range(3))
    hyper = torch.tensor([0.01, 0.9, 1.0, 0.0, 1.0, 0.9], dtype=torch.float64)
    rate, relative_lr = scalars(torch.tensor([1e-3, 1.0], dtype=torch.float64))
    (flag,) = scalars(torch.zeros(1, dtype=torch.bool))
    return [p, g, buf, hyper, rate, relative_lr, torch.tensor(1.0, dtype=torch.float64), flag]


def _per_call_us(call: Callable[[], object], repeats: int) -> float:
    with torch.no_grad():
        for _ in range(100):
            call()
        start = time.process_time()
        for _ in range(repeats):
            call()
        return (time.process_time() - start) / repeats * 1e6


def tiny_call_us(repeats: int = 2000) -> tuple[float, float]:
    """Process CPU time of one step of SGD with momentum's kernels (its two halves) on a 2 x 3 layer, in us.

    Returns it as Layca calls it, and with ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``.
    """
    device, dtype = torch.device("cpu"), torch.float32
    kernels, threads = base_step_kernels(["sgd_momentum"], [False], sharded=False, per_unit=False)
    if not compiled_step_ready(device, dtype, threads, variants=kernels):
        return float("nan"), float("nan")
    p, g, buf, hyper, *rest = _tiny_layer()
    layer = LayerScalars(*rest)

    def call() -> None:
        rotate_base_compiled([p], [g], [[buf]], [hyper], [layer], [False], ["sgd_momentum"])

    plain = _per_call_us(call, repeats)
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        skipping = _per_call_us(call, repeats)
    return plain, skipping


def batched_prototype(size: int, repeats: int = 500) -> tuple[float, float]:
    """A prototype: SGD with momentum's kernel body for ``size`` layers in one compiled function (not Layca's code).

    Returns the seconds its first call took (tracing and compiling, with the on-disk caches as they are) and the
    process CPU time per layer of one call on tiny layers (2 x 3 to 2 x (size + 2)), in us.
    """
    body = BASE_KERNELS["sgd_momentum"][0]

    def kernel(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        arity = len(args) // size
        return tuple(body(*args[i * arity : (i + 1) * arity]) for i in range(size))

    options: dict[str, str | int | bool | Callable[..., object]] = {
        "max_pointwise_cat_inputs": 0,
        "cpp.threads": 1,
        "realize_reads_threshold": 100,
    }
    compiled = torch.compile(kernel, dynamic=True, fullgraph=True, options=options)
    with torch.no_grad(), torch._dynamo.config.patch(specialize_float=True):
        # Stand-ins of distinct sizes (equal sizes would be tied together by the compiled code's guards).
        stand_in = [x for i in range(size) for x in _tiny_layer(64 + 2 * i, 576 + 2 * i)]
        start = time.perf_counter()
        compiled(*stand_in)
        seconds = time.perf_counter() - start
        tiny = [x for i in range(size) for x in _tiny_layer(2, 3 + i)]
        return seconds, _per_call_us(lambda: compiled(*tiny), repeats) / size


def layers_per_call_ab(step: Callable[[], object], rounds: int = 8) -> list[str]:
    """One layer per compiled call against :data:`LAYERS_PER_CALL`, alternated: table rows of medians and profiles."""
    sizes = (1, compiling.LAYERS_PER_CALL)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    try:
        for size in sizes:
            compiling.LAYERS_PER_CALL = size
            for _ in range(3):  # compile, warm up
                step()
        for _ in range(rounds):
            for size in sizes:
                compiling.LAYERS_PER_CALL = size
                times[size].append(cpu_ms_per_step(step, blocks=1, block=4))
        lines = []
        for size in sizes:
            compiling.LAYERS_PER_CALL = size
            b = profile_breakdown(step, 3)
            lines.append(
                f"{size} | {statistics.median(times[size]):.2f} | {b['calls']:.0f} | {b['wrappers']:.2f} | "
                f"{b['kernels']:.2f} | {b['rest']:.2f} |"
            )
        return lines
    finally:
        compiling.LAYERS_PER_CALL = sizes[1]


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="resnet18")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per row")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--batched",
        type=lambda text: [int(x) for x in text.split(",") if x],
        default=[],
        help="comma-separated layer counts: time a prototype that steps that many layers per compiled call",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    pset = make_param_set(args.set, device)
    rows, _ = build_rows(pset, device, with_reference=False, with_peers=False, with_prototypes=False)
    chosen = {row.name: row for row in rows if row.name in ROWS + BASES}
    for row in chosen.values():  # compile, create the optimizer states
        for _ in range(3):
            row.step()
    lines = [
        f"# Compiled Layca step: where the time goes ({pset.describe()}, {args.threads} thread(s))",
        "",
        *machine_description(device),
        "",
        "## Process CPU time per step (median of 5 blocks of 4 steps)",
        "",
        "| row | ms | ratio to its base |",
        "|---|---:|---:|",
    ]
    ms = {name: cpu_ms_per_step(row.step) for name, row in chosen.items()}
    for name in BASES + ROWS:
        if name in ms:
            base = BASES[ROWS.index(name)] if name in ROWS else name
            lines.append(f"| {name} | {ms[name]:.2f} | {ms[name] / ms[base]:.2f} |")
    lines += [
        "",
        f"## torch.profiler, {args.steps} steps per row, ms per step (profiler overhead included)",
        "",
        "| row | Layca.step | kernels | Dynamo/AOT wrappers | base optimizer (other params) | rest (Python, eager "
        "ops) | compiled calls per step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ROWS:
        if name not in chosen:
            continue
        b = profile_breakdown(chosen[name].step, args.steps)
        lines.append(
            f"| {name} | {b['total']:.2f} | {b['kernels']:.2f} | {b['wrappers']:.2f} | {b['base']:.2f} | "
            f"{b['rest']:.2f} | {b['calls']:.0f} |"
        )
        calls = b["calls"]
    per_call, skipping = tiny_call_us()
    lines += [
        "",
        "## Dynamo's overhead without the profiler",
        "",
        f"* one compiled call on a 2 x 3 layer: {per_call:.1f} us of process CPU time",
        f"* times {calls:.0f} compiled calls per step: {per_call * calls / 1e3:.2f} ms per step",
        f"* the same call with `torch.compiler.set_stance(skip_guard_eval_unsafe=True)`: {skipping:.1f} us",
    ]
    for size in args.batched:
        seconds, per_layer = batched_prototype(size)
        lines.append(
            f"* prototype, {size} layers per compiled call: {per_layer:.1f} us per layer and call; first call "
            f"(compilation) {seconds:.1f} s"
        )
    lines += [
        "",
        f"## Layers per compiled call: 1 against {compiling.LAYERS_PER_CALL}, alternated in this process",
        "",
        "Process CPU time per step (median of 8 blocks of 4 steps, the two settings alternated), then a profile of 3 "
        "steps of each (ms per step, profiler overhead included):",
        "",
        "| row | layers per call | ms per step | compiled calls per step | Dynamo/AOT wrappers | kernels | rest |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ROWS:
        if name in chosen:
            lines += [f"| {name} | {line}" for line in layers_per_call_ab(chosen[name].step)]
    lines += [
        "",
        "## The wrapped optimizer stepping the parameters Layca does not rotate, alone",
        "",
    ]
    small = [p for p in pset.params if p.ndim < 2]
    lines.append(f"{len(small)} tensors, {sum(p.numel() for p in small):,} elements:")
    lines.append("")
    for name, make in (
        ("SGD foreach", lambda: torch.optim.SGD(small, lr=0.01, momentum=0.9, foreach=True)),
        ("SGD fused", lambda: torch.optim.SGD(small, lr=0.01, momentum=0.9, fused=True)),
        ("AdamW fused", lambda: torch.optim.AdamW(small, lr=1e-3, fused=True)),
    ):
        opt = make()
        for _ in range(3):
            opt.step()

        def as_layca_runs_it(opt: torch.optim.Optimizer = opt) -> None:
            with small_steps_on_one_thread(opt):
                opt.step()

        alone = cpu_ms_per_step(opt.step, blocks=5, block=20)
        inside = cpu_ms_per_step(as_layca_runs_it, blocks=5, block=20)
        lines.append(f"* {name}: {alone:.3f} ms per step; as Layca runs it: {inside:.3f} ms")
    lines += ["", f"Load average at end: {_load()}"]
    out = Path(args.out or Path(__file__).parent / "results" / f"compiled_step_breakdown_{args.threads}thread.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
