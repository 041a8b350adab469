"""CUDA (Triton) kernels against the reference; skipped where there is no GPU."""
import pytest
import torch

from quaff_fx.kernels import reference
from quaff_fx.modules import QuaffLinear
from quaff_fx.ops import CUDA_KERNELS

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and CUDA_KERNELS), reason="needs CUDA and Triton")


@pytest.mark.parametrize("m,k,n", [(1, 96, 40), (17, 4096, 1000), (1000, 576, 1536), (4096, 4096, 4096), (333, 14336, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_matches_reference(m, k, n, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    idx = torch.randperm(k, generator=g)[: max(k // 100, 1)]
    x[:, idx] *= 40
    q = QuaffLinear.from_weight(w, torch.randn(n, generator=g), idx, act_max=x.abs().amax(0)).eval()
    ref = reference.quaff_linear(x.to(dtype).float(), q.w_int8, q.w_scale, q.outlier_idx, q.act_scale,
                                 reference.correction_weight(q.w_outlier, q.act_scale), q.bias)
    qc = q.to("cuda", dtype=None)
    qc.w_outlier.data = qc.w_outlier.to(dtype)
    qc.bias.data = qc.bias.to(dtype)
    y = qc(x.to("cuda", dtype)).float().cpu()
    # the kernel multiplies by 1/S where the reference divides by S: a few int8 roundings may flip
    tol = {torch.float32: 2e-3, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert torch.allclose(y, ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("m,k,n", [(5, 96, 40), (2048, 4096, 11008)])
def test_grad_input_matches_reference(m, k, n, exact):
    g = torch.Generator().manual_seed(1)
    q = QuaffLinear.from_weight(torch.randn(n, k, generator=g), None, [0, 3]).eval()
    grad = torch.randn(m, n, generator=g)
    ref = reference.grad_input(grad, q.w_int8, q.w_scale, exact)
    got = torch.ops.quaff.linear_grad_input(grad.cuda().bfloat16(), q.w_int8.cuda(), q.w_scale.cuda(), exact).float().cpu()
    assert torch.allclose(got, ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


def test_compiled_fullgraph_on_cuda():
    q = QuaffLinear.from_weight(torch.randn(256, 512), None, [1, 2]).eval().cuda()
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    q.w_outlier.data = q.w_outlier.bfloat16()
    compiled = torch.compile(q, fullgraph=True)
    assert torch.allclose(compiled(x).float(), q(x).float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("n_out", [0, 70])
def test_forward_without_outliers_with_many_and_prescaled(n_out):
    """No outlier (no correction in the epilogue), 70 outliers (three blocks of the epilogue's outlier loop),
    fp32 input, and a prescaled input (x already divided by S on the outliers: no 1/S vector)."""
    g = torch.Generator().manual_seed(2)
    m, k, n = 77, 1000, 300
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    idx = torch.randperm(k, generator=g)[:n_out].sort().values
    x[:, idx] *= 40
    q = QuaffLinear.from_weight(w, None, idx, act_max=x.abs().amax(0) if n_out else None).eval()
    ref = reference.quaff_linear(x, q.w_int8, q.w_scale, q.outlier_idx, q.act_scale,
                                 reference.correction_weight(q.w_outlier, q.act_scale))
    args = [t.cuda() for t in (q.w_int8, q.w_scale, q.outlier_idx, q.act_scale, q.w_outlier)]
    y = torch.ops.quaff.linear(x.cuda(), *args).cpu()
    assert torch.allclose(y, ref, atol=2e-3 * ref.abs().max().item(), rtol=2e-3)
    if n_out:
        xs = x.clone()
        xs[:, idx] /= q.act_scale
        y2 = torch.ops.quaff.linear(xs.cuda(), *args, None, True).cpu()
        assert torch.allclose(y2, ref, atol=2e-3 * ref.abs().max().item(), rtol=2e-3)
