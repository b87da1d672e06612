"""Input validation shared by the ops: each failure says what was expected and what was given;
and the backend module with the seed in the form it takes."""
import math

import torch

from .. import backends

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fail(op: str, message: str):
    raise ValueError(f"peft_kernels.{op}: {message}")


def first_derivative_only(op: str, backend: str, differentiable: bool = False):
    """Called first in an op's autograd backward. Backward runs with grad mode on only when a second
    derivative is asked for (create_graph=True: Hessian-vector products, gradient penalties). Only
    the torch backend of the dense LoRA / DoRA ops computes its gradients with differentiable torch
    ops (``differentiable``); the kernels and the windowed quantized products do not, and would
    give a second derivative that silently misses terms: refused."""
    if differentiable or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    raise RuntimeError(f"peft_kernels.{op}: a second derivative (backward with create_graph=True) is not "
                       f"supported by its {backend!r} backend" + (
                           "; lora_linear, lora_delta and dora_linear over a dense weight support it with "
                           "backend='torch'" if backend != "torch" else ""))


def check_tensor(t, name: str, op: str, ndim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"peft_kernels.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        fail(op, f"{name} must be {ndim}-D, got shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        fail(op, f"{name} must be a floating-point tensor, got {t.dtype}")


def plain_tensor(t) -> bool:
    """A plain tensor or Parameter — not a tensor subclass (torchao's quantized weights), whose
    storage the kernels cannot read as the dtype it reports. (Only for modules' weights, checked
    eagerly: inside torch.compile every tensor is a FakeTensor.)"""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def is_dtensor(t) -> bool:
    """A torch.distributed DTensor (FSDP2's fully_shard makes parameters ones)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return False
    return isinstance(t, DTensor)


def check_materialized(t: torch.Tensor, name: str, who: str):
    """Refuse a tensor on the meta device where its values are needed (quantizing, choosing or
    reading sparse positions, loading into it): meta tensors have shapes and no values, so the
    call would fail deep inside or — copying into one — drop the values without a word."""
    if t.is_meta:
        raise ValueError(f"{who}: {name} is on the meta device (a shape without values), and this needs its "
                         f"values. Materialize the model first: load it with its weights, or "
                         f"model.to_empty(device=...) and then load_state_dict(...)")


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
    if value != value or value in (math.inf, -math.inf):  # not math.isfinite: it also takes SymFloats
        fail(op, f"{name} must be finite, got {value}")
    if low is not None and value < low:
        fail(op, f"{name} must be >= {low}, got {value}")
    if high is not None and value >= high:
        fail(op, f"{name} must be < {high}, got {value}")


_SEEDS: dict = {}


def seed_tensor(seed, device: torch.device, op: str) -> torch.Tensor:
    """An int64 [1] tensor on ``device``; a fresh draw from torch's generator when seed is None
    (so torch.manual_seed and checkpoint's RNG-state replay make it reproducible). An explicit
    seed's tensor is cached (never written to): a host-to-device copy per call would synchronize
    the stream and break CUDA-graph capture."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"peft_kernels.{op}: seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        fail(op, f"seed must be in [0, 2**63), got {seed}")
    key = (seed, str(device))
    t = _SEEDS.get(key)
    if t is None:
        if len(_SEEDS) > 1024:
            _SEEDS.clear()
        t = _SEEDS[key] = torch.tensor([seed], dtype=torch.int64, device=device)
    return t


def check_input(op: str, x, in_features: int, out_features: int, bias):
    """x [..., in] floating point; bias [out] in x's dtype, or None."""
    check_tensor(x, "x", op)
    if x.dim() < 1:
        fail(op, "x must have at least one dimension")
    if x.shape[-1] != in_features:
        fail(op, f"x's last dim must equal weight's in_features {in_features}, got x of shape {list(x.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", op, 1)
        if bias.shape[0] != out_features:
            fail(op, f"bias must be [{out_features}], got {list(bias.shape)}")
        if bias.dtype != x.dtype:
            fail(op, f"bias dtype {bias.dtype} must equal x dtype {x.dtype}")


def check_adapter(op: str, lora_A, lora_B, in_features: int, out_features: int, scaling, dropout_p) -> int:
    """lora_A [r, in], lora_B [out, r] of one float dtype, r >= 1; finite scaling; p in [0, 1).
    Returns r."""
    check_tensor(lora_A, "lora_A", op, 2)
    check_tensor(lora_B, "lora_B", op, 2)
    r = lora_A.shape[0]
    if r < 1:
        fail(op, f"rank r must be >= 1, got lora_A of shape {list(lora_A.shape)}")
    if lora_A.shape[1] != in_features:
        fail(op, f"lora_A must be [r, in] = [r, {in_features}], got {list(lora_A.shape)}")
    if lora_B.shape[0] != out_features or lora_B.shape[1] != r:
        fail(op, f"lora_B must be [out, r] = [{out_features}, {r}], got {list(lora_B.shape)}")
    if lora_A.dtype != lora_B.dtype:
        fail(op, f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")
    check_scalar(scaling, "scaling", op)
    check_scalar(dropout_p, "dropout_p", op, low=0.0, high=1.0)
    return r


TRITON_MAX_RANK = 256


def host_seed(seed: int | None) -> int:
    """``seed``, or a fresh draw from torch's CPU generator: no device sync, and
    torch.manual_seed and checkpoint's RNG-state replay reproduce it."""
    return seed if seed is not None else int(torch.randint(0, 2**62, ()).item())


def implementation_and_seed(op: str, backend: str, seed):
    """The backend module running ``op`` and the seed as it takes it: the torch reference an int,
    the kernels the int64 tensor [1] (the custom ops pass the tensor)."""
    return backends.implementation(op, backend), (seed_value(seed) if backend == "torch" else seed)


def seed_value(seed) -> int | None:
    """The int the torch backend takes, from the seed tensor the kernels take."""
    return None if seed is None else int(seed.item())


def check_triton(op: str, x, r: int | None = None, max_rank: int = TRITON_MAX_RANK):
    if x.dtype not in KERNEL_DTYPES:
        fail(op, f"the triton backend takes fp16/bf16/fp32, got {x.dtype}")
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":  # it returned ~1e10 relative error
        fail(op, "the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) computes tl.dot on bf16 operands "
                 "wrongly: use fp32 or fp16 there, or backend='torch' (bf16 Triton kernels run on a GPU)")
    if r is not None and r > max_rank:
        fail(op, f"the triton backend supports r <= {max_rank}, got r={r}")


def check_cuda_with_triton(op: str, x, r: int | None = None):
    """The 4-bit ops' cuda backend runs the Triton kernels beside its own (cuda_backend/quant.py):
    both must be usable."""
    from .. import backends

    why = backends.unavailable_reason("triton", x.device)
    if why is not None:
        raise RuntimeError(f"peft_kernels.{op}: backend 'cuda' runs the Triton kernels beside its own, and triton "
                           f"is unavailable: {why}")
    check_triton(op, x, r)


def check_cuda(op: str, x):
    if x.dtype not in KERNEL_DTYPES:
        fail(op, f"the cuda backend takes fp16/bf16/fp32, got {x.dtype}")


AUTOCAST_DEVICES = ("cpu", "cuda")
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves fp64 alone


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype torch.autocast runs F.linear in on x's device, or None where autocast is off.
    The ops follow F.linear's rule: under autocast, x, a dense weight and the bias are cast to
    that dtype and the op runs with autocast off, so kernels, fake implementations and backward
    all see one dtype (inside, autocast recast some reference products and not others: the
    backward then failed on mixed dtypes, and the kernels ran in fp32)."""
    if not isinstance(x, torch.Tensor) or x.device.type not in AUTOCAST_DEVICES:
        return None
    if not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def to_autocast(dtype: torch.dtype, *tensors):
    """autocast's cast: fp32 / fp16 / bf16 tensors to ``dtype``; anything else as it is."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CASTS else t for t in tensors)


def contiguous_bias(bias):
    """bias as the kernels read it: one contiguous [out] vector (a strided view, e.g. every other
    entry of a larger tensor, is copied; its gradient still reaches the view)."""
    return bias if bias is None or bias.is_contiguous() else bias.contiguous()


def unflatten_rows(y, x):
    """The op's [M, out] result as [*x.shape[:-1], out], not as a view of it: F.linear's output is
    not a view either (aten._unsafe_view, as F.linear uses). A view would make FSDP2 warn that an
    in-place op on the module's output skips its pre-backward hook. Safe here: no Function saves
    its output, and the [M, out] tensor is dropped."""
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))


def adapter_call_args(op: str, x, lora_A, lora_B, dropout_p, training, seed):
    """(effective dropout p, seed tensor | None, lora_A, lora_B cast to x's dtype)."""
    p = float(dropout_p) if training else 0.0
    seed_t = seed_tensor(seed, x.device, op) if p > 0.0 else None
    if lora_A.dtype != x.dtype:
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    return p, seed_t, lora_A, lora_B
