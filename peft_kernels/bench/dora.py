"""DoRA fwd+bwd benchmark: the shapes of ANCHORS.md against the frozen-layer floor.

Cases: the floor F.linear(x, W); eager PyTorch DoRA (PEFT's formulas as plain autograd ops, the
row norm through W·Aᵀ and A·Aᵀ as ours, no out×in matrix) at p=0.05 and its torch.compile
(``--no-compile`` skips it); HF PEFT's DoRA layer (bf16 adapters, p=0.05) when peft is installed;
peft_kernels dora_linear (the fused dora_fwd / dora_bwd ops) at p=0 and p=0.05 (PEFT's dropout
formula: a second base GEMM over the dropped x forward and a second dX GEMM backward), given the
frozen base's ‖W_i‖² computed once, as DoRALinear and patched PEFT layers cache it;
peft_kernels lora_linear p=0.05 for reference. "saved for bwd" (any device) is what each keeps
between forward and backward; the DoRA goal's memory is "peak extra" (CUDA).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ..ops.dora import dora_linear, dora_weight_norm, weight_row_sq
from ..ops.lora import lora_linear
from . import harness
from .lora import ALPHA, CPU_SHAPES, GPU_SHAPES, P, RANK, _peft_layer


def _eager(x, w, a, b, m, s, p):
    """PEFT's DoRA layer as plain ops (torch's dropout; the norm detached, computed without the
    out×in matrix as dora_weight_norm does)."""
    with torch.no_grad():
        wa, aa = w @ a.T, a @ a.T
        norm = ((w * w).sum(1) + 2 * s * (wa * b).sum(1) + s * s * ((b @ aa) * b).sum(1)).clamp_min(0).sqrt()
    mn = m / norm
    if p == 0.0:
        return mn * (F.linear(x, w) + s * F.linear(F.linear(x, a), b))
    xd = F.dropout(x, p)
    return F.linear(x, w) + (mn - 1) * F.linear(xd, w) + mn * s * F.linear(F.linear(xd, a), b)


def cases(M, K, N, device, dtype, include_compile=True):
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

    out = {"floor": step(lambda: F.linear(x, w), [x]),
           "eager p=0.05": step(lambda: _eager(x, w, a, b, m, s, P), [x, a, b, m])}
    if include_compile:
        compiled = torch.compile(_eager)
        out["torch.compile p=0.05"] = step(lambda: compiled(x, w, a, b, m, s, P), [x, a, b, m])
    layer = _peft_layer(w, RANK, ALPHA, P, use_dora=True)
    if layer is not None:
        lp = [p for p in layer.parameters() if p.requires_grad]
        out["HF PEFT DoRA p=0.05"] = step(lambda: layer(x), [x, *lp])
    sq = weight_row_sq(w)
    out["peft_kernels dora p=0"] = step(lambda: dora_linear(x, w, a, b, m, scaling=s, weight_row_sq=sq),
                                        [x, a, b, m])
    out["peft_kernels dora p=0.05"] = step(lambda: dora_linear(x, w, a, b, m, scaling=s, dropout_p=P,
                                                               weight_row_sq=sq), [x, a, b, m])
    if torch.device(device).type == "cuda":  # triton's one-launch row norm, off by default until timed
        out["peft_kernels dora p=0.05, one-launch norm"] = step(_with_norm_kernel(
            lambda: dora_linear(x, w, a, b, m, scaling=s, dropout_p=P, weight_row_sq=sq)), [x, a, b, m])
    out["peft_kernels lora p=0.05"] = step(lambda: lora_linear(x, w, a, b, scaling=s, dropout_p=P), [x, a, b])
    return out


def _with_norm_kernel(forward):
    """``forward`` with triton/dora.py's NORM_KERNEL switched on for the call."""
    from ..triton import dora as triton_dora

    def run():
        old, triton_dora.NORM_KERNEL = triton_dora.NORM_KERNEL, True
        try:
            return forward()
        finally:
            triton_dora.NORM_KERNEL = old
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_dora", description=__doc__.splitlines()[0])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = harness.add_bench_args(ap).parse_args(argv)
    device, shapes, dtype, reps = harness.bench_setup(args, GPU_SHAPES, CPU_SHAPES)
    payload = harness.run_shapes("dora", shapes, lambda M, K, N: cases(M, K, N, device, dtype, not args.no_compile),
                                 device, reps)
    payload["benchmark"] = "dora_linear fwd+bwd"
    payload["config"].update(dtype=str(dtype), r=RANK, alpha=ALPHA, dropout=P)
    harness.report(payload, args.out, args.plot)
    return 0
