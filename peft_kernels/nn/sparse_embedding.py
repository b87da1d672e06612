"""SparseDeltaEmbedding: a frozen nn.Embedding plus a trainable delta on k chosen table entries."""
from __future__ import annotations

import torch
from torch import nn

from .. import backends
from ..ops._checks import check_materialized, plain_tensor
from ..ops.sparse_delta import sparse_delta_linear
from ..reference import sparse as ref_sparse
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
        ref_sparse.merge_at(w, self.delta_values.detach(), self.delta_index, tuple(w.shape), None)
        return w

    def unloaded(self) -> nn.Embedding:
        """A plain nn.Embedding holding W0 + Delta (frozen), with this layer's padding_idx; what
        merge_and_unload puts in its place."""
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                 device="meta")
        embedding.weight = nn.Parameter(self.merge(), requires_grad=False)
        return embedding

    def token_rows(self) -> torch.Tensor | None:
        """The sorted rows this layer trains whole (trainable tokens), or None if its entries are
        not whole rows."""
        dim = self.embedding_dim
        index = self.delta_index.long()
        if index.numel() == 0 or index.numel() % dim:
            return None
        rows = index[::dim] // dim
        return rows if torch.equal(layout.row_positions(rows, dim).long(), index) else None

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"trainable={self.num_trainable} ({100 * self.density:.3g}%)")


class TiedRowsHead(nn.Module):
    """An output head whose weight is a SparseDeltaEmbedding's table (tied embeddings, e.g.
    Llama-3.2-1B, Gemma): y = x (W0 + Delta)^T + b with the embedding's own delta, so rows trained
    for new tokens are the head's rows too (HF PEFT's trainable tokens on a tied model do the same).
    The delta must be whole rows: the product runs through sparse_delta_linear with (1, d) blocks,
    W0 + Delta written into the shared table around each product and restored (merged=False), and
    the rows' gradient (the SDDMM at n rows, no [V, d] gradient) adds to the embedding's. Holds the
    shared weight, the head's bias and the embedding — not as a submodule: the model holds it.
    Shapes: x [..., d] -> [..., V]."""

    def __init__(self, head: nn.Linear, embedding: SparseDeltaEmbedding, backend: str = "auto"):
        super().__init__()
        if head.weight is not embedding.weight:
            raise ValueError("TiedRowsHead: the head's weight is not the embedding's table")
        if embedding.token_rows() is None:
            raise ValueError("TiedRowsHead: the embedding's delta is not whole rows (trainable tokens)")
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight = head.weight
        self.bias = head.bias
        self.backend = backends.check_name(backend, "TiedRowsHead")
        object.__setattr__(self, "embedding", embedding)  # not registered: its parameters are the embedding's
        self._rows_checked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding
        dim = embedding.embedding_dim
        key = (id(embedding.delta_index), embedding.delta_index._version)
        if not torch.compiler.is_compiling() and self._rows_checked != key:  # set_index_ may have moved it
            if embedding.token_rows() is None:
                raise ValueError("TiedRowsHead: the embedding's delta is no longer whole rows (set_index_?)")
            self._rows_checked = key
        rows = embedding.delta_index.reshape(-1, dim)[:, 0] // dim  # whole rows: every dim-th position
        return sparse_delta_linear(x, self.weight, embedding.delta_values.reshape(-1, 1, dim), rows.to(torch.int32),
                                   self.bias, shape_or_block=(1, dim), backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "tied to the embedding's table and trained rows")


def unsupported_embedding(embedding: nn.Embedding) -> str | None:
    """Why a SparseDeltaEmbedding, a plain table lookup, would not compute what ``embedding`` does
    (None if it would)."""
    if type(embedding).forward is not nn.Embedding.forward:
        return f"{type(embedding).__name__} has a forward of its own (the layer computes a plain table lookup)"
    if has_module_hooks(embedding) or "forward" in vars(embedding):
        return "hooks are registered on it or its forward is replaced on the instance: replacing it would drop them"
    return unsupported_lookup(embedding)


def unsupported_lookup(embedding: nn.Embedding) -> str | None:
    """Why the sparse ops' plain lookup of ``embedding.weight`` would not be F.embedding with this
    embedding's options (None if it would): max_norm (set, even to 0, it renormalizes the table in
    place), scale_grad_by_freq (rescales the gradient), or a weight the kernels cannot read."""
    if not plain_tensor(embedding.weight):
        return f"its weight is a {type(embedding.weight).__name__} (a tensor subclass), which the kernels cannot read"
    options = [o for o, on in (("max_norm", embedding.max_norm is not None),
                               ("scale_grad_by_freq", embedding.scale_grad_by_freq)) if on]
    if options:
        return f"nn.Embedding's {options} not supported (the layer computes a plain table lookup)"
    return None

