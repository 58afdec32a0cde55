"""Cost of one optimizer step: base optimizers, Layca around them, a per-tensor reference and peers, side by side.

Every row steps the same parameter set with the same synthetic gradients (made once: the step cost excludes the
backward pass), a cycle of four, ``g1, -g1, g2, -g2``, one per step (:data:`GRADIENT_CYCLE`): a gradient that never
changed would, step after step, turn a Layca row's weights until they point along it, and its steps would end up
purely radial, a regime no training is in. Rows are timed in blocks of consecutive steps, the blocks interleaved
across rows with the order rotated every round (A B C, B C A, C A B, ...), so that machine noise hits all rows
alike. Each block gives two readings: its first step, which follows another row's block (caches and thread pool as
another optimizer left them, as in training, where the forward and backward passes come between two steps), and the
mean of its other steps (the steady state of back-to-back steps). The table reports the medians of both over the
blocks and the ratio of each row to the base step it wraps and to ``SGD(momentum=0.9, foreach=True)``. On CPU a
step is timed with ``time.perf_counter`` (or, with ``--clock cpu``, the process's CPU time, which a preemption by
another process does not inflate); on CUDA with CUDA events, the first step of a block on an idle device, the
others enqueued back to back.

Layca rows come in both implementations (``implementation="eager"`` and ``"compiled"``); the report says which one
``"auto"``, the default, picks for the set. The first step of a compiled row compiles the fused step when the
process has not done so yet: its time is reported per set (``--fresh-inductor-cache`` measures a cold compilation).

Run from the repository root::

    python -m benchmarks.step_cost                      # CPU, or CUDA when present; writes benchmarks/results/
    python -m benchmarks.step_cost --device cpu --sets resnet18,mlp200 --repeats 30
    python -m benchmarks.step_cost --profile            # adds where the time of a Layca(SGD) step goes
    python -m benchmarks.step_cost --threads 1 --clock cpu   # on a CPU shared with other jobs

Rows sharing one parameter set step the *same* parameter and gradient tensors (each optimizer keeps its own state),
which keeps the memory of the ViT-B/16 set reasonable; the values stay finite and normal, so timings are unaffected.
A set name with ``@bf16`` (``resnet18@bf16``) runs the set in bfloat16 (the low-precision path of Layca).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._prototypes import FusedSGDLayca, cuda_graph_step
from benchmarks._shapes import SHAPE_SETS, ShapeSet, numel
from lightning_layca import Layca
from lightning_layca.auto_choice import AUTO_COMPILE_AFTER_SECONDS
from lightning_layca.step.compiled import use_compiled_step

ROTATION_RATE = 3**-3
EPS = 1e-7
SGD_LR, ADAMW_LR = 0.01, 1e-3
DEFAULT_SETS = "resnet18,resnet50,vitb16,mlp200,resnet18@bf16"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASE_ROW = "SGD foreach"
REFERENCE_ROW = "per-tensor reference (SGD foreach)"
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def allocator_environment() -> str:
    """The variables that change how the process allocates memory (glibc's malloc, jemalloc, torch's CPU allocator).

    They change what a step costs where a compiled kernel allocates a tensor-sized output at every call (see the
    section on page faults in ``benchmarks/README.md``).
    """
    names = ["GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD"]
    names += sorted(k for k in os.environ if k.startswith("MALLOC_"))
    return ", ".join(f"{k}={os.environ[k]}" for k in names if k in os.environ) or "none set"


# ---------------------------------------------------------------------------------------------- the naive baseline
class PerTensorLayca:
    """The Layca step written straight from the formulas, one tensor at a time, in the parameters' own dtype.

    This is what a first implementation looks like: snapshot each layer, let the base optimizer step, then per
    layer project the step ``D`` onto the tangent space of ``w``, apply the ``eps`` rule (a host-side ``if``), give
    the tangential step the norm ``rho * ||w||`` and renormalise to the initial norm.

    Args:
        optimizer: The base optimizer.
        layers: The controlled parameters (every other parameter is stepped by the base only).
        rotation_rate: ``rho`` at the base learning rate; scaled by each group's relative learning rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, layers: Sequence[torch.Tensor], rotation_rate: float) -> None:
        self.optimizer = optimizer
        self.layers = list(layers)
        self.rotation_rate = rotation_rate
        with torch.no_grad():
            self.initial_norms = [float(p.norm()) for p in self.layers]
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.layer_group = [group_of[id(p)] for p in self.layers]
        self.initial_lrs = [float(group["lr"]) for group in optimizer.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        """One base step followed by the per-layer Layca correction."""
        previous = [p.detach().clone() for p in self.layers]
        self.optimizer.step()
        for p, w, n0, g in zip(self.layers, previous, self.initial_norms, self.layer_group, strict=True):
            rho = self.rotation_rate * float(self.optimizer.param_groups[g]["lr"]) / self.initial_lrs[g]
            d = p.detach() - w
            d_perp = d - (torch.sum(d * w) / torch.sum(w * w)) * w
            norm_perp = torch.linalg.vector_norm(d_perp)
            if not math.isfinite(float(norm_perp)) or float(norm_perp) <= EPS:
                p.copy_(w)
                continue
            moved = w + (rho * torch.linalg.vector_norm(w) / norm_perp) * d_perp
            p.copy_(moved * (n0 / torch.linalg.vector_norm(moved)))


# ---------------------------------------------------------------------------------------------- rows and sets
@dataclass
class Row:
    """One optimizer to time: ``step`` runs one step; ``base`` names the row it is compared to.

    ``first_ms`` holds the first step of every timed block (after another row's block), ``steady_ms`` the mean step
    of the rest of every block, ``setup_s`` the duration of the very first step (compilation included).
    """

    name: str
    step: Callable[[], object]
    base: str | None = None
    first_ms: list[float] = field(default_factory=list)
    steady_ms: list[float] = field(default_factory=list)
    setup_s: float = math.nan
    compiled: bool = False


GRADIENT_CYCLE = 4
"""Synthetic gradients per parameter, taken in turn, one per step: ``g1, -g1, g2, -g2`` (they sum to zero, so no
direction persists in a momentum buffer either). Setting them costs one attribute per parameter per step, in every
row alike."""


@dataclass
class ParamSet:
    """A parameter set with synthetic gradients: ``named`` in depth order, ``layers`` the tensors of ndim >= 2.

    ``gradients`` holds the cycle of :data:`GRADIENT_CYCLE` gradients of every parameter; :meth:`cycled` makes a step
    that takes the next one first.
    """

    name: str
    named: list[tuple[str, torch.Tensor]]
    gradients: list[list[torch.Tensor]] = field(default_factory=list)
    turn: int = 0

    def next_gradients(self) -> None:
        """Give every parameter the next gradient of the cycle."""
        if self.gradients:
            self.turn = (self.turn + 1) % len(self.gradients)
            for (_, p), g in zip(self.named, self.gradients[self.turn], strict=True):
                p.grad = g

    def cycled(self, step: Callable[[], object]) -> Callable[[], object]:
        """``step`` preceded by :meth:`next_gradients`."""

        def stepped() -> object:
            self.next_gradients()
            return step()

        return stepped

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for _, p in self.named]

    @property
    def layers(self) -> list[torch.Tensor]:
        return [p for _, p in self.named if p.ndim >= 2]

    def describe(self) -> str:
        n = sum(p.numel() for p in self.params)
        return (
            f"{self.name}: {n:,} parameters in {len(self.named)} tensors, {len(self.layers)} layers (ndim >= 2), "
            f"{self.params[0].dtype}"
        )


