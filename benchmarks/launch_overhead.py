"""Triton's launch path against the fast relaunch (PEFT_KERNELS_FAST_LAUNCH, peft_kernels/triton/
launch.py) on the running GPU: per case, the host time to issue one step from an idle device, the
back-to-back time per step (about max(host, device)) and the eager CUDA-event time, each with the
relaunch off and on, after checking that both give the same result. The cases are the host-bound
ones of benchmarks/NOTES.md (2026-11-24): the LoRA step at M = 16 and M = 1024, the QLoRA step at
M = 8192 (its 4-bit windows launch a decode kernel each) and the frozen 4-bit forward at M = 16.

    python benchmarks/launch_overhead.py --out benchmarks/results/launch_overhead_h100.json
    TRITON_INTERPRET=1 python benchmarks/launch_overhead.py --device cpu   # smoke run: Triton's path only
"""
import argparse

import torch

import peft_kernels
from peft_kernels.bench import harness
from peft_kernels.quant import NF4Weight
from peft_kernels.triton import launch as policy


def cases(device, dtype, small):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(grad)

    K = N = 96 if small else 4096
    r = 16
    out = {}
    for M in ((5, 40) if small else (16, 1024)):
        x, w = rand(M, K, grad=True), rand(N, K, scale=K ** -0.5)
        a, b, dy = rand(r, K, scale=0.02, grad=True), rand(N, r, scale=0.02, grad=True), rand(M, N)

        def lora(x=x, w=w, a=a, b=b, dy=dy):
            y = peft_kernels.lora_linear(x, w, a, b, scaling=2.0, dropout_p=0.05, seed=3, backend="triton")
            y.backward(dy)
            return y
        out[f"lora_linear fwd+bwd M={M}"] = lora
    q = NF4Weight.from_float(rand(N, K, scale=0.02))
    M = 64 if small else 8192
    x, a, b, dy = rand(M, K, grad=True), rand(r, K, scale=0.02, grad=True), rand(N, r, scale=0.02, grad=True), rand(M, N)

    def qlora(x=x, a=a, b=b, dy=dy):
        y = peft_kernels.qlora_linear(x, q, a, b, scaling=2.0, dropout_p=0.05, seed=3, backend="triton")
        y.backward(dy)
        return y
    out[f"qlora_linear (nf4) fwd+bwd M={M}"] = qlora
    x16 = rand(16, K)
    out["quant_linear (nf4) forward M=16"] = lambda: peft_kernels.quant_linear(x16, q, backend="triton")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=harness.device_arg, default=harness.default_device())
    ap.add_argument("--reps", type=harness.positive_int, default=200, help="calls per host / loop figure")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = args.device
    gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        print("No CUDA device: interpreted Triton on tiny shapes, and no relaunch (it needs compiled kernels).")
    rows = []
    todo = cases(dev, dtype, small=not gpu)
    prog = harness.Progress(len(todo), "launch")
    for name, fn in todo.items():
        prog.step(name)
        policy.FAST_LAUNCH = False
        want = fn().detach().clone()
        err = 0.0
        if gpu:  # the relaunch needs compiled kernels (none under the interpreter)
            policy.FAST_LAUNCH = True
            fn()  # compiles nothing new; keeps the compiled kernels
            got = fn().detach()  # relaunched
            err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
        for fast in (False, True) if gpu else (False,):
            policy.FAST_LAUNCH = fast
            rows.append({"case": name, "fast_launch": fast, "rel_diff_to_triton_path": err,
                         "host_us": harness.host_us(fn, n=args.reps, warmup=10 if gpu else 1),
                         "loop_us": harness.loop_us(fn, n=args.reps, warmup=30 if gpu else 1),
                         "eager_ms": harness.time_ms(fn, dev, warmup=3 if gpu else 1, reps=25 if gpu else args.reps)})
    policy.FAST_LAUNCH = False
    print()
    print(harness.markdown_table(
        ["case", "fast launch", "host us", "back-to-back us", "eager ms", "rel diff"],
        [[r["case"], "on" if r["fast_launch"] else "off", r["host_us"], r["loop_us"], r["eager_ms"],
          f"{r['rel_diff_to_triton_path']:.1e}"] for r in rows]))
    if args.out:
        harness.write_json(args.out, {"env": harness.environment(dev), "benchmark": "launch overhead",
                                      "config": {"dtype": str(dtype), "reps": args.reps, "r": 16, "p": 0.05},
                                      "rows": rows})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
