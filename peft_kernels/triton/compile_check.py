"""Compile every Triton kernel of the package for a GPU target, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not that they compile: a
kernel can pass every CPU test and still fail on the GPU (an op the code generator rejects, a bf16
path the interpreter runs differently, tiles that ask for more shared memory than the GPU has).
This check runs the real host functions with the real launch configurations (GPU-sized tensors on
the meta device where the host logic depends only on shapes), intercepts each launch, and compiles
that exact specialization to a cubin with Triton's own compiler and ptxas for sm_80 / sm_90; it
reports each kernel's shared memory against the architecture's per-block limit, and its registers
and spills as read from the cubin. Nothing runs.

    python -m peft_kernels.triton.compile_check [--arch 80,90] [--quick] [--dtypes bfloat16,float16,float32]

Exit status 1 if any launch fails to compile, or does not fit the target's shared memory even
after peft_kernels.triton.launch has lowered its pipeline stages (which the check replays).
Must run without TRITON_INTERPRET (it swaps Triton's active driver for a stand-in naming the
target, and makes every kernel[grid](...) launch compile-only, for its own process).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

# Per-block shared memory a kernel may use (opt-in maximum), bytes: CUDA C programming guide,
# compute capabilities table (8.0: 163 KB, 9.0: 227 KB).
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


DTYPE_NAMES = {_dtype_name(dt): dt for dt in DTYPES}  # --dtypes' names


@dataclasses.dataclass
class Launch:
    scenario: str
    kernel: str
    dtype: str
    shared: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    registers: int | None = None  # per thread, from the cubin (cuobjdump -res-usage)
    local: int | None = None  # local memory bytes per thread: > 0 means register spills
    error: str | None = None


_USAGE: dict = {}


def _resource_usage(kernel) -> tuple[int | None, int | None]:
    """(registers, local bytes) per thread of a compiled kernel, read from its cubin with the
    cuobjdump Triton ships; (None, None) if that tool is unavailable."""
    key = kernel.asm["cubin"]  # not id(kernel): kernels are dropped per target and ids get reused
    if key not in _USAGE:
        try:
            from triton import knobs
            tool = knobs.nvidia.cuobjdump.path
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
            regs, local = re.search(r"REG:(\d+).*LOCAL:(\d+)", text).groups()
            _USAGE[key] = (int(regs), int(local))
        except Exception:
            _USAGE[key] = (None, None)
    return _USAGE[key]


class _TargetDriver:
    """Stands in for Triton's GPU driver: names the target; device 0, stream 0."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


@contextlib.contextmanager
def compile_only(arch: int, record: list, scenario: list):
    """Within: every ``kernel[grid](...)`` compiles its specialization for sm_<arch> (JITFunction
    warmup: no launch) and appends a Launch to ``record``; ``scenario`` holds the caller's
    (name, dtype). A kernel asking for more shared memory than sm_<arch> has raises
    OutOfResources as the real launch would, so triton.launch's fitting policy runs as on a GPU."""
    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    limit = SHARED_LIMIT[arch]
    original = JITFunction.__getitem__
    touched: set = set()

    def getitem(self, grid):
        def launch(*args, **kwargs):
            if self not in touched:  # compiled binders are cached per device: start clean per target
                self.device_caches.clear()
                touched.add(self)
            entry = Launch(scenario[0], self.fn.__name__, scenario[1])
            try:
                kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            except Exception as exc:  # recorded and reported; the check fails
                text = str(exc).strip()
                entry.error = f"{type(exc).__name__}: {text.splitlines()[-1][:200] if text else ''}"
                record.append(entry)
                return
            if kernel.metadata.shared > limit:  # what the GPU's launch would do (before running anything)
                raise OutOfResources(kernel.metadata.shared, limit, "shared memory")
            entry.shared = kernel.metadata.shared
            entry.num_warps, entry.num_stages = kernel.metadata.num_warps, kernel.metadata.num_stages
            entry.registers, entry.local = _resource_usage(kernel)
            record.append(entry)
        return launch

    from . import launch as launch_policy

    fitted = dict(launch_policy._FITTED)  # stage counts fitted to another target must not carry over
    launch_policy._FITTED.clear()
    previous = driver._active  # None on a machine without a GPU: reset_active() would raise there
    driver.set_active(_TargetDriver(arch))
    JITFunction.__getitem__ = getitem
    try:
        yield
    finally:
        JITFunction.__getitem__ = original
        driver._active = previous
        launch_policy._FITTED.clear()
        launch_policy._FITTED.update(fitted)
        for fn in touched:  # drop the stand-in target's binders and kernels
            fn.device_caches.clear()


