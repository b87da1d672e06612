"""Triton matmul over a bitsandbytes-format 4-bit weight (NF4/FP4), decoded tile by tile in
registers: the full-precision weight is never written to memory.

    out [M, P] = a [M, Q] @ B [Q, P] (+ c)     where, for the frozen weight W [N, K],
        transpose=False:  B = W^T   (forward   y  = x  @ W^T,  Q = K, P = N)
        transpose=True:   B = W     (backward  dx = dY @ W,    Q = N, P = K)

Each element decodes exactly as bitsandbytes' dequantize does: fp32(code[idx] * absmax[block]),
absmax = fp32(code2[q] * absmax2[block // 256]) + offset when double-quantized (compiled without
FMA contraction so the two roundings match), then cast to a's dtype for the tensor-core dot.
This first version gathers codes and scales per element; tuning it (vectorized nibble loads,
per-tile scale reuse) is measured work still to do on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import quant as reference
from ..reference.windowed import windowed_matmul
from . import dora, lora
from .launch import cdiv, launch
from .lora import _mm
from .splitk import last_to_arrive, split_ranges


@triton.jit
def _decode_4bit(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, flat, mask,
                 BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    # BLOCKSIZE is a constexpr power of two, so the divisions below are shifts: a runtime int64
    # divide per element made the first version 25-100x slower than cuBLAS.
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0)
    nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF).to(tl.int32)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = flat // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // 256, mask=mask,
                                                                        other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * scale


@triton.jit
def _dequantize_tile_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, out_ptr,
                            R, C, row0, col0, K_w, stride_o,
                            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, WIDE: tl.constexpr,
                            BR: tl.constexpr, BC: tl.constexpr):
    """out[r, c] = W[row0 + r, col0 + c] for an R x C window of the 4-bit weight W [N, K_w]."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    if WIDE:
        flat = (row0 + rows).to(tl.int64)[:, None] * K_w + (col0 + cols)[None, :]
    else:
        flat = (row0 + rows)[:, None] * K_w + (col0 + cols)[None, :]
    w = _decode_4bit(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, flat, mask,
                     BLOCKSIZE, NESTED)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _store_tile(acc, c_ptr, bias_ptr, out_ptr, rows64, cols, row_ok, col_ok, stride_cm, stride_cp, stride_om,
                stride_op, HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out[rows, cols] = acc (+ the epilogue input c) (+ bias), cast to out's dtype."""
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_C:
        acc += tl.load(c_ptr + rows64[:, None] * stride_cm + cols[None, :] * stride_cp, mask=tile_ok,
                       other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_op, acc.to(out_ptr.dtype.element_ty),
             mask=tile_ok)


@triton.jit
def _matmul_4bit_kernel(
    a_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, c_ptr, bias_ptr, out_ptr,
    M, P, Q, K_w,
    stride_am, stride_aq, stride_cm, stride_cp, stride_om, stride_op,
    BLOCKSIZE: tl.constexpr, WIDE: tl.constexpr,
    TRANSPOSE: tl.constexpr, NESTED: tl.constexpr, HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order so neighbouring programs share rows of a and tiles of W in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_p = tl.cdiv(P, BP)
    group = GROUP_M * tiles_p
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_p = (pid % group) // size_m

    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_p * BP + tl.arange(0, BP)
    row_ok = rows < M
    col_ok = cols < P
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BM, BP), dtype=tl.float32)
    for q0 in range(0, Q, BQ):
        qs = q0 + tl.arange(0, BQ)
        q_ok = qs < Q
        a = tl.load(a_ptr + rows64[:, None] * stride_am + qs[None, :] * stride_aq,
                    mask=row_ok[:, None] & q_ok[None, :], other=0.0)
        qi = qs.to(tl.int64) if WIDE else qs
        ci = cols64 if WIDE else cols
        if TRANSPOSE:
            flat = qi[:, None] * K_w + ci[None, :]  # B[q, p] = W[q, p]
        else:
            flat = ci[None, :] * K_w + qi[:, None]  # B[q, p] = W[p, q]
        b = _decode_4bit(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, flat,
                         q_ok[:, None] & col_ok[None, :], BLOCKSIZE, NESTED)
        acc = _mm(a, b.to(a.dtype), acc, IEEE)
    _store_tile(acc, c_ptr, bias_ptr, out_ptr, rows64, cols, row_ok, col_ok, stride_cm, stride_cp, stride_om,
                stride_op, HAS_C, HAS_BIAS)


