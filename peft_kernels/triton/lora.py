"""Triton backend of the fused LoRA op.

Design (measured on an H100; see benchmarks/results and README): the two big products run on
cuBLAS, which Triton's own GEMM trails by 14-27 %; everything LoRA-specific runs in four
memory-bound Triton kernels, each reading its large operand once:

  forward   _lora_down_kernel  u  = dropout(x) @ A.T / (1-p)            reads x once      [M, r]
            _lora_up_kernel    C  = bias + s * u @ B.T                  writes C once     [M, N]
            cuBLAS             y  = C + x @ W.T     (addmm_, beta=1: C is the GEMM's epilogue input)
  backward  _lora_dy_kernel    v  = dY @ B,  dB = s * dY.T @ u          reads dY once
            _lora_dx_kernel    D  = s/(1-p) * mask * (v @ A),
                               dA = s/(1-p) * v.T @ (mask * x)          reads x once, writes D
            cuBLAS             dX = D + dY @ W      (addmm_, beta=1)

Small M (decode, short sequences; opt-in until timed on a GPU, see FUSED_FWD_MAX_M): the whole
forward in one launch, _lora_fused_fwd_kernel, a GEMV-like kernel that streams W once and carries
the LoRA terms in its main loop: y = x @ W.T + bias + s * (dropout(x) @ A.T) @ B.T. Every program
recomputes u from the same x tiles (A is r/BN the size of its W slice and stays in L2), so no
second launch or workspace is needed; program 0 along N writes u for backward. Optionally
(launch_override(fused_split=S), a candidate for lora_fused_sweep.py) K is split S ways, the last
program of each output tile summing the partials: more programs, each walking a part of K.

The dropout mask is regenerated from (seed, row, col) by triton.rng in both passes: neither the
mask nor dropout(x) is ever stored; only u (M x r, fp32) is saved for backward. Reductions that
are split across programs for parallelism accumulate with fp32 atomics into zeroed buffers, or,
under torch.use_deterministic_algorithms(True), into one slice per split that the host sums
(peft_kernels.determinism).
The rank is padded to a power of two >= 16 (tl.dot's minimum) and masked.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .. import determinism
from ..reference import lora as reference
from ..reference.rng import keep_threshold
from .launch import cdiv, launch, next_power_of_2
from .rng import keep_mask, row_keys
from .splitk import last_to_arrive, split_ranges

MAX_RANK = 256


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr):
    # fp32 operands take the exact (non-TF32) path so fp32 results match PyTorch's.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _store_or_add(ptr, offs, value, mask, split, slice_rows, slice_cols, ATOMIC: tl.constexpr):
    # A reduction split across programs: ATOMIC adds every split into one zeroed fp32 buffer;
    # otherwise split ``split`` stores to its own [slice_rows, slice_cols] slice of a
    # [splits, slice_rows, slice_cols] buffer (deterministic mode sums the slices on the host, see
    # peft_kernels.determinism), or, unsplit (split = 0), straight into the result in its dtype.
    if ATOMIC:
        tl.atomic_add(ptr + offs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptr + split.to(tl.int64) * slice_rows * slice_cols + offs, value.to(ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _dropout_row_keys(seed_ptr, rows, HAS_DROPOUT: tl.constexpr):
    # [BM, 1] dropout keys of the rows; without dropout a placeholder of the same type that is
    # never read. (Returning None from one constexpr branch compiles on triton 3.9 but not on
    # 3.6, the GPU machine's version: .ci/run compile-checks both.)
    if HAS_DROPOUT:
        keys = row_keys(seed_ptr, rows)[:, None]
    else:
        keys = rows[:, None].to(tl.uint32)
    return keys


@triton.jit
def _down_tile(x, u, a_ptr, ks, k_ok, ranks, rank_ok, stride_ar, stride_ak, key, threshold,
               HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr):
    # u += dropout(x) @ A[:, ks].T for one [BM, BK] tile of x (mask from the row keys).
    if HAS_DROPOUT:
        x = tl.where(keep_mask(key, ks[None, :], threshold), x, 0.0)
    a_t = tl.load(a_ptr + ranks[None, :] * stride_ar + ks[:, None] * stride_ak,
                  mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
    return _mm(x, a_t, u, IEEE)


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, u_ptr, seed_ptr,
    M, K, R, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak,
    threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    ranks = tl.arange(0, BR)
    rank_ok = ranks < R
    key = _dropout_row_keys(seed_ptr, rows, HAS_DROPOUT)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BK):
        cols = k0 + tl.arange(0, BK)
        col_ok = cols < k_hi
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _down_tile(x, acc, a_ptr, cols, col_ok, ranks, rank_ok, stride_ar, stride_ak, key, threshold,
                         HAS_DROPOUT, IEEE)
    _store_or_add(u_ptr, rows64[:, None] * R + ranks[None, :], acc * inv_keep,
                  row_ok[:, None] & rank_ok[None, :], pid_k, M, R, ATOMIC)


@triton.jit
def _lora_up_kernel(
    u_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, R,
    stride_bn, stride_br, stride_cm, stride_cn,
    scaling,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    ranks = tl.arange(0, BR)
    rank_ok = ranks < R
    u = tl.load(u_ptr + rows64[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    b_t = tl.load(b_ptr + cols[None, :] * stride_bn + ranks[:, None] * stride_br,
                  mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    c = _mm(u.to(b_t.dtype), b_t, tl.zeros((BM, BN), dtype=tl.float32), IEEE) * scaling
    if HAS_BIAS:
        c += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows64[:, None] * stride_cm + cols[None, :] * stride_cn, c.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _fused_fwd_epilogue(acc, u, b_ptr, bias_ptr, y_ptr, u_ptr, pid_n, rows64, row_ok, cols, col_ok, cols64, ranks,
                        rank_ok, R, stride_bn, stride_br, stride_ym, stride_yn, scaling, inv_keep,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """y = acc + s * u @ B.T + bias for one output tile (u scaled by 1/(1-p)); the tile at
    pid_n == 0 also writes u for backward."""
    u = u * inv_keep
    if pid_n == 0:
        tl.store(u_ptr + rows64[:, None] * R + ranks[None, :], u, mask=row_ok[:, None] & rank_ok[None, :])
    b_t = tl.load(b_ptr + cols64[None, :] * stride_bn + ranks[:, None] * stride_br,
                  mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    # u is rounded to the adapter dtype before the up-projection, as in _lora_up_kernel.
    acc += _mm(u.to(b_t.dtype), b_t, tl.zeros((BM, BN), dtype=tl.float32), IEEE) * scaling
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _lora_fused_fwd_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, seed_ptr, part_ptr, part_u_ptr, count_ptr,
    M, N, K, R, K_PER, SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn,
    scaling, threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, SPLITK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """Program (pid_n, pid_m, pid_k) reduces columns [pid_k * K_PER, +K_PER) of x (all of K when
    not SPLITK). SPLITK: each program stores its fp32 partials of x @ W.T and of u, counts itself
    in at its output tile's counter, and the last to arrive sums the SPLIT partials in split
    order (deterministic) and runs the epilogue: more programs than N / BN, each walking a part
    of K, and u's share of A read once per tile and split rather than once per tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    ranks = tl.arange(0, BR)
    rank_ok = ranks < R
    key = _dropout_row_keys(seed_ptr, rows, HAS_DROPOUT)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    u = tl.zeros((BM, BR), dtype=tl.float32)
    k_lo = pid_k * K_PER
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER, K), BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols64[None, :] * stride_wn + ks[:, None] * stride_wk,
                      mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mm(x, w_t, acc, IEEE)
        u = _down_tile(x, u, a_ptr, ks, k_ok, ranks, rank_ok, stride_ar, stride_ak, key, threshold, HAS_DROPOUT, IEEE)
    if SPLITK:
        tile = pid_m * tl.num_programs(0) + pid_n
        n_tiles = tl.num_programs(0) * tl.num_programs(1)
        in_acc = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        in_u = tl.arange(0, BM)[:, None] * BR + ranks[None, :]
        slot = (pid_k * n_tiles + tile).to(tl.int64)
        tl.store(part_ptr + slot * (BM * BN) + in_acc, acc)
        tl.store(part_u_ptr + slot * (BM * BR) + in_u, u)
        if last_to_arrive(count_ptr, tile, SPLIT):
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            u = tl.zeros((BM, BR), dtype=tl.float32)
            for k in range(0, SPLIT):  # split order: the same sums whichever program arrives last
                slot = (k * n_tiles + tile).to(tl.int64)
                acc += tl.load(part_ptr + slot * (BM * BN) + in_acc, cache_modifier=".cg")
                u += tl.load(part_u_ptr + slot * (BM * BR) + in_u, cache_modifier=".cg")
            _fused_fwd_epilogue(acc, u, b_ptr, bias_ptr, y_ptr, u_ptr, pid_n, rows64, row_ok, cols, col_ok, cols64,
                                ranks, rank_ok, R, stride_bn, stride_br, stride_ym, stride_yn, scaling, inv_keep,
                                HAS_BIAS, IEEE, BM, BN)
    else:
        _fused_fwd_epilogue(acc, u, b_ptr, bias_ptr, y_ptr, u_ptr, pid_n, rows64, row_ok, cols, col_ok, cols64,
                            ranks, rank_ok, R, stride_bn, stride_br, stride_ym, stride_yn, scaling, inv_keep,
                            HAS_BIAS, IEEE, BM, BN)


