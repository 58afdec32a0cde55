"""Per-step rotation rates and norms in the monitor: Step_rotation/<layer>, Weight_norm/<layer>."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import lightning_layca as ll
from tests.tiny_modules import LAYERS, TinyCNN, layer_weights, loader, make_trainer, read_events

RHO = 0.05


class PerStepDecay(TinyCNN):
    """SGD whose learning rate decays every step, so the Layca rate differs at every logged step."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + step / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def csv_rows(log_dir: str) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


# "compiled": Layca's kernel takes SGD's step and keeps no snapshot, except on the logging steps, where it is asked to.
@pytest.mark.parametrize("implementation", ["eager", "compiled"])
def test_under_layca_the_measured_rate_is_the_rate_used_and_the_norm_is_constant(
    tmp_path: Path, implementation: str
) -> None:
    callback = ll.LaycaCallback(
        rotation_rate=RHO,
        log_every_n_steps=3,
        figure=False,
        angle_histograms=False,
        implementation=implementation,
        per_layer_detail=True,
    )
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    model = PerStepDecay()
    norms = {name: float(w.double().norm()) for name, w in layer_weights(model).items()}
    trainer = make_trainer(tmp_path, logger=[tb, csv_logger], callbacks=[callback], max_epochs=2)
    trainer.fit(model, loader())
    # Nothing was copied for the measurement: Layca's own snapshot served.
    assert callback.copy_weights_before_step() == {}

    events = read_events(Path(tb.log_dir))
    rows = csv_rows(csv_logger.log_dir)
    for layer in LAYERS:
        measured = [(e.step, e.value) for e in events.Scalars(f"Step_rotation/{layer}")]
        used = [(e.step, e.value) for e in events.Scalars(f"Rotation_rate/{layer}")]
        assert [s for s, _ in measured] == [s for s, _ in used] == [2, 5, 8, 11, 14]
        assert [v for _, v in measured] == pytest.approx([v for _, v in used], rel=1e-5)
        assert len({round(v, 6) for _, v in used}) == 5  # the rate really changed from one logged step to the next
        from_csv = [float(r[f"Step_rotation/{layer}"]) for r in rows if r.get(f"Step_rotation/{layer}")]
        assert from_csv == pytest.approx([v for _, v in used], rel=1e-5)
        layer_norms = [e.value for e in events.Scalars(f"Weight_norm/{layer}")]
        assert layer_norms == pytest.approx([norms[layer]] * 5, rel=1e-6)


class StepWitness(L.Callback):
    """Keeps the weights before and after the optimizer step of every batch (an independent record)."""

    def __init__(self) -> None:
        self.steps: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.before = layer_weights(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.steps.append((self.before, layer_weights(pl_module)))


def tan_of_turn_fp64(after: torch.Tensor, before: torch.Tensor) -> float:
    w, w0 = after.double().flatten(), before.double().flatten()
    along = torch.dot(w, w0) / w0.norm()
    across = torch.linalg.vector_norm(w - torch.dot(w, w0) / torch.dot(w0, w0) * w0)
    return float(across / along)


def test_with_plain_sgd_the_rate_and_norm_match_a_float64_computation(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=4, figure=False, angle_histograms=False, per_layer_detail=True)
    witness = StepWitness()
    csv_logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, logger=csv_logger, callbacks=[monitor, witness], max_epochs=1)
    trainer.fit(TinyCNN(), loader())
    rows = [r for r in csv_rows(csv_logger.log_dir) if r.get("Step_rotation/head")]
    assert [int(r["step"]) for r in rows] == [3, 7]
    for row in rows:
        before, after = witness.steps[int(row["step"])]
        for layer in LAYERS:
            assert float(row[f"Step_rotation/{layer}"]) == pytest.approx(
                tan_of_turn_fp64(after[layer], before[layer]), rel=1e-5
            )
            assert float(row[f"Weight_norm/{layer}"]) == pytest.approx(float(after[layer].double().norm()), rel=1e-6)
    assert monitor._pre_step is None  # the transient copy is freed at the batch end


