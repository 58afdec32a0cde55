"""The compiled Layca step: per layer, one reduction pass and one update pass, compiled with ``torch.compile``.

This module compiles the kernels (:mod:`lightning_layca.step.kernels`, :mod:`lightning_layca.step.families`) and
calls them; what a kernel computes is described here.

For a layer with weights ``w`` before the wrapped optimizer's step and ``p = fl(w + D)`` after it, one compiled call

1. reads ``(p, w)`` once and accumulates, per row, ``a = <D, w>``, ``b = <w, w>`` and ``c = <D, D>`` in float64, with
   ``D = p - w`` formed in registers: products of float32 (or bfloat16, float16) numbers are exact in float64, so
   ``||D_perp||^2 = c - a^2 / b`` keeps float32 precision even for a mostly radial step (weight decay), as the eager
   step's sums do. The layer's sums are the sums of its rows;
   with ``granularity="unit"`` the rows are the units and their sums are used as they are;
2. turns the sums into ``k1, k2`` with :func:`lightning_layca.step.rule.coefficients`, the rule every path shares
   (rounding floor, non-finite steps, rates without overflow);
3. reads ``(p, w)`` once more and writes ``p = k1 * w + k2 * D``, computed in float64 for float32 layers (in float32
   for bfloat16 and float16 ones) and rounded once to the layer's dtype. A layer (unit) that does not move
   (``k2 = 0``) ends exactly at ``w``: its step, NaN or not, is replaced by an exact zero.

With the snapshot taken before the base step, that is 7 tensor-sized memory passes.

For a process's shard of a sharded layer the kernel comes in two halves (:data:`SHARDED_SUMS`,
:data:`SHARDED_UPDATE`): step 1 alone, returning the shard's partial sums, then, once the seam has added the sums of
every process in the step's one collective, steps 2 and 3 from the full sums: the same passes. So do the kernels that
take the base step (below; :func:`sharded_base_sums_compiled`, :func:`sharded_base_update_compiled`): the first half
reads the weights, the gradient and the optimizer's state, writes the new state and returns the shard's sums, the
second forms the step again from the weights and the new state, as the first formed it, and writes the weights.

Around ``torch.optim.SGD``, ``Adam`` and ``AdamW`` the kernel takes the base step too (the kernels of
:mod:`lightning_layca.step.families`, called by :func:`rotate_base_compiled`; the family table says when): the first
pass reads
the weights, the gradient and the optimizer's state (SGD's momentum buffer, Adam's moments), writes the new state and
accumulates the sums with the step ``D`` formed exactly in float64, the second reads them again and writes ``w``. No
snapshot is taken and ``fl(w + D)`` is never formed: 7 memory streams in all for SGD with momentum, against 5 for
SGD's own fused step (8 in the code Inductor generates: it moves the buffer's write into the second pass, where it
recomputes the velocity from the old buffer and the gradient). Adam's kernel writes its float32 direction in the
first pass and reads it back (12 streams against 7, see :func:`lightning_layca.step.families._adam_step`): its square
root and divisions, which bound the step on a CPU, are computed once per element instead of in both passes.

Inductor generates C++/OpenMP kernels on CPU (small layers take a single-threaded kernel, see
:data:`PARALLEL_MIN_ELEMENTS`) and Triton kernels on CUDA.

Compilation. One function serves every layer: it is compiled with dynamic shapes (a layer is seen as a dense
``rows x columns`` matrix, see :func:`kernel_view`), so one compilation per (device, dtype, kernel) covers every layer
of every model in the process, and Inductor's on-disk cache serves later processes. Each compiled call costs tens of
microseconds of Dynamo's wrappers and guards whatever the layer's size, so consecutive layers that take the same
kernel are stepped :data:`LAYERS_PER_CALL` per call, by a function of that many layers (the same body for each,
with the same arithmetic), and the rest one per call: a run of ``n`` such layers takes ``n // LAYERS_PER_CALL`` calls
of ``LAYERS_PER_CALL`` layers and ``n % LAYERS_PER_CALL`` calls of one. Two compilations per (device, dtype, kernel)
at most, whatever the model's depth. Rates, relative learning rates and
initial norms enter as device tensors, so LR schedulers and time-varying schedules never recompile. Compilation
happens at the first step that needs it, on a stand-in layer, so that a failure (no C++ compiler, an unsupported
platform) costs one warning and the eager step takes over before any weight is touched.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch

from lightning_layca.step.families import BASE_KERNELS, COMPILED_FORMS, SHARDED_BASE_KERNELS, sharded_forms
from lightning_layca.step.kernels import after_step, distance_sums, sharded_sums, sharded_update

__all__ = [
    "BASE_KERNELS",
    "DISTANCES",
    "LAYERS_PER_CALL",
    "SHARDED_SUMS",
    "SHARDED_UPDATE",
    "SNAPSHOT",
    "LayerScalars",
    "compiled_step_ready",
    "kernel_view",
    "measurement_sums_compiled",
    "parallel_kernel",
    "rotate_base_compiled",
    "rotate_compiled",
    "scalars",
    "sharded_base_sums_compiled",
    "sharded_base_update_compiled",
    "sharded_sums_compiled",
    "sharded_update_compiled",
    "unit_view",
    "use_compiled_step",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Layer dtypes the compiled step handles (float64 layers take the eager step, which accumulates in float64)."""

