"""peft_kernels: fused kernels for parameter-efficient fine-tuning.

Public API (importing never needs a GPU, triton or the compiled extension):
    lora_linear(x, weight, lora_A, lora_B, bias=None, *, scaling, dropout_p, training, seed, backend)
    lora_delta(x, lora_A, lora_B, *, scaling, ...): the LoRA branch alone, beside a base computed elsewhere
    nn.LoRALinear, apply_lora(model, target_modules, r, alpha, dropout)
    info() -> dict of versions, devices and backend availability
    patch_peft_model(peft_model) -> PatchReport, unpatch_peft_model(peft_model)
    save_adapter(model, dir), load_adapter(model, dir): HF PEFT's adapter format
    merge_and_unload(model): every adapter / sparse layer back to a plain nn.Linear, merged
    quant_linear(x, qweight, bias), qlora_linear(x, qweight, lora_A, lora_B, bias, *, ...)
    quant.NF4Weight / FP4Weight (bitsandbytes-compatible 4-bit), quant.Int8Weight / Int4Weight
    sparse_delta_linear(x, weight, delta_values, delta_index, bias, *, shape_or_block, merged)
    nn.SparseDeltaLinear, apply_sparse(model, target_modules, density), sparse.SparseAdamW,
    mask_gradients_(model, masks)
    sparse_delta_embedding(ids, weight, delta_values, delta_index, *, padding_idx), nn.SparseDeltaEmbedding
"""
from . import backends, nn, quant, sparse
from .adapters import load_adapter, save_adapter
from .apply import apply_lora, apply_sparse, merge_and_unload
from .info import info
from .ops.dora import dora_linear
from .ops.lora import lora_linear
from .ops.lora_delta import lora_delta
from .ops.qlora import qlora_linear
from .ops.quant_linear import quant_linear
from .ops.sparse_delta import sparse_delta_linear
from .ops.sparse_embedding import sparse_delta_embedding
from .sparse import mask_gradients_


def patch_peft_model(model):
    """Route an HF PEFT model's layers through peft_kernels' ops in place — LoRA / DoRA / QLoRA
    Linear, AdaLoRA, VeRA, LoHa, LoKr, DeLoRA, VB-LoRA, UniLoRA, SHiRA, trainable tokens (the list:
    peft_kernels.integrations.peft.COMPUTED_LAYERS, or ``peft-kernels info``); returns a PatchReport
    of what was patched and what was left to PEFT, with why."""
    from .integrations.peft import patch_peft_model as patch

    return patch(model)


def unpatch_peft_model(model):
    """Undo patch_peft_model; returns the names of the layers restored."""
    from .integrations.peft import unpatch_peft_model as unpatch

    return unpatch(model)

__version__ = "0.1.0"
__all__ = ["patch_peft_model", "unpatch_peft_model", "save_adapter", "load_adapter", "lora_linear", "lora_delta", "dora_linear", "qlora_linear", "quant_linear", "sparse_delta_linear", "sparse_delta_embedding", "mask_gradients_", "apply_lora", "apply_sparse", "merge_and_unload", "info", "nn", "quant", "sparse", "backends", "__version__"]