def update_ratios_fp64(after: torch.Tensor, before: torch.Tensor) -> tuple[float, float, float]:
    """Independent reference: the step's projection on the weights before it and its remainder, in float64."""
    w, d = before.double().flatten(), (after.double() - before.double()).flatten()
    radial = torch.dot(d, w) / torch.dot(w, w) * w
    tangential = d - radial
    return tuple(math.log10(float(x.norm() / w.norm())) for x in (d, tangential, radial))  # type: ignore[return-value]


class WeightDecayCNN(TinyCNN):
    """SGD with weight decay: steps with a sizeable radial part."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=0.5)


def test_update_ratio_and_its_exact_tangential_and_radial_parts_match_a_float64_computation(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=4, figure=False, angle_histograms=False, per_layer_detail=True)
    witness = StepWitness()
    csv_logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, logger=csv_logger, callbacks=[monitor, witness], max_epochs=1)
    trainer.fit(WeightDecayCNN(), loader())
    rows = [r for r in csv_rows(csv_logger.log_dir) if r.get("Update_ratio/head")]
    assert [int(r["step"]) for r in rows] == [3, 7]
    for row in rows:
        before, after = witness.steps[int(row["step"])]
        for layer in LAYERS:
            logged = [
                float(row[f"{q}/{layer}"]) for q in ("Update_ratio", "Update_ratio_tangential", "Update_ratio_radial")
            ]
            expected = update_ratios_fp64(after[layer], before[layer])
            assert logged == pytest.approx(expected, abs=1e-5)  # log10: 1e-5 is a relative 2.3e-5 on the ratio
            assert expected[2] > expected[0] - 2  # weight decay: the radial part is not negligible
            total, tangential, radial = (10.0 ** (2 * x) for x in logged)
            assert tangential + radial == pytest.approx(total, rel=1e-6)  # the split is exact
    assert monitor.update_ratio_history["head"] == [
        (3, pytest.approx(float(rows[0]["Update_ratio/head"]))),
        (7, pytest.approx(float(rows[1]["Update_ratio/head"]))),
    ]


def test_by_default_per_step_quantities_are_summaries_over_the_layers(tmp_path: Path) -> None:
    monitor = ll.LayerRotationMonitor(log_every_n_steps=4, figure=False, angle_histograms=False)
    witness = StepWitness()
    csv_logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, logger=csv_logger, callbacks=[monitor, witness], max_epochs=1)
    trainer.fit(WeightDecayCNN(), loader())
    rows = csv_rows(csv_logger.log_dir)
    columns = set(rows[0])
    assert {f"Rotation/{layer}" for layer in LAYERS} <= columns
    assert not {c for c in columns if c.split("/")[0] in ("Step_rotation", "Update_ratio", "Weight_norm")}
    (last,) = [r for r in rows if r.get("Update_ratio_summary/mean") and int(r["step"]) == 7]
    before, after = witness.steps[7]
    ratios = [update_ratios_fp64(after[layer], before[layer])[0] for layer in LAYERS]
    tans = [tan_of_turn_fp64(after[layer], before[layer]) for layer in LAYERS]
    for quantity, values in (("Update_ratio", ratios), ("Step_rotation", tans)):
        summary = [float(last[f"{quantity}_summary/{s}"]) for s in ("mean", "min", "max")]
        assert summary == pytest.approx([sum(values) / len(values), min(values), max(values)], rel=1e-5)


def test_per_unit_control_histograms_every_units_rate_at_epoch_end(tmp_path: Path) -> None:
    callback = ll.LaycaCallback(rotation_rate=RHO, granularity="unit", figure=False, log_every_n_steps=5)
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, logger=tb, callbacks=[callback], max_epochs=1)
    trainer.fit(TinyCNN(momentum=0.0), loader())
    events = read_events(Path(tb.log_dir))
    for layer in LAYERS:
        (histogram,) = events.Histograms(f"Unit_step_rotation/{layer}")
        # Every unit turned by atan(rho) in the epoch's last step (dead units excepted: they stay at 0).
        assert histogram.histogram_value.max == pytest.approx(RHO, rel=1e-5)
        assert histogram.histogram_value.min in (0.0, pytest.approx(RHO, rel=1e-5))
    assert math.isfinite(callback.last_step_rates["head"])
