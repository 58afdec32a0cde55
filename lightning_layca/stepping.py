"""Running the step plan: each bucket along its layers' paths, with the fallbacks, and the sharded form.

For every bucket (:class:`lightning_layca.plan.Bucket`), after the wrapped optimizer's step:

1. the layers on the ``"compiled+base"`` path whose base step the kernel can take now (:func:`read_base_steps`) are
   stepped by their kernels; the others fall back to the base step and the next path at this step;
2. the layers on the ``"compiled"`` path are stepped by the kernel that works after the base step;
3. the rest take the eager step (:func:`lightning_layca.step.eager.rotate_eager`).

Sharded layers take their step for all buckets at once (:func:`rotate_sharded`): local float64 sums, ONE
``all_reduce`` through the seam, then every process applies the same coefficients to its own shard; on the compiled
paths the local sums and the update are the two halves of the compiled kernels (on ``"compiled+base"`` the first half
also takes the base step's state, the second forms the step again from it), on the ``"eager"`` path the eager sums
and update.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from torch.optim import Optimizer

from lightning_layca.distributed import ShardLayout, local_shard, reduce_sums
from lightning_layca.layers import LayerRegistry
from lightning_layca.plan import COMPILED, EAGER, WITH_BASE, Bucket, local_unit_norms
from lightning_layca.step.base_compiled import (
    base_step_kernels,
    base_sums_compiled,
    base_update_compiled,
    has_one_call,
    rotate_base_compiled,
)
from lightning_layca.step.base_steps import LayerStep
from lightning_layca.step.compiled import (
    PARALLEL_MIN_ELEMENTS,
    SHARDED_SUMS,
    SHARDED_UPDATE,
    LayerScalars,
    compiled_step_ready,
    in_single_precision,
    kernel_view,
    rotate_compiled,
    scalars,
    sharded_sums_compiled,
    sharded_update_compiled,
    unit_view,
)
from lightning_layca.step.eager import rotate_eager, step_sums
from lightning_layca.step.families import family_of
from lightning_layca.step.rule import NEAR_FLOOR_FACTOR, ROUNDING_FLOOR_FACTOR, unit_roundoff
from lightning_layca.step.sgd_form import SgdForms
from lightning_layca.sums import unit_counts

__all__ = [
    "BaseSteps",
    "base_step_of",
    "gradients_set_aside",
    "read_base_steps",
    "rotate_bucket",
    "rotate_buckets",
    "rotate_sharded",
    "small_steps_on_one_thread",
    "take_snapshots",
    "upload_rates",
]


@dataclass
class BaseSteps:
    """The base steps the kernels take at one step for the ``"compiled+base"`` layers of a bucket."""

    positions: list[int] = field(default_factory=list)
    """Positions of the layers the kernels take at this step; the lists below follow them."""
    steps: list[LayerStep] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    states: list[list[torch.Tensor]] = field(default_factory=list)
    """Per layer, kernel views of the state tensors of its step."""
    hypers: list[torch.Tensor] = field(default_factory=list)
    parallel: list[bool] = field(default_factory=list)
    fallback: list[int] = field(default_factory=list)
    """Positions of ``"compiled+base"`` layers that take the base step and the next path at this step."""
    sgd_halves: bool = True
    """Whether SGD's layers take the two halves per layer rather than one call (:class:`SgdForms`)."""


