"""Kernels the compile check must reject or refit (tests/test_triton_compile.py runs this file in
a process without TRITON_INTERPRET): one the code generator refuses; tiles that ask for more shared
memory than an H100 has, launched directly (refused, as a GPU would) and through the launch policy
(refit to fewer pipeline stages where one stage fits, a clear error where none does). Prints one
line per outcome: name, then what happened."""
import torch
import triton
import triton.language as tl

from peft_kernels.triton.compile_check import compile_only
from peft_kernels.triton.launch import launch


@triton.jit
def _bad_shapes_kernel(a_ptr, out_ptr, BM: tl.constexpr):
    a = tl.load(a_ptr + tl.arange(0, BM)[:, None] * BM + tl.arange(0, BM)[None, :])
    b = tl.load(a_ptr + tl.arange(0, 2 * BM)[:, None])  # [2BM, 1]: no product with [BM, BM]
    tl.store(out_ptr + tl.arange(0, BM)[:, None] * BM + tl.arange(0, BM)[None, :], tl.dot(a, b))


@triton.jit
def _huge_tiles_kernel(a_ptr, b_ptr, out_ptr, K, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
    # Shared memory per stage: (BM + BN) * BK * 4 bytes; a narrow BN keeps the accumulator (and the
    # compile) small.
    rows, ks, cols = tl.arange(0, BM), tl.arange(0, BK), tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rows[:, None] * K + (k0 + ks)[None, :])
        b = tl.load(b_ptr + (k0 + ks)[:, None] * BN + cols[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + rows[:, None] * BN + cols[None, :], acc)


if __name__ == "__main__":
    record = []
    t = torch.empty(512, 512)
    with compile_only(90, record, ["cases", "float32"]):
        _bad_shapes_kernel[(1,)](t, t, BM=16)
        print("bad_shapes", record[-1].error)
        try:
            _huge_tiles_kernel[(1,)](t, t, t, 4096, BM=512, BK=128, BN=16, num_stages=3)
            print("huge_direct launched")
        except Exception as exc:
            print("huge_direct", type(exc).__name__, exc.required)
        try:
            launch(_huge_tiles_kernel, (1,), t, t, t, 4096, BM=512, BK=128, BN=16)  # 1 stage: 270 KB
            print("huge_policy launched")
        except RuntimeError as exc:
            print("huge_policy", "RuntimeError", str(exc).replace("\n", " "))
        launch(_huge_tiles_kernel, (1,), t, t, t, 4096, BM=256, BK=128, BN=16)  # 1 stage: 139 KB
        print("medium_policy", record[-1].num_stages, record[-1].shared)
