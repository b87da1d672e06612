"""qlora_linear: the fused LoRA op over a frozen quantized base weight:
y = x @ deq(W)^T + bias + scaling * dropout(x) @ lora_A^T @ lora_B^T.

Same fusions as lora_linear (dropout mask regenerated from the seed, never stored; adapter
up-projection folded into the base product's epilogue; dx in one pass). The base product is a
4-bit matmul that decodes the weight tile by tile (NF4/FP4), or windows of decoded weight on the
BLAS (INT8/INT4). Path: ``qlora_linear`` -> ``_QLoRAFunction`` -> custom ops
``peft_kernels::qlora_fwd`` / ``qlora_bwd`` (NF4/FP4) or ``intq_lora_fwd`` / ``intq_lora_bwd``
(INT8/INT4) -> backend module.
"""
from __future__ import annotations

import torch

from .. import _ops  # noqa: F401  (defines the schemas)
from .. import backends
from ..quant.bnb4bit import Bnb4bitWeight
from . import _checks
from .quant_linear import check_qweight, join_parts, route

OP = "qlora_linear"
backends.register(OP, "torch", "peft_kernels.reference.quant")
backends.register(OP, "triton", "peft_kernels.triton.quant_matmul")
# cuda: the forward for few tokens in one CUDA C++ kernel, the rest on the Triton kernels
backends.register(OP, "cuda", "peft_kernels.cuda_backend.quant")
OP_INT = "qlora_linear_int"  # over INT8 / INT4 bases
backends.register(OP_INT, "torch", "peft_kernels.reference.intq")
backends.register(OP_INT, "triton", "peft_kernels.triton.intq_lora")


@torch.library.impl(_ops.LIB, "qlora_fwd", "CompositeExplicitAutograd")
def _qlora_fwd(x, qweight, blocksize, shape, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    impl, seed = _checks.implementation_and_seed(OP, backend, seed)
    return impl.qlora_forward(x, join_parts(qweight), blocksize, tuple(shape), lora_A, lora_B, bias,
                              scaling, dropout_p, seed)


@torch.library.impl(_ops.LIB, "qlora_bwd", "CompositeExplicitAutograd")
def _qlora_bwd(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx,
               backend):
    impl, seed = _checks.implementation_and_seed(OP, backend, seed)
    return impl.qlora_backward(grad_y, x, join_parts(qweight), blocksize, tuple(shape), lora_A, lora_B, u,
                               scaling, dropout_p, seed, need_dx)


@torch.library.impl(_ops.LIB, "intq_lora_fwd", "CompositeExplicitAutograd")
def _intq_lora_fwd(x, qweight, fmt, group_size, shape, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    impl, seed = _checks.implementation_and_seed(OP_INT, backend, seed)
    return impl.qlora_forward(x, qweight, fmt, group_size, tuple(shape), lora_A, lora_B, bias, scaling, dropout_p,
                              seed)


@torch.library.impl(_ops.LIB, "intq_lora_bwd", "CompositeExplicitAutograd")
def _intq_lora_bwd(grad_y, x, qweight, fmt, group_size, shape, lora_A, lora_B, u, scaling, dropout_p, seed,
                   need_dx, backend):
    impl, seed = _checks.implementation_and_seed(OP_INT, backend, seed)
    return impl.qlora_backward(grad_y, x, qweight, fmt, group_size, tuple(shape), lora_A, lora_B, u, scaling,
                               dropout_p, seed, need_dx)


class _QLoRAFunction(torch.autograd.Function):
    """y, u = fwd(x, *meta, lora_A, lora_B, bias, scaling, p, seed, backend); backward through bwd
    with the same meta: the NF4/FP4 ops (meta = tensors, blocksize, shape) and the INT8/INT4 ops
    (meta = tensors, fmt, group_size, shape)."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, seed, fwd, bwd, meta, scaling, dropout_p, backend):
        y, u = fwd(x, *meta, lora_A, lora_B, bias, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x, lora_A, lora_B, u, seed)
        ctx.rest = (bwd, meta, scaling, dropout_p, backend)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, u, seed = ctx.saved_tensors
        bwd, meta, scaling, dropout_p, backend = ctx.rest
        _checks.first_derivative_only(OP, backend)
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        dx, da, db = bwd(grad_y, x, *meta, lora_A, lora_B, u, scaling, dropout_p, seed, need_x, backend)
        return (dx if need_x else None, da if need_a else None, db if need_b else None,
                grad_y.sum(0) if need_bias else None) + (None,) * 7


def qlora_linear(x: torch.Tensor, qweight: Bnb4bitWeight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 bias: torch.Tensor | None = None, *, scaling: float = 1.0, dropout_p: float = 0.0,
                 training: bool = True, seed: int | None = None, backend: str = "auto") -> torch.Tensor:
    """LoRA over a frozen quantized weight, fused.

    Shapes: x [..., in] (fp16/bf16/fp32), qweight an NF4Weight/FP4Weight/Int8Weight/Int4Weight of
    shape [out, in], lora_A [r, in], lora_B [out, r], bias [out] | None; returns [..., out] in
    x.dtype. Dropout, seed and backend behave exactly as in ``lora_linear``. Gradients: x, lora_A,
    lora_B, bias. On the triton backend the INT8/INT4 base product runs by windows of decoded
    weight on cuBLAS (the adapter work in the LoRA kernels); NF4/FP4 have their own 4-bit matmul.
    """
    autocast = _checks.autocast_dtype(x)
    if autocast is not None:  # F.linear's rule (see _checks.autocast_dtype)
        x, bias = _checks.to_autocast(autocast, x, bias)
        with torch.autocast(x.device.type, enabled=False):
            return qlora_linear(x, qweight, lora_A, lora_B, bias, scaling=scaling, dropout_p=dropout_p,
                                training=training, seed=seed, backend=backend)
    out_features, in_features = check_qweight(OP, x, qweight, allow_int=True)
    _checks.check_input(OP, x, in_features, out_features, bias)
    r = _checks.check_adapter(OP, lora_A, lora_B, in_features, out_features, scaling, dropout_p)
    _checks.check_same_device(OP, x=x, lora_A=lora_A, lora_B=lora_B, bias=bias)
    ops = torch.ops.peft_kernels
    backend, fwd, bwd, meta = route(qweight, backend, x.device, (OP, ops.qlora_fwd, ops.qlora_bwd),
                                    (OP_INT, ops.intq_lora_fwd, ops.intq_lora_bwd))
    if backend == "triton":
        _checks.check_triton(OP, x, r)
    elif backend == "cuda":
        _checks.check_cuda_with_triton(OP, x, r)
    p, seed_t, lora_A, lora_B = _checks.adapter_call_args(OP, x, lora_A, lora_B, dropout_p, training, seed)
    y = _QLoRAFunction.apply(x.reshape(-1, in_features), lora_A, lora_B, _checks.contiguous_bias(bias), seed_t,
                             fwd, bwd, meta, float(scaling), p, backend)
    return _checks.unflatten_rows(y, x)
