"""A small LoRA / DoRA fine-tune under ``LayerRotationMonitor`` (plain AdamW) and ``LaycaCallback`` (around AdamW).

An MLP (64 -> 128 -> 128 -> 5, built in code) is pretrained with plain AdamW on scikit-learn's ``load_digits``
(shipped with scikit-learn, nothing downloads) for the digits 0-4. Its two hidden Linear layers are then wrapped with
``peft`` LoRA (rank 4; DoRA with ``use_dora=True``), a new head for the digits 5-9 is trained in full through
``modules_to_save``, and the model is fine-tuned on 5-9 with a Lightning ``Trainer``:

* ``monitor``: AdamW, ``LayerRotationMonitor`` measuring;
* ``layca``: the same AdamW, ``LaycaCallback(rotation_rate=...)`` around it (Layca controls the head; AdamW trains
  the adapters' factors).

Per run the table gives the test accuracy on 5-9 (a held-out 30 %), the final rotation (cosine distance to the start
of the fine-tune) of each adapted layer's effective weight and of the head, read from the callback's
``last_rotation``, DoRA's magnitude change where logged, and the fit's wall time.

Run from the repository root (one torch thread)::

    python -m benchmarks.lora_finetune
    python -m benchmarks.lora_finetune --seeds 0 --quick
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: make `lightning_layca` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
from lightning.pytorch.loggers import Logger
from peft import LoraConfig, get_peft_model
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import lightning_layca as ll

HIDDEN = ["0", "2"]  # the hidden Linear layers of the MLP below
HEAD = "4"


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 5))


def split(digits: range, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """70 / 30 split of the given digits, labels shifted to 0-4, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    keep = torch.tensor([int(v) in digits for v in y])
    xs = torch.tensor(x, dtype=torch.float32)[keep] / 16.0
    ys = torch.tensor(y, dtype=torch.long)[keep] - digits.start
    order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(1000 + seed))
    cut = int(0.7 * len(ys))
    return TensorDataset(xs[order[:cut]], ys[order[:cut]]), TensorDataset(xs[order[cut:]], ys[order[cut:]])


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def pretrain(seed: int, epochs: int) -> tuple[nn.Sequential, float]:
    """Plain AdamW on the digits 0-4; returns the model and its test accuracy on 0-4."""
    torch.manual_seed(seed)
    model = mlp()
    train, test = split(range(0, 5), seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, accuracy(model, test)


class LastMetrics(Logger):
    """An in-memory logger: the last value of every scalar the callbacks log (nothing is written)."""

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "last_metrics"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.last.update({k: float(v) for k, v in metrics.items()})


class FineTune(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=self.lr)


def finetune(
    base: nn.Sequential, adapter: str, control: str, seed: int, epochs: int, lr: float, rate: float
) -> dict[str, object]:
    torch.manual_seed(seed)
    net = copy.deepcopy(base)
    net[int(HEAD)] = nn.Linear(128, 5)  # a new head for the digits 5-9
    config = LoraConfig(r=4, lora_alpha=8, target_modules=HIDDEN, modules_to_save=[HEAD], use_dora=adapter == "dora")
    adapted = get_peft_model(net, config)
    train, test = split(range(5, 10), seed)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    callback: ll.LayerRotationMonitor
    if control == "monitor":
        callback = ll.LayerRotationMonitor(log_every_n_steps=1, angle_histograms=False, figure=False)
    else:
        callback = ll.LaycaCallback(rotation_rate=rate, log_every_n_steps=1, angle_histograms=False, figure=False)
    captured = LastMetrics()
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=captured,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(FineTune(adapted, lr), loader)
    seconds = time.perf_counter() - start
    adapted.eval()
    magnitude = {k: float(v) for k, v in captured.last.items() if k.lower().startswith("magnitude_change/")}
    return {
        "adapter": adapter,
        "control": control,
        "seed": seed,
        "acc": accuracy(adapted, test),
        "rotation": dict(callback.last_rotation),
        "magnitude": magnitude,
        "seconds": seconds,
    }


def short(name: str) -> str:
    """A layer's display name, shortened to the Sequential index it wraps."""
    for part in reversed(name.replace("/", ".").split(".")):
        if part.isdigit():
            return part
    return name


def table(rows: list[dict[str, object]]) -> str:
    layers = sorted({short(k) for r in rows for k in r["rotation"]})  # type: ignore[attr-defined]
    mags = sorted({short(k) for r in rows for k in r["magnitude"]})  # type: ignore[attr-defined]
    head = ["adapter", "control", "seed", "test acc 5-9"]
    head += [f"rotation {name}" + (" (head)" if name == HEAD else "") for name in layers]
    head += [f"magnitude change {name}" for name in mags] + ["fit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rot = {short(k): v for k, v in r["rotation"].items()}  # type: ignore[attr-defined]
        mag = {short(k): v for k, v in r["magnitude"].items()}  # type: ignore[attr-defined]
        cells = [str(r["adapter"]), str(r["control"]), str(r["seed"]), f"{r['acc']:.3f}"]
        cells += [f"{rot[n]:.4f}" if n in rot else "-" for n in layers]
        cells += [f"{mag[n]:.4f}" if n in mag else "-" for n in mags]
        cells.append(f"{r['seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tune epochs")
    parser.add_argument("--lr", type=float, default=5e-3, help="AdamW's learning rate in the fine-tune")
    parser.add_argument("--rotation-rate", type=float, default=3**-3, help="LaycaCallback's rotation_rate")
    parser.add_argument("--quick", action="store_true", help="one pretrain and one fine-tune epoch (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.quick:
        args.pretrain_epochs, args.epochs = 1, 1
    rows: list[dict[str, object]] = []
    pre: list[str] = []
    for seed in args.seeds:
        base, pre_acc = pretrain(seed, args.pretrain_epochs)
        pre.append(f"seed {seed}: {pre_acc:.3f}")
        for adapter in ("lora", "dora"):
            for control in ("monitor", "layca"):
                rows.append(finetune(base, adapter, control, seed, args.epochs, args.lr, args.rotation_rate))
    load = os.getloadavg()
    text = "\n".join(
        [
            f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
            f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)",
            f"Pretrain on 0-4: {args.pretrain_epochs} epochs AdamW lr 3e-3, test accuracy " + ", ".join(pre),
            f"Fine-tune on 5-9: LoRA/DoRA r=4 alpha=8 on layers {', '.join(HIDDEN)}, new head {HEAD} in "
            f"modules_to_save, {args.epochs} epochs, batch 32, AdamW lr {args.lr:g}; "
            f"layca: LaycaCallback(rotation_rate={args.rotation_rate:.4g}). Rotation = cosine distance to the "
            "fine-tune's start (effective weight for adapted layers).",
            "",
            table(rows),
        ]
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
