"""QLoRALinear / QDoRALinear / IntQLoRALinear: a LoRA (or DoRA) adapter over a frozen quantized
base weight — 4-bit NF4/FP4 in bitsandbytes' format, or INT8 / INT4."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.dora import dora_linear, dora_weight_norm, weight_row_sq
from ..ops.qlora import qlora_linear
from ..quant.bnb4bit import Bnb4bitWeight, FP4Weight, NF4Weight
from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Weight
from ._adapter import LoRAAdapter, is_conv1d, linear_weight

_FORMATS = {"nf4": NF4Weight, "fp4": FP4Weight}


def _register_frozen(module: nn.Module, name: str, t: torch.Tensor | None):
    """A part of the quantized base as a frozen Parameter (or None), sharing ``t``'s storage."""
    module.register_parameter(name, nn.Parameter(t, requires_grad=False) if t is not None else None)


class QLoRALinear(LoRAAdapter):
    """y = x deq(W)^T + b + (alpha / r) * dropout(x) A^T B^T with W stored in 4 bits.

    The packed 4-bit bytes and their absmax are frozen uint8 Parameters (``qweight_packed``,
    ``qweight_absmax``; bitsandbytes' Params4bit is one too), so that FSDP's fully_shard shards them
    with the rest — buffers would be whole on every rank. The small nested statistics
    (``qweight_offset``, ``qweight_absmax2``, ``qweight_code2``, a table shared by every layer) are
    buffers. All follow .to(device) but never a dtype cast. lora_A [r, in] (Kaiming-uniform) and
    lora_B [out, r] (zeros) are the only trainable parameters, in the base weight's original dtype.
    """

    def __init__(self, qweight: Bnb4bitWeight, bias: torch.Tensor | None = None, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, use_rslora: bool = False, backend: str = "auto"):
        super().__init__()
        if not isinstance(qweight, Bnb4bitWeight):
            raise TypeError(f"QLoRALinear: qweight must be an NF4Weight or FP4Weight, got {type(qweight).__name__}")
        self._init_adapter(qweight.shape[1], qweight.shape[0], r, alpha, dropout, use_rslora, backend,
                           qweight.device, qweight.dtype)
        self._format, self._meta = type(qweight), (qweight.shape, qweight.blocksize)
        self._nominal_dtype = qweight.dtype
        _register_frozen(self, "qweight_packed", qweight.packed)
        _register_frozen(self, "qweight_absmax", qweight.absmax)
        for name in ("offset", "absmax2", "code2"):
            self.register_buffer(f"qweight_{name}", getattr(qweight, name))
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def _base_dtype(self) -> torch.dtype:
        """The quantized base's nominal dtype (dequantize()'s default, a merged weight's dtype): the
        dense weight's it was made from, then what module casts (.to(dtype), .half()) make it."""
        return getattr(self, "_nominal_dtype", self.lora_A.dtype)

    @property
    def qweight(self) -> Bnb4bitWeight:
        """The frozen base weight, in its nominal dtype (_base_dtype)."""
        shape, blocksize = self._meta
        return self._format(self.qweight_packed, self.qweight_absmax, shape, self._base_dtype(), blocksize,
                            offset=self.qweight_offset, absmax2=self.qweight_absmax2, code2=self.qweight_code2)

    def _apply(self, fn, recurse=True):
        # The quantization state (the qweight_* parameters, DoRA's weight_row_sq) is exact data: a
        # cast such as module.to(torch.bfloat16) or .half() would round absmax / scales and change
        # every base weight without a word (and break INT8's fp32 SCB). It follows device moves
        # only; the adapter, bias and magnitude take the cast, and the compute dtype with them.
        exact = {name: t.detach() for name, t in [*self._parameters.items(), *self._buffers.items()]
                 if t is not None and (name.startswith("qweight_") or name == "weight_row_sq")}
        super()._apply(fn, recurse)
        if hasattr(self, "_nominal_dtype"):  # the cast this module takes, seen on an empty tensor
            cast = fn(torch.empty(0, dtype=self._nominal_dtype))
            self._nominal_dtype = cast.dtype if isinstance(cast, torch.Tensor) else self._nominal_dtype
        for name, old in exact.items():
            moved = self._parameters[name] if name in self._parameters else self._buffers[name]
            if moved.dtype != old.dtype:
                if name in self._parameters:
                    moved.data = old.to(moved.device)  # the same Parameter object (optimizers, FSDP hold it)
                else:
                    self._buffers[name] = old.to(moved.device)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant: str = "nf4", r: int = 8, alpha: float = 16.0,
                    dropout: float = 0.0, blocksize: int = 64, double_quant: bool = True, use_rslora: bool = False,
                    backend: str = "auto", group_size: int = 64) -> "QLoRALinear":
        """Quantize ``linear``'s weight (the module keeps no full-precision copy of it): "nf4" /
        "fp4" (bitsandbytes format, ``blocksize``, ``double_quant``; fused kernels), "int8"
        (LLM.int8 CB/SCB) or "int4" (``group_size``) — the INT formats return an IntQLoRALinear
        (an IntQDoRALinear when called on QDoRALinear). A transformers Conv1D (GPT-2) is quantized
        as the [out, in] transpose of its weight; merge_and_unload gives a Conv1D back."""
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"QLoRALinear.from_linear expects nn.Linear or transformers' Conv1D, "
                            f"got {type(linear).__name__}")
        weight = linear_weight(linear).detach()
        if quant in ("int8", "int4"):
            qweight = (Int8Weight.from_float(weight) if quant == "int8" else
                       Int4Weight.from_float(weight, group_size=group_size))
            cls = IntQDoRALinear if issubclass(cls, QDoRALinear) else IntQLoRALinear
        elif quant in _FORMATS:
            qweight = _FORMATS[quant].from_float(weight, blocksize=blocksize, double_quant=double_quant)
        else:
            raise ValueError(f"QLoRALinear: quant must be one of nf4, fp4, int8, int4; got {quant!r}")
        module = cls(qweight, linear.bias, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, backend=backend)
        module.fan_in_fan_out = conv1d
        return module

    @classmethod
    def from_bnb(cls, linear4bit, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False,
                 backend: str = "auto") -> "QLoRALinear":
        """Wrap a bitsandbytes Linear4bit, reading its packed weight as is (no re-quantization)."""
        qs = getattr(linear4bit.weight, "quant_state", None)
        if qs is None or qs.quant_type not in _FORMATS:
            raise ValueError("QLoRALinear.from_bnb: expected a quantized bitsandbytes Linear4bit (nf4 or fp4)")
        qweight = _FORMATS[qs.quant_type].from_bnb(linear4bit.weight)
        return cls(qweight, linear4bit.bias, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                   backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlora_linear(x, self.qweight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                            dropout_p=self.dropout, training=self.training, backend=self.backend)

    def _dense_base(self, acc: torch.dtype) -> torch.Tensor:
        return self.qweight.dequantize(acc)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, format={self._format.__name__}, "
                f"blocksize={self._meta[1]}, double_quant={self.qweight_absmax2 is not None}")


