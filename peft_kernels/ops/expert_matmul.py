"""expert_matmul: an MoE experts layer's grouped product — rows of x sorted by expert, each times its
expert's matrix — through torch.nn.functional.grouped_mm where it takes the dtype and layout, else a
loop over the experts. Plain torch products, not a kernel of ours, wrapped as a custom op so that
torch.compile sees one opaque op (its passes otherwise re-lay-out operands grouped_mm needs row- or
column-major, and cannot trace the loop's host read of the group sizes) and so that the backward
forms dW only when w requires grad: a frozen expert weight's gradient is the GEMM the patched MoE
LoRA exists to skip (peft_kernels/integrations/peft_experts.py).

Path: ``expert_matmul`` (validates) -> ``_ExpertMatmulFunction`` -> custom ops
``peft_kernels::expert_mm_fwd`` / ``expert_mm_bwd`` (schemas in _ops.py) -> ``_product`` / ``_weight_grad``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .. import _ops  # noqa: F401  (defines the schemas)
from . import _checks

OP = "expert_matmul"


def grouped_mm_dtype(x) -> bool:
    """Whether torch.nn.functional.grouped_mm takes x's dtype on x's device: bf16 on a CUDA device of
    compute capability >= 8.0 (its documented case), fp32 / bf16 / fp16 on the CPU (torch's CPU kernel)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _aligned(size: int, *tensors) -> bool:
    """Every tensor's address and non-unit strides 16-byte aligned, and each one's last two dims
    row- or column-major (grouped_mm's layout rules)."""
    return all(t.data_ptr() % 16 == 0 and 1 in t.stride()[-2:] and all(s * size % 16 == 0 for s in t.stride() if s != 1)
               for t in tensors)


_LOOP_WARNED: set = set()


def _loop(x, w, ends, what: str):
    """The experts one by one (one launch each): said once per shape on a GPU, where it is slow."""
    if x.device.type == "cuda" and (x.dtype, what) not in _LOOP_WARNED:
        _LOOP_WARNED.add((x.dtype, what))
        warnings.warn(f"peft_kernels: an MoE experts product ({what}, {x.dtype}) runs expert by expert, one "
                      "launch each: torch's grouped_mm takes bf16 with 16-byte-aligned widths only", stacklevel=5)
    ends = ends.tolist()
    return [e - s for s, e in zip([0] + ends[:-1], ends)]


def _grouped_mm_takes(a, b) -> bool:
    """Whether grouped_mm computes a @ b (grouped) here: its dtype (grouped_mm_dtype), one dtype for
    both, the output's rows (b's last dim) and both operands 16-byte aligned (_aligned)."""
    size = a.element_size()
    return (grouped_mm_dtype(a) and a.dtype == b.dtype and b.shape[-1] * size % 16 == 0
            and _aligned(size, a, b))


def _product(x, w, ends):
    """x [S, k] sorted by expert, w [E, k, n] -> [S, n]."""
    if _grouped_mm_takes(x, w):
        return F.grouped_mm(x, w, offs=ends)
    sizes = _loop(x, w, ends, f"[{w.shape[1]} x {w.shape[2]}]")
    return torch.cat([p @ w[e] for e, p in enumerate(torch.split(x, sizes))])


def _weight_grad(x, grad_y, ends):
    """dW [E, k, n] = x_eᵀ dY_e per expert (zeros for an expert without rows)."""
    xt = x.t()
    if _grouped_mm_takes(xt, grad_y):
        return F.grouped_mm(xt, grad_y, offs=ends)
    sizes = _loop(x, grad_y, ends, f"weight gradient [{x.shape[1]} x {grad_y.shape[1]}]")
    return torch.stack([a.t() @ b for a, b in zip(torch.split(x, sizes), torch.split(grad_y, sizes))])


# Autocast off inside (the loop's matmuls would be cast): the product runs in x's and w's dtype, as
# grouped_mm, which autocast does not cast, does.
@torch.library.impl(_ops.LIB, "expert_mm_fwd", "CompositeExplicitAutograd")
def _expert_mm_fwd(x, w, ends):
    with torch.autocast(x.device.type, enabled=False):
        return _product(x, w, ends).contiguous()


@torch.library.impl(_ops.LIB, "expert_mm_bwd", "CompositeExplicitAutograd")
def _expert_mm_bwd(grad_y, x, w, ends, need_dx, need_dw):
    grad_y = grad_y.contiguous()
    with torch.autocast(grad_y.device.type, enabled=False):
        dx = _product(grad_y, w.transpose(-2, -1), ends).contiguous() if need_dx else grad_y.new_empty(0)
        dw = _weight_grad(x, grad_y, ends).contiguous() if need_dw else w.new_empty(0)
    return dx, dw


class _ExpertMatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, ends):
        ctx.save_for_backward(x if w.requires_grad else None, w, ends)
        return torch.ops.peft_kernels.expert_mm_fwd(x, w, ends)

    @staticmethod
    def backward(ctx, grad_y):
        x, w, ends = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx, dw = torch.ops.peft_kernels.expert_mm_bwd(grad_y, x if x is not None else w.new_empty(0, w.shape[1]),
                                                      w, ends, need_dx, need_dw)
        return (dx if need_dx else None), (dw if need_dw else None), None


def expert_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Each row of x times its expert's matrix: y[i] = x[i] @ w[e] for the rows e owns.

    Shapes: x [S, k] with its rows sorted by expert, w [E, k, n] (any strides), ends [E] int32 on
    x's device: expert e owns rows ends[e-1] .. ends[e] - 1 (ends non-decreasing, ends[-1] == S; not
    checked, which would read ends on the host) -> [S, n] in x's dtype. x and w share one float
    dtype and device. Gradients flow to x and w; dW is formed only when w requires grad (x is then
    kept for backward, else only w and ends). Computed by torch.nn.functional.grouped_mm where it
    takes the dtype (bf16 on a GPU; fp32 / bf16 / fp16 on CPU) and every width is 16-byte aligned,
    else by a loop over the experts (warned once per shape on a GPU).
    """
    _checks.check_tensor(x, "x", OP, 2)
    _checks.check_tensor(w, "w", OP, 3)
    if not isinstance(ends, torch.Tensor) or ends.dtype != torch.int32 or ends.dim() != 1:
        _checks.fail(OP, f"ends must be a 1-D int32 tensor, got {getattr(ends, 'dtype', type(ends).__name__)} "
                         f"{list(getattr(ends, 'shape', []))}")
    if x.dtype != w.dtype:
        _checks.fail(OP, f"x is {x.dtype} but w is {w.dtype}")
    if w.shape[1] != x.shape[1] or ends.shape[0] != w.shape[0]:
        _checks.fail(OP, f"x {list(x.shape)}, w {list(w.shape)} and ends {list(ends.shape)} do not fit "
                         "(x [S, k], w [E, k, n], ends [E])")
    _checks.check_same_device(OP, x=x, w=w, ends=ends)
    return _ExpertMatmulFunction.apply(x, w, ends)


__all__ = ["expert_matmul", "grouped_mm_dtype"]
