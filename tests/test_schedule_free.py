"""Schedule-free training with Layca inside (``ScheduleFree(Layca(base))``): the averaging against the
``schedulefree`` package's reference, the rotation of ``z``, exact mode switches, and a Lightning fit with validation
and checkpoint resume."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import lightning_layca as ll
from lightning_layca.schedule_free import ScheduleFree
from tests.tiny_modules import TinyCNN, loader

schedulefree = pytest.importorskip("schedulefree")
RATE = 0.01


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def train(model: nn.Module, optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(8, 6, generator=g)).square().mean().backward()
        optimizer.step()


def test_the_averaging_matches_the_schedulefree_reference_in_training_and_evaluation():
    ours, reference = mlp(), mlp()
    optimizer = ScheduleFree(torch.optim.SGD(ours.parameters(), lr=0.1), momentum=0.9)
    wrapper = schedulefree.ScheduleFreeWrapperReference(torch.optim.SGD(reference.parameters(), lr=0.1), momentum=0.9)
    wrapper.train()
    train(ours, optimizer, 5)
    train(reference, wrapper, 5)
    for mode in ("train", "eval"):  # y, then x
        getattr(optimizer, mode)()
        getattr(wrapper, mode)()
        for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("granularity", ["layer", "unit"])
def test_layca_inside_turns_z_by_the_rate_and_keeps_its_norm(granularity: str):
    net = mlp()
    optimizer = ScheduleFree(
        ll.Layca(
            torch.optim.SGD(net.parameters(), lr=0.1),
            net.named_parameters(),
            rotation_rate=RATE,
            granularity=granularity,
        )
    )
    dims = (1,) if granularity == "unit" else (0, 1)
    weights = [net[0].weight, net[2].weight]
    norms0 = [w.detach().double().norm(dim=dims) for w in weights]
    train(net, optimizer, 1)
    for _ in range(20):
        before = [optimizer.iterates[w]["z"].double().clone() for w in weights]
        train(net, optimizer, 1, seed=len(before))
        for w, z0, n0 in zip(weights, before, norms0, strict=True):
            z = optimizer.iterates[w]["z"].double()
            cos = (z * z0).sum(dims) / (z.norm(dim=dims) * z0.norm(dim=dims))
            assert (torch.tan(torch.acos(cos.clamp(max=1))) - RATE).abs().max() < 1e-6
            assert ((z.norm(dim=dims) - n0).abs() / n0).max() < 1e-6


def test_train_eval_train_leaves_the_parameters_bit_identical():
    net = mlp()
    optimizer = ScheduleFree(ll.Layca(torch.optim.AdamW(net.parameters(), lr=1e-2), net.named_parameters()))
    train(net, optimizer, 7)
    before = [p.detach().clone() for p in net.parameters()]
    optimizer.eval()
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), before, strict=True))  # x differs from y
    optimizer.train()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before, strict=True))


def test_step_in_evaluation_mode_is_refused():
    net = mlp()
    optimizer = ScheduleFree(torch.optim.SGD(net.parameters(), lr=0.1))
    optimizer.eval()
    with pytest.raises(RuntimeError, match="evaluation mode; call train"):
        train(net, optimizer, 1)


class ScheduleFreeCNN(TinyCNN):
    """TinyCNN trained schedule-free, switching to the evaluation weights around validation."""

    def configure_optimizers(self):
        return ScheduleFree(torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.0), momentum=0.9)

    def on_validation_epoch_start(self) -> None:
        self.optimizers().optimizer.eval()

    def on_validation_epoch_end(self) -> None:
        self.optimizers().optimizer.train()


def fit(
    tmp_path: Path, epochs: int, ckpt_path: str | None = None, validate: bool = True
) -> tuple[TinyCNN, L.Trainer, ll.LaycaCallback]:
    module = ScheduleFreeCNN()
    callback = ll.LaycaCallback(rotation_rate=RATE, log_every_n_steps=1)
    trainer = L.Trainer(
        max_epochs=epochs,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        limit_val_batches=1.0 if validate else 0,
    )
    trainer.fit(module, loader(), loader(n=8), ckpt_path=ckpt_path)
    return module, trainer, callback


def test_a_fit_with_validation_resumes_bit_identically_and_monitors_the_evaluation_weights(tmp_path: Path):
    initial = copy.deepcopy(ScheduleFreeCNN())
    straight, trainer, callback = fit(tmp_path / "straight", 2)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, ScheduleFree) and isinstance(optimizer.optimizer, ll.Layca)  # Layca inside
    _, first, _ = fit(tmp_path / "resumed", 1)
    (checkpoint,) = Path(first.checkpoint_callback.dirpath).glob("*.ckpt")
    resumed, _, _ = fit(tmp_path / "resumed", 2, ckpt_path=str(checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))
    unvalidated, _, _ = fit(tmp_path / "unvalidated", 2, validate=False)  # validation leaves training alone
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), unvalidated.parameters(), strict=True))
    # The monitor measured x, the weights validation evaluates: a float64 reference from the optimizer's state.
    for name in ("features.0", "features.3", "head"):
        w0 = initial.get_parameter(f"{name}.weight").detach().double()
        x = optimizer.iterates[straight.get_parameter(f"{name}.weight")]["x"].double()
        expected = 1 - float((x * w0).sum() / (x.norm() * w0.norm()))
        assert callback.last_rotation[name] == pytest.approx(expected, rel=1e-5)
