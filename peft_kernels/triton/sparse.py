"""Triton kernels for sparse deltas (layout: peft_kernels.sparse.layout).

sddmm (dW at the delta's positions only; never an [out, in] buffer), by mask kind and density:
- block masks: one program per masked block and token slice, dY[:, rows]^T @ X[:, cols] on
  tensor cores; unmasked blocks cost nothing.
- unstructured, dense enough that every weight tile holds entries (>= GATHER_MAX_DENSITY):
  "panel": dW for a panel of weight rows at a time on cuBLAS into a bounded fp32 workspace, and
  only the panel's entries read out (a first in-kernel tile version ran at 1/8 of cuBLAS).
- unstructured, very sparse: "gather_t": dY and X transposed once (a tiled Triton transpose), then
  each program takes E entries and accumulates sum_m dY^T[row_e, m] * X^T[col_e, m] from
  contiguous vectors on CUDA cores (on the row-major operands every element cost a 32-byte sector:
  3.5-30x slower, measured).
sparse_adamw: one pass over the k entries: AdamW with per-entry step counts, the fp32 moments,
the delta values, and the merged weight W[pos] = base + delta.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import determinism
from ..reference import sparse as reference
from ..tensor_cache import TensorCache
from .launch import cdiv, launch, next_power_of_2
from .lora import _cuda_sm_count, _mm

FORCE_METHOD = None  # "panel" | "gather_t": overrides the density rule (benchmarks)
PANEL_ELEMENTS = 4 * 1024 * 1024  # fp32 workspace of the panel method (16 MiB)
GATHER_T_CONFIG = dict(BT=256, E=32, num_warps=8)  # best of the H100 sweep
MAX_BLOCK_SIDE = 128  # larger blocks go to batched cuBLAS (see sddmm)
GATHER_MAX_DENSITY = 0.005  # below: gather_t, above: panel (benchmarks/results/sparse_sddmm_sweep_h100.json)


@triton.jit
def _sddmm_block_kernel(gy_ptr, x_ptr, block_r_ptr, block_c_ptr, out_ptr, M, m_per_split, stride_gm,
                        stride_xm, BH, BW, IEEE: tl.constexpr, SPLIT: tl.constexpr, TR: tl.constexpr,
                        TC: tl.constexpr, BT: tl.constexpr):
    """Block b of the delta: dY[:, rows_b]^T @ X[:, cols_b] on tensor cores, written whole
    ([BH, BW] row-major). Blocks not in the mask are never visited. With SPLIT, program (b, s)
    takes tokens [s * m_per_split, (s + 1) * m_per_split) and adds into a zeroed output: a few
    hundred small blocks alone would leave most SMs idle through M sequential steps; in
    deterministic mode (SPLIT off) program (b, s) writes slice s of a [splits, k, BH, BW] output
    instead, which the host sums."""
    b = tl.program_id(0)
    m_lo = tl.program_id(1) * m_per_split
    m_hi = tl.minimum(M, m_lo + m_per_split)
    r0 = tl.load(block_r_ptr + b)
    c0 = tl.load(block_c_ptr + b)
    rr = tl.arange(0, TR)
    cc = tl.arange(0, TC)
    r_ok = rr < BH
    c_ok = cc < BW
    acc = tl.zeros((TR, TC), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BT):
        ms = m0 + tl.arange(0, BT)
        m_ok = ms < m_hi
        g = tl.load(gy_ptr + ms.to(tl.int64)[:, None] * stride_gm + (r0 + rr)[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        x = tl.load(x_ptr + ms.to(tl.int64)[:, None] * stride_xm + (c0 + cc)[None, :],
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mm(tl.trans(g), x, acc, IEEE)
    ptrs = out_ptr + b.to(tl.int64) * BH * BW + rr[:, None] * BW + cc[None, :]
    if SPLIT:
        tl.atomic_add(ptrs, acc, mask=r_ok[:, None] & c_ok[None, :], sem="relaxed")
    else:
        ptrs += tl.program_id(1).to(tl.int64) * tl.num_programs(0) * BH * BW
        tl.store(ptrs, acc, mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _sddmm_gather_t_kernel(gt_ptr, xt_ptr, index_ptr, out_ptr, M, k, in_f,
                           BT: tl.constexpr, E: tl.constexpr):
    """Each program takes E entries and accumulates sum_m dY^T[row_e, m] * X^T[col_e, m] on CUDA
    cores. The operands are transposed first so each entry's two vectors are contiguous: on the
    row-major ones every element costs a 32-byte sector (measured 3.5-30x slower, see NOTES)."""
    es = tl.program_id(0) * E + tl.arange(0, E)
    e_ok = es < k
    flat = tl.load(index_ptr + es, mask=e_ok, other=0).to(tl.int64)
    rows = flat // in_f
    cols = flat % in_f
    acc = tl.zeros((E,), dtype=tl.float32)
    for m0 in range(0, M, BT):
        ms = m0 + tl.arange(0, BT)
        ok = e_ok[:, None] & (ms < M)[None, :]
        g = tl.load(gt_ptr + rows[:, None] * M + ms[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.load(xt_ptr + cols[:, None] * M + ms[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(g * x, axis=1)
    tl.store(out_ptr + es, acc, mask=e_ok)


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, R, C, stride_s, BR: tl.constexpr, BC: tl.constexpr):
    """dst [C, R] = src [R, C]^T, tile by tile: both the load and the store are coalesced
    (PyTorch's .t().contiguous() runs at about a fifth of the bandwidth for 16-bit types)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    tile = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_s + cols[None, :], mask=mask)
    tl.store(dst_ptr + cols.to(tl.int64)[None, :] * R + rows[:, None], tile, mask=mask)


def transpose(t: torch.Tensor) -> torch.Tensor:
    """A contiguous t^T of a 2-D tensor with unit column stride."""
    R, C = t.shape
    out = torch.empty((C, R), dtype=t.dtype, device=t.device)
    if t.numel():
        launch(_transpose_kernel, (cdiv(R, 64), cdiv(C, 64)), t, out, R, C, t.stride(0),
               BR=64, BC=64, num_warps=4)
    return out


_PANELS = TensorCache(256)


def _panel_bounds(index: torch.Tensor, shape, rows_per_panel: int) -> list[int]:
    """Entry offsets where each panel of rows_per_panel weight rows starts (one host read per
    index tensor and version, cached: see peft_kernels.tensor_cache for why not per address)."""
    extra = (tuple(shape), rows_per_panel)
    bounds = _PANELS.get(index, extra)
    if bounds is None:
        starts = torch.arange(0, shape[0] + rows_per_panel, rows_per_panel, device=index.device,
                              dtype=torch.int64).clamp_max(shape[0]) * shape[1]
        bounds = _PANELS.put(index, torch.searchsorted(index.long(), starts).tolist(), extra)
    return bounds


def _mm_fp32(a, b):
    # fp32 output from 16-bit operands on the tensor cores (aten::mm.dtype is CUDA-only).
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _panel_sddmm(grad_y, x, index, shape, out):
    """dW one panel of weight rows at a time on cuBLAS (fp32 out), then only the panel's entries
    are read out of it: full GEMM speed, a bounded workspace, and panels without entries skipped."""
    N, K = shape
    rows = max(1, PANEL_ELEMENTS // max(K, 1))
    bounds = _panel_bounds(index, shape, rows)
    flat = index.long()
    for p, r0 in enumerate(range(0, N, rows)):
        e0, e1 = bounds[p], bounds[p + 1]
        if e0 == e1:
            continue
        r1 = min(N, r0 + rows)
        panel = _mm_fp32(grad_y[:, r0:r1].t(), x)
        out[e0:e1] = panel.view(-1)[flat[e0:e1] - r0 * K]
    return out


def _num_sms(device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2  # the interpreter: still exercise the split path on tiny problems


def _tile_side(n: int) -> int:
    return max(16, next_power_of_2(n))


def sddmm(grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, shape, block, method=None) -> torch.Tensor:
    """Same contract as peft_kernels.reference.sparse.sddmm (fp32 result). ``method``:
    "panel" | "gather_t" | None (by density) — for tests and benchmarks."""
    M = x.shape[0]
    k = index.numel()
    if M == 0:  # no tokens: a zero gradient (the launch splits below divide by M)
        return torch.zeros((k, *block) if block is not None else (k,), dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    if grad_y.stride(1) != 1:
        grad_y = grad_y.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    if block is not None and max(block) > MAX_BLOCK_SIDE:
        # One block's accumulator would not fit in registers; batched cuBLAS is efficient here.
        from ..reference.sparse import sddmm as batched
        return batched(grad_y, x, index, shape, block).float()
    if block is not None:
        bh, bw = block
        if k == 0:
            return torch.empty(0, bh, bw, dtype=torch.float32, device=x.device)
        n_bc = shape[1] // bw
        b = index.long()
        tile_r = (b // n_bc * bh).to(torch.int32)
        tile_c = (b % n_bc * bw).to(torch.int32)
        bt = 64
        # Enough programs to fill the GPU (about 4 per SM), never a token slice under 4 steps.
        split = max(1, min(cdiv(4 * _num_sms(x.device), k), cdiv(M, 4 * bt)))
        m_per = cdiv(cdiv(M, split), bt) * bt
        split = cdiv(M, m_per)
        out, sliced = determinism.split_accumulator(split, (k, bh, bw), x.device)  # one slice per token split
        launch(_sddmm_block_kernel, (k, split), grad_y, x, tile_r, tile_c, out, M, m_per, grad_y.stride(0),
               x.stride(0), bh, bw, IEEE=ieee, SPLIT=split > 1 and not sliced, TR=_tile_side(bh),
               TC=_tile_side(bw), BT=bt, num_warps=4)
        return determinism.sum_slices(out) if sliced else out
    out = torch.empty(k, dtype=torch.float32, device=x.device)
    if k == 0:
        return out
    if method is None:
        method = FORCE_METHOD or ("gather_t" if k / (shape[0] * shape[1]) < GATHER_MAX_DENSITY else "panel")
    if method == "panel":
        return _panel_sddmm(grad_y, x, index, shape, out)
    if method == "gather_t":
        cfg = GATHER_T_CONFIG
        gt, xt = transpose(grad_y), transpose(x)
        launch(_sddmm_gather_t_kernel, (cdiv(k, cfg["E"]),), gt, xt, index, out, M, k, shape[1],
               BT=cfg["BT"], E=cfg["E"], num_warps=cfg["num_warps"])
        return out
    raise ValueError(f"sddmm: method must be 'panel' or 'gather_t', got {method!r}")


@triton.jit
def _delta_positions(index_ptr, es, ok, in_f, n_bc, BH: tl.constexpr, BW: tl.constexpr):
    """int64 flat positions in W [out, in_f] of value entries ``es`` (layout.element_positions in the
    kernel: unstructured, index holds them; blocks of BH x BW, entry es is element es % (BH * BW),
    row-major, of block index[es // (BH * BW)] of an (out / BH) x n_bc grid)."""
    if BH * BW == 1:
        pos = tl.load(index_ptr + es, mask=ok, other=0).to(tl.int64)
    else:
        b = tl.load(index_ptr + es // (BH * BW), mask=ok, other=0).to(tl.int64)
        within = es % (BH * BW)
        pos = ((b // n_bc) * BH + within // BW) * in_f + (b % n_bc) * BW + within % BW
    return pos


@triton.jit
def _merge_kernel(w_ptr, index_ptr, values_ptr, base_ptr, saved_ptr, n, in_f, n_bc,
                  HAS_BASE: tl.constexpr, SAVE: tl.constexpr, RESTORE: tl.constexpr,
                  BH: tl.constexpr, BW: tl.constexpr, BLOCK: tl.constexpr):
    # merge: W[pos] = round(fp32(W0) + fp32(delta)), W0 = base or W[pos] (saved first when SAVE);
    # RESTORE: W[pos] = saved. Positions are distinct (layout.check_index), so no write races.
    es = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = es < n
    pos = _delta_positions(index_ptr, es, ok, in_f, n_bc, BH, BW)
    if RESTORE:
        tl.store(w_ptr + pos, tl.load(saved_ptr + es, mask=ok), mask=ok)
    else:
        w = tl.load(w_ptr + pos, mask=ok, other=0.0)
        if SAVE:
            tl.store(saved_ptr + es, w, mask=ok)
        if HAS_BASE:
            w0 = tl.load(base_ptr + es, mask=ok, other=0.0).to(tl.float32)
        else:
            w0 = w.to(tl.float32)
        delta = tl.load(values_ptr + es, mask=ok, other=0.0).to(tl.float32)
        tl.store(w_ptr + pos, (w0 + delta).to(w_ptr.dtype.element_ty), mask=ok)


MERGE_BLOCK = 1024
_MERGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _merge_launch(weight, values, index, shape, block, base, saved, save, restore):
    n = saved.numel() if restore else values.numel()
    if n == 0:
        return
    bh, bw = block if block is not None else (1, 1)
    launch(_merge_kernel, (cdiv(n, MERGE_BLOCK),), weight, index.contiguous(), values,
           base if base is not None else values, saved if saved is not None else values, n, shape[1],
           max(1, shape[1] // bw),
           HAS_BASE=base is not None, SAVE=save, RESTORE=restore, BH=bh, BW=bw, BLOCK=MERGE_BLOCK, num_warps=4)


def merge_at(weight, values, index, shape, block, base=None, save=False):
    """One launch; same contract and bits as peft_kernels.reference.sparse.merge_at, which takes what
    the kernel's fp32 sum would not reproduce (fp64; a W0 in another dtype than the weight), strided
    weights, and bf16 weights on the interpreter."""
    if weight.dtype not in _MERGE_DTYPES or torch.promote_types(values.dtype, weight.dtype) not in _MERGE_DTYPES \
            or (base is not None and base.dtype != weight.dtype) or not weight.is_contiguous() \
            or (weight.dtype == torch.bfloat16 and weight.device.type != "cuda"):
        # (the Triton interpreter casts fp32 to bf16 by truncation, not round-to-nearest-even)
        return reference.merge_at(weight, values, index, shape, block, base, save)
    saved = torch.empty(values.numel(), dtype=weight.dtype, device=weight.device) if save else None
    # values, W0 and the index are read as flat arrays (a strided view is copied: k entries)
    _merge_launch(weight, values.detach().reshape(-1).contiguous(), index, shape, block,
                  None if base is None else base.reshape(-1).contiguous(), saved, save, False)
    return saved


def restore_at(weight, saved, index, shape, block):
    """One launch; same contract as peft_kernels.reference.sparse.restore_at."""
    if weight.dtype not in _MERGE_DTYPES or not weight.is_contiguous():
        return reference.restore_at(weight, saved, index, shape, block)
    _merge_launch(weight, saved, index, shape, block, None, saved, False, True)


@triton.jit
def _sparse_adamw_kernel(values_ptr, grad_ptr, m_ptr, v_ptr, steps_ptr, index_ptr, base_ptr, merged_ptr,
                         n, lr, beta1, beta2, eps, weight_decay, log2_b1, log2_b2, in_f, n_bc,
                         HAS_MERGED: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, BLOCK: tl.constexpr):
    es = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = es < n
    p = tl.load(values_ptr + es, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + es, mask=ok, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + es, mask=ok, other=0.0)
    v = tl.load(v_ptr + es, mask=ok, other=0.0)
    step = tl.load(steps_ptr + es, mask=ok, other=0) + 1
    p = p * (1.0 - lr * weight_decay)
    m = m + (g - m) * (1.0 - beta1)  # lerp, as torch's AdamW
    v = v * beta2 + (1.0 - beta2) * g * g
    s = step.to(tl.float32)
    bc1 = 1.0 - tl.exp2(s * log2_b1)
    bc2 = 1.0 - tl.exp2(s * log2_b2)
    denom = tl.sqrt(v) / tl.sqrt(bc2) + eps
    p = p - (lr / bc1) * m / denom
    tl.store(values_ptr + es, p.to(values_ptr.dtype.element_ty), mask=ok)
    tl.store(m_ptr + es, m, mask=ok)
    tl.store(v_ptr + es, v, mask=ok)
    tl.store(steps_ptr + es, step, mask=ok)
    if HAS_MERGED:
        pos = _delta_positions(index_ptr, es, ok, in_f, n_bc, BH, BW)
        base = tl.load(base_ptr + es, mask=ok, other=0.0).to(tl.float32)
        tl.store(merged_ptr + pos, (base + p).to(merged_ptr.dtype.element_ty), mask=ok)


def sparse_adamw_(values, grad, exp_avg, exp_avg_sq, steps, *, lr, beta1, beta2, eps, weight_decay,
                  merged=None, index=None, shape=None, block=None, base=None):
    """One fused pass; same contract as peft_kernels.reference.sparse.sparse_adamw_ (the merged
    weight's positions are computed in the kernel from the compact index)."""
    import math

    n = values.numel()
    if n == 0:
        return
    bh, bw = block if block is not None else (1, 1)
    in_f = shape[1] if shape is not None else 1
    BLOCK = 1024
    launch(
        _sparse_adamw_kernel, (cdiv(n, BLOCK),),
        values, grad, exp_avg, exp_avg_sq, steps, index if merged is not None else steps,
        base if merged is not None else values, merged if merged is not None else values,
        n, lr, beta1, beta2, eps, weight_decay, math.log2(beta1) if beta1 > 0 else -1e30,
        math.log2(beta2) if beta2 > 0 else -1e30, in_f, max(1, in_f // bw),
        HAS_MERGED=merged is not None, BH=bh, BW=bw, BLOCK=BLOCK, num_warps=4,
    )
