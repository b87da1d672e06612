"""QLoRA benchmark: LoRA over a frozen NF4 base, fwd+bwd, as a ratio to the bf16 frozen floor.

Cases: the bf16 floor F.linear(x, W); eager "dequantize the whole weight, then cuBLAS" LoRA
(what bitsandbytes and torchao do above small M); with bitsandbytes, its frozen Linear4bit and HF
PEFT's LoRA over it (fp32 adapters, PEFT's default, and adapters in x's dtype); with torchao, its
NF4Tensor (linear_nf4) plus the same eager LoRA, as torchtune runs QLoRA; peft_kernels
qlora_linear; peft_kernels quant_linear (the frozen NF4 layer alone); and QLoRALinear over INT8
(LLM.int8 layout) and INT4 (groups of 64) bases — qlora_linear's adapter kernels, the base by
windows of decoded weight on cuBLAS. ``--forward-only`` times forwards only (the decode case: NF4 at M=16
against bf16 F.linear), with the block-aligned 4-bit matmul's decode candidates beside the default path and,
where the extension is built, the CUDA C++ single-kernel forward ("cuda small-M" rows).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from .. import backends
from ..ops.qlora import qlora_linear
from ..nn.qlora import QLoRALinear
from ..ops.quant_linear import quant_linear
from ..quant import NF4Weight
from . import harness
from .lora import ALPHA, P, RANK, _eager, _peft_layer

GPU_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (1024, 4096, 4096)]
DECODE_SHAPES = [(16, 4096, 4096), (16, 4096, 14336)]
CPU_SHAPES = [(64, 256, 192)]


def _bnb_linear4bit(q, dtype):
    """A bitsandbytes Linear4bit holding q's NF4 bytes (shared, not re-quantized); None (with the
    reason printed) where bitsandbytes is missing or cannot run on q's device."""
    try:
        return q.to_bnb_linear(compute_dtype=dtype)
    except Exception as exc:
        print(f"\n  (bitsandbytes cases skipped: {type(exc).__name__}: {str(exc)[:100]})", file=sys.stderr)
        return None


def _short(dtype):
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float", "fp")


def _peft_qlora_layer(lin, adapter_dtype):
    """PEFT's LoRA around the bitsandbytes Linear4bit ``lin``; None where peft is missing."""
    try:
        return _peft_layer(None, RANK, ALPHA, P, base=lin, adapter_dtype=adapter_dtype)
    except Exception as exc:
        print(f"\n  (HF PEFT QLoRA case skipped: {type(exc).__name__}: {str(exc)[:100]})", file=sys.stderr)
        return None


def _torchao_nf4(w):
    """torchao's NF4 copy of ``w`` (blocksize 64, scaler blocks of 256, its defaults) and its
    linear_nf4; None (with the reason printed) where torchao is missing or cannot quantize."""
    try:
        try:
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
        except ImportError:  # torchao < 0.15 kept NF4 under dtypes
            from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
        return to_nf4(w, 64, 256), linear_nf4
    except Exception as exc:
        print(f"\n  (torchao NF4 case skipped: {type(exc).__name__}: {str(exc)[:100]})", file=sys.stderr)
        return None