# Three paths, chosen by M (benchmarks/quant_matmul_tiles.py on an H100):
# - fused_aligned (the forward at M <= ALIGNED_MAX_M, in_features % blocksize == 0) and fused
#   (other M <= FUSED_MAX_M): weight tiles decoded in registers inside a Triton kernel (no weight
#   bytes beyond the 4-bit ones ever touch global memory), whole quantization blocks at a time or
#   element by element. Far from tensor-core speed, so they only serve small M, where the product is
#   bound by reading the weight.
# - chunked: a window of at most CHUNK_ELEMENTS weights is decoded into a workspace and multiplied
#   by cuBLAS, window after window, writing column slices of the output. A weight larger than a
#   window never exists at full precision at once; the workspace is the only extra memory.
FUSED_MAX_M = 64
# 8 Mi weights (16 MiB of bf16 workspace): half a 4096x4096 weight. Each window costs a decode
# launch and a cuBLAS call of host time; in the whole-model QLoRA step (H100, LLaMA-shaped, 4 layers,
# 2x2048 tokens, host-bound) 4 Mi windows took 93.4 ms a step, 8 Mi 81.9, 16 Mi 82.5, whole weights
# (64 Mi) 74.0 (benchmarks/results/model_qlora_windows_h100.txt); device time barely moves
# (quant_matmul_tiles_h100.json: 0.50 vs 0.48 ms at M=8192 for 4 vs 16 Mi).
CHUNK_ELEMENTS = 8 * 1024 * 1024
WINDOW_ALIGN = 256  # windows are whole multiples of this many rows / columns (and of any blocksize)
WIDE_FROM = 2**31  # weights with this many elements index their bytes in int64 (the kernels' WIDE)
# Fused tiles (BM, BP, BQ, num_warps, num_stages): the fastest measured at M = 16..256
# (benchmarks/results/quant_matmul_tiles_h100.json). A pipeline (stages > 1) stages the per-element
# gathers in shared memory and is slower (or, at 128x128x64x3, over the 227 KiB an H100 has).
FUSED_TILES = (128, 64, 64, 4, 1)


