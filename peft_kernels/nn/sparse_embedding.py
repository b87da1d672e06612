"""SparseDeltaEmbedding: a frozen nn.Embedding plus a trainable delta on k chosen table entries."""
from __future__ import annotations

import torch
from torch import nn

from .. import backends
from ..ops._checks import check_materialized, plain_tensor
from ..ops.sparse_delta import w0_plus_delta
from ..ops.sparse_embedding import sparse_delta_embedding
from ..sparse import layout
from .branch import has_module_hooks
from .sparse import DeltaCounts


class SparseDeltaEmbedding(DeltaCounts, nn.Module):
    """y = (W0 + Delta)[ids], Delta non-zero at k positions of the [V, d] table, stored compactly —
    e.g. the rows of tokens added to a vocabulary, or a sparse fine-tuning mask over the table.

    State: ``weight`` [V, d] (frozen W0, shared with the embedding it was built from and never
    written), the buffer ``delta_index`` (int32 — int64 for tables of 2^31 entries or more —
    sorted flat positions row * d + col) and the Parameter ``delta_values`` [k] (fp32 by default;
    starts at zero, so a fresh module equals the embedding). Gradients reach delta_values only, at
    the k positions (peft_kernels.sparse_delta_embedding): no [V, d] gradient. ``padding_idx`` as
    nn.Embedding's (that row gets no gradient). Train with peft_kernels.sparse.SparseAdamW or any
    optimizer: nothing is merged into the table, so no write has to follow an update.
    """

    def __init__(self, weight: torch.Tensor, delta_index: torch.Tensor, padding_idx: int | None = None,
                 values_dtype: torch.dtype = torch.float32, backend: str = "auto"):
        super().__init__()
        check_materialized(weight, "weight", "SparseDeltaEmbedding")
        if weight.dim() != 2:
            raise ValueError(f"SparseDeltaEmbedding: weight must be [num_embeddings, embedding_dim], got "
                             f"{list(weight.shape)}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.backend = backends.check_name(backend, "SparseDeltaEmbedding")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        index = delta_index.to(device=weight.device, dtype=layout.index_dtype(weight.numel()))
        layout.check_index("SparseDeltaEmbedding", index, tuple(weight.shape), None)
        self.register_buffer("delta_index", index)
        self.delta_values = nn.Parameter(torch.zeros(index.numel(), dtype=values_dtype, device=weight.device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, density: float | None = 0.01, num_params: int | None = None,
                       mask="random", seed: int = 0, scores: torch.Tensor | None = None,
                       values_dtype: torch.dtype = torch.float32, backend: str = "auto") -> "SparseDeltaEmbedding":
        """Wrap ``embedding`` (its weight is shared, frozen, not copied). mask, density, num_params,
        seed, scores: as SparseDeltaLinear.from_linear's, over the [V, d] table (a bool mask
        [V, d]: e.g. ``mask[new_token_ids] = True`` trains those tokens' rows). nn.Embedding's
        max_norm (which renormalizes the table in place) and scale_grad_by_freq are refused."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"SparseDeltaEmbedding.from_embedding expects nn.Embedding, got {type(embedding).__name__}")
        why = unsupported_embedding(embedding)
        if why is not None:
            raise ValueError(f"SparseDeltaEmbedding.from_embedding: {why}")
        index = layout.build_index("SparseDeltaEmbedding.from_embedding", embedding.weight, density=density,
                                   num_params=num_params, mask=mask, seed=seed, scores=scores)
        return cls(embedding.weight, index, padding_idx=embedding.padding_idx, values_dtype=values_dtype,
                   backend=backend)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return sparse_delta_embedding(ids, self.weight, self.delta_values, self.delta_index,
                                      padding_idx=self.padding_idx, backend=self.backend)

    @torch.no_grad()
    def set_index_(self, new_index: torch.Tensor, new_values: torch.Tensor | None = None):
        """Move the delta to ``new_index`` (any size; sorted flat positions), values ``new_values``
        (default zero). The table is never written, so nothing is restored."""
        new_index = new_index.to(device=self.weight.device, dtype=layout.index_dtype(self.weight.numel()))
        layout.check_index("SparseDeltaEmbedding", new_index, tuple(self.weight.shape), None)
        self.delta_index = new_index
        values = torch.zeros(new_index.numel(), dtype=self.delta_values.dtype, device=self.weight.device)
        if new_values is not None:
            values.copy_(new_values.reshape(-1))
        self.delta_values.data = values

    @torch.no_grad()
    def merge(self) -> torch.Tensor:
        """The dense [V, d] table W0 + Delta (a new tensor) for export."""
        w = self.weight.detach().clone()
        pos = self.delta_index.long()
        w.view(-1)[pos] = w0_plus_delta(w.view(-1)[pos], self.delta_values.detach(), w.dtype)
        return w

    def unloaded(self) -> nn.Embedding:
        """A plain nn.Embedding holding W0 + Delta (frozen), with this layer's padding_idx; what
        merge_and_unload puts in its place."""
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                 device="meta")
        embedding.weight = nn.Parameter(self.merge(), requires_grad=False)
        return embedding

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"trainable={self.num_trainable} ({100 * self.density:.3g}%)")


def unsupported_embedding(embedding: nn.Embedding) -> str | None:
    """Why a SparseDeltaEmbedding, a plain table lookup, would not compute what ``embedding`` does
    (None if it would)."""
    if type(embedding).forward is not nn.Embedding.forward:
        return f"{type(embedding).__name__} has a forward of its own (the layer computes a plain table lookup)"
    if has_module_hooks(embedding) or "forward" in vars(embedding):
        return "hooks are registered on it or its forward is replaced on the instance: replacing it would drop them"
    if not plain_tensor(embedding.weight):
        return f"its weight is a {type(embedding.weight).__name__} (a tensor subclass), which the kernels cannot read"
    options = [o for o in ("max_norm", "scale_grad_by_freq") if getattr(embedding, o)]
    if options:  # max_norm renormalizes the table in place; scale_grad_by_freq rescales the gradient
        return f"nn.Embedding's {options} not supported (the layer computes a plain table lookup)"
    return None

