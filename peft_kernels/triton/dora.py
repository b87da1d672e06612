"""Triton backend of the fused DoRA op (formulas and shapes: peft_kernels.reference.dora).

It reuses the LoRA kernels of triton/lora.py for the adapter work (the down-projection with the
dropout mask from the seed, the up-projection, dY·B, dA, dB) and cuBLAS for the base products (over
a quantized base: the 4-bit matmul or the INT windows, through forward_with / backward_with);
DoRA's own work runs in three kernels here, each one pass over its operands:

  forward   adapter_forward        L = s·u Bᵀ, u = x_d Aᵀ                            [M, N], [M, r]
    p = 0   cuBLAS                 w = L + x Wᵀ          (in place of L)
            _dora_combine_kernel   y = mn ⊙ w + bias
    p > 0   _dora_dropout_kernel   x_d, a transient [M, K] copy for cuBLAS, freed at once
            cuBLAS                 w = L + x_d Wᵀ
            _dora_combine_kernel   C = (mn − 1) ⊙ w + L + bias     (in place of L)
            cuBLAS                 y = C + x Wᵀ
  backward  _dora_grad_kernel      gl = mn ⊙ g, gd = (mn − 1) ⊙ g (p > 0), d mn = Σ_m g ⊙ w
                                   (reads g and w once)
            adapter_backward(gl)   v = gl B, dB, dA; D = dropout'(s·v A [+ gd W])
            cuBLAS                 dX = D + gl W  (p = 0)   or   Q = gd W first, dX = D + g W (p > 0)

Only x, u and w are saved (w: the magnitude gradient needs it); x_d and the mask never are.
With dropout PEFT's formula needs the base product of the dropped x too: two GEMMs forward and
two backward where the frozen layer has one each (see benchmarks/NOTES.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import determinism
from ..reference import dora as reference
from ..reference.rng import keep_threshold
from .launch import cdiv, launch, next_power_of_2
from .lora import _OVERRIDE, _mm, _sm_count, _split, adapter_backward, adapter_forward, degenerate
from .rng import keep_mask, row_keys

# Elementwise tiles (not tuned on a GPU yet): 32 x 128 elements per program step.
BM, BN, WARPS = 32, 128, 4


def _tile() -> tuple[int, int]:
    """(rows, cols) of the elementwise tiles; lora.launch_override(dora_bm=, dora_bn=) sets them
    (tests reach the partial-tile and split paths on tiny shapes)."""
    return _OVERRIDE.get("dora_bm", BM), _OVERRIDE.get("dora_bn", BN)


@triton.jit
def _dora_dropout_kernel(x_ptr, out_ptr, seed_ptr, M, K, stride_xm, stride_xk, threshold, inv_keep,
                         BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk, mask=ok, other=0.0)
    keep = keep_mask(row_keys(seed_ptr, rows)[:, None], cols[None, :], threshold)
    out = tl.where(keep, x.to(tl.float32) * inv_keep, 0.0)
    tl.store(out_ptr + rows64[:, None] * K + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dora_combine_kernel(w_ptr, mn_ptr, add_ptr, bias_ptr, out_ptr, M, N,
                         SHIFT: tl.constexpr, HAS_ADD: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr):
    # out = (mn - SHIFT) * w [+ add] [+ bias], fp32 math, one rounding; w, add, out contiguous
    # [M, N] (out may be add).
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < N
    ok = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    scale = tl.load(mn_ptr + cols, mask=col_ok, other=0.0) - SHIFT
    out = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32) * scale[None, :]
    if HAS_ADD:
        out += tl.load(add_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dora_grad_kernel(g_ptr, w_ptr, mn_ptr, gl_ptr, gd_ptr, dmn_ptr, M, N, m_per_split, stride_gm, stride_gn,
                      HAS_GD: tl.constexpr, ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # Over rows [m_lo, m_hi) of one column tile: gl = mn * g, gd = (mn - 1) * g, and
    # d mn += sum_m g * w (fp32; atomically added when the rows are split across programs, or
    # stored to this split's row of [splits, N] for the host to sum: deterministic mode).
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < N
    mn = tl.load(mn_ptr + cols, mask=col_ok, other=0.0)[None, :]
    dmn = tl.zeros((BN,), dtype=tl.float32)
    m_lo = tl.program_id(1) * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    for m0 in range(m_lo, m_hi, BM):
        rows = m0 + tl.arange(0, BM)
        rows64 = rows.to(tl.int64)
        ok = (rows < m_hi)[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + rows64[:, None] * stride_gm + cols[None, :] * stride_gn, mask=ok, other=0.0)
        g = g.to(tl.float32)
        offs = rows64[:, None] * N + cols[None, :]
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dmn += tl.sum(g * w, axis=0)
        tl.store(gl_ptr + offs, (g * mn).to(gl_ptr.dtype.element_ty), mask=ok)
        if HAS_GD:
            tl.store(gd_ptr + offs, (g * (mn - 1.0)).to(gd_ptr.dtype.element_ty), mask=ok)
    if ATOMIC:
        tl.atomic_add(dmn_ptr + cols, dmn, mask=col_ok, sem="relaxed")
    else:
        tl.store(dmn_ptr + tl.program_id(1).to(tl.int64) * N + cols, dmn, mask=col_ok)


@triton.jit
def _dora_norm_kernel(w_ptr, a_ptr, b_ptr, g_ptr, sq_ptr, norm_ptr, N, K, R,
                      stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, two_s, s_sq,
                      HAS_SQ: tl.constexpr, HAS_G: tl.constexpr, W_IEEE: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    # ‖W_i + s·(B A)_i‖ = sqrt(‖W_i‖² + 2s·(W Aᵀ)_i·B_i + s²·B_i (A Aᵀ) B_iᵀ) for BM rows of W, one
    # pass over them: W Aᵀ (A cast to W's dtype, as dora_weight_norm does), ‖W_i‖² unless given
    # (HAS_SQ) and A Aᵀ unless given (HAS_G: fp32 adapters, where every program redoing it in
    # exact fp32 would cost more than one cuBLAS launch) accumulate in the same K loop.
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    ranks = tl.arange(0, BR)
    rank_ok = ranks < R
    wa = tl.zeros((BM, BR), dtype=tl.float32)
    sq = tl.zeros((BM,), dtype=tl.float32)
    gram = tl.zeros((BR, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        w = tl.load(w_ptr + rows64[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_t = tl.load(a_ptr + ranks[None, :] * stride_ar + ks[:, None] * stride_ak,
                      mask=k_ok[:, None] & rank_ok[None, :], other=0.0)  # [BK, BR]: Aᵀ's tile, loaded as such
        wa = _mm(w, a_t.to(w.dtype), wa, W_IEEE)
        if not HAS_SQ:
            wf = w.to(tl.float32)
            sq += tl.sum(wf * wf, axis=1)
        if not HAS_G:
            a = tl.load(a_ptr + ranks[:, None] * stride_ar + ks[None, :] * stride_ak,
                        mask=rank_ok[:, None] & k_ok[None, :], other=0.0)  # [BR, BK]
            gram = _mm(a, a_t, gram, False)  # fp16/bf16 A (fp32 comes as HAS_G): exact products
    if HAS_SQ:
        sq = tl.load(sq_ptr + rows, mask=row_ok, other=0.0)
    if HAS_G:
        gram = tl.load(g_ptr + ranks[:, None] * R + ranks[None, :], mask=rank_ok[:, None] & rank_ok[None, :],
                       other=0.0)
    b = tl.load(b_ptr + rows64[:, None] * stride_bn + ranks[None, :] * stride_br,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
    cross = tl.sum(wa * b, axis=1)
    quad = tl.sum(_mm(b, gram, tl.zeros((BM, BR), dtype=tl.float32), True) * b, axis=1)
    norm = tl.sqrt(tl.maximum(sq + two_s * cross + s_sq * quad, 0.0))
    tl.store(norm_ptr + rows, norm, mask=row_ok)


def _combine(w, mn, add, bias, out, shift: int):
    M, N = w.shape
    BM, BN = _tile()
    launch(_dora_combine_kernel, (cdiv(M, BM), cdiv(N, BN)),
           w, mn, add if add is not None else w, bias if bias is not None else mn, out, M, N,
           SHIFT=shift, HAS_ADD=add is not None, HAS_BIAS=bias is not None, BM=BM, BN=BN, num_warps=WARPS)
    return out


def dropout_copy(x, dropout_p, seed):
    """dropout(x) as a new contiguous [M, K] tensor (the mask of reference.rng, kept / (1 - p))."""
    M, K = x.shape
    BM, BN = _tile()
    out = torch.empty((M, K), dtype=x.dtype, device=x.device)
    launch(_dora_dropout_kernel, (cdiv(M, BM), cdiv(K, BN)),
           x, out, seed, M, K, x.stride(0), x.stride(1), keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
           BM=BM, BK=BN, num_warps=WARPS)
    return out


# The one-launch row norm (weight_norm) replaces dora_weight_norm's ~16 small launches on the triton
# backend when on: opt-in (launch_override(dora_norm=True) or NORM_KERNEL = True) until a GPU run
# checks it against the formula and times it (tests/test_dora_op.py::test_norm_kernel_at_real_sizes,
# bench_dora.py).
NORM_KERNEL = False
NORM_MAX_RANK = 64  # [BR, BR] A·Aᵀ and [BM, BR] tiles in registers; larger ranks keep the formula
NORM_TILES = (32, 64, 4)  # BM rows of W per program, BK, num_warps (not timed)


def use_norm_kernel(weight, lora_A) -> bool:
    """Whether dora_linear's row norm runs weight_norm here: switched on, a dense weight of a kernel
    dtype, r <= NORM_MAX_RANK."""
    return (_OVERRIDE.get("dora_norm", NORM_KERNEL) and isinstance(weight, torch.Tensor)
            and weight.dtype in (torch.float16, torch.bfloat16, torch.float32) and 0 < lora_A.shape[0] <= NORM_MAX_RANK)


def weight_norm(weight, lora_A, lora_B, scaling, row_sq=None):
    """‖W + scaling·B·A‖ per output row, [N] fp32, detached: ops.dora.dora_weight_norm's value (its
    factorization) in one launch over W [N, K] (any strides), lora_A [r, K], lora_B [N, r]
    (r <= NORM_MAX_RANK), row_sq [N] = ‖W_i‖² or None (then summed in the same pass). W·Aᵀ
    accumulates in fp32 where the formula rounds it to W's dtype first. fp32 adapters get A·Aᵀ from
    one cuBLAS product (exact fp32); fp16/bf16 ones in the kernel."""
    N, K = weight.shape
    R = lora_A.shape[0]
    norm = torch.empty(N, dtype=torch.float32, device=weight.device)
    if N == 0:
        return norm
    with torch.no_grad():
        gram = lora_A @ lora_A.T if lora_A.dtype == torch.float32 else None
        sq = row_sq.to(torch.float32).contiguous() if row_sq is not None else None  # read as a flat array
    bm, bk, warps = _OVERRIDE.get("dora_norm_bm", NORM_TILES[0]), NORM_TILES[1], NORM_TILES[2]
    launch(_dora_norm_kernel, (cdiv(N, bm),),
           weight, lora_A, lora_B, gram if gram is not None else norm, sq if sq is not None else norm, norm, N, K, R,
           weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
           2.0 * scaling, scaling * scaling,
           HAS_SQ=sq is not None, HAS_G=gram is not None, W_IEEE=weight.dtype == torch.float32, BM=bm, BK=bk,
           BR=max(16, next_power_of_2(R)), num_warps=warps)
    return norm


def forward_with(base, x, lora_A, lora_B, mn, bias, scaling, dropout_p, seed):
    """The DoRA forward over any frozen base: ``base(inp, c, new)`` returns c + inp @ W.T, written
    into c, or into a new tensor when ``new`` (cuBLAS for a dense W, the 4-bit matmul or the INT
    windows for a quantized one). Returns (y [M, N], u [M, r] fp32, w [M, N])."""
    lora, u = adapter_forward(x, lora_A, lora_B, None, scaling, dropout_p, seed)
    if dropout_p == 0.0:
        w = base(x, lora, False)
        return _combine(w, mn, None, bias, torch.empty_like(w), 0), u, w
    w = base(dropout_copy(x, dropout_p, seed), lora, True)
    c = _combine(w, mn, lora, bias, lora, 1)
    return base(x, c, False), u, w


def backward_with(base_t, grad_y, x, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx):
    """The DoRA backward over any frozen base: ``base_t(g, c)`` returns c + g @ W written into c,
    or g @ W as a new tensor when c is None. Returns (dx [M, K] or an empty tensor, d lora_A,
    d lora_B, d mn [N] fp32)."""
    M, N = grad_y.shape
    has_gd = need_dx and dropout_p > 0.0
    gl = torch.empty((M, N), dtype=grad_y.dtype, device=grad_y.device)
    gd = torch.empty_like(gl) if has_gd else gl
    BM, BN = _tile()
    n_tiles = cdiv(N, BN)
    splits, per = _split(cdiv(M, BM), n_tiles, _sm_count(x.device))
    grad_mn, sliced = determinism.split_accumulator(splits, (N,), x.device)
    launch(_dora_grad_kernel, (n_tiles, splits),
           grad_y, w, mn, gl, gd, grad_mn, M, N, per * BM, grad_y.stride(0), grad_y.stride(1),
           HAS_GD=has_gd, ATOMIC=splits > 1 and not sliced, BM=BM, BN=BN, num_warps=WARPS)
    if sliced:
        grad_mn = determinism.sum_slices(grad_mn)
    if not need_dx:
        _, grad_A, grad_B = adapter_backward(gl, x, lora_A, lora_B, u, scaling, dropout_p, seed, False)
        return x.new_empty(0), grad_A, grad_B, grad_mn
    if dropout_p == 0.0:
        d, grad_A, grad_B = adapter_backward(gl, x, lora_A, lora_B, u, scaling, 0.0, None, True)
        return base_t(gl, d), grad_A, grad_B, grad_mn
    q = base_t(gd, None)
    del gd
    d, grad_A, grad_B = adapter_backward(gl, x, lora_A, lora_B, u, scaling, dropout_p, seed, True, q=q)
    return base_t(grad_y, d), grad_A, grad_B, grad_mn


def dora_forward(x, weight, lora_A, lora_B, mn, bias, scaling, dropout_p, seed):
    """x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r] (one dtype), mn [N] fp32, bias [N] |
    None, seed int64 tensor [1] | None. Returns (y [M, N], u [M, r] fp32, w [M, N])."""
    if degenerate(x, lora_B):
        return reference.dora_forward(x, weight, lora_A, lora_B, mn, bias, scaling, 0.0, None)

    def base(inp, c, new):
        return torch.addmm(c, inp, weight.t()) if new else c.addmm_(inp, weight.t())
    return forward_with(base, x, lora_A, lora_B, mn, bias, scaling, dropout_p, seed)


def dora_backward(grad_y, x, weight, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx):
    """Returns (dx [M, K] or an empty tensor, d lora_A [r, K], d lora_B [N, r], d mn [N] fp32)."""
    if degenerate(x, lora_B):
        return reference.dora_backward(grad_y, x, weight, lora_A, lora_B, u, w, mn, scaling, 0.0, None, need_dx)

    def base_t(g, c):
        return g @ weight if c is None else c.addmm_(g, weight)
    return backward_with(base_t, grad_y, x, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx)
