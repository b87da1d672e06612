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
"""
from __future__ import annotations

import torch
from triton.runtime.errors import OutOfResources

DEFAULT_STAGES = 3  # Triton's own default on NVIDIA GPUs

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


def launch(kernel, grid, *args, num_stages: int = DEFAULT_STAGES, **meta):
    """``kernel[grid](*args, num_stages=num_stages, **meta)``, with fewer stages where the GPU's
    shared memory requires it (see the module docstring)."""
    fitted = _FITTED.get(kernel)
    key = None
    if fitted is not None:
        key = _key(args, meta)
        num_stages = min(num_stages, fitted.get(key, num_stages))
    while True:
        try:
            return kernel[grid](*args, num_stages=num_stages, **meta)
        except OutOfResources as exc:
            if exc.name != "shared memory" or num_stages <= 1:
                name = getattr(getattr(kernel, "fn", None), "__name__", str(kernel))
                raise RuntimeError(
                    f"peft_kernels: {name} with {dict(meta)} needs {exc.required} B of {exc.name} even at "
                    f"{num_stages} pipeline stage(s); this GPU allows {exc.limit} B. Use a smaller rank, a "
                    f"16-bit dtype, or backend='torch' for this layer.") from exc
            num_stages -= 1
            key = key or _key(args, meta)
            _FITTED.setdefault(kernel, {})[key] = num_stages