AUTO_DEVICE_TYPES = ("cpu",)
"""Devices where ``implementation="auto"`` may choose the compiled step: where it was measured faster (see
``benchmarks/README.md``). CUDA is not among them until it has been measured there."""

PARALLEL_MIN_ELEMENTS = 2**18
"""On CPU, layers of at least this many elements take the kernel that runs on torch's intra-op threads, smaller ones a
single-threaded kernel: an OpenMP parallel region costs a wake-up and a few barriers per call, more than it saves on
a small layer, and far more on a CPU shared with other processes (a barrier then waits for a descheduled thread)."""

_WARMUP_SHAPE = (64, 576)
"""The stand-in layer compiled first: rows and columns differ (a square first shape would tie them together) and
exceed 1 (0 and 1 are specialised), and the sizes are those of a typical layer, which Inductor's heuristics see."""

LAYERS_PER_CALL = 4
"""Layers per compiled call for runs of consecutive layers that take the same kernel (see the module docstring).

Measured on the 2-core CPU container, 1 thread (``benchmarks/compiled_step_breakdown.py``, ``benchmarks/README.md``):
one call costs about 100 us of wrappers and guards; stepping 4 tiny layers per call costs 37-41 us per layer, 8 per
call 31-32 us, and compiling SGD's kernel for 8 layers took 30 s into an empty cache, for 4 layers 17 s, against
2.3 s for one layer. A step's layers are called bucket by bucket (CPU buckets hold up to 4 MiB of layers): on MLP-200
shapes (200 layers) the step went from 200 calls to 50 and from 48.5 to 39.3 ms (``Layca(SGD fused)``); on
ResNet-18 shapes, whose large layers each fill a bucket, from 21 calls to 15, with no measurable difference."""

_compiled_fns: dict[tuple[str, bool, bool, int], Callable[..., Any]] = {}
_ready: dict[tuple[str, torch.dtype, bool, bool, str, int], bool] = {}


