"""CUDA (Triton) kernels against the reference; skipped where there is no GPU."""
import pytest
import torch

from quaff_fx.kernels import reference
from quaff_fx.ops import CUDA_KERNELS
from quaff_fx.quaff_linear import QuaffLinear

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and CUDA_KERNELS), reason="needs CUDA and Triton")
if CUDA_KERNELS:
    from quaff_fx.kernels import triton_kernels as tk


@pytest.mark.parametrize("m,k,n", [(1, 96, 40), (17, 4096, 1000), (1000, 576, 1536), (4096, 4096, 4096),
                                   (333, 14336, 4096)])
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


@pytest.mark.parametrize("path", ["dequantized", "exact", "int8 on the Wᵀ copy", "int8 on the copy, smoothed",
                                  "dequantized, smoothed"])
@pytest.mark.parametrize("m,k,n", [(5, 96, 40), (2048, 4096, 11008), (100, 20000, 136)])
def test_grad_input_matches_reference(m, k, n, path):
    """grad_X on CUDA: W dequantized + cuBLAS (the grad_X mode 'dequantize', or exact), or the int8 GEMM on the
    transposed int8 copy (the gradient
    quantized per row, as the reference does when not exact); 1/s of the smoothing as a column scale. The
    100×136 gradient against a 20000-wide W: the two-pass quantization (rows wider than ONE_PASS_MAX)."""
    g = torch.Generator().manual_seed(1)
    q = QuaffLinear.from_weight(torch.randn(n, k, generator=g), None, [0, 3]).eval()
    grad = torch.randn(m, n, generator=g)
    inv = torch.rand(k, generator=g) + 0.5 if "smoothed" in path else None
    exact = path == "exact"
    ref = reference.grad_input(grad, q.w_int8, q.w_scale, exact or path.startswith("dequantized"))
    ref = ref if inv is None else ref * inv
    w_t = q.w_int8.t().contiguous().cuda() if path.startswith("int8") else None
    tk.set_grad_x_mode("dequantize" if path.startswith("dequantized") else "int8")
    try:
        got = torch.ops.quaff.linear_grad_input(grad.cuda().bfloat16(), q.w_int8.cuda(), q.w_scale.cuda(), exact,
                                                None if inv is None else inv.cuda(), w_t).float().cpu()
    finally:
        tk.set_grad_x_mode("int8")
    assert torch.allclose(got, ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("m,k,n", [(64, 512, 384), (333, 20000, 256)])
def test_smoothed_layer_with_int8_backward_matches_cpu(m, k, n):
    """A smoothed layer (1/s inside the op) in training with the int8 backward: the output, grad_X and the
    momentum-updated scales on CUDA against the CPU op. 20000 input channels: two-pass quantization."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 3
    idx = torch.randperm(k, generator=g)[:5]
    x[:, idx] *= 40
    cpu = QuaffLinear.from_weight(w, torch.randn(n, generator=g), idx, x.abs().amax(0), smooth_alpha=0.5).train()
    gpu = QuaffLinear.from_weight(w, cpu.bias.detach(), idx, x.abs().amax(0), smooth_alpha=0.5).train()
    gpu = gpu.cuda().int8_backward_()
    assert gpu.w_int8_t.is_cuda and "w_int8_t" not in gpu.state_dict()
    grad = torch.randn(m, n, generator=g)
    xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    yc.backward(grad)
    yg.backward(grad.cuda())
    for got, want in ((yg, yc), (xg.grad, xc.grad), (gpu.act_scale, cpu.act_scale)):
        got = got.detach().cpu()
        assert torch.allclose(got, want.detach(), atol=3e-3 * want.abs().max().item(), rtol=3e-3)


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


@pytest.mark.parametrize("m,k,n", [(5, 96, 40), (333, 1000, 777), (2048, 4096, 1024), (64, 14336, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grad_input_on_transient_transpose_matches_reference(m, k, n, dtype):
    """grad_X in int8 without the kept copy (the default: a transient transposed W) equals the reference's
    not-exact grad_X (the gradient quantized per row), 1/s included; odd sizes, three dtypes."""
    g = torch.Generator().manual_seed(4)
    q = QuaffLinear.from_weight(torch.randn(n, k, generator=g), None, [0, 3]).eval()
    grad = torch.randn(m, n, generator=g) * (torch.rand(m, 1, generator=g) * 4)
    inv = torch.rand(k, generator=g) + 0.5
    ref = reference.grad_input(grad.to(dtype).float(), q.w_int8, q.w_scale, False) * inv
    got = torch.ops.quaff.linear_grad_input(grad.cuda().to(dtype), q.w_int8.cuda(), q.w_scale.cuda(), False,
                                            inv.cuda()).float().cpu()
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    assert torch.allclose(got, ref, atol=tol * ref.abs().max().item(), rtol=tol)
    assert torch.linalg.norm(got - ref) / torch.linalg.norm(ref) < tol


@pytest.mark.parametrize("r,c", [(1, 1), (5, 300), (129, 127), (4096, 14336)])
@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_transpose_is_exact(r, c, dtype):
    x = torch.randint(-127, 128, (r, c), device="cuda").to(dtype)
    y = tk.transpose(x)
    assert y.shape == (c, r) and y.is_contiguous() and torch.equal(y, x.t())


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (300, 1000, 520)])
def test_int8_gemm_n_major_b_is_exact(m, k, n):
    """The int8 GEMM with B [K, N] row-major (N-major tiles; slow, kept for the measurement) and on the K-major
    copy give the exact integer product (the int32 accumulator, then the fp32 scales)."""
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, device="cuda")
    sa = torch.rand(m, device="cuda") + 0.5
    exact = (a.double() @ b.double()) * sa.double()[:, None]
    for got in (tk.int8_gemm(a, b, sa, None, torch.float32, b_is_nk=False),
                tk.int8_gemm(a, tk.transpose(b), sa, None, torch.float32, b_is_nk=True)):
        assert torch.allclose(got.double(), exact, rtol=1e-6, atol=1e-6 * exact.abs().max().item())


@pytest.mark.parametrize("t,h,v,chunk", [(7, 32, 50, 3), (1000, 256, 32000, 256), (4095, 512, 128256, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_cross_entropy_on_cuda(t, h, v, chunk, dtype):
    """The chunked linear + cross-entropy against F.cross_entropy on the full logits: loss and grad of the
    hidden states, ignored labels included, chunks that do not divide the tokens."""
    from quaff_fx.kernels.linear_ce import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(5)
    hid = torch.randn(t, h, device="cuda", generator=g).to(dtype)
    w = (torch.randn(v, h, device="cuda", generator=g) * h ** -0.5).to(dtype)
    labels = torch.randint(0, v, (t,), device="cuda", generator=g)
    labels[:: 5] = -100
    h1, h2 = hid.clone().requires_grad_(), hid.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h1 @ w.t()).float(), labels)
    ref.backward()
    got = linear_cross_entropy(h2, w, labels, chunk)
    got.backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(got.item() - ref.item()) < tol * abs(ref.item())
    assert torch.linalg.norm(h2.grad.float() - h1.grad.float()) / torch.linalg.norm(h1.grad.float()) < tol


@pytest.mark.parametrize("m,k,group", [(1, 96, 32), (17, 4096, 128), (300, 14336, 128), (64, 1000, 64), (33, 200, 48),
                                       (8, 100, 128)])
def test_grouped_quantization_matches_reference(m, k, group):
    """Codes and scales per (row, group) against the reference: K not a multiple of the group, a group wider than
    K, an all-zero group, a group size the GEMM kernel does not take (48)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(m, k, generator=g) * (torch.rand(k, generator=g) * 4)
    x[:, :group] = 0  # an all-zero group: scale 1
    inv = torch.rand(k, generator=g) + 0.5
    q_ref, s_ref = reference.quantize_groups(x * inv, group)
    q, s = tk.quantize_groups(x.cuda(), inv.cuda(), group)
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-6, atol=0)
    assert (q.cpu().int() - q_ref.int()).abs().max() <= 1  # x·inv rounded once in fp32 either way: ties may differ


