"""Build script: the pure-Python package always; the CUDA extension peft_kernels._C only when
csrc/ has sources, a CUDA build of torch is installed and nvcc is found (or
PEFT_KERNELS_BUILD_CUDA=1 forces it, =0 skips it). A CPU install never fails for lack of CUDA.

torch is imported lazily, inside the function, so metadata queries work without it.
"""
import glob
import os
import sys

from setuptools import setup


def _cuda_extensions():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    flag = os.environ.get("PEFT_KERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        print("peft_kernels: PEFT_KERNELS_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    if not sources:
        print("peft_kernels: csrc/ has no kernel sources yet, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print("peft_kernels: torch not importable at build time, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    if flag != "1" and (torch.version.cuda is None or CUDA_HOME is None):
        print(
            "peft_kernels: no CUDA build of torch or no nvcc (torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={CUDA_HOME}); skipping the CUDA extension",
            file=sys.stderr,
        )
        return [], {}
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    ext = CUDAExtension(
        "peft_kernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
