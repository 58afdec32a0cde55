"""The compiled kernel that takes the step of ``torch.optim.SGD``, ``Adam`` or ``AdamW`` itself: same steps and same
optimizer state as the eager path, biases stepped by the optimizer untouched, gradients given back, the closure called
once, no snapshot kept unless asked, and a fallback for what it cannot read."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lightning_layca as ll
from tests.implementations import SubclassedSGD, fail_compiling, record_compilations

CONFIGS = {
    "sgd": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "momentum-wd": dict(lr=0.05, momentum=0.9, weight_decay=5e-3),
    "dampening": dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=1e-3),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "maximize": dict(lr=0.1, momentum=0.9, maximize=True),
    "sgd-wd": dict(lr=0.1, weight_decay=0.01),
}
ADAM_CONFIGS = {
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam-wd": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    "amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, amsgrad=True)),
    "maximize": (torch.optim.Adam, dict(lr=1e-2, maximize=True)),
    "betas": (torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99))),
    "adamw-fused": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, fused=True)),
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


def model_and_twin(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.Tanh(), nn.Linear(10, 4)
    )
    return model, copy.deepcopy(model)


def layca(model: nn.Module, base: type[torch.optim.Optimizer], implementation: str, **config: object) -> ll.Layca:
    return ll.Layca(
        base(model.parameters(), **config), model.named_parameters(), rotation_rate=0.05, implementation=implementation
    )


def fit(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=generator)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def trained_twins(
    base: type[torch.optim.Optimizer], config: dict, steps: int
) -> tuple[nn.Module, nn.Module, ll.Layca, ll.Layca]:
    """A model stepped by an eager Layca and its twin by a compiled one, ``steps`` steps on the same batches."""
    model, twin = model_and_twin()
    eager = layca(model, base, "eager", **config)
    compiled = layca(twin, base, "compiled", **config)
    fit(model, eager, steps)
    fit(twin, compiled, steps)
    return model, twin, eager, compiled


@pytest.mark.parametrize("config", CONFIGS)
def test_the_kernel_takes_the_same_steps_and_keeps_the_same_momentum_as_sgd_under_the_eager_step(config: str) -> None:
    model, twin, eager, compiled = trained_twins(torch.optim.SGD, CONFIGS[config], 6)
    assert set(compiled.describe().values()) == {"compiled+base"}  # every layer's SGD step taken by the kernel
    # Float32 rounding differs (the kernel reads the step exactly); the gradients carry it into later steps.
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert relative_error(q.detach(), p.detach()) < 2e-5, name
        if CONFIGS[config].get("momentum"):
            buffers = eager.state[p]["momentum_buffer"], compiled.state[q]["momentum_buffer"]
            assert relative_error(buffers[1], buffers[0]) < 2e-5, name
            assert buffers[1].stride() == q.stride()
        else:
            assert q not in compiled.state or "momentum_buffer" not in compiled.state[q]  # as torch's SGD


@pytest.mark.parametrize("config", ADAM_CONFIGS)
def test_the_kernel_takes_the_same_steps_and_keeps_the_same_moments_as_adam_under_the_eager_step(config: str) -> None:
    # Adam divides by sqrt(v): where a gradient element is near zero, float32 rounding differences between the two
    # paths can grow from step to step (maximize with betas (0.8, 0.99) reached 6e-4 at step 6 from 1e-7 at step 3).
    base, options = ADAM_CONFIGS[config]
    model, twin, eager, compiled = trained_twins(base, options, 6)
    assert set(compiled.describe().values()) == {"compiled+base"}
    names = ["exp_avg", "exp_avg_sq"] + ["max_exp_avg_sq"] * bool(options.get("amsgrad"))
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert relative_error(q.detach(), p.detach()) < 2e-5, name
        mine, theirs = compiled.state[q], eager.state[p]
        assert mine.keys() == theirs.keys(), name
        assert float(mine["step"]) == float(theirs["step"]) == 6.0
        assert mine["step"].dtype == theirs["step"].dtype and mine["step"].device == theirs["step"].device
        for moment in names:
            assert relative_error(mine[moment], theirs[moment]) < 2e-5, (name, moment)


def test_biases_are_stepped_by_sgd_itself_bit_for_bit() -> None:
    model, twin = model_and_twin()
    compiled = layca(twin, torch.optim.SGD, "compiled", lr=0.1, momentum=0.9, weight_decay=1e-3)
    plain = torch.optim.SGD(
        [p for n, p in model.named_parameters() if n.endswith("bias")], lr=0.1, momentum=0.9, weight_decay=1e-3
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(16, 3, 8, 8, generator=generator)
        twin.zero_grad()
        twin(x).square().mean().backward()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.grad = q.grad.clone()
        compiled.step()
        plain.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if name.endswith("bias"):
            assert torch.equal(p, q), name


def threads_of_the_optimizer_step_and_equal_to_alone(
    base: type[torch.optim.Optimizer], config: dict, large: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[int], bool]:
    """Three steps on two threads of Layca around ``base`` and of ``base`` alone on the parameters Layca leaves it.

    Returns the thread count the optimizer's own step saw each time, and whether those parameters ended equal.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    extra = nn.Parameter(torch.randn(2**18 if large else 200_000) * 0.1)
    named = [*model.named_parameters(), ("extra", extra)]
    left = [p for _, p in named if p.ndim == 1]
    small = [p.detach().clone().requires_grad_() for p in left]
    optimizer = base([p for _, p in named], **config)
    seen: list[int] = []
    step = optimizer.step

    def counted_step(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return step(*args, **kwargs)

    monkeypatch.setattr(optimizer, "step", counted_step)
    stepped = ll.Layca(optimizer, named, rotation_rate=0.05, implementation="compiled")
    alone = base(small, **config)
    generator = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(3):
            for _, p in named:
                p.grad = torch.randn(p.shape, generator=generator)
            for q, p in zip(small, left, strict=True):
                q.grad = p.grad.clone()
            stepped.step()
            alone.step()
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert set(stepped.describe().values()) == {"compiled+base"}
    return seen, all(torch.equal(p, q) for p, q in zip(left, small, strict=True))


@pytest.mark.parametrize(
    "base, config",
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True)),
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, fused=True)),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=True)),
    ],
    ids=["sgd-fused", "adamw-fused", "sgd-foreach"],
)
def test_small_parameters_left_to_the_optimizer_step_bit_for_bit_as_it_steps_them_alone_on_two_threads(
    base: type[torch.optim.Optimizer], config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Biases and a 1-D parameter of 200,000 elements (which two threads split) are not rotated: the optimizer steps
    # them, on one thread when they are all it steps; the twin optimizer steps the same tensors alone on two threads.
    assert threads_of_the_optimizer_step_and_equal_to_alone(base, config, False, monkeypatch) == ([1, 1, 1], True)
    # A 1-D parameter of 2**18 elements keeps the optimizer's step on the process's threads.
    assert threads_of_the_optimizer_step_and_equal_to_alone(base, config, True, monkeypatch) == ([2, 2, 2], True)


def test_gradients_are_given_back_and_the_closure_runs_once_with_gradients_enabled() -> None:
    model, _ = model_and_twin()
    opt = layca(model, torch.optim.SGD, "compiled", lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 8, 8)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    grads = {name: p.grad for name, p in model.named_parameters()}
    values = {name: g.clone() for name, g in grads.items()}
    assert calls == [True] and float(loss.detach()) > 0
    opt.step()  # no closure: the gradients of the last backward pass, as with SGD
    for name, p in model.named_parameters():
        assert p.grad is grads[name] and torch.equal(p.grad, values[name]), name


def test_no_snapshot_is_kept_unless_asked_and_the_asked_one_holds_the_weights_before_the_step() -> None:
    model, _ = model_and_twin()
    opt = layca(model, torch.optim.SGD, "compiled", lr=0.1, momentum=0.9)
    fit(model, opt, 1)
    assert set(opt.describe().values()) == {"compiled+base"}
    assert [x.numel() for b in opt.plan.buckets or [] for x in b.previous] == [0, 0, 0]  # no memory held
    assert opt.weights_before_last_step() == {}
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.ndim >= 2}
    opt.keep_weights_before_next_step()
    fit(model, opt, 1)
    kept = opt.weights_before_last_step()
    assert kept.keys() == before.keys()
    for name, w in before.items():
        assert torch.equal(kept[name], w), name
    fit(model, opt, 1)  # asked for one step only: the buffers are released
    assert opt.weights_before_last_step() == {}
    assert [x.numel() for b in opt.plan.buckets or [] for x in b.previous] == [0, 0, 0]


