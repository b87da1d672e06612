"""Every custom-op schema of peft_kernels, declared in one place, with its fake (meta)
implementation so torch.compile / FakeTensor tracing sees one opaque op per call.

The real implementations and autograd formulas live in peft_kernels/ops/<op>.py; the ``backend``
argument is always concrete here ("torch" | "triton" | "cuda"): ``auto`` is resolved before the
op is called, so a traced graph records which backend it runs.
"""
import torch

from .reference.lora import accumulation_dtype

LIB = torch.library.Library("peft_kernels", "DEF")

LIB.define(
    "lora_fwd(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, "
    "float dropout_p, Tensor? seed, str backend) -> (Tensor, Tensor)"
)
LIB.define(
    "lora_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, float scaling, "
    "float dropout_p, Tensor? seed, bool need_dx, str backend) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("peft_kernels::lora_fwd")
def _lora_fwd_fake(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    return (
        x.new_empty((x.shape[0], weight.shape[0])),
        x.new_empty((x.shape[0], lora_A.shape[0]), dtype=accumulation_dtype(x.dtype)),
    )


@torch.library.register_fake("peft_kernels::lora_bwd")
def _lora_bwd_fake(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, backend):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)
