"""Our kernels under ``torch.use_deterministic_algorithms(True)`` (HF Trainer's
``full_determinism=True`` sets it).

Reductions that the Triton kernels split across programs for parallelism — the LoRA rank products
u, v, dA, dB; DoRA's magnitude gradient; block-sparse dDelta over token slices — add fp32 partial
sums with atomics in whatever order the programs finish, so results can differ in the last bits
from run to run. In deterministic mode each program instead writes its partial sum to its own
slice of a workspace and torch sums the slices in a fixed order: the same launches and tiles, one
small reduction more, and a workspace of (splits x the reduced tensor) fp32.

The CUDA C++ backend has no such path (its weight-gradient kernels add with atomicAdd): "auto"
does not pick it in deterministic mode, and asking for it raises — or warns, with
``warn_only=True`` — as PyTorch's own nondeterministic ops do.
"""
from __future__ import annotations

import warnings

import torch


def enabled() -> bool:
    """Whether torch.use_deterministic_algorithms(True) is in force."""
    return torch.are_deterministic_algorithms_enabled()


def alert(what: str) -> None:
    """In deterministic mode, raise (or warn, under warn_only) that ``what`` is nondeterministic;
    otherwise nothing."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{what} does not have a deterministic implementation, but you set "
           "'torch.use_deterministic_algorithms(True)'. Use backend='triton' or 'torch' (both are "
           "deterministic in this mode), or torch.use_deterministic_algorithms(True, warn_only=True) "
           "to allow it with a warning.")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


def split_accumulator(splits: int, shape: tuple, device) -> tuple[torch.Tensor, bool]:
    """An fp32 buffer for a reduction that ``splits`` programs share, and whether it is sliced:
    [splits, *shape] in deterministic mode (each split writes its own slice; reduce it with
    sum_slices), else ``shape``, zeroed when several programs add into it with atomics (the
    kernel's ATOMIC flag is then ``splits > 1 and not sliced``)."""
    sliced = splits > 1 and enabled()
    out = torch.empty((splits, *shape) if sliced else tuple(shape), dtype=torch.float32, device=device)
    if splits > 1 and not sliced:
        out.zero_()
    return out, sliced


def sum_slices(partial: torch.Tensor) -> torch.Tensor:
    """The reduced tensor from ``partial`` [splits, ...] (one slice per program split), in a fixed
    order; a single slice is returned as a view."""
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)
