"""quant_linear: y = x @ deq(W)^T + bias over a frozen quantized weight.

Path: ``quant_linear`` (validates, resolves the backend) -> ``_QuantLinearFunction`` -> custom ops
``peft_kernels::quant_linear_fwd`` / ``quant_linear_bwd`` (NF4/FP4) or ``intq_linear_fwd`` /
``intq_linear_bwd`` (INT8/INT4) -> backend module. Backward gives dx = dY @ deq(W) (and the bias
gradient); the frozen weight never gets one.
"""
from __future__ import annotations

import torch

from .. import _ops  # noqa: F401  (defines the schemas)
from .. import backends
from ..quant.bnb4bit import Bnb4bitWeight
from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Weight
from . import _checks

OP = "quant_linear"
backends.register(OP, "torch", "peft_kernels.reference.quant")
backends.register(OP, "triton", "peft_kernels.triton.quant_matmul")
# cuda: the forward for few tokens in one CUDA C++ kernel, the rest on the Triton kernels
backends.register(OP, "cuda", "peft_kernels.cuda_backend.quant")
# INT8 / INT4: windowed decode + BLAS (peft_kernels/reference/intq.py) is the only backend so far.
OP_INT = "quant_linear_int"
backends.register(OP_INT, "torch", "peft_kernels.reference.intq")
INT_FORMATS = {Int8Weight: "int8", Int4Weight: "int4"}


def split_parts(qweight: Bnb4bitWeight):
    """(tensor list for the schema's Tensor[], blocksize, shape) of a 4-bit weight."""
    packed, absmax, code, absmax2, code2, offset, blocksize, shape = qweight.parts()
    tensors = [packed, absmax, code] + ([absmax2, code2, offset] if absmax2 is not None else [])
    return tensors, blocksize, list(shape)


def route(qweight, backend: str, device, ops_4bit: tuple, ops_int: tuple) -> tuple:
    """(backend, fwd op, bwd op, the ops' weight arguments) for qweight's family. ops_4bit /
    ops_int: (registry op name, fwd op, bwd op) for NF4/FP4 (arguments: tensors, blocksize,
    shape) and INT8/INT4 (arguments: tensors, fmt, group_size, shape)."""
    fmt = INT_FORMATS.get(type(qweight))
    op, fwd, bwd = ops_int if fmt is not None else ops_4bit
    if fmt is not None:
        meta = (qweight.tensors(), fmt, qweight.group_size if fmt == "int4" else 0, list(qweight.shape))
    else:
        meta = split_parts(qweight)
    return backends.resolve(op, backend, device), fwd, bwd, meta


def join_parts(tensors):
    """Inverse of the tensor list: (packed, absmax, code, absmax2, code2, offset), None-padded."""
    return tuple(tensors) if len(tensors) == 6 else (*tensors, None, None, None)


def check_qweight(op: str, x, qweight, allow_int: bool = False) -> tuple[int, int]:
    """qweight is an NF4Weight/FP4Weight (or, with allow_int, an Int8Weight/Int4Weight) on x's
    device; returns (out_features, in_features)."""
    kinds = (Bnb4bitWeight, *INT_FORMATS) if allow_int else (Bnb4bitWeight,)
    if not isinstance(qweight, kinds):
        names = "NF4Weight, FP4Weight, Int8Weight or Int4Weight" if allow_int else "NF4Weight or FP4Weight"
        raise TypeError(f"peft_kernels.{op}: qweight must be an {names}, got {type(qweight).__name__}")
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


@torch.library.impl(_ops.LIB, "intq_linear_fwd", "CompositeExplicitAutograd")
def _intq_linear_fwd(x, qweight, fmt, group_size, shape, bias, backend):
    return backends.implementation(OP_INT, backend).forward(x, qweight, fmt, group_size, tuple(shape), bias)


@torch.library.impl(_ops.LIB, "intq_linear_bwd", "CompositeExplicitAutograd")
def _intq_linear_bwd(grad_y, qweight, fmt, group_size, shape, backend):
    return backends.implementation(OP_INT, backend).backward(grad_y, qweight, fmt, group_size, tuple(shape))


class _QuantLinearFunction(torch.autograd.Function):
    """y = fwd(x, *meta, bias, backend); dx = bwd(dY, *meta, backend): the NF4/FP4 ops
    (meta = tensors, blocksize, shape) and the INT8/INT4 ops (meta = tensors, fmt, group, shape)."""

    @staticmethod
    def forward(ctx, x, bias, fwd, bwd, meta, backend):
        ctx.quant = (bwd, meta, backend)
        return fwd(x, *meta, bias, backend)

    @staticmethod
    def backward(ctx, grad_y):
        bwd, meta, backend = ctx.quant
        _checks.first_derivative_only(OP, backend)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = bwd(grad_y, *meta, backend)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_bias, None, None, None, None


def quant_linear(x: torch.Tensor, qweight: Bnb4bitWeight, bias: torch.Tensor | None = None, *,
                 backend: str = "auto") -> torch.Tensor:
    """``x @ qweight.dequantize().T + bias`` without materializing the dequantized weight.

    Shapes: x [..., in] (fp16/bf16/fp32), qweight an NF4Weight/FP4Weight/Int8Weight/Int4Weight of
    shape [out, in], bias [out] or None; returns [..., out] in x.dtype. Gradients: x and bias
    (the quantized weight is frozen). backend: "auto" (triton on CUDA, torch on CPU), "triton",
    "cuda" (NF4/FP4: the forward for few tokens in one CUDA C++ kernel where
    cuda_backend.quant.SMALL_M_MAX_M allows, everything else on the Triton kernels) or "torch";
    INT8/INT4 have the torch backend only (windowed decode + BLAS, cuBLAS on a GPU).
    """
    autocast = _checks.autocast_dtype(x)
    if autocast is not None:  # F.linear's rule (see _checks.autocast_dtype)
        x, bias = _checks.to_autocast(autocast, x, bias)
        with torch.autocast(x.device.type, enabled=False):
            return quant_linear(x, qweight, bias, backend=backend)
    out_features, in_features = check_qweight(OP, x, qweight, allow_int=True)
    _checks.check_input(OP, x, in_features, out_features, bias)
    ops = torch.ops.peft_kernels
    backend, fwd, bwd, meta = route(qweight, backend, x.device, (OP, ops.quant_linear_fwd, ops.quant_linear_bwd),
                                    (OP_INT, ops.intq_linear_fwd, ops.intq_linear_bwd))
    if backend == "triton":
        _checks.check_triton(OP, x)
    elif backend == "cuda":
        _checks.check_cuda_with_triton(OP, x)
    y = _QuantLinearFunction.apply(x.reshape(-1, in_features), _checks.contiguous_bias(bias), fwd, bwd, meta,
                                   backend)
    return _checks.unflatten_rows(y, x)
