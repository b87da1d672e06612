"""Host (CPU) microseconds of each piece of one peft_kernels LoRA step, at a tiny M so the GPU
never limits: which layer of the launch path costs what.

    python benchmarks/lora_host_pieces.py
"""
import torch

from peft_kernels import lora_linear
from peft_kernels.ops.lora import _LoRAFunction
from peft_kernels.bench import harness
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
    c = torch.empty(M, N, device=d, dtype=bf)
    rows = [
        ("torch.zeros(1024)", lambda: torch.zeros(1024, device=d)),
        ("torch.randint seed", lambda: torch.randint(0, 2**62, (1,), device=d)),
        ("c.addmm_(x, W.T)", lambda: c.addmm_(x, w.t())),
        ("torch.mm(x, W.T)", lambda: torch.mm(x, w.t())),
        ("triton lora_forward (2 launches + addmm_)", lambda: tl_lora.lora_forward(x, w, a, b, None, 2.0, 0.05, seed)),
        ("triton lora_backward (2 launches + addmm_)",
         lambda: tl_lora.lora_backward(dy, x, w, a, b, u, 2.0, 0.05, seed, True)),
        ("custom op lora_fwd", lambda: torch.ops.peft_kernels.lora_fwd(x, w, a, b, None, 2.0, 0.05, seed, "triton")),
        ("custom op lora_bwd",
         lambda: torch.ops.peft_kernels.lora_bwd(dy, x, w, a, b, u, 2.0, 0.05, seed, True, "triton")),
        ("Function fwd+bwd", lambda: _LoRAFunction.apply(xg, w, ag, bg, None, 2.0, 0.05, seed, "triton").backward(dy)),
        ("lora_linear fwd+bwd", lambda: lora_linear(xg, w, ag, bg, scaling=2.0, dropout_p=0.05).backward(dy)),
        ("eager LoRA fwd+bwd", lambda: (torch.nn.functional.linear(xg, w) + 2.0 * torch.nn.functional.linear(
            torch.nn.functional.linear(torch.nn.functional.dropout(xg, 0.05), ag), bg)).backward(dy)),
    ]
    print(f"# {torch.cuda.get_device_name()}; host = issue time with the device idle, loop = back-to-back "
          "calls (about max(host, device))")
    print(f"{'host us':>9} {'loop us':>9}  piece")
    for name, fn in rows:
        print(f"{harness.host_us(fn):9.1f} {harness.loop_us(fn):9.1f}  {name}")


if __name__ == "__main__":
    main()
