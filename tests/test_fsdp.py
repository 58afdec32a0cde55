"""The rotation callbacks under sharded training: ``ModelParallelStrategy`` (FSDP2, tensor parallel), CPU over gloo.

Each fixture runs one fit as a script (``python -m tests.fsdp_helpers``; Lightning relaunches it for every other rank)
with :class:`tests.fsdp_helpers.ShardedProbe`, which records every rank's view to a file; the tests compare those
views across ranks and with a one-process fit of the same network on the same global batches. Every layer is
sharded; the head has one row, so its shard on data-parallel rank 1 is empty.

Runs (16 optimizer steps of SGD with momentum, ``log_every_n_steps=2``, unless stated):

* ``layca``: ``LaycaCallback``, data-parallel 2; after epoch 0 it saves a distributed checkpoint and a single file;
* ``layca_resumed_dcp`` / ``layca_resumed_file``: resumed from each of them, from other initial weights (8 steps);
* ``monitor_adamw``: ``LayerRotationMonitor`` alone, AdamW, data-parallel 2;
* ``layca_compiled``: as ``layca`` (without checkpoints), with ``implementation="compiled"``;
* ``layca_compiled_adamw``: the same around AdamW;
* ``layca_tp``: tensor-parallel 2 (one layer's rows split, one layer's columns split, the rest replicated);
* ``layca_units_2x2``: data-parallel 2 x tensor-parallel 2 (4 processes), ``granularity="unit"``;
* ``*_single``: one process, no sharding: the references.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

from lightning_layca import LaycaCallback, LayerRotationMonitor
from lightning_layca.callbacks.monitor import FIGURE_FILENAME
from lightning_layca.callbacks.strategies import MULTI_GPU_DOCS, check_strategy
from lightning_layca.distributed import full_sums, shard_layout
from lightning_layca.step import rotate_eager
from tests.ddp_helpers import assert_same, read_events, scalars_with_prefix
from tests.fsdp_helpers import LAYERS, LOG_EVERY, ROTATION_RATE, fit_single

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300

WEIGHT_TOL = 1e-5  # relative, sharded fit against one process: only summation orders differ
NORM_TOL = 1e-6  # relative, a full layer's norm against its initial norm
ANGLE_TOL = 1e-6  # radians, a full layer's angle per step against atan(rho) ~ 0.037
ROTATION_TOL = 1e-5  # cosine distance, logged by a sharded fit against one process

SHARDED_LAYCA_RUNS = ["layca", "layca_compiled", "layca_compiled_adamw", "layca_tp", "layca_units_2x2"]
LAYCA_RUNS = [*SHARDED_LAYCA_RUNS, "layca_resumed_dcp", "layca_resumed_file"]
ALL_RUNS = [*LAYCA_RUNS, "monitor_adamw"]
STEPS = dict.fromkeys(ALL_RUNS, 16) | {"layca_resumed_dcp": 8, "layca_resumed_file": 8}
REFERENCE = dict.fromkeys(ALL_RUNS, "layca_single") | {
    "monitor_adamw": "monitor_single",
    "layca_units_2x2": "layca_units_single",
    "layca_compiled_adamw": "layca_adamw_single",
}


@dataclass
class Run:
    root: Path
    ranks: list[dict[str, Any]]

    def events(self) -> Any:
        (log_dir,) = (self.root / "logs").iterdir()
        return read_events(log_dir)


def _load_run(root: Path) -> Run:
    files = sorted((root / "probe").glob("rank*.pt"))
    ranks = [torch.load(f, weights_only=False) for f in files]
    assert [f.name for f in files] == [f"rank{r}.pt" for r in range(ranks[0]["world_size"])]
    return Run(root, ranks)


def _launch(root: Path, run: str, resume: Path | None = None) -> Run:
    command = [sys.executable, "-m", "tests.fsdp_helpers", str(root), "--run", run]
    if resume is not None:
        command += ["--resume", str(resume)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-6000:]
    return _load_run(root)


@pytest.fixture(scope="module")
def layca(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _launch(tmp_path_factory.mktemp("layca"), "layca")


@pytest.fixture(scope="module")
def layca_resumed_dcp(layca: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _launch(tmp_path_factory.mktemp("dcp"), "layca_resumed_dcp", layca.root / "checkpoints" / "epoch0_dcp")


@pytest.fixture(scope="module")
def layca_resumed_file(layca: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _launch(tmp_path_factory.mktemp("file"), "layca_resumed_file", layca.root / "checkpoints" / "epoch0.ckpt")


@pytest.fixture(scope="module")
def monitor_adamw(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _launch(tmp_path_factory.mktemp("monitor_adamw"), "monitor_adamw")


@pytest.fixture(scope="module")
def layca_compiled(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _launch(tmp_path_factory.mktemp("layca_compiled"), "layca_compiled")


@pytest.fixture(scope="module")
def layca_compiled_adamw(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _launch(tmp_path_factory.mktemp("layca_compiled_adamw"), "layca_compiled_adamw")


@pytest.fixture(scope="module")
def layca_tp(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _launch(tmp_path_factory.mktemp("layca_tp"), "layca_tp")


@pytest.fixture(scope="module")
def layca_units_2x2(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _launch(tmp_path_factory.mktemp("layca_units_2x2"), "layca_units_2x2")


@pytest.fixture(scope="module")
def layca_single(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("layca_single")
    fit_single(root, "layca", "sgd")
    return _load_run(root)


@pytest.fixture(scope="module")
def layca_adamw_single(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("layca_adamw_single")
    fit_single(root, "layca", "adamw")
    return _load_run(root)


@pytest.fixture(scope="module")
def layca_units_single(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("layca_units_single")
    fit_single(root, "layca_units", "sgd")
    return _load_run(root)


@pytest.fixture(scope="module")
def monitor_single(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("monitor_single")
    fit_single(root, "monitor", "adamw")
    return _load_run(root)


def _run(request: pytest.FixtureRequest, name: str) -> Run:
    run = request.getfixturevalue(name)
    assert isinstance(run, Run)
    return run


# ------------------------------------------------------------------------------------------------ the set-up
def test_every_layer_is_sharded_and_the_one_row_heads_shard_is_empty_on_rank_1(layca: Run) -> None:
    rank0, rank1 = layca.ranks
    assert rank0["sharded"] == rank1["sharded"] == [True] * len(LAYERS)
    assert rank0["local_rows"] == [2, 4, 3, 1]
    assert rank1["local_rows"] == [2, 4, 3, 0]


@pytest.mark.parametrize("name", ["layca_compiled", "layca_compiled_adamw"])
def test_the_compiled_run_steps_every_shard_with_a_lane_view_with_the_compiled_kernels(
    request: pytest.FixtureRequest, name: str
) -> None:
    rank0, rank1 = _run(request, name).ranks
    # Around SGD and AdamW the kernels take the base step of the shards too (the state half, then the update half).
    # A shard whose size is not a multiple of 4 has no lane view (compiling.kernel_view): the convolution's two rows
    # of 9 and the head's row of 6 take the eager step, and so does the head's shard of no rows; their sums join the
    # compiled shards' in the step's one collective.
    compiled = {f"net.{layer}.weight": "compiled+base" for layer in LAYERS}
    eager = {"net.features.0.weight": "eager", "net.head.weight": "eager"}
    assert rank0["paths"] == [compiled | eager]
    assert rank1["paths"] == [compiled | eager]


# ------------------------------------------------------------------------------------ against one process
@pytest.mark.parametrize("name", SHARDED_LAYCA_RUNS)
def test_sharded_layca_fit_ends_with_the_weights_of_one_process(request: pytest.FixtureRequest, name: str) -> None:
    run, reference = _run(request, name), _run(request, REFERENCE[name])
    expected = reference.ranks[0]["weights"]
    for rank in run.ranks:
        assert rank["global_step"] == STEPS[name]
        assert rank["weights"].keys() == expected.keys()
        for key, w in expected.items():
            torch.testing.assert_close(rank["weights"][key], w, rtol=WEIGHT_TOL, atol=WEIGHT_TOL * float(w.abs().max()))
        for layer in LAYERS:  # the weights did move: the comparison means something
            start = reference.ranks[0]["end_state"]["initial"][LAYERS.index(layer)]
            assert not torch.allclose(expected[f"net.{layer}.weight"], start, rtol=100 * WEIGHT_TOL)


@pytest.mark.parametrize(
    "name", ["layca", "layca_compiled", "layca_compiled_adamw", "layca_tp", "layca_resumed_dcp", "layca_resumed_file"]
)
def test_every_step_turns_each_full_layer_by_atan_rho_and_keeps_its_norm(
    request: pytest.FixtureRequest, name: str
) -> None:
    for rank in _run(request, name).ranks:
        assert len(rank["step_angles"]) == STEPS[name]
        for angles, ratios in zip(rank["step_angles"], rank["norm_ratios"], strict=True):
            assert angles == pytest.approx([math.atan(ROTATION_RATE)] * len(LAYERS), abs=ANGLE_TOL)
            assert ratios == pytest.approx([1.0] * len(LAYERS), rel=NORM_TOL)


def test_every_step_turns_each_full_unit_by_atan_rho_or_leaves_it_as_one_process_does(
    layca_units_2x2: Run, layca_units_single: Run
) -> None:
    # A unit whose ReLU is dead on the whole batch gets no gradient and stays put (in one process as well).
    (reference,) = layca_units_single.ranks
    atan_rho = math.atan(ROTATION_RATE)
    for rank in layca_units_2x2.ranks:
        assert len(rank["unit_angles"]) == STEPS["layca_units_2x2"]
        steps = zip(rank["unit_angles"], rank["unit_norm_ratios"], reference["unit_angles"], strict=True)
        for angles, ratios, expected in steps:
            moved = expected > atan_rho / 2
            assert moved.float().mean() > 0.75
            torch.testing.assert_close(angles[moved], torch.full_like(angles[moved], atan_rho), atol=ANGLE_TOL, rtol=0)
            torch.testing.assert_close(angles[~moved], torch.zeros_like(angles[~moved]), atol=ANGLE_TOL, rtol=0)
            torch.testing.assert_close(ratios, torch.ones_like(ratios), rtol=NORM_TOL, atol=0)


@pytest.mark.parametrize("name", ["layca", "layca_tp", "layca_units_2x2", "monitor_adamw"])
def test_sharded_fit_logs_the_tags_and_rotations_of_one_process(request: pytest.FixtureRequest, name: str) -> None:
    events, reference = _run(request, name).events(), _run(request, REFERENCE[name]).events()
    for kind in ("scalars", "histograms", "images", "tensors"):
        assert sorted(events.Tags()[kind]) == sorted(reference.Tags()[kind]), kind
    rotation, expected = scalars_with_prefix(events, "Rotation"), scalars_with_prefix(reference, "Rotation")
    rotation |= scalars_with_prefix(events, "Step_rotation/")
    expected |= scalars_with_prefix(reference, "Step_rotation/")
    assert {f"Rotation/net.{layer}" for layer in LAYERS} <= expected.keys()
    for tag, points in expected.items():
        assert [s for s, _ in rotation[tag]] == [s for s, _ in points], tag
        assert [v for _, v in rotation[tag]] == pytest.approx([v for _, v in points], abs=ROTATION_TOL), tag
    assert min(v for _, v in expected["Rotation_summary/min"][-1:]) > 100 * ROTATION_TOL  # every layer turned
    # `Step_rotation/*` (tan of each step's angle) is among the tags compared above; the norms are relative.
    assert {f"Step_rotation/net.{layer}" for layer in LAYERS} <= expected.keys()
    norms, expected_norms = scalars_with_prefix(events, "Weight_norm/"), scalars_with_prefix(reference, "Weight_norm/")
    assert norms.keys() == expected_norms.keys() == {f"Weight_norm/net.{layer}" for layer in LAYERS}
    for tag, points in expected_norms.items():
        assert [v for _, v in norms[tag]] == pytest.approx([v for _, v in points], rel=WEIGHT_TOL), tag


@pytest.mark.parametrize("name", ["layca", "layca_units_2x2", "monitor_adamw"])
def test_sharded_fit_writes_the_histograms_of_one_process(request: pytest.FixtureRequest, name: str) -> None:
    events, reference = _run(request, name).events(), _run(request, REFERENCE[name]).events()
    tags = reference.Tags()["histograms"]
    assert len([t for t in tags if t.startswith("Unit_angle/")]) == len(LAYERS)
    if name == "layca_units_2x2":  # the last step's rate of every unit, with per-unit control
        assert len([t for t in tags if t.startswith("Unit_step_rotation/")]) == len(LAYERS)
    for tag in tags:
        got, expected = events.Histograms(tag), reference.Histograms(tag)
        assert [h.step for h in got] == [h.step for h in expected], tag
        # Angles in degrees; rates as tan of the angle (about 0.037 each, or 0 for a unit that did not move).
        tol = 1e-3 if tag.startswith("Unit_angle/") else 1e-6
        for g, e in zip(got, expected, strict=True):
            h, h_expected = g.histogram_value, e.histogram_value
            assert h.num == h_expected.num, tag
            assert (h.min, h.max, h.sum) == pytest.approx((h_expected.min, h_expected.max, h_expected.sum), abs=tol), (
                tag
            )
            if tag.startswith("Unit_angle/"):  # spread-out values: the same counts in every bin
                assert list(h.bucket) == list(h_expected.bucket), tag
            # The rates of a layer's moving units are all rho but for rounding: their bins split the
            # rounding noise, which differs with the order of the sums.


@pytest.mark.parametrize("name", [*SHARDED_LAYCA_RUNS, "monitor_adamw"])
def test_snapshot_in_the_callback_state_is_the_full_initial_weights(request: pytest.FixtureRequest, name: str) -> None:
    run, reference = _run(request, name), _run(request, REFERENCE[name])
    # Gathered from the shards for the checkpoint (global rank 0's copy is the one Lightning writes).
    assert_same(run.ranks[0]["end_state"]["initial"], reference.ranks[0]["end_state"]["initial"], "initial")


# ------------------------------------------------------------------------------------------------ collectives
@pytest.mark.parametrize("name", LAYCA_RUNS)
def test_layca_step_issues_exactly_one_all_reduce(request: pytest.FixtureRequest, name: str) -> None:
    for rank in _run(request, name).ranks:
        assert rank["layca_all_reduces"] == [1] * STEPS[name]
    # In the tensor-parallel run every layer is a (device, dtype) group of its own: their sums go together.
    assert _run(request, name).ranks[0]["layca_groups"] == [len(LAYERS) if name == "layca_tp" else 1]


@pytest.mark.parametrize("name", ALL_RUNS)
def test_monitor_issues_one_all_reduce_per_logging_step_and_none_in_between(
    request: pytest.FixtureRequest, name: str
) -> None:
    for rank in _run(request, name).ranks:
        expected = [1 if (step + 1) % LOG_EVERY == 0 else 0 for step in range(STEPS[name])]
        assert rank["monitor_all_reduces"] == expected


@pytest.mark.parametrize("name", ALL_RUNS)
def test_ranks_issue_the_same_all_reduces_in_the_same_order(request: pytest.FixtureRequest, name: str) -> None:
    ranks = _run(request, name).ranks
    for rank in ranks[1:]:
        assert rank["trace"] == ranks[0]["trace"]
    assert ranks[0]["trace"][-1] >= STEPS[name] // LOG_EVERY


def test_one_process_issues_no_all_reduce(layca_single: Run, monitor_single: Run) -> None:
    for run in (layca_single, monitor_single):
        (rank,) = run.ranks
        assert set(rank["layca_all_reduces"]) <= {0}
        assert set(rank["monitor_all_reduces"]) == {0}


# ---------------------------------------------------------------------------------------------------- logging
@pytest.mark.parametrize("name", ["layca", "monitor_adamw"])
def test_only_global_rank_zero_writes_logs_and_figures(request: pytest.FixtureRequest, name: str) -> None:
    run = _run(request, name)
    rank0, rank1 = run.ranks
    assert set(rank1["writes"].values()) == {0}, rank1["writes"]
    for entry in ("add_scalar", "add_histogram_raw", "add_image", "Figure.__init__", "FigureCanvasAgg.draw"):
        assert rank0["writes"][entry] > 0, entry
    assert len(list(run.root.rglob("events.out.tfevents.*"))) == 1
    assert len(list(run.root.rglob(FIGURE_FILENAME))) == 1


# ----------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("name", ["layca_resumed_dcp", "layca_resumed_file"])
def test_resumed_run_is_bit_identical_to_the_uninterrupted_one(
    request: pytest.FixtureRequest, name: str, layca: Run
) -> None:
    resumed = _run(request, name)
    for rank, uninterrupted in zip(resumed.ranks, layca.ranks, strict=True):
        assert_same(rank["weights"], uninterrupted["weights"], "weights")
        assert_same(rank["end_state"]["history"], uninterrupted["end_state"]["history"], "history")
        assert_same(rank["end_state"]["epoch_rotation"], uninterrupted["end_state"]["epoch_rotation"], "epochs")
        assert_same(rank["end_state"]["initial"], uninterrupted["end_state"]["initial"], "initial")
        assert_same(rank["end_layca"], uninterrupted["end_layca"], "layca state")
        (at_start,) = rank["train_start_layca"]
        assert at_start["step_count"] == STEPS[name]
        assert at_start["initial_norms"] == uninterrupted["end_layca"][0]["initial_norms"]


# --------------------------------------------------------------------------------------------------- example
def test_the_fsdp2_example_of_the_docs_runs_and_logs_rotation(tmp_path: Path) -> None:
    # The script of docs/multi-gpu.md, as printed there: 2 processes, each building and sharding the model.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "examples.fsdp2", "--max-steps", "8"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-6000:]
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    printed = result.stdout.splitlines()  # once (global rank 0), as the demo prints them
    assert [line for line in printed if line.startswith("TensorBoard logs: ")] == [f"TensorBoard logs: {log_dir}"]
    assert f"Layer rotation curves: {log_dir / 'layer_rotation_curves.png'}" in printed
    assert any(line.startswith("View them next to accuracy: ") and "--logdir" in line for line in printed)
    rotation = scalars_with_prefix(read_events(log_dir), "Rotation/")
    assert len(rotation) == 10  # the first layer, 2 in each of the 4 blocks, the head
    assert all(0 < points[-1][1] < 1 for points in rotation.values())


# ------------------------------------------------------------------------------------------------ strategies
def test_model_parallel_and_single_device_strategies_are_accepted() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    check_strategy(ModelParallelStrategy(), "LaycaCallback")
    check_strategy(SingleDeviceStrategy("cpu"), "LaycaCallback")


def test_fsdp1_is_refused_naming_model_parallel_strategy() -> None:
    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy") as error:
        check_strategy(FSDPStrategy(), "LayerRotationMonitor")
    assert "1-D slices" in str(error.value) and MULTI_GPU_DOCS in str(error.value)


def test_deepspeed_is_refused_with_the_reason() -> None:
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # constructing one needs the deepspeed package
    with pytest.raises(MisconfigurationException, match="no layer boundaries") as error:
        check_strategy(strategy, "LaycaCallback")
    assert MULTI_GPU_DOCS in str(error.value)


@pytest.mark.parametrize("callback", [LayerRotationMonitor, LaycaCallback])
def test_callbacks_refuse_fsdp1_in_setup(callback: type[LayerRotationMonitor]) -> None:
    import lightning as L

    # Lightning itself refuses FSDP1 on CPU when a Trainer is built: the callback sees only the strategy in `setup`.
    trainer: Any = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy"):
        callback().setup(trainer, L.LightningModule(), "fit")


def test_the_seam_is_the_identity_without_sharding() -> None:
    layout = shard_layout([torch.ones(3, 2), torch.ones(5, 4)])
    partial = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert not layout.sharded and layout.divisors() is None and layout.row_divisors() is None
    assert full_sums(partial, layout.divisors()) is partial  # no collective (no process group exists here)
    assert layout.local_rows == layout.rows == (3, 5) and layout.row_starts == (0, 0)


# ------------------------------------------------------------------------------------ the summed form, one process
def _reference_step(w: torch.Tensor, p: torch.Tensor, rate: float, per_unit: bool) -> torch.Tensor:
    """DESIGN.md's four lines in float64 per layer (per row), the initial norm being the norm before the step."""
    rows_w, rows_p = (
        w.double().reshape(w.shape[0] if per_unit else 1, -1),
        p.double().reshape(w.shape[0] if per_unit else 1, -1),
    )
    d = rows_p - rows_w
    perp = d - ((d * rows_w).sum(1, keepdim=True) / (rows_w * rows_w).sum(1, keepdim=True)) * rows_w
    norm_w = rows_w.norm(dim=1, keepdim=True)
    out = rows_w + rate * norm_w / perp.norm(dim=1, keepdim=True) * perp
    return (out * norm_w / out.norm(dim=1, keepdim=True)).reshape(w.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_unit", [False, True])
def test_the_eager_step_through_its_sums_matches_a_float64_reference(per_unit: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (16, 36), (2, 16)]
    weights = [torch.randn(shape, generator=g).to(dtype) for shape in shapes]
    originals = [w.clone() for w in weights]
    params = [w + 0.01 * torch.randn(w.shape, generator=g).to(dtype) for w in weights]
    expected = [_reference_step(w, p, 0.1, per_unit) for w, p in zip(weights, params, strict=True)]
    n = sum(w.shape[0] for w in weights) if per_unit else len(weights)
    ones = torch.ones(n, dtype=torch.float64)
    rows = [w.double().reshape(w.shape[0] if per_unit else 1, -1).norm(dim=1) for w in weights]
    rotate_eager(params, weights, 0.1 * ones, ones, torch.cat(rows), per_unit=per_unit)
    for w, w0 in zip(weights, originals, strict=True):
        assert torch.equal(w, w0)  # the sums read the weights before the step, never write them
    atol = 1e-6 if dtype == torch.float32 else 1e-12  # rounding of a step of norm 0.1 |w|
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.double(), e, rtol=0, atol=atol)


