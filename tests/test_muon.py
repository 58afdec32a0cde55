"""Muon: Layca around ``torch.optim.Muon`` and around :class:`~lightning_layca.MuonWithAdamW`, its equilibrium rate,
convolution weights flattened to 2-D, and the Muon+AdamW recipe through a Lightning fit and through YAML."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.nn.utils import parametrize

import lightning_layca as ll
from lightning_layca.step.equilibrium import muon_correlation, polar_correlation_terms
from lightning_layca.step.families import equilibrium_rate
from tests.tiny_modules import TinyCNN, loader

RATE = 0.01


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16, bias=False), nn.Tanh(), nn.Linear(16, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False)
    )


def tangents_and_norms(before: torch.Tensor, after: torch.Tensor, per_unit: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 reference: tan of the angle of one step, and the norm after it (per layer, or per row)."""
    dims = (1,) if per_unit else (0, 1)
    cos = (before * after).sum(dims) / (before.norm(dim=dims) * after.norm(dim=dims))
    return torch.tan(torch.acos(cos.clamp(max=1.0))), after.norm(dim=dims)


@pytest.mark.parametrize("implementation", ["eager", "compiled"])
@pytest.mark.parametrize("granularity", ["layer", "unit"])
def test_layca_around_muon_turns_every_layer_by_the_rate_and_keeps_its_norm(implementation: str, granularity: str):
    net = mlp()
    opt = ll.Layca(
        torch.optim.Muon(net.parameters(), lr=0.02),
        net.named_parameters(),
        rotation_rate=RATE,
        implementation=implementation,
        granularity=granularity,
    )
    # Muon has no kernel of Layca's own: the compiled path works after Muon's step.
    assert set(opt.describe().values()) == {"eager" if implementation == "eager" else "compiled"}
    per_unit = granularity == "unit"
    initial = [tangents_and_norms(p.detach().double(), p.detach().double(), per_unit)[1] for p in net.parameters()]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
    tan_error = norm_error = 0.0
    for _ in range(50):
        before = [p.detach().double().clone() for p in net.parameters()]
        opt.zero_grad()
        (net(x) - y).square().mean().backward()
        opt.step()
        for b, p, n0 in zip(before, net.parameters(), initial, strict=True):
            tan, norm = tangents_and_norms(b, p.detach().double(), per_unit)
            tan_error = max(tan_error, float((tan - RATE).abs().max()))
            norm_error = max(norm_error, float(((norm - n0).abs() / n0).max()))
    assert tan_error < 1e-6
    assert norm_error < 1e-6


def test_plain_muon_neither_holds_the_angle_nor_the_norm():
    # The reference the test above is measured against: the same training without Layca drifts in both.
    net = mlp()
    opt = torch.optim.Muon(net.parameters(), lr=0.02)
    norms = [p.detach().double().norm() for p in net.parameters()]
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    tans = []
    for _ in range(50):
        before = [p.detach().double().clone() for p in net.parameters()]
        opt.zero_grad()
        (net(x) - y).square().mean().backward()
        opt.step()
        tans += [
            float(tangents_and_norms(b, p.detach().double(), False)[0])
            for b, p in zip(before, net.parameters(), strict=True)
        ]
    assert max(abs(t - RATE) for t in tans) > 1e-3
    assert (
        max(abs(float(p.detach().double().norm() / n) - 1) for p, n in zip(net.parameters(), norms, strict=True)) > 1e-2
    )


def flattened_conv_net() -> nn.Sequential:
    """A conv net whose convolution weight is a 2-D parameter (out, in * kh * kw), viewed as 4-D in the forward."""

    class Unflatten(nn.Module):
        def __init__(self, shape: torch.Size) -> None:
            super().__init__()
            self.shape = shape

        def forward(self, matrix: torch.Tensor) -> torch.Tensor:
            return matrix.view(self.shape)

        def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
            return weight.flatten(1)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3, bias=False))
    parametrize.register_parametrization(net[0], "weight", Unflatten(net[0].weight.shape))
    return net


