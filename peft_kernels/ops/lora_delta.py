"""lora_delta: the LoRA branch alone, y = scaling * dropout(x) A^T B^T, for a base layer that some
other code computes (bitsandbytes' LLM.int8 Linear8bitLt, or any layer peft_kernels cannot fuse):
the adapter half of lora_linear, with the same fusions — dropout's mask from the seed, regenerated
in backward (neither the mask nor the dropped x is stored), the down- and up-projection in the
LoRA kernels, u = dropout(x) A^T [M, r] the only tensor kept besides x.

Path: ``lora_delta`` (validates, resolves the backend, flattens x) -> ``_LoRADeltaFunction`` ->
custom ops ``peft_kernels::lora_delta_fwd`` / ``lora_delta_bwd`` (schemas in _ops.py) -> the
backend module's ``delta_forward`` / ``delta_backward`` (reference/lora.py; triton/lora.py: the
adapter kernels of lora_linear, without the base GEMMs).
"""
from __future__ import annotations

import torch

from .. import _ops  # noqa: F401  (defines the schemas)
from .. import backends
from . import _checks

OP = "lora_delta"
backends.register(OP, "torch", "peft_kernels.reference.lora")
backends.register(OP, "triton", "peft_kernels.triton.lora")


@torch.library.impl(_ops.LIB, "lora_delta_fwd", "CompositeExplicitAutograd")
def _lora_delta_fwd(x, lora_A, lora_B, scaling, dropout_p, seed, backend):
    impl, seed = _checks.implementation_and_seed(OP, backend, seed)
    return impl.delta_forward(x, lora_A, lora_B, scaling, dropout_p, seed)


@torch.library.impl(_ops.LIB, "lora_delta_bwd", "CompositeExplicitAutograd")
def _lora_delta_bwd(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, backend):
    impl, seed = _checks.implementation_and_seed(OP, backend, seed)
    return impl.delta_backward(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


class _LoRADeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, lora_B, scaling, dropout_p, seed, backend):
        y, u = torch.ops.peft_kernels.lora_delta_fwd(x, lora_A, lora_B, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x, lora_A, lora_B, u, seed)
        ctx.hyper = (scaling, dropout_p, backend)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, u, seed = ctx.saved_tensors
        scaling, dropout_p, backend = ctx.hyper
        _checks.first_derivative_only(OP, backend, differentiable=backend == "torch")
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        dx, da, db = torch.ops.peft_kernels.lora_delta_bwd(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed,
                                                           need_x, backend)
        return (dx if need_x else None), (da if need_a else None), (db if need_b else None), None, None, None, None


def lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, *, scaling: float = 1.0,
               dropout_p: float = 0.0, training: bool = True, seed: int | None = None,
               backend: str = "auto") -> torch.Tensor:
    """The LoRA branch alone: ``scaling * dropout(x) @ lora_A.T @ lora_B.T``, to add to a base
    layer's output computed elsewhere (HF PEFT's LoRA over a bitsandbytes 8-bit base, patched).

    Shapes: x [..., in] (any leading dims, any strides), lora_A [r, in], lora_B [out, r]
    (1 <= r, <= 256 on the triton backend) -> [..., out] in x.dtype. Gradients flow to x, lora_A and
    lora_B; lora_A / lora_B in another float dtype than x are cast to x.dtype for the kernels.
    Dropout, seed, backend and autocast as lora_linear (``last_used("lora_delta")``).
    """
    autocast = _checks.autocast_dtype(x)
    if autocast is not None:  # F.linear's rule (see _checks.autocast_dtype)
        (x,) = _checks.to_autocast(autocast, x)
        with torch.autocast(x.device.type, enabled=False):
            return lora_delta(x, lora_A, lora_B, scaling=scaling, dropout_p=dropout_p, training=training, seed=seed,
                              backend=backend)
    _checks.check_tensor(x, "x", OP)
    if x.dim() < 1:
        _checks.fail(OP, "x must have at least one dimension")
    in_features = x.shape[-1]
    _checks.check_tensor(lora_A, "lora_A", OP, 2)
    _checks.check_tensor(lora_B, "lora_B", OP, 2)
    out_features = lora_B.shape[0]
    r = _checks.check_adapter(OP, lora_A, lora_B, in_features, out_features, scaling, dropout_p)
    _checks.check_same_device(OP, x=x, lora_A=lora_A, lora_B=lora_B)
    backend = backends.resolve(OP, backend, x.device, rows=x.numel() // max(in_features, 1))
    if backend == "triton":
        _checks.check_triton(OP, x, r)
    p, seed_t, lora_A, lora_B = _checks.adapter_call_args(OP, x, lora_A, lora_B, dropout_p, training, seed)
    y = _LoRADeltaFunction.apply(x.reshape(-1, in_features), lora_A, lora_B, float(scaling), p, seed_t, backend)
    return _checks.unflatten_rows(y, x)


__all__ = ["lora_delta"]
