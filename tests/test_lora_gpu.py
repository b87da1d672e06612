"""GPU tier: compiled Triton kernels in bf16/fp16 at real sizes, against a float64 oracle."""
import pytest
import torch

import peft_kernels

from helpers import assert_close_to_oracle, make_inputs

pytestmark = pytest.mark.gpu

SHAPES = [  # (M, K, N, r)
    (2048, 4096, 4096, 16),
    (1000, 4095, 4097, 13),  # odd everywhere: every tile edge is partial
    (333, 1024, 3000, 64),
    (512, 2048, 2048, 256),
    (16, 4096, 4096, 16),  # decode-sized M
]


@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_triton_matches_oracle_at_real_sizes(M, K, N, r, dtype, p):
    x, w, a, b, bias = make_inputs((M,), K, N, r, dtype, "cuda", bias=True)
    for t in (x, a, b):
        t.requires_grad_(True)
    grad_out = torch.randn(M, N, device="cuda").to(dtype)
    fn = lambda *t: peft_kernels.lora_linear(*t, scaling=2.0, dropout_p=p, seed=42, backend="triton")  # noqa: E731
    assert_close_to_oracle(fn, [x, w, a, b, bias], 2.0, p, 42, grad_out)


@pytest.mark.parametrize("M,K,N,r,dtype", [(16, 4096, 4096, 16, torch.bfloat16), (37, 4095, 4097, 13, torch.bfloat16),
                                           (64, 2048, 3000, 64, torch.float16), (16, 1024, 1024, 256, torch.bfloat16),
                                           (1, 4096, 14336, 16, torch.bfloat16), (256, 4096, 4096, 16, torch.bfloat16),
                                           (200, 4095, 4097, 13, torch.float16)])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_single_launch_kernels_match_oracle(M, K, N, r, dtype, p):
    """The small-M single-launch forward and backward (off by default until timed) compiled at
    real and odd sizes, r up to 256, against the float64 oracle."""
    from peft_kernels.triton import lora as triton_lora
    x, w, a, b, bias = make_inputs((M,), K, N, r, dtype, "cuda", bias=True)
    for t in (x, a, b):
        t.requires_grad_(True)
    grad_out = torch.randn(M, N, device="cuda").to(dtype)
    fn = lambda *t: peft_kernels.lora_linear(*t, scaling=2.0, dropout_p=p, seed=42, backend="triton")  # noqa: E731
    with triton_lora.launch_override(fused_max_m=256, fused_bwd_max_m=256):
        assert_close_to_oracle(fn, [x, w, a, b, bias], 2.0, p, 42, grad_out)


@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 16), (16, 4096, 4096, 16), (16, 4096, 14336, 16),
                                     (64, 4095, 4097, 13), (16, 14336, 4096, 64)])
@pytest.mark.parametrize("split", [2, 4, 8])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_single_launch_forward_split_k(M, K, N, r, split, p):
    """The single-launch forward with K split (partials, arrival counters, the last program's
    sums) on real concurrency: against the float64 oracle (gradients through the usual backward),
    and the same bits on every run."""
    from peft_kernels.triton import lora as triton_lora
    x, w, a, b, bias = make_inputs((M,), K, N, r, torch.bfloat16, "cuda", bias=True)
    for t in (x, a, b):
        t.requires_grad_(True)
    grad_out = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    fn = lambda *t: peft_kernels.lora_linear(*t, scaling=2.0, dropout_p=p, seed=42, backend="triton")  # noqa: E731
    with triton_lora.launch_override(fused_max_m=256, fused_bn=64, fused_split=split):
        assert_close_to_oracle(fn, [x, w, a, b, bias], 2.0, p, 42, grad_out)
        with torch.no_grad():
            runs = [fn(x, w, a, b, bias) for _ in range(5)]
    assert all(torch.equal(run, runs[0]) for run in runs)


def test_fp32_uses_exact_products():
    x, w, a, b, bias = make_inputs((300,), 1000, 700, 16, torch.float32, "cuda")
    for t in (x, a, b):
        t.requires_grad_(True)
    fn = lambda *t: peft_kernels.lora_linear(*t, scaling=0.5, dropout_p=0.1, seed=1, backend="triton")  # noqa: E731
    assert_close_to_oracle(fn, [x, w, a, b, bias], 0.5, 0.1, 1, torch.randn(300, 700, device="cuda"))


def test_auto_rule_on_cuda():
    """Small M goes to the CUDA extension when it is built (else Triton); large M to Triton."""
    small = "cuda" if peft_kernels.cuda.load() is not None else "triton"
    for M, want in ((4, small), (2048, "triton")):
        x, w, a, b, _ = make_inputs((M,), 64, 32, 4, torch.bfloat16, "cuda")
        peft_kernels.lora_linear(x, w, a, b)
        assert peft_kernels.backends.last_used("lora_linear") == want


