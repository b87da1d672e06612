"""Tile sweep of the single-launch small-M LoRA forward (triton/lora.py, _lora_fused_fwd_kernel)
on the running GPU, kernel level (no autograd): the forward alone against F.linear (the frozen
floor) and against the three-launch path (down, up, cuBLAS addmm_), eager-launched and graphed.
Its output decides FUSED_FWD_MAX_M and the default tiles of _fused_fwd_tiles.

    python benchmarks/lora_fused_fwd_sweep.py --out benchmarks/results/lora_fused_fwd_h100.json
    TRITON_INTERPRET=1 python benchmarks/lora_fused_fwd_sweep.py --device cpu --shapes 48x40 --ms 3 \
        --bn 16 --bk 16 --stages 2        # a smoke run of the script itself (fp32, CPU figures)
"""
import argparse
import itertools

import torch
import torch.nn.functional as F

from peft_kernels.bench.harness import Progress, environment, markdown_table, time_ms, time_ms_graphed, write_json
from peft_kernels.triton import lora as tl_lora

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--ms", default="1,16,64")
    ap.add_argument("--bn", default="16,32,64")
    ap.add_argument("--bk", default="64,128,256")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--shapes", default=None, help="comma-separated KxN list")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = [tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(",")] if args.shapes else SHAPES
    r, p, s = 16, 0.05, 2.0
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    configs = list(itertools.product(ints(args.bn), ints(args.bk), ints(args.stages)))
    ms_list = ints(args.ms)
    rows = []
    prog = Progress(len(ms_list) * len(shapes), "fused-fwd")
    seed = torch.tensor([3], dtype=torch.int64, device=dev)
    for M, (K, N) in itertools.product(ms_list, shapes):
        prog.step(f"M={M} {K}->{N}")
        torch.manual_seed(0)
        x = torch.randn(M, K, device=dev, dtype=dtype)
        w = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
        a = torch.randn(r, K, device=dev, dtype=dtype) / K**0.5
        b = torch.randn(N, r, device=dev, dtype=dtype) * 0.02
        cases = {"floor F.linear": lambda: F.linear(x, w),
                 "three launches": lambda: tl_lora.lora_forward(x, w, a, b, None, s, p, seed)}
        ref = tl_lora.lora_forward(x, w, a, b, None, s, p, seed)[0].float()

        def fused(bn, bk, st):
            with tl_lora.launch_override(fused_bn=bn, fused_bk=bk, fused_stages=st):
                return tl_lora.fused_forward(x, w, a, b, None, s, p, seed)

        for bn, bk, st in configs:
            try:
                err = ((fused(bn, bk, st)[0].float() - ref).norm() / ref.norm()).item()
            except Exception as exc:  # e.g. out of shared memory: recorded, not hidden
                rows.append(dict(M=M, K=K, N=N, case=f"fused bn={bn} bk={bk} stages={st}",
                                 error=f"{type(exc).__name__}: {str(exc)[:120]}"))
                continue
            if err > 2e-2:
                raise AssertionError(f"fused bn={bn} bk={bk} stages={st} differs from the three-launch path: {err}")
            cases[f"fused bn={bn} bk={bk} stages={st}"] = lambda bn=bn, bk=bk, st=st: fused(bn, bk, st)
        floor = floor_g = None
        for name, fn in cases.items():
            t, g = time_ms(fn, dev), time_ms_graphed(fn, dev)
            if floor is None:
                floor, floor_g = t, g
            rows.append(dict(M=M, K=K, N=N, case=name, ms=t, ratio=t / floor, graphed_ms=g,
                             graphed_ratio=g / floor_g if g and floor_g else None))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown_table(["M", "K->N", "case", "ms", "/ floor", "graphed / floor"],
                         [[q["M"], f"{q['K']}->{q['N']}", q["case"], q.get("ms"),
                           f"{q['ratio']:.2f}x" if "ratio" in q else q.get("error"),
                           None if q.get("graphed_ratio") is None else f"{q['graphed_ratio']:.2f}x"] for q in rows]))
    if args.out:
        write_json(args.out, {"env": environment(dev), "config": dict(dtype=str(dtype), r=r, dropout=p), "rows": rows})


if __name__ == "__main__":
    main()
