"""The benchmarks' code paths at tiny sizes: step cost (parameter sets, per-tensor baseline, report) and memory."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import memory, step_cost
from benchmarks._shapes import SHAPE_SETS, numel
from lightning_layca import Layca

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "parameters", "tensors"),
    [
        ("resnet18", 11_689_512, 62),  # torchvision resnet18()
        ("resnet50", 25_557_032, 161),  # torchvision resnet50()
        ("vitb16", 86_567_656, 152),  # timm vit_base_patch16_224
        ("mlp200", 200 * (256 * 256 + 256), 400),
    ],
)
def test_shape_sets_match_published_parameter_counts(name: str, parameters: int, tensors: int) -> None:
    shapes = SHAPE_SETS[name]()
    assert sum(numel(s) for _, s in shapes) == parameters
    assert len(shapes) == tensors
    assert len({n for n, _ in shapes}) == tensors


def test_per_tensor_reference_takes_the_same_step_as_layca() -> None:
    # The speed comparison is only fair if the naive baseline computes the same step: one step from identical
    # parameters, gradients and (empty) momentum must agree to float32 rounding.
    shapes = step_cost.shrink(SHAPE_SETS["resnet18"]())
    fast = step_cost.make_param_set("resnet18", torch.device("cpu"), shapes=shapes, seed=3)
    naive = step_cost.make_param_set("resnet18", torch.device("cpu"), shapes=shapes, seed=3)
    before = [p.detach().clone() for p in fast.params]
    Layca(torch.optim.SGD(fast.params, lr=0.5, momentum=0.9), named_parameters=fast.named, rotation_rate=0.1).step()
    step_cost.PerTensorLayca(torch.optim.SGD(naive.params, lr=0.5, momentum=0.9), naive.layers, 0.1).step()
    for (name, p), q, w in zip(fast.named, naive.params, before, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        if p.ndim >= 2:  # the baseline really rotates: by atan(0.1) at constant norm
            cos = torch.dot(q.detach().flatten(), w.flatten()) / (q.detach().norm() * w.norm())
            assert math.isclose(math.acos(min(1.0, float(cos))), math.atan(0.1), rel_tol=2e-3)
            assert math.isclose(float(q.detach().norm()), float(w.norm()), rel_tol=1e-5)


# The bfloat16 rows take steps near bfloat16's rounding floor, which Layca rightly warns about.
@pytest.mark.filterwarnings("ignore:Layca. the base optimizer's steps .* within 100x:UserWarning")
def test_quick_run_writes_a_table_with_every_row(tmp_path: Path) -> None:
    out = tmp_path / "step_cost.md"
    step_cost.main(["--quick", "--device", "cpu", "--sets", "mlp200,resnet18@bf16", "--out", str(out)])
    text = out.read_text()
    assert "torch threads" in text and "load average" in text and "- device: CPU" in text
    rows = re.findall(r"^\| (.+?) \| ([0-9.]+) \| ([0-9.]+)-([0-9.]+) \| ([0-9.]+) \|", text, flags=re.MULTILINE)
    names = [r[0] for r in rows]
    for expected in (
        "SGD foreach",
        "Layca(SGD foreach) compiled",
        "Layca(SGD foreach) eager",
        "per-tensor reference (SGD foreach)",
        "prototype: SGD + Layca compiled together",
    ):
        assert expected in names
    assert names.count("per-tensor reference (SGD foreach)") == 1  # not timed on the bf16 set
    assert names.count("prototype: SGD + Layca compiled together") == 1  # float32 only
    assert names.count("SGD foreach") == 2
    assert names.count("Layca(SGD foreach) compiled") == 2
    for _, med, q1, q3, ratio in rows:
        assert 0 < float(q1) <= float(med) <= float(q3)
        assert float(ratio) > 0
    assert "bfloat16" in text and "#### Targets" in text
    assert 'default (`implementation="auto"`) for this set: compiled' in text
    assert "first step of the compiled rows" in text
    assert re.search(r"SGD's compiled layers \(per layer\) in this process: (one call|two halves)", text)


def test_unknown_set_is_rejected_with_the_accepted_names() -> None:
    with pytest.raises(SystemExit, match=r"unknown set 'resnet19'.*resnet18, resnet50, vitb16, mlp200"):
        step_cost.main(["--sets", "resnet19", "--device", "cpu"])


def test_memory_benchmark_reports_each_configuration_and_the_snapshot_copy_in_the_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "memory.md"
    args = ["--width", "256", "--depth", "2", "--steps", "2", "--rounds", "1", "--out", str(out)]
    memory.main([*args, "--configs", "no callback,LayerRotationMonitor"])
    text = out.read_text()
    assert "load average" in text and "131,584 parameters" in text
    row = r"^\| (.+?) \| (\d+) \| (\d+) \| ([+-][0-9.]+) \| ([0-9.]+) \| ([+-][0-9.]+) \|$"
    rows = {r[0]: r[1:] for r in re.findall(row, text, flags=re.MULTILINE)}
    assert list(rows) == ["no callback", "LayerRotationMonitor"]
    assert float(rows["no callback"][2]) == 0.0 and float(rows["no callback"][4]) == 0.0
    # The checkpoint holds one snapshot of the two 256 x 256 layers (99.6 % of the weights), plus a few names.
    assert float(rows["LayerRotationMonitor"][4]) == pytest.approx(1.0, abs=0.02)
    assert "temporaries of the epoch-end angle histograms (LayerRotationMonitor)" in text


# One fit of the memory benchmark in a fresh interpreter (as the benchmark runs each fit), with sums blocks of the
# given size; prints what fit_once measured, as JSON.
FIT_WITH_BLOCKS = """
import json, sys
from pathlib import Path
from benchmarks import memory
from lightning_layca import sums
sums.SUM_BLOCK_ELEMENTS = int(sys.argv[1])
print(json.dumps(memory.fit_once("LaycaCallback", width=64, depth=2, batch=4, steps=2, root=Path(sys.argv[2]))))
"""


def test_memory_benchmark_fit_with_layca_counts_the_temporaries_of_a_step(tmp_path: Path) -> None:
    # The eager step converts blocks of SUM_BLOCK_ELEMENTS elements to float64 (8 bytes each): with blocks smaller than
    # a layer (as in any real model) its temporaries are a few blocks, whatever the model's size.
    # In a fresh interpreter, as the benchmark runs each fit: the peak RSS (ru_maxrss, kept by the kernel from its
    # approximate per-CPU counters) is then this fit's, megabytes above the RSS at its start. In a long-lived pytest
    # process that the fit hardly grows, it read 256 KiB below the (exact) RSS at the fit's start.
    block = 512
    command = [sys.executable, "-c", FIT_WITH_BLOCKS, str(block), str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < measured["layca_step_temporaries"] <= 3 * 8 * block + 1024  # three blocks, and a few scalars
    assert measured["parameters"] == 2 * (64 * 64 + 64)
    assert measured["peak_rss"] >= measured["rss_at_fit_start"] > 0
    assert measured["checkpoint_bytes"] > 2 * measured["weight_bytes"]  # weights, momentum, the snapshot
    assert 0 <= measured["layca_step_temporaries"] < measured["weight_bytes"]
    assert 0 < measured["histogram_temporaries"] <= 3 * measured["largest_layer_bytes"]


def test_auto_under_load_reads_where_a_run_ended_and_its_stretches_on_the_slower_step() -> None:
    from benchmarks import auto_under_load

    # 20 eager steps, a trial of alternating turns of 5, 30 eager steps (a wrong choice), a trial, 40 compiled steps.
    trial = ([True] * 5 + [False] * 5) * 4
    taken = [False] * 20 + trial + [False] * 30 + trial + [True] * 40
    result = {"taken": taken, "reference_ms": {"eager": 40.0, "compiled": 20.0}}
    a = auto_under_load.analyse(result)
    assert (a["final"], a["faster"], a["first compiled step"]) == ("compiled", "compiled", 20)
    # The 30 eager steps run on from the trial's last (eager) turn: one stretch of 35 steps.
    assert (a["slower, longest stretch"], a["slower, all stretches"]) == (35, 35)
    # A run that stops in the middle of a trial ends on the choice before it.
    assert auto_under_load.analyse({**result, "taken": taken[:-40] + trial[:7]})["final"] == "eager"


def test_lora_finetune_quick_run_reports_every_run_with_dora_magnitudes_only_for_dora(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("sklearn")
    from benchmarks import lora_finetune

    out = tmp_path / "lora.md"
    lora_finetune.main(["--quick", "--seeds", "0", "--out", str(out)])
    rows = [
        line.split("|")[1:-1]
        for line in out.read_text().splitlines()
        if line.startswith("| lora") or line.startswith("| dora")
    ]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("lora", "monitor"),
        ("lora", "layca"),
        ("dora", "monitor"),
        ("dora", "layca"),
    ]
    for r in rows:
        accuracy, rotations, magnitudes = float(r[3]), [float(c) for c in r[4:7]], [c.strip() for c in r[7:9]]
        assert 0.0 <= accuracy <= 1.0
        assert all(0.0 < v < 2.0 for v in rotations)  # adapters and head moved, cosine distance in (0, 2)
        if r[0].strip() == "lora":
            assert magnitudes == ["-", "-"]
        else:
            assert all(float(m) > 0.0 for m in magnitudes)


def test_compile_cost_probes_run_against_the_current_package(tmp_path: Path) -> None:
    from benchmarks import compile_cost

    # The short-fit probe, in a fresh process as the benchmark runs it: two eager steps of a tiny MLP.
    fit = compile_cost._run(compile_cost._FIT, ["eager", "2", "8", "1"], str(tmp_path))
    assert fit["compiled_at_end"] is False and float(fit["seconds"]) > 0  # type: ignore[arg-type]
    # The compilation probe (a cold compilation of seven kernels when run) imports what exists and calls it as defined.
    imported = {}
    for node in ast.walk(ast.parse(compile_cost._COMPILE_PROBE)):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            for alias in node.names:
                imported[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
    ready = imported["compiled_step"].compiled_step_ready
    assert {"device", "dtype", "parallel", "variants"} <= set(inspect.signature(ready).parameters)
    kernels = imported["base_compiled"].base_step_kernels  # the kernels a form's layers call
    assert {"variants", "parallel", "sharded"} <= set(inspect.signature(kernels).parameters)


def test_the_fused_prototype_refuses_a_layer_without_a_lane_view_when_built() -> None:
    from benchmarks._prototypes import FusedSGDLayca

    named = [(name, torch.randn(shape, requires_grad=True)) for name, shape in (("dense", (4, 4)), ("odd", (3, 5)))]
    for _, p in named:
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        FusedSGDLayca(named, lr=0.1, momentum=0.9, rotation_rate=0.01)


def test_the_fused_prototype_refuses_a_layer_without_a_gradient_when_built() -> None:
    from benchmarks._prototypes import FusedSGDLayca

    named = [(name, torch.randn(4, 4, requires_grad=True)) for name in ("first", "second", "third")]
    named[0][1].grad, named[2][1].grad = torch.zeros(4, 4), torch.zeros(4, 4)  # the second has none
    with pytest.raises(ValueError, match=r"gradient.*\(4, 4\)"):
        FusedSGDLayca(named, lr=0.1, momentum=0.9, rotation_rate=0.01)
