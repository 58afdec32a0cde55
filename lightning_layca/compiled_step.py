"""The fused Layca step: per layer, one reduction pass and one update pass, compiled with ``torch.compile``.

For a layer with weights ``w`` before the wrapped optimizer's step and ``p = fl(w + D)`` after it, one compiled call

1. reads ``(p, w)`` once and accumulates, per row, ``a = <D, w>``, ``b = <w, w>`` and ``c = <D, D>`` in float64, with
   ``D = p - w`` formed in registers: products of float32 (or bfloat16, float16) numbers are exact in float64, so
   ``||D_perp||^2 = c - a^2 / b`` keeps float32 precision even for a mostly radial step (weight decay), without the
   explicit projection and re-orthogonalisation the eager step needs. The layer's sums are the sums of its rows;
   with ``granularity="unit"`` the rows are the units and their sums are used as they are;
2. turns the sums into ``k1, k2`` with :func:`lightning_layca.step.coefficients`, the rule every path shares
   (rounding floor, non-finite steps, rates without overflow);
3. reads ``(p, w)`` once more and writes ``p = k1 * w + k2 * D``, computed in float64 for float32 layers (in float32
   for bfloat16 and float16 ones) and rounded once to the layer's dtype. A layer (unit) that does not move
   (``k2 = 0``) ends exactly at ``w``: its step, NaN or not, is replaced by an exact zero.

With the snapshot taken before the base step, that is 7 tensor-sized memory passes, against about 19 for the eager
multi-tensor step.

Around ``torch.optim.SGD``, ``Adam`` and ``AdamW`` the kernel takes the base step too (:func:`_sgd_step`,
:func:`_adam_step`, :func:`rotate_base_compiled`; :mod:`lightning_layca.base_steps` says when): the first pass reads
the weights, the gradient and the optimizer's state (SGD's momentum buffer, Adam's moments), writes the new state and
accumulates the sums with the step ``D`` formed exactly in float64, the second reads them again and writes ``w``. No
snapshot is taken and ``fl(w + D)`` is never formed: 7 memory streams in all for SGD with momentum, against 5 for
SGD's own fused step (10 against 7 for Adam).

Inductor generates C++/OpenMP kernels on CPU (small layers take a single-threaded kernel, see
:data:`PARALLEL_MIN_ELEMENTS`) and Triton kernels on CUDA.

Compilation. One function serves every layer: it is compiled with dynamic shapes (a layer is seen as a dense
``rows x columns`` matrix, see :func:`kernel_view`), so one compilation per (device, dtype, kernel) covers every layer
of every model in the process, and Inductor's on-disk cache serves later processes. Rates, relative learning rates and
initial norms enter as device tensors, so LR schedulers and time-varying schedules never recompile. Compilation
happens at the first step that needs it, on a stand-in layer, so that a failure (no C++ compiler, an unsupported
platform) costs one warning and the eager step takes over before any weight is touched.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch

from lightning_layca.step import coefficients, unit_roundoff

__all__ = [
    "AUTO_COMPILE_AFTER_SECONDS",
    "AUTO_TRIAL_STEPS",
    "BASE_KERNELS",
    "IMPLEMENTATIONS",
    "AutoChoice",
    "Implementation",
    "compiled_step_ready",
    "kernel_view",
    "parallel_kernel",
    "rotate_base_compiled",
    "rotate_compiled",
    "scalars",
    "unit_view",
    "use_compiled_step",
]

Implementation = Literal["auto", "eager", "compiled"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "eager", "compiled")
"""Accepted values of ``Layca(implementation=...)``."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Layer dtypes the compiled step handles (float64 layers take the eager step, which accumulates in float64)."""

AUTO_DEVICE_TYPES = ("cpu",)
"""Devices where ``implementation="auto"`` may choose the compiled step: where it was measured faster (see
``benchmarks/README.md``). CUDA is not among them until it has been measured there."""