def parse_set(spec: str) -> tuple[str, torch.dtype]:
    """``"resnet18"`` or ``"resnet18@bf16"`` -> (shape-set name, dtype)."""
    name, _, dtype_name = spec.strip().partition("@")
    if name not in SHAPE_SETS:
        raise SystemExit(f"step_cost: unknown set {name!r}; accepted: {', '.join(SHAPE_SETS)}.")
    dtype_name = dtype_name or "fp32"
    if dtype_name not in DTYPES:
        raise SystemExit(f"step_cost: unknown dtype {dtype_name!r} in {spec!r}; accepted: {', '.join(DTYPES)}.")
    return name, DTYPES[dtype_name]


def make_param_set(spec: str, device: torch.device, shapes: ShapeSet | None = None, seed: int = 0) -> ParamSet:
    """Random parameters (fan-in scaled) with random gradients of a realistic scale, on ``device``."""
    name, dtype = parse_set(spec)
    gen = torch.Generator().manual_seed(seed)
    named = []
    cycle: list[list[torch.Tensor]] = [[] for _ in range(GRADIENT_CYCLE)]
    for pname, shape in shapes if shapes is not None else SHAPE_SETS[name]():
        fan_in = numel(shape[1:]) if len(shape) >= 2 else 1
        scale = 1.0 / math.sqrt(fan_in) if len(shape) >= 2 else 0.1
        p = (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype).requires_grad_()
        for k in range(0, GRADIENT_CYCLE, 2):
            g = (torch.randn(shape, generator=gen) * 1e-2).to(device=device, dtype=dtype)
            cycle[k].append(g)
            cycle[k + 1].append(-g)
        p.grad = cycle[0][-1]
        named.append((pname, p))
    return ParamSet(spec, named, cycle)


