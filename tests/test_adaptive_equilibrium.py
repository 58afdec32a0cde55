"""The adaptive-optimizer experiment and the fit-failure study: their configurations, quick code paths on a tiny
budget, and the docs pages that quote their saved results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import adaptive_equilibrium as ae
from benchmarks import layca_fit_failures as lf
from lightning_layca.step.families import equilibrium_rate

TINY = ["--epochs", "2", "--limit-train-batches", "3", "--num-samples", "300", "--width", "8", "--threads", "1"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_configurations_are_adamw_three_laycas_around_it_and_plain_sgd() -> None:
    configs = ae.configurations()
    assert [c.label for c in configs] == [
        "AdamW",
        "Layca(AdamW), rate 3^-5",
        "Layca(AdamW), equilibrium rate",
        "Layca(AdamW), equilibrium rate, per unit",
        "SGD, lr = 3^-1",
    ]
    adamw = [c for c in configs if c.uses_adamw]
    assert {(c.lr, c.weight_decay) for c in adamw} == {(1e-3, 1e-2)}  # torch.optim.AdamW's defaults
    assert (configs[-1].lr, configs[-1].weight_decay) == (3**-1, 0.0)


def test_model_trains_with_adamw_at_torch_defaults_or_plain_sgd() -> None:
    adamw = ae.AdaptiveExperimentCNN(8, 4, "adamw", 1e-3, 1e-2).configure_optimizers()["optimizer"]
    defaults = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).defaults
    assert isinstance(adamw, torch.optim.AdamW)
    for key in ("lr", "betas", "weight_decay", "eps", "amsgrad"):
        assert adamw.defaults[key] == defaults[key], key
    sgd = ae.AdaptiveExperimentCNN(8, 4, "sgd", 0.5, 0.0).configure_optimizers()["optimizer"]
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.0


def test_equilibrium_line_of_the_figure_is_the_packages_formula() -> None:
    model = ae.AdaptiveExperimentCNN(8, 4, "adamw", 1e-3, 1e-2)
    optimizer = model.configure_optimizers()["optimizer"]
    for lr in (1e-3, 2e-4, 4e-5):
        group = {**optimizer.param_groups[0], "lr": lr}
        assert ae.adamw_equilibrium_rate(lr) == pytest.approx(equilibrium_rate(optimizer, group), rel=1e-12)


def test_quick_path_records_rates_and_norms_and_resumes(tmp_path: Path) -> None:
    paths = [
        *("--results", str(tmp_path / "runs.jsonl"), "--table", str(tmp_path / "report.md")),
        *("--figure", str(tmp_path / "rotation.png"), "--rates-figure", str(tmp_path / "rates.png")),
    ]
    ae.main(["--quick", "--epochs", "4", *TINY[2:], *paths])
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(map(ae.config_of, records), key=str) == sorted(ae.configurations(), key=str)
    for r in records:
        assert len(r["rotation"]) == len(r["rates"]) == len(r["norms"]) == len(r["initial_norms"]) == 8
        assert r["rate_steps"] == [7]  # 2 batches per epoch, measured every 8 steps: the 8th step, in epoch 4
        config = ae.config_of(r)
        if config.method == "layca-adamw":  # the measured rate is the rate Layca set, for layers and units alike
            lr = ae.step_lr(config, 7, r["steps_per_epoch"], r["epochs"])
            expected = ae.adamw_equilibrium_rate(lr) if config.rotation_rate == "equilibrium" else 3**-5 * lr / 1e-3
            for name, rates in r["rates"].items():
                assert rates[0] == pytest.approx(expected, rel=5e-3), name  # saved to 3 significant digits
                assert r["norms"][name][0] == pytest.approx(r["initial_norms"][name], rel=1e-3), name  # 4 digits
    text = (tmp_path / "report.md").read_text()
    assert all(f"| {c.label} | **" in text for c in ae.configurations())
    assert "| AdamW's equilibrium rate at that epoch's lr (formula) |" in text
    assert (tmp_path / "rotation.png").read_bytes()[:8] == PNG and (tmp_path / "rates.png").read_bytes()[:8] == PNG

    before = (tmp_path / "runs.jsonl").read_text()
    (tmp_path / "report.md").unlink()
    ae.main(["--quick", "--report-only", *paths])
    assert (tmp_path / "runs.jsonl").read_text() == before
    assert (tmp_path / "report.md").read_text() == text


def quoted_lines(lines: list[str]) -> list[str]:
    """The table rows and result bullets of a generated report (what a docs page must quote unchanged)."""
    return [
        line for line in lines if line.startswith(("| ", "- float")) or (line.startswith("- ") and " minus " in line)
    ]


def test_adaptive_page_shows_the_tables_and_differences_of_the_saved_runs() -> None:
    records = ae.load_records(ae.FULL_OUTPUTS[0])
    assert len(records) == 15
    generated = ae.report(records, quick=False)
    page = (ae.ROOT / "docs" / "adaptive.md").read_text()
    missing = [line for line in quoted_lines(generated) if line not in page]
    assert not missing, missing
    for figure in ae.FULL_OUTPUTS[2:]:
        assert figure.read_bytes()[:8] == PNG


def test_failure_study_quick_path_checks_the_reference_and_finds_lost_classes(tmp_path: Path) -> None:
    paths = ["--results", str(tmp_path / "runs.jsonl"), "--table", str(tmp_path / "report.md")]
    lines = lf.main(["--quick", *TINY, *paths])
    records = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [lf.config_of(r).label for r in records] == [c.label for c, _ in lf.plan(quick=True)]
    reference = next(r for r in records if r["kind"] == "reference")
    assert reference["float32_step_error"] < 1e-6  # float32 rounding of the same step
    assert max(reference["float64_divergence"].values()) < 1e-12
    loop = next(r for r in records if r["kind"] == "loop" and r["head"] == "layca")
    assert len(loop["recall"]) == 10 and all(0.0 <= x <= 1.0 for x in loop["recall"])
    # Checking every step against the reference leaves the trajectory alone: the replay ends where the loop did.
    assert (reference["float32"]["test_acc"], reference["float32"]["recall"]) == (loop["test_acc"], loop["recall"])
    assert any(line.startswith("| Layca, alpha = 0, rotation rate = 3^-2 |") for line in lines)


def test_reproduction_page_shows_the_failure_study_of_the_saved_runs() -> None:
    records = lf.load_records(lf.OUTPUTS[0])
    assert records
    generated = lf.report(records, quick=False)
    page = (lf.ROOT / "docs" / "reproduction.md").read_text()
    missing = [line for line in quoted_lines(generated) if line not in page]
    assert not missing, missing
