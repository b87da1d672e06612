"""Save and load sparse deltas (positions + values) with safetensors."""
from __future__ import annotations

import json

from torch import nn

from ..nn._adapter import features, is_conv1d
from ..ops._checks import check_materialized


def save_sparse_delta(model: nn.Module, path: str):
    """Write every SparseDeltaLinear's and SparseDeltaEmbedding's ``<name>.delta_index`` (int32, or
    int64 past 2^31 positions) and ``<name>.delta_values`` to one .safetensors file; shapes, blocks
    and kinds go to its metadata."""
    from safetensors.torch import save_file

    from ..nn.sparse import SparseDeltaLinear
    from ..nn.sparse_embedding import SparseDeltaEmbedding

    tensors, meta = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, (SparseDeltaLinear, SparseDeltaEmbedding)):
            tensors[f"{name}.delta_index"] = mod.delta_index.detach().cpu().contiguous()
            tensors[f"{name}.delta_values"] = mod.delta_values.detach().cpu().contiguous()
            block = getattr(mod, "block", None)
            meta[name] = {"shape": list(mod.weight.shape), "block": list(block) if block else None}
            if isinstance(mod, SparseDeltaEmbedding):
                meta[name]["kind"] = "embedding"
    if not tensors:
        raise ValueError("save_sparse_delta: the model has no SparseDeltaLinear or SparseDeltaEmbedding")
    save_file(tensors, path, metadata={"format": "peft_kernels.sparse_delta", "modules": json.dumps(meta)})


def load_sparse_delta(model: nn.Module, path: str, backend: str = "auto") -> list[str]:
    """Apply a saved delta: an nn.Linear (or transformers Conv1D) named in the file becomes a
    SparseDeltaLinear, an nn.Embedding a SparseDeltaEmbedding; an existing one moves to the saved
    positions (W0 restored at its old ones). Returns the names."""
    from safetensors import safe_open

    from ..nn.sparse import SparseDeltaLinear
    from ..nn.sparse_embedding import SparseDeltaEmbedding, unsupported_embedding
    from .masking import is_tied, parameter_names, set_submodule

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != "peft_kernels.sparse_delta":
            raise ValueError(f"load_sparse_delta: {path} is not a file save_sparse_delta wrote "
                             f"(metadata format {metadata.get('format')!r})")
        meta = json.loads(metadata.get("modules", "{}"))
        # Check every entry before changing anything: an error leaves the model as it was.
        tied = parameter_names(model)
        entries = []
        for name, info in meta.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"load_sparse_delta: the model has no module {name!r}") from None
            if info.get("kind") == "embedding":
                if not isinstance(mod, (nn.Embedding, SparseDeltaEmbedding)):
                    raise TypeError(f"load_sparse_delta: {name} is a {type(mod).__name__}, not an nn.Embedding")
                if isinstance(mod, nn.Embedding) and is_tied(tied, mod.weight):
                    raise ValueError(f"load_sparse_delta: {name}.weight is shared with other modules (a tied head): "
                                     "a delta on it would reach them too; untie the weights first")
                why = unsupported_embedding(mod) if isinstance(mod, nn.Embedding) else None
                if why is not None:
                    raise ValueError(f"load_sparse_delta: {name}: {why}")
            elif not isinstance(mod, (nn.Linear, SparseDeltaLinear)) and not is_conv1d(mod):
                raise TypeError(f"load_sparse_delta: {name} is a {type(mod).__name__}, not a Linear")
            check_materialized(mod.weight, f"{name}.weight", "load_sparse_delta")
            shape = features(mod) if isinstance(mod, nn.Linear) or is_conv1d(mod) else tuple(mod.weight.shape)
            if shape != tuple(info["shape"]):
                raise ValueError(f"load_sparse_delta: {name} has an [out, in] weight {list(shape)}, the file "
                                 f"{info['shape']}")
            block = tuple(info["block"]) if info["block"] else None
            if isinstance(mod, SparseDeltaLinear) and mod.block != block:
                raise ValueError(f"load_sparse_delta: {name} uses block {mod.block}, the file {block}")
            entries.append((name, mod, block, f.get_tensor(f"{name}.delta_index"), f.get_tensor(f"{name}.delta_values")))
    loaded = []
    for name, mod, block, index, values in entries:
        if isinstance(mod, nn.Embedding):
            mod = SparseDeltaEmbedding(mod.weight, index, padding_idx=mod.padding_idx, values_dtype=values.dtype,
                                       backend=backend)
            set_submodule(model, name, mod)
        elif not isinstance(mod, (SparseDeltaLinear, SparseDeltaEmbedding)):
            # a weight tied to another module's is merged around each product
            sd = SparseDeltaLinear.over(mod, index.to(mod.weight.device), block=block,
                                        values_dtype=values.dtype, backend=backend,
                                        merge_in_place=not is_tied(tied, mod.weight))
            set_submodule(model, name, sd)
            mod = sd
        mod.set_index_(index, values.to(mod.delta_values.dtype))
        loaded.append(name)
    return loaded
