"""Sweep of the SDDMM kernels (peft_kernels/triton/sparse.py) alone on the running GPU: the
panel method's workspace sizes and the transposed gather kernel's launch configurations at several densities,
against cuBLAS forming the dense dW = dY^T X (what dense-grad masking pays). The defaults and the
density threshold in triton/sparse.py come from this output.

    python benchmarks/sparse_sddmm_sweep.py --out benchmarks/results/sparse_sddmm_sweep_h100.json
"""
import argparse

import torch

from peft_kernels.bench.harness import Progress, environment, time_ms, write_json
from peft_kernels.triton import sparse as tri

PANEL = [1 << 21, 1 << 22, 1 << 23]  # fp32 workspace elements
GATHER_T = [dict(BT=128, E=32, num_warps=4), dict(BT=256, E=16, num_warps=4), dict(BT=256, E=32, num_warps=8),
            dict(BT=512, E=8, num_warps=4), dict(BT=64, E=64, num_warps=4)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--densities", default="0.001,0.003,0.01")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    M, N, K = 8192, 4096, 4096
    gy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    dense = time_ms(lambda: gy.T @ x, dev)
    transposes = time_ms(lambda: (gy.t().contiguous(), x.t().contiguous()), dev)
    triton_transposes = time_ms(lambda: (tri.transpose(gy), tri.transpose(x)), dev)
    print({"cublas_dense_dW_ms": dense, "two_transposes_ms": transposes, "two_triton_transposes_ms":
           triton_transposes}, flush=True)
    dens = [float(d) for d in args.densities.split(",")]
    cases = [("panel", c) for c in PANEL] + [("gather_t", c) for c in GATHER_T]
    prog = Progress(len(dens) * len(cases), "sddmm")
    rows = []
    for d in dens:
        index = torch.sort(torch.randperm(N * K, device=dev)[: int(d * N * K)]).values.to(torch.int32)
        ref = None
        for method, cfg in cases:
            prog.step(f"{d} {method} {cfg}")
            if method == "panel":
                tri.PANEL_ELEMENTS = cfg
            elif method == "gather_t":
                tri.GATHER_T_CONFIG = cfg
            run = lambda: tri.sddmm(gy, x, index, (N, K), None, method=method)  # noqa: E731
            try:
                out = run()
                ref = out if ref is None else ref
                err = ((out - ref).norm() / ref.norm()).item()
                t = time_ms(run, dev)
            except Exception as e:
                t, err = None, repr(e)[:120]
            rows.append(dict(M=M, N=N, K=K, density=d, method=method, config=cfg, ms=t, rel_diff_to_first=err,
                             ratio_to_dense_dW=t / dense if t else None))
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()
                   if k not in ("M", "N", "K")}, flush=True)
    if args.out:
        write_json(args.out, {"env": environment(dev), "cublas_dense_dW_ms": dense, "two_transposes_ms": transposes,
                              "two_triton_transposes_ms": triton_transposes, "rows": rows})


if __name__ == "__main__":
    main()
