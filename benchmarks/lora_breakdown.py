"""Where the time of one peft_kernels LoRA fwd+bwd goes, kernel by kernel (GPU, profiler), and
the cuBLAS pieces the design rests on (plain GEMM vs GEMM with a C input, beta=1).

    python benchmarks/lora_breakdown.py [--out FILE.json]
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from peft_kernels import lora_linear
from peft_kernels.bench import harness, lora

ITERS = 20


def kernel_times(M, K, N, p):
    torch.manual_seed(0)
    d = torch.device("cuda")
    x = torch.randn(M, K, device=d, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(N, K, device=d, dtype=torch.bfloat16) / K**0.5
    a = (torch.randn(lora.RANK, K, device=d, dtype=torch.bfloat16) / K**0.5).requires_grad_()
    b = (torch.randn(N, lora.RANK, device=d, dtype=torch.bfloat16) * 0.02).requires_grad_()
    dy = torch.randn(M, N, device=d, dtype=torch.bfloat16)

    def step():
        x.grad = a.grad = b.grad = None
        lora_linear(x, w, a, b, scaling=2.0, dropout_p=p).backward(dy)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            step()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0 and ev.count >= ITERS:
            out[ev.key[:70]] = t / ITERS / 1e3  # ms per step
    c = torch.randn(M, N, device=d, dtype=torch.bfloat16)
    dxb = torch.randn(M, K, device=d, dtype=torch.bfloat16)
    xd = x.detach()
    out["[cuBLAS] mm x@W.T"] = harness.time_ms(lambda: torch.mm(xd, w.t()), d)
    out["[cuBLAS] C.addmm_(x, W.T) beta=1"] = harness.time_ms(lambda: c.addmm_(xd, w.t()), d)
    out["[cuBLAS] mm dY@W"] = harness.time_ms(lambda: torch.mm(dy, w), d)
    out["[cuBLAS] D.addmm_(dY, W) beta=1"] = harness.time_ms(lambda: dxb.addmm_(dy, w), d)
    out["[copy] x.clone() (read+write x)"] = harness.time_ms(lambda: xd.clone(), d)
    out["[floor] F.linear fwd+bwd"] = harness.time_ms(
        lambda: (setattr(x, "grad", None), F.linear(x, w).backward(dy)), d)
    out["[ours] fwd+bwd total"] = harness.time_ms(step, d)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--shapes", default=None)
    args = ap.parse_args()
    shapes = harness.parse_shapes(args.shapes) if args.shapes else lora.GPU_SHAPES
    payload = {"benchmark": "lora breakdown", "env": harness.environment(torch.device("cuda")), "results": {}}
    for M, K, N in shapes:
        for p in (0.0, 0.05):
            key = f"{M}x{K}->{N} p={p}"
            payload["results"][key] = times = kernel_times(M, K, N, p)
            print(f"\n== {key}")
            for name, ms in times.items():
                print(f"  {ms:8.4f} ms  {name}")
    if args.out:
        harness.write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
