"""Compact layout of a sparse delta over a frozen [out, in] weight, its validation, and mask builders.

Unstructured: ``index`` int32 [k], the sorted, unique flat positions ``row * in + col``;
values [k]. Block (bh, bw): ``index`` int32 [nb], the sorted, unique flat positions of blocks in
the (out // bh) x (in // bw) block grid; values [nb, bh, bw]. Sorted order makes duplicates a
local check and keeps the rows of the SDDMM in order.
"""
from __future__ import annotations

import torch

from ..ops._checks import check_materialized
from ..tensor_cache import TensorCache


def _fail(op: str, message: str):
    raise ValueError(f"peft_kernels.{op}: {message}")


def normalize_block(op: str, shape, block) -> tuple[int, int] | None:
    """None for unstructured; else (bh, bw) that divide ``shape`` [out, in]."""
    if block is None:
        return None
    block = tuple(int(b) for b in block)
    if len(block) != 2 or min(block) < 1:
        _fail(op, f"block must be None or (bh, bw) with bh, bw >= 1, got {block}")
    out_f, in_f = shape
    if out_f % block[0] or in_f % block[1]:
        _fail(op, f"block {block} must divide the weight shape [{out_f}, {in_f}]")
    return block


def grid_size(shape, block) -> int:
    """How many positions ``index`` may address: out*in (unstructured) or the block count."""
    out_f, in_f = shape
    return out_f * in_f if block is None else (out_f // block[0]) * (in_f // block[1])


def values_shape(k: int, block) -> tuple[int, ...]:
    return (k,) if block is None else (k, block[0], block[1])


_VALIDATED = TensorCache(4096)  # indices already checked (see peft_kernels.tensor_cache)


def check_index(op: str, index, shape, block, device=None):
    """index: int32/int64 1-D, strictly increasing (no duplicates), in [0, grid). The full check
    reads the values (one device sync); it is cached per tensor (and its storage and version), so
    a module's index is checked once, not every step. Inside a torch.compile'd graph only the
    metadata is checked (reading values would break the graph): SparseDeltaLinear checks its
    index when it is built or set, outside any graph."""
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64):
        _fail(op, f"delta_index must be an int32/int64 tensor, got {getattr(index, 'dtype', type(index).__name__)}")
    if index.dim() != 1:
        _fail(op, f"delta_index must be 1-D, got shape {list(index.shape)}")
    if device is not None and index.device != device:
        _fail(op, f"delta_index is on {index.device}, the weight on {device}")
    if torch.compiler.is_compiling() or _VALIDATED.get(index, (tuple(shape), block)):
        return
    n = grid_size(shape, block)
    what = "flat position" if block is None else "block position"
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= n:
            _fail(op, f"delta_index has a {what} out of range [0, {n}): min {lo}, max {hi}")
        steps = index[1:] - index[:-1]
        if index.numel() > 1 and bool((steps <= 0).any()):
            if bool((steps == 0).any()):
                _fail(op, "delta_index has duplicate positions")
            _fail(op, "delta_index must be sorted in increasing order (use torch.sort / torch.unique)")
    _VALIDATED.put(index, True, (tuple(shape), block))


