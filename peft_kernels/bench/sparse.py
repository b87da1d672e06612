"""Sparse fine-tuning benchmark: fwd+bwd of a Linear whose trainable part is k masked weight
entries, as a ratio to the frozen floor (F.linear with a frozen weight: forward + dX).

Cases: "dense-grad masking" (what sparse fine-tuning code does today: the weight is a Parameter,
autograd forms the full dW, a hook multiplies it by the mask); peft_kernels SparseDeltaLinear at
1 % and 0.1 % unstructured (each with the SDDMM kernel the density rule picks, and with the
others for comparison) and 32x32 blocks at 1 %; when peft has SHiRA, HF PEFT's SHiRA layer at about
1 % (k = r·(in + out) random positions) and the same layer patched by patch_peft_model.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.sparse import SparseDeltaLinear
from . import harness

GPU_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336)]
CPU_SHAPES = [(64, 256, 192)]


def cases(M, K, N, device, dtype):
    from ..triton import sparse as tri

    x, w, step, out = harness.frozen_layer_inputs(M, K, N, device, dtype)
    wp = nn.Parameter(w.clone())
    mask = (torch.rand(N, K, device=device) < 0.01).to(dtype)
    wp.register_hook(lambda g: g * mask)
    out["dense-grad masking 1%"] = step(lambda: F.linear(x, wp), [x, wp])

    def sparse_case(density, block=None, method=None):
        lin = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        sd = SparseDeltaLinear.from_linear(lin, density=density, block=block)
        with torch.no_grad():
            sd.delta_values.normal_(0, 1e-3)
        # The merged weight is current, as after each SparseAdamW step (which writes it and lets the
        # forwards skip their O(k) write): what a training step's forward and backward cost.
        sd.sync_()
        sd.mark_synced()
        run = step(lambda: sd(x), [x, sd.delta_values])

        def forced():  # the SDDMM runs in backward: hold the override for the whole step
            tri.FORCE_METHOD = method
            try:
                run()
            finally:
                tri.FORCE_METHOD = None
        forced.forward = run.forward  # what forward keeps does not depend on the backward's method
        return forced

    for density in (0.01, 0.001):
        pct = f"{100 * density:g}%"
        auto = "panel" if density >= tri.GATHER_MAX_DENSITY else "gather_t"
        out[f"peft_kernels sparse {pct} (auto: {auto})"] = sparse_case(density)
        for method in ("panel", "gather_t"):
            if method != auto:
                out[f"peft_kernels sparse {pct} ({method})"] = sparse_case(density, method=method)
    out.update(_shira_cases(x, w, step))
    if N % 32 == 0 and K % 32 == 0:
        out["peft_kernels sparse 32x32 blocks 1%"] = sparse_case(0.01, block=(32, 32))
    else:
        print(f"\n  (32x32 blocks skipped: they do not divide {N}x{K})", file=sys.stderr)
    return out


def _shira_cases(x, w, step) -> dict:
    """HF PEFT's SHiRA Linear over a frozen layer holding ``w``, r chosen for about 1 % of W's
    entries (the case name gives r and the density), unpatched and patched; {} without SHiRA."""
    try:
        import peft
        from peft import ShiraConfig
    except ImportError:
        return {}
    from ..integrations.peft import patch_peft_model

    N, K = w.shape
    r = max(1, round(0.01 * N * K / (N + K)))
    name = f"r={r}, {100 * r * (N + K) / (N * K):.2g}%"
    out = {}
    for label, patch in ((f"HF PEFT SHiRA {name}", False), (f"peft_kernels (patched PEFT SHiRA) {name}", True)):
        holder = nn.Sequential(nn.Linear(K, N, bias=False, device=w.device, dtype=w.dtype))
        with torch.no_grad():
            holder[0].weight.copy_(w)
        model = peft.get_peft_model(holder, ShiraConfig(r=r, target_modules=["0"], random_seed=0),
                                    autocast_adapter_dtype=False)
        values = model.base_model.model[0].shira_weight["default"]
        with torch.no_grad():
            values.normal_(0, 1e-3)  # trained values, not PEFT's zero init
        if patch:
            patch_peft_model(model)
        out[label] = step(lambda model=model: model(x), [x, values])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_sparse", description=__doc__.splitlines()[0])
    args = harness.add_bench_args(ap).parse_args(argv)
    device, shapes, dtype, reps = harness.bench_setup(args, GPU_SHAPES, CPU_SHAPES)
    payload = harness.run_shapes("sparse", shapes, lambda M, K, N: cases(M, K, N, device, dtype), device, reps)
    payload["benchmark"] = "sparse_delta_linear fwd+bwd"
    payload["config"].update(dtype=str(dtype), values_dtype="float32")
    harness.report(payload, args.out, args.plot)
    return 0