@contextmanager
def small_steps_on_one_thread(optimizer: Optimizer, closure: object = None) -> Iterator[None]:
    """Run the block (the wrapped optimizer's step) on one thread where it steps small CPU tensors only.

    Around torch's ``SGD``, ``Adam`` and ``AdamW`` (their exact types: element-wise steps), when every parameter
    left with a gradient is a CPU tensor of fewer than :data:`~lightning_layca.compiling.PARALLEL_MIN_ELEMENTS`
    elements (the kernels take the layers' steps; the biases and normalisation weights are left): their fused CPU
    step opens a parallel region per tensor, which costs far more than such a tensor's step. An element-wise step
    computes every element alike whatever the number of threads, so the results are those of the optimizer's own
    step. The intra-op thread count is process-wide: set back to its value when the block ends. With a ``closure``
    (the step runs the model first) nothing changes.
    """
    threads = torch.get_num_threads()
    family = family_of(optimizer)
    small = (
        closure is None
        and threads > 1
        and family is not None
        and family.read_step is not None
        and all(
            p.grad is None or (p.device.type == "cpu" and p.numel() < PARALLEL_MIN_ELEMENTS)
            for group in optimizer.param_groups
            for p in group["params"]
        )
    )
    if not small:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def gradients_set_aside(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Hide the gradients of ``params`` (``None``) from an optimizer step, and give the same tensors back after it."""
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad


def base_step_of(optimizer: Optimizer, params: Sequence[torch.Tensor]) -> None:
    """Run ``optimizer``'s step for ``params`` only (every other gradient set aside meanwhile)."""
    chosen = {id(p) for p in params}
    others = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in chosen]
    with gradients_set_aside(others):
        optimizer.step()


def _device_values(values: Sequence[Sequence[float]], device: torch.device) -> torch.Tensor:
    """Host numbers as a float64 tensor on ``device``; to an accelerator through pinned memory, without a sync."""
    host = torch.tensor(values, dtype=torch.float64)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()  # the caching host allocator keeps it alive until the copy is done
    return host.to(device, non_blocking=True)


def upload_rates(
    bucket: Bucket,
    rates: list[float],
    relative_lrs: list[float],
    version: int,
    unit_rates: list[list[float]] | None = None,
) -> None:
    """Copy the bucket's rates to its device (only when ``version`` changed: no host-to-device copy per step).

    With ``unit_rates`` (per layer, the rate of each unit: a per-unit rotation target), the eager step reads a rate
    per row (:attr:`~lightning_layca.plan.Bucket.rates`); the compiled kernels, which take one rate per layer, are not
    given these layers (:class:`~lightning_layca.plan.StepPlan`'s ``eager_reason``).

    Raises:
        ValueError: With ``unit_rates`` for layers this process holds only some units of (sharded along dim 0).
    """
    if bucket.rates_version == version:
        return
    values = [[rates[i] for i in bucket.indices], [relative_lrs[i] for i in bucket.indices]]
    layer_rates, layer_relative_lrs = _device_values(values, bucket.near_floor.device)
    bucket.rate_scalars = scalars(layer_rates), scalars(layer_relative_lrs)
    bucket.rates, bucket.relative_lrs = layer_rates, layer_relative_lrs
    if bucket.row_layer is not None:
        bucket.rates, bucket.relative_lrs = layer_rates[bucket.row_layer], layer_relative_lrs[bucket.row_layer]
        if unit_rates is not None:
            rows = [x for i in bucket.indices for x in unit_rates[i]]
            if len(rows) != bucket.row_layer.numel():
                raise ValueError(
                    f"Layca: a per-unit rotation target needs every unit of a layer on each process, but this process "
                    f"holds {bucket.row_layer.numel()} of the {len(rows)} units of its layers (sharded along dim 0). "
                    "Use granularity='layer' with a target under this sharding."
                )
            (bucket.rates,) = _device_values([rows], bucket.near_floor.device)
    bucket.rates_version = version


