"""The LoRA adapter state shared by LoRALinear and QLoRALinear (HF PEFT's conventions)."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .. import backends


def is_conv1d(module) -> bool:
    """transformers' Conv1D (GPT-2 family): y = x @ W + b with W stored [in, out] — nn.Linear's
    computation with the weight transposed."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def linear_weight(module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear, or a view of a Conv1D's [in, out] one."""
    return module.weight.t() if is_conv1d(module) else module.weight


def features(module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear (bitsandbytes' packed ones included) or a
    transformers Conv1D (nf, nx)."""
    return (module.nf, module.nx) if is_conv1d(module) else (module.out_features, module.in_features)


class LoRAAdapter(nn.Module):
    """Holds lora_A [r, in] (Kaiming-uniform, a=sqrt(5)) and lora_B [out, r] (zeros: a fresh
    adapter is a no-op); scaling = alpha / r, or alpha / sqrt(r) with rsLoRA. ``fan_in_fan_out``:
    the base was a transformers Conv1D (PEFT's flag of that name), so export gives one back."""

    fan_in_fan_out = False

    def _init_adapter(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                      use_rslora: bool, backend: str, device, dtype):
        name = type(self).__name__
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise ValueError(f"{name}: r must be an integer >= 1, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"{name}: alpha must be a finite number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be a number in [0, 1), got {dropout!r}")
        backends.check_name(backend, name)
        # plain Python numbers (a numpy int would not go into save_adapter's JSON)
        r, alpha, dropout = int(r), float(alpha), float(dropout)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout, self.use_rslora, self.backend = r, alpha, dropout, use_rslora, backend
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.reset_lora_parameters()

    @torch.no_grad()
    def cast_adapter_(self, dtype: torch.dtype) -> "LoRAAdapter":
        """Keep the trained tensors — lora_A, lora_B and DoRA's magnitude — in ``dtype`` (e.g.
        torch.float32 over a bf16 / fp16 base, as HF PEFT's get_peft_model does by default), the
        base as it is. The ops cast them to the input's dtype per call; their gradients come back
        in ``dtype``. Call it before an optimizer holds them (the Parameters are kept)."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__}.cast_adapter_: dtype must be a floating torch.dtype, got {dtype!r}")
        for name in ("lora_A", "lora_B", "magnitude"):  # a quantized base keeps its _nominal_dtype
            p = self._parameters.get(name)
            if p is not None:
                p.data = p.data.to(dtype)
        return self

    @property
    def bias_module(self) -> nn.Module:
        """The module holding this layer's bias (the one HF PEFT saves as "<layer>.base_layer.bias"):
        the layer itself; a LoRABranchLinear's base_layer."""
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def reset_lora_parameters(self):
        """A fresh adapter (PEFT's init): lora_A Kaiming-uniform (a=√5), lora_B zeros, and DoRA's
        magnitude ‖W‖_row, so the layer computes its base layer again. A merged layer is unmerged
        first (its weight still holds the old adapter). After building a model on the meta device
        and loading its base weights, this gives its adapters their values."""
        if getattr(self, "merged", False):
            self.unmerge()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if "magnitude" in self._parameters:  # absent while _init_adapter runs
            with torch.no_grad():
                self.magnitude.copy_(self._row_norm())

    def reset_parameters(self):
        """torch's convention (nn.Linear.reset_parameters, which meta-device materialization such
        as FSDP's calls after ``to_empty``): every tensor the layer owns gets a fresh layer's value
        — a dense base weight and bias as nn.Linear initializes them, then reset_lora_parameters().
        A pretrained dense base is overwritten, as nn.Linear's would be: load base weights after it
        (then, for DoRA, reset_lora_parameters() again: the magnitude starts at ‖W‖_row). A
        quantized base is kept: it has no random init."""
        if getattr(self, "merged", False):
            self.unmerge()
        self._reset_base()
        self.reset_lora_parameters()

    def _reset_base(self):
        """Re-initialize a dense base as nn.Linear does (subclasses with one); quantized: nothing."""

    # ------------------------------------------------------------------ export
    # A subclass gives its base weight as a dense tensor (_dense_base), the dtype a merged weight
    # comes back in (_base_dtype) and, for DoRA, ‖W + s·B·A‖ per row (_row_norm).
    def _base_dtype(self) -> torch.dtype:
        return self.lora_A.dtype  # a quantized base's nominal dtype is the adapter's

    def _merge_dtype(self) -> torch.dtype:
        # fp32 for 16-bit weights (one rounding, at the end); fp64 weights stay fp64
        return torch.promote_types(self._base_dtype(), torch.float32)

    def _delta(self, acc: torch.dtype) -> torch.Tensor:
        """scaling * B @ A, [out, in], in ``acc``."""
        return self.scaling * (self.lora_B.to(acc) @ self.lora_A.to(acc))

    @torch.no_grad()
    def _merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the effective weight in the merge dtype, DoRA's row scale m / ‖W + s·B·A‖ or None)."""
        acc = self._merge_dtype()
        w = self._dense_base(acc) + self._delta(acc)
        if not hasattr(self, "magnitude"):
            return w, None
        scale = self.magnitude.to(acc) / self._row_norm().to(acc)
        return w * scale[:, None], scale

    def merged_weight(self) -> torch.Tensor:
        """The layer's effective weight as a new dense [out, in] tensor: W + s·B·A (DoRA:
        m / ‖W + s·B·A‖_row ⊙ (W + s·B·A)), computed in fp32 (fp64 for fp64) from the base
        (a quantized one decoded), returned in the base weight's dtype (the adapter's over a
        quantized base). The layer is not changed."""
        if getattr(self, "merged", False):
            return self.linear_weight.detach().clone(memory_format=torch.contiguous_format)
        return self._merged()[0].to(self._base_dtype())

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding merged_weight() and the bias (PEFT's merge_and_unload, for one
        layer): its weight is frozen as the base was; its bias trains if the layer's did."""
        return linear_holding(self.merged_weight(), self.bias)

    def unloaded(self) -> nn.Module:
        """What merge_and_unload puts in this layer's place: to_linear(), or over a Conv1D base
        (fan_in_fan_out) a transformers Conv1D holding the merged weight [in, out], as the model's
        own checkpoints store it."""
        return conv1d_holding(self.to_linear()) if self.fan_in_fan_out else self.to_linear()


def conv1d_holding(linear: nn.Linear) -> nn.Module:
    """A transformers Conv1D computing what ``linear`` does: its weight transposed to [in, out], as
    GPT-2's checkpoints store it, and its bias (Conv1D always has one: zeros for a layer without)."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):  # no random init spent on it
        conv = Conv1D(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.t().contiguous(), requires_grad=False)
    conv.bias = linear.bias if linear.bias is not None else nn.Parameter(
        linear.weight.new_zeros(linear.out_features), requires_grad=False)
    return conv


def linear_holding(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain nn.Linear over ``weight`` [out, in] (frozen) and a copy of ``bias`` in its dtype
    (trainable if ``bias`` is), built on the meta device so no random init is spent on it."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    # a Parameter given (a table the head is tied to) is kept as it is, so the two stay one
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(weight.dtype, copy=True), requires_grad=bias.requires_grad)
    return linear
