"""GPTQ-style rounding of the int8 weight (``weight_rounding="gptq"``).

Round-to-nearest makes each weight's error independent of the data. GPTQ (Frantar et al., 2022) rounds
the columns of W one after another and spreads each column's rounding error over the columns not yet
rounded, weighted by the inverse Hessian H = X̂ᵀX̂ of the layer's input, so that ‖X̂ Wᵀ − X̂ Qᵀ‖ rather
than ‖W − Q‖ is kept small. The scales stay those of round-to-nearest (per output channel), so the result
is an ordinary int8 weight for the same int8 GEMM. X̂ is what the int8 GEMM really sees: the input after
smoothing and after the outlier channels were divided by S_o.

XᵀX is not kept from the calibration pass: the calibration keeps its batches (token windows, small), and
the rewrite gathers XᵀX of a few inputs at a time (``GPTQ_MEMORY`` bytes of float32 at most, but at least one
input) by running the live model with forward pre-hooks (stopping after the chunk's last input), rounds those
layers on the model's device, frees it and goes on. Memory stays bounded whatever the model's width and depth;
the cost is a partial forward pass of the batches per chunk.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Iterator, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from .capture import device_of, find_linears, on_device
from .errors import QuaffError
from .kernels.reference import QMAX
from .observers import StopRun, input_hooks, live_model, run


@torch.no_grad()
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, block: int = 128,
               damp: float = 0.01, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 codes [N, K] of ``weight`` [N, K] with per-row ``scale`` [N], error-compensated by ``hessian`` [K, K]."""
    return gptq_round_many([weight], [hessian.clone()], [scale], block, damp, dtype)[0]


