"""SGD's compiled step per layer in one call or two halves: the form a trial keeps, kept by the optimizer.

The two forms differ in speed by CPU (``benchmarks/README.md``) and in the last bits of some steps (their sums are
added in another order), so the optimizer measures once, keeps its choice in its state dict, and a resumed run takes
it again. That the processes of a run of several take the halves, unmeasured, is tested in ``tests/test_ddp.py``; the
float64 update of a mostly radial step in either form, in ``tests/test_layca_reference.py``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lightning_layca as ll
from lightning_layca import compiling
from lightning_layca.step import sgd_form
from lightning_layca.step.base_kernels import BASE_KERNELS
from lightning_layca.step.sgd_form import FORMS, ONE_CALL_MARGIN, SgdForms, keeps_halves
from tests.implementations import fail_compiling, forget_sgd_measurements, record_compilations

ONE_CALL, HALVES = {"sgd_nesterov"}, {"sgd_nesterov_sums", "sgd_nesterov_update_single"}
"""The kernels SGD's layers (Nesterov momentum) call in each form."""


def make(implementation: str = "compiled") -> tuple[nn.Module, ll.Layca]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    wrapped = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return model, ll.Layca(wrapped, model.named_parameters(), rotation_rate=0.05, implementation=implementation)


def train(model: nn.Module, opt: ll.Layca, seeds: range) -> None:
    for seed in seeds:
        opt.zero_grad()
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        opt.step()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


def test_the_trial_is_won_by_the_median_of_its_pairs_not_by_their_total() -> None:
    # (one call, halves) seconds per pair of turns. A load that comes and goes slows a few turns by far: here one call
    # is faster in 4 of 7 pairs while three of its turns took five times as long (their total says the halves).
    assert keeps_halves([(1.0, 1.2)] * 4 + [(6.0, 1.0)] * 3) is False
    assert keeps_halves([(1.2, 1.0)] * 4 + [(1.0, 6.0)] * 3) is True
    assert keeps_halves([(1.0, 1.0)]) is True  # a tie: the halves
    assert keeps_halves([]) is True  # no turns (a form did not compile): the halves


def test_one_call_is_kept_only_when_the_trial_measures_it_faster_by_the_margin() -> None:
    # The form is kept for good and the stand-ins can favour one call by more than the step does (on a Zen 4 EPYC
    # they measured a tie where the step took 5 to 18 % longer in one call): one call must win by ONE_CALL_MARGIN.
    assert ONE_CALL_MARGIN == 0.9
    assert keeps_halves([(0.89, 1.0)] * 7) is False  # 11 % faster: one call
    assert keeps_halves([(0.9, 1.0)] * 7) is False  # at the margin: one call
    assert keeps_halves([(0.91, 1.0)] * 7) is True  # 9 % faster: not enough, the halves
    assert keeps_halves([(0.95, 1.0)] * 4 + [(0.5, 1.0)] * 3) is True  # the median pair decides, not the best ones


@pytest.mark.parametrize("form", FORMS)
def test_the_layers_take_the_kept_form_and_end_where_the_eager_step_puts_them(
    monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    _, called = record_compilations(monkeypatch)
    model, opt = make()
    opt.plan.sgd_forms.load({"cpu/float32": form})
    reference, eager = make("eager")
    train(model, opt, range(3))
    train(reference, eager, range(3))
    assert set(opt.describe().values()) == {"compiled+base"}
    assert {name for name, _ in called} == (HALVES if form == "halves" else ONE_CALL)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert relative_error(p.detach(), q.detach()) < 2e-5  # float32 rounding, in another order
        assert relative_error(opt.state[p]["momentum_buffer"], eager.state[q]["momentum_buffer"]) < 2e-5


def test_both_forms_keep_the_same_momentum_buffers_bit_for_bit() -> None:
    # The state is formed element by element, the same way in both forms; only the sums are added in another order.
    ends = []
    for form in FORMS:
        model, opt = make()
        opt.plan.sgd_forms.load({"cpu/float32": form})
        train(model, opt, range(3))
        ends.append([opt.state[p]["momentum_buffer"] for p in model.parameters()])
    for with_halves, in_one_call in zip(*ends, strict=True):
        assert torch.equal(with_halves, in_one_call)


def test_the_form_is_measured_once_kept_in_the_state_dict_and_taken_again_on_resume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    measured: list[tuple[str, torch.dtype]] = []

    def one_call_measured(device: torch.device, dtype: torch.dtype) -> bool:
        measured.append((device.type, dtype))
        return False

    monkeypatch.setattr(sgd_form, "measured_halves", one_call_measured)
    model, opt = make()
    assert opt.state_dict()["layca"]["sgd_forms"] == {}  # nothing chosen before the first compiled step
    train(model, opt, range(3))
    assert measured == [("cpu", torch.float32)]  # at the first step, once
    state = copy.deepcopy(opt.state_dict())  # a checkpoint's copy: torch's optimizers load tensors as given
    assert state["layca"]["sgd_forms"] == {"cpu/float32": "one call"}

    # A resumed run on a machine that measures the halves faster keeps the interrupted run's form.
    monkeypatch.setattr(sgd_form, "measured_halves", lambda device, dtype: measured.append(("resumed", dtype)) or True)
    _, called = record_compilations(monkeypatch)
    resumed_model, resumed = make()
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(state)
    train(resumed_model, resumed, range(3, 5))
    assert {name for name, _ in called} == ONE_CALL
    assert measured == [("cpu", torch.float32)]  # not measured again
    train(model, opt, range(3, 5))  # the uninterrupted run
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)

    # A run that starts afresh there measures, and takes the halves.
    _, called = record_compilations(monkeypatch)
    fresh_model, fresh = make()
    train(fresh_model, fresh, range(2))
    assert {name for name, _ in called} == HALVES
    assert fresh.layca_state()["sgd_forms"] == {"cpu/float32": "halves"}


