"""Pure-PyTorch sparse-delta embedding: the CPU backend and the test oracle.

A token t with id i reads row i of W0 + delta; delta is non-zero at k sorted flat positions
row * d + col. Every (token, entry of its row) pair is listed — M · k / V pairs on average, never
a [V, d] buffer:
    forward   y[t, col_e] = W0[i, col_e] + delta_e (added in fp32 / fp64, rounded once)
    backward  d delta_e   = sum over tokens t with id row_e (not padding_idx) of dY[t, col_e]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_entry_pairs(ids: torch.Tensor, index: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token positions, entry numbers): one pair per delta entry in each token's row."""
    rows = torch.div(index.long(), dim, rounding_mode="floor")
    start = torch.searchsorted(rows, ids)
    counts = torch.searchsorted(rows, ids, right=True) - start
    tokens = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), counts)
    first = torch.repeat_interleave(start - (counts.cumsum(0) - counts), counts)  # entry - pair number
    return tokens, first + torch.arange(tokens.numel(), device=ids.device)


def forward(ids: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    dim = weight.shape[1]
    y = F.embedding(ids, weight)
    tokens, entries = token_entry_pairs(ids, index, dim)
    cols = index.long()[entries] % dim
    acc = torch.promote_types(_acc_dtype(weight.dtype), values.dtype)
    y[tokens, cols] = (y[tokens, cols].to(acc) + values.reshape(-1)[entries].to(acc)).to(y.dtype)
    return y


def backward(grad_y: torch.Tensor, ids: torch.Tensor, index: torch.Tensor, num_rows: int,
             padding_idx: int) -> torch.Tensor:
    dim = grad_y.shape[1]
    keep = ids != padding_idx if padding_idx >= 0 else None
    rows_of = torch.arange(ids.numel(), device=ids.device)
    if keep is not None:
        ids, rows_of = ids[keep], rows_of[keep]
    tokens, entries = token_entry_pairs(ids, index, dim)
    cols = index.long()[entries] % dim
    acc = _acc_dtype(grad_y.dtype)
    out = torch.zeros(index.numel(), dtype=acc, device=grad_y.device)
    # index_put_ with accumulate: deterministic under torch.use_deterministic_algorithms
    return out.index_put_((entries,), grad_y[rows_of[tokens], cols].to(acc), accumulate=True)