class QDoRALinear(QLoRALinear):
    """DoRA over a 4-bit base (QDoRA): y = m / ‖W + s·B·A‖_row ⊙ (x Wᵀ + s·dropout(x) Aᵀ Bᵀ) + b
    with W in NF4/FP4 (peft_kernels.dora_linear's 4-bit form). ``magnitude`` [out] starts at
    ‖W‖_row; ‖W_i‖² of the frozen base is computed once (buffer ``weight_row_sq``)."""

    def __init__(self, qweight: Bnb4bitWeight, bias: torch.Tensor | None = None, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, use_rslora: bool = False, backend: str = "auto"):
        super().__init__(qweight, bias, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, backend=backend)
        self.register_buffer("weight_row_sq", weight_row_sq(qweight))
        norm = dora_weight_norm(qweight, self.lora_A, self.lora_B, self.scaling, self.weight_row_sq)
        self.magnitude = nn.Parameter(norm.to(qweight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dora_linear(x, self.qweight, self.lora_A, self.lora_B, self.magnitude, self.bias,
                           scaling=self.scaling, dropout_p=self.dropout, training=self.training, backend=self.backend,
                           weight_row_sq=self.weight_row_sq)

    def _row_norm(self) -> torch.Tensor:
        return dora_weight_norm(self.qweight, self.lora_A, self.lora_B, self.scaling, self.weight_row_sq)


class IntQLoRALinear(QLoRALinear):
    """LoRA over a frozen INT8 (Int8Weight) or INT4 (Int4Weight) base, through qlora_linear: the
    adapter work fused as over any base (dropout mask from the seed, never stored); the base
    product by windows of decoded weight on the BLAS (there is no fused integer-decode GEMM yet)."""

    def __init__(self, qweight, bias: torch.Tensor | None = None, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, use_rslora: bool = False, backend: str = "auto"):
        nn.Module.__init__(self)
        if not isinstance(qweight, (Int8Weight, Int4Weight)):
            raise TypeError(f"IntQLoRALinear: qweight must be an Int8Weight or Int4Weight, got {type(qweight).__name__}")
        self._init_adapter(qweight.shape[1], qweight.shape[0], r, alpha, dropout, use_rslora, backend,
                           qweight.device, qweight.dtype)
        self._format = type(qweight)
        self._nominal_dtype = qweight.dtype
        self._group_size = getattr(qweight, "group_size", None)
        for i, t in enumerate(qweight.tensors()):
            _register_frozen(self, f"qweight_{i}", t)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @property
    def qweight(self):
        """The frozen base weight, in its nominal dtype (_base_dtype)."""
        dtype = self._base_dtype()
        if self._format is Int8Weight:
            return Int8Weight(self.qweight_0, self.qweight_1, dtype)
        return Int4Weight(self.qweight_0, self.qweight_1, self.qweight_2, self._group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qlora_linear(x, self.qweight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling,
                            dropout_p=self.dropout, training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, format={self._format.__name__}")


class IntQDoRALinear(IntQLoRALinear):
    """DoRA over a frozen INT8 / INT4 base: QDoRALinear's computation (dora_linear over the
    quantized weight, ‖W_i‖² cached in ``weight_row_sq``) with IntQLoRALinear's storage."""

    def __init__(self, qweight, bias: torch.Tensor | None = None, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, use_rslora: bool = False, backend: str = "auto"):
        super().__init__(qweight, bias, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, backend=backend)
        self.register_buffer("weight_row_sq", weight_row_sq(qweight))
        norm = dora_weight_norm(qweight, self.lora_A, self.lora_B, self.scaling, self.weight_row_sq)
        self.magnitude = nn.Parameter(norm.to(qweight.dtype))

    forward = QDoRALinear.forward  # the same dora_linear call; only the storage differs
    _row_norm = QDoRALinear._row_norm
