"""LoRALinear: an nn.Linear with a LoRA adapter, computed by peft_kernels.lora_linear."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.lora import lora_linear
from ._adapter import LoRAAdapter, is_conv1d


class LoRALinear(LoRAAdapter):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, with W (and b) frozen.

    Parameters follow HF PEFT: ``weight`` [out, in], ``bias`` [out] | None, ``lora_A`` [r, in]
    (Kaiming-uniform, a=sqrt(5)), ``lora_B`` [out, r] (zeros, so a fresh adapter is a no-op).
    scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora``. Over a transformers Conv1D
    (GPT-2; ``fan_in_fan_out``) ``weight`` is the Conv1D's own [in, out] Parameter, kept as the
    model's checkpoints store it; the layer computes with its transpose.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base.weight, base.bias, r, alpha, dropout, use_rslora, backend)

    def _attach(self, weight, bias, r, alpha, dropout, use_rslora, backend, fan_in_fan_out=False):
        """Adopt (and freeze) the base parameters, then create the adapter beside them."""
        self.fan_in_fan_out = fan_in_fan_out
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        self._init_adapter(in_features, out_features, r, alpha, dropout, use_rslora, backend,
                           weight.device, weight.dtype)
        self.merged = False
        self.weight = weight.requires_grad_(False)
        self.bias = bias.requires_grad_(False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                    use_rslora: bool = False, backend: str = "auto") -> "LoRALinear":
        """Wrap an existing nn.Linear (or a transformers Conv1D, GPT-2's layer): its weight and
        bias Parameters are shared (not copied) and frozen; the adapter is created on the same
        device and dtype."""
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"{cls.__name__}.from_linear expects nn.Linear or transformers' Conv1D, "
                            f"got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._attach(linear.weight, linear.bias, r, alpha, dropout, use_rslora, backend, fan_in_fan_out=conv1d)
        return module

    @property
    def linear_weight(self) -> torch.Tensor:
        """weight as nn.Linear holds it, [out, in] (over a Conv1D: a transposed view of it)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _base_dtype(self) -> torch.dtype:
        return self.weight.dtype

    @torch.no_grad()
    def _reset_base(self):
        if self.fan_in_fan_out:  # transformers' Conv1D init
            nn.init.normal_(self.weight, std=0.02)
            nn.init.zeros_(self.bias)
        else:
            nn.Linear.reset_parameters(self)  # reads only weight, bias and in/out features

    def _dense_base(self, acc: torch.dtype) -> torch.Tensor:
        return self.linear_weight.to(acc)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, [out, in], computed in fp32 (fp64 for an fp64 weight) and returned in
        the weight's dtype."""
        return self._delta(self._merge_dtype()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self):
        """Fold the adapter into weight (inference); forward then is a plain linear."""
        if not self.merged:
            self.linear_weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.linear_weight.sub_(self.delta_weight())
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.linear_weight, self.bias)
        return lora_linear(x, self.linear_weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                           dropout_p=self.dropout, training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, use_rslora={self.use_rslora}, "
                f"bias={self.bias is not None}, merged={self.merged}"
                + (", fan_in_fan_out=True (Conv1D base)" if self.fan_in_fan_out else ""))
