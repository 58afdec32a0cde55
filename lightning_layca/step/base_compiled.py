"""The compiled step around ``torch.optim.SGD``, ``Adam`` and ``AdamW``: the kernels take the base step too.

For these optimizers (the family table, :mod:`lightning_layca.step.families`, says when) the kernels of
:mod:`lightning_layca.step.base_kernels` take the base optimizer's step and the Layca step of a layer together, with
no snapshot: the sums half reads the weights, the gradient and the optimizer's state (SGD's momentum buffer, Adam's
moments), writes the new state and returns the layer's sums with the step ``D`` formed exactly in float64 (never
written); the update half forms ``D`` again from the weights and the new state, as the sums half formed it, takes the
rule from the layer's sums and writes the weights. ``fl(w + D)`` is never formed: for SGD with momentum 5 tensor reads
and 2 writes per element, against 3 and 2 for SGD's own fused step; for Adam 7 and 3 against 4 and 3. A sharded
layer's shard takes the same halves around the step's one collective (:func:`base_sums_compiled`, the seam,
:func:`base_update_compiled`); an unsharded layer takes them without it (:func:`rotate_base_compiled`), except per
unit around SGD, whose forms take one call (:func:`in_halves`), and per layer around SGD on a machine where one call
was measured faster (:func:`sgd_in_halves`). :func:`base_step_kernels` says which kernels a form's layers call, in the
order of the calls. The kernels are registered, compiled and made ready with the step's others
(:mod:`lightning_layca.step.compiled`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from lightning_layca.compiling import call_kernels, equal_runs, kernels_ready, parallel_kernel, scalars
from lightning_layca.step.base_kernels import BASE_KERNELS, base_halves
from lightning_layca.step.compiled import LayerScalars, in_single_precision, update_halves, update_in_float64
from lightning_layca.sums import LANES

__all__ = [
    "FORM_TRIAL_ELEMENTS",
    "FORM_TRIAL_PAIRS",
    "base_step_kernels",
    "base_sums_compiled",
    "base_update_compiled",
    "in_halves",
    "rotate_base_compiled",
    "sgd_in_halves",
]

FORM_TRIAL_ELEMENTS = 2**20
"""Elements of each stand-in layer of the trial of :func:`sgd_in_halves` (4 MiB per float32 tensor), in
:data:`_TRIAL_COPIES` copies taken in turn, so that every call reads its tensors from memory beyond the caches of a
core, as an optimizer's step does in training."""

FORM_TRIAL_PAIRS = 7
"""Turns of each form in the trial of :func:`sgd_in_halves`: the median of the ratios of neighbouring turns decides."""

_TRIAL_COPIES = 4

_sgd_halves: dict[tuple[str, torch.dtype, int], bool] = {}
"""The decision of :func:`sgd_in_halves` per (device type, dtype, intra-op threads), made once per process."""


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
    """Take the base optimizer's step and the Layca step of layers of one device and dtype together.

    Each layer takes its form's two halves (:func:`in_halves`: per layer, and Adam's per unit; the sums are the
    layer's own, with no collective), or per unit SGD's one-call kernel. Needs
    :func:`~lightning_layca.step.compiled.compiled_step_ready` (with :func:`base_step_kernels`) to have returned
    ``True`` for the layers' device, dtype and kernels. Should a later compilation fail, the layers from the failing
    one on are left to the caller (untouched: neither their weights nor their optimizer state were written), after one
    warning; a layer whose sums half ran takes its update (uncompiled, should its compilation fail).

    Args:
        params: :func:`~lightning_layca.compiling.kernel_view` (or :func:`~lightning_layca.compiling.unit_view`) of
            each layer (detached), holding ``w``.
        grads: The same views of their gradients.
        states: Per layer, the same views of the optimizer state the kernel updates in place (see
            :data:`~lightning_layca.step.base_kernels.BASE_KERNELS`).
        hypers: Per layer, the kernel's hyperparameters (see :mod:`lightning_layca.step.base_steps`).
        layer_scalars: The :class:`~lightning_layca.step.compiled.LayerScalars` of each layer.
        parallel: :func:`~lightning_layca.compiling.parallel_kernel` of each layer.
        variants: Per layer, the form of the base step (a key of
            :data:`~lightning_layca.step.base_kernels.BASE_KERNELS`).
        per_unit: Whether every unit turns by itself (``granularity="unit"``).

    Returns:
        The number of layers stepped.
    """
    if not params:
        return 0
    device, dtype = params[0].device, params[0].dtype
    halves = [in_halves(v, per_unit, device, dtype) for v in variants]
    done = 0
    for first, end in equal_runs(halves):
        run = slice(first, end)
        if halves[first]:
            norms = [scalars_.initial_norms for scalars_ in layer_scalars[run]]
            sums = base_sums_compiled(
                params[run], grads[run], states[run], hypers[run], norms, parallel[run], variants[run], per_unit
            )
            # The layers whose sums half ran have this step's optimizer state: they take the update half.
            stepped = slice(first, first + len(sums))
            base_update_compiled(
                params[stepped],
                grads[stepped],
                states[stepped],
                hypers[stepped],
                sums,
                layer_scalars[stepped],
                parallel[stepped],
                variants[stepped],
                per_unit,
            )
            count = len(sums)
        else:
            rows = zip(params[run], grads[run], states[run], hypers[run], layer_scalars[run], strict=True)
            calls = [(p, g, *state, hyper, *scalars_) for p, g, state, hyper, scalars_ in rows]
            results: list[torch.Tensor] = []
            count = call_kernels(zip(parallel[run], variants[run], calls, strict=True), per_unit, results)
            update_in_float64(calls[:count], results, variants[run], parallel[run], per_unit)
        done += count
        if done < end:
            break
    return done


