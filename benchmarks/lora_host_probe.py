"""Host-time probe: which layer of the autograd path costs what in one LoRA fwd+bwd at M=16
(GPU never the limit). Compares the full op, an autograd.Function calling the Triton host code
directly (no custom ops), an autograd.Function doing no work, and the host functions alone.

    python benchmarks/lora_host_probe.py
"""
import torch

from peft_kernels.bench.harness import host_us, loop_us
from peft_kernels.ops.lora import _LoRAFunction
from peft_kernels.triton import lora as tl_lora


def main():
    d, bf = torch.device("cuda"), torch.bfloat16
    M, K, N, r = 16, 4096, 4096, 16
    x = torch.randn(M, K, device=d, dtype=bf)
    w = torch.randn(N, K, device=d, dtype=bf) / 64
    a = torch.randn(r, K, device=d, dtype=bf) / 64
    b = torch.randn(N, r, device=d, dtype=bf) * 0.02
    dy = torch.randn(M, N, device=d, dtype=bf)
    seed = torch.tensor([3], device=d)
    y, u = tl_lora.lora_forward(x, w, a, b, None, 2.0, 0.05, seed)
    xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, b))
    gx, ga, gb = torch.ones_like(x), torch.ones_like(a), torch.ones_like(b)

    class Direct(torch.autograd.Function):  # the Triton host code without the custom ops
        @staticmethod
        def forward(ctx, x, a, b):
            ctx.save_for_backward(x, a, b)
            return tl_lora.lora_forward(x, w, a, b, None, 2.0, 0.05, seed)[0]

        @staticmethod
        def backward(ctx, g):
            x, a, b = ctx.saved_tensors
            return tl_lora.lora_backward(g, x, w, a, b, u, 2.0, 0.05, seed, True)

    class Empty(torch.autograd.Function):  # autograd machinery alone
        @staticmethod
        def forward(ctx, x, a, b):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return gx, ga, gb

    def reset():
        xg.grad = ag.grad = bg.grad = None

    rows = [
        ("Function fwd+bwd (grads reset)",
         lambda: (reset(), _LoRAFunction.apply(xg, w, ag, bg, None, 2.0, 0.05, seed, "triton").backward(dy))),
        ("Function fwd+bwd (grads accumulate)",
         lambda: _LoRAFunction.apply(xg, w, ag, bg, None, 2.0, 0.05, seed, "triton").backward(dy)),
        ("Direct Function (no custom ops) fwd+bwd", lambda: (reset(), Direct.apply(xg, ag, bg).backward(dy))),
        ("Empty Function fwd+bwd (autograd only)", lambda: (reset(), Empty.apply(xg, ag, bg).backward(dy))),
        ("lora_forward direct", lambda: tl_lora.lora_forward(x, w, a, b, None, 2.0, 0.05, seed)),
        ("lora_backward direct, plain tensors", lambda: tl_lora.lora_backward(dy, x, w, a, b, u, 2.0, 0.05, seed, True)),
        ("lora_backward direct, requires_grad tensors, no_grad",
         lambda: torch.no_grad()(tl_lora.lora_backward)(dy, xg, w, ag, bg, u, 2.0, 0.05, seed, True)),
    ]
    print(f"{'host us':>9} {'loop us':>9}  (host: issue time, device idle; loop: back-to-back, about max(host, device))")
    for name, fn in rows:
        print(f"{host_us(fn):9.1f} {loop_us(fn):9.1f}  {name}")


if __name__ == "__main__":
    main()
