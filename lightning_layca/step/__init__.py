"""The arithmetic of the Layca step, apart from any bookkeeping: which layers, which rates, which path.

* :mod:`~lightning_layca.step.rule`: THE rule, :func:`~lightning_layca.step.rule.coefficients`, from a layer's (unit's)
  sums ``(<D, w>, <w, w>, <D, D>)`` to the coefficients of ``w' = k1 * w + k2 * D`` (rounding floor, non-finite
  steps, rates without overflow);
* :mod:`~lightning_layca.step.eager`: the eager implementation (float64 sums of :mod:`lightning_layca.sums`, the seam
  for sharded layers, the rule, a multi-tensor update);
* :mod:`~lightning_layca.step.kernels` and :mod:`~lightning_layca.step.compiled`: the compiled implementation (the same
  sums, rule and update traced into one kernel per layer, compiled with ``torch.compile``); around SGD, Adam and
  AdamW the kernels take the base step too (:mod:`~lightning_layca.step.base_kernels`, called by
  :mod:`~lightning_layca.step.base_compiled`);
* :mod:`~lightning_layca.step.families`: one entry per base-optimizer family whose step the compiled kernel takes
  (how its step is read, :mod:`~lightning_layca.step.base_steps`; its kernels,
  :mod:`~lightning_layca.step.base_kernels`; its equilibrium rate, :mod:`~lightning_layca.step.equilibrium`).

Granularity is a flag (``per_unit``) over row views everywhere: a layer is one row, or each unit is a row. Every
implementation takes the layers and their per-row values (``rates``, ``relative_lrs``, ``initial_norms``) and returns
what the rule flagged; :class:`lightning_layca.plan.StepPlan` says which implementation steps which layer.
"""

from lightning_layca.step.eager import rotate_eager, step_sums, update
from lightning_layca.step.rule import NEAR_FLOOR_FACTOR, ROUNDING_FLOOR_FACTOR, coefficients, unit_roundoff

__all__ = [
    "NEAR_FLOOR_FACTOR",
    "ROUNDING_FLOOR_FACTOR",
    "coefficients",
    "rotate_eager",
    "step_sums",
    "unit_roundoff",
    "update",
]
