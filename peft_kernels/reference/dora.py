"""DoRA forward and backward in plain PyTorch (any device, any float dtype): the CPU backend of
peft_kernels::dora_fwd / dora_bwd and the oracle of the Triton one.

Shapes: x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], mn [N] (= magnitude / ‖W + s·BA‖_row,
in the accumulation dtype), bias [N] or None. With x_d = dropout(x), u = x_d Aᵀ, L = s·u Bᵀ:

    p = 0:   w = x Wᵀ + L                      y = mn ⊙ w + bias
    p > 0:   w = x_d Wᵀ + L                    y = x Wᵀ + bias + L + (mn − 1) ⊙ w

(HF PEFT's formulas: mn ⊙ (x Wᵀ + L) + bias, and x Wᵀ + bias + (mn − 1) ⊙ x_d Wᵀ + mn ⊙ L, which is
the same since (mn − 1) ⊙ x_d Wᵀ + mn ⊙ L = (mn − 1) ⊙ w + L.) Saved for backward: x, u [M, r] and
w [M, N] — the one output-sized tensor the magnitude's gradient needs, Σ_m dY ⊙ w; neither the
dropout mask nor x_d is stored (regenerated from the seed). Backward, g = dY, gl = mn ⊙ g:

    d mn = Σ_m g ⊙ w          v = gl B       dB = s·glᵀ u        dA = s·vᵀ x_d
    p = 0:   dX = gl W + s·v A
    p > 0:   dX = g W + dropout'((mn − 1) ⊙ g W + s·v A)      (dropout' = the same mask, 1 / (1 − p))
"""
import torch

from .lora import accumulation_dtype, adapter_backward, dense_base, dropped

CHUNK_ELEMENTS = 1 << 22  # the largest [rows, N] fp32 temporary of the d mn reduction


def dora_forward(x, weight, lora_A, lora_B, mn, bias, scaling, dropout_p, seed):
    """Returns (y [M, N] in x.dtype, u [M, r] and w [M, N] for backward; u in the accumulation dtype)."""
    return dora_forward_with(dense_base(weight)[0], x, lora_A, lora_B, mn, bias, scaling, dropout_p, seed)


def dora_forward_with(base, x, lora_A, lora_B, mn, bias, scaling, dropout_p, seed):
    """The forward over any frozen base (``base(a, bias)`` = a @ W.T + bias, see reference.lora)."""
    acc = accumulation_dtype(x.dtype)
    xd = dropped(x, dropout_p, seed)
    u = xd @ lora_A.T
    lora = scaling * (u @ lora_B.T)
    mn = mn.to(acc)
    if dropout_p == 0.0:
        w = base(x, None) + lora
        y = mn * w.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
    else:
        w = base(xd, None) + lora
        y = base(x, bias).to(acc) + lora.to(acc) + (mn - 1) * w.to(acc)
    return y.to(x.dtype), u.to(acc), w


def magnitude_grad(grad_y, w, acc):
    """Σ_m grad_y ⊙ w per column, [N] in ``acc``, by row chunks (no [M, N] fp32 temporary)."""
    M, N = grad_y.shape
    out = torch.zeros(N, dtype=acc, device=grad_y.device)
    step = max(1, CHUNK_ELEMENTS // max(N, 1))
    for m0 in range(0, M, step):
        out += (grad_y[m0:m0 + step].to(acc) * w[m0:m0 + step].to(acc)).sum(0)
    return out


def dora_backward(grad_y, x, weight, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx):
    """Returns (dx or an empty tensor, d lora_A, d lora_B, d mn [N] in the accumulation dtype)."""
    base_t = dense_base(weight)[1] if need_dx else None
    return dora_backward_with(base_t, grad_y, x, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx)


def dora_backward_with(base_t, grad_y, x, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx):
    """The backward over any frozen base (``base_t(g, c)`` = c + g @ W, see reference.lora)."""
    acc = accumulation_dtype(x.dtype)
    mn = mn.to(acc)
    grad_mn = magnitude_grad(grad_y, w, acc)
    gl = (grad_y.to(acc) * mn).to(grad_y.dtype)
    q = None  # with dropout, dX's second base product (mn - 1) ⊙ g W goes under the mask
    if need_dx and dropout_p:
        q = base_t((grad_y.to(acc) * (mn - 1)).to(grad_y.dtype), None)
    d, grad_A, grad_B = adapter_backward(gl, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, q)
    if not need_dx:
        return d, grad_A, grad_B, grad_mn
    return base_t(grad_y if dropout_p else gl, d), grad_A, grad_B, grad_mn