def test_a_layer_without_gradient_stays_and_keeps_its_buffer_as_under_sgd() -> None:
    model, _ = model_and_twin()
    opt = layca(model, torch.optim.SGD, "compiled", lr=0.1, momentum=0.9)
    fit(model, opt, 2)
    head = model[5].weight
    weights, buffer = head.detach().clone(), opt.state[head]["momentum_buffer"].clone()
    opt.zero_grad()
    model[:4](torch.randn(4, 3, 8, 8)).square().mean().backward()  # the head gets no gradient
    opt.step()
    assert head.grad is None
    assert torch.equal(head.detach(), weights) and torch.equal(opt.state[head]["momentum_buffer"], buffer)


def test_a_gradient_laid_out_unlike_its_weights_takes_the_step_after_sgd_at_that_step() -> None:
    model, twin = model_and_twin()
    eager = layca(model, torch.optim.SGD, "eager", lr=0.1, momentum=0.9)
    compiled = layca(twin, torch.optim.SGD, "compiled", lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 8, 8)
    for net, opt in ((model, eager), (twin, compiled)):
        opt.zero_grad()
        net(x).square().mean().backward()
        net[0].weight.grad = net[0].weight.grad.to(memory_format=torch.channels_last)  # strides differ now
        opt.step()
    assert list(compiled.weights_before_last_step()) == ["0.weight"]  # for the conv only, stepped after SGD
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert relative_error(q.detach(), p.detach()) < 1e-6


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("first", "second"), [("compiled", "eager"), ("eager", "compiled")])
def test_state_restored_from_a_state_dict_carries_on_across_implementations(base: str, first: str, second: str) -> None:
    # Three steps with one implementation, then three with the other from its state dict, against six with the first.
    optimizer, config = BASES[base]
    reference, resumed = model_and_twin()
    reference_opt = layca(reference, optimizer, first, **config)
    fit(reference, reference_opt, 3)
    fit(reference, reference_opt, 3, seed=2)
    opt = layca(resumed, optimizer, first, **config)
    fit(resumed, opt, 3)
    other = layca(resumed, optimizer, second, **config)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    fit(resumed, other, 3, seed=2)
    for p, q in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert relative_error(q.detach(), p.detach()) < 2e-5