def _fused_available(cls: type[torch.optim.Optimizer], pset: ParamSet, **kwargs: float) -> bool:
    probe = torch.zeros(2, 2, device=pset.params[0].device, dtype=pset.params[0].dtype, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        cls([probe], fused=True, **kwargs).step()  # type: ignore[call-arg]
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def build_rows(
    pset: ParamSet,
    device: torch.device,
    with_reference: bool = True,
    with_peers: bool = True,
    with_prototypes: bool = True,
) -> tuple[list[Row], list[str]]:
    """The rows for one set, and notes on rows that could not run here."""
    params, named = pset.params, pset.named
    notes: list[str] = []

    def sgd(**kw: bool) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=SGD_LR, momentum=0.9, **kw)  # type: ignore[arg-type]

    def adamw(**kw: bool) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=ADAMW_LR, **kw)  # type: ignore[arg-type]

    def layca(opt: torch.optim.Optimizer, implementation: str, granularity: str = "layer") -> Callable[[], object]:
        return Layca(
            opt,
            named_parameters=named,
            rotation_rate=ROTATION_RATE,
            implementation=implementation,  # type: ignore[arg-type]
            granularity=granularity,  # type: ignore[arg-type]
        ).step

    sgd_fused = _fused_available(torch.optim.SGD, pset, lr=SGD_LR)
    adamw_fused = _fused_available(torch.optim.AdamW, pset, lr=ADAMW_LR)
    adamw_name = "AdamW fused" if adamw_fused else "AdamW foreach"
    rows = [Row(BASE_ROW, sgd(foreach=True).step)]
    if sgd_fused:
        rows.append(Row("SGD fused", sgd(fused=True).step))
    else:
        notes.append("SGD fused: n/a on this device/dtype")
    rows.append(Row(adamw_name, (adamw(fused=True) if adamw_fused else adamw(foreach=True)).step))
    if not adamw_fused:
        notes.append("AdamW fused: n/a on this device/dtype (AdamW foreach instead)")
    for implementation in ("compiled", "eager"):
        compiled = implementation == "compiled"
        rows.append(
            Row(
                f"Layca(SGD foreach) {implementation}",
                layca(sgd(foreach=True), implementation),
                BASE_ROW,
                compiled=compiled,
            )
        )
        if sgd_fused:
            rows.append(
                Row(
                    f"Layca(SGD fused) {implementation}",
                    layca(sgd(fused=True), implementation),
                    "SGD fused",
                    compiled=compiled,
                )
            )
        base = adamw(fused=True) if adamw_fused else adamw(foreach=True)
        rows.append(
            Row(f"Layca({adamw_name}) {implementation}", layca(base, implementation), adamw_name, compiled=compiled)
        )
        rows.append(
            Row(
                f"Layca(SGD foreach) per unit {implementation}",
                layca(sgd(foreach=True), implementation, "unit"),
                BASE_ROW,
                compiled=compiled,
            )
        )
    if with_reference:
        ref = PerTensorLayca(sgd(foreach=True), pset.layers, ROTATION_RATE)
        rows.append(Row(REFERENCE_ROW, ref.step, base=BASE_ROW))
    if with_prototypes:
        fused_base = "SGD fused" if sgd_fused else BASE_ROW
        prototype = FusedSGDLayca(named, SGD_LR, 0.9, ROTATION_RATE)
        rows.append(Row("prototype: SGD + Layca compiled together", prototype.step, fused_base, compiled=True))
    if device.type == "cuda":
        for name in ("SGD fused", "Layca(SGD fused) compiled"):
            row = next((r for r in rows if r.name == name), None)
            if row is None:
                continue
            try:
                replay = cuda_graph_step(row.step, device)
            except Exception as error:  # any failure to capture is a finding, not a crash
                notes.append(f"{name} in a CUDA graph: capture failed ({type(error).__name__}: {error})")
                continue
            base_name = "SGD fused" if name != "SGD fused" else None
            rows.append(
                Row(f"{name}, CUDA graph", replay, base_name and "SGD fused, CUDA graph", compiled=row.compiled)
            )
    if with_peers:
        try:
            from timm.optim import AdamP, Lars  # type: ignore[import-not-found]
        except ImportError:
            notes.append("timm Lars / AdamP: skipped (timm is not installed)")
        else:
            rows.append(Row("timm Lars (momentum 0.9)", Lars(params, lr=SGD_LR, momentum=0.9).step, base=BASE_ROW))
            rows.append(Row("timm AdamP", AdamP(params, lr=ADAMW_LR).step, base=adamw_name))
    for row in rows:
        row.step = pset.cycled(row.step)
    return rows, notes


