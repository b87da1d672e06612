"""The fused DoRA op (peft_kernels::dora_fwd / dora_bwd) on both backends: outputs and every
gradient against a float64 autograd oracle of PEFT's formulas (the tolerance idiom of
helpers.assert_close_to_oracle), every kernel path on tiny odd shapes (partial tiles, split
reductions, dropout, no dx, strided inputs), opcheck, and what it keeps for backward (torch.compile:
test_lora_registration.py)."""
import pytest
import torch

from helpers import assert_close_to_oracle, rel_err

import peft_kernels
from peft_kernels.ops.dora import dora_weight_norm, weight_row_sq
from peft_kernels.reference.rng import dropout_keep_mask
from peft_kernels.triton import lora as triton_lora


def eager_dora(x, w, a, b, m, bias, s, p, seed):
    """PEFT's DoRA layer as plain autograd ops (norm detached, the kernels' dropout mask)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    norm = torch.linalg.norm(w + s * (b @ a), dim=1).detach()
    mn = m / norm
    if p == 0.0:
        y = mn * (x2 @ w.T + s * ((x2 @ a.T) @ b.T))
        y = y + bias if bias is not None else y
    else:
        keep = dropout_keep_mask(seed, p, x2.shape[0], k, device=x.device)
        xd = torch.where(keep, x2, torch.zeros((), dtype=x.dtype, device=x.device)) / (1 - p)
        y = torch.nn.functional.linear(x2, w, bias) + (mn - 1) * (xd @ w.T) + mn * s * ((xd @ a.T) @ b.T)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _inputs(lead, k, n, r, dtype, device, bias=True):
    g = lambda *s: torch.randn(*s, dtype=torch.float32, device=device)  # noqa: E731
    x = g(*lead, k).to(dtype)
    w = (g(n, k) / k**0.5).to(dtype)
    a = (g(r, k) / k**0.5).to(dtype)
    b = (g(n, r) * 0.5).to(dtype)
    m = (torch.linalg.norm(w.float(), dim=1) * (1 + 0.2 * g(n))).to(dtype)  # ≠ the norm: mn ≠ 1
    return [x, w, a, b, m, g(n).to(dtype) if bias else None]


def _check(tensors, s, p, seed, backend, grad_out=None):
    """dora_linear vs the float64 oracle (helpers.assert_close_to_oracle with eager_dora): error <=
    max(2x eager's in the same dtype, the floor), output and every gradient."""
    def ours(x, w, a, b, m, bias):
        return peft_kernels.dora_linear(x, w, a, b, m, bias, scaling=s, dropout_p=p, seed=seed, backend=backend)

    x, w = tensors[:2]
    g = torch.randn(*x.shape[:-1], w.shape[0], device=x.device).to(x.dtype) if grad_out is None else grad_out
    assert_close_to_oracle(ours, tensors, s, p, seed, g, oracle=lambda *t: eager_dora(*t, s, p, seed))
    assert peft_kernels.backends.last_used("dora_linear") == backend


CASES = [  # (lead dims, in, out, r)
    ((37,), 45, 33, 5),
    ((2, 3), 20, 70, 1),
    ((1,), 130, 17, 16),
]


# The reference in fp16 on CPU is left out: fp32 and the float64 PEFT parity tests cover it.
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32)] + [
    (f"triton sms={sms}", dtype) for sms in (8, 1) for dtype in (torch.float32, torch.float16)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-{c[1]}-{c[2]}-r{c[3]}")
def test_matches_oracle(backend, dtype, p, case, kernel_device):
    backend, _, sms = backend.partition(" sms=")
    device = kernel_device if backend == "triton" else torch.device("cpu")
    torch.manual_seed(hash((p, case)) % 1000)
    lead, k, n, r = case
    tensors = _inputs(lead, k, n, r, dtype, device)
    for t in tensors[:1] + tensors[2:5]:
        t.requires_grad_()
    # small tiles: partial tiles; through sms, reductions split across programs (atomics, sms=8) or
    # looping over several row tiles in one program (sms=1)
    with triton_lora.launch_override(dora_bm=16, dora_bn=16, sms=int(sms or 8)):
        _check(tensors, 0.7, p, 99, backend)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_triton_paths_without_dx_bias_magnitude_grad_and_strided(p, kernel_device):
    """x frozen (no dx: the dx kernel's no-write path), no bias, magnitude frozen, a
    non-contiguous x and a stride-0 grad_out; default tiles."""
    torch.manual_seed(3)
    tensors = _inputs((41,), 36, 29, 4, torch.float32, kernel_device, bias=False)
    tensors[0] = torch.randn(36, 41, device=kernel_device).T  # [41, 36], strided
    tensors[2].requires_grad_()
    tensors[3].requires_grad_()
    g = torch.ones((), device=kernel_device).expand(41, 29)
    _check(tensors, 1.3, p, 5, "triton", grad_out=g)
    tensors[0].requires_grad_()
    tensors[4].requires_grad_()
    _check(tensors, 1.3, p, 5, "triton", grad_out=g)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_trainable_base_weight_and_bias(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    torch.manual_seed(8)
    tensors = _inputs((9,), 14, 11, 3, torch.float32, device)
    for t in tensors:
        t.requires_grad_()
    for p in (0.0, 0.25):
        _check(tensors, 0.5, p, 21, backend)


def test_backends_draw_the_same_mask(kernel_device):
    """torch and triton with one seed give the same result (the mask is a function of the seed)."""
    torch.manual_seed(2)
    x, w, a, b, m, bias = _inputs((23,), 40, 19, 4, torch.float32, kernel_device)
    kw = dict(scaling=0.9, dropout_p=0.4, seed=1234)
    y_t = peft_kernels.dora_linear(x, w, a, b, m, bias, backend="triton", **kw)
    y_r = peft_kernels.dora_linear(x.cpu(), w.cpu(), a.cpu(), b.cpu(), m.cpu(), bias.cpu(), backend="torch", **kw)
    assert rel_err(y_t, y_r) < 1e-6
    y_other = peft_kernels.dora_linear(x, w, a, b, m, bias, backend="triton", **{**kw, "seed": 1235})
    assert rel_err(y_other, y_t) > 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck(backend, p, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    torch.manual_seed(0)
    x, w, a, b = (torch.randn(6, 20, device=device), torch.randn(12, 20, device=device),
                  torch.randn(3, 20, device=device), torch.randn(12, 3, device=device))
    mn, bias = torch.rand(12, device=device) + 0.5, torch.randn(12, device=device)
    seed = torch.tensor([17], device=device) if p > 0 else None
    args = (x, w, a, b, mn, bias, 0.5, p, seed, backend)
    torch.library.opcheck(torch.ops.peft_kernels.dora_fwd.default, args)
    y, u, wsave = torch.ops.peft_kernels.dora_fwd(*args)
    dy = torch.randn_like(y)
    for need_dx in (True, False):
        torch.library.opcheck(torch.ops.peft_kernels.dora_bwd.default,
                              (dy, x, w, a, b, u, wsave, mn, 0.5, p, seed, need_dx, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fmt", ["nf4", "int4"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_quantized(backend, fmt, p, kernel_device):
    from peft_kernels.ops.dora import OP_Q, OP_QINT
    from peft_kernels.ops.quant_linear import route
    from peft_kernels.quant import Int4Weight, NF4Weight
    device = kernel_device if backend == "triton" else torch.device("cpu")
    torch.manual_seed(0)
    w0 = torch.randn(12, 64)
    q = (NF4Weight.from_float(w0, blocksize=64) if fmt == "nf4" else Int4Weight.from_float(w0, group_size=32)).to(device)
    ops = torch.ops.peft_kernels
    _, fwd, bwd, meta = route(q, backend, device, (OP_Q, ops.qdora_fwd, ops.qdora_bwd),
                              (OP_QINT, ops.intq_dora_fwd, ops.intq_dora_bwd))
    x, a, b = torch.randn(6, 64, device=device), torch.randn(3, 64, device=device), torch.randn(12, 3, device=device)
    mn, bias = torch.rand(12, device=device) + 0.5, torch.randn(12, device=device)
    seed = torch.tensor([17], device=device) if p > 0 else None
    args = (x, *meta, a, b, mn, bias, 0.5, p, seed, backend)
    torch.library.opcheck(fwd.default, args)
    y, u, wsave = fwd(*args)
    for need_dx in (True, False):
        torch.library.opcheck(bwd.default, (torch.randn_like(y), x, *meta, a, b, u, wsave, mn, 0.5, p, seed, need_dx,
                                            backend))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_keeps_only_u_and_one_output_sized_tensor(p):
    """No dropped copy of x and no mask is kept: beyond the inputs, only u [M, r], w [M, N], mn
    [N], the norm [N] (the divisor of mn = magnitude / norm) and the seed [1]. (The plain-ops
    composite this op replaced kept x_d [M, K] and two [M, N] tensors with dropout, as the
    eager formula does.)"""
    from peft_kernels.bench.harness import saved_mib
    M, K, N, r = 64, 96, 80, 4
    x, w, a, b, m, bias = _inputs((M,), K, N, r, torch.float32, torch.device("cpu"))
    for t in (x, a, b, m):
        t.requires_grad_()
    kept = saved_mib(lambda: peft_kernels.dora_linear(x, w, a, b, m, bias, scaling=2.0, dropout_p=p,
                                                      backend="torch")) * 2**20
    assert 4 * M * N <= kept <= 4 * (M * r + M * N + 2 * N) + 8, kept
    kept_eager = saved_mib(lambda: eager_dora(x, w, a, b, m, bias, 2.0, p, 7)) * 2**20
    assert kept < kept_eager if p > 0 else kept <= kept_eager


def test_bad_inputs():
    x, w, a, b, m, bias = _inputs((4,), 8, 6, 2, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"dora_linear: magnitude must be \[6\]"):
        peft_kernels.dora_linear(x, w, a, b, m[:5], bias)
    with pytest.raises(ValueError, match=r"dora_linear: lora_B must be \[out, r\]"):
        peft_kernels.dora_linear(x, w, a, b.T, m, bias)
    with pytest.raises(ValueError, match=r"dora_linear: weight dtype"):
        peft_kernels.dora_linear(x, w.double(), a, b, m, bias)
    with pytest.raises(RuntimeError, match=r"dora_linear: backend 'cuda' unavailable"):
        peft_kernels.dora_linear(x, w, a, b, m, bias, backend="cuda")
    with pytest.raises(ValueError, match=r"dora_linear: weight_row_sq must be \[6\]"):  # [1] would broadcast
        peft_kernels.dora_linear(x, w, a, b, m, bias, weight_row_sq=torch.ones(1))


def test_norm_is_detached_and_magnitude_grad_is_exact():
    """d magnitude = Σ_m dY ⊙ w / ‖W + sBA‖ (float64): the norm contributes no gradient."""
    torch.manual_seed(1)
    x, w, a, b, m, _ = [t.double() if t is not None else None for t in _inputs((7,), 10, 5, 2, torch.float32,
                                                                                    torch.device("cpu"))]
    m.requires_grad_()
    y = peft_kernels.dora_linear(x, w, a, b, m, scaling=0.5, backend="torch")
    g = torch.randn_like(y)
    y.backward(g)
    lora_out = x @ w.T + 0.5 * (x @ a.T) @ b.T
    want = (g * lora_out).sum(0) / dora_weight_norm(w, a, b, 0.5)
    assert torch.allclose(m.grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,r", [(2048, 4096, 4096, 16), (1000, 4095, 4097, 13), (333, 1024, 3000, 64),
                                     (16, 4096, 4096, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.05])
def test_triton_matches_oracle_at_real_sizes(M, K, N, r, dtype, p):
    """GPU tier: the compiled kernels in bf16/fp16 at real and odd sizes, default tiles."""
    torch.manual_seed(M + r)
    tensors = _inputs((M,), K, N, r, dtype, torch.device("cuda"))
    for t in tensors[:1] + tensors[2:5]:
        t.requires_grad_()
    _check(tensors, 2.0, p, 42, "triton")


def test_the_benchmarks_eager_baseline_is_dora():
    """bench/dora.py's eager baseline computes what dora_linear does (p = 0, float64; with dropout
    it draws torch's mask, so only its shape and finiteness are checked)."""
    from peft_kernels.bench.dora import _eager
    x, w, a, b, m, _ = [t.double() if t is not None else None
                        for t in _inputs((9,), 20, 13, 4, torch.float32, torch.device("cpu"), bias=False)]
    want = peft_kernels.dora_linear(x, w, a, b, m, scaling=1.5, backend="torch")
    assert torch.allclose(_eager(x, w, a, b, m, 1.5, 0.0), want, rtol=1e-12, atol=1e-12)
    y = _eager(x, w, a, b, m, 1.5, 0.05)
    assert y.shape == want.shape and torch.isfinite(y).all()


# ----------------------------------------------------------------------------- the one-launch row norm


def _norm_oracle(w, a, b, s):
    return torch.linalg.norm(w.double() + s * (b.double() @ a.double()), dim=1)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                 (torch.float16, torch.float32)])
@pytest.mark.parametrize("r", [1, 5, 16, 64])
@pytest.mark.parametrize("given_sq", [False, True])
def test_norm_kernel_matches_the_formula(dtype, adapter_dtype, r, given_sq, kernel_device):
    """triton/dora.py weight_norm against the float64 norm of the dense W + s·B·A: error <= 2x that of
    dora_weight_norm (the formula) in the same dtypes, or the fp32 floor. 37 rows in tiles of 16
    (partial last tile), K = 45 in steps of 64 (partial), W a transposed view (strided), ‖W_i‖²
    summed in the pass or given, A·Aᵀ in the kernel (fp16 adapters) or from cuBLAS (fp32)."""
    from peft_kernels.triton import dora as triton_dora
    torch.manual_seed(r * 10 + given_sq)
    n, k, s = 37, 45, 0.7
    w = (torch.randn(k, n, device=kernel_device) / k**0.5).to(dtype).T  # [n, k], column-major
    a = (torch.randn(r, k, device=kernel_device) / k**0.5).to(adapter_dtype)
    b = torch.randn(n, r, device=kernel_device).to(adapter_dtype)
    sq = weight_row_sq(w).repeat_interleave(2)[::2] if given_sq else None  # strided: read as laid out
    ref = _norm_oracle(w, a, b, s)
    with triton_lora.launch_override(dora_norm_bm=16):
        got = triton_dora.weight_norm(w, a, b, s, sq)
    assert got.dtype == torch.float32 and got.shape == (n,) and not got.requires_grad
    formula = dora_weight_norm(w, a, b, s, sq)
    assert rel_err(got, ref) <= max(2 * rel_err(formula, ref), 2e-6), (rel_err(got, ref), rel_err(formula, ref))


def test_norm_kernel_runs_in_dora_linear_only_when_switched_on(monkeypatch, kernel_device):
    """dora_linear (triton backend) takes the one-launch norm under launch_override(dora_norm=True)
    for r <= NORM_MAX_RANK, the formula otherwise; outputs and every gradient stay within the oracle
    tolerance either way."""
    from peft_kernels.triton import dora as triton_dora
    calls = []
    kernel = triton_dora.weight_norm
    monkeypatch.setattr(triton_dora, "weight_norm", lambda *a: calls.append(a[1].shape[0]) or kernel(*a))
    torch.manual_seed(4)
    above = triton_dora.NORM_MAX_RANK + 1
    for r, on, expect in ((5, False, []), (5, True, [5]), (above, True, [])):
        calls.clear()
        tensors = _inputs((19,), 40, 23, r, torch.float32, kernel_device)
        for t in tensors[:1] + tensors[2:5]:
            t.requires_grad_()
        with triton_lora.launch_override(dora_norm=on, dora_norm_bm=16):
            _check(tensors, 0.7, 0.3, 11, "triton")
        assert calls == expect, (r, on, calls)


@pytest.mark.gpu
@pytest.mark.parametrize("N,K,r", [(4096, 4096, 16), (14336, 4096, 16), (4097, 4095, 13), (3000, 1024, 64)])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("given_sq", [False, True])
def test_norm_kernel_at_real_sizes(N, K, r, dtype, adapter_dtype, given_sq):
    """GPU tier: the compiled one-launch norm (default tiles) against the float64 norm, error <= 2x
    the formula's; then dora_linear with it switched on against the oracle (NORM_KERNEL is off until
    this passes and bench_dora.py times it)."""
    from peft_kernels.triton import dora as triton_dora
    torch.manual_seed(N + r)
    dev = torch.device("cuda")
    w = (torch.randn(N, K, device=dev) / K**0.5).to(dtype)
    a = (torch.randn(r, K, device=dev) / K**0.5).to(adapter_dtype)
    b = (torch.randn(N, r, device=dev) * 0.1).to(adapter_dtype)
    sq = weight_row_sq(w) if given_sq else None
    ref = _norm_oracle(w, a, b, 2.0)
    got = triton_dora.weight_norm(w, a, b, 2.0, sq)
    assert rel_err(got, ref) <= max(2 * rel_err(dora_weight_norm(w, a, b, 2.0, sq), ref), 2e-6)
    if dtype != torch.float32 and adapter_dtype == dtype and not given_sq:
        tensors = _inputs((512,), K, N, r, dtype, dev)
        for t in tensors[:1] + tensors[2:5]:
            t.requires_grad_()
        with triton_lora.launch_override(dora_norm=True):
            _check(tensors, 2.0, 0.05, 42, "triton")
