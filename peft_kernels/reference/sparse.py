"""Pure-PyTorch sparse-delta kernels: the CPU backend and the test oracle.

sddmm: the weight gradient dW = dY^T @ X evaluated only at the delta's positions,
    unstructured: values[e] = sum_m dY[m, row_e] * X[m, col_e]                 -> [k]
    block (bh, bw): values[b] = dY[:, rows_b]^T @ X[:, cols_b]                 -> [nb, bh, bw]
in chunks, so no [out, in] buffer is ever built. Unstructured, two ways (as the Triton backend):
    gather_t (density < PANEL_MIN_DENSITY): dY and X transposed once, so each entry is the dot of
        two contiguous rows of length M (gathering columns of the row-major tensors, as this
        function first did, was 2-4x slower on CPU);
    panel: dY^T X for a panel of output rows at a time ([rows, in] <= PANEL_ELEMENTS, one GEMM),
        the panel's entries read out — a full GEMM's work, which a BLAS does faster than the
        gathers once about 0.5 % of the weight is trained (2-3x at 1 %, M >= 2048).
CPU timings behind the rule (this 2-core machine, fp32, ms): 512 x 1024 -> 1024 at 1 %: columns 18.5,
gather_t 5.7, panel 7.4; at 0.1 %: 2.1 / 1.4 / 6.5; 2048 tokens at 1 %: 129 / 41 / 27; 512 x 4096 ->
4096 at 1 %: 623 / 153 / 118, at 0.1 %: 61 / 33 / 118.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 24  # the largest gathered temporary, in elements
PANEL_ELEMENTS = 1 << 22  # the largest [rows, in] panel of dW, in elements (16 MiB in fp32)
PANEL_MIN_DENSITY = 0.005


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def w0_plus_delta(base: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0 + delta at the k positions, added in the wider of the two dtypes (an fp64 weight keeps W0
    in fp64 beside fp32 values) and rounded once to the weight's ``dtype``."""
    acc = torch.promote_types(values.dtype, dtype)
    return (base.to(acc) + values.reshape(-1).to(acc)).to(dtype)


def merge_at(weight: torch.Tensor, values: torch.Tensor, index: torch.Tensor, shape, block, base=None,
             save: bool = False):
    """weight[pos] = W0[pos] + values in place, at the delta's positions (layout.element_positions of
    the compact index); W0 is ``base`` [n] or, without it, what weight holds there. Returns what
    weight held at the positions ([n], weight's dtype) when ``save``, else None."""
    from ..sparse.layout import element_positions

    flat = weight.view(-1)
    pos = element_positions(index, shape, block)
    old = flat[pos] if save or base is None else None
    flat[pos] = w0_plus_delta(old if base is None else base, values, flat.dtype)
    return old if save else None


def restore_at(weight: torch.Tensor, saved: torch.Tensor, index: torch.Tensor, shape, block) -> None:
    """weight[pos] = saved: merge_at(save=True) undone, bit for bit."""
    from ..sparse.layout import element_positions

    weight.view(-1)[element_positions(index, shape, block)] = saved


def sddmm(grad_y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, shape, block) -> torch.Tensor:
    """grad_y [M, out], x [M, in], index (see sparse.layout) -> fp32 (fp64 for fp64 inputs)."""
    acc = _acc_dtype(x.dtype)
    M = x.shape[0]
    in_f = shape[1]
    k = index.numel()
    if M == 0:  # no tokens: a zero gradient
        return torch.zeros((k, *block) if block is not None else (k,), dtype=acc, device=x.device)
    if block is None:
        method = "panel" if k >= PANEL_MIN_DENSITY * shape[0] * in_f else "gather_t"
        return (_panel if method == "panel" else _gather_t)(grad_y, x, index.long(), in_f, acc)
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


def _gather_t(grad_y, x, index, in_f: int, acc) -> torch.Tensor:
    """values[e] = <dY^T[row_e], X^T[col_e]>: contiguous rows of the transposed tensors."""
    gy_t, x_t = grad_y.t().to(acc).contiguous(), x.t().to(acc).contiguous()
    out = torch.empty(index.numel(), dtype=acc, device=x.device)
    step = max(1, CHUNK_ELEMENTS // max(x.shape[0], 1))
    for e0 in range(0, index.numel(), step):
        e = index[e0:e0 + step]
        out[e0:e0 + step] = (gy_t[e // in_f] * x_t[e % in_f]).sum(1)
    return out


def _panel(grad_y, x, index, in_f: int, acc) -> torch.Tensor:
    """dW for PANEL_ELEMENTS // in rows at a time (one GEMM), the sorted entries falling in each
    panel read out; panels holding no entry are skipped."""
    out_f = grad_y.shape[1]
    rows = max(1, PANEL_ELEMENTS // max(in_f, 1))
    gy_t, xa = grad_y.t().to(acc), x.to(acc)
    starts = torch.arange(0, out_f + rows, rows, device=index.device) * in_f  # panel p: [starts[p], starts[p+1])
    bounds = torch.searchsorted(index, starts).tolist()
    out = torch.empty(index.numel(), dtype=acc, device=x.device)
    for p, r0 in enumerate(range(0, out_f, rows)):
        a, b = bounds[p], bounds[p + 1]
        if a < b:
            out[a:b] = (gy_t[r0:r0 + rows] @ xa).view(-1)[index[a:b] - r0 * in_f]
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
        acc = torch.promote_types(acc, merged.dtype)  # fp64 weights keep W0 in fp64
        merged.view(-1)[element_positions(index, shape, block)] = (base.reshape(-1).to(acc) + v32.to(acc)).to(
            merged.dtype)
