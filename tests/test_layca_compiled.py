"""The compiled Layca step: chosen where it should be, equal to the eager step and to the float64 reference, compiled
once, falling back to the eager step with one warning, and free of host synchronisation on CUDA."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import lightning_layca as ll
from lightning_layca import auto_choice, compiling
from lightning_layca.step import compiled as compiled_step
from tests.implementations import SubclassedSGD, fail_compiling
from tests.reference import layca_update

KERNELS = {"sgd-in-kernel": torch.optim.SGD, "after-base-step": SubclassedSGD}
"""Around torch's SGD the compiled kernel takes the SGD step itself; around a subclass, it works after its step."""
KERNEL_PATHS = {"sgd-in-kernel": "compiled+base", "after-base-step": "compiled"}


def cuda(test):
    """Mark a test as needing CUDA (``pytest -m cuda`` selects them; ``benchmarks/gpu_check.sh`` runs them)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


def angle(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double().flatten(), v.double().flatten()
    along = torch.dot(u, v) / v.norm()
    return math.atan2(float(torch.linalg.vector_norm(u - torch.dot(u, v) / torch.dot(v, v) * v)), float(along))


def twin_optimizers(model: nn.Module, make_base, **kwargs) -> tuple[nn.Module, ll.Layca, ll.Layca]:
    """The model, an eager Layca around it, and a compiled Layca around a deep copy."""
    twin = copy.deepcopy(model)
    eager = ll.Layca(make_base(model.parameters()), model.named_parameters(), implementation="eager", **kwargs)
    compiled = ll.Layca(make_base(twin.parameters()), twin.named_parameters(), implementation="compiled", **kwargs)
    return twin, eager, compiled


def train(models_and_optimizers, steps: int, make_input, scheduler_factory=None) -> None:
    schedulers = [scheduler_factory(opt) if scheduler_factory else None for _, opt in models_and_optimizers]
    for step in range(steps):
        x = make_input(step)
        for (model, opt), scheduler in zip(models_and_optimizers, schedulers, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()


# ------------------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("bad", ["fused", "", None, 1])
def test_unknown_implementation_is_refused_with_the_accepted_ones(bad: object) -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"`implementation` must be one of 'auto', 'eager', 'compiled', got"):
        ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), implementation=bad)
    with pytest.raises(ValueError, match=r"LaycaCallback: `implementation` must be one of 'auto'"):
        ll.LaycaCallback(implementation=bad)


def test_auto_steps_eagerly_while_the_eager_steps_are_cheap_then_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    auto = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    eager = ll.Layca(torch.optim.SGD(twin.parameters(), lr=0.1), twin.named_parameters(), implementation="eager")
    x = torch.randn(4, 6)
    train([(model, auto), (twin, eager)], 3, lambda step: x)
    assert set(auto.describe().values()) == {"eager"}  # a few cheap steps: no compilation
    assert auto.plan.auto is not None and auto.plan.auto.phase == "eager"
    monkeypatch.setattr(auto_choice, "AUTO_COMPILE_AFTER_SECONDS", 0.0)
    train([(model, auto), (twin, eager)], 2, lambda step: x)
    assert set(auto.describe().values()) == {"compiled+base"} and auto.plan.auto.phase == "trial"
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert relative_error(p.detach(), q.detach()) < 1e-6


def test_auto_never_compiles_for_cuda_or_float64_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auto_choice, "AUTO_COMPILE_AFTER_SECONDS", 0.0)  # would compile at once if it could
    model = nn.Linear(8, 8).double()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    for _ in range(2):
        model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
        opt.step()
    assert opt.describe() == {"weight": "eager"} and opt.plan.auto is not None and opt.plan.auto.phase == "eager"
    assert compiled_step.use_compiled_step("auto", torch.device("cuda"), torch.float32) is False


def test_float64_layers_take_the_eager_step_with_a_warning_when_compiled_is_asked_for() -> None:
    model = nn.Linear(8, 8).double()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), implementation="compiled")
    model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    with pytest.warns(UserWarning, match=r"the torch.float64 layers on cpu take the eager step"):
        opt.step()
    assert opt.describe() == {"weight": "eager"}


@pytest.mark.parametrize(
    "capability, options",
    [("AVX512", {"cpp.simdlen": 256}), ("AVX512_BF16", {"cpp.simdlen": 256}), ("AVX2", {}), ("DEFAULT", {})],
)
def test_kernels_take_256_bit_vectors_on_avx512_cpus_and_inductors_choice_elsewhere(
    capability: str, options: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inductor converts 16 floats to float64 element by element, 8 with one instruction (benchmarks/README.md).
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert compiling.cpu_vector_options() == options


def test_failed_compilation_warns_once_and_takes_the_eager_step(monkeypatch: pytest.MonkeyPatch) -> None:
    fail_compiling(monkeypatch, "no C++ compiler found\nsecond line", forget_ready=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    twin, eager, compiled = twin_optimizers(model, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train([(model, eager), (twin, compiled)], 3, lambda step: torch.randn(4, 6))
    messages = [str(w.message) for w in caught if "compiled step is not available" in str(w.message)]
    assert messages == [
        "Layca: the compiled step is not available for torch.float32 layers on cpu (RuntimeError: no C++ compiler "
        "found); using the eager step. Pass implementation='eager' to skip the attempt."
    ]
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kernel, granularity", [("sgd-in-kernel", "layer"), ("after-base-step", "unit")], ids=["sgd-layer", "after-unit"]
)
def test_layers_stepped_several_per_compiled_call_end_bit_for_bit_as_one_per_call(
    kernel: str, granularity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Five layers of one kernel, two per call: two calls of two layers and one of one; against one layer per call.
    torch.manual_seed(0)
    model = nn.Sequential(*(m for width in (8, 4, 12, 8, 4) for m in (nn.LazyLinear(width), nn.Tanh())))
    model(torch.randn(1, 5))
    twin = copy.deepcopy(model)
    results = []
    for layers_per_call, net in ((1, model), (2, twin)):
        monkeypatch.setattr(compiling, "LAYERS_PER_CALL", layers_per_call)
        base = KERNELS[kernel](net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        opt = ll.Layca(base, net.named_parameters(), implementation="compiled", granularity=granularity)
        generator = torch.Generator().manual_seed(1)
        train([(net, opt)], 3, lambda step, g=generator: torch.randn(4, 5, generator=g))
        assert set(opt.describe().values()) == {"compiled+base" if kernel == "sgd-in-kernel" else "compiled"}
        results.append(
            [p.detach().clone() for p in net.parameters()] + [opt.state[p]["momentum_buffer"] for p in net.parameters()]
        )
    for one, several in zip(*results, strict=True):
        assert torch.equal(one, several)


# ------------------------------------------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize(
    "shape",
    [(8, 8), (16, 3, 3, 3), (1, 196, 7), (12, 1), (1, 2, 1, 4), (40, 1000), (3, 5), (1, 197, 7)],
    ids=["square", "conv", "leading-one", "column", "ones", "wide", "odd", "odd-leading-one"],
)
@pytest.mark.parametrize("kernel", KERNELS)
def test_one_step_matches_the_float64_reference_for_every_kind_of_shape(shape: tuple[int, ...], kernel: str) -> None:
    torch.manual_seed(0)
    layer = nn.Parameter(torch.randn(shape))
    opt = ll.Layca(
        KERNELS[kernel]([layer], lr=0.1, momentum=0.9, weight_decay=0.1),
        [("layer", layer)],
        rotation_rate=0.07,
        implementation="compiled",
    )
    before = layer.detach().clone()
    layer.grad = torch.randn(shape)
    after_base = before - 0.1 * (layer.grad + 0.1 * before)
    opt.step()
    expected = layca_update(before, after_base, 0.07, float(before.double().norm()))
    # A layer whose size is not a multiple of 4 has no lane view (kernel_view): the eager step takes it.
    compiled = "compiled+base" if kernel == "sgd-in-kernel" else "compiled"
    assert opt.describe() == {"layer": compiled if layer.numel() % 4 == 0 else "eager"}
    assert relative_error(layer.detach().flatten(), expected) < 1e-6


@pytest.mark.parametrize("kernel", KERNELS)
def test_layer_without_a_lane_view_steps_eagerly_beside_the_compiled_ones(kernel: str) -> None:
    torch.manual_seed(0)
    prime = nn.Parameter(torch.randn(7, 1))  # 7 elements: not four equal runs of memory (compiling.kernel_view)
    strided = nn.Parameter(torch.randn(8, 12)[:, ::2])  # not one dense block of memory
    dense = nn.Parameter(torch.randn(8, 6))
    named = [("prime", prime), ("strided", strided), ("dense", dense)]
    opt = ll.Layca(KERNELS[kernel]([p for _, p in named], lr=0.1), named, rotation_rate=0.1, implementation="compiled")
    before = [p.detach().clone() for _, p in named]
    for _, p in named:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.describe() == {"prime": "eager", "strided": "eager", "dense": KERNEL_PATHS[kernel]}
    for (_, p), w in zip(named, before, strict=True):
        assert angle(p.detach(), w) == pytest.approx(math.atan(0.1), abs=1e-5)
        assert float(p.detach().double().norm()) == pytest.approx(float(w.double().norm()), rel=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_channels_last_convolution_equals_the_eager_step(kernel: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).to(memory_format=torch.channels_last)
    twin, eager, compiled = twin_optimizers(model, lambda p: KERNELS[kernel](p, lr=0.1, momentum=0.9))
    assert not model[0].weight.is_contiguous()
    train([(model, eager), (twin, compiled)], 5, lambda step: torch.randn(2, 3, 8, 8))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert relative_error(q.detach(), p.detach()) < 1e-6


@pytest.fixture
def two_threads():
    """Two torch threads for the test (the examples' modules set one when they are imported)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("two_threads")
def test_large_layer_takes_the_multithreaded_kernel_and_equals_the_eager_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.Tanh(), nn.Linear(512, 4, bias=False))
    twin, eager, compiled = twin_optimizers(model, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05))
    train([(model, eager), (twin, compiled)], 3, lambda step: torch.randn(8, 512))
    assert compiled.plan.buckets is not None
    assert compiled.plan.buckets[0].parallel == [True, False]  # 512 x 512 = 2**18 elements: the threshold
    # Both round every step to float32 (6e-8 relative), and the gradients carry the differences into later steps.
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert relative_error(q.detach(), p.detach()) < 1e-5


