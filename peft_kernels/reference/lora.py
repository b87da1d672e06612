"""LoRA forward and backward in plain PyTorch (any device, any float dtype).

Shapes: x [M, K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] or None.
    u = dropout(x) @ lora_A.T                  [M, r]   (saved for backward; accumulation dtype)
    y = x @ weight.T + bias + scaling * u @ lora_B.T
The dropout mask comes from reference.rng and is regenerated in backward, never stored.
"""
import torch

from .rng import dropout_keep_mask


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropped(x: torch.Tensor, dropout_p: float, seed: int | None) -> torch.Tensor:
    """x [M, K] with the dropout mask applied and kept entries scaled by 1 / (1 - p)."""
    if dropout_p == 0.0:
        return x
    return masked(x, keep_mask(x, dropout_p, seed)) * (1.0 / (1.0 - dropout_p))


def keep_mask(x: torch.Tensor, dropout_p: float, seed: int | None) -> torch.Tensor | None:
    """The dropout mask for x's [M, K] shape (None without dropout)."""
    return None if dropout_p == 0.0 else dropout_keep_mask(seed, dropout_p, x.shape[0], x.shape[1], device=x.device)


def masked(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x with dropped entries zeroed, unscaled (0, not 0 * x: a dropped inf or nan gives 0, as in
    the kernels). The 1 / (1 - p) goes on the small [M, r] / [r, K] products instead of x."""
    return x if keep is None else torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def dense_base(weight):
    """The base products of a dense weight [N, K], as the *_with functions take them:
    base(a, bias) = a @ W.T + bias, base_t(g, c) = c + g @ W (g @ W when c is None)."""
    def base(a, bias):
        return torch.nn.functional.linear(a, weight, bias)

    def base_t(g, c):
        return g @ weight if c is None else torch.addmm(c, g, weight)
    return base, base_t


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed):
    return lora_forward_with(dense_base(weight)[0], x, lora_A, lora_B, bias, scaling, dropout_p, seed)


def lora_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """Returns (dx or an empty tensor, d lora_A, d lora_B)."""
    base_t = dense_base(weight)[1] if need_dx else None
    return lora_backward_with(base_t, grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


def lora_forward_with(base, x, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """The forward over any frozen base (``base(a, bias)`` = a @ W.T + bias, e.g. by windows of a
    quantized W): (y [M, N] in x.dtype, u [M, r] in the accumulation dtype)."""
    acc = accumulation_dtype(x.dtype)
    u = (masked(x, keep_mask(x, dropout_p, seed)) @ lora_A.T).to(acc)
    if dropout_p:
        u *= 1.0 / (1.0 - dropout_p)
    y = torch.addmm(base(x, bias), u.to(x.dtype), lora_B.T, alpha=scaling)
    return y, u


def lora_backward_with(base_t, grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """The backward over any frozen base (``base_t(g, c)`` = c + g @ W): (dx or an empty tensor,
    d lora_A, d lora_B)."""
    d, grad_A, grad_B = adapter_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)
    return (base_t(grad_y, d) if need_dx else d), grad_A, grad_B


def delta_forward(x, lora_A, lora_B, scaling, dropout_p, seed):
    """The LoRA branch alone (lora_delta): (y = scaling * dropout(x) A^T B^T [M, N] in x.dtype, u [M, r]
    in the accumulation dtype)."""
    acc = accumulation_dtype(x.dtype)
    u = (masked(x, keep_mask(x, dropout_p, seed)) @ lora_A.T).to(acc)
    if dropout_p:
        u *= 1.0 / (1.0 - dropout_p)
    return (u.to(x.dtype) @ lora_B.T).mul_(scaling), u


def delta_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """(dx or an empty tensor, d lora_A, d lora_B) of delta_forward."""
    return adapter_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


def adapter_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, q=None):
    """The LoRA-specific backward (triton.lora.adapter_backward's contract): (D, d lora_A, d lora_B)
    with D [M, K] = mask / (1 - p) * (s * v @ A [+ q]) the adapter's part of dx (an empty tensor
    without need_dx), v = dY @ B. ``q``: another gradient with respect to dropout(x) (DoRA's)."""
    v = grad_y @ lora_B  # [M, r]
    keep = keep_mask(x, dropout_p, seed)
    inv_keep = 1.0 / (1.0 - dropout_p)  # dropout's backward scale, on the small products
    grad_B = ((grad_y.T @ u.to(grad_y.dtype)) * scaling).to(lora_B.dtype)
    grad_A = ((v.T @ masked(x, keep)) * (scaling * inv_keep)).to(lora_A.dtype)
    if not need_dx:
        return x.new_empty(0), grad_A, grad_B
    d = (v @ lora_A).mul_(scaling * inv_keep)
    if q is not None:
        d.add_(q, alpha=inv_keep)
    return masked(d, keep), grad_A, grad_B
