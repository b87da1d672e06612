"""Input validation shared by the ops: each failure says what was expected and what was given."""
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fail(op: str, message: str):
    raise ValueError(f"peft_kernels.{op}: {message}")


def check_tensor(t, name: str, op: str, ndim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"peft_kernels.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        fail(op, f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        fail(op, f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(op: str, **tensors):
    device = None
    for t in tensors.values():
        if t is not None:
            if device is not None and t.device != device:
                listing = ", ".join(f"{n} on {t.device}" for n, t in tensors.items() if t is not None)
                fail(op, f"all tensors must be on one device, got {listing}")
            device = t.device


def check_scalar(value, name: str, op: str, low=None, high=None):
    """A finite Python number in [low, high)."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)):
        raise TypeError(f"peft_kernels.{op}: {name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value):
        fail(op, f"{name} must be finite, got {value}")
    if low is not None and value < low:
        fail(op, f"{name} must be >= {low}, got {value}")
    if high is not None and value >= high:
        fail(op, f"{name} must be < {high}, got {value}")


def seed_tensor(seed, device: torch.device, op: str) -> torch.Tensor:
    """An int64 [1] tensor on ``device``; a fresh draw from torch's generator when seed is None
    (so torch.manual_seed and checkpoint's RNG-state replay make it reproducible)."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"peft_kernels.{op}: seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        fail(op, f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)
