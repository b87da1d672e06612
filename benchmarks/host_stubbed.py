"""Host time of our own Python per op call (fwd+bwd), with every Triton launch replaced by a
no-op: what peft_kernels' host code costs on top of the launches, on any machine (on CPU under
TRITON_INTERPRET=1). The outputs are garbage — nothing runs — and the torch ops the host code calls
(cuBLAS products, allocations) are included: on CPU tensors they compute, on CUDA ones they launch.
At small M on a GPU the host is the limit (benchmarks/NOTES.md, "Host time"), so this is the
part of it that our code controls.

    TRITON_INTERPRET=1 python benchmarks/host_stubbed.py [--device cpu] [--reps 1500] [--out x.json]
"""
import argparse
import json
import os
import platform
import time

import torch

import peft_kernels
from peft_kernels.bench import harness
from peft_kernels.bench.dora import _with_norm_kernel
from peft_kernels.quant import NF4Weight
from peft_kernels.triton import dora, lora, quant_matmul, sparse

MODULES = (lora, dora, quant_matmul, sparse)


def cases(device, M=16, K=128, N=128, r=16):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)
    x, w, a, b = rand(M, K, grad=True), rand(N, K), rand(r, K, grad=True), rand(N, r, grad=True)
    m = rand(N, grad=True)
    q = NF4Weight.from_float(w)
    index = torch.arange(0, (N // 4) * (K // 4), 16, dtype=torch.int32, device=device)
    values = rand(index.numel(), 4, 4, grad=True)
    ops = {
        "lora_linear": lambda: peft_kernels.lora_linear(x, w, a, b, scaling=2.0, dropout_p=0.05, backend="triton"),
        "dora_linear": lambda: peft_kernels.dora_linear(x, w, a, b, m, scaling=2.0, dropout_p=0.05,
                                                        backend="triton"),
        "dora_linear (one-launch norm)": _with_norm_kernel(lambda: peft_kernels.dora_linear(
            x, w, a, b, m, scaling=2.0, dropout_p=0.05, backend="triton")),
        "qlora_linear (nf4)": lambda: peft_kernels.qlora_linear(x, q, a, b, scaling=2.0, dropout_p=0.05,
                                                                backend="triton"),
        "sparse_delta_linear (4x4 blocks)": lambda: peft_kernels.sparse_delta_linear(
            x, w, values, index, shape_or_block=(4, 4), backend="triton"),
    }
    layer = _patched_peft_layer(K, N, r, device)
    if layer is not None:  # the same product through a patched HF PEFT LoRA layer (its Python around the op)
        ops["patched PEFT LoRA layer (lora_linear)"] = lambda: layer(x)
    return ops, torch.ones(M, N, device=device)


def _patched_peft_layer(K, N, r, device):
    """One HF PEFT LoRA Linear (r, alpha 2r, dropout 0.05), patched, in training mode; None without
    peft. Its op runs on the triton backend (PEFT_KERNELS_BACKEND, set by main)."""
    try:
        import peft
    except ImportError:
        return None
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(K, N)),
                                peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=["0"]))
    if not peft_kernels.patch_peft_model(model).patched:
        raise RuntimeError("host_stubbed: patch_peft_model left the PEFT layer alone")
    return model.to(device).train().base_model.model[0]


def per_call_us(fn, grad, reps):
    for _ in range(max(10, reps // 10)):
        fn().backward(grad)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            fn().backward(grad)
        best = min(best, (time.perf_counter() - start) / reps * 1e6)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=harness.device_arg, default=harness.default_device())
    ap.add_argument("--reps", type=harness.positive_int, default=1500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for module in MODULES:
        module.launch = lambda *a, **k: None
    os.environ["PEFT_KERNELS_BACKEND"] = "triton"  # the patched layer's backend="auto" (the others name it)
    ops, grad = cases(args.device)
    rows = [[name, per_call_us(fn, grad, args.reps)] for name, fn in ops.items()]
    print(f"host us per fwd+bwd, Triton launches stubbed ({args.device}, M=16, 128->128, r=16)")
    print(harness.markdown_table(["op", "host us (best of 3)"], rows))
    if args.out:
        import triton
        with open(args.out, "w") as f:
            json.dump({"device": str(args.device), "machine": platform.processor() or platform.machine(),
                       "torch": torch.__version__, "triton": triton.__version__, "launches": "stubbed",
                       "rows": [{"op": n, "host_us": us} for n, us in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