AUTO_COMPILE_AFTER_SECONDS = 10.0
"""``implementation="auto"`` compiles once the eager steps of an optimizer have taken this long in total (a
compilation takes a few seconds from Inductor's on-disk cache, 15 to 25 seconds without it, on a 2-core CPU). A fit
that would not have repaid the compilation never compiles, and one that does pays it at most once more than needed:
the classic rule for renting skis until their price has been spent on rent."""

AUTO_TRIAL_STEPS = 20
"""After compiling, ``implementation="auto"`` times this many compiled steps and goes back to the eager step for good
if they were not faster on average than the eager ones."""

PARALLEL_MIN_ELEMENTS = 2**18
"""On CPU, layers of at least this many elements take the kernel that runs on torch's intra-op threads, smaller ones a
single-threaded kernel: an OpenMP parallel region costs a wake-up and a few barriers per call, more than it saves on
a small layer, and far more on a CPU shared with other processes (a barrier then waits for a descheduled thread)."""

_WARMUP_SHAPE = (64, 576)
"""The stand-in layer compiled first: rows and columns differ (a square first shape would tie them together) and
exceed 1 (0 and 1 are specialised), and the sizes are those of a typical layer, which Inductor's heuristics see."""

_compiled_fns: dict[tuple[str, bool, bool], Callable[..., torch.Tensor]] = {}
_ready: dict[tuple[str, torch.dtype, bool, bool, str], bool] = {}


def _rotate_rows(
    params: torch.Tensor,
    exact: tuple[torch.Tensor, torch.Tensor],
    low: tuple[torch.Tensor, torch.Tensor],
    rate: torch.Tensor,
    relative_lr: torch.Tensor,
    initial_norms: torch.Tensor,
    near_floor: torch.Tensor,
) -> torch.Tensor:
    """The part every fused step shares: sums, the :func:`~lightning_layca.step.coefficients` rule, the update.

    Args:
        params: The layer's dense 2-D view; overwritten with ``k1 * w + k2 * D``.
        exact: ``(w, D)`` in float64: the sums' operands, and the update's for a float32 layer.
        low: ``(w, D)`` in float32: the update's operands for a bfloat16 or float16 layer (unused, and removed from
            the compiled code, for a float32 layer).
        rate: ``rho`` (0-dim float64).
        relative_lr: ``lr_g(t) / lr_ref`` (0-dim float64).
        initial_norms: ``n0``, 0-dim or one per row (see :func:`_fused_step`).
        near_floor: The layer's near-floor flag, or-ed in place.

    Returns:
        ``(a, b, c)``, float64, for the layer (shape ``(3, 1)``) or per unit (``(3, rows)``).
    """
    weights, step = exact
    row_sums = torch.stack([(step * weights).sum(1), (weights * weights).sum(1), (step * step).sum(1)])
    sums = row_sums.sum(1, keepdim=True) if initial_norms.dim() == 0 else row_sums
    radial, weight_sq, step_sq = sums.unbind(0)
    units = radial.shape[0]
    # A constant of the compiled code (one compilation per dtype anyway), not an argument converted at every call.
    roundoff = unit_roundoff(params.dtype)
    k1, k2, near = coefficients(
        radial,
        weight_sq,
        step_sq,
        step_sq,
        rate.expand(units),
        relative_lr.expand(units),
        initial_norms.reshape(units),
        roundoff,
    )
    # Stacked into one buffer (see `options` in _compiled): the update pass then loads two numbers per unit instead
    # of recomputing the coefficients' square roots and divisions for every vector of elements.
    k = torch.stack([k1, k2])
    # float32 layers: the update in float64, where k2 * D of a mostly radial step cancels against k1 * w without
    # losing float32 digits. bfloat16/float16 layers: float32 is that much more precise than the result (and the
    # conversions from float32 are the fast ones).
    if params.dtype != torch.float32:
        k, (weights, step) = k.float(), low
    k1, k2 = k[0].unsqueeze(1), k[1].unsqueeze(1)
    held = torch.where(k2 != 0, step, 0.0)  # a unit that does not move: its step may hold NaN or inf
    params.copy_(k1 * weights + k2 * held)
    near_floor.copy_(near_floor | near.any())
    return sums