def test_inductor_compile_fullgraph():
    """Inductor compiles a model around the op without graph breaks and matches eager. The
    seed is explicit: inductor draws its own random numbers for a seed=None draw."""
    x, w, a, b, bias = make_inputs((64,), 256, 384, 16, torch.bfloat16, "cuda")
    a.requires_grad_(True)

    def f(x, a):
        y = peft_kernels.lora_linear(x, w, a, b, bias, scaling=2.0, dropout_p=0.05, seed=9)
        return torch.nn.functional.gelu(y).float().sum()

    compiled = torch.compile(f, fullgraph=True)
    (ga_c,) = torch.autograd.grad(compiled(x, a), [a])
    (ga_e,) = torch.autograd.grad(f(x, a), [a])
    assert torch.allclose(ga_c.float(), ga_e.float(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("M,K,N,r", [(2048, 4096, 4096, 16), (1000, 4095, 4097, 13), (16, 4096, 14336, 64)])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_lora_delta_matches_oracle_at_real_sizes(M, K, N, r, p):
    """The LoRA branch alone (what patch_peft_model runs beside a bnb 8-bit or torchao base),
    compiled, bf16, against the float64 oracle with the same mask."""
    from test_lora_delta import _oracle

    from peft_kernels.ops.lora_delta import lora_delta
    x, _, a, b, _ = make_inputs((M,), K, N, r, torch.bfloat16, "cuda", bias=False)
    for t in (x, a, b):
        t.requires_grad_(True)
    grad_out = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    fn = lambda x, a, b: lora_delta(x, a, b, scaling=2.0, dropout_p=p, seed=42, backend="triton")  # noqa: E731
    assert_close_to_oracle(fn, [x, a, b], 2.0, p, 42, grad_out, oracle=_oracle(2.0, p, 42))


@pytest.mark.parametrize("M,K,N,r,p", [(16, 4096, 4096, 16, 0.05), (1000, 4095, 4097, 13, 0.1)])
def test_fast_relaunch_matches_the_oracle(monkeypatch, M, K, N, r, p):
    """PEFT_KERNELS_FAST_LAUNCH: the kernels relaunched through their compiled launchers (every
    launch after the first of a configuration) give the oracle's results, as Triton's path does."""
    from peft_kernels.triton import launch as policy
    monkeypatch.setattr(policy, "FAST_LAUNCH", True)
    monkeypatch.setattr(policy, "_COMPILED", {})
    x, w, a, b, bias = make_inputs((M,), K, N, r, torch.bfloat16, "cuda", bias=True)
    for t in (x, a, b):
        t.requires_grad_(True)
    grad_out = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    fn = lambda *t: peft_kernels.lora_linear(*t, scaling=2.0, dropout_p=p, seed=7, backend="triton")  # noqa: E731
    fn(x, w, a, b, bias).backward(grad_out)  # first launches: compiled and kept
    kept = len(policy._COMPILED)
    assert kept >= 4  # down, up, dy, dx
    assert_close_to_oracle(fn, [x, w, a, b, bias], 2.0, p, 7, grad_out)
    assert len(policy._COMPILED) == kept  # the same configurations: every launch was a relaunch


def test_fast_relaunch_of_the_4bit_products_is_bit_exact(monkeypatch):
    """The 4-bit products without atomics — the decode path at M = 16 and the windows (decode
    launches + cuBLAS) at M = 2048 — are bit-identical with and without fast relaunch."""
    from peft_kernels.quant import NF4Weight
    from peft_kernels.triton import launch as policy
    monkeypatch.setattr(policy, "_COMPILED", {})
    q = NF4Weight.from_float(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02)
    inputs = [torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) for m in (16, 2048)]
    want = [peft_kernels.quant_linear(t, q) for t in inputs]
    monkeypatch.setattr(policy, "FAST_LAUNCH", True)
    for _ in range(3):
        for t, ref in zip(inputs, want):
            assert torch.equal(peft_kernels.quant_linear(t, q), ref)
    assert policy._COMPILED


@pytest.mark.parametrize("tuner", ["lora", "adalora", "vera", "loha", "delora", "vblora", "lokr"])
def test_patched_peft_tuners_bf16_on_cuda(tuner):
    """A PEFT tuner layer at a real size (1024 tokens, 4096 -> 4096; VeRA r = 256 and LoHa r = 8,
    i.e. rank 64, reach the kernels' larger rank tiles; LoKr r = 8, the products of its 64 x 64
    Kronecker factors in cuBLAS), patched (the compiled kernels, bf16) against
    the same unpatched layer in float64: output, dX and every adapter gradient within 2x the error of
    unpatched PEFT in bf16 (the flash-attention idiom). Eval mode: no dropout mask to match."""
    import copy

    from helpers import FLOOR, rel_err
    from peft_kernels.bench.tuners import tuner_layer

    torch.manual_seed(0)
    w = (torch.randn(4096, 4096, device="cuda") / 64).to(torch.bfloat16)
    peft_bf16 = tuner_layer(w, tuner).eval()
    patched = copy.deepcopy(peft_bf16)
    assert peft_kernels.patch_peft_model(patched).patched == [""], "the layer itself is the patched module"
    oracle = copy.deepcopy(peft_bf16).double()
    x = torch.randn(1024, 4096, device="cuda").to(torch.bfloat16)
    dy = torch.randn(1024, 4096, device="cuda").to(torch.bfloat16)

    def run(layer, dtype):
        xi = x.detach().to(dtype).requires_grad_()  # a leaf of its own: x.to(bf16) is x itself
        layer.zero_grad(set_to_none=True)
        y = layer(xi)
        y.backward(dy.to(dtype))
        return [y.detach(), xi.grad] + [p.grad for p in layer.parameters() if p.requires_grad]

    ref, eager, ours = run(oracle, torch.float64), run(peft_bf16, torch.bfloat16), run(patched, torch.bfloat16)
    assert len(ours) == len(ref) > 2
    for i, (k, e, r) in enumerate(zip(ours, eager, ref)):
        assert k is not None and k.dtype == e.dtype and k.shape == e.shape, i
        err_k, err_e = rel_err(k, r), rel_err(e, r)
        assert err_k <= max(2 * err_e, FLOOR[torch.bfloat16]), \
            f"{tuner} [{i}]: patched {err_k:.3e}, PEFT bf16 {err_e:.3e}"