def auto_choice(pset: ParamSet, device: torch.device) -> str:
    """Which implementation ``Layca(implementation="auto")`` settles on for this set in a long fit.

    ``"auto"`` steps eagerly until those steps have taken ``AUTO_COMPILE_AFTER_SECONDS``, then keeps the compiled step
    if it is faster (the rows measure whether it is).
    """
    return "compiled" if use_compiled_step("auto", device, pset.layers[0].dtype) else "eager"


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed_ms(steps: Callable[[], None], device: torch.device, now: Callable[[], float]) -> float:
    """Time ``steps``: CUDA events (started on an idle device) on CUDA, ``now`` elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        steps()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = now()
    steps()
    return (now() - t0) * 1e3


def time_rows(
    rows: list[Row], device: torch.device, warmup: int, repeats: int, block: int = 5, clock: str = "wall"
) -> None:
    """Warm every row up, then time ``repeats`` interleaved rounds of one block of ``block`` steps per row.

    The order of the rows rotates every round. Per block, ``row.first_ms`` gets the first step and ``row.steady_ms``
    the mean of the ``block - 1`` others. The very first step of a row is timed into ``row.setup_s``. On CPU
    ``clock="cpu"`` reads the process's CPU time instead of the wall clock: on a shared machine a step that is
    preempted by another process then does not absorb the other process's time slice.
    """
    if block < 2:
        raise ValueError(f"step_cost: a block needs at least 2 steps, got {block}.")
    now = time.process_time if clock == "cpu" else time.perf_counter
    for row in rows:
        row.setup_s = _elapsed_ms(row.step, device, time.perf_counter) / 1e3
    for _ in range(warmup):
        for row in rows:
            row.step()
    _sync(device)

    for r in range(repeats):
        order = rows[r % len(rows) :] + rows[: r % len(rows)]
        for row in order:
            row.first_ms.append(_elapsed_ms(row.step, device, now))

            def rest(step: Callable[[], object] = row.step) -> None:
                for _ in range(block - 1):
                    step()

            row.steady_ms.append(_elapsed_ms(rest, device, now) / (block - 1))


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def table(pset: ParamSet, rows: list[Row]) -> list[str]:
    """Markdown table: medians, interquartile range of the steady state and ratios for each row."""
    steady = {row.name: median(row.steady_ms) for row in rows}
    first = {row.name: median(row.first_ms) for row in rows}
    ref = steady.get(REFERENCE_ROW)
    lines = [
        f"#### {pset.describe()}",
        "",
        "| row | steady ms | IQR ms | x SGD foreach | x own base | reference / row | first step ms | "
        "x SGD foreach (first) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        q1, _, q3 = statistics.quantiles(row.steady_ms, n=4) if len(row.steady_ms) > 1 else (steady[row.name],) * 3
        own = f"{steady[row.name] / steady[row.base]:.2f} ({row.base})" if row.base in steady else ""
        speedup = f"{ref / steady[row.name]:.2f}" if ref is not None and "Layca" in row.name else ""
        lines.append(
            f"| {row.name} | {steady[row.name]:.2f} | {q1:.2f}-{q3:.2f} | {steady[row.name] / steady[BASE_ROW]:.2f} | "
            f"{own} | {speedup} | {first[row.name]:.2f} | {first[row.name] / first[BASE_ROW]:.2f} |"
        )
    return lines


def profile_layca(pset: ParamSet, device: torch.device, steps: int = 3, top: int = 12) -> list[str]:
    """Where the time of a ``Layca(SGD)`` step goes: the top operators of a few steps under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    fused = _fused_available(torch.optim.SGD, pset, lr=SGD_LR)
    opt = torch.optim.SGD(pset.params, lr=SGD_LR, momentum=0.9, fused=fused or None, foreach=None if fused else True)
    step = Layca(opt, named_parameters=pset.named, rotation_rate=ROTATION_RATE).step  # the default implementation
    step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kind = "fused" if fused else "foreach"
    text = prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=48)
    title = f"#### Profile of Layca(SGD {kind}) {auto_choice(pset, device)} (the default), {pset.name}, {steps} steps"
    return [title, "", "```", text.rstrip(), "```"]