def _fused_step(
    params: torch.Tensor,
    previous: torch.Tensor,
    rate: torch.Tensor,
    relative_lr: torch.Tensor,
    initial_norms: torch.Tensor,
    near_floor: torch.Tensor,
) -> torch.Tensor:
    """The Layca step of one layer seen as a matrix, after the wrapped optimizer's step (traced and compiled).

    Args:
        params: ``p = fl(w + D)``, a dense 2-D view of the layer; overwritten with ``k1 * w + k2 * D``.
        previous: ``w``, the same view of the snapshot.
        rate: ``rho`` (0-dim float64).
        relative_lr: ``lr_g(t) / lr_ref`` (0-dim float64).
        initial_norms: ``n0``: 0-dim for the layer (``granularity="layer"``), or one per row (``"unit"``; the rows are
            then the units), float64.
        near_floor: The layer's near-floor flag (0-dim bool), or-ed in place with this step's (any unit's).

    Returns:
        ``(a, b, c)``, float64, for the layer (shape ``(3, 1)``) or per unit (``(3, rows)``).
    """
    weights = previous.double()
    exact = weights, params.double() - weights
    low = previous.float(), params.float() - previous.float()
    return _rotate_rows(params, exact, low, rate, relative_lr, initial_norms, near_floor)


def _sgd_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor | None,
    hyper: torch.Tensor,
    rate: torch.Tensor,
    relative_lr: torch.Tensor,
    initial_norms: torch.Tensor,
    near_floor: torch.Tensor,
    nesterov: bool,
) -> torch.Tensor:
    """``torch.optim.SGD``'s step and the Layca step of one layer in one function (traced and compiled).

    The base step is never written to the weights: its direction ``D = -lr * v`` (``v`` the momentum buffer, or the
    Nesterov or plain direction) is formed in registers, exactly in float64, from the gradient, the weights and the
    buffer, so no snapshot of the weights is needed: the first pass reads ``(w, grad, buffer)`` and writes the new
    buffer, the second reads ``w`` and the new buffer (and ``grad`` again for Nesterov) and writes ``w``.

    Args:
        params: ``w``, a dense 2-D view of the layer; overwritten with ``k1 * w + k2 * D``.
        grad: The same view of its gradient.
        buffer: The same view of its momentum buffer, updated in place (``None`` for SGD without momentum).
        hyper: ``(lr, carried, 1 - dampening, weight_decay, sign, momentum)`` (float64): ``carried`` is the momentum
            applied to the buffer, 0 (with ``1 - dampening`` 1) on the step that creates it, as torch's SGD starts it;
            ``sign`` is -1 under ``maximize``; ``momentum`` is Nesterov's.
        rate: ``rho`` (0-dim float64).
        relative_lr: ``lr_g(t) / lr_ref`` (0-dim float64).
        initial_norms: ``n0``, 0-dim or one per row (see :func:`_fused_step`).
        near_floor: The layer's near-floor flag, or-ed in place.
        nesterov: Whether the direction is ``d + momentum * v`` rather than ``v``.

    Returns:
        ``(a, b, c)`` as :func:`_fused_step`.
    """
    lr, carried, dampened, weight_decay, sign, momentum = hyper.unbind()
    # In float32 (the precision of torch's own step for float32 layers; more than its own for lower precisions).
    weights32 = params.float()
    direction = grad.float() * sign + weights32 * weight_decay
    if buffer is not None:
        velocity = buffer.float() * carried + direction * dampened
        buffer.copy_(velocity)
        direction = direction + velocity * momentum if nesterov else velocity
    weights = params.double()
    exact = weights, direction.double() * -lr
    low = weights32, direction * -lr
    return _rotate_rows(params, exact, low, rate, relative_lr, initial_norms, near_floor)


