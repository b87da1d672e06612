"""info(): what this machine offers peft_kernels, and why a backend is unavailable."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import backends, cuda, determinism, env


def info() -> dict:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    out = {
        "peft_kernels": __import__("peft_kernels").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": env.triton_interpret(),
        "backend_override": env.backend_override(),
        # torch.use_deterministic_algorithms: split reductions by slices, no cuda backend (determinism.py)
        "deterministic": determinism.enabled(),
        "cuda_extension": cuda.describe(),
        "auto_rules": {op: [list(rule) for rule in rules] for op, rules in backends.AUTO_RULES.items()},
        "triton_paths": triton_paths(),
        "integrations": integrations(),
        "patch_peft_model": patched_peft_layers(),
        "devices": {},
    }
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
        entry = {"name": name, "backends": {}}
        for b in env.BACKENDS:
            reason = backends.unavailable_reason(b, dev)
            entry["backends"][b] = "available" if reason is None else f"unavailable: {reason}"
        # What backend="auto" picks here, per op and (for rules that depend on it) token count M.
        entry["auto"] = {"lora_linear M=16": backends.resolve("lora_linear", "auto", dev, rows=16),
                         "lora_linear M=8192": backends.resolve("lora_linear", "auto", dev, rows=8192),
                         "lora_delta": backends.resolve("lora_delta", "auto", dev),
                         "qlora_linear": backends.resolve("qlora_linear", "auto", dev),
                         "dora_linear": backends.resolve("dora_linear", "auto", dev),
                         "sparse_delta": backends.resolve("sparse_delta", "auto", dev),
                         "sparse_embedding": backends.resolve("sparse_embedding", "auto", dev)}
        out["devices"][str(dev)] = entry
    return out


INTEGRATIONS = ("peft", "transformers", "bitsandbytes", "torchao", "accelerate")


def integrations() -> dict:
    """Installed versions of the libraries peft_kernels works with (None: not installed), read
    from package metadata without importing them."""
    out = {}
    for name in INTEGRATIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def patched_peft_layers() -> dict:
    """The HF PEFT layers patch_peft_model computes, and how (integrations.peft.COMPUTED_LAYERS)."""
    from .integrations.peft import COMPUTED_LAYERS

    return dict(COMPUTED_LAYERS)


def triton_paths() -> dict:
    """The size rules inside the Triton backend and the CUDA backend's single-kernel forward (each
    set from a committed benchmark; 0 = off until timed), so which kernels run for a given M is
    inspectable. Empty without triton."""
    try:
        from .cuda_backend import lora as cuda_lora
        from .cuda_backend import quant as cuda_quant
        from .triton import dora, launch, lora, quant_matmul, sparse
    except Exception:
        return {}
    return {
        "dora one-launch row norm (r <= %d; opt-in until timed)" % dora.NORM_MAX_RANK: dora.NORM_KERNEL,
        "fast relaunch of compiled kernels (PEFT_KERNELS_FAST_LAUNCH; opt-in until timed)": launch.FAST_LAUNCH,
        "lora single-launch forward: M <=": lora.FUSED_FWD_MAX_M,
        "lora single-launch backward: M <=": lora.FUSED_BWD_MAX_M,
        "4-bit matmul, whole blocks decoded in registers (forward, in % blocksize == 0): M <=":
            quant_matmul.ALIGNED_MAX_M,
        "4-bit matmul fused in registers: M <=": quant_matmul.FUSED_MAX_M,
        "4-bit matmul chunked window (weights)": quant_matmul.CHUNK_ELEMENTS,
        "sparse dDelta gather_t below density": sparse.GATHER_MAX_DENSITY,
        "cuda backend: lora single-kernel forward (fp16/bf16, r <= 64, in % 8 == 0): M <=":
            cuda_lora.SMALL_M_MAX_M,
        "cuda backend: lora single-kernel backward (fp16/bf16, r <= 64, in, out % 8 == 0): M <=":
            cuda_lora.SMALL_M_BWD_MAX_M,
        "cuda backend: 4-bit quant_linear / qlora single-kernel forward (in % blocksize == 0): M <=":
            cuda_quant.SMALL_M_MAX_M,
    }