def test_the_eager_step_leaves_a_layer_with_a_non_finite_step_exactly_where_it_was() -> None:
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(6, 5, generator=g), torch.randn(4, 6, generator=g)]
    params = [weights[0] + 0.01, weights[1].clone()]
    params[1][2, 3] = float("nan")
    ones = torch.ones(2, dtype=torch.float64)
    rotate_eager(params, weights, 0.1 * ones, ones, torch.stack([w.double().norm() for w in weights]))
    assert torch.equal(params[1], weights[1])
    assert not torch.equal(params[0], weights[0])  # the finite layer moved


BASE_OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01),  # no kernel takes its step
}


WORLD_OF_ONE_CASES = [
    *(
        (implementation, granularity, optimizer, 2)
        for implementation in ("eager", "compiled")
        for granularity in ("layer", "unit")
        for optimizer in sorted(BASE_OPTIMIZERS)
    ),
    # Five layers, each a bucket of its own: the sharded step calls the kernels of several buckets together.
    ("compiled", "layer", "sgd", 5),
    ("compiled", "unit", "adamw", 5),
]


@pytest.mark.parametrize(("implementation", "granularity", "optimizer", "depth"), WORLD_OF_ONE_CASES)
def test_sharded_step_in_a_world_of_one_equals_the_unsharded_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, implementation: str, granularity: str, optimizer: str, depth: int
) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_layca import Layca
    from tests.fsdp_helpers import AllReduceCounter, count_all_reduces

    def model_and_layca(shard: bool, implementation: str) -> tuple[torch.nn.Module, Layca]:
        torch.manual_seed(0)
        sizes = [8, *[6] * (depth - 1), 4]
        modules: list[torch.nn.Module] = []
        for a, b in itertools.pairwise(sizes):
            modules += [torch.nn.Tanh(), torch.nn.Linear(a, b)] if modules else [torch.nn.Linear(a, b)]
        model = torch.nn.Sequential(*modules)
        if shard:
            fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        base = BASE_OPTIMIZERS[optimizer](model.parameters())
        kwargs = {"rotation_rate": 0.1, "granularity": granularity, "implementation": implementation}
        return model, Layca(base, model.named_parameters(), **kwargs)

    if depth > 2:
        from lightning_layca import plan

        monkeypatch.setattr(plan, "CPU_BUCKET_BYTES", 64)
    # A world of one process, in this process: its layers are DTensors all the same.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        sharded, layca = model_and_layca(True, implementation)
        # The reference: the same implementation unsharded (around SGD and AdamW the compiled kernels take the base
        # step there too, and leave the optimizer state torch's own step leaves).
        reference, reference_layca = model_and_layca(False, implementation)
        counter = AllReduceCounter()
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
        for step in range(4):
            for model, opt in ((sharded, layca), (reference, reference_layca)):
                model(x).square().sum().backward()
                if step == 2:  # a step without the first layer's gradient: it stays, the others turn
                    model[0].weight.grad = None
                with count_all_reduces(counter):
                    opt.step()
                opt.zero_grad()
        assert counter.calls == 4  # one collective per sharded step, none unsharded
        # Around SGD and AdamW the compiled kernels take the base step of the sharded layers too.
        expected = "compiled+base" if implementation == "compiled" and optimizer != "rmsprop" else implementation
        assert set(layca.describe().values()) == {expected}
        for (name, p), q in zip(sharded.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.detach().full_tensor(), q.detach(), rtol=1e-6, atol=1e-7, msg=name)
        # The optimizer's state is the unsharded step's: the same entries, the same values.
        state, reference_state = layca.optimizer.state_dict()["state"], reference_layca.optimizer.state_dict()["state"]
        assert state.keys() == reference_state.keys()
        for key, entries in reference_state.items():
            assert state[key].keys() == entries.keys()
            for entry, value in entries.items():
                mine = state[key][entry]
                mine = mine.full_tensor() if hasattr(mine, "full_tensor") else mine
                torch.testing.assert_close(mine, value, rtol=1e-6, atol=1e-7, msg=f"{key} {entry}")
        norms = [float(p.detach().full_tensor().norm()) for p in layca.layers.params]
        assert layca.initial_norms == pytest.approx(norms, rel=1e-6)  # Layca kept them through its step
    finally:
        dist.destroy_process_group()


