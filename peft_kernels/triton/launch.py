"""Every Triton launch of the package goes through ``launch``: kernel[grid](*args, **meta), fitted to
the running GPU's shared memory.

Software pipelining (``num_stages``) keeps that many tiles of each operand in flight in shared
memory. The tile tables were tuned on an H100 (227 KiB per block); an A100 has 163 KiB and consumer
Ampere/Ada GPUs 99 KiB, and at large ranks or in fp32 some configurations ask for more. Triton
then refuses the launch (OutOfResources, raised before anything runs), so ``launch`` retries with
one stage fewer — same tiles, same result, loads less overlapped — and remembers, per kernel and
configuration, the count that fits. Where even one stage does not fit, it raises with the kernel,
the sizes and what to change. ``python -m peft_kernels.triton.compile_check`` replays this policy
against sm_80's and sm_90's limits on a machine without a GPU.

Fast relaunch (PEFT_KERNELS_FAST_LAUNCH=1, off by default until timed on a GPU): at small M a step
is bound by host time (benchmarks/NOTES.md, 2026-11-24), and Triton's ``kernel[grid](...)`` binds
and re-specializes every argument on every call before it reaches the compiled launcher. With the
flag, the CompiledKernel that a first ``kernel[grid]`` call returns is kept under a key finer than
Triton's specialization (every non-tensor argument by exact value; tensors by dtype and 16-byte
alignment, the only property Triton specializes them on), and later calls with the same key call
its launcher directly, exactly as ``JITFunction.run`` of triton 3.6 and 3.9 does. Anything unusual
(an argument of another type, launch hooks set) takes the normal path.
"""
from __future__ import annotations

import torch
from triton.runtime.errors import OutOfResources

from .. import env

DEFAULT_STAGES = 3  # Triton's own default on NVIDIA GPUs
FAST_LAUNCH = env.fast_launch() and not env.triton_interpret()

# (kernel, fast_key) -> (CompiledKernel, names of the parameters passed as keywords, in order).
# Sizes are part of the key, so varying sequence lengths add entries; bounded by clearing.
_COMPILED: dict = {}
FAST_LAUNCH_ENTRIES = 4096

# kernel -> {(configuration, dtypes, device): num_stages that fits}. Only kernels that once
# needed fewer stages appear, so the common path costs one membership test.
_FITTED: dict = {}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for host code. triton.cdiv is a ConstexprFunction: each Python call costs
    1.5-2.5 µs (triton 3.6 / 3.9), and a LoRA fwd+bwd made about 19 of them."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 (the smallest power of two >= n; 0 for 0), for host code (see cdiv)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def _key(args, meta):
    return (tuple(meta.items()),
            tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
            next((a.device for a in args if isinstance(a, torch.Tensor)), None))


def fast_key(args, meta):
    """A key that determines every specialization Triton makes for these arguments, or None when an
    argument is of a type this does not know: non-tensor arguments by type and exact value (so
    any constexpr too), tensors by dtype, device and whether the data pointer is 16-byte aligned."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append((a.dtype, a.device, a.data_ptr() % 16 == 0))
        elif a is None or isinstance(a, (bool, int, float)):
            parts.append((type(a), a))
        else:
            return None
    return tuple(parts), tuple(sorted(meta.items()))


def _launch_compiled(compiled, keyword_names, grid, args, meta):
    # JITFunction.run's last step (triton 3.6 and 3.9): the launcher takes every parameter in
    # signature order (constexprs included), after the grid, the stream and the kernel handle;
    # no launch metadata or hooks (none are set: _no_launch_hooks)
    values = list(args) + [meta[n] for n in keyword_names]
    g0, g1, g2 = tuple(grid) + (1,) * (3 - len(grid))
    stream = torch.cuda.current_stream().cuda_stream
    compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *values)
    return compiled


def launch(kernel, grid, *args, num_stages: int = DEFAULT_STAGES, **meta):
    """``kernel[grid](*args, num_stages=num_stages, **meta)``, with fewer stages where the GPU's
    shared memory requires it (see the module docstring)."""
    fitted = _FITTED.get(kernel)
    key = None
    if fitted is not None:
        key = _key(args, meta)
        num_stages = min(num_stages, fitted.get(key, num_stages))
    fast = None
    if FAST_LAUNCH and _no_launch_hooks():
        fast = fast_key(args, dict(meta, num_stages=num_stages, device=torch.cuda.current_device()))
        hit = _COMPILED.get((kernel, fast)) if fast is not None else None
        if hit is not None:
            return _launch_compiled(hit[0], hit[1], grid, args, meta)
    while True:
        try:
            compiled = kernel[grid](*args, num_stages=num_stages, **meta)
            if fast is not None and hasattr(compiled, "packed_metadata"):
                rest = tuple(kernel.arg_names[len(args):])
                if all(n in meta for n in rest):  # else a parameter has a default: keep Triton's path
                    if len(_COMPILED) >= FAST_LAUNCH_ENTRIES:  # e.g. a new M every batch: start over
                        _COMPILED.clear()
                    _COMPILED[kernel, fast] = (compiled, rest)
            return compiled
        except OutOfResources as exc:
            if exc.name != "shared memory" or num_stages <= 1:
                name = getattr(getattr(kernel, "fn", None), "__name__", str(kernel))
                raise RuntimeError(
                    f"peft_kernels: {name} with {dict(meta)} needs {exc.required} B of {exc.name} even at "
                    f"{num_stages} pipeline stage(s); this GPU allows {exc.limit} B. Use a smaller rank, a "
                    f"16-bit dtype, or backend='torch' for this layer.") from exc
            num_stages -= 1
            fast = None  # cached on the next call, under the fitted stage count
            key = key or _key(args, meta)
            _FITTED.setdefault(kernel, {})[key] = num_stages


def _no_launch_hooks() -> bool:
    """Whether no Triton launch hook is set (profilers such as proton add them; they need Triton's
    full launch path). Triton 3.6 and 3.9 hold them as HookChains, empty by default."""
    from triton import knobs

    def unset(hook):
        return hook is None or (isinstance(hook, knobs.HookChain) and not hook.calls)

    return unset(knobs.runtime.launch_enter_hook) and unset(knobs.runtime.launch_exit_hook)