@pytest.mark.filterwarnings("ignore:Layca. the base optimizer's steps for layer")  # bf16/fp16 rounding: expected
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", KERNELS)
def test_low_precision_layer_is_computed_wide_and_rounded_once(dtype: torch.dtype, kernel: str) -> None:
    # From the same bf16/fp16 weights and step, the compiled result is the float64 reference rounded to the dtype:
    # at most one unit in the last place per element.
    torch.manual_seed(0)
    layer = nn.Parameter(torch.randn(32, 48).to(dtype))
    opt = ll.Layca(KERNELS[kernel]([layer], lr=0.5), [("layer", layer)], rotation_rate=0.2, implementation="compiled")
    before = layer.detach().clone()
    layer.grad = torch.randn(32, 48).to(dtype)
    # After the base step the step is read back from the rounded weights; the SGD kernel forms it exactly.
    after_base = (
        before - 0.5 * layer.grad if kernel == "after-base-step" else before.double() - 0.5 * layer.grad.double()
    )
    n0 = opt.initial_norms[0]
    opt.step()
    expected = layca_update(before, after_base, 0.2, n0, dtype=dtype).view(32, 48)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    assert ((layer.detach().double() - expected).abs() <= ulp * expected.abs()).all()
    assert relative_error(layer.detach(), expected) < ulp / 2


