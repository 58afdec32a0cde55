"""SGD's compiled step per layer in one call or in two halves: the form a trial on the machine keeps, for good.

Around ``torch.optim.SGD`` a layer's compiled step (:mod:`lightning_layca.step.base_compiled`) has two forms. The
two halves read one tensor fewer per element (5 against 6 for SGD with momentum), but their sums loop reads each
tensor as one run of memory, where the one-call kernel reads a layer's four runs side by side; which is faster depends
on the CPU. Measured on ResNet-18 shapes, the halves took 14 % less time on an AMD EPYC (Zen 5), 4 to 15 % less on
another (Zen 4), and 16 % more on an Intel Xeon (``benchmarks/README.md``).

So the first time an optimizer's SGD layers of a (device, dtype) take the compiled step, a *trial* on CPU times the
two forms (:func:`measured_halves`, once per (dtype, number of threads) in the process) and the optimizer keeps one
call if it was measured faster by a margin (:func:`keeps_halves`), else the halves, for those layers from then on
(:class:`SgdForms`). The two forms do not take the same steps bit for bit
(the sums are added in another order; where the update is formed in float64, a mostly radial step, a weight can
differ in its last bit), so the choice is made so that it never changes the arithmetic where that must not change:

* **Kept by the optimizer**: in its state dict (``layca_state()["sgd_forms"]``), so a resumed run takes the form the
  interrupted one took, whatever the machine it resumes on measures.
* **No choice in a run of several processes**: there the halves, unmeasured, as ``implementation="auto"`` takes the
  eager step there (:func:`~lightning_layca.distributed.several_processes`): each process would measure its own
  form, and DDP's replicas would no longer be bit-identical. Agreeing on rank 0's measurement would take a collective
  in the step, which issues none.

On CUDA (not measured yet) the halves, without a trial; likewise where a form fails to compile, and for bfloat16 and
float16 layers: there the forms take different steps, not only in a last bit (one call forms the step from the
momentum before it is rounded to the buffer's dtype, the halves from the buffer as stored, as torch's SGD does).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from lightning_layca.compiling import call_kernels, kernels_ready, parallel_kernel, scalars
from lightning_layca.distributed import several_processes
from lightning_layca.step.base_compiled import base_sums_compiled, base_update_compiled
from lightning_layca.step.base_kernels import BASE_KERNELS, base_halves
from lightning_layca.step.compiled import LayerScalars, in_single_precision
from lightning_layca.sums import LANES

__all__ = [
    "FORMS",
    "FORM_TRIAL_ELEMENTS",
    "FORM_TRIAL_PAIRS",
    "ONE_CALL_MARGIN",
    "SgdForms",
    "keeps_halves",
    "measured_halves",
]

FORMS = ("halves", "one call")
"""The names of the two forms, as :meth:`SgdForms.state` writes them."""

FORM_TRIAL_ELEMENTS = 2**20
"""Elements of each stand-in layer of the trial (4 MiB per float32 tensor), in :data:`_TRIAL_COPIES` copies taken in
turn, so that every call reads its tensors from memory beyond the caches of a core, as an optimizer's step does."""

FORM_TRIAL_PAIRS = 7
"""Turns of each form in the trial: the median of the ratios of neighbouring turns decides."""

ONE_CALL_MARGIN = 0.9
"""One call is kept only when the median of its turns' ratios to the halves' is at most this (10 % faster). The form
is kept for the whole run, the halves are the form of every run the trial does not measure, and the stand-ins can
favour one call by more than the step does: on an AMD EPYC (Zen 4) they measured ratios of 0.86 to 1.14 (one call over
the halves, repeated trials) where the step took 5 to 18 % longer in one call; on an Intel Xeon, 0.77 and 0.84 (1 and
2 threads) where it took 5 to 19 % less (``benchmarks/README.md``)."""

_TRIAL_COPIES = 4

_measured: dict[tuple[str, torch.dtype, int], bool] = {}
"""The trial's answer per (device type, dtype, intra-op threads), measured once per process."""