@torch.no_grad()
def gptq_round_many(weights: Sequence[torch.Tensor], hessians: Sequence[torch.Tensor], scales: Sequence[torch.Tensor],
                    block: int = 128, damp: float = 0.01, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """GPTQ of several layers of one input width at once (rows padded to the widest), on their device.

    The blocked lazy-batch update of the GPTQ paper: the inverse Hessian (dampened by ``damp`` x its mean diagonal)
    as its upper Cholesky factor; inside a block of ``block`` columns each column is rounded and its error spread
    over the block's later columns; the block's errors then update all later columns with one matmul. The column
    steps are batched over the layers and work on Wᵀ (a column is a contiguous row: 8x faster on a CPU than W's
    strided columns). The updates run in ``dtype``. ``weights`` and ``hessians`` are consumed (a list is emptied, a
    Hessian changed in place) so that one float copy of the weights, the codes written over it, and the Hessians'
    factors are all the memory it holds. On the CPU the column steps run on ``GPTQ_CPU_THREADS`` threads."""
    device, k, n_layers = weights[0].device, weights[0].shape[1], len(weights)
    rows = [wi.shape[0] for wi in weights]
    n = max(rows)
    # Wᵀ [L, K, N]: a column of W is a contiguous row here (the column steps read and write whole rows)
    w = torch.zeros(n_layers, k, n, dtype=dtype, device=device)  # rows padded to the widest (none within a shape)
    s = torch.ones(n_layers, 1, n, dtype=dtype, device=device)
    for i, (wi, si) in enumerate(zip(weights, scales)):
        w[i, :, : rows[i]] = wi.detach().t()
        s[i, 0, : rows[i]] = si.detach()
    if isinstance(weights, list):
        weights.clear()
    hs = [h.detach().to(device) for h in hessians]
    if isinstance(hessians, list):
        hessians.clear()
    hinv = _inverse_cholesky(hs, w, damp, dtype)
    update = torch.empty(n_layers, min(block, k), n, dtype=dtype, device=device)  # the in-block update, reused
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hi = w[:, i1:i2].clone(), hinv[:, i1:i2, i1:i2]
        err = torch.empty(n_layers, i2 - i1, n, dtype=dtype, device=device)
        with cpu_threads(device):  # small steps, one after another: on the CPU, threads only wait on each other
            for i in range(i2 - i1):
                col = w1[:, i : i + 1]  # [L, 1, N]
                qc = torch.clamp(torch.round(col / s), -QMAX, QMAX)
                w[:, i1 + i : i1 + i + 1] = qc  # the codes overwrite the columns done (w1: the block's weights)
                e = (col - qc * s) / hi[:, i, i].view(-1, 1, 1)
                w1[:, i:].sub_(torch.mul(hi[:, i, i:, None], e, out=update[:, : i2 - i1 - i]))
                err[:, i : i + 1] = e
        if i2 < k:
            w[:, i2:].sub_(torch.bmm(hinv[:, i1:i2, i2:].transpose(1, 2), err))
    del hinv
    return [codes[:, :r].t().to(torch.int8).contiguous() for codes, r in zip(w, rows)]


# inputs up to this width get float64 factorisations on the CPU (O(K³): a 1536-wide one takes well under a second in
# float64 on 2 cores, a 5632-wide one ~5 s against ~2 s in float32); 0: float32 everywhere, as on a GPU (the memory
# test and transform_big's CPU proxy, which mirror a GPU's memory)
CPU_FLOAT64_MAX_WIDTH = 4096


def _inverse_cholesky(hs: list[torch.Tensor], wt: torch.Tensor, damp: float, dtype: torch.dtype) -> torch.Tensor:
    """Upper Cholesky factors of the dampened inverse Hessians ``hs`` (consumed) as [L, K, K] in ``dtype``; channels
    that never fired (zero diagonal) get 1 there and their weight columns (rows of ``wt`` = Wᵀ [L, K, N]) are zeroed
    (nothing to compensate with). The factorisations run in float64 when ``dtype`` is float64 and on the CPU up to
    ``CPU_FLOAT64_MAX_WIDTH`` columns (there they cost little next to the column steps, and SmolLM2's default
    artifact is the one float64 has always given: in float32 its perplexity moved by +0.33%); else in float32, as
    the GPTQ reference does on a GPU, and float64 again if that is not positive definite. One layer at a time, each
    intermediate freed before the next is made: two K x K matrices of the factorisation dtype live at once, besides
    the result."""
    k = hs[0].shape[-1]
    cpu_float64 = hs[0].device.type == "cpu" and k <= CPU_FLOAT64_MAX_WIDTH
    chol_dtype = torch.float64 if dtype == torch.float64 or cpu_float64 else torch.float32
    out = torch.empty(len(hs), k, k, dtype=dtype, device=wt.device)
    for i in range(len(hs)):
        h = hs[i].to(wt.device, chol_dtype)
        hs[i] = None  # the caller's XᵀX (float32) goes now where h is a converted copy
        diag = torch.diagonal(h)
        dead = diag == 0
        diag.masked_fill_(dead, 1.0)  # a view: writes into h
        wt[i].masked_fill_(dead[:, None], 0.0)
        diag.add_(damp * diag.mean())
        # U with H⁻¹ = UᵀU, U upper, without forming H⁻¹: the reversed H (J H J, J the exchange matrix) is L Lᵀ, so
        # H = (J L J)(J L J)ᵀ with J L J upper and U = (J L J)⁻¹ = J L⁻¹ J: one Cholesky and one triangular solve
        # (about 30% less time on a CPU than cholesky, cholesky_inverse and the upper Cholesky of H⁻¹)
        reversed_h = h.flip(0, 1)
        del h, diag
        factor, info = torch.linalg.cholesky_ex(reversed_h)
        if bool(info):  # not positive definite in float32: float64
            factor = torch.linalg.cholesky(reversed_h.double())
        del reversed_h
        eye = torch.eye(k, dtype=factor.dtype, device=factor.device)
        inverse = torch.linalg.solve_triangular(factor, eye, upper=False, out=eye)  # L⁻¹, written over the identity
        del factor
        out[i] = inverse.flip(0, 1)
        del inverse, eye
    hs.clear()
    return out


def seen_hessian(hessian: torch.Tensor, input_scale: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """H of X̂ from H of X: X̂ = X · diag(d), d = the layer's ``input_scale()`` (1/s, 1/S_o on the outliers).
    ``inplace``: write it over ``hessian`` (its last reader: no second copy of the largest XᵀX)."""
    d = input_scale.to(hessian.device, hessian.dtype)
    if inplace:
        return hessian.mul_(d[:, None]).mul_(d[None, :])
    return hessian * d[:, None] * d[None, :]


# GPTQ's column steps on the CPU: thousands of small ops, one after another; on 2 shared cores 2 threads made them
# several times slower (each op's threads wait for one another), on idle cores no faster
GPTQ_CPU_THREADS = 1


@contextmanager
def cpu_threads(device: torch.device) -> Iterator[None]:
    """At most ``GPTQ_CPU_THREADS`` intra-op threads inside the block when ``device`` is the CPU; the caller's
    setting again after."""
    before = torch.get_num_threads()
    if torch.device(device).type != "cpu" or GPTQ_CPU_THREADS >= before:
        yield
        return
    torch.set_num_threads(GPTQ_CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- XᵀX in bounded memory ---------------------------------------------------------------------------
GPTQ_MEMORY = 512 << 20  # bytes of XᵀX (float32) held at once on the CPU (SmolLM2's all: one partial run less); a
# single wider input is still done alone
GPTQ_MEMORY_CUDA = 1 << 30  # the same on a GPU (a decoder layer of an 8B at a time)


def default_budget(device: torch.device) -> int:
    return GPTQ_MEMORY_CUDA if torch.device(device).type == "cuda" else GPTQ_MEMORY


def chunks(nodes: list[Node], width: dict[Node, int], budget: int = GPTQ_MEMORY) -> list[list[Node]]:
    """``nodes`` (in graph order) split into runs whose XᵀX (float32) fit ``budget`` bytes together."""
    out: list[list[Node]] = []
    used = budget + 1
    for n in nodes:
        size = width[n] ** 2 * 4
        if used + size > budget:
            out.append([])
            used = 0
        out[-1].append(n)
        used += size
    return out


class _XtX:
    """Sums XᵀX (float32, on the input's device) of some inputs; raises StopRun once the last of them was seen."""

    def __init__(self, wanted: set[Node]):
        self.wanted, self.sums, self.left = wanted, {}, set()

    def add(self, node: Node, x: torch.Tensor) -> None:
        x2d = x.detach().reshape(-1, x.shape[-1]).float()
        if node in self.sums:
            self.sums[node].addmm_(x2d.t(), x2d)
        else:
            self.sums[node] = x2d.t() @ x2d
        self.left.discard(node)
        if not self.left:
            raise StopRun


class _GraphXtX(Interpreter):
    """Runs the graph node by node for XᵀX (when the live model is gone)."""

    def __init__(self, gm: GraphModule, acc: _XtX):
        super().__init__(gm)
        self.acc = acc

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n in self.acc.wanted:
            self.acc.add(n, out)
        return out


@torch.no_grad()
def gather_xtx(gm: GraphModule, nodes: list[Node], batches: Sequence[Any]) -> dict[Node, torch.Tensor]:
    """XᵀX (float32) summed over ``batches`` for the values of ``nodes`` (Linear inputs), from one partial run per
    batch that stops after the last of them. Where the live model still has the Linears reading them as FP Linears
    it runs, with forward pre-hooks; else the graph (call this before rewriting it)."""
    acc = _XtX(set(nodes))
    sites = [s for s in find_linears(gm) if s.input_node in acc.wanted]
    model = live_model(gm, sites) if sites else None
    reader = {}
    for site in sites:
        reader.setdefault(site.input_node, site.module_name)
    if model is not None and set(nodes) <= set(reader):
        hooks = input_hooks(model, {reader[n]: partial(acc.add, n) for n in nodes})
        step, device = partial(run, model), device_of(model)
    else:
        graph = _GraphXtX(gm, acc)
        hooks, device = nullcontext(), device_of(gm)

        def step(batch: Any, dev: torch.device) -> None:
            try:
                graph.run(on_device(batch, dev))
            except StopRun:
                pass
    with hooks:
        for batch in batches:
            acc.left = set(nodes)
            step(batch, device)
    missing = [n.name for n in nodes if n not in acc.sums]
    if missing:
        raise QuaffError(f"GPTQ rounding: the calibration batches never reached node(s) {', '.join(missing)} "
                         "of the graph")
    return acc.sums
