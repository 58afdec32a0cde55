"""The compiled Layca step: per layer, one reduction pass and one update pass, compiled with ``torch.compile``.

This module compiles the kernels (:mod:`lightning_layca.step.kernels`, :mod:`lightning_layca.step.base_kernels`) and
calls them; what a kernel computes is described here.

For a layer with weights ``w`` before the wrapped optimizer's step and ``p = fl(w + D)`` after it, one compiled call

1. reads ``(p, w)`` once and accumulates, per row, ``a = <D, w>``, ``b = <w, w>`` and ``c = <D, D>`` in float64, with
   ``D = p - w`` formed in registers: products of float32 (or bfloat16, float16) numbers are exact in float64, so
   ``||D_perp||^2 = c - a^2 / b`` keeps float32 precision even for a mostly radial step (weight decay), as the eager
   step's sums do. The layer's sums are the sums of its rows;
   with ``granularity="unit"`` the rows are the units and their sums are used as they are;
2. turns the sums into ``k1, k2`` with :func:`lightning_layca.step.rule.coefficients`, the rule every path shares
   (rounding floor, non-finite steps, rates without overflow);
3. reads ``(p, w)`` once more and writes ``p = k1 * w + k2 * D``, rounded once to the layer's dtype: for a float32
   layer on CPU computed in float32 where its two terms do not cancel
   (:func:`lightning_layca.step.rule.single_precision_suffices`, the eager step's rule, checked in the kernel for the
   layer), the layer otherwise left as it was for a float64 update by the update half of its form (the one-call
   kernels' fourth row of sums says which, :func:`~lightning_layca.step.kernels.update_rows`); on CUDA in float64 for
   float32 layers (the check would have to be read, which synchronises); in float32 for bfloat16 and float16 ones. A
   layer (unit) that does not move (``k2 = 0``) ends exactly at ``w``: its step, NaN or not, is replaced by an exact
   zero.

With the snapshot taken before the base step, that is 7 tensor-sized memory passes.

For a process's shard of a sharded layer the kernel comes in two halves (:data:`SHARDED_SUMS`,
:data:`SHARDED_UPDATE`): step 1 alone, returning the shard's partial sums, then, once the seam has added the sums of
every process in the step's one collective, steps 2 and 3 from the full sums: the same passes.

Around ``torch.optim.SGD``, ``Adam`` and ``AdamW`` the kernels take the base optimizer's step too, with no snapshot:
:mod:`lightning_layca.step.base_compiled` calls them (the kernels of :mod:`lightning_layca.step.base_kernels`, each
form in two halves as well); this module registers them with the others and takes the float64 update of the layers
their update half leaves (:func:`update_halves`).

Compilation. Every kernel of the step is registered with :mod:`lightning_layca.compiling`, which compiles and calls it:
one compilation per (device, dtype, kernel) covers every layer (dynamic shapes: a layer is seen as four runs of its
memory, its lane view :func:`~lightning_layca.compiling.kernel_view`, whose sums the first pass reads side by side, or
per unit as ``units x columns``; a layer whose size is not a multiple of 4 takes the eager step), consecutive layers of
one kernel are stepped :data:`~lightning_layca.compiling.LAYERS_PER_CALL` per call, small layers on CPU take a
single-threaded kernel, and a kernel is compiled first on a stand-in layer (:func:`compiled_step_ready`), so that a
failure (no C++ compiler, an unsupported platform) costs one warning and the eager step takes over before any weight is
touched. Rates, relative learning rates and initial norms enter as device tensors, so LR schedulers and time-varying
schedules never recompile.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import torch

from lightning_layca.compiling import (
    AUTO_DEVICE_TYPES,
    LAYERS_PER_CALL,
    PARALLEL_MIN_ELEMENTS,
    SUPPORTED_DTYPES,
    KernelSpec,
    call_kernels,
    kernel_view,
    kernels_ready,
    parallel_kernel,
    register_kernel,
    scalars,
    stand_in_layer,
    unit_view,
)
from lightning_layca.distributed import several_processes
from lightning_layca.step.base_kernels import BASE_HALVES, BASE_KERNELS, base_halves
from lightning_layca.step.kernels import after_step, sharded_sums, sharded_update

__all__ = [
    "AUTO_DEVICE_TYPES",
    "BASE_KERNELS",
    "LAYERS_PER_CALL",
    "PARALLEL_MIN_ELEMENTS",
    "SHARDED_SUMS",
    "SHARDED_UPDATE",
    "SNAPSHOT",
    "SUPPORTED_DTYPES",
    "LayerScalars",
    "compiled_step_ready",
    "in_single_precision",
    "kernel_view",
    "parallel_kernel",
    "rotate_compiled",
    "scalars",
    "sharded_sums_compiled",
    "sharded_update_compiled",
    "unit_view",
    "update_halves",
    "update_in_float64",
    "use_compiled_step",
]

SNAPSHOT = "snapshot"
"""The kernel that works after the base optimizer's step, from a snapshot (:func:`after_step`)."""