def _distinct(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A copy of ``function`` with a code object of its own.

    Dynamo keeps the compilations of a function with its code object (and limits their number), so every kernel
    (single-threaded or not, per unit or not) compiles from a copy of its own.
    """
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


SNAPSHOT = "snapshot"
"""The kernel that works after the base optimizer's step, from a snapshot (:func:`after_step`)."""

SHARDED_SUMS, SHARDED_UPDATE = "sharded_sums", "sharded_update"
"""The two halves of :data:`SNAPSHOT` for a process's shard of a sharded layer, around the one collective of the step
(:func:`sharded_sums_compiled`, :func:`sharded_update_compiled`)."""

DISTANCES = "distances"
"""Not a step: the sums of a layer against its initial weights, from which a rotation monitor's cosine distance comes
(:func:`measurement_sums_compiled`); the sums of a step are :data:`SHARDED_SUMS`'s."""

MEASUREMENTS = (DISTANCES, SHARDED_SUMS)
"""The kernels a measurement calls (:func:`measurement_sums_compiled`)."""

# A compiled kernel returns the sums ``(a, b, c)``, or a tuple of them and outputs it must store (COMPILED_FORMS).
_BODIES: tuple[tuple[str, Callable[..., Any]], ...] = (
    (SNAPSHOT, after_step),
    (SHARDED_SUMS, sharded_sums),
    (SHARDED_UPDATE, sharded_update),
    (DISTANCES, distance_sums),
    *((v, COMPILED_FORMS.get(v, f)) for v, (f, _, _) in BASE_KERNELS.items()),
    *((v, f) for v, (_, f) in SHARDED_BASE_KERNELS.items()),
)

# A kernel per (variant, threads, granularity): a function of its own for each, so that the dtypes and devices a
# process uses stay well within Dynamo's limit of compilations per function.
_FUNCTIONS: dict[tuple[str, bool, bool], Callable[..., Any]] = {
    (variant, parallel, per_unit): _distinct(
        function, f"_{variant}_{'parallel' if parallel else 'serial'}_{'unit' if per_unit else 'layer'}_step"
    )
    for variant, function in _BODIES
    for parallel in (True, False)
    for per_unit in (True, False)
}


def _batched(body: Callable[..., Any], size: int) -> Callable[..., Any]:
    """``body`` for ``size`` layers in one function: their arguments in turn, their results as a tuple."""

    def layers(*args: torch.Tensor) -> tuple[Any, ...]:
        arity = len(args) // size
        return tuple(body(*args[i * arity : (i + 1) * arity]) for i in range(size))

    return layers


def _function(variant: str, parallel: bool, per_unit: bool, size: int) -> Callable[..., Any]:
    """The function compiled for ``size`` layers per call (a code object of its own per size)."""
    one = _FUNCTIONS[(variant, parallel, per_unit)]
    if size == 1:
        return one
    return _distinct(_batched(one, size), f"{one.__name__}_{size}_layers")


def _kernel(parallel: bool, per_unit: bool, variant: str, size: int) -> Callable[..., Any]:
    return _compiled(parallel, per_unit, variant) if size == 1 else _compiled_layers(parallel, per_unit, variant, size)


def _call_plan(kinds: Sequence[tuple[bool, str]]) -> list[tuple[int, int]]:
    """``(first layer, layers)`` of each compiled call for layers of these ``(parallel, variant)`` kernels, in order.

    A run of ``n`` consecutive layers of one kernel takes ``n // LAYERS_PER_CALL`` calls of :data:`LAYERS_PER_CALL`
    layers, then one call per layer left.
    """
    plan: list[tuple[int, int]] = []
    start = 0
    while start < len(kinds):
        end = start
        while end < len(kinds) and kinds[end] == kinds[start]:
            end += 1
        full = (end - start) // LAYERS_PER_CALL * LAYERS_PER_CALL if LAYERS_PER_CALL > 1 else 0
        plan += [(i, LAYERS_PER_CALL) for i in range(start, start + full, LAYERS_PER_CALL)]
        plan += [(i, 1) for i in range(start + full, end)]
        start = end
    return plan


_BASE_STEP_OPTIONS = {"realize_reads_threshold": 100}
"""Inductor options of the kernels that take the base step: Inductor stores an intermediate read more than 4 times
(its default) in a buffer of its own. There that is the float64 step ``D``, written and read back twice (16 bytes per
element and pass), where recomputing it from the float32 inputs is cheaper: measured on ResNet-18 shapes, 2 threads,
the AdamW kernel took 25.9 ms instead of 40.2 ms, the SGD one 17.4 instead of 22.4 (the kernel after the base step
showed no difference, and keeps the default)."""


def _compiled(parallel: bool, per_unit: bool = False, variant: str = SNAPSHOT) -> Callable[..., Any]:
    """The compiled kernel for one layer per call."""
    return _compiled_layers(parallel, per_unit, variant, 1)


def _compiled_layers(parallel: bool, per_unit: bool, variant: str, size: int) -> Callable[..., Any]:
    """The compiled kernel for ``size`` layers per call."""
    key = (variant, parallel, per_unit, size)
    if key not in _compiled_fns:
        # A concatenation of scalars is otherwise inlined into its consumer, here the elementwise update.
        options: dict[str, str | int | bool | Callable[..., Any]] = {"max_pointwise_cat_inputs": 0}
        if not parallel:
            options["cpp.threads"] = 1
        if variant in BASE_KERNELS or variant in SHARDED_BASE_KERNELS:
            options.update(_BASE_STEP_OPTIONS)
        function = _function(variant, parallel, per_unit, size)
        _compiled_fns[key] = torch.compile(function, dynamic=True, fullgraph=True, options=options)
    return _compiled_fns[key]


def parallel_kernel(layer: torch.Tensor) -> bool:
    """Whether ``layer`` takes the kernel that runs on torch's intra-op threads (see :data:`PARALLEL_MIN_ELEMENTS`)."""
    if layer.device.type != "cpu":
        return True
    return torch.get_num_threads() > 1 and layer.numel() >= PARALLEL_MIN_ELEMENTS


def use_compiled_step(implementation: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a (device, dtype) group of layers may take the compiled step.

    Args:
        implementation: ``"auto"``, ``"eager"`` or ``"compiled"`` (see :class:`~lightning_layca.Layca`).
        device: The layers' device.
        dtype: The layers' dtype.

    Returns:
        ``False`` for ``"eager"``; for ``"compiled"``, whether the dtype is supported (a warning says so when it is
        not); for ``"auto"``, whether besides the device is one where the compiled step was measured faster
        (:data:`AUTO_DEVICE_TYPES`; :class:`lightning_layca.plan.AutoChoice` then decides when). Whether compilation
        works is decided
        later, by :func:`compiled_step_ready`.
    """
    if implementation == "eager":
        return False
    if dtype not in SUPPORTED_DTYPES:
        if implementation == "compiled":
            warnings.warn(
                f"Layca: implementation='compiled' handles {', '.join(str(d) for d in SUPPORTED_DTYPES)} layers; the "
                f"{dtype} layers on {device} take the eager step.",
                stacklevel=4,
            )
        return False
    if implementation == "compiled":
        return True
    return device.type in AUTO_DEVICE_TYPES


def compiled_step_ready(
    device: torch.device,
    dtype: torch.dtype,
    parallel: Sequence[bool],
    per_unit: bool = False,
    variants: Sequence[str] = (),
) -> bool:
    """Compile the step for ``(device, dtype)`` if not done yet; ``False`` (after one warning) when that fails.

    The first call per (device type, dtype, kernel) in the process compiles, on a stand-in layer; later calls return
    the cached answer at once.

    Args:
        device: The layers' device.
        dtype: The layers' dtype.
        parallel: :func:`parallel_kernel` of each layer: the kernels needed.
        per_unit: Whether the layers step per unit (``granularity="unit"``).
        variants: For kernels that take the base optimizer's step (:func:`rotate_base_compiled`), each layer's form
            of it (a key of :data:`BASE_KERNELS`); empty for the step after the base optimizer's
            (:func:`rotate_compiled`).
    """
    forms = list(variants) if variants else [SNAPSHOT] * len(parallel)
    kinds = list(zip(parallel, forms, strict=True))
    kernels = sorted({(*kinds[first], size) for first, size in _call_plan(kinds)})
    return all(_ready_one(device, dtype, kind, per_unit, variant, size) for kind, variant, size in kernels)


def _stand_in(
    device: torch.device, dtype: torch.dtype, per_unit: bool, variant: str, layer: int, rule: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The arguments of a kernel for a stand-in layer, the ``layer``-th of a call.

    ``rule`` holds its rate, relative learning rate and flag: 0-dim tensors from one tensor each, as the steps pass
    them.
    """
    # Rows and columns differ from each other and from those of the other layers of the call: equal sizes seen at
    # compilation would be tied together by the compiled code's guards.
    shape = (_WARMUP_SHAPE[0] + 2 * layer, _WARMUP_SHAPE[1] + 2 * layer)
    # Deterministic stand-in values: the global random state is the user's.
    grid = torch.arange(shape[0] * shape[1], device=device).view(shape)
    weights = grid.sin().to(dtype)
    params = (grid.sin() + 0.01 * grid.cos()).to(dtype)
    rate, relative_lr, flag = rule
    norms = torch.ones(shape[0] if per_unit else (), dtype=torch.float64, device=device)
    if variant == SNAPSHOT:
        return [params, weights, rate, relative_lr, norms, flag]
    if variant in MEASUREMENTS:
        return [params, weights, norms]
    if variant == SHARDED_UPDATE:
        sums = torch.ones((3, shape[0] if per_unit else 1), dtype=torch.float64, device=device)
        return [params, weights, sums, rate, relative_lr, norms, flag]
    form, half = SHARDED_BASE_KERNELS.get(variant, (variant, None))
    _, states, values = BASE_KERNELS[form]
    hyper = torch.tensor(values, dtype=torch.float64, device=device)
    state = [(grid.cos() + k).abs().to(dtype) for k in range(states)]
    if half is None:
        return [params, weights, *state, hyper, rate, relative_lr, norms, flag]
    if variant == sharded_forms(form)[0]:
        return [params, weights, *state, hyper, norms]
    sums = torch.ones((3, shape[0] if per_unit else 1), dtype=torch.float64, device=device)
    return [params, weights, *state, hyper, sums, rate, relative_lr, norms, flag]


def _ready_one(
    device: torch.device, dtype: torch.dtype, parallel: bool, per_unit: bool, variant: str, size: int
) -> bool:
    if any(not ok for (device_type, kind, *_), ok in _ready.items() if (device_type, kind) == (device.type, dtype)):
        return False  # one warning per (device, dtype), and never a half-compiled group
    key = (device.type, dtype, parallel, per_unit, variant, size)
    if key not in _ready:
        try:
            # What torch says while it compiles (deprecations of its own internals) is not the user's to act on, and
            # under `-W error` it would abort the compilation. Floats of the rule (the floor factors) are constants
            # of the compiled code, not inputs converted to tensors at every call.
            with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(specialize_float=True):
                warnings.simplefilter("ignore")
                rates = scalars(torch.ones(size, dtype=torch.float64, device=device))
                relative_lrs = scalars(torch.ones(size, dtype=torch.float64, device=device))
                flags = scalars(torch.zeros(size, dtype=torch.bool, device=device))
                arguments = [
                    x
                    for i in range(size)
                    for x in _stand_in(device, dtype, per_unit, variant, i, [rates[i], relative_lrs[i], flags[i]])
                ]
                _kernel(parallel, per_unit, variant, size)(*arguments)
            _ready[key] = True
        except Exception as error:  # any failure to compile means: use the eager step
            _give_up(device, dtype, parallel, per_unit, variant, size, error)
    return _ready[key]


def _give_up(
    device: torch.device,
    dtype: torch.dtype,
    parallel: bool,
    per_unit: bool,
    variant: str,
    size: int,
    error: Exception,
) -> None:
    _ready[(device.type, dtype, parallel, per_unit, variant, size)] = False
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if variant == DISTANCES:
        warnings.warn(
            f"Layca: the compiled measurement is not available for {dtype} layers on {device.type} "
            f"({type(error).__name__}: {reason[:300]}); the rotation monitor measures with the eager sums. Pass "
            "implementation='eager' to skip the attempt.",
            stacklevel=5,
        )
        return
    warnings.warn(
        f"Layca: the compiled step is not available for {dtype} layers on {device.type} "
        f"({type(error).__name__}: {reason[:300]}); using the eager step. Pass implementation='eager' to skip the "
        "attempt.",
        stacklevel=5,
    )


class LayerScalars(NamedTuple):
    """A layer's numbers of the rule, as the kernels take them: 0-dim tensors on the layer's device."""

    rate: torch.Tensor
    """``rho`` (float64)."""
    relative_lr: torch.Tensor
    """``lr_g(t) / lr_ref`` (float64)."""
    initial_norms: torch.Tensor
    """``n0`` (float64): 0-dim, or with ``per_unit`` the layer's 1-D tensor of norms per unit."""
    near_floor: torch.Tensor
    """The layer's near-floor flag (bool), or-ed in place by its kernel."""


def scalars(values: torch.Tensor) -> list[torch.Tensor]:
    """Return the entries of a 1-D tensor as 0-dim tensors sharing its memory, not marked as views of it.

    The compiled function's guards then do not depend on the length of the tensor the scalars come from.
    """
    return [x.detach() for x in values.unbind()]


def kernel_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """Return a 2-D view of ``tensor``'s memory with at least 2 rows and 2 columns where its size allows.

    A layer's sums do not depend on the order of its elements, so the view follows memory order (a channels-last
    convolution kernel is viewed through its permuted shape) and splits the leading dimensions from the others where
    both sides have at least 2 elements (``(1, 197, 768)`` becomes ``197 x 768``): sizes 0 and 1 would each need a
    compilation of their own.

    The view is detached (it shares the layer's memory and version counter but is not marked as a view of it), so
    that the compiled function's guards do not depend on the layer's own shape.

    Returns:
        The view, or ``None`` when the elements do not form one dense block (a strided slice, an expanded tensor) or
        admit no such split (a prime number of elements in one dimension, as in a ``(7, 1)`` layer): rows or columns
        of size 1 would need a compilation of their own, for layers too small to matter (the eager step takes them).

    Example:
        >>> kernel_view(torch.zeros(8, 3, 3, 3)).shape
        torch.Size([8, 27])
        >>> kernel_view(torch.zeros(1, 197, 768)).shape
        torch.Size([197, 768])
        >>> kernel_view(torch.zeros(8, 3, 5, 5).to(memory_format=torch.channels_last)).shape
        torch.Size([8, 75])
    """
    if tensor.dim() == 0:
        return None
    if not tensor.is_contiguous():
        order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride()[d], d))
        tensor = tensor.permute(order)
        if not tensor.is_contiguous():
            return None
    n = tensor.numel()
    rows = 1
    for size in tensor.shape[:-1]:
        rows *= size
        if rows >= 2 and n // rows >= 2:
            return tensor.view(rows, n // rows).detach()
    # One dimension holds everything (a (n, 1) or (1, n) layer): any split with both sides of at least 2 will do.
    for columns in range(min(16, n // 2), 1, -1):
        if n % columns == 0:
            return tensor.view(n // columns, columns).detach()
    return None


def unit_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """Return a 2-D view of ``tensor``'s memory whose rows are its units (slices along dim 0), or ``None``.

    As :func:`kernel_view`, but the rows must be the units: ``None`` unless dim 0 is the outermost dimension of a
    dense layout and there are at least 2 units of at least 2 elements each.

    Example:
        >>> unit_view(torch.zeros(8, 3, 5, 5).to(memory_format=torch.channels_last)).shape
        torch.Size([8, 75])
        >>> unit_view(torch.zeros(1, 197, 768)) is None
        True
    """
    if tensor.dim() < 2:
        return None
    if not tensor.is_contiguous():
        order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride()[d], d))
        if order[0] != 0:
            return None
        tensor = tensor.permute(order)
        if not tensor.is_contiguous():
            return None
    units = tensor.shape[0]
    if units < 2 or tensor.numel() // units < 2:
        return None
    return tensor.view(units, -1).detach()


def rotate_compiled(
    params: Sequence[torch.Tensor],
    previous: Sequence[torch.Tensor],
    layer_scalars: Sequence[LayerScalars],
    parallel: Sequence[bool],
    per_unit: bool = False,
    sums: list[torch.Tensor] | None = None,
) -> int:
    """Turn the base step of layers of one device and dtype into a Layca step, in place, one compiled call per layer.

    Needs :func:`compiled_step_ready` to have returned ``True`` for the layers' device, dtype and kernels. Should a
    later compilation fail (a recompilation after ``torch._dynamo.reset()`` or a change of the number of threads),
    the layers from the failing one on are left to the caller, after one warning.

    Args:
        params: :func:`kernel_view` of each layer (detached), holding ``w + D``.
        previous: The same views of the weights before the base step.
        layer_scalars: The :class:`LayerScalars` of each layer.
        parallel: :func:`parallel_kernel` of each layer.
        per_unit: Whether every unit (row of :func:`unit_view`) turns by itself (``granularity="unit"``).
        sums: Where given, each stepped layer's ``(a, b, c)`` (as the kernel returns them) is appended to it.

    Returns:
        The number of layers stepped (all of them unless a compilation failed).
    """
    calls = ((p, w, *scalars_) for p, w, scalars_ in zip(params, previous, layer_scalars, strict=True))
    return _call_kernels(zip(parallel, [SNAPSHOT] * len(parallel), calls, strict=True), per_unit, sums)


def rotate_base_compiled(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    hypers: Sequence[torch.Tensor],
    layer_scalars: Sequence[LayerScalars],
    parallel: Sequence[bool],
    variants: Sequence[str],
    per_unit: bool = False,
) -> int:
    """Take the base optimizer's step and the Layca step of layers of one device and dtype together, one call each.

    Needs :func:`compiled_step_ready` (with ``variants``) to have returned ``True`` for the layers' device, dtype and
    kernels. Should a later compilation fail, the layers from the failing one on are left to the caller (untouched:
    neither their weights nor their optimizer state were written), after one warning.

    Args:
        params: :func:`kernel_view` (or :func:`unit_view`) of each layer (detached), holding ``w``.
        grads: The same views of their gradients.
        states: Per layer, the same views of the optimizer state the kernel updates in place (see
            :data:`BASE_KERNELS`).
        hypers: Per layer, the kernel's hyperparameters (see :mod:`lightning_layca.step.families`).
        layer_scalars: The :class:`LayerScalars` of each layer.
        parallel: :func:`parallel_kernel` of each layer.
        variants: Per layer, the form of the base step (a key of :data:`BASE_KERNELS`).
        per_unit: Whether every unit turns by itself (``granularity="unit"``).

    Returns:
        The number of layers stepped.
    """
    calls = (
        (p, g, *state, hyper, *scalars_)
        for p, g, state, hyper, scalars_ in zip(params, grads, states, hypers, layer_scalars, strict=True)
    )
    return _call_kernels(zip(parallel, variants, calls, strict=True), per_unit)


def sharded_sums_compiled(
    params: Sequence[torch.Tensor],
    previous: Sequence[torch.Tensor],
    initial_norms: Sequence[torch.Tensor],
    parallel: Sequence[bool],
    per_unit: bool = False,
) -> list[torch.Tensor]:
    """The partial sums ``(a, b, c)`` of a process's shards of sharded layers, one compiled call per layer.

    Needs :func:`compiled_step_ready` (with ``variants`` :data:`SHARDED_SUMS` and :data:`SHARDED_UPDATE`) to have
    returned ``True``. The full sums are the seam's (:func:`lightning_layca.distributed.reduce_sums`); then
    :func:`sharded_update_compiled`. Should a later compilation fail, the sums of the layers from the failing one on
    are left to the caller (fewer results than layers), after one warning.

    Args:
        params: :func:`kernel_view` (or :func:`unit_view`) of each local shard (detached), holding ``w + D``.
        previous: The same views of the weights before the base step.
        initial_norms: Per layer, its initial norm (0-dim), or per unit its local units' norms (tells the kernel the
            granularity).
        parallel: :func:`parallel_kernel` of each local shard.
        per_unit: Whether every unit turns by itself.

    Returns:
        Per layer, ``(3, 1)`` or per unit ``(3, rows)`` float64 sums.
    """
    sums: list[torch.Tensor] = []
    arguments = zip(params, previous, initial_norms, strict=True)
    _call_kernels(zip(parallel, [SHARDED_SUMS] * len(parallel), arguments, strict=True), per_unit, sums)
    return sums


def sharded_update_compiled(
    params: Sequence[torch.Tensor],
    previous: Sequence[torch.Tensor],
    sums: Sequence[torch.Tensor],
    layer_scalars: Sequence[LayerScalars],
    parallel: Sequence[bool],
    per_unit: bool = False,
) -> int:
    """The Layca step of a process's shards from their layers' full sums (``(3, 1)`` or ``(3, rows)`` each).

    Returns:
        The number of layers stepped (all of them unless a compilation failed).
    """
    calls = (
        (p, w, full, *scalars_) for p, w, full, scalars_ in zip(params, previous, sums, layer_scalars, strict=True)
    )
    return _call_kernels(zip(parallel, [SHARDED_UPDATE] * len(parallel), calls, strict=True), per_unit)


def sharded_base_sums_compiled(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    hypers: Sequence[torch.Tensor],
    initial_norms: Sequence[torch.Tensor],
    parallel: Sequence[bool],
    variants: Sequence[str],
    per_unit: bool = False,
) -> list[torch.Tensor]:
    """The first half of :func:`rotate_base_compiled` for a process's shards of sharded layers: the base step's state.

    Each call reads the shard's weights, gradient and optimizer state, writes the new state and returns the shard's
    partial sums ``(a, b, c)`` of ``(D, w)`` (``D`` formed exactly in float64, never written); the weights are not
    written. Then the seam adds the sums of every process (:func:`lightning_layca.distributed.reduce_sums`), and
    :func:`sharded_base_update_compiled` takes the Layca step. Needs :func:`compiled_step_ready` with both halves of
    every layer's form (:func:`~lightning_layca.step.families.sharded_forms`). Should a later compilation fail, the
    layers from the failing one on are left to the caller untouched (fewer results than layers), after one warning.

    Args:
        params: :func:`kernel_view` (or :func:`unit_view`) of each local shard (detached), holding ``w``.
        grads: The same views of their gradients.
        states: Per layer, the same views of the optimizer state the kernel updates in place.
        hypers: Per layer, the kernel's hyperparameters.
        initial_norms: As for :func:`sharded_sums_compiled` (tells the kernel the granularity).
        parallel: :func:`parallel_kernel` of each local shard.
        variants: Per layer, the form of the base step (a key of :data:`BASE_KERNELS`).
        per_unit: Whether every unit turns by itself.

    Returns:
        Per layer, ``(3, 1)`` or per unit ``(3, rows)`` float64 sums.
    """
    sums: list[torch.Tensor] = []
    calls = (
        (p, g, *state, hyper, n0)
        for p, g, state, hyper, n0 in zip(params, grads, states, hypers, initial_norms, strict=True)
    )
    forms = [sharded_forms(v)[0] for v in variants]
    _call_kernels(zip(parallel, forms, calls, strict=True), per_unit, sums)
    return sums


def sharded_base_update_compiled(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    hypers: Sequence[torch.Tensor],
    sums: Sequence[torch.Tensor],
    layer_scalars: Sequence[LayerScalars],
    parallel: Sequence[bool],
    variants: Sequence[str],
    per_unit: bool = False,
) -> None:
    """The second half: each shard's Layca step from its layer's full ``sums`` (``(3, 1)`` or ``(3, rows)``).

    ``D`` is formed again from the weights and the state the first half wrote, as that half formed it. The state is
    already this step's, so every layer must be stepped: should a compilation fail (after one warning), the layers
    from the failing one on take the same function uncompiled (the same arithmetic, in eager torch operations).
    """
    calls = [
        (p, g, *state, hyper, full, *scalars_)
        for p, g, state, hyper, full, scalars_ in zip(params, grads, states, hypers, sums, layer_scalars, strict=True)
    ]
    forms = [sharded_forms(v)[1] for v in variants]
    done = _call_kernels(zip(parallel, forms, calls, strict=True), per_unit)
    for form, arguments in zip(forms[done:], calls[done:], strict=True):
        SHARDED_BASE_KERNELS[form][1](*arguments)


def measurement_sums_compiled(
    weights: Sequence[torch.Tensor], others: Sequence[torch.Tensor], parallel: Sequence[bool], difference: bool
) -> list[torch.Tensor]:
    """The sums of a measurement of layers of one device and dtype, one compiled pass per layer (several per call).

    Without ``difference`` the sums of each layer against its initial weights (:data:`DISTANCES`); with it, of the step
    that led from ``others`` to ``weights`` (:data:`SHARDED_SUMS`): what :func:`lightning_layca.sums.float64_sums`
    returns for the same arguments, per layer. Needs :func:`compiled_step_ready` (with ``variants`` the kernel's name)
    to have returned ``True``.

    Args:
        weights: :func:`kernel_view` of each layer (detached).
        others: The same views of the initial weights, or of the weights before the step.
        parallel: :func:`parallel_kernel` of each layer.
        difference: Whether the sums are a step's.

    Returns:
        ``(a, b, c)`` of each layer measured, shape ``(3, 1)``; fewer than the layers (the first ones) if a later
        compilation failed, after one warning.
    """
    if not weights:
        return []
    variant = SHARDED_SUMS if difference else DISTANCES
    per_layer = torch.zeros((), dtype=torch.float64, device=weights[0].device)
    calls = ((x, y, per_layer) for x, y in zip(weights, others, strict=True))
    sums: list[torch.Tensor] = []
    _call_kernels(zip(parallel, [variant] * len(weights), calls, strict=True), False, sums)
    return sums


def _call_kernels(
    calls: Iterable[tuple[bool, str, Sequence[torch.Tensor]]], per_unit: bool, sums: list[torch.Tensor] | None = None
) -> int:
    """Call the compiled kernel of each ``(parallel, variant, arguments)`` in turn, the layer's view first.

    Consecutive layers of one kernel are stepped :data:`LAYERS_PER_CALL` per call (:func:`_call_plan`). A kernel
    whose compilation fails (a recompilation after ``torch._dynamo.reset()`` or a change of the number of threads)
    raises before it runs: the layers of that call are untouched, one warning is given and the layers from the first
    of them on are left to the caller.

    Returns:
        The number of layers stepped.
    """
    layers = list(calls)
    done = 0
    for first, size in _call_plan([(parallel, variant) for parallel, variant, _ in layers]):
        parallel, variant, args = layers[first]
        arguments = [x for _, _, layer_args in layers[first : first + size] for x in layer_args]
        try:
            result = _kernel(parallel, per_unit, variant, size)(*arguments)
        except Exception as error:  # a failed compilation before the kernel ran: the layers are untouched
            _give_up(args[0].device, args[0].dtype, parallel, per_unit, variant, size, error)
            break
        if sums is not None:
            sums.extend([result] if size == 1 else result)
        done += size
    return done
