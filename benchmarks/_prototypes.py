"""Prototypes the step-cost benchmark times next to the real optimizers, to measure ideas before building them.

* :class:`FusedSGDLayca`: SGD with momentum and the Layca step compiled together, per layer, so that the snapshot
  never exists: the base step ``D = -lr * (momentum * buf + grad)`` is known exactly in registers, the first pass reads
  ``(p, grad, buf)``, writes ``buf`` and accumulates the sums, the second reads ``(p, buf)`` and writes ``p``: 7 memory
  streams per element against 5 for fused SGD alone and 5 + 7 for ``Layca`` around it. It covers one configuration
  only (momentum, no dampening, Nesterov, weight decay or maximize), which is what a real implementation would have
  to generalise, and reads ``D`` exactly instead of as ``fl(w + D) - w``.
* :func:`cuda_graph_step`: an optimizer step captured once in a CUDA graph and replayed (launch overheads removed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lightning_layca.step.compiled import kernel_view, scalars
from lightning_layca.step.rule import coefficients, unit_roundoff


def _sgd_layca_layer(
    params: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    rate: torch.Tensor,
    initial_norm: torch.Tensor,
) -> None:
    new_buf = buf * momentum.float() + grad
    buf.copy_(new_buf)
    weights = params.double()
    step = -lr * new_buf.double()
    row_sums = torch.stack([(step * weights).sum(1), (weights * weights).sum(1), (step * step).sum(1)], 1)
    radial, weight_sq, step_sq = row_sums.sum(0).view(3, 1).unbind(0)
    one = torch.ones_like(rate).view(1)
    roundoff = unit_roundoff(params.dtype)
    k1, k2, _ = coefficients(radial, weight_sq, step_sq, rate.view(1), one, initial_norm.view(1), roundoff)
    k = torch.stack([k1, k2]).view(2)
    params.copy_(k[0] * weights + k[1] * torch.where(k[1] != 0, step, 0.0))


_compiled_sgd_layca: Callable[..., None] | None = None


class FusedSGDLayca:
    """``Layca(SGD(momentum))`` as one compiled function per layer (a benchmark prototype; see the module docstring).

    Args:
        named: ``(name, parameter)`` pairs with gradients; parameters of ``ndim >= 2`` are layers. Every layer must
            hold its gradient when the prototype is built: its steps read those gradient tensors (updated in place),
            never a gradient assigned later.
        lr: SGD's learning rate.
        momentum: SGD's momentum.
        rotation_rate: Layca's rate ``rho`` (constant: no schedule).
    """

    def __init__(
        self, named: Sequence[tuple[str, torch.Tensor]], lr: float, momentum: float, rotation_rate: float
    ) -> None:
        global _compiled_sgd_layca
        if _compiled_sgd_layca is None:
            _compiled_sgd_layca = torch.compile(
                _sgd_layca_layer, dynamic=True, fullgraph=True, options={"max_pointwise_cat_inputs": 0}
            )
        layers = [p for _, p in named if p.ndim >= 2]
        others = [p for _, p in named if p.ndim < 2]
        device = layers[0].device
        views = [kernel_view(p.detach()) for p in layers]
        if any(v is None for v in views):
            shapes = [tuple(p.shape) for p, v in zip(layers, views, strict=True) if v is None]
            raise ValueError(f"the prototype needs a lane view (kernel_view) of every layer; none for: {shapes}")
        grads = [None if p.grad is None else kernel_view(p.grad) for p in layers]
        if any(g is None for g in grads):
            missing = [tuple(p.shape) for p, g in zip(layers, grads, strict=True) if g is None]
            raise ValueError(f"the prototype reads every layer's gradient tensor (its lane view); none for: {missing}")
        self.base = torch.optim.SGD(others, lr=lr, momentum=momentum, foreach=True)
        self.views = [v for v in views if v is not None]
        self.grads = [g for g in grads if g is not None]
        self.bufs = [torch.zeros_like(v) for v in self.views]
        values = torch.tensor([lr, momentum, rotation_rate], dtype=torch.float64, device=device)
        self.lr, self.momentum, self.rate = scalars(values)
        self.norms = scalars(torch.stack([torch.linalg.vector_norm(p.detach(), dtype=torch.float64) for p in layers]))

    @torch.no_grad()
    def step(self) -> None:
        """One SGD step of the non-layers, then the fused SGD + Layca step of every layer."""
        assert _compiled_sgd_layca is not None
        self.base.step()
        for p, g, buf, n0 in zip(self.views, self.grads, self.bufs, self.norms, strict=True):
            _compiled_sgd_layca(p, g, buf, self.lr, self.momentum, self.rate, n0)


def cuda_graph_step(step: Callable[[], object], device: torch.device, warmup: int = 3) -> Callable[[], object]:
    """Capture ``step`` in a CUDA graph (after ``warmup`` calls on a side stream) and return the graph's replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
