"""Tile sweep for the Triton 4-bit matmul (triton/quant_matmul.py) on the running GPU.

For each shape and direction (forward x@W^T, backward dY@W) it times every tile configuration,
launched eagerly (``ms``: the host's launch overhead included, which hides a short kernel's device
time) and replayed from a CUDA graph (``graphed_ms``: device time),
against cuBLAS on the already-dequantized bf16 weight (the speed of light for this product) and
against bnb-style dequantize-then-matmul, and writes the table as JSON. It first times the
block-aligned window decoder alone (the chunked path's cost above cuBLAS) for each DECODES
configuration, with the bandwidth it reaches. The defaults in quant_matmul.py are taken from this
output.

    python benchmarks/quant_matmul_tiles.py --out benchmarks/results/quant_matmul_tiles_h100.json
    TRITON_INTERPRET=1 python benchmarks/quant_matmul_tiles.py --device cpu --nk 96x128 --ms 5  # smoke run, fp32
"""
import argparse

import torch

from peft_kernels.bench.harness import (Progress, add_device_argument, add_reps_argument, device_and_dtype, environment,
                                        time_ms, time_ms_graphed, write_json)
from peft_kernels.quant import NF4Weight
from peft_kernels.triton import quant_matmul as qm

FUSED = [  # BM, BP, BQ, warps, stages
    (16, 64, 128, 4, 2), (16, 128, 128, 4, 1), (64, 64, 64, 4, 2), (128, 64, 64, 4, 1), (128, 128, 64, 8, 1),
]
ALIGNED = [  # BM, BN, NB (forward: quantization blocks per step), warps; small BN and larger NB for decode
    (16, 16, 1, 4), (16, 16, 4, 4), (16, 32, 2, 4), (16, 32, 4, 4), (16, 64, 1, 4), (16, 64, 4, 4),
    (16, 128, 1, 4), (32, 64, 2, 4), (64, 64, 1, 4), (64, 128, 1, 8),
]
SPLITK = qm.SPLITK_CANDIDATES  # BM, BN, NB, warps, programs per SM (forward only)
CHUNKS = [1 << 20, 1 << 22, 1 << 24]  # weights decoded per window (chunked path)
DECODES = [(16, 1, 4), (16, 4, 4), (32, 2, 4), (32, 4, 8), (64, 1, 4), (64, 2, 8)]  # BR, NB, warps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--ms", default="16,256,1024,8192")
    ap.add_argument("--nk", default="4096x4096", help="the weight's out x in")
    add_device_argument(ap)
    add_reps_argument(ap)
    args = ap.parse_args()
    dev, dtype = device_and_dtype(args.device)
    torch.manual_seed(0)
    N, K = (int(v) for v in args.nk.split("x"))
    q = NF4Weight.from_float(torch.randn(N, K, device=dev, dtype=dtype) * 0.02, double_quant=True)
    w = q.dequantize()
    rows = []
    ms = [int(m) for m in args.ms.split(",")]
    cases = ([("fused", cfg) for cfg in FUSED] + [("fused_aligned", cfg) for cfg in ALIGNED]
             + [("splitk", cfg) for cfg in SPLITK] + [("chunked", ch) for ch in CHUNKS])
    prog = Progress(len(ms) * 2 * len(cases), "tiles")
    deq_out = torch.empty_like(w)
    decoders = []
    for cfg in DECODES:  # bytes moved: the packed weight and absmax in, bf16 out
        qm.dequantize_window(*q.parts(), 0, N, 0, K, deq_out, tiles=cfg)
        exact = torch.equal(deq_out, w)
        decode = lambda cfg=cfg: qm.dequantize_window(*q.parts(), 0, N, 0, K, deq_out, tiles=cfg)  # noqa: E731
        t, tg = time_ms(decode, dev, reps=args.reps), time_ms_graphed(decode, dev, reps=args.reps)
        gbs = (N * K // 2 + N * K // 64 + N * K * 2) / (tg or t) / 1e6
        decoders.append(dict(config=cfg, ms=t, graphed_ms=tg, exact=exact, gb_per_s=gbs))
        print(decoders[-1], flush=True)
    deq_ms = time_ms(lambda: qm.dequantize_window(*q.parts(), 0, N, 0, K, deq_out), dev, reps=args.reps)
    print({f"dequantize_{N}x{K}_triton_ms": deq_ms}, flush=True)
    for M in ms:
        for transpose in (False, True):
            a = torch.randn(M, N if transpose else K, device=dev, dtype=dtype)
            ref = a @ w if transpose else a @ w.T
            cublas = time_ms(lambda: a @ w if transpose else a @ w.T, dev, reps=args.reps)
            cublas_g = time_ms_graphed(lambda: a @ w if transpose else a @ w.T, dev, reps=args.reps)
            deq = time_ms(lambda: (a @ q.dequantize()) if transpose else a @ q.dequantize().T, dev, reps=args.reps)
            for path, cfg in cases:
                prog.step(f"M={M} T={transpose} {path} {cfg}")
                if (path.startswith("fused") or path == "splitk") and M > 1024 or path == "splitk" and transpose:
                    continue
                qm.CHUNK_ELEMENTS = cfg if path == "chunked" else qm.CHUNK_ELEMENTS
                tiles = None if path == "chunked" else cfg
                run = lambda: qm.matmul_4bit(a, *q.parts(), transpose=transpose, tiles=tiles, path=path)  # noqa: E731
                try:
                    err = (run().float() - ref.float()).abs().max().item()
                    t, tg = time_ms(run, dev, reps=args.reps), time_ms_graphed(run, dev, reps=args.reps)
                except Exception as e:  # out of shared memory etc.: recorded, not hidden
                    t, tg, err = None, None, repr(e)[:120]
                rows.append(dict(M=M, N=N, K=K, transpose=transpose, path=path, config=cfg, ms=t, graphed_ms=tg,
                                 max_err=err, cublas_bf16_ms=cublas, cublas_bf16_graphed_ms=cublas_g,
                                 dequant_matmul_ms=deq, ratio_to_cublas=(t / cublas) if t else None,
                                 graphed_ratio_to_cublas=(tg / cublas_g) if tg and cublas_g else None))
                print(rows[-1], flush=True)
        if args.out:  # after every M: a run cut short by its time limit keeps what it measured
            write_json(args.out, {"env": environment(dev), f"dequantize_{N}x{K}_ms": deq_ms, "decoders": decoders,
                                  "rows": rows})


if __name__ == "__main__":
    main()