def index_from_rows_cols(rows_cols: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(the sorted int32 flat index row * in + col of [2, k] (row, column) pairs — PEFT SHiRA's
    shira_indices —, the permutation that sorts them or None when they were in order already (so
    the values need no gather), whether a position repeats). On rows_cols' device."""
    flat = rows_cols[0].to(torch.int64) * in_features + rows_cols[1].to(torch.int64)
    order = None
    if flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        flat, order = torch.sort(flat)
    repeats = flat.numel() > 1 and bool((flat[1:] == flat[:-1]).any())
    return flat.to(torch.int32), order, repeats


def element_positions(index: torch.Tensor, shape, block) -> torch.Tensor:
    """int64 flat positions in the [out, in] weight of every delta value, in values' order."""
    if block is None:
        return index.long()
    bh, bw = block
    in_f = shape[1]
    n_bc = in_f // bw
    b = index.long()
    r0 = (b // n_bc) * bh
    c0 = (b % n_bc) * bw
    r = torch.arange(bh, device=index.device)
    c = torch.arange(bw, device=index.device)
    return ((r0[:, None, None] + r[None, :, None]) * in_f + c0[:, None, None] + c[None, None, :]).reshape(-1)


# ----------------------------------------------------------------------------- mask builders


def _count(op: str, total: int, density, num_params) -> int:
    if num_params is not None:
        if density is not None and density != 0.01:
            _fail(op, "give density or num_params, not both")
        k = int(num_params)
    else:
        if not (isinstance(density, (int, float)) and 0 < density <= 1):
            _fail(op, f"density must be in (0, 1], got {density}")
        k = max(1, round(density * total))
    if not 1 <= k <= total:
        _fail(op, f"the mask must select between 1 and {total} positions, got {k}")
    return k


INT32_POSITIONS = 2**31  # flat positions from here on do not fit int32


def index_dtype(total: int) -> torch.dtype:
    """int32 for an index into ``total`` positions where they fit, else int64 (an embedding table
    of 2^31 entries or more: 262144 x 8192)."""
    return torch.int32 if total < INT32_POSITIONS else torch.int64


def row_positions(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """The flat positions (int32, or int64 past 2^31) of whole rows ``rows`` (sorted) of a [V, dim]
    table: a trainable-tokens index, built without a [V, dim] mask."""
    flat = (rows.long()[:, None] * dim + torch.arange(dim, device=rows.device)).reshape(-1)
    return flat.to(index_dtype((int(rows.max()) + 1) * dim if rows.numel() else 0))


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores.reshape(-1).float(), k).indices).values.to(index_dtype(scores.numel()))


def build_index(op: str, weight: torch.Tensor, *, density=0.01, num_params=None, mask="random", block=None,
                seed=0, scores=None) -> torch.Tensor:
    """Sorted index (int32; int64 past 2^31 positions) for the chosen mask (see
    SparseDeltaLinear.from_linear)."""
    check_materialized(weight, "the weight", op)  # every mask keeps W0's values at its positions
    shape = tuple(weight.shape)
    block = normalize_block(op, shape, block)
    grid = (shape[0], shape[1]) if block is None else (shape[0] // block[0], shape[1] // block[1])
    total = grid[0] * grid[1]

    def pooled(t):  # per-block score: the block's L2 norm
        if block is None:
            return t
        return t.float().reshape(grid[0], block[0], grid[1], block[1]).pow(2).sum((1, 3)).sqrt()

    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            _fail(op, f"a mask tensor must be bool, got {mask.dtype}")
        if tuple(mask.shape) == shape and block is not None:
            blocks = mask.reshape(grid[0], block[0], grid[1], block[1])
            full, none = blocks.all(3).all(1), ~blocks.any(3).any(1)
            if not bool((full | none).all()):
                _fail(op, f"the bool mask is not made of whole {block} blocks")
            mask = full
        if tuple(mask.shape) != grid:
            _fail(op, f"the bool mask must have shape {list(shape)}" + (f" or {list(grid)} (blocks)" if block else "")
                  + f", got {list(mask.shape)}")
        index = mask.reshape(-1).nonzero().reshape(-1).to(index_dtype(total))
        if index.numel() == 0:
            _fail(op, "the bool mask selects no position")
        return index.to(weight.device)
    k = _count(op, total, density, num_params)
    if callable(mask):
        chosen = mask(weight)
        if isinstance(chosen, torch.Tensor) and chosen.dtype == torch.bool:
            return build_index(op, weight, mask=chosen, block=block)
        if not isinstance(chosen, torch.Tensor) or tuple(chosen.shape) != shape:
            _fail(op, f"a mask callable must return a bool mask or a score tensor of shape {list(shape)}")
        return _top_k(pooled(chosen.detach()), k).to(weight.device)
    if mask == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.sort(torch.randperm(total, generator=g)[:k]).values.to(index_dtype(total)).to(weight.device)
    if mask == "magnitude":
        return _top_k(pooled(weight.detach().abs()), k)
    if mask == "gradient":
        if scores is None or tuple(scores.shape) != shape:
            _fail(op, f"mask='gradient' needs scores=<accumulated |gradient|, shape {list(shape)}>")
        return _top_k(pooled(scores.detach().abs()), k).to(weight.device)
    _fail(op, f"mask must be 'random', 'magnitude', 'gradient', a bool tensor or a callable, got {mask!r}")


def density_of(index: torch.Tensor, shape, block) -> float:
    return index.numel() / max(1, grid_size(shape, block))


__all__ = ["build_index", "check_index", "element_positions", "normalize_block", "grid_size", "values_shape",
           "density_of"]