def _mixed_paths_model(shard_ranks: int) -> tuple[torch.nn.Module, Any]:
    """Three layers whose shards over two processes (rows split 3 + 3, 2 + 1, 2 + 2) have a lane view on both ranks,
    on rank 0 only, and on neither (``compiling.kernel_view``: a multiple of 4 elements, 8 at least), around SGD."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_layca import Layca

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3), torch.nn.Tanh(), torch.nn.Linear(3, 4)
    )
    if shard_ranks:
        fully_shard(model, mesh=init_device_mesh("cpu", (shard_ranks,)))
    base = BASE_OPTIMIZERS["sgd"](model.parameters())
    return model, Layca(base, model.named_parameters(), rotation_rate=0.1, implementation="compiled")


def _mixed_paths_steps(model: torch.nn.Module, layca: Any) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))  # the same batch on every rank
    for _ in range(3):
        model(x).square().sum().backward()
        layca.step()
        layca.zero_grad()


def _mixed_paths_rank(rank: int, root: str) -> None:
    import torch.distributed as dist

    from tests.fsdp_helpers import AllReduceCounter, count_all_reduces

    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=2)
    try:
        model, layca = _mixed_paths_model(2)
        counter = AllReduceCounter()
        with count_all_reduces(counter):
            _mixed_paths_steps(model, layca)
        weights = {name: p.detach().full_tensor() for name, p in model.named_parameters()}
        result = {"paths": layca.describe(), "all_reduces": counter.calls, "weights": weights}
        torch.save(result, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_layer_compiled_on_one_rank_and_eager_on_the_other_steps_as_one_process(tmp_path: Path) -> None:
    # The partial sums of a layer's shards join in the step's one collective whatever path each shard took: the
    # middle layer's shard on rank 0 takes the compiled kernels (the base step inside), its row of 6 on rank 1 the
    # base step and the eager step. Both ranks end with the weights of one process stepping the whole model.
    import torch.multiprocessing as mp

    mp.spawn(_mixed_paths_rank, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    both, middle, neither = (f"{i}.weight" for i in (0, 2, 4))
    assert [r["paths"][middle] for r in ranks] == ["compiled+base", "eager"]
    assert [r["paths"][both] for r in ranks] == ["compiled+base", "compiled+base"]
    assert [r["paths"][neither] for r in ranks] == ["eager", "eager"]
    assert [r["all_reduces"] for r in ranks] == [3, 3]  # one collective per step
    reference, reference_layca = _mixed_paths_model(0)
    start = [p.detach().clone() for p in reference.parameters()]
    _mixed_paths_steps(reference, reference_layca)
    for name, q in reference.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["weights"][name], q.detach(), rtol=1e-6, atol=1e-7, msg=name)
    for p, q in zip(start, reference.parameters(), strict=True):  # the weights did move
        assert not torch.allclose(p, q, rtol=1e-3)


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"], ids=["compiled+base", "compiled"])
def test_the_sharded_update_keeps_float64_precision_where_float32_would_not(tmp_path: Path, optimizer: str) -> None:
    # The sharded update halves form a float32 update in float32 where its terms do not cancel, and in float64
    # otherwise (a mostly radial step scaled up: a float32 update would miss it by hundreds of roundings). One step of
    # a sharded layer, in a world of one process, against the float64 reference from the step the path sees.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_layca import Layca
    from tests.reference import layca_update

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for radial, tangential, rho, roundings in ((0.0, 1e-2, 0.05, 6), (-5e-2, 1e-4, 0.5, 2)):
            gen = torch.Generator().manual_seed(0)
            model = torch.nn.Linear(40, 96, bias=False)
            with torch.no_grad():
                model.weight.copy_(torch.randn(96, 40, generator=gen))
            w = model.weight.detach().clone()
            w64 = w.double()
            direction = torch.randn(96, 40, generator=gen).double()
            direction -= (direction * w64).sum() / (w64 * w64).sum() * w64
            grad = -(radial * w64 + tangential * w64.norm() * direction / direction.norm()).float()
            fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
            base = {"sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}[optimizer]
            hyper = {"lr": 1.0} if optimizer == "sgd" else {"lr": 1.0, "alpha": 0.0, "eps": 1.0}
            opt = Layca(base(model.parameters(), **hyper), model.named_parameters(), rotation_rate=rho,
                        implementation="compiled")  # fmt: skip
            model.weight.grad = torch.distributed.tensor.distribute_tensor(grad, model.weight.device_mesh,
                                                                          model.weight.placements)  # fmt: skip
            opt.step()
            path = opt.describe()["weight"]
            assert path == ("compiled+base" if optimizer == "sgd" else "compiled")
            # The kernel that takes SGD's step sees D = -g exactly; after RMSprop's own step (alpha 0, eps 1: a step of
            # -g / (|g| + 1)) the kernel sees fl(w + D).
            after_base = w64 - grad.double() if optimizer == "sgd" else (w - grad / (grad.abs() + 1.0)).double()
            expected = layca_update(w, after_base, rho, float(w64.norm())).float().view_as(w)
            error = float((model.weight.detach().full_tensor().double() - expected.double()).norm())
            assert error <= roundings * 2.0**-24 * float(w64.norm()), (radial, error)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("half", ["update", "sums"])
def test_a_sharded_half_that_fails_to_compile_later_leaves_no_layer_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, half: str
) -> None:
    # The kernels compile at the first step; should one half fail to compile at a later one (after
    # torch._dynamo.reset(), a change of threads), one warning, and every layer still takes its step to full
    # precision. The update half: the state the sums half wrote is this step's, so the same arithmetic is taken
    # uncompiled. The sums half: it fails before it runs, so the layer takes the base step from a snapshot and the
    # eager step (which sees fl(w + D), as every path after the base step does).
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from lightning_layca import Layca
    from lightning_layca.step.base_kernels import base_halves
    from lightning_layca.step.compiled import in_single_precision
    from tests.implementations import fail_compiling
    from tests.reference import layca_update

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        model = torch.nn.Linear(40, 96, bias=False)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        opt = Layca(torch.optim.SGD(model.parameters(), lr=1.0), model.named_parameters(), rotation_rate=0.5,
                    implementation="compiled")  # fmt: skip
        weight = model.weight
        n0 = float(weight.detach().full_tensor().double().norm())
        for step in range(2):
            w = weight.detach().full_tensor().clone()
            w64 = w.double()
            direction = torch.randn(96, 40, generator=gen).double()
            direction -= (direction * w64).sum() / (w64 * w64).sum() * w64
            grad = -(-5e-2 * w64 + 1e-4 * w64.norm() * direction / direction.norm()).float()
            weight.grad = distribute_tensor(grad, weight.device_mesh, weight.placements)
            if step == 1:
                sums_half, update_half = base_halves("sgd")  # plain SGD's form
                failing = in_single_precision(update_half) if half == "update" else sums_half
                fail_compiling(monkeypatch, f"no compiler for the {half} half", lambda n, f=failing: n == f)
                with pytest.warns(UserWarning, match=f"no compiler for the {half} half") as caught:
                    opt.step()
                assert len([x for x in caught if "Layca" in str(x.message)]) == 1
            else:
                opt.step()
            assert opt.describe()["weight"] == "compiled+base"
            base_step_taken = (w - grad).double() if half == "sums" and step == 1 else w64 - grad.double()
            expected = layca_update(w, base_step_taken, 0.5, n0).float().view_as(w)
            error = float((weight.detach().full_tensor().double() - expected.double()).norm())
            assert error <= 2 * 2.0**-24 * n0, (step, error)
    finally:
        dist.destroy_process_group()