def _adam_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    hyper: torch.Tensor,
    rate: torch.Tensor,
    relative_lr: torch.Tensor,
    initial_norms: torch.Tensor,
    near_floor: torch.Tensor,
) -> torch.Tensor:
    """``torch.optim.Adam``'s (or ``AdamW``'s) step and the Layca step of one layer in one function (compiled).

    As :func:`_sgd_step`: the moments are updated in place (in float32, as torch's own step), and the step
    ``D = -step_size * m / (sqrt(v) / sqrt(bc2) + eps) - lr * wd * w`` is formed exactly in float64, never written.

    Args:
        params: ``w``, a dense 2-D view of the layer; overwritten with ``k1 * w + k2 * D``.
        grad: The same view of its gradient.
        exp_avg: The same view of the first moment, updated in place.
        exp_avg_sq: The same view of the second moment, updated in place.
        max_exp_avg_sq: The same view of the largest second moment (``amsgrad``), updated in place, or ``None``.
        hyper: ``(lr * decoupled_wd, beta1, beta2, eps, coupled_wd, sign, lr / bc1, sqrt(bc2))`` (float64; ``bc1``,
            ``bc2`` the bias corrections of this step, ``sign`` -1 under ``maximize``).
        rate: ``rho`` (0-dim float64).
        relative_lr: ``lr_g(t) / lr_ref`` (0-dim float64).
        initial_norms: ``n0``, 0-dim or one per row (see :func:`_fused_step`).
        near_floor: The layer's near-floor flag, or-ed in place.

    Returns:
        ``(a, b, c)`` as :func:`_fused_step`.
    """
    decay, beta1, beta2, eps, coupled_decay, sign, step_size, correction2 = hyper.unbind()
    weights32 = params.float()
    gradient = grad.float() * sign + weights32 * coupled_decay
    first = exp_avg.float()
    first = first + (gradient - first) * (1 - beta1)
    second = exp_avg_sq.float() * beta2 + gradient * gradient * (1 - beta2)
    exp_avg.copy_(first)
    exp_avg_sq.copy_(second)
    if max_exp_avg_sq is not None:
        second = torch.maximum(max_exp_avg_sq.float(), second)
        max_exp_avg_sq.copy_(second)
    direction = first / (second.sqrt() / correction2 + eps)
    weights = params.double()
    exact = weights, direction.double() * -step_size - weights * decay
    low = weights32, direction * -step_size - weights32 * decay
    return _rotate_rows(params, exact, low, rate, relative_lr, initial_norms, near_floor)


# The kernels that take a base optimizer's step, one per form of it, all called as
# ``kernel(params, grad, *state, hyper, rate, relative_lr, initial_norms, near_floor)``.
T = torch.Tensor


