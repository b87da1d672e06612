"""Frozen-weight storage formats: pack, unpack, interop. Kernels that consume them live in ops/."""
from .bnb4bit import FP4Weight, NF4Weight
from .int4 import Int4Weight
from .int8 import Int8Weight

__all__ = ["NF4Weight", "FP4Weight", "Int8Weight", "Int4Weight"]