DEFAULT = "default"
"""In a target, ``Layca(...) default`` is the row of the implementation ``implementation="auto"`` picks for the set."""

TARGETS = {
    # device: [(set, row, compared to, bound, "<=" or ">=")]: the issues' targets, checked on the steady medians
    "cpu": [
        ("resnet18", f"Layca(SGD foreach) {DEFAULT}", BASE_ROW, 2.5, "<="),
        ("resnet18", REFERENCE_ROW, f"Layca(SGD foreach) {DEFAULT}", 2.0, ">="),
    ],
    "cuda": [
        ("resnet50", "Layca(SGD fused) compiled", "SGD fused", 1.5, "<="),
        ("vitb16", "Layca(SGD fused) compiled", "SGD fused", 1.5, "<="),
        ("resnet50", f"Layca(SGD fused) {DEFAULT}", "SGD fused", 1.5, "<="),
        ("vitb16", f"Layca(SGD fused) {DEFAULT}", "SGD fused", 1.5, "<="),
    ],
}


def check_targets(device: torch.device, medians: dict[str, dict[str, float]], choices: dict[str, str]) -> list[str]:
    """One line per target whose set was run: the measured ratio, the bound and whether it is met."""
    lines = []
    for set_name, row, other, bound, op in TARGETS.get(device.type, []):
        if set_name not in medians:
            continue
        row = row.replace(DEFAULT, choices[set_name])
        other = other.replace(DEFAULT, choices[set_name])
        if row not in medians[set_name] or other not in medians[set_name]:
            continue
        ratio = medians[set_name][row] / medians[set_name][other]
        met = ratio <= bound if op == "<=" else ratio >= bound
        verdict = "met" if met else "NOT met"
        lines.append(f"- {set_name}: {row} / {other} = {ratio:.2f} (target {op} {bound:g}): {verdict}")
    return lines


# ---------------------------------------------------------------------------------------------- machine
def _code_version() -> str:
    """The commit measured, and whether the optimizer's source differed from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "lightning_layca"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {commit}" + (" (lightning_layca/ modified)" if dirty else "")


def sgd_form(device: torch.device, dtype: torch.dtype) -> str:
    """Which form SGD's compiled layers (per layer) take in this process: measured once, when first needed."""
    from lightning_layca.step.sgd_form import SgdForms

    form = "two halves" if SgdForms().in_halves(device, dtype) else "one call"
    return f"SGD's compiled layers (per layer) in this process: {form} (`step.sgd_form`)"