def read_base_steps(
    bucket: Bucket,
    optimizer: Optimizer,
    param_group_of: dict[int, int],
    sharded: bool = False,
    sgd_forms: SgdForms | None = None,
) -> BaseSteps:
    """The ``"compiled+base"`` layers of ``bucket`` whose base step the kernels take at this step, with arguments.

    With ``sharded`` (the step's layers are sharded: :func:`rotate_sharded`), the kernels are the two halves of each
    layer's form (:func:`~lightning_layca.step.base_kernels.base_halves`), and the views are of the local shards.
    Unsharded, SGD's layers (per layer) take the form ``sgd_forms`` keeps for the bucket's device and dtype (the
    halves without it).

    A layer without a gradient is skipped, as torch's optimizers skip it (sharded, it takes the next path, whose sums
    of a zero step the step's collective needs). A layer whose gradient the kernel cannot
    read as it reads the weights (sparse, another dtype or memory layout), or whose step it cannot take now (see
    :attr:`lightning_layca.step.families.Family.read_step`), takes the base step and the next path (``fallback``), and
    so does every such layer where the kernel cannot be compiled.
    """
    plan = BaseSteps()
    with_base = bucket.at(WITH_BASE)
    if not with_base:
        return plan
    family = family_of(optimizer)
    assert family is not None  # layers take this path only around the optimizers of a family (StepPlan)
    view = unit_view if bucket.per_unit else kernel_view
    device, dtype = bucket.near_floor.device, bucket.params[0].dtype
    state, groups = optimizer.state, optimizer.param_groups
    for j in with_base:
        p, weights_view = bucket.params[j], cast(torch.Tensor, bucket.views[j])
        grad = p.grad
        if grad is None:
            if sharded:  # its sums still go into the step's collective: from a snapshot, for a step of zero
                plan.fallback.append(j)
            continue
        group = groups[param_group_of[bucket.indices[j]]]
        grad_view = None if grad.is_sparse or grad.stride() != p.stride() else view(local_shard(grad))
        readable = grad_view is not None and grad.dtype == dtype and grad_view.shape == weights_view.shape
        known = readable and family.read_step is not None and family.supports(group)
        step = family.read_step(group, p, state.get(p) or {}) if known and family.read_step else None
        if step is None:
            plan.fallback.append(j)
            continue
        plan.positions.append(j)
        plan.steps.append(step)
        plan.grads.append(cast(torch.Tensor, grad_view))
        plan.states.append([cast(torch.Tensor, view(local_shard(x))) for x in step.state])
        plan.parallel.append(bucket.parallel[j])
    variants = [step.variant for step in plan.steps]
    if sgd_forms is not None and not sharded and not bucket.per_unit and any(map(has_one_call, variants)):
        plan.sgd_halves = sgd_forms.in_halves(device, dtype)
    variants, parallel = base_step_kernels(variants, plan.parallel, sharded, bucket.per_unit, plan.sgd_halves)
    if plan.positions and not compiled_step_ready(device, dtype, parallel, bucket.per_unit, variants):
        return BaseSteps(fallback=plan.fallback + plan.positions)
    hyper_values = [step.hyper for step in plan.steps]
    if hyper_values != bucket.hyper_values:  # a host-to-device copy only when the values change
        bucket.hyper_values = hyper_values
        rows = _device_values(hyper_values, device).unbind() if hyper_values else ()
        bucket.hyper_rows = [row.detach() for row in rows]
    plan.hypers = bucket.hyper_rows
    return plan


def take_snapshots(buckets: list[Bucket], base_steps: list[BaseSteps], keep_all: bool) -> None:
    """Copy the weights before the step of every layer that needs them (all of them with ``keep_all``).

    A layer whose base step a kernel takes needs no snapshot; every other path works from one.
    """
    for bucket, base in zip(buckets, base_steps, strict=True):
        with_base = set(bucket.at(WITH_BASE)) - set(base.fallback)
        bucket.kept = [j for j in range(len(bucket.params)) if keep_all or j not in with_base]
        bucket.snapshot(bucket.kept)


