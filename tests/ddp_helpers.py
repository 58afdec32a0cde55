"""What the DDP tests run in every process: a model built per rank, and a probe callback that records each rank's view.

With ``ddp_spawn`` the parent never sees its children's objects, and with ``ddp`` the ranks are separate programs,
so the probe writes what each rank saw to ``<out_dir>/rank<r>.pt`` and asserts the cross-rank facts (bit-identical
weights) inside a hook, after an ``all_gather``.

Collectives are counted with the default process group's sequence number, which c10d increments for every
collective issued on the group, from Python or from C++ (DDP's gradient buckets included): a count that cannot be
bypassed by importing a function under another name.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_layca import Layca, LaycaCallback, LayerRotationMonitor

N_SAMPLES = 64
ROTATION_RATE = 3**-3
LAYERS = ["features.0", "features.3", "head"]
COLLECTIVE_TIMEOUT_S = 180


def collective_count() -> int:
    """Number of collectives issued so far on the default process group (0 without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return int(dist.distributed_c10d._get_default_group()._get_sequence_number_for_group())


class RotationNet(L.LightningModule):
    """Conv(1->4) -> Linear(64->8) -> Linear(8->3), built in ``configure_model`` from the seed ``seed + rank``.

    With ``build_with_seed`` the model is built at construction instead (the ``ddp`` script passes ``100 + rank``).

    Building per process with a rank-dependent seed makes the ranks start from different weights, as independent
    launches would: only DDP's broadcast of rank 0's weights makes them equal. The data are the same on every rank
    (their own generator); an unshuffled ``DistributedSampler`` (the Trainer runs with
    ``use_distributed_sampler=False``) hands rank ``r`` the samples ``r, r + 2, ...``, so two ranks at batch ``B`` see,
    step by step, the same global batch as one process at batch ``2 B``.
    """

    def __init__(
        self, batch_size: int = 4, seed: int = 100, momentum: float = 0.0, build_with_seed: int | None = None
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.momentum = momentum
        self.net: nn.Module | None = None
        self.built_checksum: float | None = None
        if build_with_seed is not None:  # built at construction, as most models are
            self._build(build_with_seed)

    def configure_model(self) -> None:
        if self.net is None:
            self._build(self.seed + self.global_rank)

    def _build(self, seed: int) -> None:
        torch.manual_seed(seed)
        features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU())
        self.net = nn.ModuleDict({"features": features, "head": nn.Linear(8, 3)})
        self.built_checksum = float(sum(p.detach().double().sum() for p in self.net.parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net["head"](self.net["features"](x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(N_SAMPLES, 1, 6, 6, generator=g)
        y = torch.randint(0, 3, (N_SAMPLES,), generator=g)
        dataset = TensorDataset(x, y)
        # Lightning's own sampler would shuffle the training data under DDP.
        sampler = DistributedSampler(
            dataset, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)


def layer_params(pl_module: L.LightningModule) -> list[torch.Tensor]:
    params = dict(pl_module.named_parameters())
    return [params[f"net.{name}.weight"] for name in LAYERS]


def angle(w: torch.Tensor, w0: torch.Tensor) -> float:
    """Angle in radians between two tensors seen as vectors, in float64."""
    a, b = w.detach().double().flatten(), w0.detach().double().flatten()
    return float(torch.arccos(torch.clamp(torch.dot(a, b) / (a.norm() * b.norm()), -1.0, 1.0)))


_WATCHED_WRITES = {
    "SummaryWriter.__init__": ("torch.utils.tensorboard.writer", "SummaryWriter", "__init__"),
    "add_scalar": ("torch.utils.tensorboard.writer", "SummaryWriter", "add_scalar"),
    "add_histogram_raw": ("torch.utils.tensorboard.writer", "SummaryWriter", "add_histogram_raw"),
    "add_image": ("torch.utils.tensorboard.writer", "SummaryWriter", "add_image"),
    "add_custom_scalars": ("torch.utils.tensorboard.writer", "SummaryWriter", "add_custom_scalars"),
    "Figure.__init__": ("matplotlib.figure", "Figure", "__init__"),
    "FigureCanvasAgg.draw": ("matplotlib.backends.backend_agg", "FigureCanvasAgg", "draw"),
}


@contextmanager
def count_writes(counts: dict[str, int]) -> Iterator[None]:
    """Count, in this process, calls to the TensorBoard writer's and matplotlib's writing/drawing entry points."""
    import importlib

    originals: list[tuple[type, str, Callable[..., Any]]] = []
    for key, (module_name, class_name, method) in _WATCHED_WRITES.items():
        cls = getattr(importlib.import_module(module_name), class_name)
        original = getattr(cls, method)

        def counted(*args: Any, _key: str = key, _original: Any = original, **kwargs: Any) -> Any:
            counts[_key] = counts.get(_key, 0) + 1
            return _original(*args, **kwargs)

        originals.append((cls, method, original))
        setattr(cls, method, counted)
        counts.setdefault(key, 0)
    try:
        yield
    finally:
        for cls, method, original in originals:
            setattr(cls, method, original)


class ProbeBase(Callback):
    """What the DDP and FSDP probes share: the writes counted over the fit, the rotation callback, and Layca steps
    wrapped to count what they issue outside their closure."""

    def __init__(self) -> None:
        self.writes: dict[str, int] = {}
        self._stack: ExitStack | None = None

    @staticmethod
    def rotation_callback(trainer: L.Trainer) -> LayerRotationMonitor:
        return next(cb for cb in trainer.callbacks if isinstance(cb, LayerRotationMonitor))  # type: ignore[attr-defined]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stack = ExitStack()
        self._stack.enter_context(count_writes(self.writes))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @staticmethod
    def counting_step(step: Callable[..., Any], count: Callable[[], int], record: list[int]) -> Callable[..., Any]:
        """Wrap ``Layca.step`` to append to ``record`` what ``count`` counts during it, outside its closure."""

        def counted(closure: Callable[[], Any] | None = None) -> Any:
            in_closure = 0

            def counted_closure() -> Any:
                nonlocal in_closure
                start = count()
                result = closure()  # type: ignore[misc]
                in_closure += count() - start
                return result

            start = count()
            result = step(None if closure is None else counted_closure)
            record.append(count() - start - in_closure)
            return result

        return counted


class DDPProbe(ProbeBase):
    """Record what one rank sees; put it after the rotation callback so its hooks run after that callback's.

    Written to ``<out_dir>/rank<r>.pt``:

    * ``step_collectives``: collectives issued between ``on_before_optimizer_step`` (after backward, so after DDP's
      gradient all-reduce) and ``on_train_batch_end`` of every optimizer step: the base optimizer's update, the Layca
      step and the monitor's measurement all run in that window;
    * ``layca_step_collectives``: collectives issued by each ``Layca.step`` outside its closure (the closure runs the
      forward and the backward pass, hence DDP's gradient all-reduce);
    * ``step_angles``: per optimizer step, the angle (radians) each layer turned, and ``norm_ratios``, its norm
      over its initial norm;
    * ``trace``: the collective count at every batch end and epoch end (ranks in lockstep have equal traces);
    * ``writes``: calls to TensorBoard writers and matplotlib drawing in this process;
    * ``fit_start_state`` / ``train_start_layca``: the callback's ``state_dict`` at fit start and the Layca state
      when training starts (after a checkpoint has been restored);
    * ``end_state``, ``end_layca``, ``weights`` (all parameters, flattened), ``built_checksum``, ``global_step``.
    """

    def __init__(self, out_dir: str | Path) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.step_collectives: list[int] = []
        self.layca_step_collectives: list[int] = []
        self.step_angles: list[list[float]] = []
        self.norm_ratios: list[list[float]] = []
        self.trace: list[tuple[str, int, int]] = []
        self.fit_start_state: dict[str, Any] | None = None
        self.train_start_layca: list[dict[str, Any]] = []
        self._seq_before_step: int | None = None
        self._before_step: list[torch.Tensor] = []
        self._initial_norms: list[float] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_start_state = self.rotation_callback(trainer).state_dict()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        laycas = [opt for opt in trainer.optimizers if isinstance(opt, Layca)]
        self.train_start_layca = [opt.state_dict()["layca"] for opt in laycas]
        for opt in laycas:
            opt.step = self.counting_step(opt.step, collective_count, self.layca_step_collectives)  # type: ignore[method-assign]
        self._initial_norms = [
            float(w0.detach().double().norm()) for w0 in self.rotation_callback(trainer).state_dict()["initial"]
        ]

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._before_step = [w.detach().clone() for w in layer_params(pl_module)]
        self._seq_before_step = collective_count()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._seq_before_step is not None:
            self.step_collectives.append(collective_count() - self._seq_before_step)
            self._seq_before_step = None
            after = layer_params(pl_module)
            self.step_angles.append([angle(w, w0) for w, w0 in zip(after, self._before_step, strict=True)])
            self.norm_ratios.append(
                [float(w.detach().double().norm()) / n0 for w, n0 in zip(after, self._initial_norms, strict=True)]
            )
        self.trace.append(("batch_end", batch_idx, collective_count()))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trace.append(("epoch_end", trainer.current_epoch, collective_count()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        before = collective_count()
        gathered = trainer.strategy.all_gather(weights)
        # The counter must see a collective issued from a hook, or the zero counts in the step window mean nothing.
        assert trainer.world_size == 1 or collective_count() > before, "collective counter does not count"
        if trainer.world_size > 1:
            for rank in range(1, trainer.world_size):
                assert torch.equal(gathered[rank], gathered[0]), f"rank {rank}'s weights differ from rank 0's"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "step_collectives": self.step_collectives,
                "layca_step_collectives": self.layca_step_collectives,
                "step_angles": self.step_angles,
                "norm_ratios": self.norm_ratios,
                "trace": self.trace,
                "writes": dict(self.writes),
                "fit_start_state": self.fit_start_state,
                "train_start_layca": self.train_start_layca,
                "end_state": self.rotation_callback(trainer).state_dict(),
                "end_layca": [opt.state_dict()["layca"] for opt in trainer.optimizers if isinstance(opt, Layca)],
                "weights": weights,
                "built_checksum": getattr(pl_module, "built_checksum", None),
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Exact equality of nested dicts/lists/tuples of tensors and Python values (tensors: same dtype and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def scalars_with_prefix(events: Any, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of an event file whose tag starts with ``prefix``, as ``(step, value)`` pairs."""
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def read_events(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def make_trainer(root: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
        default_root_dir=root,
        logger=TensorBoardLogger(root, name="logs"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    options.update(kwargs)
    start_methods = {"ddp_spawn": "spawn", "ddp": "popen"}
    if options["strategy"] in start_methods:
        # A collective that one rank never joins fails the test after this long instead of hanging it for 30 min.
        options["strategy"] = DDPStrategy(
            start_method=start_methods[options["strategy"]], timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        )
    return L.Trainer(**options)


def checkpoint_every_epoch(root: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=root / "checkpoints", filename="{epoch}", save_top_k=-1)


def expected_angle() -> float:
    return math.atan(ROTATION_RATE)


def main() -> None:
    """Fit with ``strategy='ddp'`` (Lightning relaunches this script once per extra rank), for the DDP tests."""
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    callbacks: list[Callback] = [LaycaCallback(rotation_rate=ROTATION_RATE), DDPProbe(args.root / "probe")]
    trainer = make_trainer(args.root, callbacks, strategy="ddp")
    # Each process builds its model before the Trainer exists, seeded by its rank as `configure_model` would.
    trainer.fit(RotationNet(batch_size=4, build_with_seed=100 + int(os.environ.get("LOCAL_RANK", "0"))))


if __name__ == "__main__":
    main()
