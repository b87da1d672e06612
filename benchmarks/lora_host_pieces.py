"""Host (CPU) microseconds of each piece of one peft_kernels LoRA step at a tiny M, beside the
back-to-back time per call: which layer of the launch path costs what, and whether host or
device limits. Pieces: cuBLAS and allocator calls, the Triton host functions alone, the custom
ops, an autograd.Function calling the host functions directly (no custom ops), one doing no work
(autograd alone), the full op, and eager PyTorch LoRA.

    python benchmarks/lora_host_pieces.py
"""
import torch
import torch.nn.functional as F

from peft_kernels import lora_linear
from peft_kernels.bench import harness
from peft_kernels.ops.lora import _LoRAFunction
from peft_kernels.triton import lora as tl_lora


def main():
    d = torch.device("cuda")
    M, K, N, r = 16, 4096, 4096, 16
    bf = torch.bfloat16
    x = torch.randn(M, K, device=d, dtype=bf)
    w = torch.randn(N, K, device=d, dtype=bf) / 64
    a = torch.randn(r, K, device=d, dtype=bf) / 64
    b = torch.randn(N, r, device=d, dtype=bf) * 0.02
    dy = torch.randn(M, N, device=d, dtype=bf)
    seed = torch.tensor([3], device=d)
    y, u = tl_lora.lora_forward(x, w, a, b, None, 2.0, 0.05, seed)
    xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, b))
    gx, ga, gb = torch.ones_like(x), torch.ones_like(a), torch.ones_like(b)
    c = torch.empty(M, N, device=d, dtype=bf)

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
        ("torch.zeros(1024)", lambda: torch.zeros(1024, device=d)),
        ("torch.randint seed", lambda: torch.randint(0, 2**62, (1,), device=d)),
        ("c.addmm_(x, W.T)", lambda: c.addmm_(x, w.t())),
        ("torch.mm(x, W.T)", lambda: torch.mm(x, w.t())),
        ("triton lora_forward (host function alone)", lambda: tl_lora.lora_forward(x, w, a, b, None, 2.0, 0.05, seed)),
        ("triton lora_backward (host function alone)",
         lambda: tl_lora.lora_backward(dy, x, w, a, b, u, 2.0, 0.05, seed, True)),
        ("triton lora_backward, requires_grad tensors, no_grad",
         lambda: torch.no_grad()(tl_lora.lora_backward)(dy, xg, w, ag, bg, u, 2.0, 0.05, seed, True)),
        ("custom op lora_fwd", lambda: torch.ops.peft_kernels.lora_fwd(x, w, a, b, None, 2.0, 0.05, seed, "triton")),
        ("custom op lora_bwd",
         lambda: torch.ops.peft_kernels.lora_bwd(dy, x, w, a, b, u, 2.0, 0.05, seed, True, "triton")),
        ("Empty Function fwd+bwd (autograd only)", lambda: (reset(), Empty.apply(xg, ag, bg).backward(dy))),
        ("Direct Function (no custom ops) fwd+bwd", lambda: (reset(), Direct.apply(xg, ag, bg).backward(dy))),
        ("Function fwd+bwd (grads reset)",
         lambda: (reset(), _LoRAFunction.apply(xg, w, ag, bg, None, 2.0, 0.05, seed, "triton").backward(dy))),
        ("Function fwd+bwd (grads accumulate)",
         lambda: _LoRAFunction.apply(xg, w, ag, bg, None, 2.0, 0.05, seed, "triton").backward(dy)),
        ("lora_linear fwd+bwd",
         lambda: (reset(), lora_linear(xg, w, ag, bg, scaling=2.0, dropout_p=0.05).backward(dy))),
        ("eager LoRA fwd+bwd", lambda: (reset(), (F.linear(xg, w) + 2.0 * F.linear(
            F.linear(F.dropout(xg, 0.05), ag), bg)).backward(dy))),
        ("frozen F.linear fwd+bwd", lambda: (reset(), F.linear(xg, w).backward(dy))),
    ]
    print(f"# {torch.cuda.get_device_name()}, M={M}, {K}->{N}, r={r}, bf16. host = issue time with the device "
          "idle; loop = back-to-back calls (about max(host, device))")
    print(f"{'host us':>9} {'loop us':>9}  piece")
    for name, fn in rows:
        print(f"{harness.host_us(fn):9.1f} {harness.loop_us(fn):9.1f}  {name}")


if __name__ == "__main__":
    main()
