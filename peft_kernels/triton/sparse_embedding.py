"""Triton kernels for sparse deltas on an embedding table (reference: reference/sparse_embedding.py).

forward:  y = F.embedding(ids, W0) (a gather), then one program per token adds the delta entries of
          its row — their range in the sorted index found through row_ptr [V + 1] — to its output
          row: each (token, column) is written by one program, so no atomics.
backward: one program per E entries; entry e sums dY[t, col_e] over the tokens t whose id is row_e,
          found through the ids sorted once (tok_ptr [V + 1], tokens equal to padding_idx left out).
          Each entry is one program lane's own sum in a fixed order: deterministic, no atomics, no
          [V, d] buffer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import cdiv, launch

ENTRIES_PER_PROGRAM = 64  # backward lanes (one entry each) and forward's entries per step


@triton.jit
def _add_row_entries_kernel(y_ptr, ids_ptr, row_ptr, index_ptr, values_ptr, dim, stride_y,
                            BLOCK: tl.constexpr, ACC_F64: tl.constexpr):
    t = tl.program_id(0)
    row = tl.load(ids_ptr + t)
    start = tl.load(row_ptr + row)
    end = tl.load(row_ptr + row + 1)
    lanes = tl.arange(0, BLOCK)
    for e0 in range(start, end, BLOCK):
        e = e0 + lanes
        ok = e < end
        col = tl.load(index_ptr + e, mask=ok, other=0).to(tl.int64) - row * dim
        ptrs = y_ptr + t.to(tl.int64) * stride_y + col
        v = tl.load(values_ptr + e, mask=ok, other=0.0)
        w0 = tl.load(ptrs, mask=ok, other=0.0)
        if ACC_F64:
            s = w0.to(tl.float64) + v.to(tl.float64)
        else:
            s = w0.to(tl.float32) + v.to(tl.float32)
        tl.store(ptrs, s.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _entry_grad_kernel(gy_ptr, order_ptr, tok_ptr, index_ptr, out_ptr, k, dim, stride_g,
                       E: tl.constexpr, ACC_F64: tl.constexpr):
    e = tl.program_id(0) * E + tl.arange(0, E)
    ok = e < k
    flat = tl.load(index_ptr + e, mask=ok, other=0).to(tl.int64)
    row = flat // dim
    col = flat - row * dim
    first = tl.load(tok_ptr + row, mask=ok, other=0)
    count = tl.where(ok, tl.load(tok_ptr + row + 1, mask=ok, other=0) - first, 0)
    if ACC_F64:
        acc = tl.zeros([E], dtype=tl.float64)
    else:
        acc = tl.zeros([E], dtype=tl.float32)
    for i in range(0, tl.max(count, axis=0)):
        has = i < count
        t = tl.load(order_ptr + first + i, mask=has, other=0).to(tl.int64)
        g = tl.load(gy_ptr + t * stride_g + col, mask=has, other=0.0)
        acc += g.to(acc.dtype)
    tl.store(out_ptr + e, acc, mask=ok)


def _row_pointers(sorted_rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """int64 [num_rows + 1]: where each row's run starts in ``sorted_rows`` (and the end)."""
    return torch.searchsorted(sorted_rows, torch.arange(num_rows + 1, device=sorted_rows.device))


def forward(ids: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    num_rows, dim = weight.shape
    y = F.embedding(ids, weight)
    if index.numel() and ids.numel():
        rows = torch.div(index.long(), dim, rounding_mode="floor")
        acc_f64 = torch.float64 in (weight.dtype, values.dtype)
        # values and index are read as flat arrays: strided views are copied (k entries)
        launch(_add_row_entries_kernel, (ids.numel(),), y, ids, _row_pointers(rows, num_rows), index.contiguous(),
               values.contiguous(),
               dim, y.stride(0), BLOCK=ENTRIES_PER_PROGRAM, ACC_F64=acc_f64, num_warps=2)
    return y


def backward(grad_y: torch.Tensor, ids: torch.Tensor, index: torch.Tensor, num_rows: int,
             padding_idx: int) -> torch.Tensor:
    k, dim = index.numel(), grad_y.shape[1]
    acc = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    out = torch.empty(k, dtype=acc, device=grad_y.device)
    if k == 0:
        return out
    keyed = ids if padding_idx < 0 else torch.where(ids == padding_idx, num_rows, ids)  # padding sorts last, unread
    sorted_ids, order = torch.sort(keyed, stable=True)
    grad_y = grad_y if grad_y.stride(1) == 1 else grad_y.contiguous()
    launch(_entry_grad_kernel, (cdiv(k, ENTRIES_PER_PROGRAM),), grad_y, order, _row_pointers(sorted_ids, num_rows),
           index, out, k, dim, grad_y.stride(0), E=ENTRIES_PER_PROGRAM, ACC_F64=acc == torch.float64, num_warps=2)
    return out
