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
unit around SGD, whose forms take one call, and per layer around SGD where the optimizer's form says one call
(:func:`in_halves`, :mod:`lightning_layca.step.sgd_form`). :func:`base_step_kernels` says which kernels a form's
layers call, in the order of the calls. The kernels are registered, compiled and made ready with the step's others
(:mod:`lightning_layca.step.compiled`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_layca.compiling import call_kernels, equal_runs
from lightning_layca.step.base_kernels import BASE_KERNELS, base_halves
from lightning_layca.step.compiled import LayerScalars, in_single_precision, update_halves, update_in_float64

__all__ = [
    "base_step_kernels",
    "base_sums_compiled",
    "base_update_compiled",
    "has_one_call",
    "in_halves",
    "rotate_base_compiled",
]


def rotate_base_compiled(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    hypers: Sequence[torch.Tensor],
    layer_scalars: Sequence[LayerScalars],
    parallel: Sequence[bool],
    variants: Sequence[str],
    per_unit: bool = False,
    sgd_halves: bool = True,
) -> int:
    """Take the base optimizer's step and the Layca step of layers of one device and dtype together.

    Each layer takes its form's two halves (:func:`in_halves`: Adam's, and SGD's per layer with ``sgd_halves``; the
    sums are the layer's own, with no collective), or SGD's one-call kernel. Needs
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
        sgd_halves: Whether SGD's layers take the two halves per layer (the optimizer's form for the layers' device
            and dtype, :class:`~lightning_layca.step.sgd_form.SgdForms`).

    Returns:
        The number of layers stepped.
    """
    done = 0
    halves = [in_halves(v, per_unit, sgd_halves) for v in variants]
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


def in_halves(variant: str, per_unit: bool, sgd_halves: bool = True) -> bool:
    """Whether the unsharded layers of a base step's form take its two halves rather than one call.

    Adam's forms have no one-call kernel and take their halves
    (:data:`~lightning_layca.step.base_kernels.BASE_HALVES`). SGD's take one call per unit (per unit the sums half
    stores the new state in a loop of its own, after its sums, a reduction per row, and the two halves took longer:
    ``benchmarks/README.md``, section "Adam's step in two halves"), and per layer the form ``sgd_halves`` says: the
    optimizer's, chosen by a trial on the machine (:mod:`lightning_layca.step.sgd_form`).
    """
    return not has_one_call(variant) or (not per_unit and sgd_halves)


def has_one_call(variant: str) -> bool:
    """Whether a base step's form has a one-call kernel (SGD's forms) besides its two halves (every form)."""
    return BASE_KERNELS[variant][0] is not None


def base_step_kernels(
    variants: Sequence[str], parallel: Sequence[bool], sharded: bool, per_unit: bool, sgd_halves: bool = True
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
    halves = [sharded or in_halves(v, per_unit, sgd_halves) for v in variants]
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