SHARDED_SUMS, SHARDED_UPDATE = "sharded_sums", "sharded_update"
"""The two halves of :data:`SNAPSHOT` for a process's shard of a sharded layer, around the one collective of the step
(:func:`sharded_sums_compiled`, :func:`sharded_update_compiled`)."""

_BASE_STEP_OPTIONS = {"realize_reads_threshold": 100}
"""Inductor options of the kernels that take the base step: Inductor stores an intermediate read more than 4 times
(its default) in a buffer of its own. There that is the float64 step ``D``, written and read back twice (16 bytes per
element and pass), where recomputing it from the float32 inputs is cheaper: measured on ResNet-18 shapes, 2 threads,
the AdamW kernel took 25.9 ms instead of 40.2 ms, the SGD one 17.4 instead of 22.4 (the kernel after the base step
showed no difference, and keeps the default)."""


_AS_STORED_OPTIONS = {"emulate_precision_casts": True}
"""Inductor option of the sums half of every kernel that takes the base step (per layer and per unit): that half forms
the step from the optimizer's new state as stored, rounded to a bfloat16 or float16 state's dtype, as the update half
reads it back (``_UPDATE_AS_STORED`` of :mod:`lightning_layca.step.base_kernels`). By default Inductor drops a cast to
a lower precision and back; the two halves then take different steps, and where a float16 second moment of Adam
underflows to 0 in storage, the update half's step is ``m / eps``, which the rule's coefficients were not computed for.
Float32 state is unaffected."""


_STORING_SUMS_OPTIONS = {"split_reductions": False, "realize_opcount_threshold": 8}
"""Inductor options of the sums half of a sharded layer's kernel that takes the base step, on a layer's view: that
half updates the optimizer's state and forms the shard's sums, and by default Inductor stores the new state in a loop
of its own after the reduction's, reading the gradient and the state a second time. With the state's value realised
(it takes more than 8 operations) and the layer's sums one reduction over every element in memory order (not split,
and not over its lanes side by side: ``lanes=False`` of :func:`~lightning_layca.sums.matrix_sums`), the store joins
the reduction's loop. Measured on one 512 x 4608 shard read from memory (1 thread, process CPU time; the AVX-512 CPU
of ``benchmarks/README.md``): SGD with momentum 5.04 -> 3.23 ms (2 threads, wall clock: 2.90 -> 1.72 ms), Nesterov
5.10 -> 3.22, Adam 6.37 -> 3.90, Adam with ``amsgrad`` 4.51 -> 4.26, SGD without momentum (no state) 2.87 and 2.96.
The one-call kernels gain nothing from it (their second pass stores the state) and keep the defaults, and so do
the per-unit sums (a reduction per row)."""


