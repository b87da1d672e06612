"""Loads the compiled extension peft_kernels._C; never raises at import, remembers why not."""
import importlib

_module = None
_reason = None


def load():
    """Return the extension module, or None (then ``reason()`` says why)."""
    global _module, _reason
    if _module is None and _reason is None:
        try:
            _module = importlib.import_module("peft_kernels._C")
        except ImportError as exc:
            _reason = f"extension peft_kernels._C not built ({exc})"
    return _module


def reason() -> str | None:
    load()
    return _reason