@pytest.mark.parametrize("m,k,n,group", [(1, 96, 40, 32), (17, 4096, 1000, 128), (1000, 14336, 576, 128),
                                         (333, 5000, 257, 64), (40, 300, 64, 48)])
def test_grouped_gemm_is_exact(m, k, n, group):
    """Σ_g (A_g B_gᵀ) · sa[:, g] · sb against float64 on the same codes (odd M, N, K; 48: the fp32 fallback)."""
    g = torch.Generator().manual_seed(6)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    ng = -(-k // group)
    sa, sb, bias = torch.rand(m, ng, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    want = sum((a[:, i * group:(i + 1) * group].double() @ b[:, i * group:(i + 1) * group].double().t())
               * sa[:, i:i + 1].double() for i in range(ng)) * sb.double()[None, :] + bias.double()
    got = tk.int8_gemm_grouped(a.cuda(), b.cuda(), sa.cuda(), sb.cuda(), group, torch.float32, bias.cuda()).double()
    assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n,group", [(17, 4096, 1000, 128), (333, 14336, 512, 128), (64, 1000, 300, 64)])
def test_grouped_layer_forward_and_backward_match_cpu(m, k, n, group, dtype):
    """A smoothed layer with outliers and act_group, in training: output, grad_X and the scales on CUDA against the
    CPU op (the reference arithmetic)."""
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 3
    idx = torch.randperm(k, generator=g)[:7]
    x[:, idx] *= 40
    cpu = QuaffLinear.from_weight(w, torch.randn(n, generator=g), idx, x.abs().amax(0), smooth_alpha=0.5).train()
    cpu.act_group = group
    gpu = QuaffLinear.from_weight(w, cpu.bias.detach(), idx, x.abs().amax(0), smooth_alpha=0.5).train().cuda()
    gpu.act_group = group
    gpu.w_outlier.data, gpu.bias.data = gpu.w_outlier.to(dtype), gpu.bias.to(dtype)
    grad = torch.randn(m, n, generator=g)
    xc, xg = x.to(dtype).float().clone().requires_grad_(), x.cuda().to(dtype).requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    yc.backward(grad)
    yg.backward(grad.cuda().to(dtype))
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    for got, want in ((yg, yc), (xg.grad, xc.grad), (gpu.act_scale, cpu.act_scale)):
        got = got.detach().float().cpu()
        assert torch.allclose(got, want.detach(), atol=tol * want.abs().max().item(), rtol=tol)
    gpu.eval()
    grouped = gpu(x.cuda().to(dtype))
    gpu.act_group = 0
    assert not torch.equal(grouped, gpu(x.cuda().to(dtype)))  # the group path ran, not the per-token one


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n,r,group", [(1, 96, 40, 4, 0), (17, 4096, 1000, 16, 0), (333, 14336, 512, 20, 128),
                                           (64, 1000, 300, 8, 64), (257, 2048, 4096, 16, 128)])