def rotate_bucket(bucket: Bucket, base: BaseSteps, optimizer: Optimizer) -> None:
    """Turn the base step of the layers of ``bucket`` into Layca steps along their paths, with the fallbacks."""
    device, dtype = bucket.near_floor.device, bucket.params[0].dtype
    rest = bucket.at(EAGER) + base.fallback
    after = bucket.at(COMPILED)
    if after and compiled_step_ready(device, dtype, [bucket.parallel[j] for j in after], per_unit=bucket.per_unit):
        scalars_after = _layer_scalars(bucket, after)
        sums: list[torch.Tensor] | None = [] if device.type == "cpu" else None  # see _rounded_away
        done = rotate_compiled(
            [cast(torch.Tensor, bucket.views[j]) for j in after],
            [cast(torch.Tensor, (unit_view if bucket.per_unit else kernel_view)(bucket.previous[j])) for j in after],
            scalars_after,
            [bucket.parallel[j] for j in after],
            per_unit=bucket.per_unit,
            sums=sums,
        )
        if sums:  # the layers whose step rounded to nothing, as on the eager path
            layer_rates = torch.stack([x.rate for x in scalars_after[:done]])
            stalled = _rounded_away(bucket, after[:done], torch.stack([x[2].sum() for x in sums]), layer_rates)
            bucket.near_floor[after[:done]] |= stalled
        rest += after[done:]
    else:
        rest += after
    if base.positions:
        at = base.positions
        done = rotate_base_compiled(
            [cast(torch.Tensor, bucket.views[j]) for j in at],
            base.grads,
            base.states,
            base.hypers,
            _layer_scalars(bucket, at),
            base.parallel,
            [step.variant for step in base.steps],
            per_unit=bucket.per_unit,
            sgd_halves=base.sgd_halves,
        )
        state = optimizer.state
        for j, step in zip(at[:done], base.steps, strict=False):
            step.commit(state[bucket.params[j]])
        if done < len(at):  # a compilation failed: those layers take the base step and the eager one
            missed = at[done:]
            bucket.snapshot(missed)
            bucket.kept = sorted(set(bucket.kept) | set(missed))
            base_step_of(optimizer, [bucket.params[j] for j in missed])
            rest += missed
    if rest:
        _rotate_eager(bucket, sorted(rest))


def _layer_scalars(bucket: Bucket, positions: list[int]) -> list[LayerScalars]:
    """The numbers of the rule of the layers of ``bucket`` at ``positions``, as the compiled kernels take them."""
    rates, relative_lrs = bucket.rate_scalars
    return [LayerScalars(rates[j], relative_lrs[j], bucket.norm_scalars[j], bucket.flag_scalars[j]) for j in positions]


def _rotate_eager(bucket: Bucket, positions: list[int], sums: torch.Tensor | None = None) -> None:
    """The eager step for the layers of ``bucket`` at ``positions`` (their full sums given when sharded)."""
    if len(positions) == len(bucket.params):
        rates, relative_lrs, norms = bucket.rates, bucket.relative_lrs, bucket.initial_norms
        at, row_layer = None, bucket.row_layer
    else:  # the values of those layers (of their rows) only
        at, rows, row_layer = bucket.subset(positions)
        rates, relative_lrs, norms = bucket.rates[rows], bucket.relative_lrs[rows], bucket.initial_norms[rows]
    local = bucket.local()
    params, previous = [local[j] for j in positions], [bucket.previous[j] for j in positions]
    # Sharded layers (sums given): each process sees part of the gradient, so _rounded_away does not apply.
    checked = sums is None and params[0].device.type == "cpu"
    if sums is None:
        sums = step_sums(params, previous, bucket.per_unit)
    near = rotate_eager(params, previous, rates, relative_lrs, norms, per_unit=bucket.per_unit, sums=sums)
    if row_layer is not None:
        near = torch.zeros(len(positions), dtype=torch.bool, device=near.device).index_put_(
            (row_layer,), near, accumulate=True
        )
    if checked:
        step_sq, layer_rates = sums[:, 2].to(near.device), rates
        if row_layer is not None:  # per layer: the sum over its units, and the largest rate of them
            step_sq = torch.zeros(len(positions), dtype=step_sq.dtype, device=near.device).index_add_(
                0, row_layer, step_sq
            )
            layer_rates = torch.zeros(len(positions), dtype=rates.dtype, device=near.device).scatter_reduce_(
                0, row_layer, rates, "amax"
            )
        near = near | _rounded_away(bucket, positions, step_sq, layer_rates)
    if at is None:
        bucket.near_floor |= near
    else:
        bucket.near_floor[at] |= near


