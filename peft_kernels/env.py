"""Every PEFT_KERNELS_* environment variable, read in one place.

PEFT_KERNELS_BACKEND      overrides backend="auto": one of torch, triton, cuda.
PEFT_KERNELS_BUILD_CUDA   setup.py: 1 forces the CUDA extension build, 0 skips it.
PEFT_KERNELS_FAST_LAUNCH  1 relaunches compiled Triton kernels without Triton's per-call binding
                          (peft_kernels/triton/launch.py; off by default: not yet timed on a GPU).
TRITON_INTERPRET          (Triton's own) 1 runs Triton kernels on CPU tensors; peft_kernels then
                          offers the triton backend for CPU tensors too.
"""
import os

BACKENDS = ("torch", "triton", "cuda")


def backend_override() -> str | None:
    value = os.environ.get("PEFT_KERNELS_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"PEFT_KERNELS_BACKEND={value!r}: expected one of auto, {', '.join(BACKENDS)}")
    return value


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fast_launch() -> bool:
    return os.environ.get("PEFT_KERNELS_FAST_LAUNCH", "0") not in ("", "0")
