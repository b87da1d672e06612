"""Pure-PyTorch sparse-delta kernels: the CPU backend and the test oracle.

sddmm: the weight gradient dW = dY^T @ X evaluated only at the delta's positions,
    unstructured: values[e] = sum_m dY[m, row_e] * X[m, col_e]                 -> [k]
    block (bh, bw): values[b] = dY[:, rows_b]^T @ X[:, cols_b]                 -> [nb, bh, bw]
in chunks, so no [out, in] buffer is ever built (the largest temporary is [M, chunk]).
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24  # the largest [M, chunk] temporary, in elements


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def sddmm(grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, shape, block) -> torch.Tensor:
    """grad_y [M, out], x [M, in], index (see sparse.layout) -> fp32 (fp64 for fp64 inputs)."""
    acc = _acc_dtype(x.dtype)
    M = x.shape[0]
    in_f = shape[1]
    k = index.numel()
    if M == 0:  # no tokens: a zero gradient
        return torch.zeros((k, *block) if block is not None else (k,), dtype=acc, device=x.device)
    if block is None:
        out = torch.empty(k, dtype=acc, device=x.device)
        rows, cols = (index.long() // in_f), (index.long() % in_f)
        step = max(1, CHUNK_ELEMENTS // max(M, 1))
        for e0 in range(0, k, step):
            r, c = rows[e0:e0 + step], cols[e0:e0 + step]
            out[e0:e0 + step] = (grad_y[:, r].to(acc) * x[:, c].to(acc)).sum(0)
        return out
    bh, bw = block
    n_bc = in_f // bw
    out = torch.empty(k, bh, bw, dtype=acc, device=x.device)
    gy = grad_y.reshape(M, -1, bh)
    xv = x.reshape(M, n_bc, bw)
    b = index.long()
    step = max(1, CHUNK_ELEMENTS // max(M * max(bh, bw), 1))
    for e0 in range(0, k, step):
        br, bc = b[e0:e0 + step] // n_bc, b[e0:e0 + step] % n_bc
        # [nb, bh, M] @ [nb, M, bw]
        out[e0:e0 + step] = torch.bmm(gy[:, br, :].to(acc).permute(1, 2, 0), xv[:, bc, :].to(acc).permute(1, 0, 2))
    return out


def sparse_adamw_(values, grad, exp_avg, exp_avg_sq, steps, *, lr, beta1, beta2, eps, weight_decay,
                  merged=None, index=None, shape=None, block=None, base=None):
    """In place, per entry e with its own step count: torch.optim.AdamW's update (decoupled
    weight decay, bias correction with that entry's step). Then merged[pos_e] = base_e + values_e
    when a merged weight is given (positions from the compact index). Math in fp32 (fp64 for
    fp64 values), as torch's AdamW."""
    from ..sparse.layout import element_positions

    acc = _acc_dtype(values.dtype)
    v32, g = values.reshape(-1).to(acc), grad.reshape(-1).to(acc)
    m, s = exp_avg.reshape(-1), exp_avg_sq.reshape(-1)
    st = steps.reshape(-1)
    st += 1
    step = st.to(acc)
    v32 = v32 * (1 - lr * weight_decay)
    m.lerp_(g.to(m.dtype), 1 - beta1)
    s.mul_(beta2).addcmul_(g.to(s.dtype), g.to(s.dtype), value=1 - beta2)
    bc1 = 1 - torch.pow(torch.tensor(beta1, dtype=torch.float64), step.double()).to(acc)
    bc2 = 1 - torch.pow(torch.tensor(beta2, dtype=torch.float64), step.double()).to(acc)
    denom = (s.to(acc).sqrt() / bc2.sqrt()) + eps
    v32 = v32 - (lr / bc1) * m.to(acc) / denom
    values.copy_(v32.view_as(values))
    if merged is not None:
        merged.view(-1)[element_positions(index, shape, block)] = (base.reshape(-1).to(acc) + v32).to(merged.dtype)
