"""GPTQ-style rounding of the int8 weight (``weight_rounding="gptq"``).

Round-to-nearest makes each weight's error independent of the data. GPTQ (Frantar et al., 2022) rounds
the columns of W one after another and spreads each column's rounding error over the columns not yet
rounded, weighted by the inverse Hessian H = X̂ᵀX̂ of the layer's input, so that ‖X̂ Wᵀ − X̂ Qᵀ‖ rather
than ‖W − Q‖ is kept small. The scales stay those of round-to-nearest (per output channel), so the result
is an ordinary int8 weight for the same int8 GEMM. X̂ is what the int8 GEMM really sees: the input after
smoothing and after the outlier channels were divided by S_o.

XᵀX is not kept from the calibration pass: the calibration keeps its batches (token windows, small), and
the rewrite gathers XᵀX of a few inputs at a time (``GPTQ_MEMORY`` bytes of float64 at most, but at least one
input) from the graph before it is rewritten, rounds those layers, frees it and goes on. Memory stays bounded
whatever the model's width and depth; the cost is a partial forward pass of the batches per chunk.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from .capture import device_of, on_device
from .errors import QuaffError
from .kernels.reference import QMAX


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, block: int = 128,
               damp: float = 0.01) -> torch.Tensor:
    """int8 codes [N, K] of ``weight`` [N, K] with per-row ``scale`` [N], error-compensated by ``hessian`` [K, K]."""
    w = weight.detach().float().clone()
    k = w.shape[1]
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0  # channels that never fired: nothing to compensate with
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    scale = scale.float().to(w.device)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hi = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = torch.clamp(torch.round(col / scale), -QMAX, QMAX)
            q[:, i1 + i] = qc
            e = (col - qc * scale) / hi[i, i]
            w1[:, i:] -= e[:, None] * hi[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.to(torch.int8)


def seen_hessian(hessian: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """H of X̂ from H of X: X̂ = X · diag(d), d = the layer's ``input_scale()`` (1/s, 1/S_o on the outliers)."""
    d = input_scale.double().to(hessian.device)
    return hessian.double() * d[:, None] * d[None, :]


# -- XᵀX in bounded memory ---------------------------------------------------------------------------
GPTQ_MEMORY = 256 << 20  # bytes of XᵀX (float64) held at once; a single input wider than this is still done alone


class _Stop(Exception):
    """Raised once the last input of a chunk has been produced: the rest of the graph need not run."""


class _XtXObserver(Interpreter):
    """Runs the graph and sums XᵀX of the values some nodes produce; stops after the last of them."""

    def __init__(self, gm: GraphModule, wanted: set[Node], sums: dict[Node, torch.Tensor]):
        super().__init__(gm)
        self.wanted, self.sums, self.left = wanted, sums, set()

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n in self.wanted:
            x2d = out.detach().reshape(-1, out.shape[-1]).double()
            h = x2d.t() @ x2d
            self.sums[n] = self.sums[n] + h if n in self.sums else h
            self.left.discard(n)
            if not self.left:
                raise _Stop
        return out

    def run_batch(self, batch: Any) -> None:
        """One batch, passed to the graph as the calibration passed it."""
        self.left = set(self.wanted)
        try:
            self.run(batch)
        except _Stop:
            pass


def chunks(nodes: list[Node], width: dict[Node, int], budget: int = GPTQ_MEMORY) -> list[list[Node]]:
    """``nodes`` (in graph order) split into runs whose XᵀX (float64) fit ``budget`` bytes together."""
    out: list[list[Node]] = []
    used = budget + 1
    for n in nodes:
        size = width[n] ** 2 * 8
        if used + size > budget:
            out.append([])
            used = 0
        out[-1].append(n)
        used += size
    return out


@torch.no_grad()
def gather_xtx(gm: GraphModule, nodes: list[Node], batches: Sequence[Any]) -> dict[Node, torch.Tensor]:
    """XᵀX summed over ``batches`` for the values of ``nodes``, from one partial run of ``gm`` per batch
    (each run stops after the last of the nodes). The graph is run as it is: call this before rewriting it."""
    sums: dict[Node, torch.Tensor] = {}
    observer, device = _XtXObserver(gm, set(nodes), sums), device_of(gm)
    for batch in batches:
        observer.run_batch(on_device(batch, device))
    missing = [n.name for n in nodes if n not in sums]
    if missing:
        raise QuaffError(f"GPTQ rounding: the calibration batches never reached node(s) {', '.join(missing)} of the graph")
    return sums
