"""Tile sweep of the single-launch small-M LoRA kernels (triton/lora.py) on the running GPU,
kernel level (no autograd), eager-launched and graphed:
  forward   _lora_fused_fwd_kernel against F.linear (the frozen floor) and the three-launch path
            (down, up, cuBLAS addmm_), over (BN, BK, stages, K splits);
  backward  _lora_fused_bwd_kernel against dY @ W (the frozen floor) and the dy / dx kernels +
            cuBLAS addmm_ path, over (BN = the reduction step, BK = dX columns per program, stages).
Its output decides FUSED_FWD_MAX_M / FUSED_BWD_MAX_M and the default tiles of _fused_fwd_tiles /
_fused_bwd_tiles.

    python benchmarks/lora_fused_sweep.py --out benchmarks/results/lora_fused_h100.json
    TRITON_INTERPRET=1 python benchmarks/lora_fused_sweep.py --device cpu --shapes 48x40 --ms 3 \\
        --bn 16 --bk 16 --stages 2 --bwd-bn 16 --bwd-bk 16   # a smoke run of the script (fp32, CPU figures)
"""
import argparse
import itertools

import torch
import torch.nn.functional as F

from peft_kernels.bench.harness import Progress, add_device_argument, device_and_dtype, environment, markdown_table, \
    add_reps_argument, time_ms, time_ms_graphed, write_json
from peft_kernels.triton import lora as tl_lora

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


def _rel(got, want) -> float:
    return max(((g.float() - w.float()).norm() / w.float().norm()).item() for g, w in zip(got, want))


def _sweep(rows, meta, cases, reference, fused, configs, override_keys, dev, reps):
    """Check each fused configuration against the unfused path's outputs, then time every case;
    ratios are to the first case (the floor)."""
    want = reference()
    for cfg in configs:
        name = "fused " + " ".join(f"{k}={v}" for k, v in zip(("bn", "bk", "stages", "split"), cfg))
        override = dict(zip(override_keys, cfg))
        run = lambda override=override: fused(override)  # noqa: E731
        try:
            err = _rel(run(), want)
        except Exception as exc:  # e.g. out of shared memory: recorded, not hidden
            rows.append(dict(meta, case=name, error=f"{type(exc).__name__}: {str(exc)[:120]}"))
            continue
        if err > 2e-2:  # a miscompiled configuration: recorded and left out of the timings
            rows.append(dict(meta, case=name, error=f"wrong result: rel err {err:.3g} to the unfused path"))
            continue
        cases[name] = run
    floor = floor_g = None
    for name, fn in cases.items():
        t, g = time_ms(fn, dev, reps=reps), time_ms_graphed(fn, dev, reps=reps)
        if floor is None:
            floor, floor_g = t, g
        rows.append(dict(meta, case=name, ms=t, ratio=t / floor, graphed_ms=g,
                         graphed_ratio=g / floor_g if g and floor_g else None))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--ms", default="1,16,64,256")
    ap.add_argument("--passes", default="fwd,bwd")
    ap.add_argument("--bn", default="16,32,64", help="forward: W rows per program")
    ap.add_argument("--bk", default="64,128,256", help="forward: reduction step")
    ap.add_argument("--split", default="1,2,4,8", help="forward: K split this many ways (1: one program "
                    "walks all of K)")
    ap.add_argument("--stages", default="3",
                    help="pipeline stages (the launch policy lowers them where shared memory is short)")
    ap.add_argument("--bwd-bn", default="32,64,128", help="backward: reduction step over N")
    ap.add_argument("--bwd-bk", default="16,32,64", help="backward: dX columns per program")
    ap.add_argument("--shapes", default=None, help="comma-separated KxN list")
    add_device_argument(ap)
    add_reps_argument(ap)
    args = ap.parse_args()
    dev, dtype = device_and_dtype(args.device)
    shapes = [tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(",")] if args.shapes else SHAPES
    passes = args.passes.split(",")
    r, p, s = 16, 0.05, 2.0
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    fwd_configs = list(itertools.product(ints(args.bn), ints(args.bk), ints(args.stages), ints(args.split)))
    bwd_configs = list(itertools.product(ints(args.bwd_bn), ints(args.bwd_bk), ints(args.stages)))
    ms_list = ints(args.ms)
    rows = []
    prog = Progress(len(ms_list) * len(shapes), "fused")
    seed = torch.tensor([3], dtype=torch.int64, device=dev)
    for M, (K, N) in itertools.product(ms_list, shapes):
        prog.step(f"M={M} {K}->{N}")
        torch.manual_seed(0)
        x = torch.randn(M, K, device=dev, dtype=dtype)
        w = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
        a = torch.randn(r, K, device=dev, dtype=dtype) / K**0.5
        b = torch.randn(N, r, device=dev, dtype=dtype) * 0.02
        dy = torch.randn(M, N, device=dev, dtype=dtype)
        _, u = tl_lora.lora_forward(x, w, a, b, None, s, p, seed)
        if "fwd" in passes:
            def fused_fwd(override):
                with tl_lora.launch_override(**override):
                    return tl_lora.fused_forward(x, w, a, b, None, s, p, seed)

            _sweep(rows, dict(M=M, K=K, N=N, direction="fwd"),
                   {"floor F.linear": lambda: F.linear(x, w),
                    "three launches": lambda: tl_lora.lora_forward(x, w, a, b, None, s, p, seed)},
                   lambda: tl_lora.lora_forward(x, w, a, b, None, s, p, seed), fused_fwd, fwd_configs,
                   ("fused_bn", "fused_bk", "fused_stages", "fused_split"), dev, args.reps)
        if "bwd" in passes:
            def fused_bwd(override):
                with tl_lora.launch_override(**override):
                    return tl_lora.fused_backward(dy, x, w, a, b, u, s, p, seed)

            _sweep(rows, dict(M=M, K=K, N=N, direction="bwd"),
                   {"floor dY @ W": lambda: torch.mm(dy, w),
                    "dy/dx kernels + cuBLAS": lambda: tl_lora.lora_backward(dy, x, w, a, b, u, s, p, seed, True)},
                   lambda: tl_lora.lora_backward(dy, x, w, a, b, u, s, p, seed, True), fused_bwd, bwd_configs,
                   ("fused_bwd_bn", "fused_bwd_bk", "fused_bwd_stages"), dev, args.reps)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if args.out:  # after every shape: a run cut short by its time limit keeps what it measured
            write_json(args.out, {"env": environment(dev), "config": dict(dtype=str(dtype), r=r, dropout=p),
                                  "rows": rows})
    print(markdown_table(["M", "K->N", "pass", "case", "ms", "/ floor", "graphed / floor"],
                         [[q["M"], f"{q['K']}->{q['N']}", q["direction"], q["case"], q.get("ms"),
                           f"{q['ratio']:.2f}x" if "ratio" in q else q.get("error"),
                           None if q.get("graphed_ratio") is None else f"{q['graphed_ratio']:.2f}x"] for q in rows]))


if __name__ == "__main__":
    main()
