"""Int4Weight: group-wise asymmetric 4-bit weights with scales and zero points.

For each output row and each group of ``group_size`` consecutive input columns, with
lo = min(min, 0) and hi = max(max, 0) (the range always holds 0, so the integer zero point is
never clamped and a group that does not straddle zero stays representable):
    scale = (hi - lo) / 15              (1 for an all-zero group)
    zero  = clamp(round(-lo / scale), 0, 15)
    q     = clamp(round(w / scale) + zero, 0, 15)          w ≈ (q - zero) * scale
Storage:
    packed  uint8 [out, in // 2]   two codes per byte along the input dim, the even (first)
                                   column in the HIGH nibble (bitsandbytes' nibble order)
    scales  [out, in // group_size] in the weight's dtype
    zeros   uint8 [out, in // group_size]
"""
from __future__ import annotations

import torch

from .bnb4bit import _check_float_matrix

GROUP_SIZES = (32, 64, 128)


class Int4Weight:
    def __init__(self, packed, scales, zeros, group_size: int, dtype: torch.dtype):
        if group_size not in GROUP_SIZES:
            raise ValueError(f"Int4Weight: group_size must be one of {GROUP_SIZES}, got {group_size}")
        if packed.dtype != torch.uint8 or packed.dim() != 2:
            raise ValueError(f"Int4Weight: packed must be uint8 [out, in // 2], got {packed.dtype} {list(packed.shape)}")
        groups = (packed.shape[0], packed.shape[1] * 2 // group_size)
        if packed.shape[1] * 2 % group_size:
            raise ValueError(f"Int4Weight: in = {packed.shape[1] * 2} is not divisible by group_size {group_size}")
        if not scales.is_floating_point() or tuple(scales.shape) != groups:
            raise ValueError(f"Int4Weight: scales must be floating point {list(groups)}, got {scales.dtype} "
                             f"{list(scales.shape)}")
        if zeros.dtype != torch.uint8 or tuple(zeros.shape) != groups:
            raise ValueError(f"Int4Weight: zeros must be uint8 {list(groups)}, got {zeros.dtype} {list(zeros.shape)}")
        if not packed.device == scales.device == zeros.device:
            raise ValueError(f"Int4Weight: packed, scales and zeros must share a device, got {packed.device}, "
                             f"{scales.device}, {zeros.device}")
        self.packed, self.scales, self.zeros = packed, scales, zeros
        self.group_size, self.dtype = group_size, dtype

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 64) -> "Int4Weight":
        _check_float_matrix(w, "weight")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
        out_f, in_f = w.shape
        if in_f % group_size:
            raise ValueError(f"in_features {in_f} is not divisible by group_size {group_size}")
        g = w.detach().float().view(out_f, in_f // group_size, group_size)
        lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
        scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, 15)
        q = torch.clamp(torch.round(g / scale.unsqueeze(2)) + zero.unsqueeze(2), 0, 15).to(torch.uint8).view(out_f, in_f)
        packed = (q[:, 0::2] << 4) | q[:, 1::2]
        return cls(packed, scale.to(w.dtype), zero.to(torch.uint8), group_size, w.dtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.packed.shape[0], self.packed.shape[1] * 2))

    def codes(self) -> torch.Tensor:
        """uint8 [out, in]: every 4-bit code, unpacked."""
        return torch.stack([self.packed >> 4, self.packed & 0xF], dim=2).view(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out_f, in_f = self.shape
        q = self.codes().float().view(out_f, -1, self.group_size)
        w = (q - self.zeros.float().unsqueeze(2)) * self.scales.float().unsqueeze(2)
        return w.view(out_f, in_f).to(dtype or self.dtype)

    def decode_window(self, r0: int, rows: int, c0: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """W[r0:r0+rows, c0:c0+cols] exactly as dequantize() gives it; c0 and cols are multiples
        of group_size (or the window ends at in)."""
        g = self.group_size
        if c0 % g or (cols % g and c0 + cols != self.shape[1]):
            raise ValueError(f"Int4Weight.decode_window: columns [{c0}, {c0 + cols}) are not whole groups of {g}")
        packed = self.packed[r0:r0 + rows, c0 // 2:(c0 + cols) // 2]
        q = torch.stack([packed >> 4, packed & 0xF], dim=2).view(rows, -1, g).float()
        gs = slice(c0 // g, (c0 + cols) // g)
        w = (q - self.zeros[r0:r0 + rows, gs].float().unsqueeze(2)) * self.scales[r0:r0 + rows, gs].float().unsqueeze(2)
        return w.view(rows, cols).to(dtype)

    def dequantize_rows(self, r0: int, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W[r0:r0+rows], [rows, in] in ``dtype``, with dequantize()'s exact values."""
        return self.decode_window(r0, rows, 0, self.shape[1], dtype or self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales, self.zeros]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> "Int4Weight":
        return Int4Weight(self.packed.to(device), self.scales.to(device), self.zeros.to(device), self.group_size,
                          self.dtype)

    @property
    def bits_per_parameter(self) -> float:
        return 4 + (self.scales.element_size() * 8 + 8) / self.group_size

    def __repr__(self) -> str:
        return (f"Int4Weight(shape={list(self.shape)}, group_size={self.group_size}, dtype={self.dtype}, "
                f"bits/param={self.bits_per_parameter:.3f})")
