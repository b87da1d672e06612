"""LoRABranchLinear: a LoRA adapter beside a base layer that the fused ops cannot read, which keeps
computing its own forward."""
from __future__ import annotations

import torch
from torch import nn

from ..ops._checks import plain_tensor
from ..ops.lora_delta import lora_delta
from ._adapter import LoRAAdapter


def has_module_hooks(module: nn.Module) -> bool:
    """Whether hooks are registered on ``module`` itself (forward or backward, pre or post): they
    run only when its own forward is called, which a fused op in its place skips."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def needs_branch(linear: nn.Module) -> str | None:
    """Why ``linear`` (an nn.Linear) must keep its own forward under an adapter — a subclass with a
    forward of its own, hooks registered on it, a forward replaced on the instance
    (accelerate's hooks, which bring offloaded weights in for each call and leave ``weight`` on the
    meta device between calls), or a weight that is a tensor subclass (torchao's quantized
    weights) — or None for a plain nn.Linear computation the fused ops can take over."""
    if type(linear).forward is not nn.Linear.forward:
        return f"{type(linear).__name__}, a subclass of nn.Linear with a forward of its own"
    if has_module_hooks(linear):
        return "hooks are registered on it (they run in its own forward only)"
    if "forward" in vars(linear):
        hook = getattr(linear, "_hf_hook", None)
        return ("its forward is replaced on the instance"
                + (f" (accelerate's {type(hook).__name__}: weights offloaded or dispatched)" if hook is not None else ""))
    if not plain_tensor(linear.weight):
        return f"its weight is a {type(linear.weight).__name__} (a tensor subclass, e.g. torchao's quantized weights)"
    return None


class LoRABranchLinear(LoRAAdapter):
    """y = base_layer(x) + (alpha / r) * dropout(x) A^T B^T, for a base computed by its own forward
    (``needs_branch``: an nn.Linear subclass with a forward of its own, or an nn.Linear whose
    weight is a tensor subclass such as torchao's). The base is kept whole and frozen as the
    submodule ``base_layer`` (its state under "base_layer.", as in HF PEFT) and runs as it is; the
    branch runs through peft_kernels.lora_delta (dropout mask from the seed, only u [M, r] kept).
    HF PEFT's casts: x to the adapter's dtype for the branch, the sum back to the base output's
    dtype. Shapes: x [..., in] -> [..., out]; lora_A [r, in], lora_B [out, r] in the base weight's
    (nominal) dtype.

    Not mergeable: folding B·A into such a base needs that base's own rules, so merged_weight(),
    to_linear() and merge_and_unload refuse it by name. save_adapter / load_adapter work (PEFT's
    format holds the adapter tensors only). DoRA and quantize= need the base weight: not offered.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str = "auto"):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRABranchLinear: base_layer must be an nn.Linear (or a subclass), "
                            f"got {type(base_layer).__name__}")
        weight = base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        device = weight.device
        hook = getattr(base_layer, "_hf_hook", None)
        if device.type == "meta" and getattr(hook, "execution_device", None) is not None:
            device = torch.device(hook.execution_device)  # offloaded by accelerate: where it computes
        self._init_adapter(base_layer.in_features, base_layer.out_features, r, alpha, dropout, use_rslora, backend,
                           device, dtype)
        self.base_layer = base_layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        branch = lora_delta(x.to(self.lora_A.dtype), self.lora_A, self.lora_B, scaling=self.scaling,
                            dropout_p=self.dropout, training=self.training, backend=self.backend)
        return (result + branch).to(result.dtype)

    @property
    def bias_module(self) -> nn.Module:
        return self.base_layer  # the base keeps its bias and computes it in its own forward

    def _dense_base(self, acc: torch.dtype) -> torch.Tensor:
        raise ValueError(f"LoRABranchLinear over {type(self.base_layer).__name__} ({needs_branch(self.base_layer)}): "
                         "the adapter cannot be folded into a base that computes its own forward; keep the "
                         "layer, or merge with that base's own tools (the adapter is scaling * lora_B @ lora_A)")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, use_rslora={self.use_rslora}, "
                f"base={type(self.base_layer).__name__} (its own forward)")
