"""dora_linear: weight-decomposed LoRA with HF PEFT's semantics (first version: a composite over
the fused lora_linear op, not yet a fused op of its own).

    mn = magnitude / ‖W + s·B·A‖_row            the norm detached (DoRA §4.3, as PEFT does)
    no dropout (p = 0 or eval):  y = mn ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + bias          -> lora_linear, fused
    dropout:   y = x Wᵀ + bias + (mn − 1) ⊙ (x_d Wᵀ) + mn ⊙ s·(x_d Aᵀ Bᵀ)    x_d = dropout(x)
The dropout form is PEFT's exact formula (an extra base GEMM over the dropped x); it runs as
plain PyTorch ops with the library's counter-based mask, so it is exact but not fast yet.

The row norm never builds the out×in matrix W + s·B·A:
    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·Σ_j (W Aᵀ)_ij B_ij + s²·Σ_j (B (A Aᵀ))_ij B_ij
needs only W·Aᵀ [out, r] and A·Aᵀ [r, r] (arXiv 2603.22276 / PEFT PR #3387).

Over a quantized base (``weight`` an NF4Weight/FP4Weight/Int8Weight/Int4Weight, QDoRA): the base
products run on quant_linear / qlora_linear, W·Aᵀ is quant_linear(A, W)ᵀ (M = r rows), and ‖W_i‖²,
constant for a frozen W, is computed once by row windows (``weight_row_sq``, cached by the
QDoRA modules).
"""
from __future__ import annotations

import torch

from ..quant.bnb4bit import Bnb4bitWeight
from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Weight
from ..reference.lora import dropped
from . import _checks
from .lora import _validate, apply_validated
from .qlora import qlora_linear
from .quant_linear import quant_linear

OP = "dora_linear"
ROW_WINDOW = 256  # rows of a quantized weight decoded at a time for ‖W_i‖²
QUANTIZED = (Bnb4bitWeight, Int8Weight, Int4Weight)


def weight_row_sq(weight, acc: torch.dtype = torch.float32) -> torch.Tensor:
    """‖W_i‖² per output row in ``acc``, for a dense weight or a quantized one (decoded ROW_WINDOW
    rows at a time, the format's exact values: never the whole full-precision weight)."""
    with torch.no_grad():
        if not isinstance(weight, QUANTIZED):
            return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()
        out_f = weight.shape[0]
        return torch.cat([torch.linalg.vector_norm(weight.dequantize_rows(r0, min(ROW_WINDOW, out_f - r0), acc),
                                                   dim=1, dtype=acc).square()
                          for r0 in range(0, out_f, ROW_WINDOW)])


def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     row_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + scaling·B·A‖ per output row, [out] in fp32 (fp64 for fp64 inputs), detached, via the
    factorization above. W (dense or quantized) is read in its own dtype: only
    [out, r] and [r, r] temporaries, no out×in one. ``row_sq``: ‖W_i‖² if already known."""
    with torch.no_grad():
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w_sq = weight_row_sq(weight, acc) if row_sq is None else row_sq.to(acc)
        if isinstance(weight, QUANTIZED):
            wa = quant_linear(lora_A.to(weight.dtype), weight).T.to(acc)
        else:
            wa = (weight @ lora_A.to(weight.dtype).T).to(acc)
        a, b = lora_A.to(acc), lora_B.to(acc)
        cross = (wa * b).sum(1)
        quad = ((b @ (a @ a.T)) * b).sum(1)
        return (w_sq + 2 * scaling * cross + scaling**2 * quad).clamp_min(0).sqrt()


def dora_linear(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                magnitude: torch.Tensor, bias: torch.Tensor | None = None, *, scaling: float = 1.0,
                dropout_p: float = 0.0, training: bool = True, seed: int | None = None,
                backend: str = "auto", weight_row_sq: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA linear layer (HF PEFT semantics). Shapes as lora_linear, plus magnitude [out].

    ``weight``: the frozen [out, in] tensor, or an NF4Weight/FP4Weight/Int8Weight/Int4Weight (QDoRA:
    the base products run on quant_linear / qlora_linear; pass ``weight_row_sq`` = ‖W_i‖², e.g.
    from weight_row_sq(), to skip recomputing it every call). Gradients flow to x, lora_A, lora_B
    and magnitude (the row norm is detached, as in PEFT).
    """
    if isinstance(weight, QUANTIZED):  # the quantized ops validate x, the adapter and bias
        _check_magnitude(magnitude, weight.shape[0], x)
        _checks.check_scalar(scaling, "scaling", OP)

        def fused():
            return qlora_linear(x, weight, lora_A, lora_B, None, scaling=scaling, dropout_p=0.0, backend=backend)

        def base(inp, b=None):
            return quant_linear(inp, weight, b, backend=backend)
    else:
        backend = _validate(x, weight, lora_A, lora_B, bias, scaling, dropout_p, backend, op=OP)
        _check_magnitude(magnitude, weight.shape[0], x)

        def fused():
            return apply_validated(x, weight, lora_A, lora_B, None, scaling, 0.0, False, None, backend)

        def base(inp, b=None):
            return torch.nn.functional.linear(inp, weight, b)
    norm = dora_weight_norm(weight, lora_A, lora_B, float(scaling), weight_row_sq)
    mn = (magnitude / norm).to(x.dtype)
    p = float(dropout_p) if training else 0.0
    if p == 0.0:
        y = fused() * mn
        return y + bias if bias is not None else y
    # PEFT's dropout form, exact: the dropped x goes through the base weight too. The seed is
    # drawn on the host (torch's CPU generator: checkpoint replays it), so no device sync.
    xd = dropped(x.reshape(-1, weight.shape[1]), p, _checks.host_seed(seed)).reshape(x.shape)
    lora_out = torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_A.to(x.dtype)), lora_B.to(x.dtype))
    return base(x, bias) + (mn - 1) * base(xd) + mn * lora_out * scaling


def _check_magnitude(magnitude, out_features, x):
    _checks.check_tensor(magnitude, "magnitude", OP, 1)
    if magnitude.shape[0] != out_features:
        _checks.fail(OP, f"magnitude must be [{out_features}], got {list(magnitude.shape)}")
    _checks.check_same_device(OP, x=x, magnitude=magnitude)


__all__ = ["dora_linear", "dora_weight_norm", "weight_row_sq"]
