"""GPU tier for the 4-bit ops: compiled kernels in bf16/fp16 at real and odd sizes."""
import pytest
import torch

import peft_kernels
from peft_kernels.quant import FP4Weight, NF4Weight
from peft_kernels.triton.quant_matmul import DECODE_CANDIDATES, SPLITK_CANDIDATES

from helpers import FLOOR, assert_close_to_oracle, make_inputs, rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("M,K,N,r", [(2048, 4096, 4096, 16), (1000, 4095, 4097, 13), (16, 4096, 4096, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,nested", [("nf4", True), ("fp4", False)])
def test_qlora_triton_matches_oracle(M, K, N, r, dtype, fmt, nested):
    x, w, a, b, bias = make_inputs((M,), K, N, r, dtype, "cuda")
    q = (NF4Weight if fmt == "nf4" else FP4Weight).from_float(w, blocksize=64, double_quant=nested)
    for t in (x, a, b):
        t.requires_grad_(True)
    fn = lambda x, w, a, b, bias: peft_kernels.qlora_linear(  # noqa: E731
        x, q, a, b, bias, scaling=2.0, dropout_p=0.05, seed=3, backend="triton")
    assert_close_to_oracle(fn, [x, q.dequantize(), a, b, bias], 2.0, 0.05, 3, torch.randn(M, N, device="cuda").to(dtype))


@pytest.mark.parametrize("M", [1, 16, 333])
def test_quant_linear_triton(M):
    w = torch.randn(3000, 1024, device="cuda") * 0.02
    q = NF4Weight.from_float(w.bfloat16(), blocksize=64)
    x = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = peft_kernels.quant_linear(x, q, backend="triton")
    g = torch.randn_like(y)
    y.backward(g)
    w64 = q.dequantize(torch.float64)
    y_eager = torch.nn.functional.linear(x.detach(), q.dequantize())
    err_eager = rel_err(y_eager, x.double() @ w64.T)
    assert rel_err(y, x.double() @ w64.T) <= max(2 * err_eager, FLOOR[torch.bfloat16])
    assert rel_err(x.grad, g.double() @ w64) <= FLOOR[torch.bfloat16]


def test_decoded_values_are_bitsandbytes_values():
    """The kernel decodes exactly what dequantize() gives: multiplying by an identity matrix
    (fp32, exact products) returns the dequantized weight bit for bit."""
    q = NF4Weight.from_float(torch.randn(96, 128, device="cuda") * 0.1, blocksize=64, double_quant=True)
    eye = torch.eye(128, device="cuda")
    assert torch.equal(peft_kernels.quant_linear(eye, q, backend="triton"), q.dequantize().T)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1031, 4095)])
def test_cuda_quantize_matches_cpu_bytes(quant_type, shape):
    """from_float on CUDA (one Triton pass) gives the CPU (torch) path's bytes exactly."""
    cls = NF4Weight if quant_type == "nf4" else FP4Weight
    w = (torch.randn(*shape) * 0.02).bfloat16()
    # Single quantization: the nested absmax's mean() may round differently across devices.
    cpu = cls.from_float(w, blocksize=64, double_quant=False)
    gpu = cls.from_float(w.cuda(), blocksize=64, double_quant=False)
    assert torch.equal(gpu.packed.cpu(), cpu.packed) and torch.equal(gpu.absmax.cpu(), cpu.absmax)
    assert torch.equal(gpu.dequantize().cpu(), cpu.dequantize())
    # The nested quantizer on the GPU, given the CPU's offset (the mean may round differently).
    from peft_kernels.quant.bnb4bit import _quantize_nested_torch
    from peft_kernels.triton.quantize import quantize_nested
    want = _quantize_nested_torch(cpu.absmax)
    got = quantize_nested(gpu.absmax, want[2].cuda())
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    assert torch.allclose(cls.from_float(w.cuda()).offset.cpu(), want[2], rtol=1e-6, atol=0)


