"""The fused LoRA linear op: y = x W^T + bias + scaling * dropout(x) A^T B^T.

Path: ``lora_linear`` (validates, resolves the backend, flattens x) -> ``_LoRAFunction``
(autograd) -> custom ops ``peft_kernels::lora_fwd`` / ``lora_bwd`` (schemas and fake impls in
_ops.py; opaque single nodes to torch.compile) -> the backend module's ``lora_forward`` /
``lora_backward``. Weight and bias gradients, needed only when the base layer is trainable, are
plain cuBLAS/torch ops here.

Why an autograd.Function around two custom ops rather than torch.library.register_autograd on
one: on the development CPU (torch backend, tiny shapes) the register_autograd wrapper cost
~140 us more per fwd+bwd than a Function. On the H100 machine the custom ops themselves are not
the main host cost (benchmarks/results/lora_host_h100.txt: a Function calling the Triton host
code directly is as slow). Dynamo traces the Function, so torch.compile still sees the two ops.
"""
from __future__ import annotations

import torch

from .. import _ops  # noqa: F401  (defines the schemas)
from .. import backends
from . import _checks

OP = "lora_linear"
backends.register(OP, "torch", "peft_kernels.reference.lora")
backends.register(OP, "triton", "peft_kernels.triton.lora")
backends.register(OP, "cuda", "peft_kernels.cuda_backend.lora")


@torch.library.impl(_ops.LIB, "lora_fwd", "CompositeExplicitAutograd")
def _lora_fwd(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    impl, seed = _checks.implementation_and_seed(OP, backend, seed)
    return impl.lora_forward(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed)


@torch.library.impl(_ops.LIB, "lora_bwd", "CompositeExplicitAutograd")
def _lora_bwd(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, backend):
    impl, seed = _checks.implementation_and_seed(OP, backend, seed)
    return impl.lora_backward(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx)


def _validate(x, weight, lora_A, lora_B, bias, scaling, dropout_p, backend, op: str = OP) -> str:
    """Check every input (messages are formatted only on failure: this runs every step) and
    return the backend ``op`` (lora_linear, or dora_linear over a dense base) resolves to; ``op``
    also names the caller in error messages."""
    _checks.check_tensor(weight, "weight", op, 2)
    out_features, in_features = weight.shape
    _checks.check_input(op, x, in_features, out_features, bias)
    r = _checks.check_adapter(op, lora_A, lora_B, in_features, out_features, scaling, dropout_p)
    if weight.dtype != x.dtype:
        _checks.fail(op, f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    _checks.check_same_device(op, x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, bias=bias)
    backend = backends.resolve(op, backend, x.device, rows=x.numel() // max(in_features, 1))
    if backend == "triton":
        _checks.check_triton(op, x, r)
    elif backend == "cuda":
        _checks.check_cuda(op, x)
    return backend


class _LoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
        y, u = torch.ops.peft_kernels.lora_fwd(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x, weight, lora_A, lora_B, u, seed)
        ctx.hyper = (scaling, dropout_p, backend)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
        scaling, dropout_p, backend = ctx.hyper
        _checks.first_derivative_only(OP, backend, differentiable=backend == "torch")
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_a = grad_b = grad_bias = None
        if need_x or need_a or need_b:
            dx, da, db = torch.ops.peft_kernels.lora_bwd(
                grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_x, backend
            )
            grad_x = dx if need_x else None
            grad_a = da if need_a else None
            grad_b = db if need_b else None
        if need_w:
            grad_w = grad_y.t().mm(x)
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_w, grad_a, grad_b, grad_bias, None, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """LoRA linear layer, fused: ``x @ weight.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T``.

    Shapes (nn.Linear / HF PEFT conventions):
        x       [..., in]   any leading dims, any strides
        weight  [out, in]   frozen base weight, same dtype as x
        lora_A  [r, in]     1 <= r (<= 256 on the triton backend)
        lora_B  [out, r]
        bias    [out] or None
        returns [..., out] in x.dtype

    Dropout (active when ``training`` and ``dropout_p > 0``) drops elements of x on the LoRA
    branch only, as PEFT does. Its mask is a pure function of (seed, row, column): it is
    regenerated in backward, never stored. ``seed=None`` draws one from torch's generator, so
    ``torch.manual_seed`` and torch.utils.checkpoint's RNG replay reproduce it.

    Gradients flow to x, lora_A and lora_B, and to weight / bias when those require grad.
    lora_A / lora_B in another float dtype than x are cast to x.dtype for the kernels (their
    gradients come back in their own dtype).

    backend: "auto" (triton on CUDA, torch on CPU; PEFT_KERNELS_BACKEND overrides), "triton",
    "cuda" or "torch" (the pure-PyTorch reference). ``peft_kernels.backends.last_used(
    "lora_linear")`` tells which one ran. Under torch.autocast it computes in the autocast dtype,
    as F.linear does.
    """
    autocast = _checks.autocast_dtype(x)
    if autocast is not None:
        x, weight, bias = _checks.to_autocast(autocast, x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, lora_A, lora_B, bias, scaling=scaling, dropout_p=dropout_p,
                               training=training, seed=seed, backend=backend)
    backend = _validate(x, weight, lora_A, lora_B, bias, scaling, dropout_p, backend)
    return apply_validated(x, weight, lora_A, lora_B, bias, scaling, dropout_p, training, seed, backend)


def apply_validated(x, weight, lora_A, lora_B, bias, scaling, dropout_p, training, seed, backend):
    """lora_linear after ``_validate``: for callers (dora_linear) that validated already."""
    p, seed_t, lora_A, lora_B = _checks.adapter_call_args(OP, x, lora_A, lora_B, dropout_p, training, seed)
    x2 = x.reshape(-1, weight.shape[1])
    y = _LoRAFunction.apply(x2, weight, lora_A, lora_B, _checks.contiguous_bias(bias), float(scaling), p, seed_t,
                            backend)
    return _checks.unflatten_rows(y, x)

