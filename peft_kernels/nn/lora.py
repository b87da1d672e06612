"""LoRALinear: an nn.Linear with a LoRA adapter, computed by peft_kernels.lora_linear."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.lora import lora_linear
from ._adapter import LoRAAdapter


class LoRALinear(LoRAAdapter):
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
        self._init_adapter(weight.shape[1], weight.shape[0], r, alpha, dropout, use_rslora, backend,
                           weight.device, weight.dtype)
        self.merged = False
        self.weight = weight.requires_grad_(False)
        self.bias = bias.requires_grad_(False) if bias is not None else None

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

    def _base_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @torch.no_grad()
    def _reset_base(self):
        nn.Linear.reset_parameters(self)  # reads only weight, bias and in/out features

    def _dense_base(self, acc: torch.dtype) -> torch.Tensor:
        return self.weight.to(acc)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, [out, in], computed in fp32 (fp64 for an fp64 weight) and returned in
        the weight's dtype."""
        return self._delta(self._merge_dtype()).to(self.weight.dtype)

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
