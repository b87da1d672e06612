"""Backend registry: which implementation runs an op, and why the others cannot.

Each op file registers, per backend, the module that implements it (imported on first use, so
a missing triton or extension never breaks ``import peft_kernels``). The
custom op receives an already-resolved backend name, so a traced graph records the choice.
``resolve`` is the single place that turns "auto" into a concrete backend; ``last_used`` makes
the choice observable.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from . import cuda, determinism, env

_IMPLS: dict[tuple[str, str], str] = {}
_LAST_USED: dict[str, str] = {}


def check_name(backend, owner: str) -> str:
    """``backend`` if it names a backend (or "auto"), else a ValueError naming ``owner``: a module
    given a misspelt backend says so when it is built, not at its first forward."""
    if backend != "auto" and backend not in env.BACKENDS:
        raise ValueError(f"{owner}: unknown backend {backend!r}: expected auto, {', '.join(env.BACKENDS)}")
    return backend


def register(op: str, backend: str, module: str):
    """Declare that ``module`` (a dotted path) implements ``op`` for ``backend``."""
    if backend not in env.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _IMPLS[(op, backend)] = module


_MODULES: dict = {}  # (op, backend) -> the imported module: import_module costs µs on every call


def implementation(op: str, backend: str):
    """The module implementing ``op`` on ``backend``; records the choice for ``last_used``."""
    module = _MODULES.get((op, backend))
    if module is None:
        try:
            name = _IMPLS[(op, backend)]
        except KeyError:
            raise RuntimeError(f"peft_kernels.{op}: no {backend!r} implementation of this op") from None
        module = _MODULES[(op, backend)] = importlib.import_module(name)
    _LAST_USED[op] = backend
    return module


def last_used(op: str) -> str | None:
    """The backend that most recently ran ``op`` (None if it never ran)."""
    return _LAST_USED.get(op)


_TRITON_ERROR: list = []  # filled once; a plain cache (dynamo warns about lru_cache)


def _triton_import_error() -> str | None:
    if not _TRITON_ERROR:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401  (a broken install fails here)
            _TRITON_ERROR.append(None)
        except Exception as exc:  # ImportError, or a broken install
            _TRITON_ERROR.append(f"triton not importable ({exc})")
    return _TRITON_ERROR[0]


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and env.triton_interpret():
            return None
        return f"triton needs a CUDA tensor (got {device.type}; set TRITON_INTERPRET=1 to interpret on CPU)"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs a CUDA tensor (got {device.type})"
        return cuda.reason()
    raise ValueError(f"unknown backend {backend!r}: expected auto, {', '.join(env.BACKENDS)}")


# (op, backend) pairs whose kernels add fp32 partial sums with atomics and have no deterministic
# mode (peft_kernels.determinism): under torch.use_deterministic_algorithms(True) "auto" skips them
# and an explicit choice raises (or warns, with warn_only=True).
NONDETERMINISTIC = {
    ("lora_linear", "cuda"): "its dA / dB reductions (csrc/lora_kernels.cu) add with atomicAdd",
}


def resolve(op: str, backend: str, device: torch.device, rows: int | None = None) -> str:
    """Turn a user's backend choice into a concrete, runnable backend, or raise saying why.
    ``rows`` (the token count M) lets "auto" pick per shape (AUTO_RULES)."""
    if backend == "auto":
        backend = env.backend_override() or _auto_choice(op, device, rows)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"peft_kernels.{op}: backend {backend!r} unavailable: {reason}")
    if (op, backend) not in _IMPLS:
        raise RuntimeError(f"peft_kernels.{op}: no {backend!r} implementation of this op")
    if (op, backend) in NONDETERMINISTIC:
        determinism.alert(f"peft_kernels.{op} with backend={backend!r} ({NONDETERMINISTIC[op, backend]})")
    return backend


# backend="auto" on a CUDA device: per op, (backend, the largest M it is picked for), the first
# runnable entry wins. Every rule cites the committed measurement behind it.
AUTO_RULES = {
    # benchmarks/results/lora_backends_h100.json (H100, bf16, 4096->4096, r=16, p=0.05, eager
    # launch, fwd+bwd, 2026-11-24): cuda 0.88 / 0.71 / 0.90 ms vs triton 1.12 / 1.32 / 1.29 ms at
    # M = 16 / 256 / 1024 (fewer, cheaper launches from C++); at M = 8192 triton 1.63 ms vs cuda 3.28.
    # The cuda kernels' win is host time only: replayed from a CUDA graph they take 4.2-4.6x the
    # graphed floor against triton's 1.5-1.9x, so graphed training should pass backend="triton".
    # (Not switched automatically under capture: warm-up and capture must run the same kernels.)
    "lora_linear": [("cuda", 1024), ("triton", None)],
}
DEFAULT_GPU_RULE = [("triton", None)]


def auto_rule(op: str) -> list:
    """The ordered (backend, max rows) list "auto" tries for ``op`` on a GPU (for inspection)."""
    return AUTO_RULES.get(op, DEFAULT_GPU_RULE)


_WARNED: set = set()


def _auto_choice(op: str, device: torch.device, rows: int | None = None) -> str:
    # CPU: the reference; the interpreter is a test vehicle, far too slow to be picked automatically.
    if device.type == "cuda":
        why = []
        for backend, max_rows in auto_rule(op):
            if max_rows is not None and (rows is None or rows > max_rows):
                continue
            if (op, backend) not in _IMPLS:
                continue
            if (op, backend) in NONDETERMINISTIC and determinism.enabled():
                why.append(f"{backend}: not deterministic (torch.use_deterministic_algorithms)")
                continue
            reason = unavailable_reason(backend, device)
            if reason is None:
                return backend
            why.append(f"{backend}: {reason}")
        if op not in _WARNED:  # the reference on a GPU is the slow path: never silently
            _WARNED.add(op)
            warnings.warn(f"peft_kernels.{op}: no kernel backend can run on {device} ({'; '.join(why)}); "
                          "running the pure-PyTorch reference (slow). peft_kernels.info() says more.", stacklevel=3)
    return "torch"