@pytest.mark.parametrize("base", BASES)
def test_the_optimizer_alone_carries_on_from_the_state_the_kernel_kept(base: str) -> None:
    optimizer, config = BASES[base]
    model, twin, eager, compiled = trained_twins(optimizer, config, 3)
    alone = optimizer(twin.parameters(), **config)
    alone.load_state_dict(compiled.state_dict())
    alone_eager = optimizer(model.parameters(), **config)
    alone_eager.load_state_dict(eager.state_dict())
    fit(model, alone_eager, 2, seed=2)
    fit(twin, alone, 2, seed=2)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert relative_error(q.detach(), p.detach()) < 2e-5


def test_a_subclass_of_sgd_is_stepped_by_its_own_step() -> None:
    calls = []

    class CountingSGD(SubclassedSGD):
        def step(self, closure=None):
            calls.append(sum(p.grad is not None for group in self.param_groups for p in group["params"]))
            return super().step(closure)

    model, _ = model_and_twin()
    opt = layca(model, CountingSGD, "compiled", lr=0.1, momentum=0.9)
    fit(model, opt, 2)
    assert set(opt.describe().values()) == {"compiled"}  # the kernel works after the subclass's own step
    assert calls == [6, 6]  # it saw every gradient


def test_a_kernel_that_fails_after_compiling_leaves_its_layers_to_sgd_and_the_eager_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, twin, eager, compiled = trained_twins(torch.optim.SGD, dict(lr=0.1, momentum=0.9), 2)  # compiled, ready

    fail_compiling(monkeypatch, "recompilation failed")
    with pytest.warns(UserWarning, match="recompilation failed"):
        fit(model, eager, 1, seed=3)
        fit(twin, compiled, 1, seed=3)
    assert len(compiled.weights_before_last_step()) == 3  # snapshots taken for the eager step
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert relative_error(q.detach(), p.detach()) < 2e-5


