"""PEFT LoRA on a transformers MoE experts module's 3-D weights (``LoraConfig(target_parameters=
["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])``) without the expert stack PEFT forms.

PEFT wraps the experts module in a chain of ParamWrappers, one per targeted parameter. Each call,
each wrapper parametrizes its weight as W' = W + s·B_e A_e for all E experts — a new [E, out, in]
stack in the weight's dtype — and the experts' forward runs over W'. In backward, autograd then takes
W' 's full gradient (a weight-gradient GEMM over every expert's tokens, [E, out, in] again) and
carries it back through the stack into A and B: one GEMM of the base's size more than the frozen
experts, and two expert stacks of memory per targeted weight.

Patched, the chain's outermost wrapper computes the experts itself, in the steps transformers'
grouped_mm experts implementation takes (tokens sorted by expert, the up / gate-up projection, the
experts' own gate or activation, the down projection, the optional post-expert norm, routing
weights, the sum over top-k), over the frozen W; each targeted projection adds s·(x A_eᵀ) B_eᵀ for
the tokens routed to expert e — two grouped products of rank r, and no [E, out, in] tensor in
forward or backward. The products are torch's grouped GEMM (torch.nn.functional.grouped_mm) where it
takes the dtype and layout, else a loop over the experts — plain torch products, not a kernel of
ours. Whichever experts_implementation the model's config names, the patched chain computes these
steps (transformers' implementations are interchangeable by design; the tests compare against PEFT
over each).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.expert_matmul import expert_matmul, grouped_mm_dtype
from .peft import _PatchedForward, _hooked

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # PEFT's low-precision W's (fp8) stay PEFT's
# use_experts_implementation's flags (has_post_expert_norm and _is_expert_parallel, newer, read as False when absent)
_INTERFACE = ("has_gate", "has_bias", "is_transposed")


def chain(outer) -> tuple[list, nn.Module]:
    """(the ParamWrappers from ``outer`` inwards, the module they wrap)."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers, module = [], outer
    while isinstance(module, ParamWrapper):
        wrappers.append(module)
        module = module._modules["base_layer"]
    return wrappers, module


def _projections(experts) -> tuple[str, str]:
    """The experts' (up or gate-up, down) weight names, as transformers' experts implementations read them."""
    return ("gate_up_proj" if experts.has_gate else "up_proj"), "down_proj"


def experts_reason(outer) -> str | None:
    """Why the ParamWrapper chain under ``outer`` cannot be computed here (None if it can): its module
    must have transformers' experts interface (the ``use_experts_implementation`` decorator's flags,
    3-D projection weights), and every wrapper must target one of its projections."""
    return _chain_reason(*chain(outer))


def _chain_reason(wrappers: list, experts) -> str | None:
    """experts_reason for a chain already walked (chain(outer)): ExpertsForward checks it at every call."""

    def kind():  # formatted on failure only: this runs at every call
        return f"{type(experts).__module__}.{type(experts).__name__}"

    if any(not hasattr(experts, flag) for flag in _INTERFACE) or not callable(getattr(experts, "_apply_gate", None)):
        return f"{kind()} is not a transformers experts module (use_experts_implementation's interface)"
    if "forward" in vars(experts) or _hooked(experts):
        return f"{kind()}: " + (_hooked(experts) or "its forward is replaced on the instance")
    names = _projections(experts)
    weights = [experts._parameters.get(n) for n in names]
    if any(w is None or w.dim() != 3 for w in weights) or weights[0].shape[0] != weights[1].shape[0]:
        return f"{kind()} lacks 3-D {names[0]} / {names[1]} weights of one expert count"
    if experts.is_transposed and weights[1].shape[0] == 1:
        return (f"{kind()} holds one expert in the [E, in, out] layout: PEFT adds its LoRA delta there as a "
                "Linear's [out, in] (an error unless in == out, transposed if equal); its forward is kept as it is")
    targeted = [w.parameter_name for w in wrappers]
    if len(set(targeted)) != len(targeted) or any(n not in names for n in targeted):
        return f"LoRA targets {targeted}; computed here: the projections {list(names)}"
    for n in set(targeted):
        if experts._parameters[n].dtype not in _DTYPES:
            return f"{n} is {experts._parameters[n].dtype} (PEFT adds its delta in a wider dtype)"
    return None


