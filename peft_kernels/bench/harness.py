"""Timing, memory and JSON for the benchmarks.

GPU: CUDA events around each run, warm-up first, median of ``reps`` runs (ANCHORS.md's method).
CPU: wall clock, fewer reps; results are labelled as CPU figures.
Peak extra memory: the allocator's peak during one run minus what was allocated before it (CUDA).
Saved for backward (any device): the bytes autograd keeps between forward and backward that are
not storage of tensors alive before the step (inputs, weights), each storage counted once.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
import warnings
import weakref
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    for dist in ("triton", "peft", "transformers", "bitsandbytes", "torchao"):
        try:  # metadata, not an import: importing torchao alone prints a screen of warnings
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[dist] = None
    return env


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int | None = None, reps: int = 25) -> float:
    """Median milliseconds of fn() over ``reps`` runs after ``warmup`` runs (default min(5, reps))."""
    for _ in range(min(5, reps) if warmup is None else warmup):
        fn()
    _sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def add_device_argument(parser) -> None:
    """--device for the GPU sweep scripts; cpu is their smoke run (tests/test_benchmark_scripts.py)."""
    parser.add_argument("--device", default="cuda", help="cpu runs the Triton kernels interpreted "
                        "(TRITON_INTERPRET=1): a smoke run of the script, not a measurement")


def add_reps_argument(parser, default: int = 25) -> None:
    """--reps for the GPU sweep scripts: timed runs per case; their CPU smoke run takes 1."""
    parser.add_argument("--reps", type=positive_int, default=default,
                        help=f"timed runs per case, after min(5, reps) warm-up runs (default {default})")


def device_and_dtype(name: str) -> tuple[torch.device, torch.dtype]:
    """A sweep script's device and dtype: bf16 on a GPU; fp32 elsewhere, since the Triton
    interpreter mishandles bf16 (its tl.dot returns garbage and its casts to bf16 truncate)."""
    device = torch.device(name)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def host_us(fn, n: int = 300, warmup: int = 30) -> float:
    """Host (CPU) microseconds to issue one fn() call, median over ``n`` calls, each started with
    the device idle: the launch queue never fills, so the figure never includes waiting on the
    device. (A loop of calls without syncs, ``loop_us``, measures max(host, device) once the
    device is the slower one: queued launches block the host.)"""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        _sync_all()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    _sync_all()
    return statistics.median(times) * 1e6


def loop_us(fn, n: int = 300, warmup: int = 30) -> float:
    """Microseconds per call of ``n`` back-to-back fn() calls, the device left to run
    asynchronously: the step time when host and device overlap, i.e. about max(host_us, device
    time). Above host_us, the device is what limits."""
    for _ in range(warmup):
        fn()
    _sync_all()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync_all()
    return (time.perf_counter() - t0) / n * 1e6


def _sync_all():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms_graphed(fn, device: torch.device, reps: int = 25) -> float | None:
    """Median ms of replaying fn() captured in a CUDA graph: the device time with the host's
    launch overhead removed (what a graphed / reduce-overhead training step sees). None on CPU
    or if fn cannot be captured."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # report, do not hide: the JSON records None and the reason
        print(f"\n  (CUDA graph capture failed: {type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
        return None
    ms = time_ms(graph.replay, device, warmup=3, reps=reps)
    del graph
    return ms


def peak_extra_mib(fn, device: torch.device) -> float | None:
    """Peak memory above the current allocation during one fn() (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _storages(t: torch.Tensor) -> list[tuple[int, int]]:
    """(data pointer, bytes) of the storages behind ``t``: its own, or for a wrapper subclass
    (torchao's NF4Tensor) its inner tensors'; none for fake / functional tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [s for name in names for s in _storages(getattr(t, name))]
    try:
        st = t.untyped_storage()
        return [(st.data_ptr(), st.nbytes())]
    except (RuntimeError, NotImplementedError):  # no real storage (torch.compile's fake tensors)
        return []


def _live_storages() -> set[int]:
    """Data pointers of the storages of every tensor Python holds now."""
    known = set()
    with warnings.catch_warnings():  # isinstance on every live object trips deprecation properties
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            try:
                is_tensor = isinstance(o, torch.Tensor)
            except ReferenceError:  # a weakproxy whose object is gone (torch.compile leaves some)
                continue
            if is_tensor:
                known.update(ptr for ptr, _ in _storages(o))
    return known


def saved_mib(forward) -> float:
    """MiB that autograd keeps for backward after one forward(): the tensors its ops saved
    (saved_tensors_hooks) that the graph still holds when forward returns — not those of nodes
    already freed, e.g. behind a .detach() — and whose storage did not exist before the call,
    each storage once. A device-independent part of a training step's memory (activations held
    until backward); the output itself counts only where an op saves it."""
    known = _live_storages()
    packed: list[weakref.ref] = []

    def pack(t):
        alias = t.detach()  # held by the graph instead of t: no t -> grad_fn -> t cycle keeps it alive
        packed.append(weakref.ref(alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    kept: dict[int, int] = {}
    for ref in packed:
        t = ref()
        if t is not None:
            kept.update((ptr, n) for ptr, n in _storages(t) if ptr not in known)
    del out
    return sum(kept.values()) / 2**20


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, label: str = ""):
        self.total, self.done, self.label = total, 0, label

    def step(self, what: str):
        self.done += 1
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {what:<40}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def write_json(path: str | Path, payload: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def fwd_bwd_step(forward, params, grad_out, forward_only: bool = False):
    """A callable running forward() then backward(grad_out), clearing the grads of ``params``
    first (so no accumulation kernel is timed); forward() only with ``forward_only``."""
    if forward_only:
        return forward

    def run():
        for t in params:
            t.grad = None
        forward().backward(grad_out)
    run.forward = forward  # for saved_mib
    return run


def frozen_layer_inputs(M: int, K: int, N: int, device, dtype):
    """One shape's seeded inputs for a fwd+bwd benchmark of a frozen layer: (x [M, K] requiring grad,
    the frozen weight w [N, K], step(forward, params) — fwd_bwd_step against a fixed random dY
    [M, N] —, {"floor": the step of F.linear(x, w)}: the case every ratio is taken against)."""
    torch.manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    dy = torch.randn(M, N, device=device, dtype=dtype)

    def step(forward, params):
        return fwd_bwd_step(forward, params, dy)

    return x, w, step, {"floor": step(lambda: torch.nn.functional.linear(x, w), [x])}


def peft_layer(cfg, w: torch.Tensor | None = None, base: torch.nn.Module | None = None):
    """HF PEFT's layer for ``cfg`` (target_modules=["proj"]) around one frozen layer: ``base`` (e.g. a
    bitsandbytes Linear4bit) when given, else a bias-free nn.Linear holding ``w`` [N, K]; adapters
    as PEFT makes them (autocast_adapter_dtype=False: in the base's dtype)."""
    import peft

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            if base is not None:
                self.proj = base
            else:
                self.proj = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
                self.proj.weight.data.copy_(w)

    return peft.get_peft_model(Holder(), cfg, autocast_adapter_dtype=False).base_model.model.proj


def run_shapes(label: str, shapes, make_cases, device: torch.device, reps: int) -> dict:
    """Time every case of every shape. make_cases(M, K, N) -> {name: fwd+bwd callable}, one named
    "floor" first (the frozen-layer baseline every ratio is taken against)."""
    results = []
    progress = Progress(len(shapes), label)
    for M, K, N in shapes:
        progress.step(f"{M}x{K}->{N}")
        named = make_cases(M, K, N)
        floor = floor_g = None
        for name, fn in named.items():
            ms = time_ms(fn, device, warmup=5 if device.type == "cuda" else 2, reps=reps)
            mem = peak_extra_mib(fn, device)
            # torch.compile cases: not graphed, and saved-tensor hooks would change what they compile
            compiled = "compile" in name
            saved = saved_mib(fn.forward) if hasattr(fn, "forward") and not compiled else None
            # a case that syncs with the device inside its step cannot be captured (graphable = False)
            graphed = time_ms_graphed(fn, device, reps) if not compiled and getattr(fn, "graphable", True) else None
            if name == "floor":
                floor, floor_g = ms, graphed
            results.append({"M": M, "K": K, "N": N, "case": name, "ms": ms, "ratio": ms / floor,
                            "graphed_ms": graphed,
                            "graphed_ratio": graphed / floor_g if graphed and floor_g else None,
                            "peak_extra_mib": mem, "saved_mib": saved})
        del named
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "env": environment(device),
        "config": {"reps": reps,
                   "timing": "median of reps, CUDA events" if device.type == "cuda" else "median wall clock (CPU)",
                   "graphed": "the same step captured in one CUDA graph and replayed: device time without "
                              "host launch overhead (torch.compile cases are not captured)"},
        "results": results,
    }


def results_table(payload: dict) -> str:
    rows = [[f"{r['M']}x{r['K']}->{r['N']}", r["case"], r["ms"], f"{r['ratio']:.2f}x",
             r.get("graphed_ms"), None if r.get("graphed_ratio") is None else f"{r['graphed_ratio']:.2f}x",
             None if r["peak_extra_mib"] is None else round(r["peak_extra_mib"]),
             r.get("saved_mib")] for r in payload["results"]]
    return markdown_table(["M x K -> N", "case", "ms", "/ floor", "graphed ms", "graphed / floor",
                           "peak extra MiB", "saved for bwd MiB"], rows)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def device_arg(text: str) -> torch.device:
    """argparse type: a torch device that exists here (cuda only with a CUDA GPU present)."""
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU here (torch {torch.__version__}, "
                                             f"cuda {torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: the benchmarks run on cpu or cuda")
    return device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_bench_args(ap):
    """The options every shape benchmark takes: --device, --shapes, --reps, --plot, --out."""
    ap.add_argument("--device", type=device_arg, default=default_device())
    ap.add_argument("--shapes", type=parse_shapes, default=None, help="comma-separated MxKxN list, e.g. 8192x4096x4096")
    ap.add_argument("--reps", type=positive_int, default=None, help="timed repetitions (median)")
    ap.add_argument("--plot", default=None, help="write a PNG chart here (needs matplotlib)")
    ap.add_argument("--out", default=None, help="write the JSON here")
    return ap


def bench_setup(args, gpu_shapes, cpu_shapes):
    """(device, shapes, dtype, reps) from add_bench_args' options: bf16 on a GPU, fp32 small
    shapes on CPU (said on stderr: those are CPU figures)."""
    device = args.device
    gpu = device.type == "cuda"
    shapes = args.shapes or (gpu_shapes if gpu else cpu_shapes)
    if not gpu:
        print("No CUDA device: timing the CPU reference backend (and the Triton kernels under "
              "TRITON_INTERPRET=1, when set) on small fp32 shapes. These are CPU figures, not the GPU "
              "kernels' speed.", file=sys.stderr)
    return device, shapes, torch.bfloat16 if gpu else torch.float32, args.reps or (25 if gpu else 3)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """"8192x4096x4096,1024x4096x4096" -> [(8192, 4096, 4096), (1024, 4096, 4096)] (M x K x N,
    each >= 1). Also an argparse type: a bad list is a usage error naming the item."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            shape = tuple(int(v) for v in parts)
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise argparse.ArgumentTypeError(f"shape {item!r}: expected MxKxN with M, K, N >= 1, "
                                             "e.g. 8192x4096x4096")
        shapes.append(shape)
    return shapes


def plot(payload: dict, path: str):
    """A PNG bar chart of every case's time / floor (hatched: CUDA-graphed), one group per shape."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'peft_kernels[bench]'") from None
    results = payload["results"]
    shapes = list(dict.fromkeys(f"{r['M']}x{r['K']}->{r['N']}" for r in results)) if "M" in results[0] else [""]
    cases = list(dict.fromkeys(r["case"] for r in results))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shapes) * max(1, len(cases)) / 3), 4.5))
    width = 0.8 / len(cases)
    for i, case in enumerate(cases):
        for j, shape in enumerate(shapes):
            r = next((r for r in results if r["case"] == case and (not shape or
                      f"{r['M']}x{r['K']}->{r['N']}" == shape)), None)
            if r is None:
                continue
            x = j + i * width
            ax.bar(x, r["ratio"], width, color=f"C{i}", label=case if j == 0 else None)
            if r.get("graphed_ratio"):
                ax.bar(x, r["graphed_ratio"], width, color="none", edgecolor="k", hatch="//")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes)
    ax.set_ylabel("time / frozen floor")
    env = payload["env"]
    ax.set_title(f"{payload.get('benchmark', '')} — {env['device']}, torch {env['torch']}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: str | Path, payload: dict, title: str, table: str):
    """The JSON at ``out`` and, beside it (same name, .md), the markdown table under a title line."""
    write_json(out, payload)
    markdown = Path(out).with_suffix(".md")
    markdown.write_text(f"{title}\n\n{table}\n")
    print(f"wrote {out} and {markdown}")


def report(payload: dict, out: str | None, plot_path: str | None = None):
    """Print the device line and the results table; write the JSON (and the table as markdown
    beside it) when ``out`` is given, and a PNG chart when ``plot_path`` is."""
    env = payload["env"]
    title = f"{env['device']} — torch {env['torch']}, triton {env['triton']}"
    table = results_table(payload)
    print(f"\n{title}")
    print(table)
    if out:
        write_report(out, payload, f"**{payload.get('benchmark', 'benchmark')}** — {title}", table)
    if plot_path:
        plot(payload, plot_path)
        print(f"wrote {plot_path}")
