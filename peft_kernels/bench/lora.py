"""LoRA fwd+bwd benchmark: the shapes of ANCHORS.md against the frozen-layer floor.

Each case runs forward, then backward with a fixed random dY, producing dX (the input always
needs a gradient) and the adapter gradients. Cases: the frozen floor F.linear(x, W); eager
PyTorch LoRA (p=0 and p=0.05); torch.compile of the eager p=0.05 layer; HF PEFT's LoRA layer
(bf16 adapters, p=0.05) when peft is installed; peft_kernels (p=0 and p=0.05).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .. import env
from ..ops.lora import lora_linear
from . import harness

GPU_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (1024, 4096, 4096)]
CPU_SHAPES = [(256, 512, 512), (64, 512, 1024)]
RANK, ALPHA, P = 16, 32.0, 0.05


def _eager(x, w, a, b, s, p):
    xd = F.dropout(x, p) if p > 0 else x
    return F.linear(x, w) + s * F.linear(F.linear(xd, a), b)


def _peft_layer(w, r, alpha, p, base=None, use_dora=False, adapter_dtype=None):
    """HF PEFT's LoRA (or DoRA) Linear around a frozen layer: an nn.Linear holding ``w``, or
    ``base`` (e.g. a bitsandbytes Linear4bit) when given. Adapters in ``adapter_dtype`` (default:
    the base dtype; torch.float32 is what get_peft_model's autocast_adapter_dtype gives)."""
    try:
        import peft
    except ImportError:
        return None
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], use_dora=use_dora)
    layer = harness.peft_layer(cfg, w, base)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)  # a trained adapter, not zeros
    dtype = adapter_dtype or (w.dtype if w is not None else torch.bfloat16)
    for module in (layer.lora_A["default"], layer.lora_B["default"]):
        module.to(dtype)
    if use_dora:
        layer.lora_magnitude_vector["default"].to(dtype)
    return layer


def cases(M, K, N, device, dtype, include_compile=True):
    """{name: (fwd_bwd_fn, params)} for one shape; inputs drawn fresh at random."""
    torch.manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    a = (torch.randn(RANK, K, device=device, dtype=dtype) / K**0.5).requires_grad_()
    b = (torch.randn(N, RANK, device=device, dtype=dtype) * 0.02).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype)
    s = ALPHA / RANK

    def step(forward, params):
        return harness.fwd_bwd_step(forward, params, dy)

    out = {
        "floor": step(lambda: F.linear(x, w), [x]),
        "eager p=0": step(lambda: _eager(x, w, a, b, s, 0.0), [x, a, b]),
        "eager p=0.05": step(lambda: _eager(x, w, a, b, s, P), [x, a, b]),
    }
    if include_compile:
        compiled = torch.compile(_eager)
        out["torch.compile p=0.05"] = step(lambda: compiled(x, w, a, b, s, P), [x, a, b])
    layer = _peft_layer(w, RANK, ALPHA, P)
    if layer is not None:
        lp = [p for p in layer.parameters() if p.requires_grad]
        out["HF PEFT p=0.05"] = step(lambda: layer(x), [x, *lp])
    out["peft_kernels p=0"] = step(lambda: lora_linear(x, w, a, b, scaling=s), [x, a, b])
    out["peft_kernels p=0.05"] = step(lambda: lora_linear(x, w, a, b, scaling=s, dropout_p=P), [x, a, b])
    if device.type == "cpu" and env.triton_interpret():
        out["peft_kernels p=0.05 (triton, interpreted)"] = step(
            lambda: lora_linear(x, w, a, b, scaling=s, dropout_p=P, backend="triton"), [x, a, b])
    return out


def run(device: torch.device, shapes, reps: int, include_compile: bool = True) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    payload = harness.run_shapes("lora", shapes, lambda M, K, N: cases(M, K, N, device, dtype, include_compile),
                                 device, reps)
    payload["benchmark"] = "lora_linear fwd+bwd"
    payload["config"].update(dtype=str(dtype), r=RANK, alpha=ALPHA, dropout=P)
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="peft-kernels bench", description=__doc__.splitlines()[0])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = harness.add_bench_args(ap).parse_args(argv)
    device, shapes, _, reps = harness.bench_setup(args, GPU_SHAPES, CPU_SHAPES)
    payload = run(device, shapes, reps, include_compile=not args.no_compile and device.type == "cuda")
    harness.report(payload, args.out, args.plot)
    return 0
