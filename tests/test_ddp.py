"""The rotation callbacks under data-parallel training: two CPU processes over gloo, with ranks seeded differently.

Each fixture runs one 2-process fit (``ddp_spawn`` in this process, or ``ddp`` through a script that Lightning
relaunches per rank) with :class:`tests.ddp_helpers.DDPProbe`, which records every rank's view to a file; the tests
compare those views across ranks and with a single-process run on the same global batch.

Runs (16 optimizer steps of SGD unless stated):

* ``layca_spawn``: ``LaycaCallback``, ``ddp_spawn``, checkpoints every epoch;
* ``layca_ddp``: the same fit under ``strategy="ddp"`` (subprocess launcher);
* ``layca_resumed``: ``ddp_spawn`` resumed from ``layca_spawn``'s first-epoch checkpoint (8 steps);
* ``layca_accumulate_bf16``: ``accumulate_grad_batches=2`` and ``precision="bf16-mixed"``, one epoch (4 steps);
* ``monitor_spawn``: ``LayerRotationMonitor`` alone, SGD with momentum, ``ddp_spawn``;
* ``layca_single`` / ``monitor_single``: one process at twice the per-rank batch, the references.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_layca import LaycaCallback, LayerRotationMonitor
from lightning_layca.callbacks.monitor import FIGURE_FILENAME
from tests.ddp_helpers import (
    ROTATION_RATE,
    DDPProbe,
    RotationNet,
    assert_same,
    checkpoint_every_epoch,
    make_trainer,
    read_events,
    scalars_with_prefix,
)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300

ANGLE_TOL = 1e-6  # radians, on atan(rho) ~ 0.037 for a float32 step
NORM_TOL = 1e-5  # relative
ROTATION_TOL = 1e-5  # cosine distance, DDP against one process: only the gradient's summation order differs
RESUME_TOL = 1e-6  # a resumed run against the uninterrupted one: the same computations, expected bit-identical

DDP_RUNS = ["layca_spawn", "layca_ddp", "layca_resumed", "layca_accumulate_bf16", "layca_compiled", "monitor_spawn"]
LAYCA_RUNS = ["layca_spawn", "layca_ddp", "layca_resumed", "layca_accumulate_bf16", "layca_compiled"]
STEPS = {
    "layca_spawn": 16,
    "layca_ddp": 16,
    "layca_resumed": 8,
    "layca_accumulate_bf16": 4,
    "layca_compiled": 16,
    "monitor_spawn": 16,
}
REFERENCE = {
    "layca_spawn": "layca_single",
    "layca_ddp": "layca_single",
    "layca_resumed": "layca_single",
    "layca_accumulate_bf16": "layca_single",
    "layca_compiled": "layca_single",
    "monitor_spawn": "monitor_single",
}


@dataclass
class Run:
    root: Path
    ranks: list[dict[str, Any]]

    @property
    def log_dir(self) -> Path:
        (log_dir,) = (self.root / "logs").iterdir()
        return log_dir

    def events(self) -> Any:
        return read_events(self.log_dir)


def _load_run(root: Path) -> Run:
    files = sorted((root / "probe").glob("rank*.pt"))
    ranks = [torch.load(f, weights_only=False) for f in files]
    assert [f.name for f in files] == [f"rank{r}.pt" for r in range(ranks[0]["world_size"])]
    return Run(root, ranks)


def _fit(
    root: Path, callback: LayerRotationMonitor, model: RotationNet, ckpt_path: Path | None = None, **trainer_kwargs: Any
) -> Run:
    callbacks = [callback, DDPProbe(root / "probe")]
    if trainer_kwargs.get("enable_checkpointing"):
        callbacks.append(checkpoint_every_epoch(root))
    make_trainer(root, callbacks, **trainer_kwargs).fit(model, ckpt_path=ckpt_path)
    return _load_run(root)


@pytest.fixture(scope="module")
def layca_spawn(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("layca_spawn")
    return _fit(root, LaycaCallback(rotation_rate=ROTATION_RATE), RotationNet(batch_size=4), enable_checkpointing=True)


@pytest.fixture(scope="module")
def layca_ddp(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("layca_ddp")
    # Lightning relaunches `python -m tests.ddp_helpers ...` for rank 1.
    result = subprocess.run(
        [sys.executable, "-m", "tests.ddp_helpers", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return _load_run(root)


@pytest.fixture(scope="module")
def layca_resumed(layca_spawn: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("layca_resumed")
    # Other seeds than the run that wrote the checkpoint: only the checkpoint can make the runs agree.
    return _fit(
        root,
        LaycaCallback(rotation_rate=ROTATION_RATE),
        RotationNet(batch_size=4, seed=500),
        ckpt_path=layca_spawn.root / "checkpoints" / "epoch=0.ckpt",
    )


@pytest.fixture(scope="module")
def layca_accumulate_bf16(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("layca_accumulate_bf16")
    return _fit(
        root,
        LaycaCallback(rotation_rate=ROTATION_RATE),
        RotationNet(batch_size=4),
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        max_epochs=1,
    )


@pytest.fixture(scope="module")
def layca_compiled(tmp_path_factory: pytest.TempPathFactory) -> Run:
    # The compiled kernel takes SGD's step in each process (the layers' gradients set aside during SGD's own step).
    root = tmp_path_factory.mktemp("layca_compiled")
    callback = LaycaCallback(rotation_rate=ROTATION_RATE, implementation="compiled")
    return _fit(root, callback, RotationNet(batch_size=4))


@pytest.fixture(scope="module")
def monitor_spawn(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("monitor_spawn")
    return _fit(root, LayerRotationMonitor(), RotationNet(batch_size=4, momentum=0.9))


@pytest.fixture(scope="module")
def layca_units_spawn(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("layca_units_spawn")
    callback = LaycaCallback(rotation_rate=ROTATION_RATE, granularity="unit")
    return _fit(root, callback, RotationNet(batch_size=4), max_epochs=1)


def test_per_unit_layca_keeps_the_ranks_identical(layca_units_spawn: Run) -> None:
    rank0, rank1 = layca_units_spawn.ranks
    assert torch.equal(rank0["weights"], rank1["weights"])  # also asserted in the hook, after an all_gather
    assert_same(rank0["end_layca"], rank1["end_layca"], "layca state")
    assert rank0["end_layca"][0]["granularity"] == "unit"
    assert rank0["layca_step_collectives"] == [0] * STEPS["layca_resumed"]  # one epoch: 8 steps, no collective


@pytest.fixture(scope="module")
def layca_single(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("layca_single")
    return _fit(root, LaycaCallback(rotation_rate=ROTATION_RATE), RotationNet(batch_size=8), devices=1, strategy="auto")


@pytest.fixture(scope="module")
def monitor_single(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("monitor_single")
    return _fit(root, LayerRotationMonitor(), RotationNet(batch_size=8, momentum=0.9), devices=1, strategy="auto")


def _run(request: pytest.FixtureRequest, name: str) -> Run:
    run = request.getfixturevalue(name)
    assert isinstance(run, Run)
    return run


# ---------------------------------------------------------------------------------------------- identical ranks
@pytest.mark.parametrize("name", DDP_RUNS)
def test_ranks_seeded_differently_end_with_bit_identical_weights(request: pytest.FixtureRequest, name: str) -> None:
    run = _run(request, name)
    rank0, rank1 = run.ranks
    assert rank0["built_checksum"] != rank1["built_checksum"]  # the ranks did start from different weights
    assert rank0["global_step"] == rank1["global_step"] > 0
    assert torch.equal(rank0["weights"], rank1["weights"])  # also asserted in the hook, after an all_gather


@pytest.mark.parametrize("name", DDP_RUNS)
def test_initial_snapshot_is_rank_zeros_weights_on_every_rank(request: pytest.FixtureRequest, name: str) -> None:
    run, reference = _run(request, name), _run(request, REFERENCE[name])
    # The single-process run builds rank 0's weights (same seed): a snapshot taken before DDP's broadcast would hold
    # rank 1's own weights on rank 1.
    for rank in run.ranks:
        assert_same(rank["end_state"]["initial"], reference.ranks[0]["end_state"]["initial"], "initial")


@pytest.mark.parametrize("name", LAYCA_RUNS)
def test_every_rank_wraps_its_optimizer_identically(request: pytest.FixtureRequest, name: str) -> None:
    run, reference = _run(request, name), _run(request, "layca_single")
    expected = reference.ranks[0]["end_layca"][0]
    for rank in run.ranks:
        (layca,) = rank["end_layca"]
        assert layca["layer_names"] == expected["layer_names"]
        assert layca["initial_norms"] == pytest.approx(expected["initial_norms"], rel=1e-7)
        assert layca["reference_lr"] == expected["reference_lr"]
    assert_same(run.ranks[0]["end_layca"], run.ranks[1]["end_layca"], "layca state")


@pytest.mark.parametrize("name", DDP_RUNS)
def test_callback_state_dict_is_identical_on_every_rank(request: pytest.FixtureRequest, name: str) -> None:
    run = _run(request, name)
    assert_same(run.ranks[0]["end_state"], run.ranks[1]["end_state"])
    assert len(run.ranks[0]["end_state"]["history"]["net.head"]) >= STEPS[name]


# ------------------------------------------------------------------------------------------------- collectives
@pytest.mark.parametrize("name", LAYCA_RUNS)
def test_layca_step_issues_no_collective(request: pytest.FixtureRequest, name: str) -> None:
    for rank in _run(request, name).ranks:
        assert rank["layca_step_collectives"] == [0] * STEPS[name]


@pytest.mark.parametrize("name", DDP_RUNS)
def test_no_collective_between_backward_and_batch_end(request: pytest.FixtureRequest, name: str) -> None:
    # The window holds the optimizer update (Layca's too) and the monitor's measurement and logging.
    for rank in _run(request, name).ranks:
        assert rank["step_collectives"] == [0] * STEPS[name]


@pytest.mark.parametrize("name", DDP_RUNS)
def test_ranks_issue_the_same_collectives_in_the_same_order(request: pytest.FixtureRequest, name: str) -> None:
    # A collective behind a rank check would put the ranks' collective counts out of step (or hang the fit).
    rank0, rank1 = _run(request, name).ranks
    assert rank0["trace"] == rank1["trace"]
    assert len(rank0["trace"]) > STEPS[name]


@pytest.mark.parametrize("name", LAYCA_RUNS)
def test_every_layca_step_rotates_each_layer_by_atan_rho_on_every_rank(
    request: pytest.FixtureRequest, name: str
) -> None:
    for rank in _run(request, name).ranks:
        assert len(rank["step_angles"]) == STEPS[name]
        for angles, ratios in zip(rank["step_angles"], rank["norm_ratios"], strict=True):
            assert angles == pytest.approx([math.atan(ROTATION_RATE)] * 3, abs=ANGLE_TOL)
            assert ratios == pytest.approx([1.0] * 3, rel=NORM_TOL)


# ---------------------------------------------------------------------------------------------------- logging
@pytest.mark.parametrize("name", DDP_RUNS)
def test_only_global_rank_zero_writes_logs_and_figures(request: pytest.FixtureRequest, name: str) -> None:
    run = _run(request, name)
    rank0, rank1 = run.ranks
    assert set(rank1["writes"].values()) == {0}, rank1["writes"]
    for entry in (
        "add_scalar",
        "add_histogram_raw",
        "add_image",
        "add_custom_scalars",
        "Figure.__init__",
        "FigureCanvasAgg.draw",
    ):
        assert rank0["writes"][entry] > 0, entry
    assert len(list(run.root.rglob("events.out.tfevents.*"))) == 1
    assert len(list(run.root.rglob(FIGURE_FILENAME))) == 1


@pytest.mark.parametrize("name", ["layca_spawn", "layca_ddp", "layca_compiled", "monitor_spawn"])
def test_ddp_logs_the_tags_and_rotation_of_one_process_on_the_same_global_batch(
    request: pytest.FixtureRequest, name: str
) -> None:
    events, reference = _run(request, name).events(), _run(request, REFERENCE[name]).events()
    for kind in ("scalars", "histograms", "images", "tensors"):
        assert sorted(events.Tags()[kind]) == sorted(reference.Tags()[kind]), kind
    rotation, expected = scalars_with_prefix(events, "Rotation"), scalars_with_prefix(reference, "Rotation")
    assert {"Rotation/net.head", "Rotation_summary/mean"} <= expected.keys()
    for tag, points in expected.items():
        assert [s for s, _ in rotation[tag]] == [s for s, _ in points], tag
        assert [v for _, v in rotation[tag]] == pytest.approx([v for _, v in points], abs=ROTATION_TOL), tag
    assert max(v for _, v in expected["Rotation_summary/max"]) > 100 * ROTATION_TOL  # the layers did turn
    rates, expected_rates = (
        scalars_with_prefix(events, "Rotation_rate"),
        scalars_with_prefix(reference, "Rotation_rate"),
    )
    assert rates.keys() == expected_rates.keys()
    for tag, points in expected_rates.items():
        assert [s for s, _ in rates[tag]] == [s for s, _ in points], tag
        assert [v for _, v in rates[tag]] == pytest.approx([v for _, v in points], rel=1e-7), tag


# ----------------------------------------------------------------------------------------------------- resume
def test_resume_restores_the_callback_and_layca_on_every_rank(layca_resumed: Run, layca_spawn: Run) -> None:
    checkpoint = torch.load(layca_spawn.root / "checkpoints" / "epoch=0.ckpt", weights_only=False)
    (callback_state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("LaycaCallback")]
    for rank in layca_resumed.ranks:
        assert_same(rank["fit_start_state"], callback_state, "callback state")
        assert_same(rank["train_start_layca"], [checkpoint["optimizer_states"][0]["layca"]], "layca state")


def test_resumed_ddp_run_continues_the_uninterrupted_one(layca_resumed: Run, layca_spawn: Run) -> None:
    torch.testing.assert_close(
        layca_resumed.ranks[0]["weights"], layca_spawn.ranks[0]["weights"], atol=RESUME_TOL, rtol=0
    )
    resumed, uninterrupted = layca_resumed.ranks[0]["end_state"], layca_spawn.ranks[0]["end_state"]
    for key in ("history", "epoch_rotation"):
        assert resumed[key].keys() == uninterrupted[key].keys()
        for layer, points in uninterrupted[key].items():
            assert [s for s, _ in resumed[key][layer]] == [s for s, _ in points]
            assert [v for _, v in resumed[key][layer]] == pytest.approx([v for _, v in points], abs=RESUME_TOL)
    # What the resumed run logged is the second half of the uninterrupted run's curves.
    logged, full = (
        scalars_with_prefix(layca_resumed.events(), "Rotation"),
        scalars_with_prefix(layca_spawn.events(), "Rotation"),
    )
    for tag, points in full.items():
        second_half = points[STEPS["layca_resumed"] :]
        assert [s for s, _ in logged[tag]] == [s for s, _ in second_half], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in second_half], abs=RESUME_TOL), tag


# ----------------------------------------------------------------------------------------------- accumulation
def test_accumulation_under_bf16_steps_once_per_two_batches(layca_accumulate_bf16: Run) -> None:
    for rank in layca_accumulate_bf16.ranks:
        assert rank["global_step"] == 4  # 8 batches per rank
        assert rank["end_layca"][0]["step_count"] == 4
        assert [s for s, _ in rank["end_state"]["history"]["net.head"]] == [0, 1, 2, 3]


def _auto_rank(rank: int, root: str) -> None:
    # Rank 0 reaches implementation="auto"'s threshold for a compiled trial at once, rank 1 never: the processes of a
    # run time their steps each on its own, so they reach it at different steps (or decide differently).
    import torch.distributed as dist

    from lightning_layca import Layca, auto_choice
    from lightning_layca.measurement import MeasurementSums

    auto_choice.AUTO_COMPILE_AFTER_SECONDS = 0.0 if rank == 0 else math.inf
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same replica on both ranks, as DDP's broadcast leaves them
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        layca = Layca(base, model.named_parameters(), rotation_rate=0.05)  # implementation="auto", the default
        paths = set()
        for step in range(8):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))  # the all-reduced gradient's batch
            model(x).square().mean().backward()
            layca.step()
            layca.zero_grad()
            paths |= set(layca.describe().values())
        # A monitor's sums under "auto", measured as a logging step does, against the initial weights.
        sums, measured_with = MeasurementSums(), set()
        layers = [p.detach() for p in model.parameters() if p.dim() > 1]
        for _ in range(4):
            sums(layers, [w + 1.0 for w in layers])
            measured_with.add(sums.in_use)
        weights = [p.detach() for p in model.parameters()]
        torch.save({"paths": paths, "measured_with": measured_with, "weights": weights}, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _sgd_form_rank(rank: int, root: str) -> None:
    # Each process would measure SGD's forms on its own: rank 0 finds one call faster, rank 1 the halves.
    import torch.distributed as dist

    from lightning_layca import Layca
    from lightning_layca.step import sgd_form

    sgd_form.measured_halves = lambda device, dtype: rank == 1  # type: ignore[assignment]
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        layca = Layca(base, model.named_parameters(), rotation_rate=0.05, implementation="compiled")
        for step in range(4):
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))  # the all-reduced gradient's batch
            model(x).square().mean().backward()
            layca.step()
            layca.zero_grad()
        weights = [p.detach() for p in model.parameters()]
        torch.save({"forms": layca.layca_state()["sgd_forms"], "weights": weights}, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_processes_of_a_run_take_the_same_sgd_form_unmeasured(tmp_path: Path) -> None:
    # SGD's two compiled forms differ in the last bits of some steps; the faster one depends on the machine, and each
    # process would measure its own. In a run of several processes none measures: every one takes the halves (no
    # collective in the step to agree on a measurement, as implementation="auto" takes the eager step there).
    import torch.multiprocessing as mp

    mp.spawn(_sgd_form_rank, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["forms"] for r in ranks] == [{"cpu/float32": "halves"}] * 2
    for p, q in zip(ranks[0]["weights"], ranks[1]["weights"], strict=True):
        assert torch.equal(p, q)


def test_auto_keeps_the_replicas_of_a_multi_process_run_bit_identical(tmp_path: Path) -> None:
    # DDP keeps the replicas bit-identical (the gradient is all-reduced, every rank takes the same step). Under
    # implementation="auto" each process would decide for itself when to try the compiled step and which step is
    # faster, and the compiled and eager steps differ in their last bits: in a run of several processes "auto" takes
    # the eager step (no timing, no compilation), as it does for sharded layers; so do a monitor's sums.
    import torch.multiprocessing as mp

    mp.spawn(_auto_rank, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for p, q in zip(ranks[0]["weights"], ranks[1]["weights"], strict=True):
        assert torch.equal(p, q), f"{int((p != q).sum())} of {p.numel()} weights differ"
    assert [r["paths"] for r in ranks] == [{"eager"}, {"eager"}]
    assert [r["measured_with"] for r in ranks] == [{"eager"}, {"eager"}]  # the monitor's sums: the same rule