@pytest.mark.parametrize("path,tiles", [("fused", None), ("chunked", None), ("fused_aligned", None),
                                        ("fused_aligned", (16, 16, 4, 4)), ("fused_aligned", (16, 32, 2, 4))]
                         + [("fused_aligned", t) for t in DECODE_CANDIDATES])  # the timed ones too
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("M", [16, 512])
def test_matmul_4bit_paths_match_cublas_on_dequantized(path, tiles, transpose, M):
    """Every 4-bit matmul path (the aligned one with several blocks per step too) against cuBLAS
    on the dequantized weight, at a real size."""
    from peft_kernels.triton.quant_matmul import matmul_4bit
    q = NF4Weight.from_float(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    w = q.dequantize().double()
    a = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    ref = a.double() @ (w if transpose else w.T)
    eager = (a @ q.dequantize() if transpose else a @ q.dequantize().T).double()
    out = matmul_4bit(a, *q.parts(), transpose=transpose, path=path, tiles=tiles).double()
    err, eager_err = (out - ref).norm() / ref.norm(), (eager - ref).norm() / ref.norm()
    assert err <= 2 * eager_err + 1e-6


@pytest.mark.parametrize("tiles", SPLITK_CANDIDATES)
@pytest.mark.parametrize("M,N", [(1, 4096), (16, 4096), (16, 14336), (64, 4096)])
def test_matmul_4bit_splitk_on_the_gpu(tiles, M, N):
    """The split-K forward on real concurrency (its partial tiles and arrival counters): against
    cuBLAS on the dequantized weight, with the epilogue, the same bits on every run (the last
    program sums the partials in split order), and exact on x = I in fp32."""
    from peft_kernels.triton.quant_matmul import matmul_4bit, splitk_plan
    q = NF4Weight.from_float(torch.randn(N, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    w = q.dequantize().double()
    a = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    c, bias = torch.randn(M, N, device="cuda", dtype=torch.bfloat16), torch.randn(N, device="cuda",
                                                                                   dtype=torch.bfloat16)
    ref = a.double() @ w.T + c.double() + bias.double()
    eager = (a @ q.dequantize().T + c + bias).double()
    outs = [matmul_4bit(a, *q.parts(), c=c.clone(), bias=bias, path="splitk", tiles=tiles) for _ in range(5)]
    err, eager_err = (outs[0].double() - ref).norm() / ref.norm(), (eager - ref).norm() / ref.norm()
    assert err <= 2 * eager_err + 1e-6
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert splitk_plan(M, N, 4096, 64, tiles, torch.cuda.get_device_properties(0).multi_processor_count)[3] > 1
    q32 = NF4Weight.from_float(torch.randn(N, 512, device="cuda") * 0.02)
    eye = torch.eye(512, device="cuda")
    assert torch.equal(matmul_4bit(eye, *q32.parts(), path="splitk", tiles=tiles), q32.dequantize().T)


@pytest.mark.parametrize("p", [0.0, 0.05])
def test_qdora_matches_dora_on_the_dequantized_weight(p):
    """DoRA over an NF4 base on the GPU kernels against the dense DoRA on deq(W), bf16."""
    from helpers import rel_err

    q = NF4Weight.from_float(torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16) * 0.02)
    w = q.dequantize()
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    b = torch.randn(1024, 16, device="cuda", dtype=torch.bfloat16) * 0.02
    mag = torch.rand(1024, device="cuda", dtype=torch.bfloat16) + 0.5
    kw = dict(scaling=2.0, dropout_p=p, seed=5)
    ref = peft_kernels.dora_linear(*(t.double() for t in (x, w, a, b, mag)), **kw, backend="torch")  # fp64: torch only
    ours = peft_kernels.dora_linear(x, q, a, b, mag, **kw)
    dense = peft_kernels.dora_linear(x, w, a, b, mag, **kw)
    assert rel_err(ours, ref) <= max(2 * rel_err(dense, ref), 1.6e-2)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int_quant_linear_on_cuda(fmt):
    """INT8/INT4 bases on the GPU (windowed decode + cuBLAS) against cuBLAS on deq(W), bf16."""
    from helpers import rel_err
    from peft_kernels.quant import Int4Weight, Int8Weight

    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    q = Int8Weight.from_float(w) if fmt == "int8" else Int4Weight.from_float(w, group_size=64)
    x = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = peft_kernels.quant_linear(x, q)
    gy = torch.randn_like(y)
    y.backward(gy)
    w64 = q.dequantize(torch.float32).double()
    assert rel_err(y, x.double() @ w64.T) <= max(2 * rel_err(x @ q.dequantize().T, x.double() @ w64.T), 1e-6)
    assert rel_err(x.grad, gy.double() @ w64) <= max(2 * rel_err(gy @ q.dequantize(), gy.double() @ w64), 1e-6)


def test_apply_lora_over_bitsandbytes_layers_on_cuda():
    """A model loaded in 4 / 8 bits on the GPU (bnb quantizes on .cuda()): apply_lora reads bnb's
    bytes as they are. With B = 0 the 4-bit layer gives x · deq(W)ᵀ as bnb decodes it (our fused
    kernel against cuBLAS on bnb's own dequantize), the 8-bit one x · (CB·SCB/127)ᵀ; the adapters
    train in bf16."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        bnb.nn.Linear4bit(1024, 768, quant_type="nf4", compute_dtype=torch.bfloat16), torch.nn.Tanh(),
        bnb.nn.Linear8bitLt(768, 512, has_fp16_weights=False)).to(torch.bfloat16)
    model[0].weight = bnb.nn.Params4bit(torch.randn(768, 1024) * 0.02, requires_grad=False, quant_type="nf4")
    model[2].weight = bnb.nn.Int8Params(torch.randn(512, 768) * 0.02, requires_grad=False, has_fp16_weights=False)
    model = model.cuda()
    deq4 = bnb.functional.dequantize_4bit(model[0].weight.data, model[0].weight.quant_state).double()
    deq8 = model[2].weight.data.double() * model[2].weight.SCB.double()[:, None] / 127
    peft_kernels.apply_lora(model, "all-linear", r=16)
    assert [type(m).__name__ for m in model] == ["QLoRALinear", "Tanh", "IntQLoRALinear"]
    x = torch.randn(333, 1024, device="cuda", dtype=torch.bfloat16)
    h = model[0](x)
    assert rel_err(h, x.double() @ deq4.T + model[0].bias.double()) <= FLOOR[torch.bfloat16]
    assert rel_err(model[2](h), h.double() @ deq8.T + model[2].bias.double()) <= FLOOR[torch.bfloat16]
    model(x).float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", [dict(), dict(use_dora=True), dict(quantize="nf4"), dict(quantize="int8")], ids=str)
def test_merge_and_unload_on_cuda_bf16(kind):
    """merge_and_unload on the GPU in bf16: the plain nn.Linear model computes what the adapted one
    does, up to bf16 rounding of the merged weight."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1536), torch.nn.Tanh(), torch.nn.Linear(1536, 512))
    model = peft_kernels.apply_lora(model.cuda().to(torch.bfloat16), "all-linear", r=16, **kind)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(257, 1024, device="cuda", dtype=torch.bfloat16)
    before = model.eval()(x)
    peft_kernels.merge_and_unload(model)
    assert all(type(m) in (torch.nn.Linear, torch.nn.Tanh) for m in model)
    assert rel_err(model(x), before) <= 2 * FLOOR[torch.bfloat16]


CUDA_SMALL_M_SHAPES = [(16, 4096, 4096, 16, 64), (1, 4096, 14336, 16, 64), (37, 4096, 1000, 64, 128),
                       (64, 1088, 4097, 5, 64), (9, 768, 96, 8, 256)]


@pytest.mark.parametrize("M,K,N,r,blocksize", CUDA_SMALL_M_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt,nested", [("nf4", True), ("fp4", False)])
def test_cuda_small_m_4bit_forward(monkeypatch, M, K, N, r, blocksize, dtype, fmt, nested):
    """The CUDA C++ single-kernel forward over a 4-bit weight (csrc/lora_small_m.cuh, kQuant; in
    CI it runs only in the CPU emulator): qlora_linear and quant_linear against the oracle on the
    dequantized weight (gradients through the Triton backward), identical bits across runs."""
    from peft_kernels import cuda
    from peft_kernels.cuda_backend import quant as cuda_quant

    if cuda.load() is None:
        pytest.skip(f"CUDA extension not built: {cuda.reason()}")
    monkeypatch.setattr(cuda_quant, "SMALL_M_MAX_M", 64)
    x, w, a, b, bias = make_inputs((M,), K, N, r, dtype, "cuda")
    q = (NF4Weight if fmt == "nf4" else FP4Weight).from_float(w, blocksize=blocksize, double_quant=nested)
    assert cuda_quant.small_m_reason(x, q.parts()[:6], blocksize, (N, K), a) is None  # the kernel under test runs
    for t in (x, a, b):
        t.requires_grad_(True)
    fn = lambda x, w, a, b, bias: peft_kernels.qlora_linear(  # noqa: E731
        x, q, a, b, bias, scaling=2.0, dropout_p=0.05, seed=3, backend="cuda")
    grad = torch.randn(M, N, device="cuda").to(dtype)
    assert_close_to_oracle(fn, [x, q.dequantize(), a, b, bias], 2.0, 0.05, 3, grad)
    assert peft_kernels.backends.last_used("qlora_linear") == "cuda"
    xd = x.detach()
    frozen = [peft_kernels.quant_linear(xd, q, bias, backend="cuda") for _ in range(3)]
    w64 = q.dequantize(torch.float64)
    ref = torch.nn.functional.linear(xd.double(), w64, bias.double())
    eager = torch.nn.functional.linear(xd, q.dequantize(), bias)
    assert rel_err(frozen[0], ref) <= max(2 * rel_err(eager, ref), FLOOR[dtype])
    assert all(torch.equal(f, frozen[0]) for f in frozen[1:])
    runs = [peft_kernels.qlora_linear(xd, q, a.detach(), b.detach(), bias, scaling=2.0, dropout_p=0.05,
                                      seed=3, backend="cuda") for _ in range(3)]
    assert all(torch.equal(y, runs[0]) for y in runs[1:])