@pytest.mark.parametrize("half", ["sums", "update"])
def test_an_adam_half_that_fails_to_compile_later_leaves_no_layer_behind(
    monkeypatch: pytest.MonkeyPatch, half: str
) -> None:
    # Adam's layers take the two halves of its kernel (sharded or not). Should one fail to compile at a later step:
    # one warning, and every layer still takes the eager implementation's step and keeps its moments. The sums half
    # fails before it runs (the layers take AdamW's own step from a snapshot, then the eager step); the update half
    # after the sums half wrote this step's moments (it then runs uncompiled: the same arithmetic).
    model, twin, eager, compiled = trained_twins(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05), 2)
    assert set(compiled.describe().values()) == {"compiled+base"}
    from lightning_layca.step.base_kernels import base_halves
    from lightning_layca.step.compiled import in_single_precision

    sums_half, update_half = base_halves("adam")  # AdamW's form
    failing = sums_half if half == "sums" else in_single_precision(update_half)
    fail_compiling(monkeypatch, f"no compiler for the {half} half", lambda name: name == failing)
    with pytest.warns(UserWarning, match=f"no compiler for the {half} half") as caught:
        fit(model, eager, 1, seed=3)
        fit(twin, compiled, 1, seed=3)
    assert len([w for w in caught if "Layca" in str(w.message)]) == 1
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert relative_error(q.detach(), p.detach()) < 2e-5
        for name in ("exp_avg", "exp_avg_sq"):
            assert relative_error(compiled.state[q][name], eager.state[p][name]) < 2e-5, name