def _sgd(p: T, g: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _sgd_step(p, g, None, h, rate, lr, n0, flag, nesterov=False)


def _sgd_momentum(p: T, g: T, b: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _sgd_step(p, g, b, h, rate, lr, n0, flag, nesterov=False)


def _sgd_nesterov(p: T, g: T, b: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _sgd_step(p, g, b, h, rate, lr, n0, flag, nesterov=True)


def _adam(p: T, g: T, m: T, v: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _adam_step(p, g, m, v, None, h, rate, lr, n0, flag)


def _adam_amsgrad(p: T, g: T, m: T, v: T, vmax: T, h: T, rate: T, lr: T, n0: T, flag: T) -> T:
    return _adam_step(p, g, m, v, vmax, h, rate, lr, n0, flag)


BASE_KERNELS: dict[str, tuple[Callable[..., torch.Tensor], int, tuple[float, ...]]] = {
    "sgd": (_sgd, 0, (0.1, 0.0, 1.0, 1e-4, 1.0, 0.0)),
    "sgd_momentum": (_sgd_momentum, 1, (0.1, 0.9, 1.0, 1e-4, 1.0, 0.9)),
    "sgd_nesterov": (_sgd_nesterov, 1, (0.1, 0.9, 1.0, 1e-4, 1.0, 0.9)),
    "adam": (_adam, 2, (1e-5, 0.9, 0.999, 1e-8, 0.0, 1.0, 1e-2, 0.03)),
    "adam_amsgrad": (_adam_amsgrad, 3, (1e-5, 0.9, 0.999, 1e-8, 0.0, 1.0, 1e-2, 0.03)),
}
"""Per form of a base step the kernel takes (:mod:`lightning_layca.base_steps` says which applies): the function,
the number of state tensors it updates, and stand-in values of ``hyper`` for its first compilation."""


def _distinct(function: Callable[..., torch.Tensor], name: str) -> Callable[..., torch.Tensor]:
    """A copy of ``function`` with a code object of its own.

    Dynamo keeps the compilations of a function with its code object (and limits their number), so every kernel
    (single-threaded or not, per unit or not) compiles from a copy of its own.
    """
    code = function.__code__.replace(co_name=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


SNAPSHOT = "snapshot"
"""The kernel that works after the base optimizer's step, from a snapshot (:func:`_fused_step`)."""

# A kernel per (variant, threads, granularity): a function of its own for each, so that the dtypes and devices a
# process uses stay well within Dynamo's limit of compilations per function.
_FUNCTIONS: dict[tuple[str, bool, bool], Callable[..., torch.Tensor]] = {
    (variant, parallel, per_unit): _distinct(
        function, f"_{variant}_{'parallel' if parallel else 'serial'}_{'unit' if per_unit else 'layer'}_step"
    )
    for variant, function in ((SNAPSHOT, _fused_step), *((v, f) for v, (f, _, _) in BASE_KERNELS.items()))
    for parallel in (True, False)
    for per_unit in (True, False)
}


_BASE_STEP_OPTIONS = {"realize_reads_threshold": 100}
"""Inductor options of the kernels that take the base step: Inductor stores an intermediate read more than 4 times
(its default) in a buffer of its own. There that is the float64 step ``D``, written and read back twice (16 bytes per
element and pass), where recomputing it from the float32 inputs is cheaper: measured on ResNet-18 shapes, 2 threads,
the AdamW kernel took 25.9 ms instead of 40.2 ms, the SGD one 17.4 instead of 22.4 (the kernel after the base step
showed no difference, and keeps the default)."""


def _compiled(parallel: bool, per_unit: bool = False, variant: str = SNAPSHOT) -> Callable[..., torch.Tensor]:
    key = (variant, parallel, per_unit)
    if key not in _compiled_fns:
        # A concatenation of scalars is otherwise inlined into its consumer, here the elementwise update.
        options: dict[str, str | int | bool | Callable[..., Any]] = {"max_pointwise_cat_inputs": 0}
        if not parallel:
            options["cpp.threads"] = 1
        if variant != SNAPSHOT:
            options.update(_BASE_STEP_OPTIONS)
        _compiled_fns[key] = torch.compile(_FUNCTIONS[key], dynamic=True, fullgraph=True, options=options)
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
        (:data:`AUTO_DEVICE_TYPES`; :class:`AutoChoice` then decides when). Whether compilation works is decided
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


class AutoChoice:
    """When ``implementation="auto"`` takes the compiled step: eager first, compiled once it pays, kept if faster.

    Compiling costs seconds once per process, and saves a fraction of every step: worth it for a long fit, not for a
    short one, and nobody knows in advance how long a fit is. So the eager step runs first while its time is added up;
    once it reaches :data:`AUTO_COMPILE_AFTER_SECONDS` the compiled step takes over, and after
    :data:`AUTO_TRIAL_STEPS` compiled steps (the compiling one not counted) it stays only if its mean time beats the
    eager one's. Times are host wall-clock times, measured on CPU only (where a kernel has finished when its call
    returns): of the whole step, the base optimizer's included, around torch's optimizers (whose closure Layca
    evaluates first, so that the forward and backward passes are not counted; the compiled step may take the base
    step itself), of the Layca part of the step around other optimizers.

    Example:
        >>> choice = AutoChoice()
        >>> choice.record(AUTO_COMPILE_AFTER_SECONDS / 2), choice.compiled
        (False, False)
        >>> choice.record(AUTO_COMPILE_AFTER_SECONDS / 2), choice.compiled  # changed: the step is compiled from now on
        (True, True)
    """

    def __init__(self) -> None:
        self.phase: Literal["eager", "trial", "compiled", "eager for good"] = "eager"
        self.eager_seconds = 0.0
        self.eager_steps = 0
        self.trial_seconds = 0.0
        self.trial_steps = -1  # the first compiled step compiles: not counted

    @property
    def compiled(self) -> bool:
        """Whether the compiled step is to be taken now."""
        return self.phase in ("trial", "compiled")

    @property
    def measuring(self) -> bool:
        """Whether :meth:`record` still needs the time of each step."""
        return self.phase in ("eager", "trial")

    def record(self, seconds: float) -> bool:
        """Add the time of one step; return whether the choice changed (the groups must be rebuilt)."""
        if self.phase == "eager":
            self.eager_seconds += seconds
            self.eager_steps += 1
            if self.eager_seconds >= AUTO_COMPILE_AFTER_SECONDS:
                self.phase = "trial"
                return True
        elif self.phase == "trial":
            self.trial_steps += 1
            if self.trial_steps > 0:
                self.trial_seconds += seconds
            if self.trial_steps == AUTO_TRIAL_STEPS:
                faster = self.trial_seconds / AUTO_TRIAL_STEPS < self.eager_seconds / self.eager_steps
                self.phase = "compiled" if faster else "eager for good"
                return not faster
        return False


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
    kernels = sorted(set(zip(parallel, forms, strict=True)))
    return all(_ready_one(device, dtype, kind, per_unit, variant) for kind, variant in kernels)


def _ready_one(device: torch.device, dtype: torch.dtype, parallel: bool, per_unit: bool, variant: str) -> bool:
    if any(not ok for (device_type, kind, *_), ok in _ready.items() if (device_type, kind) == (device.type, dtype)):
        return False  # one warning per (device, dtype), and never a half-compiled group
    key = (device.type, dtype, parallel, per_unit, variant)
    if key not in _ready:
        try:
            # What torch says while it compiles (deprecations of its own internals) is not the user's to act on, and
            # under `-W error` it would abort the compilation. Floats of the rule (the floor factors) are constants
            # of the compiled code, not inputs converted to tensors at every call.
            with torch.no_grad(), warnings.catch_warnings(), torch._dynamo.config.patch(specialize_float=True):
                warnings.simplefilter("ignore")
                # Deterministic stand-in values: the global random state is the user's.
                grid = torch.arange(_WARMUP_SHAPE[0] * _WARMUP_SHAPE[1], device=device).view(_WARMUP_SHAPE)
                weights = grid.sin().to(dtype)
                params = (grid.sin() + 0.01 * grid.cos()).to(dtype)
                rate, relative_lr = scalars(torch.ones(2, dtype=torch.float64, device=device))
                norms = torch.ones(_WARMUP_SHAPE[0] if per_unit else (), dtype=torch.float64, device=device)
                (flag,) = scalars(torch.zeros(1, dtype=torch.bool, device=device))
                if variant == SNAPSHOT:
                    _compiled(parallel, per_unit)(params, weights, rate, relative_lr, norms, flag)
                else:
                    _, states, values = BASE_KERNELS[variant]
                    hyper = torch.tensor(values, dtype=torch.float64, device=device)
                    state = [(grid.cos() + k).abs().to(dtype) for k in range(states)]
                    _compiled(parallel, per_unit, variant)(
                        params, weights, *state, hyper, rate, relative_lr, norms, flag
                    )
            _ready[key] = True
        except Exception as error:  # any failure to compile means: use the eager step
            _give_up(device, dtype, parallel, per_unit, variant, error)
    return _ready[key]


def _give_up(
    device: torch.device, dtype: torch.dtype, parallel: bool, per_unit: bool, variant: str, error: Exception
) -> None:
    _ready[(device.type, dtype, parallel, per_unit, variant)] = False
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    warnings.warn(
        f"Layca: the compiled step is not available for {dtype} layers on {device.type} "
        f"({type(error).__name__}: {reason[:300]}); using the eager step. Pass implementation='eager' to skip the "
        "attempt.",
        stacklevel=5,
    )


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
    rates: Sequence[torch.Tensor],
    relative_lrs: Sequence[torch.Tensor],
    initial_norms: Sequence[torch.Tensor],
    near_floor: Sequence[torch.Tensor],
    parallel: Sequence[bool],
    per_unit: bool = False,
) -> int:
    """Turn the base step of layers of one device and dtype into a Layca step, in place, one compiled call per layer.

    Needs :func:`compiled_step_ready` to have returned ``True`` for the layers' device, dtype and kernels. Should a
    later compilation fail (a recompilation after ``torch._dynamo.reset()`` or a change of the number of threads),
    the layers from the failing one on are left to the caller, after one warning.

    Args:
        params: :func:`kernel_view` of each layer (detached), holding ``w + D``.
        previous: The same views of the weights before the base step.
        rates: ``rho`` per layer, 0-dim float64 tensors on the layers' device.
        relative_lrs: ``lr_g(t) / lr_ref`` per layer, likewise.
        initial_norms: ``n0`` per layer, likewise; with ``per_unit``, each layer's 1-D tensor of norms per unit.
        near_floor: Each layer's near-floor flag (0-dim bool), or-ed in place.
        parallel: :func:`parallel_kernel` of each layer.
        per_unit: Whether every unit (row of :func:`unit_view`) turns by itself (``granularity="unit"``).

    Returns:
        The number of layers stepped (all of them unless a compilation failed).
    """
    calls = zip(params, previous, rates, relative_lrs, initial_norms, near_floor, strict=True)
    return _call_kernels(zip(parallel, [SNAPSHOT] * len(parallel), calls, strict=True), per_unit)


def rotate_base_compiled(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[torch.Tensor]],
    hypers: Sequence[torch.Tensor],
    rates: Sequence[torch.Tensor],
    relative_lrs: Sequence[torch.Tensor],
    initial_norms: Sequence[torch.Tensor],
    near_floor: Sequence[torch.Tensor],
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
        hypers: Per layer, the kernel's hyperparameters (see :func:`_sgd_step`, :func:`_adam_step`).
        rates: ``rho`` per layer, 0-dim float64 tensors on the layers' device.
        relative_lrs: ``lr_g(t) / lr_ref`` per layer, likewise.
        initial_norms: ``n0`` per layer (per unit with ``per_unit``), as in :func:`rotate_compiled`.
        near_floor: Each layer's near-floor flag (0-dim bool), or-ed in place.
        parallel: :func:`parallel_kernel` of each layer.
        variants: Per layer, the form of the base step (a key of :data:`BASE_KERNELS`).
        per_unit: Whether every unit turns by itself (``granularity="unit"``).

    Returns:
        The number of layers stepped.
    """
    calls = (
        (p, g, *state, hyper, rate, lr, norms, flag)
        for p, g, state, hyper, rate, lr, norms, flag in zip(
            params, grads, states, hypers, rates, relative_lrs, initial_norms, near_floor, strict=True
        )
    )
    return _call_kernels(zip(parallel, variants, calls, strict=True), per_unit)


def _call_kernels(calls: Iterable[tuple[bool, str, Sequence[torch.Tensor]]], per_unit: bool) -> int:
    """Call the compiled kernel of each ``(parallel, variant, arguments)`` in turn, the layer's view first.

    A kernel whose compilation fails (a recompilation after ``torch._dynamo.reset()`` or a change of the number of
    threads) raises before it runs: its layer is untouched, one warning is given and the layers from it on are left
    to the caller.

    Returns:
        The number of layers stepped.
    """
    done = 0
    for parallel, variant, args in calls:
        try:
            _compiled(parallel, per_unit, variant)(*args)
        except Exception as error:  # a failed compilation before the kernel ran: the layer is untouched
            _give_up(args[0].device, args[0].dtype, parallel, per_unit, variant, error)
            break
        done += 1
    return done