def test_lora_in_the_epilogue_matches_cpu(m, k, n, r, group, dtype):
    """quaff::lora_linear on CUDA (h · Bᵀ in the GEMM's epilogue, per token and per group, ranks below, at and above
    one 16-wide block) against the CPU op: output and the gradients of x, h and B."""
    g = torch.Generator().manual_seed(8)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 3
    idx = torch.randperm(k, generator=g)[:5]
    x[:, idx] *= 40
    cpu = QuaffLinear.from_weight(w, torch.randn(n, generator=g), idx, x.abs().amax(0), smooth_alpha=0.5,
                                  act_group=group).eval()
    gpu = QuaffLinear.from_weight(w, cpu.bias.detach(), idx, x.abs().amax(0), smooth_alpha=0.5,
                                  act_group=group).eval().cuda()
    gpu.w_outlier.data, gpu.bias.data = gpu.w_outlier.to(dtype), gpu.bias.to(dtype)
    h, b = torch.randn(m, r, generator=g) * 2, torch.randn(n, r, generator=g)
    grad = torch.randn(m, n, generator=g)
    ins_c = [t.to(dtype).float().clone().requires_grad_() for t in (x, h, b)]
    ins_g = [t.cuda().to(dtype).requires_grad_() for t in (x, h, b)]
    yc, yg = cpu(ins_c[0], lora=tuple(ins_c[1:])), gpu(ins_g[0], lora=tuple(ins_g[1:]))
    yc.backward(grad)
    yg.backward(grad.cuda().to(dtype))
    tol = 1e-2 if dtype == torch.bfloat16 else 3e-3
    for got, want in [(yg, yc)] + [(a.grad, c.grad) for a, c in zip(ins_g, ins_c)]:
        got = got.detach().float().cpu()
        assert torch.allclose(got, want.detach(), atol=tol * want.abs().max().item(), rtol=tol)
    with torch.no_grad():  # the term is there: without it the output differs by h · Bᵀ
        plain = gpu(ins_g[0]).float()
        assert torch.allclose(yg.float() - plain, (ins_g[1].float() @ ins_g[2].float().t()),
                              atol=tol * yc.abs().max().item())


