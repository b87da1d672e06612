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


def dropped(x: torch.Tensor, dropout_p: float, seed: int | None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] with the dropout mask applied and kept entries scaled by 1 / (1 - p). ``keep``: the
    mask of (seed, p) for this shape if the caller has it already (a backward applies it twice)."""
    if dropout_p == 0.0:
        return x
    if keep is None:
        keep = dropout_keep_mask(seed, dropout_p, x.shape[0], x.shape[1], device=x.device)
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)) * (1.0 / (1.0 - dropout_p))


def keep_mask(x: torch.Tensor, dropout_p: float, seed: int | None) -> torch.Tensor | None:
    """The dropout mask for x's [M, K] shape (None without dropout)."""
    return None if dropout_p == 0.0 else dropout_keep_mask(seed, dropout_p, x.shape[0], x.shape[1], device=x.device)


def lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed):
    u = dropped(x, dropout_p, seed) @ lora_A.T
    y = torch.nn.functional.linear(x, weight, bias) + scaling * (u @ lora_B.T)
    return y, u.to(accumulation_dtype(x.dtype))


def lora_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    """Returns (dx or an empty tensor, d lora_A, d lora_B)."""
    v = grad_y @ lora_B  # [M, r]
    keep = keep_mask(x, dropout_p, seed)
    grad_B = (scaling * grad_y.T @ u.to(grad_y.dtype)).to(lora_B.dtype)
    grad_A = (scaling * v.T @ dropped(x, dropout_p, seed, keep)).to(lora_A.dtype)
    if not need_dx:
        return x.new_empty(0), grad_A, grad_B
    d_xdrop = scaling * (v @ lora_A)  # gradient w.r.t. dropout(x)
    grad_x = grad_y @ weight + dropped(d_xdrop, dropout_p, seed, keep)
    return grad_x, grad_A, grad_B