def test_a_one_call_kernel_that_fails_to_compile_leaves_the_layers_compiled_in_halves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The trial compiles both forms; one call is the optional one. Should it fail to compile, the layers take the
    # halves, compiled, without a warning: the failure does not make the dtype's other kernels unavailable.
    forget_sgd_measurements(monkeypatch)
    fail_compiling(monkeypatch, "no compiler for one call", lambda name: name in BASE_KERNELS, forget_ready=True)
    readied, called = record_compilations(monkeypatch)
    model, opt = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, range(2))
    assert [str(w.message) for w in caught if "Layca" in str(w.message)] == []
    assert set(opt.describe().values()) == {"compiled+base"}
    assert opt.layca_state()["sgd_forms"] == {"cpu/float32": "halves"}
    assert ("sgd_momentum", 1) in readied  # the trial asked for one call (SGD with momentum, one layer per call)
    assert {name for name, _ in called} == HALVES


def test_a_kernel_that_failed_as_optional_fails_as_any_other_when_asked_for_again_without(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Optional: that kernel alone unavailable, silently. Asked for again by a path that needs it (a checkpoint's
    # "one call"), its failure is given up as any other: one warning, every kernel of the dtype unavailable.
    cpu, one_call, sums_half = torch.device("cpu"), [(False, "sgd_momentum")], [(False, "sgd_momentum_sums")]
    fail_compiling(monkeypatch, "no compiler for one call", lambda name: name in BASE_KERNELS, forget_ready=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compiling.kernels_ready(cpu, torch.float32, one_call, optional=True) is False
        assert compiling.kernels_ready(cpu, torch.float32, one_call, optional=True) is False
        assert caught == []
        assert compiling.kernels_ready(cpu, torch.float32, sums_half) is True  # the rest of the dtype compiles
        assert compiling.kernels_ready(cpu, torch.float32, one_call) is False
    assert [str(w.message) for w in caught] == [
        "Layca: the compiled step is not available for torch.float32 layers on cpu (RuntimeError: no compiler for "
        "one call); using the eager step. Pass implementation='eager' to skip the attempt."
    ]
    assert compiling.kernels_ready(cpu, torch.float32, sums_half) is False


def test_a_state_dict_without_forms_loads_and_its_run_measures_at_its_next_compiled_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Checkpoints written before the forms were kept, or with the eager implementation, have no form.
    monkeypatch.setattr(sgd_form, "measured_halves", lambda device, dtype: False)
    model, eager = make("eager")
    train(model, eager, range(2))
    state = copy.deepcopy(eager.state_dict())
    assert state["layca"]["sgd_forms"] == {}
    del state["layca"]["sgd_forms"]
    compiled_model, compiled = make()
    compiled_model.load_state_dict(model.state_dict())
    compiled.load_state_dict(state)
    train(compiled_model, compiled, range(2, 3))
    assert compiled.layca_state()["sgd_forms"] == {"cpu/float32": "one call"}


def test_an_unknown_form_in_a_state_is_refused_with_its_name() -> None:
    forms = SgdForms()
    with pytest.raises(ValueError, match=r"'thirds' for 'cpu/float32' is not one of \('halves', 'one call'\)"):
        forms.load({"cpu/float32": "thirds"})
    assert forms.state() == {}


def test_the_trial_runs_on_this_machine_once_per_process_and_names_a_form() -> None:
    # The real trial: both forms compiled and timed on stand-in layers; which one wins depends on the CPU.
    cpu = torch.device("cpu")
    first = SgdForms()
    halves = first.in_halves(cpu, torch.float32)
    assert first.state() == {"cpu/float32": "halves" if halves else "one call"}
    assert sgd_form.measured_halves(cpu, torch.float32) is halves  # the process's answer, kept
    assert SgdForms().in_halves(cpu, torch.float32) is halves
    assert SgdForms().in_halves(torch.device("meta"), torch.float32) is True  # no trial off the CPU: the halves
    assert SgdForms().in_halves(cpu, torch.bfloat16) is True  # nor for low precision, where the forms' steps differ


def test_an_unknown_form_leaves_the_optimizer_as_it_was() -> None:
    model, opt = make()
    train(model, opt, range(1))
    state = copy.deepcopy(opt.layca_state())
    other = {**state, "step_count": 7, "sgd_forms": {"cpu/float32": "thirds"}}
    with pytest.raises(ValueError, match="thirds"):
        opt.load_layca_state(other)
    assert opt.layca_state() == state