def use_compiled_step(implementation: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a (device, dtype) group of layers may take the compiled step.

    Args:
        implementation: ``"auto"``, ``"eager"`` or ``"compiled"`` (see :class:`~lightning_layca.Layca`).
        device: The layers' device.
        dtype: The layers' dtype.

    Returns:
        ``False`` for ``"eager"``; for ``"compiled"``, whether the dtype is supported (a warning says so when it is
        not); for ``"auto"``, whether besides the device is one where the compiled step was measured faster
        (:data:`AUTO_DEVICE_TYPES`; :class:`lightning_layca.auto_choice.AutoChoice` then decides when) and the process
        is alone in its run. In a run of several processes (:func:`~lightning_layca.distributed.several_processes`)
        ``"auto"`` keeps the eager step: each process would time its own steps and decide on its own, at other steps or
        for the other implementation, and the compiled and eager steps differ in their last bits, so DDP's replicas
        would no longer be bit-identical. Whether compilation works is decided later, by :func:`compiled_step_ready`.
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
    return device.type in AUTO_DEVICE_TYPES and not several_processes()


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
        variants: The names of the kernels the layers call, where not :data:`SNAPSHOT` (the step after the base
            optimizer's, :func:`rotate_compiled`; then empty): the sharded halves of a sharded layer, or the kernels
            a base step's forms call (``base_step_kernels`` of :mod:`lightning_layca.step.base_compiled`).
    """
    forms = list(variants) if variants else [SNAPSHOT] * len(parallel)
    return kernels_ready(device, dtype, list(zip(parallel, forms, strict=True)), per_unit)


def _stand_in(
    variant: str,
    device: torch.device,
    dtype: torch.dtype,
    per_unit: bool,
    shape: tuple[int, int],
    rule: list[torch.Tensor],
) -> list[torch.Tensor]:
    """The arguments of the step's kernel ``variant`` for a stand-in layer (:data:`lightning_layca.compiling.StandIn`).

    ``rule`` holds its rate, relative learning rate and flag: 0-dim tensors from one tensor each, as the steps pass
    them.
    """
    params, weights, grid = stand_in_layer(device, dtype, shape)
    rate, relative_lr, flag = rule
    norms = torch.ones(shape[0] if per_unit else (), dtype=torch.float64, device=device)
    if variant == SNAPSHOT:
        return [params, weights, rate, relative_lr, norms, flag]
    if variant == SHARDED_SUMS:
        return [params, weights, norms]
    if variant == SHARDED_UPDATE:
        sums = torch.ones((3, shape[0] if per_unit else 1), dtype=torch.float64, device=device)
        return [params, weights, sums, rate, relative_lr, norms, flag]
    form, half = BASE_HALVES.get(variant, (variant, None))
    _, states, values = BASE_KERNELS[form]
    hyper = torch.tensor(values, dtype=torch.float64, device=device)
    state = [(grid.cos() + k).abs().to(dtype) for k in range(states)]
    if half is None:
        return [params, weights, *state, hyper, rate, relative_lr, norms, flag]
    if variant == base_halves(form)[0]:
        return [params, weights, *state, hyper, norms]
    sums = torch.ones((3, shape[0] if per_unit else 1), dtype=torch.float64, device=device)
    return [params, weights, *state, hyper, sums, rate, relative_lr, norms, flag]


# Every kernel of the step returns the sums ``(a, b, c)``.
_BODIES: tuple[tuple[str, Callable[..., Any]], ...] = (
    (SNAPSHOT, after_step),
    (SHARDED_SUMS, sharded_sums),
    (SHARDED_UPDATE, sharded_update),
    *((v, f) for v, (f, _, _) in BASE_KERNELS.items() if f is not None),
    *((v, f) for v, (_, f) in BASE_HALVES.items()),
)
_UPDATE_HALVES: dict[str, Callable[..., Any]] = {
    SHARDED_UPDATE: sharded_update,
    **{base_halves(v)[1]: BASE_HALVES[base_halves(v)[1]][1] for v in BASE_KERNELS},
}
"""The update half of each form (:data:`SHARDED_UPDATE` after the base step), uncompiled: the float64 update of a
float32 layer that a single-precision kernel left, where the half's own compilation fails
(:func:`_float64_updates`)."""


def in_single_precision(half: str) -> str:
    """The name of the kernel that runs the update half ``half`` with its float32 update where that is exact enough.

    On CPU it forms a float32 layer's update in float32 unless its terms cancel, and then leaves the layer (the fourth
    row of the sums it returns says which, :func:`~lightning_layca.step.kernels.update_rows`) for ``half`` itself,
    which forms it in float64 (:func:`_float64_updates`). On CUDA the two compute the same.
    """
    return f"{half}_single"


def _single_precision(body: Callable[..., Any]) -> Callable[..., Any]:
    def kernel(*args: torch.Tensor) -> Any:
        return body(*args, single=args[0].device.type == "cpu")

    return kernel


_STORING_SUMS = {base_halves(v)[0] for v in BASE_KERNELS}
for _variant, _body in _BODIES:
    _options = _BASE_STEP_OPTIONS if _variant in BASE_KERNELS or _variant in BASE_HALVES else {}
    _options = {**_options, **_AS_STORED_OPTIONS} if _variant in _STORING_SUMS else _options
    _layer_options = _STORING_SUMS_OPTIONS if _variant in _STORING_SUMS else {}
    register_kernel(
        _variant, KernelSpec(_body, partial(_stand_in, _variant), options=_options, layer_options=_layer_options)
    )
    if _variant in _UPDATE_HALVES:
        single = KernelSpec(_single_precision(_body), partial(_stand_in, _variant), options=_options)
        register_kernel(in_single_precision(_variant), single)


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
    calls = [(p, w, *scalars_) for p, w, scalars_ in zip(params, previous, layer_scalars, strict=True)]
    results: list[torch.Tensor] = []
    done = call_kernels(zip(parallel, [SNAPSHOT] * len(parallel), calls, strict=True), per_unit, results)
    update_in_float64(calls[:done], results, [SNAPSHOT] * done, parallel, per_unit)
    if sums is not None:
        sums.extend(results)
    return done


def update_in_float64(
    calls: Sequence[Sequence[torch.Tensor]],
    results: Sequence[torch.Tensor],
    variants: Sequence[str],
    parallel: Sequence[bool],
    per_unit: bool,
) -> None:
    """The update in float64 of the layers whose one-call kernel left it (a fourth row of their sums, 0).

    On CPU a float32 layer's kernel forms its update in float32 where that is exact enough
    (:func:`~lightning_layca.step.kernels.update_rows`) and otherwise leaves the layer as it was, the optimizer's
    state already updated: the update half of its form takes it from the layer's sums, as for a sharded layer.
    ``calls`` are the arguments the one-call kernels took, ``results`` what they returned.
    """
    left = _left(results)
    halves, arguments = [], []
    for i in left:
        variant, args = variants[i], list(calls[i])
        if variant == SNAPSHOT:
            half, at = SHARDED_UPDATE, 2  # (p, w, | sums, rate, relative_lr, initial_norms, near_floor)
        else:
            half, at = base_halves(variant)[1], 2 + BASE_KERNELS[variant][1] + 1  # (p, g, *state, hyper, | ...)
        halves.append(half)
        arguments.append([*args[:at], results[i][:3], *args[at:]])
    _float64_updates(halves, arguments, [parallel[i] for i in left], per_unit)


def _left(sums: Sequence[torch.Tensor]) -> list[int]:
    """The positions of the layers whose kernel left their float32 update for the float64 one (fourth row 0)."""
    checked = [i for i, s in enumerate(sums) if s.shape[0] == 4]
    if not checked:
        return []
    formed = torch.stack([sums[i][3, 0] for i in checked]).tolist()  # CPU only: no synchronisation
    return [i for i, ok in zip(checked, formed, strict=True) if not ok]


def _float64_updates(
    halves: Sequence[str], arguments: Sequence[Sequence[torch.Tensor]], parallel: Sequence[bool], per_unit: bool
) -> None:
    """Call each update half (from the full sums) compiled, or uncompiled from the first whose compilation fails."""
    done = call_kernels(zip(parallel, halves, arguments, strict=True), per_unit)
    for half, args in zip(halves[done:], arguments[done:], strict=True):
        _UPDATE_HALVES[half](*args)


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
    call_kernels(zip(parallel, [SHARDED_SUMS] * len(parallel), arguments, strict=True), per_unit, sums)
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
    calls = [
        (p, w, full, *scalars_) for p, w, full, scalars_ in zip(params, previous, sums, layer_scalars, strict=True)
    ]
    return update_halves([SHARDED_UPDATE] * len(calls), calls, parallel, per_unit)


def update_halves(
    halves: Sequence[str],
    calls: Sequence[Sequence[torch.Tensor]],
    parallel: Sequence[bool],
    per_unit: bool,
    every_layer: bool = False,
) -> int:
    """Call the update half ``halves[i]`` of each layer on ``calls[i]``: its kernel in single precision, compiled.

    The layers that kernel left for the float64 update take it (:func:`in_single_precision`). Should a compilation
    fail (after one warning), the layers from the failing one on are left to the caller, or with ``every_layer`` (the
    halves of a base step, whose sums half has already written the optimizer's state of this step) take the same
    half uncompiled, its update in float64 (in eager torch operations).

    Returns:
        The number of layers the compiled kernels stepped.
    """
    results: list[torch.Tensor] = []
    done = call_kernels(zip(parallel, map(in_single_precision, halves), calls, strict=True), per_unit, results)
    if every_layer:
        for half, arguments in zip(halves[done:], calls[done:], strict=True):
            _UPDATE_HALVES[half](*arguments)
    left = _left(results)
    _float64_updates([halves[i] for i in left], [calls[i] for i in left], [parallel[i] for i in left], per_unit)
    return done