@pytest.mark.parametrize("base", ["adamw", "sgd"])
def test_a_half_that_fails_for_the_last_layers_leaves_the_first_ones_stepped_by_the_kernels(
    monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    # Five layers of one shape take a call of four, then a call of one. Should the sums half of the call of one fail
    # to compile at a later step, the first four layers take the kernels' step, the fifth is left untouched by them
    # and takes the base optimizer's step from a snapshot and the eager step: every layer ends where the eager
    # implementation puts it, with its state.
    def make(implementation: str) -> tuple[nn.Module, ll.Layca]:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(5)])
        params = model.parameters()
        wrapped = (
            torch.optim.AdamW(params, lr=1e-2) if base == "adamw" else torch.optim.SGD(params, lr=0.1, momentum=0.9)
        )
        return model, ll.Layca(wrapped, model.named_parameters(), rotation_rate=0.05, implementation=implementation)

    def step(model: nn.Module, opt: ll.Layca, seed: int) -> None:
        opt.zero_grad()
        model(torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        opt.step()

    (model, eager), (twin, compiled) = make("eager"), make("compiled")
    compiled.plan.sgd_forms.load({"cpu/float32": "halves"})  # SGD's layers in halves, as Adam's
    for seed in range(2):
        step(model, eager, seed)
        step(twin, compiled, seed)
    from lightning_layca.step.base_kernels import BASE_KERNELS, base_halves

    sums_halves = {base_halves(form)[0] for form in BASE_KERNELS}
    fail_compiling(monkeypatch, "no compiler for one layer", lambda name: name in sums_halves, layers_per_call=1)
    with pytest.warns(UserWarning, match="no compiler for one layer") as caught:
        step(model, eager, 2)
        step(twin, compiled, 2)
    assert len([w for w in caught if "Layca" in str(w.message)]) == 1
    assert list(compiled.weights_before_last_step()) == [
        "4.weight"
    ]  # the one snapshot: the layer left to the eager step
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert relative_error(q.detach(), p.detach()) < 2e-5
        for name, value in eager.state[p].items():
            if name != "step":
                assert relative_error(compiled.state[q][name], value) < 2e-5, name


@pytest.mark.parametrize(
    ("base", "granularity", "sgd_form"),
    [("adamw", "layer", "halves"), ("sgd", "layer", "halves"), ("sgd", "layer", "one call"), ("sgd", "unit", "halves")],
)
def test_every_kernel_the_base_steps_layers_call_is_made_ready_on_stand_ins_before_the_step(
    monkeypatch: pytest.MonkeyPatch, base: str, granularity: str, sgd_form: str
) -> None:
    # Kernels compile on stand-in layers before any weight is touched (a failure then costs one warning and the eager
    # step), for every number of layers per call: five layers of one shape take a call of four, then one of one, in
    # each half of the kernel (Adam's; SGD's per layer where the optimizer's form is the halves), or in SGD's one-call
    # kernel (per unit, whatever the form; per layer where the form is one call).
    readied, called = record_compilations(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(5)])
    wrapped = (
        torch.optim.AdamW(model.parameters(), lr=1e-3)
        if base == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    opt = ll.Layca(wrapped, model.named_parameters(), implementation="compiled", granularity=granularity)
    opt.plan.sgd_forms.load({"cpu/float32": sgd_form})  # as a machine that measured it so
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
    assert set(opt.describe().values()) == {"compiled+base"}
    assert {size for _, size in called} == {1, 4}, called
    assert called <= readied, called - readied
    halves = {variant.endswith(("_sums", "_single")) for variant, _ in called}
    expected = base == "adamw" or (granularity == "layer" and sgd_form == "halves")
    assert halves == {expected}, called  # which form the layers took


def test_a_float16_layer_under_adam_keeps_its_norm_where_its_moments_underflow() -> None:
    # The sums half forms the step from the moments as stored (rounded to float16), as the update half reads them
    # back: with the unrounded ones, a second moment that underflows to 0 in float16 gives the update half a step
    # m / eps that the rule's coefficients were not computed for, and the layer's norm runs away (x9 in one step).
    # Each step keeps every layer's norm and turns it by atan(rho), to float16 rounding.
    torch.manual_seed(0)
    # No biases: torch's own float16 Adam step turns a bias whose second moment underflows into NaN (eps is 0 in
    # float16), and the next gradients with it.
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Tanh(), nn.Linear(64, 64, bias=False)).half()
    x = torch.randn(8, 64).half()
    rho = 0.05
    opt = ll.Layca(torch.optim.AdamW(model.parameters(), lr=1e-3), model.named_parameters(), rotation_rate=rho,
                   implementation="compiled")  # fmt: skip
    layers = [p for p in model.parameters() if p.ndim >= 2]
    for _ in range(3):
        opt.zero_grad()
        (model(x).float().square().mean() * 1e-3).backward()  # small gradients: some v underflow in float16
        before = [p.detach().double().flatten() for p in layers]
        opt.step()
        assert set(opt.describe().values()) == {"compiled+base"}
        for w, p in zip(before, layers, strict=True):
            after = p.detach().double().flatten()
            assert abs(float(after.norm() / w.norm()) - 1) < 2e-3
            angle = torch.arccos(torch.dot(w, after) / (w.norm() * after.norm()))
            assert abs(float(angle) / math.atan(rho) - 1) < 2e-2, float(angle)


@pytest.mark.parametrize(("granularity", "layers"), [("layer", 2), ("layer", 5), ("unit", 5)])
def test_adams_compiled_step_allocates_no_tensor_the_size_of_a_layer(granularity: str, layers: int) -> None:
    # A tensor the size of a layer allocated at every call would be faulted in again at every step (on the 2-core
    # CPU of benchmarks/README.md that cost a quarter of the AdamW step): the step's own allocations stay small,
    # per layer and per unit, with one layer per call and four (five layers of one shape: a call of four, then one).
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(layers)])
    opt = ll.Layca(torch.optim.AdamW(model.parameters(), lr=1e-3), model.named_parameters(), implementation="compiled",
                   granularity=granularity)  # fmt: skip
    x = torch.randn(8, 256)
    for step in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step < 2:
            opt.step()
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            opt.step()
    assert set(opt.describe().values()) == {"compiled+base"}
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocated, "the profiler recorded no allocation at all: the check would not see one"
    # The largest are per unit: a few float64 numbers per unit (sums, coefficients) for four layers, 32 KiB here.
    assert max(allocated) < 256 * 256 * 4 // 4, max(allocated)


