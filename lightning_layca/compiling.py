"""Compiled kernels: one ``torch.compile`` per kernel body, checked on a stand-in layer, several layers per call.

The rooms that compile (the Layca step, :mod:`lightning_layca.step.compiled`; a rotation monitor's sums,
:mod:`lightning_layca.measurement`) register each kernel body under a name with :func:`register_kernel`: the function
that one call applies to one layer seen as a dense matrix (:func:`kernel_view`, four runs of its memory as rows, or
:func:`unit_view` whose rows are the layer's units), how to build a stand-in layer's arguments, and what a failure means
for the caller. This module compiles and calls them, the same way for every room:

* **One compilation per (device, dtype, kernel) for every layer.** A body is compiled with dynamic shapes, so one
  compilation covers every layer of every model in the process, and Inductor's on-disk cache serves later processes.
  Rates and other per-layer numbers enter as device tensors (:func:`scalars`), so nothing that changes from step to
  step recompiles.
* **Several layers per call.** Each compiled call costs tens of microseconds of Dynamo's wrappers and guards whatever
  the layer's size, so consecutive layers that take the same kernel are called :data:`LAYERS_PER_CALL` per call, by a
  function of that many layers (the same body for each): two compilations per (device, dtype, kernel) at most.
* **Threads.** On CPU a small layer takes a single-threaded kernel (:data:`PARALLEL_MIN_ELEMENTS`), a large one the
  kernel that runs on torch's intra-op threads (:func:`parallel_kernel`).
* **Failures cost one warning.** A kernel is first compiled on a stand-in layer (:func:`kernels_ready`), so that a
  failure (no C++ compiler, an unsupported platform) is found before any weight is touched; should a later
  compilation fail (after ``torch._dynamo.reset()``, or a change of the number of threads), :func:`call_kernels`
  stops before the failing call and leaves the remaining layers to the caller. Either way the registered message
  says, once, what the caller does instead. A kernel the caller can do without (``optional``: the faster of two forms
  of a step) fails alone and silently.

Inductor generates C++/OpenMP kernels on CPU and Triton kernels on CUDA.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_layca.sums import LANES

__all__ = [
    "AUTO_DEVICE_TYPES",
    "CPU_VECTOR_BITS",
    "LAYERS_PER_CALL",
    "PARALLEL_MIN_ELEMENTS",
    "SUPPORTED_DTYPES",
    "KernelSpec",
    "call_kernels",
    "cpu_vector_options",
    "equal_runs",
    "kernel_view",
    "kernels_ready",
    "parallel_kernel",
    "register_kernel",
    "scalars",
    "stand_in_layer",
    "unit_view",
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
"""The stand-in layer compiled first by a per-unit kernel (the others take a lane view of as many elements): rows and
columns differ (a square first shape would tie them together) and exceed 1 (0 and 1 are specialised), and the sizes
are those of a typical layer, which Inductor's heuristics see."""

LAYERS_PER_CALL = 4
"""Layers per compiled call for runs of consecutive layers that take the same kernel (see the module docstring).

Measured on the 2-core CPU container, 1 thread (``benchmarks/compiled_step_breakdown.py``, ``benchmarks/README.md``):
one call costs about 100 us of wrappers and guards; stepping 4 tiny layers per call costs 37-41 us per layer, 8 per
call 31-32 us, and compiling SGD's kernel for 8 layers took 30 s into an empty cache, for 4 layers 17 s, against
2.3 s for one layer. On MLP-200 shapes (200 layers) the step went from 200 calls to 50 and from 48.5 to 39.3 ms
(``Layca(SGD fused)``). The layers of a step's compiled paths form one bucket per (device, dtype), so ResNet-18's 21
layers take 6 calls (15 while its larger layers each filled a bucket of their own)."""

CPU_VECTOR_BITS = 256
"""Vector width (bits) of the C++ kernels on a CPU whose widest vectors are AVX-512's; other CPUs keep Inductor's
choice (:func:`cpu_vector_options`).

Every kernel converts float32 (or lower-precision) operands to float64 for its sums, and Inductor's C++ code
converts a vector of 16 floats to float64 element by element (through memory: torch's vector library has no
float-to-double conversion for AVX-512), where with 8-float vectors the compiler emits the conversion
instruction. Measured on the 2-core AVX-512 CPU (Xeon, 1 thread, one 512 x 4608 layer, process CPU time): the three
float64 sums of two float32 tensors 3.05 ms with 512-bit vectors, 0.82 ms with 256-bit ones; the kernel that takes
the momentum SGD step and the Layca step 4.29 against 2.42 ms (``torch.optim.SGD(fused=True)``: 1.05 ms). See
``benchmarks/README.md``."""