# ----------------------------------------------------------------------------- scenarios
# Each yields (name, thunk); a thunk calls host functions whose launches get compiled.

META = torch.device("meta")


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device=META)


def _sweeps(dtype, quick) -> bool:
    """Whether to compile the configurations only a GPU sweep or a size rule picks (fused-kernel
    sizes, decode and split-K candidates, decoder tiles). --quick keeps them for bf16, the dtype
    trained on a GPU; fp16 / fp32 compile the default configurations at the smallest and largest
    sizes, which hold the shared-memory extremes."""
    return not quick or dtype == torch.bfloat16


def _lora_scenarios(dtype, quick):
    from . import lora as L
    K = N = 4096
    cases = itertools.product((16, 64, 256), (0.0, 0.05), (8192, 16))
    if quick:  # r=16 as trained; r=256 (the largest tiles) with dropout in bf16 (in fp32 it compiles for
        # minutes: ptxas on 255-register kernels; the full check has it)
        cases = [(16, p, M) for p in (0.0, 0.05) for M in (8192, 16)]
        cases += [(256, 0.05, M) for M in (8192, 16)] if dtype == torch.bfloat16 else []
    sizes = (1, 16, 64, L.FUSED_LIMIT) if _sweeps(dtype, quick) else (1, L.FUSED_LIMIT)
    for r, p, M in cases:
        x, w = _meta(M, K, dtype=dtype), _meta(N, K, dtype=dtype)
        a, b, bias = _meta(r, K, dtype=dtype), _meta(N, r, dtype=dtype), _meta(N, dtype=dtype)
        seed = _meta(1, dtype=torch.int64)

        def run(x=x, w=w, a=a, b=b, bias=bias, seed=seed, p=p, sizes=sizes):
            with L.launch_override(sms=132):
                y, u = L.lora_forward(x, w, a, b, bias, 2.0, p, seed)
                L.lora_backward(y, x, w, a, b, u, 2.0, p, seed, True)
                L.lora_backward(y, x, w, a, b, u, 2.0, p, seed, False)
                if x.shape[0] <= L.FUSED_LIMIT:
                    for m in sizes:
                        xm, ym = x[:1].expand(m, -1).contiguous(), y[:1].expand(m, -1).contiguous()
                        with L.launch_override(fused_max_m=L.FUSED_LIMIT, fused_bwd_max_m=L.FUSED_LIMIT):
                            L.lora_forward(xm, w, a, b, bias, 2.0, p, seed)
                            L.lora_forward(xm, w, a, b, None, 2.0, p, seed)
                            L.lora_backward(ym, xm, w, a, b, u[:1].expand(m, -1).contiguous(), 2.0, p, seed, True)
                        if m == 16:  # the forward with K split, at the decode size it is meant for
                            with L.launch_override(fused_max_m=L.FUSED_LIMIT, fused_split=4, fused_bn=64):
                                L.lora_forward(xm, w, a, b, bias, 2.0, p, seed)
        yield f"lora M={M} r={r} p={p}", run


def _dora_scenarios(dtype, quick):
    from . import dora as D
    from .lora import launch_override
    K = N = 4096
    for r, p in ((16, 0.0), (16, 0.05)) if quick else itertools.product((16, 64, 256), (0.0, 0.05)):
        x, w = _meta(8192, K, dtype=dtype), _meta(N, K, dtype=dtype)
        a, b, bias = _meta(r, K, dtype=dtype), _meta(N, r, dtype=dtype), _meta(N, dtype=dtype)
        mn, seed = _meta(N, dtype=torch.float32), _meta(1, dtype=torch.int64)

        def run(x=x, w=w, a=a, b=b, bias=bias, mn=mn, seed=seed, p=p, r=r):
            with launch_override(sms=132):
                y, u, ws = D.dora_forward(x, w, a, b, mn, bias, 2.0, p, seed)
                D.dora_backward(y, x, w, a, b, u, ws, mn, 2.0, p, seed, True)
                D.dora_backward(y, x, w, a, b, u, ws, mn, 2.0, p, seed, False)
                if p == 0.0 and r <= D.NORM_MAX_RANK:  # the one-launch row norm: both A·Aᵀ and ‖W_i‖² paths
                    D.weight_norm(w, a, b, 2.0)
                    D.weight_norm(w, a.float(), b.float(), 2.0, mn)
        yield f"dora M=8192 r={r} p={p}", run

    from . import quant_matmul as Q
    for M in (8192, 16):  # QDoRA over NF4: the 4-bit matmul in the DoRA positions (dY·W without C too)
        parts = _meta_4bit_parts(N, K, 64, True)
        x, a, b = _meta(M, K, dtype=dtype), _meta(16, K, dtype=dtype), _meta(N, 16, dtype=dtype)
        mn, seed = _meta(N, dtype=torch.float32), _meta(1, dtype=torch.int64)

        def qrun(x=x, a=a, b=b, mn=mn, seed=seed, parts=parts):
            with launch_override(sms=132):
                y, u, ws = Q.qdora_forward(x, parts, 64, (N, K), a, b, mn, None, 2.0, 0.05, seed)
                Q.qdora_backward(y, x, parts, 64, (N, K), a, b, u, ws, mn, 2.0, 0.05, seed, True)
        yield f"qdora nf4 M={M} r=16 p=0.05", qrun


