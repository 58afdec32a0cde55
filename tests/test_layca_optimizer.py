"""The wrapper honours the torch.optim.Optimizer contract: param groups, closures, state dicts, schedulers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lightning_layca as ll


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(), nn.Linear(7, 2))


def batches(n: int, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g), torch.randn(16, 2, generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list, scheduler=None) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def test_param_groups_are_the_base_optimizers_own() -> None:
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = ll.Layca(base, model.named_parameters())
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    opt.param_groups[0]["lr"] = 0.05
    assert base.param_groups[0]["lr"] == 0.05


def test_named_parameters_accepts_a_generator_and_selects_rank_two_weights() -> None:
    model = make_model()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    assert opt.layer_names == ["0.weight", "2.weight", "4.weight"]


def test_include_and_exclude_refine_the_selection() -> None:
    model = make_model()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), exclude=["4.*"])
    assert opt.layer_names == ["0.weight", "2.weight"]
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), include="2.weight")
    assert opt.layer_names == ["2.weight"]


def test_closure_is_called_once_with_grad_enabled_and_its_loss_returned() -> None:
    model = make_model()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    (x, y), calls = batches(1)[0], []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0


def test_zero_grad_clears_every_gradient() -> None:
    model = make_model()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    model(torch.randn(2, 5)).sum().backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "make_base",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
    ],
    ids=["sgd_nesterov", "adamw"],
)
def test_state_dict_round_trip_mid_training_continues_bit_identically(make_base) -> None:
    data = batches(10)
    model = make_model()
    opt = ll.Layca(make_base(model.parameters()), model.named_parameters(), schedule=ll.LayerWarmup(8))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    train(model, opt, data[:5], scheduler)

    # Restore into a fresh model/optimizer/scheduler, as a resumed run would (through torch.save/load).
    buffer = __import__("io").BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = ll.Layca(make_base(resumed.parameters()), resumed.named_parameters(), schedule=ll.LayerWarmup(8))
    resumed_scheduler = torch.optim.lr_scheduler.StepLR(resumed_opt, step_size=3, gamma=0.5)
    resumed_opt.load_state_dict(saved["opt"])
    resumed_scheduler.load_state_dict(saved["sched"])
    assert resumed_opt.initial_norms == opt.initial_norms
    assert resumed_opt.step_count == 5
    assert resumed_opt.param_groups is resumed_opt.optimizer.param_groups

    train(model, opt, data[5:], scheduler)
    train(resumed, resumed_opt, data[5:], resumed_scheduler)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_plain_base_state_dict_loads_into_the_wrapper() -> None:
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, base, batches(2))
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.named_parameters())
    opt.load_state_dict(base.state_dict())
    first = next(iter(model.parameters()))
    assert torch.equal(opt.state[first]["momentum_buffer"], base.state[first]["momentum_buffer"])


def test_state_dict_of_other_layers_is_rejected() -> None:
    model = make_model()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    other = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), exclude="0.*")
    with pytest.raises(ValueError, match="saved for layers"):
        other.load_state_dict(opt.state_dict())


def test_scheduler_on_wrapper_and_on_base_behave_the_same() -> None:
    data = batches(8)
    models, optimizers = [], []
    for attach_to_wrapper in (True, False):
        model = make_model()
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if not attach_to_wrapper:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(base, max_lr=0.3, total_steps=8)
        opt = ll.Layca(base, model.named_parameters())
        if attach_to_wrapper:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=8)
        train(model, opt, data, scheduler)
        models.append(model)
        optimizers.append(opt)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)
    # OneCycleLR records its peak as max_lr: the reference at which a layer rotates at `rotation_rate`.
    assert optimizers[0].reference_lr == optimizers[1].reference_lr == pytest.approx(0.3)


def test_rate_follows_a_warmup_scheduler_created_before_the_wrapper() -> None:
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.LinearLR(base, start_factor=0.25, total_iters=4)
    opt = ll.Layca(base, model.named_parameters(), rotation_rate=0.2)
    # lr_g(0) is the scheduler's initial_lr, so the warm-up also warms up the rotation rate.
    assert list(opt.rotation_rates().values()) == pytest.approx([0.05, 0.05, 0.05])


def test_deepcopy_and_repr() -> None:
    model = make_model()
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), rotation_rate=0.1)
    train(model, opt, batches(1))
    clone = copy.deepcopy(opt)
    assert clone.layer_names == opt.layer_names and clone.step_count == 1
    assert "Layca(rotation_rate=0.1" in repr(opt)


def test_time_varying_schedule_is_evaluated_only_when_its_key_changes() -> None:
    calls: list[tuple[int, int]] = []

    class Counting(ll.EpochSwitch):
        def multipliers(self, layers, step, epoch):
            calls.append((step, epoch))
            return super().multipliers(layers, step, epoch)

    model = make_model()
    schedule = Counting([ll.Uniform(), ll.DepthDecay(alpha=0.5)], milestones=[2])
    opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), schedule=schedule)
    data = batches(3)
    for epoch in range(4):
        opt.set_epoch(epoch)
        train(model, opt, data)
    assert calls == [(0, 0), (6, 2)]
    assert list(opt.rotation_rates().values()) == pytest.approx(
        [opt.rotation_rate * m for m in (0.03125, 0.17677669529663687, 1.0)]
    )


@pytest.mark.parametrize(
    "make_base",
    [
        lambda p: torch.optim.Adagrad(p, lr=0.1),
        lambda p: torch.optim.Adamax(p, lr=0.01),
        lambda p: torch.optim.NAdam(p, lr=0.01),
        lambda p: torch.optim.RAdam(p, lr=0.01),
    ],
    ids=["adagrad", "adamax", "nadam", "radam"],
)
def test_other_torch_optimizers_are_wrapped(make_base) -> None:
    model = make_model()
    opt = ll.Layca(make_base(model.parameters()), model.named_parameters(), rotation_rate=0.1)
    norms = [float(p.detach().norm()) for p in opt.layers.params]
    train(model, opt, batches(3))
    assert [float(p.detach().norm()) for p in opt.layers.params] == pytest.approx(norms, rel=1e-6)


def test_cpu_chunking_takes_the_same_step_as_one_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_layca import plan

    results = []
    for chunk_bytes in (None, 64):  # 64 bytes: every layer in its own chunk
        monkeypatch.setattr(plan, "CPU_BUCKET_BYTES", chunk_bytes)
        model = make_model()
        opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.named_parameters())
        train(model, opt, batches(3))
        assert len(opt.plan.buckets or []) == (1 if chunk_bytes is None else 3)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*results, strict=True))


def test_compiled_step_on_cpu_takes_every_layer_of_a_dtype_in_one_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    # The byte limit keeps the eager step's passes in cache; the compiled kernels read each layer on their own and
    # group consecutive layers into calls across a bucket, so they get one bucket per (device, dtype), around SGD
    # (one call per layer) and AdamW (two halves per layer) alike.
    from lightning_layca import plan

    monkeypatch.setattr(plan, "CPU_BUCKET_BYTES", 64)
    buckets = {}
    for implementation in ("eager", "compiled"):
        for name, make_base in (
            ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
            ("adamw", torch.optim.AdamW),
        ):
            torch.manual_seed(0)  # layers whose sizes are multiples of 4: every one has a kernel (kernel_view)
            model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
            opt = ll.Layca(make_base(model.parameters()), model.named_parameters(), implementation=implementation)
            train(model, opt, batches(2))
            assert set(opt.describe().values()) == {"eager" if implementation == "eager" else "compiled+base"}
            buckets[implementation, name] = [len(b.params) for b in opt.plan.buckets or []]
    assert buckets == {
        ("eager", "sgd"): [1, 1, 1],
        ("eager", "adamw"): [1, 1, 1],
        ("compiled", "sgd"): [3],
        ("compiled", "adamw"): [3],
    }