@triton.jit
def _decode_block_rows(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, start, ok,
                       R: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """[R, BLOCKSIZE] decoded weights: row i holds the quantization block that starts at flat
    position start[i] (a multiple of BLOCKSIZE). One contiguous byte load per row for both
    nibbles and one scale per row, instead of per-element gathers."""
    pairs = tl.arange(0, BLOCKSIZE // 2)
    byte = tl.load(packed_ptr + (start // 2)[:, None] + pairs[None, :], mask=ok[:, None], other=0)
    hi = tl.load(code_ptr + (byte >> 4).to(tl.int32))
    lo = tl.load(code_ptr + (byte & 0xF).to(tl.int32))
    block = start // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=ok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + block // 256, mask=ok, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=ok, other=0.0)
    # Interleave (hi, lo) back into element order: the high nibble holds the even element.
    return tl.reshape(tl.join(hi * scale[:, None], lo * scale[:, None]), (R, BLOCKSIZE))


@triton.jit
def _aligned_forward_steps(acc, a_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr,
                           rows64, row_ok, ci, col_ok, q_lo, q_hi, Q, K_w, stride_am, stride_aq,
                           BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, IEEE: tl.constexpr, BN: tl.constexpr,
                           NB: tl.constexpr):
    """acc + a[rows, q_lo:q_hi] @ W[ci, q_lo:q_hi]^T, NB quantization blocks of W's rows a step
    (q_lo a multiple of NB * BLOCKSIZE; blocks past Q are masked, their a columns are zero too)."""
    blocks = tl.arange(0, NB) * BLOCKSIZE
    for q0 in range(q_lo, q_hi, BLOCKSIZE * NB):
        # BN * NB block rows: row i of W's NB blocks at q0, in order
        start = tl.reshape(ci[:, None] * K_w + (q0 + blocks)[None, :], (BN * NB,))
        ok = tl.reshape(col_ok[:, None] & ((q0 + blocks) < Q)[None, :], (BN * NB,))
        w = _decode_block_rows(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr,
                               start, ok, BN * NB, BLOCKSIZE, NESTED)
        w = tl.reshape(w, (BN, NB * BLOCKSIZE))
        qs = q0 + tl.arange(0, NB * BLOCKSIZE)
        a = tl.load(a_ptr + rows64[:, None] * stride_am + qs[None, :] * stride_aq,
                    mask=row_ok[:, None] & (qs < Q)[None, :], other=0.0)
        acc = _mm(a, tl.trans(w.to(a.dtype)), acc, IEEE)
    return acc


@triton.jit
def _matmul_4bit_aligned_kernel(
    a_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, c_ptr, bias_ptr, out_ptr,
    M, P, Q, K_w, stride_am, stride_aq, stride_cm, stride_cp, stride_om, stride_op,
    BLOCKSIZE: tl.constexpr, WIDE: tl.constexpr, TRANSPOSE: tl.constexpr, NESTED: tl.constexpr,
    HAS_C: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    NB: tl.constexpr,
):
    """The fused product for K_w % BLOCKSIZE == 0, decoding whole quantization blocks
    (_decode_block_rows). Forward (B = W^T): the reduction step is NB consecutive blocks of W's
    rows, BQ = NB * BLOCKSIZE (more bytes in flight per program: at decode sizes the grid has
    few programs), and the program's BN output columns are BN rows of W. Backward (B = W, NB = 1):
    the reduction runs over BN rows of W at a time and the program's output columns are one
    block of W's row, BP = BLOCKSIZE."""
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    if TRANSPOSE:
        cols = pid_p * BLOCKSIZE + tl.arange(0, BLOCKSIZE)  # output columns: one block of W's row
        acc = tl.zeros((BM, BLOCKSIZE), dtype=tl.float32)
        for q0 in range(0, Q, BN):
            wr = q0 + tl.arange(0, BN)  # rows of W = reduction index
            w_ok = wr < Q
            wr_i = wr.to(tl.int64) if WIDE else wr
            w = _decode_block_rows(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr,
                                   wr_i * K_w + pid_p * BLOCKSIZE, w_ok, BN, BLOCKSIZE, NESTED)  # [BN, BLOCKSIZE]
            a = tl.load(a_ptr + rows64[:, None] * stride_am + wr[None, :] * stride_aq,
                        mask=row_ok[:, None] & w_ok[None, :], other=0.0)
            acc = _mm(a, w.to(a.dtype), acc, IEEE)
    else:
        cols = pid_p * BN + tl.arange(0, BN)  # output columns = rows of W
        ci = cols.to(tl.int64) if WIDE else cols
        acc = _aligned_forward_steps(tl.zeros((BM, BN), dtype=tl.float32), a_ptr, packed_ptr, absmax_ptr,
                                     absmax2_ptr, code_ptr, code2_ptr, offset_ptr, rows64, row_ok, ci, cols < P, 0,
                                     Q, Q, K_w, stride_am, stride_aq, BLOCKSIZE, NESTED, IEEE, BN, NB)
    col_ok = cols < P
    _store_tile(acc, c_ptr, bias_ptr, out_ptr, rows64, cols, row_ok, col_ok, stride_cm, stride_cp, stride_om,
                stride_op, HAS_C, HAS_BIAS)


@triton.jit
def _matmul_4bit_splitk_kernel(
    a_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, c_ptr, bias_ptr, out_ptr,
    part_ptr, count_ptr, M, P, Q, K_w, Q_PER, SPLIT, stride_am, stride_aq, stride_cm, stride_cp, stride_om,
    stride_op, BLOCKSIZE: tl.constexpr, WIDE: tl.constexpr, NESTED: tl.constexpr, HAS_C: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr,
):
    """The aligned forward (out = a @ W^T, K_w % BLOCKSIZE == 0) with its reduction split over
    SPLIT programs per output tile, each taking Q_PER columns of a (a multiple of NB blocks). At
    decode sizes the unsplit grid has fewer programs than the GPU has SMs and each walks all of K:
    the time is the latency of its steps. Each program stores its fp32 partial tile and counts
    itself in at the tile's counter; the last to arrive adds the SPLIT partials in split order
    (deterministic: no float atomics) and writes the tile. One launch beside the counters' memset."""
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = pid_p * BN + tl.arange(0, BN)  # output columns = rows of W
    col_ok = cols < P
    ci = cols.to(tl.int64) if WIDE else cols
    q_lo = pid_k * Q_PER
    acc = _aligned_forward_steps(tl.zeros((BM, BN), dtype=tl.float32), a_ptr, packed_ptr, absmax_ptr, absmax2_ptr,
                                 code_ptr, code2_ptr, offset_ptr, rows64, row_ok, ci, col_ok, q_lo,
                                 tl.minimum(q_lo + Q_PER, Q), Q, K_w, stride_am, stride_aq, BLOCKSIZE, NESTED, IEEE,
                                 BN, NB)
    tile = pid_m * tl.num_programs(1) + pid_p
    n_tiles = tl.num_programs(0) * tl.num_programs(1)
    in_tile = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    tl.store(part_ptr + (pid_k * n_tiles + tile).to(tl.int64) * (BM * BN) + in_tile, acc)
    if last_to_arrive(count_ptr, tile, SPLIT):
        total = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, SPLIT):  # split order: the same sum whichever program arrives last
            total += tl.load(part_ptr + (k * n_tiles + tile).to(tl.int64) * (BM * BN) + in_tile,
                             cache_modifier=".cg")
        _store_tile(total, c_ptr, bias_ptr, out_ptr, rows64, cols, row_ok, col_ok, stride_cm, stride_cp,
                    stride_om, stride_op, HAS_C, HAS_BIAS)


# BM, BN, NB (forward: quantization blocks per reduction step, capped at 256 weights a step),
# num_warps. (16, 64, 4, 4) was the fastest decode candidate on an H100 (qlora_decode_h100.json,
# M = 16, graphed: 0.081 ms at 4096->4096 and 0.158 at 4096->14336, against 0.132 / 0.201 for the
# `fused` path); the forward takes this path for M <= ALIGNED_MAX_M when in_features % blocksize == 0.
ALIGNED_TILES = (16, 64, 4, 4)
ALIGNED_MAX_M = 16
# The decode-sized (M = 16) candidates timed beside the default by `bench --op qlora --forward-only`
# and compiled by compile_check. Measured: BN 16/32 (more programs) lost to BN = 64 at NB = 4; wider
# BN and more warps are next.
DECODE_CANDIDATES = [(16, 64, 4, 4), (16, 64, 4, 8), (16, 128, 2, 8), (16, 128, 4, 8), (16, 32, 4, 8)]
# path="splitk" (BM, BN, NB, num_warps, programs per SM): the aligned forward with its reduction
# split until the grid holds that many programs per SM (_matmul_4bit_splitk_kernel). Not yet run
# on a GPU: it is timed beside fused_aligned by `bench --op qlora --forward-only` and becomes the
# decode default only if it wins there.
SPLITK_TILES = (16, 64, 4, 4, 4)
SPLITK_CANDIDATES = [(16, 64, 4, 4, 4), (16, 64, 4, 4, 8), (16, 64, 2, 4, 4), (16, 32, 4, 4, 4), (16, 128, 2, 8, 2)]


@triton.jit
def _dequantize_aligned_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, out_ptr,
                               R, C, row0, col0, K_w, stride_o,
                               BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, WIDE: tl.constexpr,
                               BR: tl.constexpr, NB: tl.constexpr):
    """The fast window decoder, for K_w and col0 multiples of BLOCKSIZE: each program decodes BR
    rows x NB consecutive quantization blocks, so every row of a block has one scale (BR loads,
    not BR*BS), and each packed byte is loaded once for its two nibbles."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < R
    if WIDE:
        start = (row0 + rows).to(tl.int64) * K_w + col0
    else:
        start = (row0 + rows) * K_w + col0
    for j in tl.static_range(NB):
        c0 = (tl.program_id(1) * NB + j) * BLOCKSIZE
        ok = row_ok & ((rows * 0 + c0) < C)  # the last group's blocks may lie past the window
        w = _decode_block_rows(packed_ptr, absmax_ptr, absmax2_ptr, code_ptr, code2_ptr, offset_ptr, start + c0,
                               ok, BR, BLOCKSIZE, NESTED)
        cols = c0 + tl.arange(0, BLOCKSIZE)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < C)[None, :])


# (BR rows, NB blocks per program, num_warps) of the aligned window decoder: the fastest of the six
# swept on an H100 (quant_matmul_tiles_h100.json, 4096x4096, blocksize 64: 0.053 ms, 800 GB/s,
# against 0.076 ms for (16, 1, 4), the earlier default).
DECODE_TILES = (64, 2, 8)


def dequantize_window(packed, absmax, code, absmax2, code2, offset, blocksize, shape, row0, rows, col0, cols,
                      out, tiles=None):
    """Decode W[row0:row0+rows, col0:col0+cols] of the 4-bit weight W ``shape`` into ``out``
    ([rows, cols], unit column stride) exactly as bitsandbytes' dequantize would. ``tiles``
    overrides DECODE_TILES (tests, benchmarks)."""
    N, K = shape
    nested = absmax2 is not None
    if out.stride(1) != 1:
        raise ValueError("dequantize_window: out needs unit column stride")
    if K % blocksize == 0 and col0 % blocksize == 0 and (cols % blocksize == 0 or col0 + cols == K):
        br, nb, warps = tiles or DECODE_TILES
        launch(
            _dequantize_aligned_kernel, (cdiv(rows, br), cdiv(cols, blocksize * nb)),
            packed, absmax, absmax2 if nested else absmax, code, code2 if nested else code,
            offset if nested else code, out, rows, cols, row0, col0, K, out.stride(0),
            BLOCKSIZE=blocksize, NESTED=nested, WIDE=N * K >= WIDE_FROM, BR=br, NB=nb, num_warps=warps,
            enable_fp_fusion=False,
        )
        return out
    br, bc = 32, 128  # any shape: per-element decode
    launch(
        _dequantize_tile_kernel, (cdiv(rows, br), cdiv(cols, bc)),
        packed, absmax, absmax2 if nested else absmax, code, code2 if nested else code, offset if nested else code,
        out, rows, cols, row0, col0, K, out.stride(0),
        BLOCKSIZE=blocksize, NESTED=nested, WIDE=N * K >= WIDE_FROM, BR=br, BC=bc, num_warps=4,
        enable_fp_fusion=False,
    )
    return out


def _chunked_matmul_4bit(a, parts, blocksize, shape, out, accumulate, bias, transpose):
    N, K = shape
    if transpose:  # out [M, K] = a [M, N] @ W: windows of whole columns of W
        step = max(WINDOW_ALIGN, min(K, CHUNK_ELEMENTS // max(N, 1)) // WINDOW_ALIGN * WINDOW_ALIGN)
        ws = torch.empty((N, min(step, K)), dtype=a.dtype, device=a.device)
    else:  # out [M, N] = a [M, K] @ W^T: windows of whole rows of W
        step = max(WINDOW_ALIGN, min(N, CHUNK_ELEMENTS // max(K, 1)) // WINDOW_ALIGN * WINDOW_ALIGN)
        ws = torch.empty((min(step, N), K), dtype=a.dtype, device=a.device)

    def decode(r0, rows, c0, cols):  # into the reused workspace
        return dequantize_window(*parts, blocksize, shape, r0, rows, c0, cols, ws[:rows, :cols])

    return windowed_matmul(a, decode, shape, step, out, transpose, accumulate, bias)


def splitk_plan(M, N, K, blocksize, tiles, sms):
    """(grid, NB, Q_PER, SPLIT) of the split-K forward: NB blocks a step (at most 256 weights), and
    the fewest splits that give the grid ``programs per SM`` * sms programs, each split a whole
    number of steps."""
    bm, bn, nb, _, per_sm = tiles
    nb = max(1, min(nb, 256 // blocksize))
    q_per, split = split_ranges(K, nb * blocksize, cdiv(per_sm * sms, cdiv(M, bm) * cdiv(N, bn)))
    return (cdiv(M, bm), cdiv(N, bn), split), nb, q_per, split


def _matmul_4bit_splitk(a, parts, blocksize, shape, c, bias, out, tiles):
    """out (+)= a @ W^T by the split-K kernel; ``out`` is ``c`` itself when an epilogue input is given."""
    packed, absmax, code, absmax2, code2, offset = parts
    N, K = shape
    M = a.shape[0]
    bm, bn, _, warps, _ = tiles
    grid, nb, q_per, split = splitk_plan(M, N, K, blocksize, tiles, lora._sm_count(a.device))
    n_tiles = grid[0] * grid[1]
    part = torch.empty(split * n_tiles * bm * bn, dtype=torch.float32, device=a.device)
    count = torch.zeros(n_tiles, dtype=torch.int32, device=a.device)
    nested = absmax2 is not None
    launch(
        _matmul_4bit_splitk_kernel, grid,
        a, packed, absmax, absmax2 if nested else absmax, code, code2 if nested else code,
        offset if nested else code, out, bias if bias is not None else out, out, part, count,  # out is c when given
        M, N, K, K, q_per, split, a.stride(0), a.stride(1), out.stride(0), out.stride(1), out.stride(0), out.stride(1),
        BLOCKSIZE=blocksize, WIDE=N * K >= WIDE_FROM, NESTED=nested, HAS_C=c is not None, HAS_BIAS=bias is not None,
        IEEE=a.dtype == torch.float32, BM=bm, BN=bn, NB=nb, num_warps=warps, enable_fp_fusion=False,
    )
    return out


def matmul_4bit(a, packed, absmax, code, absmax2, code2, offset, blocksize, shape, c=None, bias=None,
                transpose=False, tiles=None, path=None):
    """a [M, K] @ W^T -> [M, N] (transpose=False) or a [M, N] @ W -> [M, K] (transpose=True), plus
    c (same shape as the result; the result is written into c when given) and bias (one value
    per result column). W [N, K] = ``shape`` is described by the bitsandbytes 4-bit parts
    (peft_kernels.quant.bnb4bit). ``path``: "fused_aligned" (whole quantization blocks decoded in
    registers; the default for the forward at M <= ALIGNED_MAX_M when K % blocksize == 0), "splitk"
    (the same with the reduction split over programs; forward, aligned K; not a default yet), "fused"
    (per-element decode; other M <= FUSED_MAX_M), "chunked" (windows decoded for cuBLAS; larger M).
    ``path`` and ``tiles`` are for tests and benchmarks."""
    N, K = shape
    M, Q = a.shape
    P = K if transpose else N
    if Q != (N if transpose else K):
        raise ValueError(f"matmul_4bit: a has {Q} columns, expected {N if transpose else K}")
    out = c if c is not None else torch.empty((M, P), dtype=a.dtype, device=a.device)
    if M == 0 or P == 0:
        return out
    if path is None:
        aligned = M <= ALIGNED_MAX_M and not transpose and K % blocksize == 0
        path = "fused_aligned" if aligned else "fused" if M <= FUSED_MAX_M else "chunked"
    if path == "fused_aligned":
        if K % blocksize:
            raise ValueError(f"matmul_4bit: path 'fused_aligned' needs in_features % blocksize == 0 ({K} % {blocksize})")
        bm, bn, nb, warps = tiles or ALIGNED_TILES
        # NB blocks a step, at most 256 weights: larger blocksizes fill a step alone (NB = 4 at
        # blocksize 256 in fp32 needs more shared memory than any GPU has, even at one stage)
        nb = 1 if transpose else max(1, min(nb, 256 // blocksize))
        # Transposed, BN = 16 reduction rows a step gave wrong products on an H100 with triton 3.6
        # at BM <= 32 (right at BM = 64 and with BN >= 32; the forward with BN = 16 is right):
        # tests/test_qlora_gpu.py::test_matmul_4bit_paths_match_cublas_on_dequantized
        bn = max(bn, 32) if transpose else bn
        nested = absmax2 is not None
        grid = (cdiv(M, bm), cdiv(P, blocksize if transpose else bn))
        launch(
            _matmul_4bit_aligned_kernel, grid,
            a, packed, absmax, absmax2 if nested else absmax, code, code2 if nested else code,
            offset if nested else code, out, bias if bias is not None else out, out,
            M, P, Q, K, a.stride(0), a.stride(1), out.stride(0), out.stride(1), out.stride(0), out.stride(1),
            BLOCKSIZE=blocksize, WIDE=N * K >= WIDE_FROM, TRANSPOSE=transpose, NESTED=nested, HAS_C=c is not None,
            HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32, BM=bm, BN=bn, NB=nb, num_warps=warps,
            enable_fp_fusion=False,
        )
        return out
    if path == "splitk":
        if transpose or K % blocksize:
            raise ValueError("matmul_4bit: path 'splitk' is the forward (transpose=False) with in_features % "
                             f"blocksize == 0, got transpose={transpose}, {K} % {blocksize}")
        return _matmul_4bit_splitk(a, (packed, absmax, code, absmax2, code2, offset), blocksize, shape, c, bias,
                                   out, tiles or SPLITK_TILES)
    if path == "chunked":
        parts = (packed, absmax, code, absmax2, code2, offset)
        return _chunked_matmul_4bit(a, parts, blocksize, shape, out, c is not None, bias, transpose)
    bm, bp, bq, warps, stages = tiles or FUSED_TILES
    nested = absmax2 is not None
    grid = (cdiv(M, bm) * cdiv(P, bp),)
    launch(
        _matmul_4bit_kernel, grid,
        a, packed, absmax, absmax2 if nested else absmax, code, code2 if nested else code,
        offset if nested else code, out, bias if bias is not None else out, out,
        M, P, Q, K,
        a.stride(0), a.stride(1), out.stride(0), out.stride(1), out.stride(0), out.stride(1),
        BLOCKSIZE=blocksize, WIDE=N * K >= WIDE_FROM,
        TRANSPOSE=transpose, NESTED=nested, HAS_C=c is not None, HAS_BIAS=bias is not None,
        IEEE=a.dtype == torch.float32,
        BM=bm, BP=bp, BQ=bq, GROUP_M=8, num_warps=warps, num_stages=stages,
        enable_fp_fusion=False,
    )
    return out


# ----------------------------------------------------------------------------- op backends
# Signatures mirror peft_kernels.reference.quant; ``qweight`` is (packed, absmax, code, absmax2,
# code2, offset) of Bnb4bitWeight.parts(); blocksize and shape travel as ints.


def quant_linear_forward(x, qweight, blocksize, shape, bias):
    packed, absmax, code, absmax2, code2, offset = qweight
    return matmul_4bit(x, packed, absmax, code, absmax2, code2, offset, blocksize, shape, bias=bias)


def quant_linear_backward(grad_y, qweight, blocksize, shape):
    packed, absmax, code, absmax2, code2, offset = qweight
    return matmul_4bit(grad_y, packed, absmax, code, absmax2, code2, offset, blocksize, shape, transpose=True)


def qlora_forward(x, qweight, blocksize, shape, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """The LoRA adapter kernels of triton.lora with the 4-bit matmul as the base product."""
    if lora.degenerate(x, lora_B):
        return reference.qlora_forward(x, qweight, blocksize, shape, lora_A, lora_B, bias, scaling, 0.0,
                                       None)
    c, u = lora.adapter_forward(x, lora_A, lora_B, bias, scaling, dropout_p, seed)
    packed, absmax, code, absmax2, code2, offset = qweight
    return matmul_4bit(x, packed, absmax, code, absmax2, code2, offset, blocksize, shape, c=c), u


def qlora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, scaling, dropout_p, seed,
                   need_dx):
    if lora.degenerate(x, lora_B):
        return reference.qlora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, scaling,
                                        0.0, None, need_dx)
    d, grad_A, grad_B = lora.adapter_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    if need_dx:
        packed, absmax, code, absmax2, code2, offset = qweight
        matmul_4bit(grad_y, packed, absmax, code, absmax2, code2, offset, blocksize, shape, c=d, transpose=True)
    return d, grad_A, grad_B


def qdora_forward(x, qweight, blocksize, shape, lora_A, lora_B, mn, bias, scaling, dropout_p, seed):
    """triton.dora's forward with the 4-bit matmul as the base product: (y, u, w)."""
    if lora.degenerate(x, lora_B):
        return reference.qdora_forward(x, qweight, blocksize, shape, lora_A, lora_B, mn, bias, scaling, 0.0, None)

    def base(inp, c, new):
        return matmul_4bit(inp, *qweight, blocksize, shape, c=c.clone() if new else c)
    return dora.forward_with(base, x, lora_A, lora_B, mn, bias, scaling, dropout_p, seed)


def qdora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed,
                   need_dx):
    """(dx or an empty tensor, d lora_A, d lora_B, d mn fp32)."""
    if lora.degenerate(x, lora_B):
        return reference.qdora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, w, mn, scaling,
                                        0.0, None, need_dx)

    def base_t(g, c):
        return matmul_4bit(g, *qweight, blocksize, shape, c=c, transpose=True)
    return dora.backward_with(base_t, grad_y, x, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx)