_compiled_fns: dict[tuple[str, bool, bool, int], Callable[..., Any]] = {}
_ready: dict[tuple[str, torch.dtype, bool, bool, str, int], bool] = {}
_optional_failed: dict[tuple[str, torch.dtype, bool, bool, str, int], Exception] = {}
"""Kernels asked for with ``optional=True`` (:func:`kernels_ready`) that failed to compile, with their error:
unavailable alone, until a request that is not optional gives up on them as on any failure."""


def _distinct(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A copy of ``function`` with a code object of its own.

    Dynamo keeps the compilations of a function with its code object (and limits their number), so every kernel
    (single-threaded or not, per unit or not) compiles from a copy of its own.
    """
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


StandIn = Callable[[torch.device, torch.dtype, bool, tuple[int, int], list[torch.Tensor]], list[torch.Tensor]]
"""``stand_in(device, dtype, per_unit, shape, rule)``: the arguments of a kernel for a stand-in layer of ``shape``
(:func:`stand_in_layer`), given ``rule``, a rate, a relative learning rate and a flag as 0-dim tensors (for the
kernels of the step; others ignore them)."""


@dataclass(frozen=True)
class KernelSpec:
    """A kernel body and what this module needs to know to compile and call it (see :func:`register_kernel`)."""

    body: Callable[..., Any]
    """What one call does to one layer: its arguments, the layer's view first; returns its sums."""
    stand_in: StandIn
    """Builds a stand-in layer's arguments, for the first compilation."""
    what: str = "the compiled step"
    """What is not available when compiling fails, as the warning says it."""
    instead: str = "using the eager step"
    """What the caller does instead, as the warning says it."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Inductor options besides the common ones."""
    layer_options: Mapping[str, Any] = field(default_factory=dict)
    """Inductor options of the kernel on a layer's view (:func:`kernel_view`) only, not on its units'
    (:func:`unit_view`)."""


_KERNELS: dict[str, KernelSpec] = {}


def register_kernel(name: str, spec: KernelSpec) -> None:
    """Make the kernel ``name`` callable through :func:`kernels_ready` and :func:`call_kernels`.

    Raises:
        ValueError: If ``name`` is already registered (every room's kernels share one table).
    """
    if name in _KERNELS:
        raise ValueError(f"A kernel named {name!r} is already registered; give the new kernel a name of its own.")
    _KERNELS[name] = spec


def stand_in_layer(device: torch.device, dtype: torch.dtype, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """A stand-in layer's ``(weights after a step, weights before it, grid)``: deterministic, of ``shape``.

    ``grid`` (``arange`` of the elements, as ``shape``) gives a body's other stand-in tensors. Deterministic values:
    the global random state is the user's.
    """
    grid = torch.arange(shape[0] * shape[1], device=device).view(shape)
    weights = grid.sin().to(dtype)
    params = (grid.sin() + 0.01 * grid.cos()).to(dtype)
    return params, weights, grid


def _batched(body: Callable[..., Any], size: int) -> Callable[..., Any]:
    """``body`` for ``size`` layers in one function: their arguments in turn, their results as a tuple."""

    def layers(*args: torch.Tensor) -> tuple[Any, ...]:
        arity = len(args) // size
        return tuple(body(*args[i * arity : (i + 1) * arity]) for i in range(size))

    return layers


def _function(variant: str, parallel: bool, per_unit: bool, size: int) -> Callable[..., Any]:
    """The function compiled for ``size`` layers per call (a code object of its own per kernel and size).

    Dynamo keeps the compilations of a function with its code object (and limits their number), so every kernel
    (single-threaded or not, per unit or not) compiles from a copy of its own, and the dtypes and devices a process
    uses stay well within that limit.
    """
    name = f"_{variant}_{'parallel' if parallel else 'serial'}_{'unit' if per_unit else 'layer'}_step"
    one = _distinct(_KERNELS[variant].body, name)
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
    for start, end in equal_runs(kinds):
        full = (end - start) // LAYERS_PER_CALL * LAYERS_PER_CALL if LAYERS_PER_CALL > 1 else 0
        plan += [(i, LAYERS_PER_CALL) for i in range(start, start + full, LAYERS_PER_CALL)]
        plan += [(i, 1) for i in range(start + full, end)]
    return plan


def equal_runs(keys: Sequence[object]) -> list[tuple[int, int]]:
    """``(first, end)`` of each run of consecutive equal ``keys``, in order.

    Example:
        >>> equal_runs([True, True, False, True])
        [(0, 2), (2, 3), (3, 4)]
    """
    runs: list[tuple[int, int]] = []
    for i, key in enumerate(keys):
        if runs and keys[runs[-1][0]] == key:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _compiled(parallel: bool, per_unit: bool, variant: str) -> Callable[..., Any]:
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
        options.update(cpu_vector_options())
        options.update(_KERNELS[variant].options)
        if not per_unit:
            options.update(_KERNELS[variant].layer_options)
        function = _function(variant, parallel, per_unit, size)
        _compiled_fns[key] = torch.compile(function, dynamic=True, fullgraph=True, options=options)
    return _compiled_fns[key]


def cpu_vector_options() -> dict[str, int]:
    """Inductor's ``cpp.simdlen`` for the kernels: :data:`CPU_VECTOR_BITS` on an AVX-512 CPU, else nothing.

    The CPU is the one torch's own kernels dispatch to (:func:`torch.backends.cpu.get_cpu_capability`); every CPU with
    AVX-512 has AVX2, whose 256-bit vectors Inductor then uses. The option only concerns C++ (CPU) code.
    """
    return {"cpp.simdlen": CPU_VECTOR_BITS} if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else {}


def parallel_kernel(layer: torch.Tensor) -> bool:
    """Whether ``layer`` takes the kernel that runs on torch's intra-op threads (see :data:`PARALLEL_MIN_ELEMENTS`)."""
    if layer.device.type != "cpu":
        return True
    return torch.get_num_threads() > 1 and layer.numel() >= PARALLEL_MIN_ELEMENTS


def kernels_ready(
    device: torch.device,
    dtype: torch.dtype,
    kinds: Sequence[tuple[bool, str]],
    per_unit: bool = False,
    optional: bool = False,
) -> bool:
    """Compile the kernels that layers of ``(device, dtype)`` need, if not done yet; ``False`` when that fails.

    The first call per (device type, dtype, kernel, layers per call) in the process compiles, on stand-in layers;
    later calls return the cached answer at once. A failure for one kernel of a (device type, dtype) makes every
    kernel of it unavailable: one warning (the kernel's :attr:`KernelSpec.what`), and never a half-compiled group of
    layers; except with ``optional``, for a kernel the caller can do without (the faster of two forms): its failure
    makes only that kernel unavailable, without a warning, until a later request for it without ``optional``, which
    then fails as any other (one warning, every kernel of the dtype unavailable).

    Args:
        device: The layers' device.
        dtype: The layers' dtype.
        kinds: Per layer, in the order they will be called, ``(parallel_kernel(layer), kernel name)``.
        per_unit: Whether the layers' views are :func:`unit_view`'s (rows are units).
        optional: Whether a failure concerns these kernels only (see above).
    """
    kernels = sorted({(*kinds[first], size) for first, size in _call_plan(kinds)})
    return all(_ready_one(device, dtype, kind, per_unit, variant, size, optional) for kind, variant, size in kernels)


def _stand_in_shape(layer: int, per_unit: bool) -> tuple[int, int]:
    """The shape of the ``layer``-th stand-in layer of a call: a :func:`unit_view`'s, or a lane view's.

    Rows and columns differ from each other and from those of the other layers of the call: equal sizes seen at
    compilation would be tied together by the compiled code's guards (a lane view's rows are a constant of the code).
    """
    rows, columns = _WARMUP_SHAPE[0] + 2 * layer, _WARMUP_SHAPE[1] + 2 * layer
    return (rows, columns) if per_unit else (LANES, rows * columns // LANES)


def _ready_one(
    device: torch.device,
    dtype: torch.dtype,
    parallel: bool,
    per_unit: bool,
    variant: str,
    size: int,
    optional: bool = False,
) -> bool:
    if any(not ok for (device_type, kind, *_), ok in _ready.items() if (device_type, kind) == (device.type, dtype)):
        return False  # one warning per (device, dtype), and never a half-compiled group
    key = (device.type, dtype, parallel, per_unit, variant, size)
    if key in _optional_failed:
        if not optional:
            _give_up(key, _optional_failed.pop(key))
        return False
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
                stand_in = _KERNELS[variant].stand_in
                arguments = [
                    x
                    for i in range(size)
                    for x in stand_in(
                        device, dtype, per_unit, _stand_in_shape(i, per_unit), [rates[i], relative_lrs[i], flags[i]]
                    )
                ]
                _kernel(parallel, per_unit, variant, size)(*arguments)
            _ready[key] = True
        except Exception as error:  # any failure to compile means: the caller's eager way
            if optional:
                _optional_failed[key] = error
                return False
            _give_up(key, error)
    return _ready[key]


def _give_up(key: tuple[str, torch.dtype, bool, bool, str, int], error: Exception) -> None:
    _ready[key] = False
    device_type, dtype, _, _, variant, _ = key
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    spec = _KERNELS[variant]
    warnings.warn(
        f"Layca: {spec.what} is not available for {dtype} layers on {device_type} "
        f"({type(error).__name__}: {reason[:300]}); {spec.instead}. Pass implementation='eager' to skip the "
        "attempt.",
        stacklevel=5,
    )


def scalars(values: torch.Tensor) -> list[torch.Tensor]:
    """Return the entries of a 1-D tensor as 0-dim tensors sharing its memory, not marked as views of it.

    The compiled function's guards then do not depend on the length of the tensor the scalars come from.
    """
    return [x.detach() for x in values.unbind()]


def kernel_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """Return the lane view of ``tensor``'s memory: :data:`~lightning_layca.sums.LANES` equal runs of it, as rows.

    A layer's sums do not depend on the order of its elements, so the view follows memory order (a channels-last
    convolution kernel is viewed through its permuted shape), and its rows are four runs of the memory that a kernel's
    sums read side by side (:func:`~lightning_layca.sums.matrix_sums`). Every layer of a kernel then has the same
    number of rows, so one compilation serves them all, whatever their shapes.

    The view is detached (it shares the layer's memory and version counter but is not marked as a view of it), so
    that the compiled function's guards do not depend on the layer's own shape.

    Returns:
        The view, or ``None`` when the elements do not form one dense block (a strided slice, an expanded tensor) or
        their number is not a multiple of 4 of at least 8 (as in a ``3 x 5`` layer): such a layer takes the eager
        step (and a monitor's eager sums), which would otherwise need compilations of their own for layers that are
        rare, and small where they occur (a dense layer of at least 8 elements with a dimension divisible by 4 always
        has a lane view).

    Example:
        >>> kernel_view(torch.zeros(8, 3, 3, 3)).shape
        torch.Size([4, 54])
        >>> kernel_view(torch.zeros(8, 3, 5, 5).to(memory_format=torch.channels_last)).stride()
        (150, 1)
        >>> kernel_view(torch.zeros(3, 5)) is None
        True
    """
    if tensor.dim() == 0:
        return None
    if not tensor.is_contiguous():
        order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride()[d], d))
        tensor = tensor.permute(order)
        if not tensor.is_contiguous():
            return None
    n = tensor.numel()
    if n % LANES or n < 2 * LANES:
        return None
    return tensor.view(LANES, n // LANES).detach()


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


def call_kernels(
    calls: Iterable[tuple[bool, str, Sequence[torch.Tensor]]], per_unit: bool, sums: list[torch.Tensor] | None = None
) -> int:
    """Call the compiled kernel of each ``(parallel, kernel name, arguments)`` in turn, the layer's view first.

    Needs :func:`kernels_ready` to have returned ``True`` for these layers. Consecutive layers of one kernel are called
    :data:`LAYERS_PER_CALL` per call (:func:`_call_plan`). A kernel whose compilation fails (a recompilation after
    ``torch._dynamo.reset()`` or a change of the number of threads) raises before it runs: the layers of that call are
    untouched, one warning is given and the layers from the first of them on are left to the caller.

    Args:
        calls: Per layer, ``(parallel_kernel(layer), kernel name, arguments)``.
        per_unit: Whether the views are :func:`unit_view`'s.
        sums: Where given, each layer's result (its sums) is appended to it.

    Returns:
        The number of layers called.
    """
    layers = list(calls)
    done = 0
    for first, size in _call_plan([(parallel, variant) for parallel, variant, _ in layers]):
        parallel, variant, args = layers[first]
        arguments = [x for _, _, layer_args in layers[first : first + size] for x in layer_args]
        try:
            result = _kernel(parallel, per_unit, variant, size)(*arguments)
        except Exception as error:  # a failed compilation before the kernel ran: the layers are untouched
            _give_up((args[0].device.type, args[0].dtype, parallel, per_unit, variant, size), error)
            break
        if sums is not None:
            sums.extend([result] if size == 1 else result)
        done += size
    return done
