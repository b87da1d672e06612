"""The compiled CUDA C++ extension (csrc/): loaded on first use, never at import; remembers why not.

Two ways to get it: built by setup.py at install (``peft_kernels._C``: needs a CUDA build of torch
and nvcc, or PEFT_KERNELS_BUILD_CUDA=1), or, when the install skipped it, a JIT build of the same
sources with torch.utils.cpp_extension.load (ninja + nvcc) on first use when PEFT_KERNELS_JIT=1
(or ``load(jit=True)``). Its ops register under torch.ops.peft_kernels_cuda.
"""
from __future__ import annotations

import glob
import importlib
import os
import shutil

import torch

_state: dict = {}


def sources() -> list[str]:
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    return sorted(glob.glob(os.path.join(root, "*.cu")) + glob.glob(os.path.join(root, "*.cpp")))


def jit_unavailable_reason() -> str | None:
    """None when a JIT build could run here, else why not."""
    if torch.version.cuda is None:
        return "torch is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc / CUDA_HOME not found"
    if shutil.which("ninja") is None:
        return "ninja not installed"
    if not sources():
        return "csrc/ sources not found (installed without them)"
    return None


def _jit_build():
    from torch.utils.cpp_extension import load as cpp_load

    _state["archs"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or "this GPU"
    return cpp_load(name="peft_kernels_C", sources=sources(), extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3"],
                    verbose=os.environ.get("PEFT_KERNELS_JIT_VERBOSE") == "1")


def load(jit: bool | None = None):
    """The extension module, or None (then ``reason()`` says why). ``jit``: build it now if the
    install has none (default: PEFT_KERNELS_JIT=1)."""
    if "module" in _state:
        return _state["module"]
    try:
        _state["module"], _state["how"] = importlib.import_module("peft_kernels._C"), "built at install"
        try:
            from . import _cuda_build

            _state["archs"] = _cuda_build.ARCHS
        except ImportError:
            _state["archs"] = "?"
        return _state["module"]
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        _state["reason"] = f"extension peft_kernels._C not built or not loadable ({exc})"
    if jit is None:
        jit = os.environ.get("PEFT_KERNELS_JIT") == "1"
    if jit:
        why = jit_unavailable_reason()
        if why is not None:
            _state["reason"] += f"; JIT build impossible: {why}"
        else:
            _state["module"], _state["how"] = _jit_build(), "JIT-built"
            _state.pop("reason", None)
            return _state["module"]
    _state["module"] = None
    return None


def reason() -> str | None:
    load()
    return _state.get("reason")


# Run, not traced, under torch.compile: backend="auto" asks this while dynamo traces the op's
# Python wrapper, and a first load() imports (or builds) the extension, which dynamo cannot trace
# (with fullgraph=True that failed: tests/test_lora_gpu.py::test_inductor_compile_fullgraph on a GPU
# machine without the extension built). The answer is fixed for the process anyway. This is what
# torch.compiler.assume_constant_result does, without importing torch._dynamo here: that imports
# triton, and `import peft_kernels` must not (the CLI chooses TRITON_INTERPRET after it, before
# triton's import; tests/test_cuda_extension.py checks both).
reason._dynamo_marked_constant = True


def describe() -> str:
    """One line for info(): how the extension is available, or why not and whether JIT could help."""
    mod = load()
    if mod is not None:
        return f"{_state['how']} (archs {_state.get('archs', '?')}, ops {', '.join(getattr(mod, 'ops', ()))})"
    jit = jit_unavailable_reason()
    return f"{reason()}; " + ("a JIT build is available: PEFT_KERNELS_JIT=1" if jit is None
                              else f"no JIT build: {jit}")