def _aligned_rank(a_t, b_t, x):
    """Aᵀ [E, k, r] and Bᵀ [E, r, n] with zero rank columns / rows added up to a 16-byte multiple where
    grouped_mm would take them (x A_eᵀ [S, r] must be 16-byte aligned to feed the next product);
    zeros add nothing."""
    pad = -a_t.shape[2] % (16 // x.element_size())
    if pad and grouped_mm_dtype(x):
        a_t = F.pad(a_t.transpose(-2, -1), (0, 0, 0, pad)).transpose(-2, -1)  # stays [r, k]-major per expert
        b_t = F.pad(b_t, (0, 0, 0, pad))
    return a_t, b_t


def _projection(experts, name: str, x, ids, ends, loras: dict):
    """One expert projection of the sorted rows x: x W_eᵀ (+ bias_e) + Σ_adapters s·(x A_eᵀ) B_eᵀ, in W's
    dtype (PEFT casts the factors to it), outside autocast as PEFT's W + s·B A stack and grouped_mm."""
    w = experts._parameters[name]
    x = x.to(w.dtype)
    y = expert_matmul(x, w if experts.is_transposed else w.transpose(-2, -1), ends)
    if experts.has_bias:
        y = y + experts._parameters[name + "_bias"][ids]
    for a_t, b_t, scaling in loras.get(name, ()):
        a_t, b_t = _aligned_rank(a_t.to(w.dtype), b_t.to(w.dtype), x)
        y = y + expert_matmul(expert_matmul(x, a_t, ends) * scaling, b_t, ends)
    return y


def experts_with_lora(experts, hidden_states, top_k_index, top_k_weights, loras: dict):
    """The experts' output [T, H] for hidden_states [T, H] routed to top_k_index [T, k] with
    top_k_weights [T, k], each projection named in ``loras`` ({weight name: [(Aᵀ [E, in, r],
    Bᵀ [E, r, out], scaling), ...]}) adding its adapters' low-rank terms. transformers'
    grouped_mm_experts_forward's steps (its expert-parallel sentinels excepted: that case stays PEFT's)."""
    tokens, top_k = top_k_index.shape
    up, down = _projections(experts)
    ids = top_k_index.reshape(-1)
    ids_sorted, order = torch.sort(ids, stable=True)
    # each expert's end row among the sorted ones: expert_matmul's groups, made without a host sync
    ends = torch.searchsorted(ids_sorted, torch.arange(experts._parameters[down].shape[0], device=ids.device),
                              right=True, out_int32=True)
    h = _projection(experts, up, hidden_states[order // top_k], ids_sorted, ends, loras)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    y = _projection(experts, down, h, ids_sorted, ends, loras)
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    # back to (token, k) order by a gather, which keeps only its index for backward
    back = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return y[back].view(tokens, top_k, y.shape[-1]).sum(dim=1).to(hidden_states.dtype)


def _factors(wrapper, name: str, experts: int):
    """Adapter ``name`` of a ParamWrapper as (Aᵀ [E, in, r], Bᵀ [E, r, out], scaling): PEFT's
    get_delta_factors reads A_e from lora_A.weight [E·r, in] (rows e·r ...) and B_e from lora_B.weight
    [out, r·E] (columns i·E + e, interleaved). Bᵀ is copied expert-major (E·r·out values, the size of
    the parameter): grouped_mm needs each expert's matrix row- or column-major."""
    a = wrapper.lora_A[name].weight
    b = wrapper.lora_B[name].weight
    return (a.reshape(experts, -1, a.shape[-1]).transpose(-2, -1),
            b.reshape(b.shape[0], -1, experts).permute(2, 1, 0).contiguous(), wrapper.scaling[name])


def _call_reason(experts) -> str | None:
    """Why the experts cannot be computed here at this call: expert parallelism (transformers' sentinel
    rows), DeepSpeed ZeRO-3 (its hooks gather the weights in the experts' own forward)."""
    if getattr(experts, "_is_expert_parallel", False):
        return "the experts run expert-parallel"
    if getattr(experts._parameters["down_proj"], "ds_id", None) is not None:
        return "DeepSpeed ZeRO-3 partitions its parameters (each module's forward hooks gather its own)"
    return None


class ExpertsForward(_PatchedForward):
    """The patched forward of a ParamWrapper chain's outermost wrapper (module docstring). PEFT's forward
    runs for what this does not compute: adapters disabled or merged, an expert-parallel or
    ZeRO-3-partitioned experts module, a call with other arguments (mixed-adapter batches, which
    PEFT rejects here), and a chain changed since patching (warned once)."""

    kind = "MoE experts (LoRA on target_parameters)"

    def __init__(self, layer, original):
        super().__init__(layer, original)
        self.signature = None  # the experts' forward signature, read for keyword calls

    def _routing(self, experts, x, args, kwargs):
        """(top_k_index, top_k_weights) of a call with the experts' three arguments, else None."""
        if len(args) == 2 and not kwargs:
            return args
        if self.signature is None:
            self.signature = inspect.signature(type(experts).forward)
        try:
            bound = self.signature.bind(experts, x, *args, **kwargs)
        except TypeError:
            return None
        values = list(bound.arguments.values())[2:]
        return values if len(values) == 2 and not bound.kwargs else None

    def __call__(self, x, *args, **kwargs):
        wrappers, experts = chain(self.layer)
        routing = self._routing(experts, x, args, kwargs)
        if routing is None or x.dim() != 2 or any(w.disable_adapters or w.merged for w in wrappers):
            return self.original(x, *args, **kwargs)
        why = _chain_reason(wrappers, experts) or _call_reason(experts)
        if why is not None:
            return self._unfused("experts", why, x, args, kwargs)
        count = experts._parameters["down_proj"].shape[0]
        loras = {}
        for w in wrappers:
            adapters = w.lora_A._modules
            loras[w.parameter_name] = [_factors(w, n, count) for n in w.active_adapters if n in adapters]
        if not any(loras.values()):
            return self.original(x, *args, **kwargs)
        return experts_with_lora(experts, x, *routing, loras)
