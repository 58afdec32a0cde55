"""The alpha-experiment script: its grid, its model, and its quick code path on a tiny budget."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from torch import nn

from benchmarks import reproduce_alpha as ra


def test_full_grid_is_the_issues_grid_with_the_shared_configuration_run_once() -> None:
    configs = ra.configurations(quick=False)
    layca = [(c.alpha, c.rotation_rate) for c in configs if c.method == "layca"]
    sgd = [c.lr for c in configs if c.method == "sgd"]
    assert len(configs) == 12 == len(set(configs))
    assert sorted(a for a, r in layca if r == 3**-3) == [-0.6, -0.3, 0.0, 0.3, 0.6]
    assert sorted(r for a, r in layca if a == 0.0) == sorted([3**-2, 3**-3, 3**-4, 3**-5])
    assert sorted(sgd) == sorted([1.0, 3**-1, 3**-2, 3**-3])


def test_model_has_eight_layers_without_biases_or_affine_batch_norm() -> None:
    model = ra.AlphaExperimentCNN(width=8, lr=0.5, epochs=4)
    params = dict(model.named_parameters())
    assert len(params) == 8 and all(p.ndim >= 2 for p in params.values())
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 7 and not any(m.affine for m in norms)
    optimizer_config = model.configure_optimizers()
    sgd, scheduler = optimizer_config["optimizer"], optimizer_config["lr_scheduler"]["scheduler"]
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.5, 0.0, 0.0)
    assert sorted(scheduler.milestones) == [2, 3] and scheduler.gamma == pytest.approx(0.2)


def test_differences_use_the_standard_error_of_both_means() -> None:
    a = [{"test_acc": x} for x in (0.90, 0.92, 0.94)]  # mean 0.92, sample std 0.02
    b = [{"test_acc": x} for x in (0.80, 0.81, 0.82)]  # mean 0.81, sample std 0.01
    se = 100 * math.sqrt(0.02**2 / 3 + 0.01**2 / 3)  # 1.29 points
    assert ra.difference(a, b) == f"+11.00 ± {se:.2f} points, {11 / se:+.1f} standard errors (distinguishable)"
    assert ra.difference(a, [{"test_acc": x} for x in (0.90, 0.91, 0.92)]).endswith("(not distinguishable)")


def test_quick_path_writes_every_run_the_table_and_the_figure(tmp_path: Path) -> None:
    results, table, figure = tmp_path / "runs.jsonl", tmp_path / "table.md", tmp_path / "curves.png"
    tiny = ["--epochs", "2", "--limit-train-batches", "2", "--num-samples", "300", "--width", "8", "--threads", "1"]
    paths = ["--results", str(results), "--table", str(table), "--figure", str(figure)]
    ra.main(["--quick", *tiny, *paths])

    records = [json.loads(line) for line in results.read_text().splitlines()]
    quick = ra.configurations(quick=True)
    assert sorted(map(ra.config_of, records), key=str) == sorted(quick, key=str) and len(quick) == 5
    for r in records:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["train_acc"] <= 1.0
        assert len(r["rotation"]) == 8  # one curve per layer, epochs 0..2, starting at 0
        for curve in r["rotation"].values():
            assert len(curve) == 3 and curve[0] == 0.0 and all(0.0 <= v <= 2.0 for v in curve)

    text = table.read_text()
    for config in quick:
        row = next(line for line in text.splitlines() if line.startswith(f"| {config.label} |"))
        assert re.match(r"\| .+? \| \*\*\d+\.\d\*\* \| 1 \| \d+\.\d \|", row), row
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig = ra.curves_figure(records)
    panels = [ax for ax in fig.axes if ax.get_title().startswith("Layca, alpha")]
    assert [ax.get_title().split(" (")[0] for ax in panels] == [f"Layca, alpha = {a}" for a in ("-0.6", "0", "+0.6")]
    assert all(len(ax.get_lines()) == 8 for ax in panels)

    # Resuming finds nothing left to run; --report-only rebuilds the same table from the saved runs.
    before = results.read_text()
    ra.main(["--quick", *tiny, *paths])
    assert results.read_text() == before
    table.unlink()
    ra.main(["--quick", "--report-only", *paths])
    assert table.read_text() == text


def test_docs_page_shows_the_tables_and_differences_of_the_saved_runs() -> None:
    # docs/reproduction.md quotes the report of the committed runs: every row and every difference must match them.
    records = ra.load_records(ra.FULL_OUTPUTS[0])
    assert len(records) >= 3
    generated = ra.report(records, quick=False)
    quoted = [line for line in generated if line.startswith(("| ", "- alpha = 0 minus", "- Layca", "- best "))]
    page = (ra.ROOT / "docs" / "reproduction.md").read_text()
    missing = [line for line in quoted if line not in page]
    assert not missing, missing
    assert ra.FULL_OUTPUTS[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
