"""quant_linear: y = x @ deq(W)^T + bias over a frozen bitsandbytes-format 4-bit weight.

Path: ``quant_linear`` (validates, resolves the backend) -> ``_QuantLinearFunction`` -> custom ops
``peft_kernels::quant_linear_fwd`` / ``quant_linear_bwd`` -> backend module. Backward gives dx =
dY @ deq(W) (and the bias gradient); the frozen weight never gets one.
"""
from __future__ import annotations

import torch

from .. import _ops  # noqa: F401  (defines the schemas)
from .. import backends
from ..quant.bnb4bit import Bnb4bitWeight
from . import _checks

OP = "quant_linear"
backends.register(OP, "torch", "peft_kernels.reference.quant")
backends.register(OP, "triton", "peft_kernels.triton.quant_matmul")


def split_parts(qweight: Bnb4bitWeight):
    """(tensor list for the schema's Tensor[], blocksize, shape) of a 4-bit weight."""
    packed, absmax, code, absmax2, code2, offset, blocksize, shape = qweight.parts()
    tensors = [packed, absmax, code] + ([absmax2, code2, offset] if absmax2 is not None else [])
    return tensors, blocksize, list(shape)


def join_parts(tensors):
    """Inverse of the tensor list: (packed, absmax, code, absmax2, code2, offset), None-padded."""
    return tuple(tensors) if len(tensors) == 6 else (*tensors, None, None, None)


def check_qweight(op: str, x, qweight) -> tuple[int, int]:
    """qweight is an NF4Weight/FP4Weight on x's device; returns (out_features, in_features)."""
    if not isinstance(qweight, Bnb4bitWeight):
        raise TypeError(f"peft_kernels.{op}: qweight must be an NF4Weight or FP4Weight, got {type(qweight).__name__}")
    if isinstance(x, torch.Tensor) and qweight.device != x.device:
        _checks.fail(op, f"qweight is on {qweight.device}, x on {x.device}")
    return tuple(qweight.shape)


@torch.library.impl(_ops.LIB, "quant_linear_fwd", "CompositeExplicitAutograd")
def _quant_linear_fwd(x, qweight, blocksize, shape, bias, backend):
    impl = backends.implementation(OP, backend)
    return impl.quant_linear_forward(x, join_parts(qweight), blocksize, tuple(shape), bias)


@torch.library.impl(_ops.LIB, "quant_linear_bwd", "CompositeExplicitAutograd")
def _quant_linear_bwd(grad_y, qweight, blocksize, shape, backend):
    impl = backends.implementation(OP, backend)
    return impl.quant_linear_backward(grad_y, join_parts(qweight), blocksize, tuple(shape))


class _QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, tensors, blocksize, shape, backend):
        ctx.quant = (tensors, blocksize, shape, backend)
        return torch.ops.peft_kernels.quant_linear_fwd(x, tensors, blocksize, shape, bias, backend)

    @staticmethod
    def backward(ctx, grad_y):
        tensors, blocksize, shape, backend = ctx.quant
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.peft_kernels.quant_linear_bwd(grad_y, tensors, blocksize, shape, backend)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_bias, None, None, None, None


def quant_linear(x: torch.Tensor, qweight: Bnb4bitWeight, bias: torch.Tensor | None = None, *,
                 backend: str = "auto") -> torch.Tensor:
    """``x @ qweight.dequantize().T + bias`` without materializing the dequantized weight.

    Shapes: x [..., in] (fp16/bf16/fp32), qweight an NF4Weight/FP4Weight of shape [out, in],
    bias [out] or None; returns [..., out] in x.dtype. Gradients: x and bias (the 4-bit weight is
    frozen). backend: "auto" (triton on CUDA, torch on CPU), "triton" or "torch".
    """
    out_features, in_features = check_qweight(OP, x, qweight)
    _checks.check_input(OP, x, in_features, out_features, bias)
    backend = backends.resolve(OP, backend, x.device)
    if backend == "triton":
        _checks.check_triton(OP, x)
    tensors, blocksize, shape = split_parts(qweight)
    y = _QuantLinearFunction.apply(x.reshape(-1, in_features), bias, tensors, blocksize, shape, backend)
    return y.reshape(*x.shape[:-1], out_features)
