"""Host-side (CPU) cost of one peft_kernels LoRA fwd+bwd on the GPU: where the Python time goes
(cProfile), against the bare cost of a Triton launch and of eager PyTorch, plus kernel variants.

    python benchmarks/lora_host_profile.py
"""
import cProfile
import io
import pstats

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from peft_kernels import lora_linear
from peft_kernels.bench import harness
from peft_kernels.triton import lora as tl_lora


@triton.jit
def _noop(x_ptr, a, b, c, d, e, f, g, h, i, j, BLOCK: tl.constexpr):
    pass


def main():
    d = torch.device("cuda")
    M, K, N, r = 1024, 4096, 4096, 16
    x = torch.randn(M, K, device=d, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device=d, dtype=torch.bfloat16) / 64
    a = (torch.randn(r, K, device=d, dtype=torch.bfloat16) / 64).requires_grad_()
    b = (torch.randn(N, r, device=d, dtype=torch.bfloat16) * 0.02).requires_grad_()
    dy = torch.randn(M, N, device=d, dtype=torch.bfloat16)
    small = torch.empty(16, device=d)

    def ours(p):
        def run():
            x.grad = a.grad = b.grad = None
            lora_linear(x, w, a, b, scaling=2.0, dropout_p=p).backward(dy)
        return run

    def eager():
        x.grad = a.grad = b.grad = None
        (F.linear(x, w) + 2.0 * F.linear(F.linear(F.dropout(x, 0.05), a), b)).backward(dy)

    rows = [
        ("empty triton launch (11 args)", lambda: _noop[(1,)](small, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, BLOCK=16)),
        ("torch.empty_like", lambda: torch.empty_like(small)),
        ("eager LoRA p=0.05 fwd+bwd", eager),
        ("ours p=0 fwd+bwd", ours(0.0)),
        ("ours p=0.05 fwd+bwd", ours(0.05)),
    ]
    print("us per call: host = issue time with the device idle; loop = back-to-back calls (about max(host, device))")
    for name, fn in rows:
        print(f"  {name:<32} host {harness.host_us(fn):8.1f}   loop {harness.loop_us(fn):8.1f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        ours(0.05)()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(28)
    print(s.getvalue())

    # dx-kernel tile sweep (the x-pass of backward; dropout makes it ALU-heavy).
    for M, K, N in [(8192, 4096, 4096), (8192, 14336, 4096)]:
        x = torch.randn(M, K, device=d, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=d, dtype=torch.bfloat16) / 64
        a = torch.randn(r, K, device=d, dtype=torch.bfloat16) / 64
        b = torch.randn(N, r, device=d, dtype=torch.bfloat16) * 0.02
        dy = torch.randn(M, N, device=d, dtype=torch.bfloat16)
        seed = torch.tensor([5], device=d)
        _, u = tl_lora.lora_forward(x, w, a, b, None, 2.0, 0.05, seed)
        for p in (0.05, 0.0):
            for bm, bk, warps in [(64, 128, 4), (64, 128, 8), (32, 128, 4), (128, 64, 8), (64, 64, 4), (128, 128, 8),
                                  (32, 256, 8)]:
                with tl_lora.launch_override(dx_bm=bm, dx_bk=bk, dx_warps=warps):
                    ms = harness.time_ms(lambda: tl_lora.lora_backward(dy, x, w, a, b, u, 2.0, p, seed if p else None,
                                                                       True), d)
                print(f"backward {M}x{K}->{N} p={p} dx tiles bm={bm} bk={bk} warps={warps}: {ms:.4f} ms")
            for bm, bk, warps in [(64, 128, 4), (64, 128, 8), (128, 64, 8), (32, 128, 4)]:
                with tl_lora.launch_override(down_bm=bm, down_bk=bk, down_warps=warps):
                    ms = harness.time_ms(lambda: tl_lora.lora_forward(x, w, a, b, None, 2.0, p, seed), d)
                print(f"forward {M}x{K}->{N} p={p} down tiles bm={bm} bk={bk} warps={warps}: {ms:.4f} ms")


if __name__ == "__main__":
    main()
