"""DoRA fwd+bwd benchmark: the shapes of ANCHORS.md against the frozen-layer floor.

Cases: the floor F.linear(x, W); HF PEFT's DoRA layer (bf16 adapters, p=0.05) when peft is
installed; peft_kernels dora_linear at p=0 (on the fused LoRA op) and p=0.05 (PEFT's dropout
formula: an extra base GEMM over the dropped x); peft_kernels lora_linear p=0.05 for reference.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from ..ops.dora import dora_linear, dora_weight_norm
from ..ops.lora import lora_linear
from . import harness
from .lora import ALPHA, CPU_SHAPES, GPU_SHAPES, P, RANK


def _peft_dora_layer(w):
    try:
        import peft
    except ImportError:
        return None

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            self.proj.weight.data.copy_(w)

    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=P, target_modules=["proj"], use_dora=True)
    layer = peft.get_peft_model(Holder(), cfg, autocast_adapter_dtype=False).base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    for mod in (layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]):
        mod.to(w.dtype)
    return layer


def cases(M, K, N, device, dtype):
    torch.manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    a = (torch.randn(RANK, K, device=device, dtype=dtype) / K**0.5).requires_grad_()
    b = (torch.randn(N, RANK, device=device, dtype=dtype) * 0.02).requires_grad_()
    m = dora_weight_norm(w, a, b, ALPHA / RANK).to(dtype).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype)
    s = ALPHA / RANK

    def step(forward, params):
        return harness.fwd_bwd_step(forward, params, dy)

    out = {"floor": step(lambda: F.linear(x, w), [x])}
    layer = _peft_dora_layer(w)
    if layer is not None:
        lp = [p for p in layer.parameters() if p.requires_grad]
        out["HF PEFT DoRA p=0.05"] = step(lambda: layer(x), [x, *lp])
    out["peft_kernels dora p=0"] = step(lambda: dora_linear(x, w, a, b, m, scaling=s), [x, a, b, m])
    out["peft_kernels dora p=0.05"] = step(lambda: dora_linear(x, w, a, b, m, scaling=s, dropout_p=P), [x, a, b, m])
    out["peft_kernels lora p=0.05"] = step(lambda: lora_linear(x, w, a, b, scaling=s, dropout_p=P), [x, a, b])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_dora", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help="comma-separated MxKxN list")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--plot", default=None, help="write a PNG chart here (needs matplotlib)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = harness.parse_shapes(args.shapes) if args.shapes else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if device.type != "cuda":
        print("No CUDA device: CPU figures (reference backend, fp32, small shapes).", file=sys.stderr)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.reps or (25 if device.type == "cuda" else 3)
    payload = harness.run_shapes("dora", shapes, lambda M, K, N: cases(M, K, N, device, dtype), device, reps)
    payload["benchmark"] = "dora_linear fwd+bwd"
    payload["config"].update(dtype=str(dtype), r=RANK, alpha=ALPHA, dropout=P)
    harness.report(payload, args.out, args.plot)
    return 0