def cases(M, K, N, device, dtype, forward_only=False):
    torch.manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=not forward_only)
    w = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    q = NF4Weight.from_float(w, blocksize=64, double_quant=True)
    a = (torch.randn(RANK, K, device=device, dtype=dtype) / K**0.5).requires_grad_()
    b = (torch.randn(N, RANK, device=device, dtype=dtype) * 0.02).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype)
    s = ALPHA / RANK

    def step(forward, params):
        return harness.fwd_bwd_step(forward, params, dy, forward_only)

    out = {
        "floor": step(lambda: F.linear(x, w), [x]),
        "eager dequantize+cuBLAS p=0.05": step(lambda: _eager(x, q.dequantize(), a, b, s, P), [x, a, b]),
    }
    lin = _bnb_linear4bit(q, dtype)
    if lin is not None:
        out["bitsandbytes Linear4bit (frozen NF4)"] = step(lambda: lin(x), [x])
        # PEFT's default (get_peft_model autocasts adapters to fp32), then adapters in x's dtype.
        for adapter_dtype in dict.fromkeys([torch.float32, dtype]):
            layer = _peft_qlora_layer(_bnb_linear4bit(q, dtype), adapter_dtype)
            label = f"{_short(adapter_dtype)} adapters"
            if layer is not None:
                lp = [p for p in layer.parameters() if p.requires_grad]
                out[f"HF PEFT QLoRA (bnb), {label} p=0.05"] = step(lambda layer=layer: layer(x), [x, *lp])
    ao = _torchao_nf4(w)
    if ao is not None:
        ao_w, linear_nf4 = ao
        out["torchao NF4 + eager LoRA p=0.05"] = step(
            lambda: linear_nf4(x, ao_w) + s * F.linear(F.linear(F.dropout(x, P), a), b), [x, a, b])
    out["peft_kernels qlora p=0.05"] = step(lambda: qlora_linear(x, q, a, b, scaling=s, dropout_p=P), [x, a, b])
    out["peft_kernels quant_linear (frozen NF4)"] = step(lambda: quant_linear(x, q), [x])
    if forward_only and backends.unavailable_reason("triton", x.device) is None:
        # The decode candidates of the 4-bit matmul beside the default path (kernel level), so one
        # run shows which one meets the decode goal (triton/quant_matmul.py, ALIGNED_TILES).
        from ..triton.quant_matmul import DECODE_CANDIDATES, SPLITK_CANDIDATES, matmul_4bit
        for path, candidates in (("fused_aligned", DECODE_CANDIDATES), ("splitk", SPLITK_CANDIDATES)):
            for tiles in candidates:
                label = f"peft_kernels matmul_4bit {path} " + "x".join(map(str, tiles)) + " (frozen NF4)"
                out[label] = lambda tiles=tiles, path=path: matmul_4bit(x, *q.parts(), path=path, tiles=tiles)
    if forward_only and M <= 64 and backends.unavailable_reason("cuda", x.device) is None:
        # The CUDA C++ single-kernel forward (csrc/lora_small_m.cuh; off by default until these
        # rows show it winning: cuda_backend/quant.py SMALL_M_MAX_M)
        from ..cuda_backend import small_m_on

        def small_m(fn):
            def run():
                with small_m_on(quant_forward=True):
                    return fn()
            return run
        out["peft_kernels qlora cuda small-M p=0.05"] = small_m(
            lambda: qlora_linear(x, q, a, b, scaling=s, dropout_p=P, backend="cuda"))
        out["peft_kernels quant_linear cuda small-M (frozen NF4)"] = small_m(
            lambda: quant_linear(x, q, backend="cuda"))
    for quant in ("int8", "int4"):
        layer = _int_layer(w, a, b, quant)
        out[f"peft_kernels {quant.upper()} QLoRALinear p=0.05"] = step(lambda layer=layer: layer(x),
                                                                       [x, layer.lora_A, layer.lora_B])
    return out


def _int_layer(w, a, b, quant):
    """QLoRALinear.from_linear(quant="int8" | "int4") over ``w``, holding the adapters a, b."""
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = QLoRALinear.from_linear(linear, quant=quant, r=RANK, alpha=ALPHA, dropout=P).to(w.device)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    return layer.train()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_qlora", description=__doc__.splitlines()[0])
    ap.add_argument("--forward-only", action="store_true", help="time the forward alone (decode shapes on a GPU)")
    args = harness.add_bench_args(ap).parse_args(argv)
    device, shapes, dtype, reps = harness.bench_setup(
        args, DECODE_SHAPES if args.forward_only else GPU_SHAPES, CPU_SHAPES)
    payload = harness.run_shapes("qlora", shapes, lambda M, K, N: cases(M, K, N, device, dtype, args.forward_only),
                                 device, reps)
    payload["benchmark"] = "qlora_linear " + ("forward" if args.forward_only else "fwd+bwd")
    payload["config"].update(dtype=str(dtype), r=RANK, alpha=ALPHA, dropout=P, quant="nf4, blocksize 64, double")
    harness.report(payload, args.out, args.plot)
    return 0