def _rounded_away(bucket: Bucket, positions: list[int], step_sq: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Per layer at ``positions``: whether its step was exactly zero (``step_sq``) although its gradient was not.

    Only layers meant to turn by more than rounding resolves are checked (``rates``, their largest ``rho``, above
    the near-floor margin): a layer frozen by its schedule or a zero learning rate, or annealed to a rotation below
    the floor, is expected to stay.

    A base step below the resolution of ``w + D`` rounds to nothing: the paths that work from a snapshot then see no
    step at all, where the kernels that take the base step see it (and flag it near the floor). Such a layer is
    flagged near the floor too. Read on the host, so called for CPU layers only (no synchronisation there).
    """
    flags = torch.zeros(len(positions), dtype=torch.bool)
    margin = NEAR_FLOOR_FACTOR * ROUNDING_FLOOR_FACTOR * unit_roundoff(bucket.params[positions[0]].dtype)
    for i in ((step_sq == 0) & (rates.to(step_sq.device) > margin)).nonzero().flatten().tolist():
        grad = bucket.params[positions[i]].grad
        if grad is None or grad.is_sparse:
            continue
        # A gradient whose square overflows float32 zeroes steps for another reason (Adam's second moment): left out.
        largest = grad.detach().abs().max().float()
        flags[i] = bool((largest > 0) & torch.isfinite(largest.square()))
    return flags


def rotate_buckets(
    buckets: list[Bucket],
    base_steps: list[BaseSteps],
    optimizer: Optimizer,
    layout: ShardLayout | None,
    registry: LayerRegistry,
    timed: bool = False,
) -> float:
    """Rotate every bucket along its layers' paths: one by one, or all at once when sharded (``layout``).

    Args:
        buckets: The buckets of the step (:meth:`~lightning_layca.plan.StepPlan.for_step`), rates uploaded.
        base_steps: What :func:`read_base_steps` found for each.
        optimizer: The wrapped optimizer.
        layout: The layers' shard layout when any is sharded, else ``None``.
        registry: The layer registry (initial norms of sharded layers).
        timed: Whether to time the buckets that :class:`~lightning_layca.auto_choice.AutoChoice` compares.

    Returns:
        With ``timed``, the seconds the eligible buckets took (they are on the CPU: their kernels have finished when
        the call returns); else 0.
    """
    if layout is not None:
        rotate_sharded(buckets, base_steps, optimizer, layout, registry)
        return 0.0
    seconds = 0.0
    for bucket, base in zip(buckets, base_steps, strict=True):
        start = time.perf_counter() if timed and bucket.eligible else None
        rotate_bucket(bucket, base, optimizer)
        if start is not None:
            seconds += time.perf_counter() - start
    return seconds


def rotate_sharded(
    buckets: list[Bucket],
    base_steps: list[BaseSteps],
    optimizer: Optimizer,
    layout: ShardLayout,
    registry: LayerRegistry,
) -> None:
    """The step of every bucket at once, for sharded layers: local sums, ONE all_reduce, local updates.

    Layers whose base step the kernels take (``base_steps``) take the two halves of their family's kernel: the first
    updates the optimizer state and returns the shard's sums, the second (after the collective) forms the step again
    from the new state and writes the weights. Layers on the ``"compiled"`` path (and those that fell back from the
    kernels that take the base step) take the two halves of the compiled kernel after the base step (their local sums,
    then the update from the full sums); the others the eager sums and update. The sharded layers joining at this
    step (frozen until now, their weights before the step their initial weights) get their initial norms from the
    step's full sums ``<w, w>``: no collective of their own.
    """
    per_unit = registry.per_unit
    device = buckets[0].near_floor.device
    compiled = [_compiled_positions(b, base) for b, base in zip(buckets, base_steps, strict=True)]
    base_sums = _base_sums(buckets, base_steps, optimizer, per_unit)
    parts = [_local_sums(b, found, at, per_unit) for b, found, at in zip(buckets, base_sums, compiled, strict=True)]
    local = torch.cat([part.to(device) for part in parts])
    full = reduce_sums(local, layout, per_unit)
    if registry.joining:
        order = [i for b in buckets for i in b.indices]
        per_layer = full[:, 1].split(list(layout.rows)) if per_unit else full[:, 1].split(1)
        joining = set(registry.joining)
        pairs = [(i, squares) for i, squares in zip(order, per_layer, strict=True) if i in joining]
        registry.record_initial_norms([i for i, _ in pairs], [squares for _, squares in pairs])
        position = {i: k for k, i in enumerate(order)}
        for b in buckets:  # the buckets were built with NaN for the joining layers
            if per_unit:
                norms = torch.cat([local_unit_norms(registry, i, layout, position[i]) for i in b.indices])
            else:
                norms = torch.tensor([registry.initial_norms[i] for i in b.indices], dtype=torch.float64)
            b.initial_norms.copy_(norms)
            if per_unit and b.norm_scalars:  # the compiled kernels' copies of them
                b.norm_scalars = [n.clone() for n in b.initial_norms.split(unit_counts(b.local()))]
    if per_unit:
        rows = layout.local_rows_of(full)
        sums, start = [], 0
        for b in buckets:
            sums.append(list(rows[start : start + len(b.indices)]))
            start += len(b.indices)
    else:
        sums = [list(part.split(1)) for part in full.split([len(b.indices) for b in buckets])]
    for members in _runs(buckets, base_steps):
        base_update_compiled(
            [cast(torch.Tensor, buckets[k].views[base_steps[k].positions[i]]) for k, i in members],
            [base_steps[k].grads[i] for k, i in members],
            [base_steps[k].states[i] for k, i in members],
            [base_steps[k].hypers[i] for k, i in members],
            [sums[k][base_steps[k].positions[i]].T for k, i in members],
            [_layer_scalars(buckets[k], [base_steps[k].positions[i]])[0] for k, i in members],
            [base_steps[k].parallel[i] for k, i in members],
            [base_steps[k].steps[i].variant for k, i in members],
            per_unit=per_unit,
        )
    for b, base, layer_sums, at in zip(buckets, base_steps, sums, compiled, strict=True):
        if at:
            done = sharded_update_compiled(
                [cast(torch.Tensor, b.views[j]) for j in at],
                [cast(torch.Tensor, _kernel_view(b, b.previous[j])) for j in at],
                [layer_sums[j].T for j in at],
                _layer_scalars(b, at),
                [b.parallel[j] for j in at],
                per_unit=b.per_unit,
            )
            at = at[:done]  # a compilation that failed leaves the rest to the eager update
        rest = sorted(set(range(len(b.params))) - set(at) - set(base.positions))
        if rest:
            _rotate_eager(b, rest, torch.cat([layer_sums[j] for j in rest]))


def _kernel_view(bucket: Bucket, tensor: torch.Tensor) -> torch.Tensor | None:
    return (unit_view if bucket.per_unit else kernel_view)(tensor)


def _compiled_positions(bucket: Bucket, base: BaseSteps) -> list[int]:
    """The positions of ``bucket`` whose sharded step the compiled kernels take after the base step.

    The ``"compiled"`` path, and the layers that fell back from the kernels that take the base step (compiled here
    if needed).
    """
    at = sorted(bucket.at(COMPILED) + base.fallback)
    device, dtype = bucket.near_floor.device, bucket.params[0].dtype
    parallel = [bucket.parallel[j] for j in at] * 2
    variants = [SHARDED_SUMS] * len(at) + [in_single_precision(SHARDED_UPDATE)] * len(at)
    if at and compiled_step_ready(device, dtype, parallel, bucket.per_unit, variants):
        return at
    return []


def _runs(buckets: list[Bucket], base_steps: list[BaseSteps]) -> list[list[tuple[int, int]]]:
    """The layers whose base step the kernels take, as ``(bucket, index in its BaseSteps)``, per device and dtype.

    The sharded step calls every bucket's kernels at once, so the layers of one device and dtype are called together,
    :data:`~lightning_layca.compiling.LAYERS_PER_CALL` per call across buckets.
    """
    runs: dict[tuple[torch.device, torch.dtype], list[tuple[int, int]]] = {}
    for k, (bucket, base) in enumerate(zip(buckets, base_steps, strict=True)):
        key = (bucket.near_floor.device, bucket.params[0].dtype)
        runs.setdefault(key, []).extend((k, i) for i in range(len(base.positions)))
    return [members for members in runs.values() if members]


def _base_sums(
    buckets: list[Bucket], base_steps: list[BaseSteps], optimizer: Optimizer, per_unit: bool
) -> list[dict[int, torch.Tensor]]:
    """The first halves of the kernels that take the base step, for every bucket at once: sums by position.

    They update the optimizer state. Layers they leave (their kernels could not be compiled for layers called
    together) are untouched: they take the base step now, from a snapshot, and the eager step (dropped from
    ``base_steps``).
    """
    found: list[dict[int, torch.Tensor]] = [{} for _ in buckets]
    for members in _runs(buckets, base_steps):
        first = buckets[members[0][0]]
        parallel = [base_steps[k].parallel[i] for k, i in members]
        variants = [base_steps[k].steps[i].variant for k, i in members]
        forms, threads = base_step_kernels(variants, parallel, sharded=True, per_unit=per_unit)
        device, dtype = first.near_floor.device, first.params[0].dtype
        if not compiled_step_ready(device, dtype, threads, per_unit, forms):
            continue
        sums = base_sums_compiled(
            [cast(torch.Tensor, buckets[k].views[base_steps[k].positions[i]]) for k, i in members],
            [base_steps[k].grads[i] for k, i in members],
            [base_steps[k].states[i] for k, i in members],
            [base_steps[k].hypers[i] for k, i in members],
            [buckets[k].norm_scalars[base_steps[k].positions[i]] for k, i in members],
            parallel,
            variants,
            per_unit=per_unit,
        )
        for (k, i), layer_sums in zip(members, sums, strict=False):
            j = base_steps[k].positions[i]
            base_steps[k].steps[i].commit(optimizer.state[buckets[k].params[j]])
            found[k][j] = layer_sums.T
    for bucket, base, sums_at in zip(buckets, base_steps, found, strict=True):
        # The layers of a bucket are called in order: those stepped are the first ones.
        missed = base.positions[len(sums_at) :]
        if missed:
            bucket.snapshot(missed)
            bucket.kept = sorted(set(bucket.kept) | set(missed))
            base_step_of(optimizer, [bucket.params[j] for j in missed])
            _drop_base_steps(base, len(sums_at))
    return found


def _local_sums(
    bucket: Bucket, base_sums: dict[int, torch.Tensor], compiled: list[int], per_unit: bool
) -> torch.Tensor:
    """The partial sums of this process's shards of the bucket's layers: ``(layers, 3)`` or ``(local units, 3)``.

    ``base_sums``: the sums the kernels that take the base step returned, by position (:func:`_base_sums`).
    """
    parts: list[torch.Tensor | None] = [base_sums.get(j) for j in range(len(bucket.params))]
    if compiled:
        norms = [bucket.norm_scalars[j] for j in compiled]
        found = sharded_sums_compiled(
            [cast(torch.Tensor, bucket.views[j]) for j in compiled],
            [cast(torch.Tensor, _kernel_view(bucket, bucket.previous[j])) for j in compiled],
            norms,
            [bucket.parallel[j] for j in compiled],
            per_unit=per_unit,
        )
        for j, sums in zip(compiled, found, strict=False):
            parts[j] = sums.T
    rest = [j for j, part in enumerate(parts) if part is None]
    if rest:
        local = bucket.local()
        eager_sums = step_sums([local[j] for j in rest], [bucket.previous[j] for j in rest], per_unit)
        counts = unit_counts([local[j] for j in rest]) if per_unit else [1] * len(rest)
        for j, sums in zip(rest, eager_sums.split(counts), strict=True):
            parts[j] = sums
    return torch.cat([cast(torch.Tensor, part) for part in parts])


def _drop_base_steps(base: BaseSteps, kept: int) -> None:
    """Keep the first ``kept`` layers of ``base`` only (the others take the base step and the eager step)."""
    base.positions, base.steps, base.grads = base.positions[:kept], base.steps[:kept], base.grads[:kept]
    base.states, base.hypers, base.parallel = base.states[:kept], base.hypers[:kept], base.parallel[:kept]