def in_halves(variant: str, per_unit: bool, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the unsharded layers of a base step's form on ``(device, dtype)`` take its two halves, not one call.

    Adam's forms have no one-call kernel. SGD's take one call per unit (per unit the sums half stores the new state in
    a loop of its own, after its sums, a reduction per row: the two halves took longer, ``benchmarks/README.md``,
    section "Adam's step in two halves"), and per layer the form measured faster on this machine
    (:func:`sgd_in_halves`).
    """
    if BASE_KERNELS[variant][0] is None:
        return True
    return not per_unit and sgd_in_halves(device, dtype)


def sgd_in_halves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SGD's layers (per layer, unsharded) take the two halves on ``(device, dtype)``: the faster form here.

    The halves read a tensor fewer per element (5 against the one-call kernel's 6 for SGD with momentum), but their
    sums loop reads each tensor as one run of memory, where the one-call kernel reads a layer's four runs side by side,
    and which of the two is faster depends on the CPU: measured on ResNet-18 shapes, the halves took 14 % less time on
    an AMD EPYC and 16 % more on an Intel Xeon (``benchmarks/README.md``). So on CPU the first call per (dtype,
    number of threads) in the process compiles both forms for one layer and times them on stand-in layers of
    :data:`FORM_TRIAL_ELEMENTS` elements, in :data:`FORM_TRIAL_PAIRS` alternating turns (a fraction of a second once
    compiled); the median of the ratios of neighbouring turns decides, as the rule of ``implementation="auto"`` does,
    so that a load that comes and goes does not. Both forms take the same steps, bit for bit. Elsewhere (CUDA, not
    measured yet) the halves; likewise where a form fails to compile (the step's readiness check then warns).
    """
    key = (device.type, dtype, torch.get_num_threads())
    if key not in _sgd_halves:
        if device.type != "cpu":
            _sgd_halves[key] = True
        else:
            times = _time_forms(device, dtype)
            ratios = [one / halves for one, halves in times]
            _sgd_halves[key] = not ratios or statistics.median(ratios) >= 1.0
    return _sgd_halves[key]


def _time_forms(device: torch.device, dtype: torch.dtype) -> list[tuple[float, float]]:
    """Per turn, the seconds one call and the two halves of SGD's momentum form took on the stand-in layers.

    Empty when either form does not compile here.
    """
    variant = "sgd_momentum"
    sums_half, update_half = base_halves(variant)
    generator = torch.Generator().manual_seed(0)
    layers = [
        [torch.randn((LANES, FORM_TRIAL_ELEMENTS // LANES), generator=generator).to(device, dtype) for _ in range(3)]
        for _ in range(_TRIAL_COPIES)
    ]
    parallel = parallel_kernel(layers[0][0])
    kinds = [(parallel, variant), (parallel, sums_half), (parallel, in_single_precision(update_half))]
    if not kernels_ready(device, dtype, kinds):
        return []
    hyper = torch.tensor(BASE_KERNELS[variant][2], dtype=torch.float64, device=device)
    rate, relative_lr = scalars(torch.tensor([0.03, 1.0], dtype=torch.float64, device=device))
    flag = torch.zeros((), dtype=torch.bool, device=device)
    norms = [torch.tensor(float(w.double().norm()), dtype=torch.float64, device=device) for w, _, _ in layers]
    layer_scalars = [LayerScalars(rate, relative_lr, n0, flag) for n0 in norms]

    def one_call(k: int) -> None:
        w, g, b = layers[k]
        call_kernels([(parallel, variant, (w, g, b, hyper, *layer_scalars[k]))], per_unit=False)

    def halves(k: int) -> None:
        w, g, b = layers[k]
        sums = base_sums_compiled([w], [g], [[b]], [hyper], [layer_scalars[k].initial_norms], [parallel], [variant])
        base_update_compiled([w], [g], [[b]], [hyper], sums, [layer_scalars[k]], [parallel], [variant])

    def turn(form: Callable[[int], None]) -> float:
        start = time.perf_counter()
        for k in range(_TRIAL_COPIES):
            form(k)
        return time.perf_counter() - start

    with torch.no_grad():
        turn(one_call), turn(halves)  # first calls (the kernels' code loaded, the pages touched)
        return [(turn(one_call), turn(halves)) for _ in range(FORM_TRIAL_PAIRS)]


def base_step_kernels(
    variants: Sequence[str],
    parallel: Sequence[bool],
    sharded: bool,
    per_unit: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[list[str], list[bool]]:
    """The kernels that layers of these base-step forms call, in the order of the calls, and whether each is parallel.

    What :func:`~lightning_layca.step.compiled.compiled_step_ready` must check for them, in that order, so that it also
    compiles the kernels of several layers per call that the calls will take.

    A form's one-call kernel; or for a sharded layer, and where :func:`in_halves` says so, its two halves: the sums
    half of every layer of a run of such layers first, then their update half (its kernel in single precision,
    :func:`~lightning_layca.step.compiled.in_single_precision`), as :func:`rotate_base_compiled` and the sharded step
    call them.
    """
    kernels: list[str] = []
    threads: list[bool] = []
    halves = [sharded or in_halves(v, per_unit, device, dtype) for v in variants]
    for first, end in equal_runs(halves):
        forms, run_parallel = variants[first:end], list(parallel[first:end])
        if halves[first]:
            kernels += [base_halves(v)[0] for v in forms] + [in_single_precision(base_halves(v)[1]) for v in forms]
            threads += run_parallel * 2
        else:
            kernels += forms
            threads += run_parallel
    return kernels, threads


def base_sums_compiled(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    hypers: Sequence[torch.Tensor],
    initial_norms: Sequence[torch.Tensor],
    parallel: Sequence[bool],
    variants: Sequence[str],
    per_unit: bool = False,
) -> list[torch.Tensor]:
    """The sums half of each layer's form: the base step's new state, and the layer's sums.

    Each call reads a layer's (or a process's shard's) weights, gradient and optimizer state, writes the new state and
    returns its sums ``(a, b, c)`` of ``(D, w)`` (``D`` formed exactly in float64, never written; partial sums for a
    shard); the weights are not written. Sharded, the seam then adds the sums of every process
    (:func:`lightning_layca.distributed.reduce_sums`); then :func:`base_update_compiled` takes the Layca step. Needs
    :func:`~lightning_layca.step.compiled.compiled_step_ready` with the kernels :func:`base_step_kernels` lists for
    them. Should a later compilation fail, the layers from the
    failing one on are left to the caller untouched (fewer results than layers), after one warning.

    Args:
        params: :func:`~lightning_layca.compiling.kernel_view` (or :func:`~lightning_layca.compiling.unit_view`) of
            each layer or local shard (detached), holding ``w``.
        grads: The same views of their gradients.
        states: Per layer, the same views of the optimizer state the kernel updates in place.
        hypers: Per layer, the kernel's hyperparameters.
        initial_norms: Per layer, its initial norm (0-dim), or per unit its (local) units' norms: tells the kernel the
            granularity.
        parallel: :func:`~lightning_layca.compiling.parallel_kernel` of each view.
        variants: Per layer, the form of the base step (a key of
            :data:`~lightning_layca.step.base_kernels.BASE_KERNELS`).
        per_unit: Whether every unit turns by itself.

    Returns:
        Per layer, ``(3, 1)`` or per unit ``(3, rows)`` float64 sums.
    """
    sums: list[torch.Tensor] = []
    calls = (
        (p, g, *state, hyper, n0)
        for p, g, state, hyper, n0 in zip(params, grads, states, hypers, initial_norms, strict=True)
    )
    forms = [base_halves(v)[0] for v in variants]
    call_kernels(zip(parallel, forms, calls, strict=True), per_unit, sums)
    return sums


def base_update_compiled(
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
    """The update half of each layer's form: its Layca step from the layer's full ``sums``, ``(3, 1)`` or ``(3, rows)``.

    ``D`` is formed again from the weights and the state the sums half wrote, as that half formed it. The state is
    already this step's, so every layer must be stepped: should a compilation fail (after one warning), the layers
    from the failing one on take the update half uncompiled, its update in float64 (in eager torch operations).
    """
    calls = [
        (p, g, *state, hyper, full, *scalars_)
        for p, g, state, hyper, full, scalars_ in zip(params, grads, states, hypers, sums, layer_scalars, strict=True)
    ]
    update_halves([base_halves(v)[1] for v in variants], calls, parallel, per_unit, every_layer=True)