def test_flattened_conv_weights_train_under_muon_and_turn_by_the_rate_per_filter():
    net = flattened_conv_net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.parametrizations.weight.original", "3.weight"]
    opt = ll.Layca(torch.optim.Muon(net.parameters(), lr=0.02), net.named_parameters(), granularity="unit")
    conv = net[0].parametrizations.weight.original
    assert conv.shape == (4, 18)
    before = net[0].weight.detach().double().clone()  # 4-D, as the convolution sees it
    net(torch.randn(8, 2, 6, 6)).square().mean().backward()
    opt.step()
    after = net[0].weight.detach().double()
    tan, norm = tangents_and_norms(before.flatten(1), after.flatten(1), per_unit=True)
    assert tan.tolist() == pytest.approx([ll.DEFAULT_ROTATION_RATE] * 4, abs=1e-6)
    assert norm.tolist() == pytest.approx(before.flatten(1).norm(dim=1).tolist(), rel=1e-6)


def muon_equilibrium_angle(
    momentum: float, nesterov: bool, adjust_lr_fn: str | None, steps: int, shape: tuple[int, int] = (64, 32)
) -> float:
    """Muon alone on one scale-invariant layer (random gradients orthogonal to it, of norm 1/||w||): the mean tan of
    the angle per step over the last quarter of the run."""
    generator = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(*shape, generator=generator))
    base = torch.optim.Muon(
        [w], lr=0.05, weight_decay=0.1, momentum=momentum, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn
    )
    tans = []
    for _ in range(steps):
        before = w.detach().clone()
        g = torch.randn(*shape, generator=generator)
        g -= (g * before).sum() / before.square().sum() * before
        w.grad = g / before.norm()
        base.step()
        tans.append(float(tangents_and_norms(before.double(), w.detach().double(), False)[0]))
    return sum(tans[-steps // 4 :]) / (steps // 4)


def muon_group(momentum: float, nesterov: bool, shape: tuple[int, int] = (64, 32)) -> dict:
    params = [nn.Parameter(torch.zeros(shape))]
    return {"params": params, "lr": 0.05, "weight_decay": 0.1, "momentum": momentum, "nesterov": nesterov}


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_muon_equilibrium_without_momentum_matches_a_simulation_whatever_the_lr_adjustment(adjust_lr_fn):
    # The lr adjustment scales the step but not the decay: it sets the equilibrium norm, not the angle.
    base = torch.optim.Muon([nn.Parameter(torch.ones(2, 2))])
    measured = muon_equilibrium_angle(0.0, False, adjust_lr_fn, steps=1200)
    assert measured == pytest.approx(equilibrium_rate(base, muon_group(0.0, False)), rel=0.03)
    assert equilibrium_rate(base, muon_group(0.0, False)) == pytest.approx(math.sqrt(2 * 0.05 * 0.1), rel=1e-12)


@pytest.mark.parametrize(
    ("nesterov", "shape"), [(True, (64, 32)), (False, (64, 32)), (True, (16, 64)), (False, (16, 64)), (True, (64, 64))]
)
def test_muon_equilibrium_with_momentum_matches_a_simulation_for_aspect_ratios_a_quarter_to_one(nesterov, shape):
    base = torch.optim.Muon([nn.Parameter(torch.ones(2, 2))])
    measured = muon_equilibrium_angle(0.9, nesterov, None, steps=2000, shape=shape)
    assert measured == pytest.approx(equilibrium_rate(base, muon_group(0.9, nesterov, shape)), rel=0.03)


def test_muon_correlation_reduces_to_the_momentum_buffers_own_when_orthogonalising_is_linear():
    # Reference: the buffers' coefficients a_j summed directly, K = (sum a_j)^2 / sum a_j^2 (no decay).
    for mu in (0.0, 0.5, 0.9, 0.95):
        plain = [(1 - mu) * mu**j for j in range(3000)]
        nesterov = [1 - mu**2] + [(1 - mu) * mu ** (j + 1) for j in range(1, 3000)]
        for coefficients, flag in ((plain, False), (nesterov, True)):
            direct = sum(coefficients) ** 2 / sum(a * a for a in coefficients)
            assert muon_correlation(mu, flag) == pytest.approx(direct, rel=1e-9)
            assert muon_correlation(mu, flag, (0.72, 0.14, 0.14), decay=0.99) <= direct


def test_polar_correlation_terms_match_the_correlation_of_polar_factors_of_gaussian_matrices():
    # References: Marchenko-Pastur's mean singular value of a square matrix, 8 / (3 pi) (unit mean square), and a
    # float64 sample of polar factors (exact SVDs) of matrices correlated by c.
    assert polar_correlation_terms(64, 64)[0] == pytest.approx((8 / (3 * math.pi)) ** 2, rel=1e-3)
    generator = torch.Generator().manual_seed(0)
    for rows, cols in ((128, 64), (32, 128)):  # square matrices: f is a rough upper bound there, not checked
        terms = polar_correlation_terms(rows, cols)
        assert sum(terms) == pytest.approx(1.0, rel=1e-12) and min(terms) >= 0
        assert terms == polar_correlation_terms(cols, rows)
        x = torch.randn(24, rows, cols, generator=generator, dtype=torch.float64)
        z = torch.randn(24, rows, cols, generator=generator, dtype=torch.float64)
        s = torch.linalg.svdvals(x)
        assert terms[0] == pytest.approx(float(s.mean() ** 2 / s.square().mean()), rel=0.01)
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        for c in (0.5, 0.9):
            u2, _, vh2 = torch.linalg.svd(c * x + math.sqrt(1 - c * c) * z, full_matrices=False)
            sample = float(((u @ vh) * (u2 @ vh2)).sum() / (24 * min(rows, cols)))
            assert sum(h * c**n for h, n in zip(terms, (1, 3, 5), strict=True)) == pytest.approx(sample, abs=0.01)


def test_layca_equilibrium_rate_of_muon_and_of_the_muon_adamw_pair():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    muon = ll.Layca(
        torch.optim.Muon([p for p in net.parameters() if p.ndim == 2], lr=0.02, weight_decay=0.1, momentum=0.0),
        [(n, p) for n, p in net.named_parameters() if p.ndim == 2],
        rotation_rate="equilibrium",
    )
    assert list(muon.rotation_rates().values()) == pytest.approx([math.sqrt(2 * 0.02 * 0.1)] * 2, rel=1e-12)
    pair = ll.MuonWithAdamW(
        [{"params": [net[0].weight], "lr": 0.02}, {"params": [net[2].weight], "use_muon": False, "lr": 1e-3}],
        weight_decay=0.1,
        momentum=0.0,
        adamw_betas=(0.8, 0.99),
        adamw_weight_decay=0.05,
    )
    opt = ll.Layca(pair, net.named_parameters(), rotation_rate="equilibrium")
    adamw = math.sqrt(2 * 1e-3 * 0.05 * 0.2 / 1.8)
    assert list(opt.rotation_rates().values()) == pytest.approx([math.sqrt(2 * 0.02 * 0.1), adamw], rel=1e-12)


def test_muon_with_adamw_steps_as_muon_and_adamw_side_by_side():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    twin = copy.deepcopy(net)
    pair = ll.MuonWithAdamW(net.parameters(), lr=0.02, adamw_lr=3e-3)
    assert [(g["use_muon"], [tuple(p.shape) for p in g["params"]]) for g in pair.param_groups] == [
        (True, [(16, 6), (3, 16)]),
        (False, [(16,), (3,)]),
    ]
    muon = torch.optim.Muon([p for p in twin.parameters() if p.ndim == 2], lr=0.02)
    adamw = torch.optim.AdamW([p for p in twin.parameters() if p.ndim != 2], lr=3e-3)
    x = torch.randn(8, 6)
    for _ in range(3):
        for model, optimizers in ((net, [pair]), (twin, [muon, adamw])):
            model.zero_grad()
            model(x).square().mean().backward()
            for optimizer in optimizers:
                optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters(), strict=True))


