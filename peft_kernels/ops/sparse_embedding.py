"""sparse_delta_embedding: the rows of (W0 + Delta) an id tensor selects, Delta non-zero at k
positions of the [V, d] table only.

Path: ``sparse_delta_embedding`` (validates, resolves the backend) -> ``_SparseEmbeddingFunction``
-> custom ops ``peft_kernels::sparse_embedding_fwd`` / ``sparse_embedding_bwd`` -> backend module
(reference/sparse_embedding.py, triton/sparse_embedding.py). The table stays W0 (nothing is merged
into it, so a frozen embedding can be shared or sharded as it is); the forward adds each token's
row entries to its output row, and the backward sums dY at the k positions only: no [V, d]
gradient (nn.Embedding's backward builds one, dense unless sparse=True).
"""
from __future__ import annotations

import torch

from .. import _ops  # noqa: F401  (defines the schemas)
from .. import backends
from ..sparse import layout
from . import _checks

OP = "sparse_embedding"
backends.register(OP, "torch", "peft_kernels.reference.sparse_embedding")
backends.register(OP, "triton", "peft_kernels.triton.sparse_embedding")


@torch.library.impl(_ops.LIB, "sparse_embedding_fwd", "CompositeExplicitAutograd")
def _sparse_embedding_fwd(ids, weight, values, index, backend):
    return backends.implementation(OP, backend).forward(ids, weight, values, index)


@torch.library.impl(_ops.LIB, "sparse_embedding_bwd", "CompositeExplicitAutograd")
def _sparse_embedding_bwd(grad_y, ids, index, num_rows, padding_idx, backend):
    return backends.implementation(OP, backend).backward(grad_y, ids, index, num_rows, padding_idx)


class _SparseEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, values, index, padding_idx, backend):
        ctx.save_for_backward(ids, index)
        ctx.meta = (weight.shape[0], padding_idx, backend)
        ctx.values_dtype = values.dtype
        return torch.ops.peft_kernels.sparse_embedding_fwd(ids, weight, values, index, backend)

    @staticmethod
    def backward(ctx, grad_y):
        ids, index = ctx.saved_tensors
        num_rows, padding_idx, backend = ctx.meta
        _checks.first_derivative_only(OP, backend)
        grad_values = None
        if ctx.needs_input_grad[2]:
            grad_values = torch.ops.peft_kernels.sparse_embedding_bwd(grad_y, ids, index, num_rows, padding_idx,
                                                                       backend).to(ctx.values_dtype)
        return None, None, grad_values, None, None, None


def sparse_delta_embedding(ids: torch.Tensor, weight: torch.Tensor, delta_values: torch.Tensor,
                           delta_index: torch.Tensor, *, padding_idx: int | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """``F.embedding(ids, W0 + Delta)``, Delta given compactly; the gradient goes to delta_values only.

    Shapes: ids int [...] (values in [0, V)); weight [V, d] (frozen W0, float); delta_index int32 /
    int64 [k], sorted flat positions row * d + col; delta_values [k] (any float dtype; added to W0
    in fp32, fp64 for fp64, and rounded once to weight's dtype). Returns [..., d] in weight's dtype.
    padding_idx: tokens with that id give no gradient (nn.Embedding's rule); their rows are read as
    W0 + Delta all the same. backend: "auto" (triton on CUDA, torch on CPU), "triton", "torch".
    d delta_values costs O(M · k / V) (token, entry) pairs: no [V, d] buffer.
    """
    _checks.check_tensor(weight, "weight", OP, ndim=2)
    if weight.requires_grad:
        _checks.fail(OP, "weight must be frozen (requires_grad=False): the trainable part is delta_values")
    _checks.check_tensor(delta_values, "delta_values", OP)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"peft_kernels.{OP}: ids must be an int32/int64 tensor, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    shape = tuple(weight.shape)
    layout.check_index(OP, delta_index, shape, None, device=weight.device)
    if tuple(delta_values.shape) != (delta_index.numel(),):
        _checks.fail(OP, f"delta_values must have shape [{delta_index.numel()}] for {delta_index.numel()} entries, "
                     f"got {list(delta_values.shape)}")
    _checks.check_same_device(OP, ids=ids, weight=weight, delta_values=delta_values, delta_index=delta_index)
    if padding_idx is not None and not -shape[0] <= int(padding_idx) < shape[0]:
        _checks.fail(OP, f"padding_idx must be in [-{shape[0]}, {shape[0]}), got {padding_idx}")
    padding = -1 if padding_idx is None else int(padding_idx) % shape[0]
    backend = backends.resolve(OP, backend, weight.device)
    if backend == "triton":
        _checks.check_triton(OP, weight)
    flat = ids.reshape(-1).long()
    # the kernels read the index as a flat array: a strided view is copied (k entries)
    y = _SparseEmbeddingFunction.apply(flat, weight, delta_values, delta_index.contiguous(), padding, backend)
    return torch.ops.aten._unsafe_view(y, (*ids.shape, shape[1]))