# ------------------------------------------------------------------------------------------------------ compilation


# Around SGD the kernel reads the learning rate, around AdamW the bias corrections too, which change at every step.
@pytest.mark.parametrize(
    "make_base",
    [lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9), lambda p: torch.optim.AdamW(p, lr=1e-2)],
    ids=["sgd", "adamw"],
)
def test_learning_rate_schedules_and_warmup_never_recompile(make_base) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = ll.Layca(
        make_base(model.parameters()),
        model.named_parameters(),
        schedule=ll.LayerWarmup(50),
        implementation="compiled",
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    x = torch.randn(8, 6)

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        scheduler.step()

    step()  # compiles if this process has not yet
    rates = [opt.rotation_rates()["2.weight"]]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(99):
            step()
            rates.append(opt.rotation_rates()["2.weight"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert len(set(rates)) == 100  # the rate changed at every step
    assert set(opt.describe().values()) == {"compiled+base"}


# ------------------------------------------------------------------------------------------------------------ CUDA


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_step_matches_eager_and_float64_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    shapes = [(64, 3, 7, 7), (256, 256), (1, 197, 64), (1000, 512)]
    layers = [nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
    twins = [nn.Parameter(p.detach().clone()) for p in layers]
    grads = [torch.randn_like(p) for p in layers]
    results = []
    for params, implementation in ((layers, "eager"), (twins, "compiled")):
        named = [(f"l{i}", p) for i, p in enumerate(params)]
        opt = ll.Layca(
            torch.optim.SGD(params, lr=0.1, momentum=0.9), named, rotation_rate=0.05, implementation=implementation
        )
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        results.append([p.detach().clone() for p in params])
        assert set(opt.describe().values()) == {"compiled+base" if implementation == "compiled" else "eager"}
    tolerance = 1e-6 if dtype == torch.float32 else 2.0**-8
    for w, g, eager, compiled in zip(before, grads, *results, strict=True):
        reference = layca_update(w, w - 0.1 * g, 0.05, float(w.double().norm()), dtype=dtype).view_as(w)
        assert relative_error(compiled, reference) < tolerance
        assert relative_error(eager, reference) < tolerance


@cuda
@pytest.mark.parametrize("implementation", ["compiled", "eager"])
@pytest.mark.parametrize(
    "make_base",
    [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.AdamW(p, lr=1e-3)],
    ids=["sgd", "adamw"],  # AdamW's step count stays on the host: the kernel reads it there
)
def test_cuda_step_never_synchronises_with_the_host(implementation: str, make_base) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).cuda()
    opt = ll.Layca(
        make_base(model.parameters()),
        model.named_parameters(),
        implementation=implementation,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)  # new rates every step
    x = torch.randn(16, 32, device="cuda")

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        scheduler.step()

    step()  # compilation, buffers and the first near-floor check (a host read, every 100 steps) happen here
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            opt.step()  # gradients kept from the last backward: only the optimizer step is watched
            scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@cuda
@pytest.mark.parametrize("implementation", ["compiled", "eager"])
def test_cuda_ddp_fit_with_layca_callback_keeps_every_layer_on_its_sphere(tmp_path, implementation: str) -> None:
    # One GPU under the DDP strategy (a process group of one, in this process), end to end through the callback.
    from tests.tiny_modules import TinyCNN, layer_weights, loader, make_trainer

    model = TinyCNN()
    initial = layer_weights(model)
    callback = ll.LaycaCallback(implementation=implementation, figure=False)
    trainer = make_trainer(
        tmp_path, accelerator="gpu", devices=1, strategy="ddp", logger=False, max_epochs=2, callbacks=[callback]
    )
    trainer.fit(model, loader())
    layca = callback.laycas[0]
    assert layca.step_count == 16
    assert set(layca.describe().values()) == {"compiled+base" if implementation == "compiled" else "eager"}
    for name, w in layer_weights(model).items():
        w0 = initial[name].to(w.device)
        assert float(w.double().norm()) == pytest.approx(float(w0.double().norm()), rel=1e-5)
        # 16 steps of atan(3**-3) each cannot turn a layer by more than 16 times that angle.
        assert 0 < angle(w, w0) <= 16 * math.atan(3**-3) + 1e-6


def test_unit_granularity_steps_single_unit_layers_eagerly_beside_the_compiled_ones() -> None:
    # A (1, 5, 6) layer has one unit: no 2-row view, so it takes the eager step inside the compiled group.
    torch.manual_seed(0)
    single = nn.Parameter(torch.randn(1, 5, 6))
    conv = nn.Parameter(torch.randn(6, 3, 3, 3).to(memory_format=torch.channels_last))
    named = [("single", single), ("conv", conv)]
    opt = ll.Layca(
        torch.optim.SGD([p for _, p in named], lr=0.1),
        named,
        rotation_rate=0.1,
        granularity="unit",
        implementation="compiled",
    )
    before = [p.detach().clone() for _, p in named]
    for _, p in named:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.describe() == {"single": "eager", "conv": "compiled+base"}
    for (_, p), w in zip(named, before, strict=True):
        for unit, unit_before in zip(p.detach(), w, strict=True):
            assert angle(unit, unit_before) == pytest.approx(math.atan(0.1), abs=1e-5)
            assert float(unit.double().norm()) == pytest.approx(float(unit_before.double().norm()), rel=1e-6)


def test_a_kernel_name_registered_twice_is_refused_and_every_registered_name_is_distinct() -> None:
    # Every room registers its kernels by name in one table; a second body under a name already taken (a new base
    # form called "step" would make "step_sums", the monitor's kernel) must fail loudly, not replace the first.
    from lightning_layca import compiling, measurement
    from lightning_layca.step import base_compiled  # noqa: F401  (every room's kernels registered)
    from lightning_layca.step.base_kernels import BASE_KERNELS, base_halves

    names = [measurement.DISTANCES, measurement.STEP_SUMS, *BASE_KERNELS]
    names += [half for form in BASE_KERNELS for half in base_halves(form)]
    assert len(set(names)) == len(names)
    spec = compiling.KernelSpec(lambda x: x, lambda *args: [])
    with pytest.raises(ValueError, match="'step_sums' is already registered"):
        compiling.register_kernel(measurement.STEP_SUMS, spec)
