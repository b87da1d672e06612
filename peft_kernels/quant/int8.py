"""Int8Weight: per-output-channel symmetric absmax, in LLM.int8's CB / SCB layout.

    CB   int8 [out, in]   round(W * (127 / SCB[:, None]))
    SCB  fp32 [out]       max |W| of each row
    W ≈ CB * SCB[:, None] * (1 / 127)     (bitsandbytes' int8_vectorwise_quant / _dequant rule)
An all-zero row has SCB = 0 and CB = 0 (and dequantizes to 0).
"""
from __future__ import annotations

import torch

from .bnb4bit import _check_float_matrix

INV127 = 7.874015718698502e-3  # fp32(1/127), the constant bitsandbytes multiplies by


class Int8Weight:
    """A frozen [out, in] weight as int8 codes with one fp32 scale per output row."""

    def __init__(self, CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype):
        if CB.dtype != torch.int8 or CB.dim() != 2:
            raise ValueError(f"CB must be int8 [out, in], got {CB.dtype} {list(CB.shape)}")
        if SCB.dtype != torch.float32 or tuple(SCB.shape) != (CB.shape[0],):
            raise ValueError(f"SCB must be fp32 [{CB.shape[0]}], got {SCB.dtype} {list(SCB.shape)}")
        if CB.device != SCB.device:
            raise ValueError(f"CB and SCB must share a device, got {CB.device} and {SCB.device}")
        self.CB, self.SCB, self.dtype = CB, SCB, dtype

    @classmethod
    def from_float(cls, w: torch.Tensor) -> "Int8Weight":
        _check_float_matrix(w, "weight")
        w = w.detach()
        scb = w.abs().amax(dim=1).float()
        scale = 127.0 / scb.clamp(min=torch.finfo(torch.float32).tiny)
        cb = torch.round(w * scale.unsqueeze(1)).to(torch.int8)
        return cls(cb, scb, w.dtype)

    @classmethod
    def from_bnb(cls, param_or_linear, dtype: torch.dtype | None = None) -> "Int8Weight":
        """Wrap a bitsandbytes Int8Params (or a Linear8bitLt's weight) holding int8 codes: CB and
        SCB are shared, not copied. ``dtype``: the nominal dtype (dequantize()'s default; bnb does
        not record the original one): by default the layer's bias dtype, else fp32."""
        param = getattr(param_or_linear, "weight", param_or_linear)
        scb = getattr(param, "SCB", None)
        if param.dtype != torch.int8 or scb is None:
            raise ValueError("Int8Weight.from_bnb: expected a quantized bitsandbytes Int8Params / Linear8bitLt "
                             f"(int8 codes and SCB), got a {param.dtype} weight (has_fp16_weights=True, or not "
                             "moved to its device yet)")
        if dtype is None:
            bias = getattr(param_or_linear, "bias", None)
            dtype = bias.dtype if bias is not None else torch.float32
        return cls(param.data, scb, dtype)

    @property
    def shape(self) -> torch.Size:
        return self.CB.shape

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.CB * self.SCB.view(-1, 1) * INV127).to(dtype or self.dtype)

    def decode_window(self, r0: int, rows: int, c0: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """W[r0:r0+rows, c0:c0+cols] exactly as dequantize() gives it."""
        return (self.CB[r0:r0 + rows, c0:c0 + cols] * self.SCB[r0:r0 + rows].view(-1, 1) * INV127).to(dtype)

    def dequantize_rows(self, r0: int, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W[r0:r0+rows], [rows, in] in ``dtype``, with dequantize()'s exact values."""
        return self.decode_window(r0, rows, 0, self.shape[1], dtype or self.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.CB, self.SCB]

    @property
    def device(self) -> torch.device:
        return self.CB.device

    def to(self, device) -> "Int8Weight":
        return Int8Weight(self.CB.to(device), self.SCB.to(device), self.dtype)

    @property
    def bits_per_parameter(self) -> float:
        return 8 + 32 / self.CB.shape[1]

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        return {prefix: self.CB, f"{prefix}.SCB": self.SCB}

    def __repr__(self) -> str:
        return f"Int8Weight(shape={list(self.shape)}, dtype={self.dtype}, device={self.CB.device})"


def is_bnb_linear8bit(module) -> bool:
    """True for a bitsandbytes Linear8bitLt (LLM.int8)."""
    return type(module).__name__ == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes")