class SgdForms:
    """The form an optimizer's SGD layers take per (device type, dtype): chosen at their first compiled step, then kept.

    Example:
        >>> forms = SgdForms()
        >>> forms.load({"cpu/float32": "one call"})  # as a resumed run restores it
        >>> forms.in_halves(torch.device("cpu"), torch.float32), forms.state()
        (False, {'cpu/float32': 'one call'})
    """

    def __init__(self) -> None:
        self._halves: dict[str, bool] = {}

    def in_halves(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether SGD's layers of ``(device, dtype)`` take the two halves; the first call per key decides.

        For float32 layers on CPU in a single process the decision is :func:`measured_halves`'; elsewhere, and in a
        run of several processes, the halves.
        """
        key = _key(device, dtype)
        if key not in self._halves:
            measured = device.type == "cpu" and dtype == torch.float32 and not several_processes()
            self._halves[key] = measured_halves(device, dtype) if measured else True
        return self._halves[key]

    def state(self) -> dict[str, str]:
        """The forms taken so far, as ``{"<device type>/<dtype>": "halves" | "one call"}``."""
        return {key: FORMS[0] if halves else FORMS[1] for key, halves in self._halves.items()}

    def load(self, state: Mapping[str, str]) -> None:
        """Take the forms of :meth:`state` (a resumed run's); forms of other keys stay as they are.

        Raises:
            ValueError: When a form is not one of :data:`FORMS`.
        """
        self.check(state)
        self._halves.update({key: form == FORMS[0] for key, form in state.items()})

    @staticmethod
    def check(state: Mapping[str, str]) -> None:
        """Raise a ``ValueError`` naming the first form of ``state`` that is not one of :data:`FORMS`."""
        for key, form in state.items():
            if form not in FORMS:
                raise ValueError(f"Layca: the state's SGD form {form!r} for {key!r} is not one of {FORMS}.")


def _key(device: torch.device, dtype: torch.dtype) -> str:
    return f"{device.type}/{str(dtype).removeprefix('torch.')}"


def measured_halves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the trial keeps the two halves rather than one call for SGD's layers of ``(device, dtype)`` here.

    The first call per (device type, dtype, number of threads) in the process compiles both forms (for one layer) and
    times them on stand-in layers of :data:`FORM_TRIAL_ELEMENTS` elements, in :data:`FORM_TRIAL_PAIRS` alternating
    turns (a fraction of a second once compiled); the median of the ratios of neighbouring turns decides
    (:func:`keeps_halves`: one call only when faster by :data:`ONE_CALL_MARGIN`), as the rule
    of ``implementation="auto"`` does, so that a load that comes and goes does not. The trial times SGD with momentum
    on layers large enough for the kernels' threads; its answer stands for SGD's other forms and for small layers too.
    The halves where either form fails to compile (the halves' failure makes every compiled kernel of the dtype
    unavailable, and the step's readiness check warns; one call's failure goes unsaid, and the layers keep the halves,
    compiled). That answer is not kept with the measurements: the kernels' failures are, by
    :mod:`lightning_layca.compiling`, so a later call finds them at once, before allocating anything.
    """
    key = (device.type, dtype, torch.get_num_threads())
    if key not in _measured:
        turns = _time_forms(device, dtype)
        if not turns:
            return True
        _measured[key] = keeps_halves(turns)
    return _measured[key]


def keeps_halves(turns: Sequence[tuple[float, float]]) -> bool:
    """The trial's rule: whether the halves are kept, given per pair of turns the seconds of ``(one call, halves)``.

    The median of the pairs' ratios decides, not their total: a load that slows a few turns cannot. One call when
    that median is at most :data:`ONE_CALL_MARGIN`; the halves otherwise, and when there are no turns (a form did not
    compile).

    Example:
        >>> keeps_halves([(1.0, 1.2)] * 4 + [(6.0, 1.0)] * 3)  # one call faster by 17 % in 4 of 7 pairs
        False
        >>> keeps_halves([(0.95, 1.0)] * 7)  # 5 % faster only
        True
    """
    ratios = [one / halves for one, halves in turns]
    return not ratios or statistics.median(ratios) > ONE_CALL_MARGIN


def _time_forms(device: torch.device, dtype: torch.dtype) -> list[tuple[float, float]]:
    """Per turn, the seconds one call and the two halves of SGD's momentum form took on the stand-in layers.

    Empty when either form does not compile here, or fails to run (nothing is timed then).
    """
    variant = "sgd_momentum"
    sums_half, update_half = base_halves(variant)
    parallel = parallel_kernel(torch.empty(FORM_TRIAL_ELEMENTS, device="meta"))
    # The halves first, the form the layers take without a trial: their failure makes the compiled kernels of the
    # dtype unavailable (lightning_layca.compiling), and the step's readiness check then warns. One call is optional:
    # should it fail, the layers keep the halves, compiled. Both answers are cached there, before anything is allocated.
    halves_ready = kernels_ready(device, dtype, [(parallel, sums_half), (parallel, in_single_precision(update_half))])
    if not halves_ready or not kernels_ready(device, dtype, [(parallel, variant)], optional=True):
        return []
    generator = torch.Generator().manual_seed(0)
    layers = [
        [torch.randn((LANES, FORM_TRIAL_ELEMENTS // LANES), generator=generator).to(device, dtype) for _ in range(3)]
        for _ in range(_TRIAL_COPIES)
    ]
    hyper = torch.tensor(BASE_KERNELS[variant][2], dtype=torch.float64, device=device)
    rate, relative_lr = scalars(torch.tensor([0.03, 1.0], dtype=torch.float64, device=device))
    flag = torch.zeros((), dtype=torch.bool, device=device)
    norms = [torch.linalg.vector_norm(w, dtype=torch.float64) for w, _, _ in layers]
    layer_scalars = [LayerScalars(rate, relative_lr, n0, flag) for n0 in norms]

    def one_call(k: int) -> None:
        w, g, b = layers[k]
        if call_kernels([(parallel, variant, (w, g, b, hyper, *layer_scalars[k]))], per_unit=False) != 1:
            raise _TrialFailed  # a compilation failed at the call (it warned): nothing to time

    def halves(k: int) -> None:
        w, g, b = layers[k]
        sums = base_sums_compiled([w], [g], [[b]], [hyper], [layer_scalars[k].initial_norms], [parallel], [variant])
        if not sums:
            raise _TrialFailed
        base_update_compiled([w], [g], [[b]], [hyper], sums, [layer_scalars[k]], [parallel], [variant])

    def turn(form: Callable[[int], None]) -> float:
        start = time.perf_counter()
        for k in range(_TRIAL_COPIES):
            form(k)
        return time.perf_counter() - start

    try:
        with torch.no_grad():
            turn(one_call), turn(halves)  # first calls (the kernels' code loaded, the pages touched)
            return [(turn(one_call), turn(halves)) for _ in range(FORM_TRIAL_PAIRS)]
    except _TrialFailed:
        return []


class _TrialFailed(Exception):
    """A kernel of the trial failed to compile when called: the trial stops, untimed."""