def machine_description(device: torch.device) -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {cpu}, {cores} cores available, torch threads: {torch.get_num_threads()}",
        f"- load average (1, 5, 15 min) at start: {load}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.machine()}",
    ]
    lines.append(f"- code: {_code_version()}")
    env = ", ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in THREAD_ENV)
    lines.append(f"- threading environment: {env}")
    lines.append(f"- memory allocator environment: {allocator_environment()}")
    if device.type == "cuda":
        lines.append(f"- device: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    else:
        lines.append("- device: CPU")
    return lines


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sets", default=DEFAULT_SETS, help=f"comma-separated, from {', '.join(SHAPE_SETS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 10 on CPU, 20 on CUDA)")
    parser.add_argument("--block", type=int, default=None, help="steps per row and round (default: 5 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default: 2 CPU, 5 CUDA)")
    parser.add_argument("--out", default=None, help="markdown file (default: benchmarks/results/step_cost_<dev>.md)")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="CPU timer: wall (perf_counter) or the process's CPU time (robust on a shared machine; use --threads 1)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--no-reference", action="store_true", help="skip the per-tensor reference row")
    parser.add_argument("--no-prototypes", action="store_true", help="skip the prototype rows")
    parser.add_argument(
        "--fresh-inductor-cache", action="store_true", help="compile into an empty Inductor cache (a cold compile)"
    )
    parser.add_argument("--profile", action="store_true", help="append a torch.profiler table of Layca(SGD)")
    parser.add_argument("--quick", action="store_true", help="tiny budget (1 warm-up, 3 rounds, shrunken sets)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("step_cost: --device cuda requested but torch.cuda.is_available() is False.")
    cpu = args.device == "cpu"
    if args.quick:
        args.repeats, args.warmup = args.repeats or 3, args.warmup if args.warmup is not None else 1
        args.block = args.block or 2
    args.repeats = args.repeats if args.repeats is not None else (10 if cpu else 20)
    args.block = args.block if args.block is not None else (5 if cpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (2 if cpu else 5)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"step_cost: --threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0 or args.block < 2:
        raise SystemExit(
            f"step_cost: --repeats must be >= 1, --warmup >= 0 and --block >= 2, got {args.repeats}, {args.warmup}, "
            f"{args.block}."
        )
    args.sets = [s for s in args.sets.split(",") if s.strip()]
    for spec in args.sets:
        parse_set(spec)
    if args.out is None:
        args.out = str(Path(__file__).resolve().parent / "results" / f"step_cost_{args.device}.md")
    return args


def shrink(shapes: ShapeSet, factor: int = 8) -> ShapeSet:
    """The same tensors with every dimension of size >= 64 divided by ``factor`` (for --quick runs)."""
    return [(n, tuple(d // factor if d >= 64 else d for d in s)) for n, s in shapes]


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Run the benchmark, print the report, write it to ``--out`` and return its lines."""
    args = parse_args(argv)
    device = torch.device(args.device)
    cache = "the default Inductor cache"
    if args.fresh_inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="step_cost_inductor_")
        cache = "an empty Inductor cache (cold compilation)"
    if device.type == "cuda":
        timer = "CUDA events; first step of a block on an idle device, the rest enqueued back to back"
    else:
        timer = "process CPU time (time.process_time)" if args.clock == "cpu" else "wall clock (time.perf_counter)"
    report = [
        "# Optimizer step cost",
        "",
        *machine_description(device),
        f"- timing: {args.warmup} warm-up rounds, then {args.repeats} interleaved rounds (order rotated each round) "
        f"of one block of {args.block} consecutive steps per row; 'steady' = mean of steps 2..{args.block} of a "
        f"block, 'first step' = step 1 (after another row's block); medians over blocks; {timer}",
        f"- Layca rotation_rate {ROTATION_RATE:.4g}, uniform schedule; SGD lr {SGD_LR}, momentum 0.9; "
        f"AdamW lr {ADAMW_LR}, weight decay 0.01; compiled rows compile with {cache}",
        f"- command: `python -m benchmarks.step_cost {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
    ]
    print("\n".join(report), flush=True)
    medians: dict[str, dict[str, float]] = {}
    choices: dict[str, str] = {}
    for spec in args.sets:
        name, _ = parse_set(spec)
        shapes = shrink(SHAPE_SETS[name]()) if args.quick else None
        pset = make_param_set(spec, device, shapes=shapes)
        low_precision = pset.params[0].dtype != torch.float32
        # The per-tensor reference computes in the parameters' dtype: meaningless in bf16/fp16, so not timed there.
        rows, notes = build_rows(
            pset,
            device,
            with_reference=not args.no_reference and not low_precision,
            with_prototypes=not args.no_prototypes and not low_precision,
        )
        t0 = time.perf_counter()
        time_rows(rows, device, args.warmup, args.repeats, block=args.block, clock=args.clock)
        lines = table(pset, rows)
        medians[spec] = {row.name: median(row.steady_ms) for row in rows}
        choices[spec] = auto_choice(pset, device)
        setups = ", ".join(f"{row.name} {row.setup_s:.2f} s" for row in rows if row.compiled)
        lines += [
            "",
            f'- default (`implementation="auto"`) for this set: {choices[spec]}'
            + (
                f" (after {AUTO_COMPILE_AFTER_SECONDS:g} s of eager steps, if the compiled row is the faster)"
                if choices[spec] == "compiled"
                else ""
            ),
            f"- first step of the compiled rows (compilation, where this process had not compiled yet): {setups}",
            f"- {sgd_form(device, pset.params[0].dtype)}",
            *(f"- {n}" for n in notes),
            f"- {time.perf_counter() - t0:.1f} s for this set; load average now {_load()}",
            "",
        ]
        if args.profile:
            lines += [*profile_layca(pset, device), ""]
        print("\n".join(lines), flush=True)
        report += lines
        del rows, pset
        if device.type == "cuda":
            torch.cuda.empty_cache()
    targets = check_targets(device, medians, choices)
    tail = [
        "#### Targets",
        "",
        *(targets or ["- (no target set was run)"]),
        "",
        f"- load average at the end: {_load()}",
    ]
    print("\n".join(tail))
    report += tail
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report) + "\n")
    print(f"written to {out}")
    return report


if __name__ == "__main__":
    main()
