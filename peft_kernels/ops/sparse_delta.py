"""sparse_delta_linear: y = x @ (W0 + Delta)^T + bias with Delta non-zero at k positions only.

Path: ``sparse_delta_linear`` (validates, resolves the backend) -> ``_SparseDeltaFunction`` ->
cuBLAS for y and dX, custom op ``peft_kernels::sparse_sddmm`` -> backend module for dDelta (the
weight gradient at the k positions only: no [out, in] gradient is ever formed).

Forward uses a weight that holds W0 + Delta:
- merged=True (what SparseDeltaLinear does): ``weight`` already is W0 + Delta, kept so in place at
  the k positions (SparseAdamW writes them with its update; otherwise the module writes them, O(k),
  in each forward).
- merged=False: ``weight`` is W0. The k positions are set to W0 + Delta for the duration of each
  product and restored bit-exactly afterwards (O(k) work; no dense clone). ``weight`` is therefore
  written to (and restored) during the call: do not read it concurrently from another stream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ops  # noqa: F401  (defines the schemas)
from .. import backends
from ..reference import sparse as reference
from ..sparse import layout
from . import _checks

OP = "sparse_delta"
backends.register(OP, "torch", "peft_kernels.reference.sparse")
backends.register(OP, "triton", "peft_kernels.triton.sparse")


@torch.library.impl(_ops.LIB, "sparse_sddmm", "CompositeExplicitAutograd")
def _sparse_sddmm(grad_y, x, index, shape, block, backend):
    impl = backends.implementation(OP, backend)
    return impl.sddmm(grad_y, x, index, tuple(shape), tuple(block) if block else None)


class _TemporarilyMerged:
    """weight[pos] = W0[pos] + Delta inside the block, W0 being ``base`` (the k values) or, without
    it, what weight holds there; what weight held is put back after, bit for bit. ``impl``: the
    backend module doing it (one launch each way on triton; torch ops when traced)."""

    def __init__(self, impl, weight, values, index, shape, block, base=None):
        self.impl, self.weight, self.values, self.base = impl, weight, values, base
        self.where = (index, shape, block)

    def __enter__(self):
        self.saved = self.impl.merge_at(self.weight, self.values, *self.where, base=self.base, save=True)
        return self.weight

    def __exit__(self, *exc):
        self.impl.restore_at(self.weight, self.saved, *self.where)
        return False


def merge_impl(backend: str):
    """The module writing W0 + Delta into a weight for ``backend``: the torch reference under
    torch.compile (dynamo traces its torch ops; a Triton launch from here it could not)."""
    if backend == "torch" or torch.compiler.is_compiling():
        return reference
    return backends.implementation(OP, backend)


class _SparseDeltaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, values, index, bias, shape, block, merged, backend, base):
        with torch.no_grad():
            if merged:
                y = F.linear(x, weight, bias)
            else:
                with _TemporarilyMerged(merge_impl(backend), weight, values.detach(), index, shape, block, base):
                    y = F.linear(x, weight, bias)
        # The weight is frozen and written at the k positions in place (the optimizer, or the
        # temporary merge above), so it is held directly rather than version-checked.
        ctx.save_for_backward(x, values, index)
        ctx.weight, ctx.base = weight, base
        ctx.meta = (shape, block, merged, backend)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, values, index = ctx.saved_tensors
        weight = ctx.weight
        shape, block, merged, backend = ctx.meta
        _checks.first_derivative_only(OP, backend)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            if merged:
                grad_x = grad_y @ weight
            else:
                with torch.no_grad(), _TemporarilyMerged(merge_impl(backend), weight, values.detach(), index, shape,
                                                         block, ctx.base):
                    grad_x = grad_y @ weight
        if ctx.needs_input_grad[2]:
            grad_values = torch.ops.peft_kernels.sparse_sddmm(grad_y, x, index, list(shape), list(block or ()),
                                                              backend).to(values.dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = grad_y.sum(0)
        return grad_x, None, grad_values, None, grad_bias, None, None, None, None, None


def check_delta(op, weight, delta_values, delta_index, block):
    """weight [out, in] frozen float; values [k] or [k, bh, bw] float; index valid for both."""
    _checks.check_tensor(weight, "weight", op, ndim=2)
    if weight.requires_grad:
        _checks.fail(op, "weight must be frozen (requires_grad=False): the trainable part is delta_values")
    _checks.check_tensor(delta_values, "delta_values", op)
    shape = tuple(weight.shape)
    block = layout.normalize_block(op, shape, block)
    layout.check_index(op, delta_index, shape, block, device=weight.device)
    want = layout.values_shape(delta_index.numel(), block)
    if tuple(delta_values.shape) != want:
        _checks.fail(op, f"delta_values must have shape {list(want)} for {delta_index.numel()} "
                     f"{'entries' if block is None else 'blocks'}, got {list(delta_values.shape)}")
    _checks.check_same_device(op, weight=weight, delta_values=delta_values, delta_index=delta_index)
    return shape, block


def sparse_delta_linear(x: torch.Tensor, weight: torch.Tensor, delta_values: torch.Tensor,
                        delta_index: torch.Tensor, bias: torch.Tensor | None = None, *, shape_or_block=None,
                        merged: bool = False, backend: str = "auto",
                        base_values: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (W0 + Delta)^T + bias``, Delta given compactly; gradients for x, delta_values, bias.

    Shapes: x [..., in]; weight [out, in] (frozen; W0, or W0 + Delta when ``merged``);
    shape_or_block None or weight.shape (unstructured: delta_index int32 [k], sorted flat positions
    row * in + col, delta_values [k]) or (bh, bw) (blocks: delta_index [nb], sorted positions in the
    (out / bh) x (in / bw) block grid, delta_values [nb, bh, bw]; a block as large as the weight is
    told from weight.shape by the values' [nb, bh, bw] shape); bias [out] or None.
    Returns [..., out] in x's dtype. dDelta is computed at the k positions only (no [out, in]
    gradient). backend: "auto" (triton on CUDA, torch on CPU), "triton", "torch".

    Not ``merged``: W0 + Delta is written at the k positions around each product (forward and
    backward) and what weight held there put back. ``base_values`` [k] ([k * bh * bw] with blocks;
    SparseDeltaLinear's buffer), only then: W0 at the positions, for a weight that may hold
    something else there (e.g. a merged delta, in a copy FSDP gathered).
    """
    autocast = _checks.autocast_dtype(x)
    if autocast is not None:  # F.linear's rule (see _checks.autocast_dtype); the values stay as they are
        x, weight, bias = _checks.to_autocast(autocast, x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            return sparse_delta_linear(x, weight, delta_values, delta_index, bias, shape_or_block=shape_or_block,
                                       merged=merged, backend=backend, base_values=base_values)
    block = shape_or_block
    one_block_each = isinstance(delta_values, torch.Tensor) and delta_values.dim() == 3
    if block is not None and isinstance(weight, torch.Tensor) and tuple(block) == tuple(weight.shape) \
            and not one_block_each:
        block = None  # weight.shape means unstructured, unless the values are [nb, bh, bw] blocks
    shape, block = check_delta(OP, weight, delta_values, delta_index, block)
    _checks.check_input(OP, x, shape[1], shape[0], bias)
    _checks.check_same_device(OP, x=x, weight=weight, bias=bias)
    if weight.dtype != x.dtype:
        _checks.fail(OP, f"weight is {weight.dtype} but x is {x.dtype}")
    backend = backends.resolve(OP, backend, x.device)
    if backend == "triton":
        _checks.check_triton(OP, x)
    if base_values is not None:
        if merged:
            _checks.fail(OP, "base_values is for merged=False (a merged weight holds W0 + delta already)")
        _checks.check_tensor(base_values, "base_values", OP)
        if base_values.numel() != delta_values.numel() or base_values.device != weight.device:
            _checks.fail(OP, f"base_values must hold W0 at the {delta_values.numel()} delta positions on "
                         f"{weight.device}, got {list(base_values.shape)} on {base_values.device}")
        base_values = base_values.detach().reshape(-1)
    x2 = x.reshape(-1, shape[1])
    # the kernels read the index as a flat array: a strided view (e.g. every other entry of a
    # larger index) is copied, k entries
    y = _SparseDeltaFunction.apply(x2, weight, delta_values, delta_index.contiguous(), bias, shape, block,
                                   bool(merged), backend, base_values)
    return _checks.unflatten_rows(y, x)
