"""DoRALinear: LoRALinear plus a trainable per-output-row magnitude (HF PEFT's DoRA)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.dora import cached_weight_row_sq, dora_linear, dora_weight_norm
from ..tensor_cache import TensorCache
from .lora import LoRALinear


class DoRALinear(LoRALinear):
    """y = m / ‖W + s·B·A‖_row ⊙ (x Wᵀ + s·dropout(x) Aᵀ Bᵀ) + b (PEFT's exact form with
    dropout; see peft_kernels.ops.dora). ``magnitude`` [out] starts at ‖W‖_row (B = 0), as PEFT's.
    ‖W_i‖² of the frozen base is computed once and reused until the weight changes
    (``cached_weight_row_sq``)."""

    def _attach(self, weight, bias, r, alpha, dropout, use_rslora, backend, fan_in_fan_out=False):
        super()._attach(weight, bias, r, alpha, dropout, use_rslora, backend, fan_in_fan_out)
        norm = dora_weight_norm(self.linear_weight, self.lora_A, self.lora_B, self.scaling)
        self.magnitude = nn.Parameter(norm.to(self.weight.dtype))
        # m / ‖W + s·BA‖ while merged (unmerge divides by it): a buffer, so it follows .to(device)
        self.register_buffer("_merge_scale", None, persistent=False)
        self._row_sq = TensorCache(1)

    def _row_norm(self) -> torch.Tensor:
        return dora_weight_norm(self.linear_weight, self.lora_A, self.lora_B, self.scaling)

    @torch.no_grad()
    def merge(self):
        """weight <- m / ‖W + s·BA‖ ⊙ (W + s·BA): forward then is a plain linear."""
        if not self.merged:
            w, self._merge_scale = self._merged()  # one row-norm pass gives both
            self.linear_weight.copy_(w.to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            acc = self._merge_dtype()
            w = self.linear_weight.to(acc) / self._merge_scale[:, None].to(acc) - self._delta(acc)
            self.linear_weight.copy_(w.to(self.weight.dtype))
            self._merge_scale = None
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.linear_weight, self.bias)
        row_sq = cached_weight_row_sq(self._row_sq, self.weight, self.linear_weight, x)
        return dora_linear(x, self.linear_weight, self.lora_A, self.lora_B, self.magnitude, self.bias,
                           scaling=self.scaling, dropout_p=self.dropout, training=self.training, backend=self.backend,
                           weight_row_sq=row_sq)
