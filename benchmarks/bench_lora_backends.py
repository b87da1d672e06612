"""The LoRA op's backends side by side (triton vs cuda vs the frozen floor), fwd+bwd and forward
only, bf16, r=16, p=0.05, over M; the JSON backs backend="auto"'s rule (backends.py). For
M <= FUSED_LIMIT (256) it adds "triton fused-fwd" and "triton fused fwd+bwd": the Triton backend with its
single-launch forward (and backward) turned on (triton/lora.py, FUSED_FWD_MAX_M / FUSED_BWD_MAX_M,
off by default until these rows say they win). For M <= 64 with the extension built it adds "cuda small-M
fwd" (the CUDA backend with its single-kernel forward on, the usual backward) and "cuda small-M fwd+bwd"
(both single kernels on): cuda_backend/lora.py SMALL_M_MAX_M / SMALL_M_BWD_MAX_M, off by default until
these rows say they win.

    python benchmarks/bench_lora_backends.py --out benchmarks/results/lora_backends_h100.json
    TRITON_INTERPRET=1 python benchmarks/bench_lora_backends.py --device cpu --kn 64x48 --ms 5  # smoke run, fp32
"""
import argparse

import torch
import torch.nn.functional as F

import peft_kernels
from peft_kernels.cuda_backend import lora as cuda_lora, small_m_on
from peft_kernels.triton import lora as triton_lora
from peft_kernels.bench.harness import Progress, add_device_argument, add_reps_argument, device_and_dtype, environment, \
    fwd_bwd_step, markdown_table, time_ms, time_ms_graphed, write_json


def _under(override, step):
    """step() with the launch override active throughout: backward included (the override is a
    module-level setting, so autograd's device thread sees it too)."""
    def run():
        with triton_lora.launch_override(**override):
            return step()
    return run


def _with_small_m(step, backward=False):
    """step() with the CUDA backend's single-kernel forward (and backward) on for every M it takes."""
    def run():
        with small_m_on(lora_forward=True, lora_backward=backward):
            return step()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--ms", default="16,64,256,1024,8192")
    ap.add_argument("--kn", default="4096x4096", help="in x out features")
    add_device_argument(ap)
    add_reps_argument(ap)
    args = ap.parse_args()
    dev, dtype = device_and_dtype(args.device)
    K, N = (int(v) for v in args.kn.split("x"))
    skipped = {be: peft_kernels.backends.unavailable_reason(be, dev) for be in ("triton", "cuda")}
    for be, why in skipped.items():
        if why:
            print(f"backend {be} skipped: {why}")
    r, p, s = 16, 0.05, 2.0
    rows = []
    ms = [int(m) for m in args.ms.split(",")]
    prog = Progress(len(ms), "backends")
    for M in ms:
        prog.step(f"M={M}")
        torch.manual_seed(0)
        x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
        w = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
        a = (torch.randn(r, K, device=dev, dtype=dtype) / K**0.5).requires_grad_()
        b = (torch.randn(N, r, device=dev, dtype=dtype) * 0.02).requires_grad_()
        dy = torch.randn(M, N, device=dev, dtype=dtype)
        for mode in ("fwd+bwd", "forward"):
            fo = mode == "forward"
            cases = {"floor": fwd_bwd_step(lambda: F.linear(x, w), [x], dy, fo)}
            for be in (be for be, why in skipped.items() if not why):
                cases[be] = fwd_bwd_step(lambda be=be: peft_kernels.lora_linear(
                    x, w, a, b, scaling=s, dropout_p=p, seed=3, backend=be), [x, a, b], dy, fo)
            if M <= triton_lora.FUSED_LIMIT and "triton" in cases:
                fused_fwd = dict(fused_max_m=triton_lora.FUSED_LIMIT)
                fused_both = dict(fused_fwd, fused_bwd_max_m=triton_lora.FUSED_LIMIT)
                for name, override in (("triton fused-fwd", fused_fwd), ("triton fused fwd+bwd", fused_both)):
                    cases[name] = _under(override, fwd_bwd_step(lambda: peft_kernels.lora_linear(
                        x, w, a, b, scaling=s, dropout_p=p, seed=3, backend="triton"), [x, a, b], dy, fo))
            if M <= cuda_lora.SMALL_M_LIMIT and "cuda" in cases:
                for name, both in (("cuda small-M fwd", False), ("cuda small-M fwd+bwd", True)):
                    if both and fo:
                        continue
                    cases[name] = _with_small_m(fwd_bwd_step(lambda: peft_kernels.lora_linear(
                        x, w, a, b, scaling=s, dropout_p=p, seed=3, backend="cuda"), [x, a, b], dy, fo), both)
            times = {k: time_ms(f, dev, reps=args.reps) for k, f in cases.items()}
            graphed = {k: time_ms_graphed(f, dev, reps=args.reps) for k, f in cases.items()}
            for k in cases:
                rows.append(dict(M=M, K=K, N=N, mode=mode, case=k, ms=times[k], ratio=times[k] / times["floor"],
                                 graphed_ms=graphed[k],
                                 graphed_ratio=(graphed[k] / graphed["floor"]) if graphed[k] and graphed["floor"]
                                 else None))
    print(markdown_table(["M", "mode", "case", "ms", "/ floor", "graphed / floor"],
                         [[r_["M"], r_["mode"], r_["case"], r_["ms"], f"{r_['ratio']:.2f}x",
                           None if r_["graphed_ratio"] is None else f"{r_['graphed_ratio']:.2f}x"] for r_ in rows]))
    if args.out:
        config = dict(dtype=str(dtype).replace("torch.", ""), r=r, dropout=p, ext=peft_kernels.info()["cuda_extension"])
        write_json(args.out, {"env": environment(dev), "config": config, "rows": rows})


if __name__ == "__main__":
    main()
