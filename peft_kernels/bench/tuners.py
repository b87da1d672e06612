"""HF PEFT's tuner layers fwd+bwd, unpatched and patched by patch_peft_model, against the frozen floor.

One frozen nn.Linear (weight [N, K]) under each PEFT tuner the patch computes: LoRA r=16 (dropout
0.05), AdaLoRA init_r=16 (dropout 0.05), VeRA r=256 (its shared frozen matrices; dropout 0.05),
LoHa r=8 (patched: its Hadamard product as LoRA of rank 64), DeLoRA r=16 (dropout 0.05), VB-LoRA
r=16 (a bank of 256 vectors, top-2; dropout 0.05), SHiRA r=16 (k = 16·(K + N) trained entries,
LoRA r=16's parameter count) and LoKr r=8 (PEFT's defaults: W1 whole, W2 of rank 8; patched,
products of the Kronecker factors instead of the dense Δ — plain torch GEMMs, not a kernel of
ours). Each runs "HF PEFT <tuner>" (PEFT's own forward) and "patched <tuner>" (the same layer after
patch_peft_model). Adapters in the base dtype, every one drawn non-zero (no zero-initialized
factor: both products do real work). The floor is F.linear(x, W) with x requiring grad (forward
and dX).

    python benchmarks/bench_tuners.py --out benchmarks/results/tuners_h100.json
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import sys

import torch

from . import harness
from .lora import CPU_SHAPES, GPU_SHAPES

TUNERS = ("lora", "adalora", "vera", "loha", "delora", "vblora", "shira", "lokr")
# each tuner's rank (AdaLoRA's init_r), in its config and in the JSON
RANKS = {"lora": 16, "adalora": 16, "vera": 256, "loha": 8, "delora": 16, "vblora": 16, "shira": 16, "lokr": 8}


def _config(peft, tuner: str, shape):
    target, r = ["proj"], RANKS.get(tuner)
    if tuner == "lora":
        return peft.LoraConfig(r=r, lora_alpha=32, lora_dropout=0.05, target_modules=target)
    if tuner == "adalora":  # total_step: PEFT requires it; the allocator does not run in a layer benchmark
        return peft.AdaLoraConfig(init_r=r, target_r=8, total_step=1000, lora_alpha=32, lora_dropout=0.05,
                                  target_modules=target)
    if tuner == "vera":
        return peft.VeraConfig(r=r, vera_dropout=0.05, target_modules=target)
    if tuner == "loha":
        return peft.LoHaConfig(r=r, alpha=16, target_modules=target, init_weights=False)
    if tuner == "delora":
        return peft.DeloraConfig(r=r, delora_lambda=15, module_dropout=0.05, target_modules=target)
    if tuner == "vblora":  # the bank's vectors tile both dimensions
        return peft.VBLoRAConfig(r=r, num_vectors=256, vector_length=math.gcd(*shape, 256), topk=2,
                                 vblora_dropout=0.05, target_modules=target)
    if tuner == "shira":
        return peft.ShiraConfig(r=r, target_modules=target, random_seed=0)
    if tuner == "lokr":
        return peft.LoKrConfig(r=r, alpha=16, target_modules=target, init_weights=False)
    raise ValueError(f"unknown tuner {tuner!r}; choose from {', '.join(TUNERS)}")


# PEFT starts these at zero (the adapter computes nothing until trained): drawn here instead
_ZERO_AT_INIT = ("lora_B", "lora_E", "vera_lambda_b", "delora_B", "shira_weight")


def tuner_layer(w: torch.Tensor, tuner: str):
    """PEFT's ``tuner`` layer around a frozen bias-free nn.Linear holding ``w`` [N, K], adapters in
    w's dtype, or None when this PEFT lacks the tuner (or peft is not installed)."""
    try:
        import peft
    except ImportError:
        return None
    if tuner == "shira" and not hasattr(peft, "ShiraConfig"):  # peft >= 0.17
        return None

    generator = torch.Generator(device=w.device).manual_seed(1)
    layer = harness.peft_layer(_config(peft, tuner, w.shape), w)
    for name, p in layer.named_parameters():
        if p.requires_grad:
            p.data = p.data.to(w.dtype)
            if any(part in name for part in _ZERO_AT_INIT):
                p.data.normal_(0.0, 1e-2, generator=generator)
    return layer


def cases(M, K, N, device, dtype, tuners=TUNERS):
    """{name: fwd+bwd callable} for one shape: the floor, then each tuner unpatched and patched."""
    from .. import patch_peft_model

    x, w, step, out = harness.frozen_layer_inputs(M, K, N, device, dtype)
    for tuner in tuners:
        layer = tuner_layer(w, tuner)
        if layer is None:
            print(f"\n  ({tuner} skipped: this peft lacks it)", file=sys.stderr)
            continue
        patched = copy.deepcopy(layer)
        report = patch_peft_model(patched)
        if report.skipped:  # recorded, not hidden: the "patched" row would be PEFT's forward
            print(f"\n  (patched {tuner} left to PEFT: {next(iter(report.skipped.values()))})", file=sys.stderr)
        for label, module in ((f"HF PEFT {tuner}", layer), (f"patched {tuner}", patched)):
            params = [x] + [p for p in module.parameters() if p.requires_grad]
            out[label] = step(lambda module=module: module(x), params)
            # PEFT's VB-LoRA checks its logits for inf on the device in training (a sync; both rows
            # call it): not capturable in a CUDA graph
            out[label].graphable = tuner != "vblora"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_tuners", description=__doc__.splitlines()[0])
    ap.add_argument("--tuners", default=",".join(TUNERS),
                    help=f"comma-separated subset of {','.join(TUNERS)} (default: all)")
    args = harness.add_bench_args(ap).parse_args(argv)
    tuners = [t.strip() for t in args.tuners.split(",") if t.strip()]
    unknown = [t for t in tuners if t not in TUNERS]
    if unknown or not tuners:
        ap.error(f"--tuners: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(TUNERS)}")
    if importlib.util.find_spec("peft") is None:
        ap.error("the tuners benchmark compares against HF PEFT: pip install peft")
    device, shapes, dtype, reps = harness.bench_setup(args, GPU_SHAPES, CPU_SHAPES)
    payload = harness.run_shapes("tuners", shapes, lambda M, K, N: cases(M, K, N, device, dtype, tuners),
                                 device, reps)
    payload["benchmark"] = "PEFT tuner layers fwd+bwd"
    payload["config"].update(dtype=str(dtype), tuners=tuners,
                             ranks=dict(RANKS))
    harness.report(payload, args.out, args.plot)
    return 0
