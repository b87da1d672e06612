"""SparseDeltaLinear: a frozen nn.Linear plus a trainable delta on k chosen weight entries."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import backends
from ..ops._checks import check_materialized, is_dtensor
from ..ops.sparse_delta import check_delta, merge_impl, sparse_delta_linear
from ..reference import sparse as ref_sparse
from ..sparse import layout
from ._adapter import conv1d_holding, is_conv1d, linear_holding


def _replica_group(group):
    """The process group whose ranks hold replicas of a layer: ``group`` as given, None for False,
    and for None the default group when torch.distributed runs with more than one rank."""
    if group is False:
        return None
    if group is not None:
        return group
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


class DeltaCounts:
    """How much of a sparse-delta layer's weight trains (delta_values over weight)."""

    @property
    def num_trainable(self) -> int:
        return self.delta_values.numel()

    @property
    def density(self) -> float:
        return self.num_trainable / self.weight.numel()


class SparseDeltaLinear(DeltaCounts, nn.Module):
    """y = x (W0 + Delta)^T + b, Delta non-zero at k positions, stored compactly.

    State: ``weight`` [out, in] (frozen; holds W0 + Delta, kept in place at the k positions —
    while it is the Parameter this layer adopted: see ``keeps_merged``),
    ``bias`` [out] | None (frozen), buffers ``delta_index`` (int32, sorted flat positions, or
    block positions when ``block`` = (bh, bw)) and ``base_values`` (W0 at the k positions, in the
    weight's dtype, so W0 is recoverable exactly), and the Parameter ``delta_values`` [k] or
    [nb, bh, bw] (fp32 by default; starts at zero, so a fresh module equals the Linear).
    Gradients reach delta_values only at the k positions (peft_kernels.sparse_delta_linear).
    ``merge_in_place=False`` leaves ``weight`` at W0 and merges around each product instead: for a
    weight another module shares (a head tied to the input embedding), which a merged write would
    change too. W0 is then what the weight holds now (the other module may train it), and
    ``base_values`` is unused. apply_sparse, load_adapter and load_sparse_delta choose it for tied
    weights.
    ``fan_in_fan_out``: built over a transformers Conv1D (GPT-2's layers, weight stored [in, out]),
    whose weight it holds transposed, [out, in], as nn.Linear does (a copy: the Conv1D is released);
    merge_and_unload gives a Conv1D back.
    """

    merge_in_place = True  # also for a layer pickled before the option existed
    fan_in_fan_out = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, delta_index: torch.Tensor, block=None,
                 values_dtype: torch.dtype = torch.float32, backend: str = "auto", merge_in_place: bool = True):
        super().__init__()
        shape = tuple(weight.shape)
        check_materialized(weight, "weight", "SparseDeltaLinear")  # W0 at the positions is kept
        self.block = layout.normalize_block("SparseDeltaLinear", shape, block)
        self.in_features, self.out_features = shape[1], shape[0]
        if layout.grid_size(shape, self.block) >= layout.INT32_POSITIONS:
            raise ValueError(f"SparseDeltaLinear: a {list(shape)} weight has 2^31 or more positions, which its int32 "
                             "index cannot address (use block= to index blocks)")
        self.backend = backends.check_name(backend, "SparseDeltaLinear")
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.weight.requires_grad_(False)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias.requires_grad_(False) if bias is not None else None
        index = delta_index.to(device=weight.device, dtype=torch.int32)
        k = index.numel()
        self.register_buffer("delta_index", index)
        self.delta_values = nn.Parameter(torch.zeros(layout.values_shape(k, self.block), dtype=values_dtype,
                                                     device=weight.device))
        check_delta("SparseDeltaLinear", self.weight, self.delta_values, self.delta_index, self.block)
        with torch.no_grad():
            self.register_buffer("base_values", self.weight.view(-1)[self._positions()].clone())
        self.merge_in_place = bool(merge_in_place)
        self._adopted = weakref.ref(self.weight)
        self._synced = None  # see forward: only SparseAdamW's mark_synced lets a forward skip the write
        # track_candidates_'s state: buffers (not saved), so that they follow .to(device)
        self.register_buffer("candidate_index", None, persistent=False)
        self.register_buffer("candidate_scores", None, persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, density: float | None = 0.01, num_params: int | None = None,
                    mask="random", block=None, seed: int = 0, scores: torch.Tensor | None = None,
                    values_dtype: torch.dtype = torch.float32, backend: str = "auto",
                    merge_in_place: bool = True) -> "SparseDeltaLinear":
        """Wrap ``linear`` (its weight and bias are shared, frozen, not copied) — or a transformers
        Conv1D (GPT-2), whose [in, out] weight is copied transposed (``fan_in_fan_out``; its bias is
        shared).

        mask: "random" (uniform, ``seed``), "magnitude" (largest |W0|), "gradient" (largest
        ``scores``, e.g. accumulated |dW| of a few steps), a bool tensor [out, in] (or the
        (out/bh) x (in/bw) block grid), or a callable(weight) -> bool mask | score tensor; masks,
        scores and the callable's weight are [out, in] for a Conv1D too (its stored weight's transpose).
        density (fraction of positions) or num_params (how many); with ``block`` = (bh, bw) both
        count blocks, scored by the block's L2 norm.
        """
        weight = cls._linear_weight(linear, "SparseDeltaLinear.from_linear")
        index = layout.build_index("SparseDeltaLinear.from_linear", weight, density=density,
                                   num_params=num_params, mask=mask, block=block, seed=seed, scores=scores)
        return cls.over(linear, index, block=block, values_dtype=values_dtype, backend=backend,
                        merge_in_place=merge_in_place, weight=weight)

    @staticmethod
    def _linear_weight(linear: nn.Module, op: str) -> torch.Tensor:
        """The [out, in] weight of an nn.Linear (itself) or a transformers Conv1D (a transposed copy)."""
        if is_conv1d(linear):
            check_materialized(linear.weight, "weight", op)
            return nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{op} expects nn.Linear or transformers' Conv1D, got {type(linear).__name__}")
        return linear.weight

    @classmethod
    def over(cls, linear: nn.Module, delta_index: torch.Tensor, weight: torch.Tensor | None = None,
             **kwargs) -> "SparseDeltaLinear":
        """The layer over ``linear`` (an nn.Linear, or a transformers Conv1D: ``fan_in_fan_out``) at
        the positions ``delta_index`` ([out, in] flat or block positions); kwargs as the constructor's."""
        weight = cls._linear_weight(linear, "SparseDeltaLinear") if weight is None else weight
        layer = cls(weight, linear.bias, delta_index, **kwargs)
        layer.fan_in_fan_out = is_conv1d(linear)
        return layer

    # ------------------------------------------------------------------ merged-weight upkeep
    def _positions(self) -> torch.Tensor:
        return layout.element_positions(self.delta_index, self.weight.shape, self.block)

    def __getstate__(self):  # deepcopy / pickle: a weakref does not copy; the copy adopts its own weight
        state = self.__dict__.copy()
        state.pop("_adopted", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._adopted = weakref.ref(self.weight)

    @property
    def keeps_merged(self) -> bool:
        """Whether ``weight`` is still the Parameter this layer adopted, so that W0 + Delta written
        into it stays there. FSDP's fully_shard (and ZeRO-3-style wrappers, or
        load_state_dict(assign=True)) put other tensors in its place — shards, or a gathered copy
        that is freed after forward and gathered again from the unwritten shard for backward. Then
        every product merges temporarily instead (sparse_delta_linear with merged=False: W0 + Delta
        written at the k positions around each of the forward and backward products, O(k) each).
        Always False with ``merge_in_place=False``."""
        return self.merge_in_place and self._adopted() is self.weight

    def _version_key(self):
        v = self.delta_values
        return (id(v), v.data_ptr(), v._version, self.delta_index._version)

    def mark_synced(self):
        """Called by SparseAdamW after it wrote W0 + Delta into the merged weight itself: forwards
        skip the write until delta_values changes (a new version, tensor or address)."""
        self._synced = self._version_key()

    @torch.no_grad()
    def _write_merged(self):
        """weight[pos] = W0 + Delta (every forward under optimizers other than SparseAdamW): one launch
        on the triton backend, where the gather-add-cast-scatter of torch ops took five."""
        impl = merge_impl(backends.resolve("sparse_delta", self.backend, self.weight.device))
        impl.merge_at(self.weight, self.delta_values.detach(), self.delta_index, tuple(self.weight.shape), self.block,
                      base=self.base_values)

    def sync_(self):
        """weight[pos] = W0 + delta now, on a layer that keeps its weight merged (every forward does
        it anyway unless SparseAdamW just did); nothing otherwise."""
        if self.keeps_merged:
            self._write_merged()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = True
        if torch.compiler.is_compiling() or not self.keeps_merged:
            # W0 + delta (from base_values) written around each product, O(k) each: for a weight held
            # by FSDP & co. (keeps_merged), and when traced, where the bookkeeping below (data
            # pointers, ids, weak references) cannot be, and where a weight FSDP gathers would not
            # keep a write until backward either.
            merged = False
        elif self._synced != self._version_key():
            # W0 + delta written at the k positions, O(k), unless SparseAdamW wrote it with its last
            # update. The version counter alone cannot tell: torch.optim.AdamW(fused=True) (HF
            # Trainer's adamw_torch_fused), bitsandbytes' optimizers and writes through .data change
            # delta_values without bumping it, and the forward then kept the stale W0 + delta.
            self._write_merged()
        y = sparse_delta_linear(x, self.weight, self.delta_values, self.delta_index, self.bias,
                                shape_or_block=self.block, merged=merged, backend=self.backend,
                                base_values=None if merged else self._w0())
        if getattr(self, "candidate_index", None) is not None and self.training and y.requires_grad:
            x2 = x.detach().reshape(-1, self.in_features)  # already held by autograd for dDelta
            y.register_hook(lambda gy: self._accumulate_candidates(gy, x2))
        return y

    # ------------------------------------------------------------------ regrowth candidates
    @torch.no_grad()
    def track_candidates_(self, num: int | None = None, seed: int = 0):
        """Start accumulating the gradient magnitude |dL/dW| (block L2 norm with blocks) at
        ``num`` (default: k) random positions outside the mask, with the same SDDMM kernels as
        dDelta — no dense gradient. ``regrow_(fraction)`` without ``scores`` then regrows among
        these candidates (SpIEL's candidate set), and draws new ones."""
        shape = tuple(self.weight.shape)
        grid = layout.grid_size(shape, self.block)
        free = grid - self.delta_index.numel()
        num = min(self.delta_index.numel() if num is None else int(num), free)
        if num < 1:
            raise ValueError("track_candidates_: no position outside the mask to track")
        g = torch.Generator().manual_seed(seed)
        pool = torch.randperm(grid, generator=g)
        pool = pool[~torch.isin(pool, self.delta_index.long().cpu())][:num]
        self.candidate_index = torch.sort(pool).values.to(torch.int32).to(self.weight.device)
        self.candidate_scores = torch.zeros(num, dtype=torch.float32, device=self.weight.device)

    @torch.no_grad()
    def _accumulate_candidates(self, grad_y, x2):
        backend = backends.resolve("sparse_delta", self.backend, x2.device)
        g = torch.ops.peft_kernels.sparse_sddmm(grad_y.reshape(-1, self.out_features), x2, self.candidate_index,
                                                list(self.weight.shape), list(self.block or ()), backend)
        self.candidate_scores += g.reshape(self.candidate_index.numel(), -1).float().norm(dim=1)

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def merge(self) -> torch.Tensor:
        """The dense [out, in] weight W0 + Delta (a new tensor) for export."""
        w = self.weight.detach().clone()
        ref_sparse.merge_at(w, self.delta_values.detach(), self.delta_index, tuple(w.shape), self.block, base=self._w0())
        return w

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """W0 exactly (a new tensor)."""
        w = self.weight.detach().clone()
        if self.merge_in_place:
            w.view(-1)[self._positions()] = self.base_values
        return w

    def _w0(self) -> torch.Tensor | None:
        """W0 at the k positions: ``base_values``, or None — what the weight holds there — for a
        layer that never merges into its weight (a tied one, whose other user may train it)."""
        return self.base_values if self.merge_in_place else None

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W0 + Delta: its weight is frozen as the base was; its bias
        trains if the layer's did."""
        return linear_holding(self.merge(), self.bias)

    def unloaded(self) -> nn.Module:
        """What merge_and_unload puts in this layer's place: to_linear(), or a transformers Conv1D
        for a layer built over one (``fan_in_fan_out``)."""
        return conv1d_holding(self.to_linear()) if self.fan_in_fan_out else self.to_linear()

    # ------------------------------------------------------------------ index changes
    def _check_unsharded(self, what: str):
        if is_dtensor(self.weight) or is_dtensor(self.delta_values):
            raise RuntimeError(f"{what}: this layer's weight and values are sharded (FSDP's fully_shard): change "
                               "the mask on the model before fully_shard (every rank holds only its shard of them)")

    @torch.no_grad()
    def set_index_(self, new_index: torch.Tensor, new_values: torch.Tensor | None = None):
        """Move the delta to ``new_index`` (any size): W0 is restored at the old positions, the
        base is read at the new ones, values start at ``new_values`` (default zero)."""
        self._check_unsharded("set_index_")
        new_index = new_index.to(device=self.weight.device, dtype=torch.int32)
        layout.check_index("SparseDeltaLinear", new_index, tuple(self.weight.shape), self.block)
        if self.merge_in_place:  # else the weight never held a merged delta (and may be another module's)
            self.weight.view(-1)[self._positions()] = self.base_values
        self.delta_index = new_index
        self.base_values = self.weight.view(-1)[self._positions()].clone()
        shape = layout.values_shape(new_index.numel(), self.block)
        vals = torch.zeros(shape, dtype=self.delta_values.dtype, device=self.weight.device)
        if new_values is not None:
            vals.copy_(new_values.reshape(shape))
        self.delta_values.data = vals
        self.sync_()

    @torch.no_grad()
    def regrow_(self, fraction: float, scores: torch.Tensor | None = None, optimizer=None, group=None) -> int:
        """SpIEL-style update of the mask, k kept constant: drop the ``fraction`` of entries with
        the smallest |delta| (block L2 norm with blocks), regrow as many at the unmasked positions
        with the largest ``scores`` ([out, in], e.g. accumulated |gradient|; block-pooled with
        blocks) — or, without ``scores``, among the candidates of track_candidates_ by their
        accumulated gradient magnitude (then new candidates are drawn). Dropped positions return to
        W0; regrown ones start at delta 0, and their optimizer state (when ``optimizer`` is a
        SparseAdamW) is reset. Returns the number swapped.

        Data parallel (DDP): each rank accumulates candidate magnitudes from its own batches, so
        without scores the ranks' magnitudes are summed (all_reduce over ``group``: by default
        torch.distributed's default group when it is initialized with more than one rank; False:
        never) and the next candidates' seed comes from the group's first rank — every replica
        then picks the same positions. Every rank of the group must call regrow_ on this layer;
        given ``scores`` must agree across ranks (they are used as they are)."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"regrow_: fraction must be in [0, 1], got {fraction}")
        self._check_unsharded("regrow_")
        group = _replica_group(group)
        shape = tuple(self.weight.shape)
        tracked = scores is None
        if tracked:
            if getattr(self, "candidate_index", None) is None:
                raise ValueError("regrow_: give scores, or call track_candidates_() and train a few steps first")
        elif not isinstance(scores, torch.Tensor) or tuple(scores.shape) != shape:
            raise ValueError(f"regrow_: scores must be a tensor of shape {list(shape)}")
        k = self.delta_index.numel()
        n = min(int(round(fraction * k)), layout.grid_size(shape, self.block) - k)
        if tracked:
            n = min(n, self.candidate_index.numel())
        if n <= 0:
            return 0
        mag = self.delta_values.detach().float().reshape(k, -1).norm(dim=1)
        keep = torch.ones(k, dtype=torch.bool, device=mag.device)
        keep[torch.topk(mag, n, largest=False).indices] = False
        if tracked:
            cand = torch.full((layout.grid_size(shape, self.block),), -float("inf"), device=mag.device)
            tracked_scores = self.candidate_scores
            if group is not None:  # the replicas' own magnitudes, summed: one choice for all
                tracked_scores = tracked_scores.clone()
                torch.distributed.all_reduce(tracked_scores, group=group)
            cand[self.candidate_index.long()] = tracked_scores
        elif self.block is None:
            cand = scores.detach().float().reshape(-1).abs().clone()
        else:
            bh, bw = self.block
            cand = scores.detach().float().reshape(shape[0] // bh, bh, shape[1] // bw, bw).pow(2).sum((1, 3))
            cand = cand.reshape(-1)
        cand[self.delta_index.long()] = -float("inf")  # only unmasked positions can be regrown
        new_pos = torch.topk(cand, n).indices.to(torch.int32)
        combined = torch.cat([self.delta_index[keep], new_pos])
        order = torch.argsort(combined)
        old_vals = self.delta_values.detach().reshape(k, -1)
        vals = torch.cat([old_vals[keep], torch.zeros(n, old_vals.shape[1], dtype=old_vals.dtype,
                                                      device=old_vals.device)])[order]
        is_new = torch.arange(k, device=keep.device)[order] >= k - n  # cat(kept, new): the last n are new
        self.set_index_(combined[order], vals)
        if optimizer is not None and hasattr(optimizer, "remap_"):
            optimizer.remap_(self.delta_values, keep, order, is_new)
        if tracked:
            seed = torch.randint(0, 2**31, (1,))
            if group is not None:  # the same next candidates on every replica (NCCL needs a CUDA tensor)
                seed = seed.to(mag.device)
                torch.distributed.broadcast(seed, torch.distributed.get_global_rank(group, 0), group=group)
            self.track_candidates_(self.candidate_index.numel(), seed=int(seed.item()))
        return n

    def extra_repr(self) -> str:
        what = "unstructured" if self.block is None else f"blocks {self.block}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {what}, "
                f"trainable={self.num_trainable} ({100 * self.density:.3g}%)"
                + (", fan_in_fan_out=True (Conv1D base)" if self.fan_in_fan_out else ""))
