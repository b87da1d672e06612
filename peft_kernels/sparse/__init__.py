"""Sparse fine-tuning: train k chosen entries of frozen weights with compact gradients and state.

    nn.SparseDeltaLinear.from_linear(linear, density | num_params, mask, block, seed)
    sparse_delta_linear(x, weight, delta_values, delta_index, bias, *, shape_or_block, merged)
    sparse.SparseAdamW(model_or_params, lr, betas, eps, weight_decay); SparseDeltaLinear.regrow_
    sparse.mask_gradients_(model, masks)  (peft_kernels.mask_gradients_ too)
    sparse.save_sparse_delta(model, path), sparse.load_sparse_delta(model, path)
"""
from . import layout
from .io import load_sparse_delta, save_sparse_delta
from .masking import MaskReport, mask_gradients_
from .optim import SparseAdamW

__all__ = ["SparseAdamW", "mask_gradients_", "MaskReport", "save_sparse_delta", "load_sparse_delta", "layout"]