@pytest.mark.parametrize("group,lora", [(0, False), (0, True), (128, True)])
def test_compile_inlines_the_triton_kernels(group, lora):
    """With ops.inline_kernels(True), torch.compile traces the quaff ops' Triton kernels into the graph: inductor's
    code launches them and names no quaff op; forward and backward equal the eager layer's; opaque (the default),
    the code calls the ops."""
    from torch._inductor.utils import run_and_get_code

    from quaff_fx import ops

    g = torch.Generator().manual_seed(9)
    w, x = torch.randn(384, 512, generator=g), torch.randn(2, 64, 512, generator=g)
    layer = QuaffLinear.from_weight(w, None, [3, 70], x.abs().amax((0, 1)), act_group=group).eval().cuda()
    layer.w_outlier.data = layer.w_outlier.bfloat16()
    h, b = torch.randn(2, 64, 8, generator=g), torch.randn(384, 8, generator=g)

    def step(xx, hh, bb):
        y = layer(xx, lora=(hh, bb)) if lora else layer(xx)
        (y.float() ** 2).mean().backward()
        return y

    def run(fn):
        ins = [t.cuda().bfloat16().requires_grad_() for t in (x, h, b)]
        return [fn(*ins)] + [t.grad for t in ins[:1 + 2 * lora]]

    want = run(step)
    default = ops.kernels_inlined()
    for inline in (True, False):
        ops.inline_kernels(inline)
        torch._dynamo.reset()
        try:
            got, codes = run_and_get_code(lambda: run(torch.compile(step)))
        finally:
            ops.inline_kernels(default)
        code = "\n".join(codes)
        assert ("quaff.linear" in code or "quaff.lora_linear" in code) != inline
        assert ("int8_gemm" in code) == inline
        for a, e in zip(got, want):
            assert torch.allclose(a.float(), e.float(), atol=2e-2 * e.abs().max().item(), rtol=2e-2)


def test_activation_offload_on_cuda_frees_the_checkpointed_inputs_and_keeps_the_gradients():
    """training.offload on the GPU: the same loss and LoRA gradients as without; at the end of the forward the
    device holds about one checkpointed input per layer less (their copies wait in pinned host memory)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from quaff_fx.training.offload import offload_activations_

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=512)
    ids = torch.randint(0, 512, (4, 1024), generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).cuda()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
        off = offload_activations_(model) if offload else None
        model.train()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads, held, off))
    (loss, grads, held, _), (loss_off, grads_off, held_off, off) = results
    layer_input = 4 * 1024 * 512 * 4
    assert off.stats["offloaded"] >= cfg.num_hidden_layers
    assert held - held_off >= cfg.num_hidden_layers * layer_input, (held, held_off)
    assert loss_off == loss
    assert all(torch.equal(grads[n], grads_off[n]) for n in grads)
