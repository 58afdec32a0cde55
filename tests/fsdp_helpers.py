"""Fits under ``ModelParallelStrategy`` (FSDP2, tensor parallelism) for ``tests/test_fsdp.py``, one script per run.

``python -m tests.fsdp_helpers ROOT --run NAME [--resume CHECKPOINT]`` fits one of :data:`RUNS` with ``dp * tp`` CPU
processes over gloo: Lightning relaunches the same command for every other rank. Each rank writes what it saw to
``ROOT/probe/rank<r>.pt`` (see :class:`ShardedProbe`); the tests compare those files with a one-process fit of
:class:`ShardedNet` on the same global batches (:func:`fit_single`, run in the test process).

In the child, ``torch.distributed.all_reduce`` is wrapped to count its calls, so the tests can tell how many all-reduces
the Layca step and the monitor's logging step issue.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_layca import Layca, LaycaCallback, LayerRotationMonitor, RotationTarget
from lightning_layca.distributed import gather_full, is_dtensor, local_shard
from tests.ddp_helpers import ProbeBase, angle

ROTATION_RATE = 3**-3
N_SAMPLES = 64
GLOBAL_BATCH = 8  # 8 optimizer steps per epoch
LOG_EVERY = 2  # the monitor measures on every other step: the steps in between must cost no collective
LAYERS = ["features.0", "features.3", "features.5", "head"]
"""Conv(1->4, 3x3) -> Linear(64->8) -> Linear(8->6) -> Linear(6->1): the head has one row, so under data-parallel 2
its shard on rank 1 is empty."""
COLLECTIVE_TIMEOUT_S = 120

RUNS: dict[str, dict[str, Any]] = {
    # LaycaCallback, SGD with momentum, data-parallel 2: writes both kinds of checkpoint after epoch 0.
    "layca": {"callback": "layca", "optimizer": "sgd", "dp": 2, "tp": 1, "save_checkpoints": True},
    # The same fit resumed from each checkpoint, from other initial weights (only the checkpoint makes them agree).
    "layca_resumed_dcp": {"callback": "layca", "optimizer": "sgd", "dp": 2, "tp": 1, "seed": 500},
    "layca_resumed_file": {"callback": "layca", "optimizer": "sgd", "dp": 2, "tp": 1, "seed": 500},
    # The monitor alone with AdamW.
    "monitor_adamw": {"callback": "monitor", "optimizer": "adamw", "dp": 2, "tp": 1},
    # Tensor parallel 2: column-wise (rows split), row-wise (columns split), the rest replicated over the TP ranks.
    # Layca steps each layer in a group of its own (chunks of at most 64 bytes): still one all_reduce per step.
    "layca_tp": {"callback": "layca", "optimizer": "sgd", "dp": 1, "tp": 2, "chunk_bytes": 64},
    # The first fit with the compiled step: each shard's sums and update in compiled kernels around the collective.
    "layca_compiled": {"callback": "layca_compiled", "optimizer": "sgd", "dp": 2, "tp": 1},
    # The same around AdamW: the kernels take the base step of the shards too, around the same collective.
    "layca_compiled_adamw": {"callback": "layca_compiled", "optimizer": "adamw", "dp": 2, "tp": 1},
    # Both (4 processes), with every unit rotated on its own: rows split over ranks, and a layer's rows over the TP
    # ranks in strided blocks.
    "layca_units_2x2": {"callback": "layca_units", "optimizer": "sgd", "dp": 2, "tp": 2},
    # A rotation target, measured every TARGET_INTERVAL steps: one more all_reduce on those steps.
    "layca_target": {"callback": "layca_target", "optimizer": "sgd", "dp": 2, "tp": 1},
    # A steering target whose rate is held at a tiny max_rate: every control interval steers, and measures again.
    "layca_target_steer": {"callback": "layca_target_steer", "optimizer": "sgd", "dp": 2, "tp": 1},
}
TARGET_INTERVAL = 3


class Regressor(nn.Module):
    """``head(features(x))``: a module with a forward, so that ``fully_shard`` can wrap it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU()
        )
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ShardedNet(L.LightningModule):
    """A small regression network built in ``configure_model`` and, under ``ModelParallelStrategy``, parallelised there.

    Every rank builds the same weights (seed ``seed``): FSDP2 shards the weights each rank built, it does not broadcast
    them. Under tensor parallelism ``features.3`` is column-wise parallel (its rows split over the TP ranks) and
    ``features.5`` row-wise parallel (its columns split); the other layers are replicated over the TP ranks. Each
    layer, then the whole network, is ``fully_shard``-ed over the data-parallel ranks.

    The data are the same on every rank; an unshuffled ``DistributedSampler`` over the data-parallel ranks hands
    data-parallel rank ``r`` of ``n`` the samples ``r, r + n, ...``, so at a per-rank batch of ``GLOBAL_BATCH / n`` the
    ranks see, step by step, the global batch a single process sees at ``GLOBAL_BATCH``.
    """

    def __init__(self, optimizer: str = "sgd", seed: int = 100) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.seed = seed
        self.net: Regressor | None = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        torch.manual_seed(self.seed)
        self.net = Regressor()
        features = self.net.features
        mesh = self.device_mesh
        if mesh is None:  # one process: nothing to parallelise
            return
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        if mesh["tensor_parallel"].size() > 1:
            parallelize_module(features, mesh["tensor_parallel"], {"3": ColwiseParallel(), "5": RowwiseParallel()})
        for index in ("0", "3", "5"):
            fully_shard(features[int(index)], mesh=mesh["data_parallel"])
        fully_shard(self.net.head, mesh=mesh["data_parallel"])
        fully_shard(self.net, mesh=mesh["data_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x).squeeze(1), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(N_SAMPLES, 1, 6, 6, generator=g)
        y = torch.randn(N_SAMPLES, generator=g)
        dataset = TensorDataset(x, y)
        mesh = self.device_mesh
        replicas, rank = (
            (1, 0) if mesh is None else (mesh["data_parallel"].size(), mesh["data_parallel"].get_local_rank())
        )
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=GLOBAL_BATCH // replicas, sampler=sampler)


def layer_params(pl_module: L.LightningModule) -> list[torch.Tensor]:
    params = dict(pl_module.named_parameters())
    return [params[f"net.{name}.weight"] for name in LAYERS]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor (a collective for a DTensor: every rank calls it), detached, on the CPU."""
    return gather_full(local_shard(tensor).detach(), tensor).cpu().clone()


def row_angles(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """Angle in radians between each row of ``w`` and of ``w0`` (tensors seen as ``(rows, -1)``), in float64."""
    a, b = w.double().flatten(1), w0.double().flatten(1)
    return torch.arccos(torch.clamp((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)), -1.0, 1.0))


class AllReduceCounter:
    """Count the calls to ``torch.distributed.all_reduce`` in this process (installed by :func:`count_all_reduces`)."""

    def __init__(self) -> None:
        self.calls = 0


@contextmanager
def count_all_reduces(counter: AllReduceCounter) -> Iterator[None]:
    original = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter.calls += 1
        return original(*args, **kwargs)

    dist.all_reduce = counted  # type: ignore[assignment]
    try:
        yield
    finally:
        dist.all_reduce = original


class ShardedProbe(ProbeBase):
    """Record what one rank sees; put it after the rotation callback so its hooks run after that callback's.

    Written to ``<out_dir>/rank<r>.pt``:

    * ``layca_all_reduces``: per optimizer step, the all-reduces ``Layca.step`` issued outside its closure (the closure
      runs forward and backward);
    * ``monitor_all_reduces``: per optimizer step, the all-reduces the rotation callback's ``on_train_batch_end`` issued
      (it measures and logs there on logging steps);
    * ``step_angles`` / ``norm_ratios``: per optimizer step, the angle (radians) each full layer turned and its full
      norm over its full initial norm (gathered here, outside the counted windows); ``unit_angles`` /
      ``unit_norm_ratios`` the same per unit (rows of all layers, concatenated);
    * ``trace``: the all-reduce count at every batch end (ranks in lockstep have equal traces);
    * ``writes``: calls to TensorBoard writers and matplotlib drawing in this process;
    * ``end_state`` (the callback's ``state_dict``), ``end_layca`` (Layca's), ``weights`` (every full parameter),
      ``train_start_layca`` (Layca's state once a checkpoint is restored), ``global_step``, ``local_rows`` (per layer),
      ``paths`` (``Layca.describe()`` at the end).
    """

    def __init__(self, out_dir: Path, counter: AllReduceCounter) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.counter = counter
        self.layca_all_reduces: list[int] = []
        self.monitor_all_reduces: list[int] = []
        self.step_angles: list[list[float]] = []
        self.norm_ratios: list[list[float]] = []
        self.unit_angles: list[torch.Tensor] = []
        self.unit_norm_ratios: list[torch.Tensor] = []
        self.trace: list[int] = []
        self.train_start_layca: list[dict[str, Any]] = []
        self._before: list[torch.Tensor] | None = None
        self._initial_norms: list[float] = []
        self._initial_unit_norms: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        laycas = [opt for opt in trainer.optimizers if isinstance(opt, Layca)]
        self.train_start_layca = [opt.state_dict()["layca"] for opt in laycas]
        for opt in laycas:
            opt.step = self.counting_step(opt.step, self._all_reduces, self.layca_all_reduces)  # type: ignore[method-assign]
        monitor = self.rotation_callback(trainer)
        monitor.on_train_batch_end = self._counting_batch_end(monitor.on_train_batch_end)  # type: ignore[method-assign]
        # The weights at the start of this fit: the initial ones, or a resumed run's, whose norms Layca kept.
        initial = [full(w) for w in layer_params(pl_module)]
        self._initial_norms = [float(w0.double().norm()) for w0 in initial]
        self._initial_unit_norms = torch.cat([w0.double().flatten(1).norm(dim=1) for w0 in initial])

    def _all_reduces(self) -> int:
        return self.counter.calls

    def _counting_batch_end(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            start = self.counter.calls
            result = hook(*args, **kwargs)
            self.monitor_all_reduces.append(self.counter.calls - start)
            return result

        return counted

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._before = [full(w) for w in layer_params(pl_module)]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._before is not None:
            after = [full(w) for w in layer_params(pl_module)]
            self.step_angles.append([angle(w, w0) for w, w0 in zip(after, self._before, strict=True)])
            self.norm_ratios.append(
                [float(w.double().norm()) / n0 for w, n0 in zip(after, self._initial_norms, strict=True)]
            )
            self.unit_angles.append(torch.cat([row_angles(w, w0) for w, w0 in zip(after, self._before, strict=True)]))
            assert self._initial_unit_norms is not None
            self.unit_norm_ratios.append(
                torch.cat([w.double().flatten(1).norm(dim=1) for w in after]) / self._initial_unit_norms
            )
            self._before = None
        self.trace.append(self.counter.calls)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = {name: full(p) for name, p in pl_module.named_parameters()}
        end_state = self.rotation_callback(trainer).state_dict()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "layca_all_reduces": self.layca_all_reduces,
                "monitor_all_reduces": self.monitor_all_reduces,
                "step_angles": self.step_angles,
                "norm_ratios": self.norm_ratios,
                "unit_angles": self.unit_angles,
                "unit_norm_ratios": self.unit_norm_ratios,
                "trace": self.trace,
                "writes": dict(self.writes),
                "train_start_layca": self.train_start_layca,
                "end_state": end_state,
                "end_layca": [opt.state_dict()["layca"] for opt in trainer.optimizers if isinstance(opt, Layca)],
                "weights": weights,
                "sharded": [is_dtensor(p) for p in layer_params(pl_module)],
                "local_rows": [int(local_shard(p).shape[0]) for p in layer_params(pl_module)],
                "layca_groups": [len(opt.plan.buckets or []) for opt in trainer.optimizers if isinstance(opt, Layca)],
                "paths": [opt.describe() for opt in trainer.optimizers if isinstance(opt, Layca)],
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


class SaveBothCheckpointKinds(Callback):
    """After epoch 0, save a distributed checkpoint (a folder) and a single file; put it after the rotation callback.

    Both kinds come from the same fit: the strategy's mode is switched around each save.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != 0:
            return
        strategy = trainer.strategy
        assert isinstance(strategy, ModelParallelStrategy)
        mode = strategy._save_distributed_checkpoint
        try:
            for distributed, name in ((True, "epoch0_dcp"), (False, "epoch0.ckpt")):
                strategy._save_distributed_checkpoint = distributed
                trainer.save_checkpoint(self.root / "checkpoints" / name)
        finally:
            strategy._save_distributed_checkpoint = mode


def rotation_callback(kind: str) -> LayerRotationMonitor:
    # Every layer's per-step scalars, which the tests compare with those of one process.
    if kind == "layca":
        return LaycaCallback(rotation_rate=ROTATION_RATE, log_every_n_steps=LOG_EVERY, per_layer_detail=True)
    if kind == "layca_compiled":
        return LaycaCallback(
            rotation_rate=ROTATION_RATE, log_every_n_steps=LOG_EVERY, implementation="compiled", per_layer_detail=True
        )
    if kind == "layca_units":
        return LaycaCallback(
            rotation_rate=ROTATION_RATE, log_every_n_steps=LOG_EVERY, granularity="unit", per_layer_detail=True
        )
    if kind == "layca_target":
        target = RotationTarget(0.05, interval=TARGET_INTERVAL)
        return LaycaCallback(target=target, log_every_n_steps=LOG_EVERY)
    if kind == "layca_target_steer":
        target = RotationTarget(0.05, interval=TARGET_INTERVAL, max_rate=1e-3, steer=True)
        return LaycaCallback(target=target, log_every_n_steps=LOG_EVERY)
    return LayerRotationMonitor(log_every_n_steps=LOG_EVERY, per_layer_detail=True)


def make_trainer(root: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        default_root_dir=root,
        logger=TensorBoardLogger(root, name="logs"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=LOG_EVERY,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def fit_single(root: Path, kind: str, optimizer: str) -> None:
    """The reference: one process, no sharding, at the global batch (run in the calling process)."""
    counter = AllReduceCounter()
    callbacks = [rotation_callback(kind), ShardedProbe(root / "probe", counter)]
    make_trainer(root, callbacks).fit(ShardedNet(optimizer))


def main() -> None:
    """Fit one of :data:`RUNS` under ``ModelParallelStrategy`` (Lightning relaunches this script per other rank)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--run", choices=sorted(RUNS), required=True)
    parser.add_argument("--resume", type=Path, default=None)
    args = parser.parse_args()
    config = RUNS[args.run]
    if "chunk_bytes" in config:
        from lightning_layca import plan

        plan.CPU_BUCKET_BYTES = config["chunk_bytes"]
    counter = AllReduceCounter()
    callbacks: list[Callback] = [rotation_callback(config["callback"]), ShardedProbe(args.root / "probe", counter)]
    if config.get("save_checkpoints"):
        callbacks.append(SaveBothCheckpointKinds(args.root))
    strategy = ModelParallelStrategy(
        data_parallel_size=config["dp"],
        tensor_parallel_size=config["tp"],
        # A collective that one rank never joins fails the run after this long instead of hanging it.
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    trainer = make_trainer(args.root, callbacks, devices=config["dp"] * config["tp"], strategy=strategy)
    with count_all_reduces(counter):
        trainer.fit(ShardedNet(config["optimizer"], seed=config.get("seed", 100)), ckpt_path=args.resume)


def expected_angle() -> float:
    return math.atan(ROTATION_RATE)


if __name__ == "__main__":
    main()