@triton.jit
def _lora_dy_kernel(
    dy_ptr, b_ptr, u_ptr, v_ptr, db_ptr,
    M, N, R, n_per_split,
    stride_dym, stride_dyn, stride_bn, stride_br,
    scaling,
    V_ATOMIC: tl.constexpr, DB_ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    ranks = tl.arange(0, BR)
    rank_ok = ranks < R
    u = tl.load(u_ptr + rows64[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    u = u.to(dy_ptr.dtype.element_ty)
    v = tl.zeros((BM, BR), dtype=tl.float32)
    n_lo = pid_n * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    for n0 in range(n_lo, n_hi, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < n_hi
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        v = _mm(dy, b, v, IEEE)
        db = _mm(tl.trans(dy), u, tl.zeros((BN, BR), dtype=tl.float32), IEEE) * scaling
        # dB sums over every row tile: added atomically, or per row tile (deterministic mode)
        _store_or_add(db_ptr, cols[:, None] * R + ranks[None, :], db, col_ok[:, None] & rank_ok[None, :],
                      pid_m, N, R, DB_ATOMIC)
    _store_or_add(v_ptr, rows64[:, None] * R + ranks[None, :], v, row_ok[:, None] & rank_ok[None, :],
                  pid_n, M, R, V_ATOMIC)


@triton.jit
def _lora_dx_kernel(
    x_ptr, v_ptr, a_ptr, d_ptr, da_ptr, seed_ptr,
    M, K, R, m_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_dm, stride_dk,
    threshold, coef, q_coef,
    HAS_DROPOUT: tl.constexpr, WRITE_DX: tl.constexpr, HAS_Q: tl.constexpr, DA_ATOMIC: tl.constexpr,
    IEEE: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_k * BK + tl.arange(0, BK)
    col_ok = cols < K
    ranks = tl.arange(0, BR)
    rank_ok = ranks < R
    a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    da = tl.zeros((BR, BK), dtype=tl.float32)
    m_lo = pid_m * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    for m0 in range(m_lo, m_hi, BM):
        rows = m0 + tl.arange(0, BM)
        row_ok = rows < m_hi
        rows64 = rows.to(tl.int64)
        tile_ok = row_ok[:, None] & col_ok[None, :]
        v = tl.load(v_ptr + rows64[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        v = v.to(a.dtype)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xk, mask=tile_ok, other=0.0)
        if HAS_DROPOUT:
            keep = keep_mask(row_keys(seed_ptr, rows)[:, None], cols[None, :], threshold)
            x = tl.where(keep, x, 0.0)
        da = _mm(tl.trans(v), x, da, IEEE)
        if WRITE_DX:
            d = _mm(v, a, tl.zeros((BM, BK), dtype=tl.float32), IEEE) * coef
            if HAS_Q:  # DoRA: a gradient of dropout(x) from outside (D holds it), under the same mask
                d += tl.load(d_ptr + rows64[:, None] * stride_dm + cols[None, :] * stride_dk, mask=tile_ok,
                             other=0.0).to(tl.float32) * q_coef
            if HAS_DROPOUT:
                d = tl.where(keep, d, 0.0)
            tl.store(d_ptr + rows64[:, None] * stride_dm + cols[None, :] * stride_dk, d.to(d_ptr.dtype.element_ty),
                     mask=tile_ok)
    _store_or_add(da_ptr, ranks[:, None] * K + cols[None, :], da * coef, rank_ok[:, None] & col_ok[None, :],
                  pid_m, R, K, DA_ATOMIC)


@triton.jit
def _lora_fused_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, a_ptr, b_ptr, u_ptr, dx_ptr, da_ptr, db_ptr, seed_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_dxm, stride_dxk,
    scaling, threshold, coef,
    HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    # Program pid owns columns ks of dX and dA, and dB's chunks c of BN rows with c % programs ==
    # pid; it streams W[:, ks] once, and v = dY @ B comes from the same dY tiles:
    #   dX[:, ks] = dY @ W[:, ks] + coef * mask * (v @ A[:, ks]),  dA[:, ks] = coef * v.T @ (mask * x[:, ks])
    #   dB[c] = scaling * dY[:, c].T @ u
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    ks = pid * BK + tl.arange(0, BK)
    k_ok = ks < K
    ranks = tl.arange(0, BR)
    rank_ok = ranks < R
    u = tl.load(u_ptr + rows64[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    u = u.to(dy_ptr.dtype.element_ty)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    v = tl.zeros((BM, BR), dtype=tl.float32)
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        n_ok = ns < N
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dym + ns[None, :] * stride_dyn,
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptr + ns.to(tl.int64)[:, None] * stride_wn + ks[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mm(dy, w, acc, IEEE)
        b = tl.load(b_ptr + ns[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=n_ok[:, None] & rank_ok[None, :], other=0.0)
        v = _mm(dy, b, v, IEEE)
        if (n0 // BN) % programs == pid:
            # dY's tile loaded again, transposed, rather than tl.trans(dy): at M <= 16 (BM = 16)
            # the transposed register tile gave a wrong dB on an H100 with triton 3.6 (dX and dA
            # right; tests/test_lora_gpu.py::test_single_launch_kernels_match_oracle)
            dy_t = tl.load(dy_ptr + rows64[None, :] * stride_dym + ns[:, None] * stride_dyn,
                           mask=n_ok[:, None] & row_ok[None, :], other=0.0)
            db = _mm(dy_t, u, tl.zeros((BN, BR), dtype=tl.float32), IEEE) * scaling
            tl.store(db_ptr + ns[:, None] * R + ranks[None, :], db.to(db_ptr.dtype.element_ty),
                     mask=n_ok[:, None] & rank_ok[None, :])
    a = tl.load(a_ptr + ranks[:, None] * stride_ar + ks[None, :] * stride_ak,
                mask=rank_ok[:, None] & k_ok[None, :], other=0.0)
    v = v.to(a.dtype)  # rounded to the adapter dtype before its products, as in _lora_dx_kernel
    d = _mm(v, a, tl.zeros((BM, BK), dtype=tl.float32), IEEE) * coef
    tile_ok = row_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk, mask=tile_ok, other=0.0)
    if HAS_DROPOUT:
        keep = keep_mask(row_keys(seed_ptr, rows)[:, None], ks[None, :], threshold)
        x = tl.where(keep, x, 0.0)
        d = tl.where(keep, d, 0.0)
    tl.store(dx_ptr + rows64[:, None] * stride_dxm + ks[None, :] * stride_dxk,
             (acc + d).to(dx_ptr.dtype.element_ty), mask=tile_ok)
    da = _mm(tl.trans(v), x, tl.zeros((BR, BK), dtype=tl.float32), IEEE) * coef
    tl.store(da_ptr + ranks[:, None] * K + ks[None, :], da.to(da_ptr.dtype.element_ty),
             mask=rank_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------- launch policy

_OVERRIDE: dict = {}


@contextlib.contextmanager
def launch_override(**settings):
    """Force tile sizes / SM count (tests use it to reach every split and masking path on tiny
    shapes). Keys: sms, down_bm, down_bk, up_bm, up_bn, dy_bm, dy_bn, dx_bm, dx_bk, <kind>_warps,
    fused_max_m, fused_bn, fused_bk, fused_stages, fused_bwd_max_m, fused_bwd_bn, fused_bwd_bk,
    fused_bwd_stages; dora_bm, dora_bn (triton/dora.py's elementwise tiles), dora_norm (its one-launch
    row norm on or off), dora_norm_bm. Launch plans computed under other settings are dropped."""
    old = dict(_OVERRIDE)
    _OVERRIDE.update(settings)
    _PLANS.clear()
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)
        _PLANS.clear()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if "sms" in _OVERRIDE:
        return _OVERRIDE["sms"]
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: any small number; splits are exercised explicitly by the tests


def _split(tiles: int, parallel: int, sms: int, waves: int = 2) -> tuple[int, int]:
    """Split a reduction over ``tiles`` tiles into (splits, tiles per split) so that
    parallel * splits programs fill ``waves`` waves of the GPU."""
    want = max(1, cdiv(waves * sms, max(parallel, 1)))
    per = cdiv(tiles, min(want, tiles))
    return cdiv(tiles, per), per


def _tiles(kind: str, br: int, dropout: bool = False) -> tuple[int, int, int]:
    """(rows per tile, cols per tile, num_warps) for kernel ``kind`` at padded rank ``br``;
    larger ranks get smaller tiles to keep the rank-wide accumulators in registers. The dx
    kernel with dropout hashes every element: wide 32x256 tiles on 8 warps measured 0.13-0.16 ms
    faster per backward at M=8192 on an H100 than 64x128 on 4 (host-inclusive timings,
    benchmarks/results/lora_host_profile_h100.txt); without dropout 64x128 on 4 was best."""
    small, mid = br <= 32, br <= 64
    default = {
        "down": (64 if mid else 32, 128 if small else 64, 4),
        "up": (64, 128 if mid else 64, 4),
        "dy": (128 if small else 64, 64, 8 if small else 4),
        "dx": (32, 256, 8) if (dropout and small) else (64 if mid else 32, 128 if small else 64, 4),
    }[kind]
    col = "bk" if kind in ("down", "dx") else "bn"
    return (_OVERRIDE.get(f"{kind}_bm", default[0]), _OVERRIDE.get(f"{kind}_{col}", default[1]),
            _OVERRIDE.get(f"{kind}_warps", default[2]))


# The single-launch kernels run for M <= FUSED_FWD_MAX_M / FUSED_BWD_MAX_M. 0 (off) until timed
# against the tiled paths on a GPU (benchmarks/lora_fused_sweep.py; bench_lora_backends.py, "triton
# fused" rows): they are interpreter-tested and compiled, never measured.
# launch_override(fused_max_m=..., fused_bwd_max_m=...) turns them on.
FUSED_FWD_MAX_M = 0
FUSED_BWD_MAX_M = 0
# One row tile covers M (BM = M padded to a power of two >= 16), so M is bounded; up to 256 (the
# short-sequence case of #3), beyond which the tiled kernels and cuBLAS take over. The [BM, rank]
# accumulators (u, v) bound BM x padded rank as well: at 256 x 256 no GPU's shared memory holds
# the kernels' tiles even at one pipeline stage (compile_check found it), so larger products
# take the tiled path.
FUSED_LIMIT = 256
FUSED_ROWS_X_RANK = 64 * 256


def _fused_rows(M: int) -> tuple[int, int]:
    """(BM, num_warps) of the single-launch kernels: BM covers M; 8 warps from 128 rows on, so
    the [BM, BN] accumulator stays near 64 fp32 registers a thread."""
    bm = max(16, next_power_of_2(M))
    return bm, 4 if bm <= 64 else 8


def _fused_fwd_tiles(M: int, N: int, br: int, sms: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_stages, num_warps) of the single-launch forward: one row tile covering M,
    and BN chosen so that the N/BN programs fill about two waves (the kernel is bound by reading
    W). Ranks above 64, or 128 rows and more, halve BK: the A tile [BK, rank] or the x tile
    [BM, BK] dominates shared memory there."""
    bm, warps = _fused_rows(M)
    bn = 16
    while bn < 64 and cdiv(N, bn * 2) >= 2 * sms:
        bn *= 2
    bk = 128 if br <= 64 and bm <= 64 else 64
    return (bm, _OVERRIDE.get("fused_bn", bn), _OVERRIDE.get("fused_bk", bk), _OVERRIDE.get("fused_stages", 3),
            warps)


def _fused_fits(M: int, r: int, limit: int) -> bool:
    return 0 < M <= min(limit, FUSED_LIMIT) and _fused_rows(M)[0] * _padded_rank(r) <= FUSED_ROWS_X_RANK


def use_fused_forward(M: int, r: int) -> bool:
    """Whether lora_forward takes the single-launch path for M rows at rank r."""
    return _fused_fits(M, r, _OVERRIDE.get("fused_max_m", FUSED_FWD_MAX_M))


def _fused_bwd_tiles(M: int, K: int, br: int, sms: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_stages, num_warps) of the single-launch backward: one row tile covering
    M; BK (the dX columns a program owns) halved down to 16 until the K/BK programs fill about
    two waves (the kernel is bound by reading W); the reduction step BN shrinks with the rank,
    whose [BN, rank] tile of B is staged beside W's, and with 128 rows and more (the dY tile)."""
    bm, warps = _fused_rows(M)
    bk = 64
    while bk > 16 and cdiv(K, bk) < 2 * sms:
        bk //= 2
    bn = 128 if br <= 32 else 64 if br <= 64 else 32
    bn = min(bn, 64) if bm >= 128 else bn
    return (bm, _OVERRIDE.get("fused_bwd_bn", bn), _OVERRIDE.get("fused_bwd_bk", bk),
            _OVERRIDE.get("fused_bwd_stages", 3), warps)


def use_fused_backward(M: int, r: int, need_dx: bool) -> bool:
    """Whether lora_backward takes the single-launch path for M rows at rank r."""
    return need_dx and _fused_fits(M, r, _OVERRIDE.get("fused_bwd_max_m", FUSED_BWD_MAX_M))


def _padded_rank(r: int) -> int:
    return max(16, next_power_of_2(r))


# Launch plans of the tiled adapter kernels, per (shape, device): tiles, grids and splits are pure
# functions of these and of _OVERRIDE (launch_override clears the table). Recomputed on every call
# they were about 20 Python calls a fwd+bwd, at small M where host time is the limit.
_PLANS: dict = {}
PLAN_ENTRIES = 4096  # varying sequence lengths add entries; bounded by clearing


def _remember(key, plan):
    if len(_PLANS) >= PLAN_ENTRIES:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _forward_plan(M: int, K: int, N: int, R: int, device) -> tuple:
    """(BR, down: (grid, BM, BK, warps, splits, K columns per split), up: (grid, BM, BN, warps))
    of adapter_forward."""
    key = (M, K, N, R, device)
    plan = _PLANS.get(key)
    if plan is None:
        BR = _padded_rank(R)
        bm, bk, warps = _tiles("down", BR)
        m_tiles = cdiv(M, bm)
        splits, per = _split(cdiv(K, bk), m_tiles, _sm_count(device))
        down = ((m_tiles, splits), bm, bk, warps, splits, per * bk)
        bm, bn, warps = _tiles("up", BR)
        plan = _remember(key, (BR, down, ((cdiv(M, bm), cdiv(N, bn)), bm, bn, warps)))
    return plan


def _backward_plan(M: int, K: int, N: int, R: int, dropout: bool, device) -> tuple:
    """(BR, dy: (grid, BM, BN, warps, row tiles, splits, N columns per split), dx: (grid, BM, BK,
    warps, splits, rows per split)) of adapter_backward."""
    key = (M, K, N, R, dropout, device, "bwd")
    plan = _PLANS.get(key)
    if plan is None:
        BR = _padded_rank(R)
        sms = _sm_count(device)
        bm, bn, warps = _tiles("dy", BR)
        m_tiles = cdiv(M, bm)
        splits, per = _split(cdiv(N, bn), m_tiles, sms)
        dy = ((m_tiles, splits), bm, bn, warps, m_tiles, splits, per * bn)
        bm, bk, warps = _tiles("dx", BR, dropout)
        k_tiles = cdiv(K, bk)
        splits, per = _split(cdiv(M, bm), k_tiles, sms)
        plan = _remember(key, (BR, dy, ((k_tiles, splits), bm, bk, warps, splits, per * bm)))
    return plan


@functools.lru_cache(maxsize=256)
def _dropout_constants(p: float) -> tuple[int, float]:
    """(keep threshold, 1 / (1 - p)) of dropout probability p."""
    return keep_threshold(p), 1.0 / (1.0 - p)


# ----------------------------------------------------------------------------- host functions


def degenerate(x, lora_B) -> bool:
    """An empty dimension: nothing for a kernel to do. The reference handles it exactly, with
    dropout off: with no rows, no columns, or no outputs (dY empty, so v = 0) no result depends
    on the mask."""
    return x.shape[0] == 0 or x.shape[1] == 0 or lora_B.shape[0] == 0


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r] (all one dtype), bias [N] | None,
    seed int64 tensor [1] | None. Returns (y [M, N] in x.dtype, u [M, r] fp32)."""
    if degenerate(x, lora_B):
        return reference.lora_forward(x, weight, lora_A, lora_B, bias, scaling, 0.0, None)
    if use_fused_forward(x.shape[0], lora_A.shape[0]):
        return fused_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)
    y, u = adapter_forward(x, lora_A, lora_B, bias, scaling, dropout_p, seed)
    return y.addmm_(x, weight.t()), u


def lora_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """Returns (dx [M, K] or an empty tensor, d lora_A [r, K], d lora_B [N, r])."""
    if degenerate(x, lora_B):
        return reference.lora_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, 0.0, None, need_dx)
    if use_fused_backward(x.shape[0], lora_A.shape[0], need_dx):
        return fused_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed)
    d, grad_A, grad_B = adapter_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    if need_dx:
        d.addmm_(grad_y, weight)
    return d, grad_A, grad_B


def delta_forward(x, lora_A, lora_B, scaling, dropout_p, seed):
    """The LoRA branch alone (lora_delta): (y = scaling * dropout(x) A^T B^T [M, N] in x.dtype, u [M, r]
    fp32) — adapter_forward without a base product on top."""
    if degenerate(x, lora_B):
        return reference.delta_forward(x, lora_A, lora_B, scaling, 0.0, None)
    return adapter_forward(x, lora_A, lora_B, None, scaling, dropout_p, seed)


def delta_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """(dx or an empty tensor, d lora_A, d lora_B) of delta_forward: adapter_backward's D is all of dx."""
    if degenerate(x, lora_B):
        return reference.delta_backward(grad_y, x, lora_A, lora_B, u, scaling, 0.0, None, need_dx)
    return adapter_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


def fused_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """lora_forward in one launch for small M (<= FUSED_LIMIT rows): same contract,
    (y [M, N] in x.dtype, u [M, r] fp32). With launch_override(fused_split=S) the reduction over
    K is split S ways (beside a memset of the tiles' arrival counters)."""
    M, K = x.shape
    N, R = lora_B.shape
    BR = _padded_rank(R)
    bm, bn, bk, stages, warps = _fused_fwd_tiles(M, N, BR, _sm_count(x.device))
    k_per, split = split_ranges(K, bk, _OVERRIDE.get("fused_split", 1))
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    u = torch.empty((M, R), dtype=torch.float32, device=x.device)
    grid = (cdiv(N, bn), cdiv(M, bm), split)
    if split > 1:
        n_tiles = grid[0] * grid[1]
        part = torch.empty(split * n_tiles * bm * bn, dtype=torch.float32, device=x.device)
        part_u = torch.empty(split * n_tiles * bm * BR, dtype=torch.float32, device=x.device)
        count = torch.zeros(n_tiles, dtype=torch.int32, device=x.device)
    else:
        part = part_u = count = u
    launch(
        _lora_fused_fwd_kernel, grid,
        x, weight, lora_A, lora_B, bias if bias is not None else y, y, u, seed if seed is not None else x,
        part, part_u, count,
        M, N, K, R, k_per, split,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        scaling, keep_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        HAS_DROPOUT=dropout_p > 0.0, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, SPLITK=split > 1,
        BM=bm, BN=bn, BK=bk, BR=BR, num_warps=warps, num_stages=stages,
    )
    return y, u


def fused_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed):
    """lora_backward (with dx) in one launch for small M (<= FUSED_LIMIT rows): same
    contract, (dx [M, K], d lora_A [r, K], d lora_B [N, r]); no workspace to zero, no atomics,
    the adapter gradients written in their dtype."""
    M, K = x.shape
    N, R = lora_B.shape
    BR = _padded_rank(R)
    bm, bn, bk, stages, warps = _fused_bwd_tiles(M, K, BR, _sm_count(x.device))
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device)
    grad_A = torch.empty((R, K), dtype=lora_A.dtype, device=x.device)
    grad_B = torch.empty((N, R), dtype=lora_B.dtype, device=x.device)
    launch(
        _lora_fused_bwd_kernel, (cdiv(K, bk),),
        grad_y, x, weight, lora_A, lora_B, u, dx, grad_A, grad_B, seed if seed is not None else x,
        M, N, K, R,
        grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), dx.stride(0), dx.stride(1),
        scaling, keep_threshold(dropout_p), scaling / (1.0 - dropout_p),
        HAS_DROPOUT=dropout_p > 0.0, IEEE=x.dtype == torch.float32,
        BM=bm, BN=bn, BK=bk, BR=BR, num_warps=warps, num_stages=stages,
    )
    return dx, grad_A, grad_B


def adapter_forward(x, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """The LoRA-specific forward work, for any base product added on top by the caller:
    returns (C = bias + scaling * u @ lora_B.T  [M, N] in x.dtype,  u [M, r] fp32)."""
    M, K = x.shape
    N, R = lora_B.shape
    BR, down, up = _forward_plan(M, K, N, R, x.device)
    ieee = x.dtype == torch.float32
    threshold, keep_scale = _dropout_constants(dropout_p)

    grid, bm, bk, warps, splits, k_per_split = down
    u, sliced = determinism.split_accumulator(splits, (M, R), x.device)
    launch(
        _lora_down_kernel, grid,
        x, lora_A, u, seed if seed is not None else x,
        M, K, R, k_per_split,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
        threshold, keep_scale,
        HAS_DROPOUT=dropout_p > 0.0, ATOMIC=splits > 1 and not sliced, IEEE=ieee, BM=bm, BK=bk, BR=BR,
        num_warps=warps,
    )
    if sliced:
        u = determinism.sum_slices(u)

    grid, bm, bn, warps = up
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    launch(
        _lora_up_kernel, grid,
        u, lora_B, bias if bias is not None else y, y,
        M, N, R,
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        scaling,
        HAS_BIAS=bias is not None, IEEE=ieee, BM=bm, BN=bn, BR=BR, num_warps=warps,
    )
    return y, u


def adapter_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, q=None):
    """The LoRA-specific backward work: returns (D = the adapter's part of dx [M, K] (or an
    empty tensor), d lora_A, d lora_B); the caller adds the base product's dx to D.
    ``q`` [M, K] (DoRA, needs need_dx): another gradient with respect to dropout(x), added under
    the mask, D = mask / (1-p) * (s * v @ A + q); D is written over q."""
    M, K = x.shape
    N, R = lora_B.shape
    dev = x.device
    BR, (dy_grid, dy_bm, dy_bn, dy_warps, dy_m_tiles, dy_splits, dy_cols), \
        (dx_grid, dx_bm, dx_bk, dx_warps, dx_splits, dx_rows) = _backward_plan(M, K, N, R, dropout_p > 0.0, dev)
    ieee = x.dtype == torch.float32
    threshold, keep_scale = _dropout_constants(dropout_p)

    deterministic = determinism.enabled()
    # An unsplit reduction (one row tile for dB, one row split for dA: small M) is written once,
    # straight into the gradient in the adapter's dtype: no workspace slice, no atomics and no cast
    # launch after (host time is what limits small M: benchmarks/NOTES.md).
    db_direct = dy_m_tiles == 1 and not deterministic
    da_direct = dx_splits == 1 and not deterministic
    if not deterministic:
        # One zeroed fp32 workspace holds the split accumulators: v [M, r], dB [N, r], dA [r, K]
        # (one memset instead of three; host time matters at small M).
        nb, na = (0 if db_direct else N * R), (0 if da_direct else R * K)
        ws = torch.zeros(M * R + nb + na, dtype=torch.float32, device=dev)
        v = ws[: M * R].view(M, R)
        grad_B = (torch.empty((N, R), dtype=lora_B.dtype, device=dev) if db_direct
                  else ws[M * R: M * R + nb].view(N, R))
        grad_A = (torch.empty((R, K), dtype=lora_A.dtype, device=dev) if da_direct
                  else ws[M * R + nb:].view(R, K))
    else:
        # One slice per split of each reduction, every element written by a kernel (no memset):
        # v [dy splits, M, r], dB [row tiles, N, r], dA [dx splits, r, K], summed below.
        sizes = (dy_splits * M * R, dy_m_tiles * N * R, dx_splits * R * K)
        ws = torch.empty(sum(sizes), dtype=torch.float32, device=dev)
        v, grad_B, grad_A = (part.view(-1, *shape) for part, shape in
                             zip(ws.split(sizes), ((M, R), (N, R), (R, K))))

    launch(
        _lora_dy_kernel, dy_grid,
        grad_y, lora_B, u, v, grad_B,
        M, N, R, dy_cols,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1),
        scaling,
        V_ATOMIC=dy_splits > 1 and not deterministic, DB_ATOMIC=not (deterministic or db_direct), IEEE=ieee,
        BM=dy_bm, BN=dy_bn, BR=BR, num_warps=dy_warps,
    )
    if deterministic:
        v, grad_B = determinism.sum_slices(v), determinism.sum_slices(grad_B)

    if q is not None:
        d = q
    else:
        d = torch.empty((M, K), dtype=x.dtype, device=dev) if need_dx else x.new_empty(0)
    launch(
        _lora_dx_kernel, dx_grid,
        x, v, lora_A, d, grad_A, seed if seed is not None else x,
        M, K, R, dx_rows,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
        d.stride(0) if need_dx else 0, d.stride(1) if need_dx else 0,
        threshold, scaling / (1.0 - dropout_p), keep_scale,
        HAS_DROPOUT=dropout_p > 0.0, WRITE_DX=need_dx, HAS_Q=q is not None,
        DA_ATOMIC=dx_splits > 1 and not deterministic, IEEE=ieee,
        BM=dx_bm, BK=dx_bk, BR=BR, num_warps=dx_warps,
    )
    if deterministic:
        grad_A = determinism.sum_slices(grad_A)
    # copy=True: the outputs must not alias the workspace (or each other) even in fp32.
    if not da_direct:
        grad_A = grad_A.to(lora_A.dtype, copy=True)
    if not db_direct:
        grad_B = grad_B.to(lora_B.dtype, copy=True)
    return d, grad_A, grad_B