KERNEL_CASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, weight_decay=0.01)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, amsgrad=True, maximize=True)),
}


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_the_kernels_sums_are_those_of_torchs_own_step_at_the_first_and_later_steps(case: str) -> None:
    # The kernel's returned sums (a, b, c) = (<D, w>, <w, w>, <D, D>) against D read from torch's own step on a twin.
    from lightning_layca.step.base_kernels import BASE_HALVES, BASE_KERNELS, base_halves
    from lightning_layca.step.families import family_of

    optimizer, config = KERNEL_CASES[case]
    torch.manual_seed(0)
    layer = nn.Parameter(torch.randn(16, 24))
    twin = nn.Parameter(layer.detach().clone())
    mine, theirs = optimizer([layer], **config), optimizer([twin], **config)
    family = family_of(mine)
    assert family is not None
    for step in range(3):
        grad = torch.randn(16, 24)
        layer.grad, twin.grad = grad.clone(), grad.clone()
        before = twin.detach().double().clone()
        theirs.step()
        d = twin.detach().double() - before
        expected = torch.stack([(d * before).sum(), (before * before).sum(), (d * d).sum()])
        plan = family.read_step(mine.param_groups[0], layer, mine.state.get(layer) or {})
        assert plan is not None
        hyper = torch.tensor(plan.hyper, dtype=torch.float64)
        one, n0 = torch.ones((), dtype=torch.float64), torch.tensor(1e6, dtype=torch.float64)
        flag = torch.zeros((), dtype=torch.bool)
        kernel = BASE_KERNELS[plan.variant][0]  # the traced function itself, run eagerly
        weights = layer.detach().clone()  # the kernel overwrites its input with the Layca step: keep the layer
        if kernel is None:  # Adam's forms: the sums half of the two every layer takes (it writes the state only)
            sums_half = BASE_HALVES[base_halves(plan.variant)[0]][1]
            sums = sums_half(weights, layer.grad, *plan.state, hyper, n0).flatten()
        else:  # (a, b, c), then on CPU whether the float32 update was formed (a fourth row, step.kernels.update_rows)
            sums = kernel(weights, layer.grad, *plan.state, hyper, one, one, n0, flag)[:3].flatten()
        plan.commit(mine.state[layer])
        # torch's D is fl(w + D) - w: off by up to u * |w_i| per element, so <D, w> (small: D is nearly tangential)
        # is compared on the scale of ||D|| ||w||, its bound; <w, w> and <D, D> relatively.
        scale = float((expected[1] * expected[2]).sqrt())
        assert abs(float(sums[0] - expected[0])) <= 1e-5 * scale, step
        torch.testing.assert_close(sums[1:], expected[1:], rtol=1e-5, atol=0.0)
        with torch.no_grad():  # both continue from torch's step, so that the next sums start from the same weights
            layer.copy_(twin)


def test_per_unit_a_layer_left_to_the_eager_step_after_kernel_layers_takes_its_own_units_norms() -> None:
    # The head has one unit: no kernel takes it, the eager step does, in the bucket of the two layers before it,
    # whose units it must not be confused with (the first layer's units are scaled to other norms).
    def fit_with(implementation: str) -> tuple[list[torch.Tensor], ll.Layca]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1))
        with torch.no_grad():
            model[0].weight.mul_(5)
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = ll.Layca(
            base, model.named_parameters(), rotation_rate=0.1, granularity="unit", implementation=implementation
        )
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach() for p in model.parameters()], opt

    (compiled, opt), (eager, _) = fit_with("compiled"), fit_with("eager")
    assert opt.describe() == {"0.weight": "compiled+base", "2.weight": "compiled+base", "4.weight": "eager"}
    for p, q in zip(compiled, eager, strict=True):
        assert relative_error(p, q) < 2e-5
    # The head kept the norm the eager step gives it (with the first layer's unit norms it took another).
    torch.testing.assert_close(
        torch.linalg.vector_norm(compiled[4]), torch.linalg.vector_norm(eager[4]), rtol=1e-6, atol=0
    )
