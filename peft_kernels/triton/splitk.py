"""The split-K arrival protocol of the single-launch kernels (triton/lora.py's small-M forward,
triton/quant_matmul.py's 4-bit decode forward): the programs of one output tile each reduce a range
of K, store an fp32 partial, and count themselves in at the tile's counter (zeroed by the host);
the last to arrive sums the partials in range order — deterministic, no float atomics — and writes
the tile."""
import triton
import triton.language as tl

from .launch import cdiv


def split_ranges(total: int, step: int, want: int) -> tuple[int, int]:
    """(columns per range, number of ranges): ``total`` reduction columns cut into at most
    ``want`` ranges (at least one) of whole ``step``-column steps."""
    steps = cdiv(total, step)
    per = cdiv(steps, min(max(1, want), steps)) * step
    return per, cdiv(total, per)


@triton.jit
def last_to_arrive(count_ptr, tile, SPLIT):
    """Whether this program is the last of SPLIT to count itself in at ``tile``'s counter. Call it
    after storing the program's partials: the barrier makes every thread's stores precede the
    scalar atomic (which one thread performs), and acq_rel at GPU scope publishes them to the last
    program, which reads them back from L2 (loads with cache_modifier=".cg")."""
    tl.debug_barrier()
    return tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
