"""The LoRA adapter state shared by LoRALinear and QLoRALinear (HF PEFT's conventions)."""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRAAdapter(nn.Module):
    """Holds lora_A [r, in] (Kaiming-uniform, a=sqrt(5)) and lora_B [out, r] (zeros: a fresh
    adapter is a no-op); scaling = alpha / r, or alpha / sqrt(r) with rsLoRA."""

    def _init_adapter(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                      use_rslora: bool, backend: str, device, dtype):
        name = type(self).__name__
        if r < 1:
            raise ValueError(f"{name}: r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout, self.use_rslora, self.backend = r, alpha, dropout, use_rslora, backend
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
