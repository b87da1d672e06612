"""LoRALinear: an nn.Linear with a LoRA adapter, computed by peft_kernels.lora_linear."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.lora import lora_linear


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W (and b) frozen.

    Parameters follow HF PEFT: ``weight`` [out, in], ``bias`` [out] | None, ``lora_A`` [r, in]
    (Kaiming-uniform, a=sqrt(5)), ``lora_B`` [out, r] (zeros, so a fresh adapter is a no-op).
    scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base.weight, base.bias, r, alpha, dropout, use_rslora, backend)

    def _attach(self, weight, bias, r, alpha, dropout, use_rslora, backend):
        """Adopt (and freeze) the base parameters, then create the adapter beside them."""
        if r < 1:
            raise ValueError(f"LoRALinear: r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: dropout must be in [0, 1), got {dropout}")
        self.out_features, self.in_features = weight.shape
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.use_rslora, self.backend, self.merged = use_rslora, backend, False
        self.weight = weight.requires_grad_(False)
        self.bias = bias.requires_grad_(False) if bias is not None else None
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    use_rslora: bool = False, backend: str = "auto") -> "LoRALinear":
        """Wrap an existing nn.Linear: its weight and bias Parameters are shared (not copied)
        and frozen; the adapter is created on the same device and dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear expects nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(linear.weight, linear.bias, r, alpha, dropout, use_rslora, backend)
        return module

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, [out, in], computed in fp32 and returned in the weight's dtype."""
        return (self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into weight (inference); forward then is a plain linear."""
        if not self.merged:
            self.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= self.delta_weight()
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                           dropout_p=self.dropout, training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, use_rslora={self.use_rslora}, "
                f"bias={self.bias is not None}, merged={self.merged}")