def test_muon_with_adamw_resumes_from_its_state_dict_bit_identically():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    pair = ll.Layca(ll.MuonWithAdamW(net.parameters()), net.named_parameters())
    x = torch.randn(8, 6)

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    for _ in range(3):
        step(net, pair)
    resumed_net = copy.deepcopy(net)
    resumed = ll.Layca(ll.MuonWithAdamW(resumed_net.parameters()), resumed_net.named_parameters())
    resumed.load_state_dict(copy.deepcopy(pair.state_dict()))
    for _ in range(2):
        step(net, pair)
        step(resumed_net, resumed)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), resumed_net.parameters(), strict=True))
    assert [len(g["params"]) for g in resumed.param_groups] == [2, 2]


def test_a_muon_group_with_a_convolution_weight_is_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"shapes \[\(4, 1, 3, 3\)\].*Flatten convolution weights"):
        ll.MuonWithAdamW([{"params": list(nn.Conv2d(1, 4, 3, bias=False).parameters()), "use_muon": True}])


class MuonTinyCNN(TinyCNN):
    def configure_optimizers(self):
        return ll.MuonWithAdamW(self.parameters(), lr=0.02, adamw_lr=1e-3)


def test_muon_with_adamw_under_the_layca_callback_through_a_fit(tmp_path: Path):
    model = MuonTinyCNN()
    callback = ll.LaycaCallback(rotation_rate=RATE, log_every_n_steps=1)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=4,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    conv_before = model.features[0].weight.detach().double().clone()
    linear_before = model.features[3].weight.detach().double().clone()
    trainer.fit(model, loader())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, ll.Layca) and isinstance(optimizer.optimizer, ll.MuonWithAdamW)
    # Conv (AdamW side) and linear layers (Muon side) alike rotate by 4 steps of atan(rate) at most, norms kept.
    for before, after in ((conv_before, model.features[0].weight), (linear_before, model.features[3].weight)):
        after = after.detach().double()
        assert float(after.norm()) == pytest.approx(float(before.norm()), rel=1e-6)
        cos = float((before * after).sum() / (before.norm() * after.norm()))
        assert 0 < math.acos(min(cos, 1.0)) <= 4 * math.atan(RATE) + 1e-6
    assert {"features.0", "features.3", "head"} <= set(callback.history)


