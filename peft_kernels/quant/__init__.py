"""Frozen-weight storage formats: pack, unpack, interop. Kernels that consume them live in ops/."""
from .bnb4bit import FP4Weight, NF4Weight

__all__ = ["NF4Weight", "FP4Weight"]