def _meta_4bit_parts(N, K, blocksize, nested):
    n_blocks = N * K // blocksize
    code = _meta(16, dtype=torch.float32)
    if nested:
        return (_meta(N * K // 2, 1, dtype=torch.uint8), _meta(n_blocks, dtype=torch.uint8), code,
                _meta((n_blocks + 255) // 256, dtype=torch.float32), _meta(256, dtype=torch.float32),
                _meta((), dtype=torch.float32))
    return (_meta(N * K // 2, 1, dtype=torch.uint8), _meta(n_blocks, dtype=torch.float32), code, None, None, None)


def _quant_scenarios(dtype, quick):
    from . import quant_matmul as Q
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (14336, 4096), (65536, 32768)]  # the last is WIDE
    for (N, K), bs, nested in itertools.product(shapes, (64,) if quick else (64, 128, 256), (True, False)):
        parts = _meta_4bit_parts(N, K, bs, nested)

        def run(parts=parts, N=N, K=K, bs=bs, sweeps=_sweeps(dtype, quick)):
            for M, path in ((16, None), (8192, None), (16, "fused_aligned"), (1024, "fused_aligned")):
                x, dy = _meta(M, K, dtype=dtype), _meta(M, N, dtype=dtype)
                bias = _meta(N, dtype=dtype)
                Q.matmul_4bit(x, *parts, bs, (N, K), path=path)
                if path == "fused_aligned" and M == 16:  # the split-K forward with its epilogue
                    Q.matmul_4bit(x, *parts, bs, (N, K), bias=bias, c=_meta(M, N, dtype=dtype), path="splitk")
                    for tiles in Q.DECODE_CANDIDATES if sweeps else ():  # the decode candidates swept on a GPU
                        Q.matmul_4bit(x, *parts, bs, (N, K), path=path, tiles=tiles)
                    for tiles in Q.SPLITK_CANDIDATES if sweeps else ():  # split-K without epilogue
                        Q.matmul_4bit(x, *parts, bs, (N, K), path="splitk", tiles=tiles)
                Q.matmul_4bit(x, *parts, bs, (N, K), bias=bias, c=_meta(M, N, dtype=dtype), path=path)
                Q.matmul_4bit(dy, *parts, bs, (N, K), transpose=True, c=_meta(M, K, dtype=dtype), path=path)
            for tiles in (None, (32, 4, 8), (64, 2, 8)) if sweeps else (None,):  # the aligned decoder, default and swept
                Q.dequantize_window(*parts, bs, (N, K), 0, 64, 0, K, _meta(64, K, dtype=dtype), tiles=tiles)
            Q.dequantize_window(*parts, bs, (N, K), 0, 64, 1, K - 1, _meta(64, K - 1, dtype=dtype))  # any window
        yield f"4-bit matmul {N}x{K} blocksize={bs} nested={nested}", run
    if dtype == torch.float32:  # the quantizer reads float weights of any dtype; one set of blocksizes
        return
    from .quantize import quantize_4bit, quantize_nested
    for bs in (64, 128, 256):
        def run(bs=bs):
            quantize_4bit(torch.randn(64, 256).to(dtype), "nf4", bs)
        yield f"quantize blocksize={bs}", run
    if dtype == torch.bfloat16:  # the nested quantizer reads fp32 absmax only
        yield "quantize nested", lambda: quantize_nested(torch.rand(1000), torch.zeros(()))


def _sparse_scenarios(dtype, quick):
    from . import sparse as S
    M, N, K = 512, 96, 128  # CPU tensors: the host code reads the index; configurations do not depend on size
    gy, x = torch.randn(M, N).to(dtype), torch.randn(M, K).to(dtype)
    index = torch.randperm(N * K)[:40].sort().values.to(torch.int32)

    def unstructured():
        S.sddmm(gy, x, index, (N, K), None, method="gather_t")

    yield "sddmm gather_t", unstructured
    for bh, bw in ((32, 32),) if quick else ((32, 32), (16, 64), (1, 128), (128, 128)):
        blocks = torch.randperm((N // bh) * (K // bw))[:3].sort().values.to(torch.int32)

        def block(bh=bh, bw=bw, blocks=blocks):
            S.sddmm(gy, x, blocks, (N, K), (bh, bw))
            values = torch.randn(blocks.numel() * bh * bw).to(dtype)
            state = [torch.zeros(values.numel()) for _ in range(2)] + [torch.zeros(values.numel(), dtype=torch.int32)]
            S.sparse_adamw_(values, values.float(), *state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=0.01, merged=torch.randn(N, K).to(dtype), index=blocks, shape=(N, K),
                            block=(bh, bw), base=values.clone())
        yield f"sddmm + sparse_adamw block={bh}x{bw}", block

    def adamw_plain():
        values = torch.randn(40).to(dtype)
        state = [torch.zeros(40) for _ in range(2)] + [torch.zeros(40, dtype=torch.int32)]
        S.sparse_adamw_(values, values.float(), *state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        S.sparse_adamw_(values, values.float(), *state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                        merged=torch.randn(N, K).to(dtype), index=index, shape=(N, K), base=values.clone())
    yield "sparse_adamw", adamw_plain

    def merge():  # the temporary merge and its restore (_merge_launch: merge_at keeps bf16 on CPU in torch)
        w, blocks = torch.randn(N, K).to(dtype), torch.tensor([0, 5], dtype=torch.int32)
        for idx, blk in ((index, None), (blocks, (32, 32))):
            n = idx.numel() * (1 if blk is None else 32 * 32)
            values, saved = torch.randn(n), torch.empty(n).to(dtype)
            S._merge_launch(w, values, idx, (N, K), blk, None, saved, True, False)
            S._merge_launch(w, values.to(dtype), idx, (N, K), blk, saved, None, False, False)
            S._merge_launch(w, values, idx, (N, K), blk, None, saved, False, True)
    yield "sparse merge_at / restore_at", merge


def _sparse_embedding_scenarios(dtype, quick):
    from . import sparse_embedding as E
    V, d = 1000, 64  # CPU tensors: the host code reads ids and the index; configurations do not depend on size
    weight, ids = torch.randn(V, d).to(dtype), torch.randint(0, V, (300,))
    index = torch.randperm(V * d)[:500].sort().values.to(torch.int32)

    def run():
        E.forward(ids, weight, torch.randn(500), index)
        E.backward(torch.randn(300, d).to(dtype), ids, index, V, 7)
    yield "sparse_embedding fwd + bwd", run


def _deterministic_scenarios(dtype, quick):
    """Launches under torch.use_deterministic_algorithms(True): the split reductions store one
    slice per split instead of adding atomically (other specializations; peft_kernels.determinism)."""
    wanted = ("lora M=8192 r=16 p=0.05", "lora M=16 r=16 p=0.05", "dora M=8192 r=16 p=0.05",
              "sddmm + sparse_adamw block=32x32")
    for make in (_lora_scenarios, _dora_scenarios, _sparse_scenarios):
        for name, fn in make(dtype, True):
            if name in wanted:
                def run(fn=fn):
                    before = torch.are_deterministic_algorithms_enabled()
                    torch.use_deterministic_algorithms(True)
                    try:
                        fn()
                    finally:
                        torch.use_deterministic_algorithms(before)
                yield f"deterministic {name}", run


SCENARIOS = (_lora_scenarios, _dora_scenarios, _quant_scenarios, _sparse_scenarios, _sparse_embedding_scenarios,
             _deterministic_scenarios)


def kernels_in_package() -> set[str]:
    """Names of every @triton.jit kernel (``*_kernel``) in peft_kernels.triton's modules."""
    from triton.runtime.jit import JITFunction

    from . import dora, lora, quant_matmul, quantize, sparse, sparse_embedding
    return {name for mod in (lora, dora, quant_matmul, quantize, sparse, sparse_embedding)
            for name, obj in vars(mod).items()
            if isinstance(obj, JITFunction) and name.endswith("_kernel")}


def check(arch: int, quick: bool = False, progress: bool = True, only: str | None = None,
          dtypes=DTYPES) -> list[Launch]:
    record: list[Launch] = []
    scenario = ["-", "-"]
    thunks = [(name, _dtype_name(dt), fn)
              for dt in dtypes for make in SCENARIOS for name, fn in make(dt, quick)
              if only is None or only in f"{name} [{_dtype_name(dt)}]"]
    with compile_only(arch, record, scenario):
        for i, (name, dtype, fn) in enumerate(thunks):
            scenario[:] = [name, dtype]
            name = f"{name} [{dtype}]"
            if progress:
                sys.stderr.write(f"\rsm_{arch} [{i + 1}/{len(thunks)}] {name:<60}")
                sys.stderr.flush()
            try:
                fn()
            except Exception as exc:  # host code failing before a launch is a failure too
                record.append(Launch(name, "(host code)", dtype, error=f"{type(exc).__name__}: {exc}"[:200]))
    if progress:
        sys.stderr.write("\n")
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m peft_kernels.triton.compile_check",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (80, 90)")
    ap.add_argument("--quick", action="store_true",
                    help="ranks 16 and 256 (bf16) only, one blocksize, one sparse block shape; the swept "
                         "configurations in bf16 only")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32",
                    help="comma-separated dtypes of the scenarios (default: all three)")
    ap.add_argument("--only", default=None, help="scenarios whose name contains this text (e.g. 'lora M=16')")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check compiles for a GPU: run it without TRITON_INTERPRET", file=sys.stderr)
        return 2
    from ..bench.harness import markdown_table
    try:
        dtypes = tuple(DTYPE_NAMES[d.strip()] for d in args.dtypes.split(","))
    except KeyError as exc:
        print(f"unknown dtype {exc.args[0]!r}: expected some of {', '.join(DTYPE_NAMES)}", file=sys.stderr)
        return 2
    failed = False
    expected = kernels_in_package()
    for arch in (int(a) for a in args.arch.split(",")):
        if arch not in SHARED_LIMIT:
            print(f"unknown arch {arch}: expected one of {sorted(SHARED_LIMIT)}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        record = check(arch, args.quick, only=args.only, dtypes=dtypes)
        if not record:
            print(f"no scenario matches --only {args.only!r}", file=sys.stderr)
            return 2
        limit = SHARED_LIMIT[arch]
        summary: dict = {}
        for e in record:
            row = summary.setdefault((e.kernel, e.dtype), dict(n=0, shared=0, regs=0, local=0, stages=9, errors=[]))
            row["n"] += 1
            row["stages"] = min(row["stages"], e.num_stages or 9)
            row["shared"] = max(row["shared"], e.shared or 0)
            row["regs"] = max(row["regs"], e.registers or 0)
            row["local"] = max(row["local"], e.local or 0)
            if e.error:
                row["errors"].append(f"{e.scenario}: {e.error}")
        rows = [[k, dt, v["n"], round(v["shared"] / 1024, 1), None if v["stages"] == 9 else v["stages"], v["regs"],
                 v["local"], "ok" if not v["errors"] else v["errors"][0]] for (k, dt), v in sorted(summary.items())]
        print(f"\nsm_{arch}: {len(record)} launches compiled in {time.perf_counter() - t0:.0f} s "
              f"(shared memory limit {limit // 1024} KiB per block)")
        print(markdown_table(["kernel", "dtype", "launches", "max shared KiB", "min stages", "max regs",
                              "max spill B", "result"], rows))
        spills = sorted({(e.scenario, e.kernel, e.local) for e in record if e.local})
        if spills:  # a performance warning, not a failure: the kernel still runs correctly
            print("spilling registers (local bytes per thread):")
            for name, kernel, local in spills:
                print(f"  {kernel} {local} B — {name}")
        # with --only, or without bf16 (the one dtype every scenario has), a subset runs: kernels outside
        # it are not missing
        complete = args.only is None and torch.bfloat16 in dtypes
        missing = expected - {e.kernel for e in record if not e.error} if complete else set()
        if missing:
            print(f"never compiled: {', '.join(sorted(missing))}")
        failed |= bool(missing) or any(v["errors"] for v in summary.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