def test_muon_with_adamw_from_yaml_under_the_layca_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from examples.cli import main

    monkeypatch.setattr(sys, "argv", ["examples.cli"])
    root = Path(__file__).resolve().parents[1]
    override = tmp_path / "muon.yaml"
    optimizer = {"class_path": "lightning_layca.MuonWithAdamW", "init_args": {"lr": 0.02, "adamw_lr": 1e-3}}
    override.write_text(yaml.safe_dump({"optimizer": optimizer}))
    args = [
        *("fit", "--config", str(root / "examples/configs/mnist1d_layca.yaml"), "--config", str(override)),
        *("--data.init_args.num_samples=400", f"--trainer.logger.init_args.save_dir={tmp_path}"),
        *("--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"),
        *("--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false"),
    ]
    cli = main(args)
    assert cli.trainer.global_step == 2
    (layca,) = cli.trainer.optimizers
    assert isinstance(layca, ll.Layca) and isinstance(layca.optimizer, ll.MuonWithAdamW)
    muon_side = [p.shape for g in layca.param_groups if g["use_muon"] for p in g["params"]]
    assert muon_side and all(len(shape) == 2 for shape in muon_side)


def test_step_cost_benchmark_prints_every_row_at_a_tiny_size():
    from benchmarks import muon_step_cost

    lines = muon_step_cost.main(["--width", "8", "--layers", "1", "--rounds", "1", "--steps", "1"])
    rows = [line.split(" | ")[0] for line in lines if line.startswith("| ") and "ms per step" not in line]
    assert rows == ["| Muon", "| Layca(Muon), eager", "| Layca(Muon), compiled"]
