"""Accelerate an HF PEFT model in place: route its LoRA Linear layers through lora_linear
(dora_linear for DoRA adapters, qlora_linear over a quantized bitsandbytes Linear4bit base,
whose packed bytes are read as they are; GPT-2-style Conv1D bases through a transposed view of
their [in, out] weight; over any other base — bitsandbytes' 8-bit Linear8bitLt, a layer type
peft_kernels does not know — the base runs its own forward and the LoRA branch alone is fused,
lora_delta; lora_B's bias, PEFT's lora_bias, joins the op's bias), its AdaLoRA SVDLinear and its
VeRA, LoHa, DeLoRA, VB-LoRA and UniLoRA Linear layers through the same ops (LoRA with other
factors, formed each call: _AdaLoRAFamily, _VeRAFamily, _LoHaFamily — LoHa's Hadamard product as
LoRA of rank r² —, _DeLoRAFamily, _OwnFactorsFamily), and its SHiRA Linear layers (PEFT's sparse
high-rank adapter: trained values at k fixed positions of W) through sparse_delta_linear — PEFT's
own SHiRA forward clones the whole weight every step and its backward forms the dense [out, in]
weight gradient to keep k entries of it; its trainable-tokens layers (trained rows of the
embedding, and of a head tied to it) likewise, through sparse_delta_embedding and
sparse_delta_linear; its LoKr Linear layers as products of their Kronecker factors beside the
base's own forward (plain torch GEMMs, _kron_delta) where PEFT forms and multiplies the dense Δ; and
its LoRA on MoE experts' 3-D weights (target_parameters: ParamWrapper chains around a transformers
experts module) as grouped products of the frozen experts plus each expert's rank-r factors, where
PEFT forms W + s·B_e A_e for every expert each call (peft_experts.py).

Per instance, no class swap: a patched layer gets an instance-level ``forward`` (a method bound
to the layer, so a copy.deepcopy of the model is patched too and computes with its own weights)
that calls the fused op and keeps PEFT's own forward for the states it does not fuse (adapters disabled, merged,
several active adapters with a DoRA one among them) — those are PEFT semantics, not slow paths.
Several active adapters (PEFT sums their branches) are one product of joined factors without
active dropout, else one fused op plus a lora_delta per further adapter, each with its own mask (_join);
mixed-adapter batches (adapter_names) two products of the joined factors (_mixed_batch).
Under torch.autocast the fused op runs in the autocast dtype, as F.linear would. An x whose dtype
differs from the base weight's outside autocast runs PEFT's forward (which raises or handles it
as PEFT does), with a warning once per layer so it is never silent.
``unpatch_peft_model`` puts back what ``forward`` was.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import typing
import warnings

import torch
from torch import nn

from ..nn._adapter import is_conv1d
from ..nn.branch import has_module_hooks, needs_branch
from ..nn.sparse_embedding import unsupported_lookup
from ..ops import _checks
from ..ops.dora import cached_weight_row_sq, dora_linear
from ..ops.lora import lora_linear
from ..ops.lora_delta import lora_delta
from ..ops.qlora import qlora_linear
from ..ops.sparse_delta import sparse_delta_linear
from ..ops.sparse_embedding import sparse_delta_embedding
from ..quant.bnb4bit import bnb_cpu_repacked, bnb_linear4bit_class, is_bnb_linear4bit
from ..sparse import layout
from ..tensor_cache import TensorCache

# What patch_peft_model computes (shown by peft-kernels info): HF PEFT layer -> how. Every other
# PEFT layer keeps PEFT's forward and is listed, with why, in the PatchReport.
COMPUTED_LAYERS = {
    "LoRA Linear (DoRA, MiCA, lora_bias) over nn.Linear, Conv1D, bnb 4-bit": "lora_linear / dora_linear / qlora_linear",
    "LoRA Linear over bnb 8-bit, torchao and unknown bases": "lora_delta beside the base's own forward",
    "AdaLoRA SVDLinear (and its bnb 4- / 8-bit classes)": "the same ops, A' = A ⊙ E / ranknum",
    "VeRA, LoHa (r <= 16), DeLoRA, VB-LoRA, UniLoRA Linear": "lora_linear over factors formed each call",
    "LoKr Linear": "products of its Kronecker factors beside the base's forward (torch GEMMs, no dense Δ)",
    "LoRA on MoE experts' weights (target_parameters, transformers experts modules)":
        "grouped products of the frozen experts and each expert's factors (torch grouped GEMMs, no W + BA stack)",
    "SHiRA Linear": "sparse_delta_linear",
    "trainable tokens (trainable_token_indices)": "sparse_delta_embedding / sparse_delta_linear",
}


@dataclasses.dataclass
class PatchReport:
    """What ``patch_peft_model`` did: patched layer names, and the layers left alone with why."""

    patched: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    # patched layers whose base runs its own forward, the LoRA branch alone fused: name -> base type
    branch_only: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"peft_kernels: patched {len(self.patched)} layer(s), left {len(self.skipped)} alone"]
        lines += [f"  patched  {name}" + (f" (LoRA branch; the base runs its own forward: {self.branch_only[name]})"
                                          if name in self.branch_only else "") for name in self.patched]
        lines += [f"  skipped  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


_MISSING = object()


def _attr(module: nn.Module, name: str):
    """``module.<name>`` for a registered parameter, submodule or buffer without nn.Module.__getattr__'s
    Python fallback (about 0.5 µs a read; a patched layer reads a dozen per call, and host time is
    what limits a patched model's step — benchmarks/NOTES.md); anything else (a property, a
    parametrized weight) through getattr."""
    d = module.__dict__
    for registry in ("_parameters", "_modules", "_buffers"):
        value = d[registry].get(name, _MISSING)
        if value is not _MISSING:
            return value
    return getattr(module, name)


def _whole_layer_base(base) -> bool:
    """Whether the fused ops compute this base layer themselves: an nn.Linear computing nn.Linear's
    forward (apply_lora's rule, needs_branch), transformers' Conv1D (a transposed view) or a
    quantized bnb Linear4bit (its bytes). Any other base — a weight that is a tensor subclass
    (torchao's quantized weights), hooks on it, a forward replaced on the instance
    (accelerate's offloading hooks) — runs its own forward beside the fused LoRA branch
    (_BranchForward)."""
    if "forward" in vars(base) or _hooked(base):
        return False
    if bnb_linear4bit_class(base) is not None:
        return True
    if is_conv1d(base):
        return _checks.plain_tensor(base.weight)
    return isinstance(base, nn.Linear) and needs_branch(base) is None


def _static_reason(layer, family) -> str | None:
    """Why this PEFT layer (of ``family``) over a whole-layer base cannot be fused (None if it can)."""
    base = layer.get_base_layer()
    conv1d = is_conv1d(base)
    if bool(getattr(layer, "fan_in_fan_out", conv1d)) != conv1d:  # PEFT sets it from the base type
        return (f"fan_in_fan_out={getattr(layer, 'fan_in_fan_out', False)} does not match the base layer "
                f"{type(base).__name__}'s weight layout")
    for name in _attr(layer, family.attr):
        reason = family.reason(layer, name)
        if reason is not None:
            return reason
    return None


# PEFT's LoRA variants the patch computes: DoRA (dora_linear) and MiCA (plain LoRA with lora_B
# frozen: PEFT's own forward for it is LoRA's, and the ops give no gradient to a frozen lora_B).
_FUSED_VARIANTS = ("DoraLinearVariant", "MiCALinearVariant")


def _is_dora(layer, name: str) -> bool:
    return type(getattr(layer, "lora_variant", {}).get(name)).__name__ == "DoraLinearVariant"


def _adapter_reason(layer, name: str) -> str | None:
    """Why adapter ``name`` of the layer cannot be fused (None if it can). Checked at patch time
    and again at every call: an adapter added or changed after patching (another LoRA variant,
    a bias on lora_B, another dropout module) must not be computed as if it were plain LoRA."""
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None and type(variant).__name__ not in _FUSED_VARIANTS:
        return (f"adapter {name!r} uses the LoRA variant {type(variant).__name__} (supported: DoRA, and MiCA, "
                "which computes plain LoRA)")
    down, up, dropout = _attr(layer, "lora_A")[name], _attr(layer, "lora_B")[name], _attr(layer, "lora_dropout")[name]
    if _attr(down, "bias") is not None:
        return f"adapter {name!r}'s lora_A has a bias"
    if _attr(up, "bias") is not None and _is_dora(layer, name):  # PEFT's config refuses it; set by hand, not fused
        return f"adapter {name!r} is DoRA with a bias on lora_B (lora_bias=True)"
    hooked = [part for part, module in (("lora_A", down), ("lora_B", up), ("lora_dropout", dropout))
              if has_module_hooks(module)]
    if hooked:  # e.g. Opacus' per-sample gradients: its hooks run in those modules' own forward only
        return f"adapter {name!r} has hooks on its {' / '.join(hooked)} modules"
    return _dropout_reason(name, dropout)


def _dropout_reason(name: str, dropout) -> str | None:
    """The fused ops regenerate nn.Dropout's kind of mask (from a seed); other dropout modules are PEFT's."""
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"adapter {name!r} uses dropout {type(dropout).__name__}"
    return None


class _PatchedForward:
    """A patched layer's forward: a fused op, or ``original`` (what ``layer.forward`` was) for
    the states it does not fuse. An object holding the layer, not a closure: copy.deepcopy of the
    model gives the copy a forward over the copy's own weights (a closure kept computing with the
    ORIGINAL layer inside a deep copy — TRL's reference-model idiom), and torch.save pickles it."""

    kind = "PEFT"  # the adapter family, in warnings

    def __init__(self, layer, original):
        self.layer, self.original = layer, original
        self.original_was_instance_attribute = "forward" in layer.__dict__  # e.g. an accelerate hook
        self.warned = False
        self.unfused: set = set()  # adapters found unfusable at call time (warned once each)
        self.base_cache = (None, None)  # (layer.base_layer, what get_base_layer() found under it)

    def _base_layer(self):
        """layer.get_base_layer(), looked up again only when layer.base_layer is another module:
        PEFT's get_base_layer probes ``hasattr(m, "base_layer")`` down the chain, µs per call."""
        outer = self.layer.__dict__["_modules"].get("base_layer")
        cached_outer, base = self.base_cache
        if outer is None or outer is not cached_outer:
            base = self.layer.get_base_layer()
            self.base_cache = (outer, base)
        return base

    def _adapter_to_fuse(self, adapters, reason, x, args, kwargs, several: bool = False):
        """(the one active adapter to fuse — with ``several``, the list of the active ones —, None,
        the base layer), or (None, PEFT's own output, None) for the states PEFT's forward keeps —
        adapters disabled or merged, extra arguments (mixed-adapter batches), no active adapter, or
        several without ``several`` — and for an adapter ``reason(layer, name, base)`` finds
        unfusable now (warned once). ``adapters``: the layer's adapter dict (lora_A, shira_weight).
        The base layer is looked up once per call: PEFT's get_base_layer probes attributes with
        hasattr, µs each, and every step calls this per layer."""
        layer = self.layer
        active = [a for a in layer.active_adapters if a in adapters]
        if args or kwargs or layer.disable_adapters or layer.merged or not active or (len(active) > 1 and not several):
            return None, self.original(x, *args, **kwargs), None
        base = self._base_layer()
        for name in active:
            why = _zero3_partitioned(base) or reason(layer, name, base)
            if why is not None:  # changed since patching: PEFT's forward, said once
                return None, self._unfused(name, why, x, args, kwargs), None
        return (active if several else active[0]), None, base

    def _unfused(self, name: str, reason: str, x, args, kwargs):
        """PEFT's forward for an adapter that cannot be fused right now, said once per adapter."""
        if name not in self.unfused:
            self.unfused.add(name)
            warnings.warn(f"peft_kernels: a patched {self.kind} layer runs PEFT's unfused forward: "
                          f"{reason}", stacklevel=3)
        return self.original(x, *args, **kwargs)

    @staticmethod
    def _in_op_dtype(x, weight, bias):
        """(x, weight, bias) as the fused op computes them: under autocast, cast by the ops' own rule
        here already, so that the caller's dtype check sees what the op would."""
        autocast = _checks.autocast_dtype(x)
        return (x, weight, bias) if autocast is None else _checks.to_autocast(autocast, x, weight, bias)

    def _dtype_mismatch(self, x, weight, args, kwargs):
        """x in another dtype than the base weight (outside autocast): PEFT's forward, warned once."""
        if not self.warned:
            warnings.warn(f"peft_kernels: a patched {self.kind} layer got x in {x.dtype} but its base "
                          f"weight is {weight.dtype}; running PEFT's unfused forward for it", stacklevel=3)
            self.warned = True
        return self.original(x, *args, **kwargs)


def _op_kwargs(layer, dropout, scaling) -> dict:
    """The fused LoRA ops' scaling / dropout_p / training for a PEFT layer's adapter with this dropout
    module (nn.Dropout or nn.Identity: _dropout_reason lets no other through) and scaling."""
    return {"scaling": float(scaling), "dropout_p": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            "training": layer.training}


class _Factors(typing.NamedTuple):
    """One adapter of a PEFT layer as the LoRA ops take it: y = base(x) + bias_extra + scaling ·
    dropout(x) A^T B^T (dropout / training in ``op_kwargs``)."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    bias_extra: torch.Tensor | None  # [out], added to the base's bias (PEFT's lora_bias), or None
    op_kwargs: dict
    cast_dtype: torch.dtype  # PEFT's _cast_input_dtype target for x on the branch path


class _Family:
    """What a LoRA-like family of PEFT layers tells the patched forward: ``kind`` (its name, in
    warnings), ``attr`` (the layer's dict of adapters, by name), ``reason(layer, name)`` (why an
    adapter cannot be fused, or None), ``factors(layer, name)`` (its _Factors for this call, or None
    when the adapter sits this call out); and, defaulted here, ``magnitude`` (DoRA's, else None) and
    ``output`` (the result in the dtype PEFT's forward returns: the base output's, the ops' too, unless
    ``out_in_x_dtype``: forwards that end in result.to(x's dtype))."""

    out_in_x_dtype = False

    @staticmethod
    def magnitude(layer, name: str) -> torch.Tensor | None:
        return None

    @classmethod
    def output(cls, y, x):
        return y.to(x.dtype) if cls.out_in_x_dtype else y


class _LoRAFamily(_Family):
    """PEFT's LoRA Linear (lora.layer.Linear and its bnb 4-/8-bit classes): lora_A / lora_B are
    nn.Linear modules; lora_bias=True puts a bias on lora_B, which PEFT scales with the branch."""

    kind = "LoRA"
    attr = "lora_A"  # the layer's dict of adapters, by name

    @staticmethod
    def reason(layer, name: str) -> str | None:
        return _adapter_reason(layer, name)

    @staticmethod
    def factors(layer, name: str) -> _Factors:
        A, up = _attr(_attr(layer, "lora_A")[name], "weight"), _attr(layer, "lora_B")[name]
        kw = _op_kwargs(layer, _attr(layer, "lora_dropout")[name], layer.scaling[name])
        bias = _attr(up, "bias")
        return _Factors(A, _attr(up, "weight"), None if bias is None else bias * kw["scaling"], kw, A.dtype)

    @staticmethod
    def magnitude(layer, name: str) -> torch.Tensor | None:
        """DoRA's magnitude vector [out], or None for plain LoRA."""
        return _attr(_attr(layer, "lora_magnitude_vector")[name], "weight") if _is_dora(layer, name) else None


class _AdaLoRAFamily(_Family):
    """PEFT's AdaLoRA SVDLinear: y = base(x) + (dropout(x) (A ⊙ E)^T B^T) · scaling / (ranknum + 1e-5),
    A [r, in], E [r, 1] (the singular values the rank allocator masks), B [out, r] Parameters. As LoRA
    factors: A' = A ⊙ E / (ranknum + 1e-5), formed on the device each call ([r, in]: no host sync on
    ranknum); autograd takes A''s gradient back to A and E."""

    kind = "AdaLoRA"
    attr = "lora_A"

    @staticmethod
    def reason(layer, name: str) -> str | None:
        A, E, B = layer.lora_A[name], layer.lora_E[name], layer.lora_B[name]
        if A.dim() != 2 or A.shape[0] == 0 or tuple(E.shape) != (A.shape[0], 1) or B.dim() != 2 \
                or B.shape[1] != A.shape[0]:
            return (f"adapter {name!r} has rank 0 or lora_A {tuple(A.shape)} / lora_E {tuple(E.shape)} / "
                    f"lora_B {tuple(B.shape)} that do not chain")
        return _dropout_reason(name, layer.lora_dropout[name])

    @staticmethod
    def factors(layer, name: str) -> _Factors:
        A = _attr(layer, "lora_A")[name]
        rank_scale = (_attr(layer, "ranknum")[name] + 1e-5).to(A.dtype)  # PEFT's divisor, computed as PEFT does
        kw = _op_kwargs(layer, _attr(layer, "lora_dropout")[name], layer.scaling[name])
        return _Factors(A * _attr(layer, "lora_E")[name] / rank_scale, _attr(layer, "lora_B")[name], None, kw, A.dtype)


class _VeRAFamily(_Family):
    """PEFT's VeRA Linear: y = base(x) + λ_b ⊙ ((λ_d ⊙ (dropout(x) A_s^T)) B_s^T), with A_s / B_s the
    [r, in] / [out, r] slices of the model's shared frozen random matrices and λ_d [r], λ_b [out] the
    trained vectors. As LoRA factors: A' = A_s itself and B' = diag(λ_b) B_s diag(λ_d), both vectors
    folded into B' (formed each call, [out, r]; autograd takes its gradient back to λ_d and λ_b). A'
    frozen, the op skips dA' (a GEMM of M·r·in that λ_d ⊙ A_s would cost), and B_s ⊙ (λ_b ⊗ λ_d) keeps
    no [out, r] intermediate for backward besides B' (B_s needs no gradient)."""

    kind = "VeRA"
    attr = "vera_lambda_d"

    @staticmethod
    def reason(layer, name: str) -> str | None:
        d, b = layer.vera_lambda_d[name], layer.vera_lambda_b[name]
        try:
            A, B = layer.vera_A[name], layer.vera_B[name]
        except KeyError:
            return f"adapter {name!r} has no vera_A / vera_B"
        r = d.numel()
        if d.dim() != 1 or r == 0 or tuple(b.shape) != (layer.out_features,) or A.dim() != 2 or A.shape[0] != r \
                or A.shape[1] < layer.in_features or B.dim() != 2 or B.shape[1] != r or B.shape[0] < layer.out_features:
            return (f"adapter {name!r}'s shapes do not chain: lambda_d {tuple(d.shape)}, lambda_b {tuple(b.shape)}, "
                    f"vera_A {tuple(A.shape)}, vera_B {tuple(B.shape)}")
        return _dropout_reason(name, layer.vera_dropout[name])

    @staticmethod
    def factors(layer, name: str) -> _Factors:
        d, b = _attr(layer, "vera_lambda_d")[name], _attr(layer, "vera_lambda_b")[name]
        A = _attr(layer, "vera_A")[name][:, :layer.in_features].to(d.device)
        B = _attr(layer, "vera_B")[name][:layer.out_features, :].to(d.device)
        kw = _op_kwargs(layer, _attr(layer, "vera_dropout")[name], 1.0)
        return _Factors(A, B * (b[:, None] * d[None, :]), None, kw, d.dtype)


class _LoHaFamily(_Family):
    """PEFT's LoHa Linear: y = base(x) + x Δ^T with Δ = s · (W1a W1b) ⊙ (W2a W2b), W1a / W2a [out, r],
    W1b / W2b [r, in]. PEFT forms the dense [out, in] Δ every call and multiplies by it: a full
    extra GEMM forward, two backward, and Δ's gradient through the Hadamard product. A Hadamard
    product of two rank-r products has rank r², with Khatri-Rao factors:
    Δ[o, i] = Σ_{p,q} W1a[o,p] W2a[o,q] · W1b[p,i] W2b[q,i], so B' [out, r²] holds the rows of
    W1a ⊗ W2a and A' [r², in] the columns of W1b ⊙ W2b — LoRA of rank r² (r ≤ 16: r² ≤ 256, what one
    kernel takes), formed each call; autograd takes their gradients back to the four matrices.
    PEFT's rank dropout (rows of Δ masked, scaled by the mask's mean) scales the rows of B'; its
    module dropout skips the adapter for the call (factors None). Both draw from torch's CPU
    generator in PEFT's order, so a seeded step repeats PEFT's."""

    kind = "LoHa"
    attr = "hada_w1_a"
    out_in_x_dtype = True  # LycorisLayer.forward ends in result.to(x's dtype), under autocast too

    @staticmethod
    def reason(layer, name: str) -> str | None:
        if name in layer.hada_t1:
            return f"adapter {name!r} uses LoHa's CP decomposition (hada_t1: a convolution's)"
        try:
            w1a, w1b, w2a, w2b = (getattr(layer, part)[name]
                                  for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        except KeyError:
            return f"adapter {name!r} lacks one of hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b"
        r, out, inp = w1a.shape[-1], layer.out_features, layer.in_features
        if any(w.dim() != 2 for w in (w1a, w1b, w2a, w2b)) or r == 0 or tuple(w2a.shape) != (out, r) \
                or tuple(w1a.shape) != (out, r) or tuple(w1b.shape) != (r, inp) or tuple(w2b.shape) != (r, inp):
            return (f"adapter {name!r}'s shapes do not chain with the [{out}, {inp}] weight: hada_w1_a "
                    f"{tuple(w1a.shape)}, hada_w1_b {tuple(w1b.shape)}, hada_w2_a {tuple(w2a.shape)}, "
                    f"hada_w2_b {tuple(w2b.shape)}")
        if r * r > _checks.TRITON_MAX_RANK:
            return (f"adapter {name!r} has rank {r}: its Hadamard product is LoRA of rank r² = {r * r}, above the "
                    f"{_checks.TRITON_MAX_RANK} one fused kernel takes (r <= 16)")
        return None

    @staticmethod
    def factors(layer, name: str) -> _Factors | None:
        """The adapter's LoRA factors for this call, or None when its module dropout skips it (PEFT
        draws torch.rand(1) for every adapter in training, skipped or not)."""
        if _module_dropout_skips(layer, name):
            return None
        w1a, w1b = _attr(layer, "hada_w1_a")[name], _attr(layer, "hada_w1_b")[name]
        w2a, w2b = _attr(layer, "hada_w2_a")[name], _attr(layer, "hada_w2_b")[name]
        r = w1b.shape[0]
        A = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, -1)
        B = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], r * r)
        p = layer.rank_dropout[name]
        if layer.training and p:  # LoHaLayer.get_delta_weight's mask: in Δ's dtype, always normalized
            B = B * _rank_dropout_rows(B.shape[0], p, B.dtype, scale=True).to(B.device)[:, None]
        # PEFT multiplies Δ by torch.tensor(scaling): the scaling rounded to the default dtype
        scaling = float(layer.scaling[name])
        if torch.get_default_dtype() == torch.float32:
            scaling = _as_float32(scaling)
        return _Factors(A, B, None, {"scaling": scaling, "dropout_p": 0.0, "training": layer.training}, w1a.dtype)


class _DeLoRAFamily(_Family):
    """PEFT's DeLoRA Linear: y = base(x) + B diag(λ / (r ‖A_i‖ ‖B_:i‖)) A diag(w) dropout(x), w [in] the
    frozen base's column norms (a buffer), the factor norms clamped at 1e-4 and not detached. As LoRA
    factors: A' = (A ⊙ w) scaled per row by λ / (r ‖A_i‖ ‖B_:i‖), B' = B (the column scaling commutes
    with the dropout mask); autograd takes A''s gradient back through the norms to A, B and λ."""

    kind = "DeLoRA"
    attr = "delora_A"
    out_in_x_dtype = True  # DeloraLayer.forward ends in result.to(x's dtype)

    @staticmethod
    def reason(layer, name: str) -> str | None:
        A, B, lam = layer.delora_A[name], layer.delora_B[name], layer.delora_lambda[name]
        w = layer.delora_w_norm[name] if name in layer.delora_w_norm else None
        r = A.shape[0] if A.dim() == 2 else 0
        if A.dim() != 2 or not 0 < r <= _checks.TRITON_MAX_RANK or tuple(B.shape) != (layer.out_features, r) \
                or A.shape[1] != layer.in_features or lam.numel() != 1 or w is None or tuple(w.shape) != (A.shape[1],):
            return (f"adapter {name!r} has rank outside 1..{_checks.TRITON_MAX_RANK} or shapes that do not chain: "
                    f"delora_A {tuple(A.shape)}, delora_B {tuple(B.shape)}, lambda {tuple(lam.shape)}, "
                    f"w_norm {None if w is None else tuple(w.shape)}")
        return _dropout_reason(name, layer.delora_dropout[name])

    @staticmethod
    def factors(layer, name: str) -> _Factors:
        A, B = _attr(layer, "delora_A")[name], _attr(layer, "delora_B")[name]
        # DeloraLayer.forward's scaling, computed as PEFT does
        an = torch.clamp(A.norm(dim=1), min=1e-4)
        bn = torch.clamp(B.norm(dim=0), min=1e-4)
        scale = (_attr(layer, "delora_lambda")[name] / layer.r[name]) / (an * bn)
        A = (A * _attr(layer, "delora_w_norm")[name]) * scale[:, None]
        kw = _op_kwargs(layer, _attr(layer, "delora_dropout")[name], 1.0)
        return _Factors(A, B, None, kw, A.dtype)


class _OwnFactorsFamily(_Family):
    """PEFT tuners whose forward is LoRA's over factors the layer forms itself: result +
    F.linear(F.linear(dropout(x), A), B) with A [r, in], B [out, r] = layer._get_lora_matrices(name)
    — VB-LoRA (each row a top-k softmax mixture of a shared vector bank) and UniLoRA (entries of one
    shared trained vector, scaled). PEFT's own method forms them each call (its factors exactly;
    autograd takes their gradients back to the bank / vector); scaling 1. One instance per tuner:
    its adapter dict, dropout dict and the tensor whose dtype x is cast to."""

    out_in_x_dtype = True  # their forward ends in result.to(x's dtype)

    def __init__(self, kind: str, attr: str, dropout_attr: str, dtype_attr: str):
        self.kind, self.attr, self.dropout_attr, self.dtype_attr = kind, attr, dropout_attr, dtype_attr

    def reason(self, layer, name: str) -> str | None:
        r = layer.r.get(name)
        if not isinstance(r, int) or not 0 < r <= _checks.TRITON_MAX_RANK:
            return f"adapter {name!r} has rank {r} (the fused ops take 1 to {_checks.TRITON_MAX_RANK})"
        return _dropout_reason(name, getattr(layer, self.dropout_attr)[name])

    def factors(self, layer, name: str) -> _Factors:
        A, B = layer._get_lora_matrices(name)
        kw = _op_kwargs(layer, _attr(layer, self.dropout_attr)[name], 1.0)
        return _Factors(A, B, None, kw, _attr(layer, self.dtype_attr)[name].dtype)


def _module_dropout_skips(layer, name: str) -> bool:
    """LycorisLayer.forward's module dropout (LoHa, LoKr): in training, torch.rand(1) is drawn for every
    adapter, skipped or not, and the adapter sits this call out unless the draw exceeds module_dropout."""
    return layer.training and not bool(torch.rand(1) > layer.module_dropout[name])


def _rank_dropout_rows(n: int, p: float, dtype: torch.dtype, scale: bool) -> torch.Tensor:
    """PEFT's LyCORIS rank dropout over Δ's n rows, drawn from torch's CPU generator as PEFT draws it:
    1.0 where torch.rand(n) > p, in ``dtype`` (LoHa: Δ's; LoKr: float32), divided by its mean (in that
    dtype) when ``scale``. On the CPU: the caller moves it."""
    drop = (torch.rand(n) > p).to(dtype)
    if scale:
        drop /= drop.mean()
    return drop


def _as_float32(value: float) -> float:
    """``value`` rounded to the nearest float32, ties to even (what torch.tensor(value) holds), in
    plain Python arithmetic: no tensor on the host per call, and torch.compile folds it."""
    if value == 0.0 or not math.isfinite(value) or abs(value) < 2.0**-126:  # zero, inf/nan, subnormal
        return float(torch.tensor(value, dtype=torch.float32))
    mantissa, exponent = math.frexp(value)  # |mantissa| in [0.5, 1): 24 significant bits below
    rounded = math.ldexp(round(mantissa * 2**24) / 2**24, exponent)
    return rounded if abs(rounded) < 2.0**128 else math.copysign(math.inf, value)  # float32 overflows


def _call_factors(family, layer, names: list[str]) -> list[_Factors]:
    """The factors of the active adapters ``names`` for this call, in PEFT's order (LoHa draws its
    module and rank dropout per adapter, in turn), less those a module dropout skips."""
    return [f for f in (family.factors(layer, n) for n in names) if f is not None]


def _join(factors: list[_Factors]) -> tuple[_Factors, list[_Factors]]:
    """Several active adapters (PEFT sums their branches) as (the factors of one fused op call, the
    adapters left for lora_delta calls beside it). Without active dropout the branches are one
    product: A = [A_1; A_2; ...], B = [s_1 B_1 | s_2 B_2 | ...], scaling 1 (up to the largest rank
    one kernel takes). With dropout each adapter keeps its own mask, as PEFT draws one per adapter:
    the first rides in the fused op, each other one is a lora_delta. The lora_bias terms all join
    the op's bias."""
    if len(factors) == 1:
        return factors[0], []
    extras = [f.bias_extra for f in factors if f.bias_extra is not None]
    bias_extra = sum(extras[1:], extras[0]) if extras else None
    first = factors[0]
    if any(map(_drops, factors)) or sum(f.A.shape[0] for f in factors) > _checks.TRITON_MAX_RANK:
        rest = [f._replace(bias_extra=None) for f in factors[1:]]
        return first._replace(bias_extra=bias_extra), rest
    A, B = _joined(factors)
    return _Factors(A, B, bias_extra, dict(first.op_kwargs, scaling=1.0, dropout_p=0.0), first.cast_dtype), []


def _drops(f: _Factors) -> bool:
    """Whether this adapter's dropout is active in this call."""
    return f.op_kwargs["dropout_p"] > 0.0 and f.op_kwargs["training"]


def _joined(factors: list[_Factors]) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapters' branches as one pair of factors, scaling folded in: (A = [A_1; A_2; ...] [sum of
    ranks, in], B = [s_1 B_1 | s_2 B_2 | ...] [out, sum of ranks])."""
    return (torch.cat([f.A for f in factors]),
            torch.cat([f.B * f.op_kwargs["scaling"] for f in factors], dim=1))


def _plus_branches(y, x, rest: list[_Factors]):
    """y + the branches of the adapters _join left out of the fused op, each through lora_delta."""
    for f in rest:
        y = y + lora_delta(x, f.A, f.B, **f.op_kwargs)
    return y


def _mixed_batch(forward, x, names):
    """PEFT's mixed-adapter batch (inference: ``adapter_names``, one adapter name per sample of x's
    first dimension, "__base__" for none) as two products for all samples whatever the number of
    adapters: u = x [A_1; A_2; ...]^T, each sample's u kept on its adapter's columns only, then
    u [s_1 B_1 | s_2 B_2 | ...]^T (plus each sample's lora_bias term) added to the base layer's own
    output. PEFT copies each adapter's sub-batch out and its result back (about five launches per
    adapter). None where PEFT's forward must run it: another layer family, an adapter that cannot be
    fused, or dropout active."""
    layer = forward.layer
    if forward.family is not _LoRAFamily or layer.disable_adapters:
        return None
    layer._check_forward_args(x, adapter_names=names)  # PEFT's own errors: lengths, merged, DoRA
    lora_A = _attr(layer, "lora_A")
    used = [n for n in dict.fromkeys(names) if n != "__base__" and n in lora_A]
    if _zero3_partitioned(forward._base_layer()) is not None or any(
            _LoRAFamily.reason(layer, n) is not None or _LoRAFamily.magnitude(layer, n) is not None for n in used):
        return None
    factors = [_LoRAFamily.factors(layer, n) for n in used]
    if any(map(_drops, factors)):
        return None
    base_out = layer.base_layer(x)
    if not used:
        return base_out
    owner = [used.index(n) if n in used else -1 for n in names]  # each sample's adapter (-1: none)
    column_owner = [i for i, f in enumerate(factors) for _ in range(f.A.shape[0])]
    # [samples, sum of ranks]: 1 on the sample's adapter's columns; built on the host (one copy, no sync)
    keep = torch.tensor([[float(o == c) for c in column_owner] for o in owner], device=x.device)
    A, B = _joined(factors)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)  # broadcast over each sample's tokens
    u = torch.nn.functional.linear(x.to(A.dtype), A) * keep.to(A.dtype).view(shape)
    branch = torch.nn.functional.linear(u, B)
    extras = [f.bias_extra for f in factors]
    if any(e is not None for e in extras):  # lora_bias: each sample gets its adapter's
        stack = torch.stack([e if e is not None else torch.zeros_like(B[:, 0]) for e in extras]).to(branch.dtype)
        onehot = torch.tensor([[float(o == a) for a in range(len(used))] for o in owner], device=x.device)
        branch = branch + (onehot.to(branch.dtype) @ stack).view(shape)
    return base_out + branch.to(base_out.dtype)


def _mixed_names(args, kwargs):
    """The adapter_names of a mixed-adapter batch call (PEFT injects them as the only keyword), or None."""
    if args or len(kwargs) != 1:
        return None
    return kwargs.get("adapter_names")


def _zero3_partitioned(base) -> str | None:
    """DeepSpeed ZeRO-3 marks the parameters it partitions (``ds_id``) and gathers each module's own
    ones in that module's forward hooks: the fused ops, which read the base (layer ``base``) and
    adapter weights directly, would find them empty."""
    weight = base.__dict__["_parameters"].get("weight")
    if weight is None:
        weight = getattr(base, "weight", None)
    if getattr(weight, "ds_id", None) is not None:
        return "DeepSpeed ZeRO-3 partitions its parameters (each module's forward hooks gather its own)"
    return None


def _hooked(module) -> str | None:
    if has_module_hooks(module):
        return "hooks are registered on its base layer (they run in that layer's forward only)"
    return None


def _nested(layer, base) -> str | None:
    """Why a forward that computes the innermost base (``base``, what get_base_layer() finds) itself
    cannot serve this layer: its base_layer is another PEFT layer in between (PEFT's mixed models,
    PeftMixedModel, nest one adapter type's layer in another's), whose output this layer must add to
    — computing the innermost base would drop that layer's adapter. None if not nested."""
    outer = layer.__dict__["_modules"].get("base_layer")
    if outer is not None and outer is not base:
        return (f"its base layer is another PEFT layer ({type(outer).__module__}.{type(outer).__name__}: a mixed "
                "model's nesting), whose output it adds to")
    return None


def _whole_reason(family, layer, name: str, base) -> str | None:
    """Why adapter ``name`` of this layer cannot be fused with its whole-layer base now: the family's
    adapter reason, another PEFT layer nested in between, hooks put on the base since patching, and a
    bnb 4-bit base that bnb itself repacked since patching."""
    why = family.reason(layer, name) or _nested(layer, base) or _hooked(base)
    if why is None and is_bnb_linear4bit(base) and bnb_cpu_repacked(base.weight):
        why = "bitsandbytes repacked its 4-bit weight for its own CPU kernel (an eval forward without grad)"
    return why


class _FamilyForward(_PatchedForward):
    """A patched layer of a LoRA-like family (``family``: a _Family)."""

    def __init__(self, layer, original, family):
        super().__init__(layer, original)
        self.family, self.kind = family, family.kind

    def _active(self, x, args, kwargs):
        """_adapter_to_fuse over the family's adapters, several active ones allowed; a mixed-adapter
        batch is computed here already (its output comes back as the second item)."""
        mixed = _mixed_names(args, kwargs)
        if mixed is not None and (out := _mixed_batch(self, x, mixed)) is not None:
            return None, out, None
        return self._adapter_to_fuse(_attr(self.layer, self.family.attr), self.reason, x, args, kwargs, several=True)


class _FusedForward(_FamilyForward):
    """A patched PEFT layer over a whole-layer base: one lora_linear / dora_linear / qlora_linear call
    for the base product and the adapters of ``family``."""

    def __init__(self, layer, original, family):
        super().__init__(layer, original, family)
        self.row_sq = TensorCache(1)  # ‖W_i‖² of the frozen base, once per weight tensor and version (DoRA)

    def reason(self, layer, name: str, base) -> str | None:  # a method, not a closure: torch.save pickles it
        return _whole_reason(self.family, layer, name, base)

    def __call__(self, x, *args, **kwargs):
        names, out, base = self._active(x, args, kwargs)
        if names is None:
            return out
        layer, family = self.layer, self.family
        magnitude = family.magnitude(layer, names[0])
        if len(names) > 1 and any(family.magnitude(layer, n) is not None for n in names):
            return self.original(x, *args, **kwargs)  # several active adapters, DoRA among them: PEFT's
        fmt = bnb_linear4bit_class(base)
        xo = x
        if fmt is None:
            stored = _attr(base, "weight")
            x, weight, bias = self._in_op_dtype(x, stored.t() if is_conv1d(base) else stored, _attr(base, "bias"))
            if x.dtype != weight.dtype:
                return self._dtype_mismatch(x, stored, args, kwargs)
        # after every check that hands the call to PEFT's forward: LoHa's factors draw its dropouts
        factors = _call_factors(family, layer, names)
        if not factors:  # every active adapter skipped for this call (LoHa's module dropout)
            return family.output(layer.base_layer(xo), xo)
        f, rest = _join(factors)
        if fmt is not None:  # bnb computes in its compute_dtype and returns x's dtype
            dtype = base.compute_dtype or x.dtype
            bias = _add_bias(base.bias.to(dtype) if base.bias is not None else None, f.bias_extra, dtype)
            q = fmt.from_bnb(base.weight)
            xq = x.to(dtype)
            if magnitude is not None:  # DoRA over the 4-bit base (QDoRA)
                sq = cached_weight_row_sq(self.row_sq, base.weight, q, x)
                y = dora_linear(xq, q, f.A, f.B, magnitude, bias, weight_row_sq=sq, **f.op_kwargs)
            else:
                y = _plus_branches(qlora_linear(xq, q, f.A, f.B, bias, **f.op_kwargs), xq, rest)
            return y.to(x.dtype)
        bias = _add_bias(bias, f.bias_extra, x.dtype)
        if magnitude is not None:
            row_sq = cached_weight_row_sq(self.row_sq, stored, weight, x)
            return dora_linear(x, weight, f.A, f.B, magnitude, bias, weight_row_sq=row_sq, **f.op_kwargs)
        return family.output(_plus_branches(lora_linear(x, weight, f.A, f.B, bias, **f.op_kwargs), x, rest), xo)


def _add_bias(bias, extra, dtype):
    """The op's bias: the base's (or None) plus PEFT's lora_bias term (or None), in ``dtype``."""
    if extra is None:
        return bias
    extra = extra.to(dtype)
    return extra if bias is None else bias + extra


def _shira_reason(layer, name: str | None = None, base=None) -> str | None:
    """Why this PEFT SHiRA layer (or its adapter ``name``) cannot run sparse_delta_linear (None if
    it can). Checked at patch time and at every call (``base``: the layer's base, if looked up)."""
    base = base if base is not None else layer.get_base_layer()
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not nn.Linear"
    replaced = "forward" in vars(base)
    why = _nested(layer, base) or _hooked(base) or (
        "its base layer's forward is replaced on the instance (accelerate's hooks)" if replaced else None)
    if why is not None:
        return why
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (the base weight is stored [in, out])"
    if base.weight.requires_grad:  # sparse_delta_linear trains the k values only
        return "the base weight requires grad"
    for n in ([name] if name is not None else list(layer.shira_weight)):
        indices = layer.shira_indices.get(n)
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != 2 \
                or indices.shape[1] != layer.shira_weight[n].numel():
            return f"adapter {n!r} has no [2, k] shira_indices matching its {layer.shira_weight[n].numel()} values"
    return None


class _ShiraForward(_PatchedForward):
    """A patched SHiRA Linear: y = x (W + s·Δ)ᵀ + b through sparse_delta_linear, Δ = shira_weight at
    shira_indices (row, col). The base weight holds W + s·Δ at the k positions only for the
    duration of each product (sparse_delta_linear's merged=False: O(k), restored bit-exactly), and
    the values' gradient is taken at the k positions only."""

    kind = "SHiRA"

    def __init__(self, layer, original):
        super().__init__(layer, original)
        self.flat = TensorCache(4)  # shira_indices -> index_from_rows_cols's (index, order, repeats)

    def _flat_index(self, indices, in_features: int, device):
        """layout.index_from_rows_cols of PEFT's [2, k] shira_indices on ``device``, once per indices
        tensor: (sorted flat int32 index, the values' sorting permutation or None — torch.where's
        row-major order needs none —, whether a position repeats)."""
        key = (in_features, str(device))
        hit = self.flat.get(indices, key)
        return hit if hit is not None else self.flat.put(
            indices, layout.index_from_rows_cols(indices.to(device), in_features), key)

    def __call__(self, x, *args, **kwargs):
        name, out, base = self._adapter_to_fuse(self.layer.shira_weight, _shira_reason, x, args, kwargs)
        if name is None:
            return out
        layer = self.layer
        x, weight, bias = self._in_op_dtype(x, base.weight, base.bias)
        if x.dtype != weight.dtype:
            return self._dtype_mismatch(x, base.weight, args, kwargs)
        index, order, repeats = self._flat_index(layer.shira_indices[name], base.in_features, weight.device)
        if repeats:  # PEFT's sparse tensor adds repeated positions up
            return self._unfused(name, f"adapter {name!r} lists a position twice in shira_indices", x, args, kwargs)
        values = layer.shira_weight[name]
        if order is not None:
            values = values[order]
        scaling = layer.scaling[name]
        if scaling != 1.0:
            values = values * scaling
        return sparse_delta_linear(x, weight, values, index, bias)


def _tokens_reason(layer, name: str | None = None, base=None) -> str | None:
    """Why this PEFT TrainableTokensLayer (or its adapter ``name``) cannot run the sparse ops (None if
    it can). Checked at patch time and at every call (``base``: the layer's base, if looked up)."""
    base = base if base is not None else layer.get_base_layer()
    if not isinstance(base, (nn.Embedding, nn.Linear)):  # PEFT's own forward refuses other types
        return f"base layer is {type(base).__name__}, neither nn.Embedding nor nn.Linear"
    if (why := _nested(layer, base)) is not None:
        return why
    why = unsupported_lookup(base) if isinstance(base, nn.Embedding) else (
        None if _checks.plain_tensor(base.weight) else f"its weight is a {type(base.weight).__name__} (a tensor subclass)")
    if why is not None:
        return why
    if base.weight.requires_grad:
        return "the base weight requires grad"
    for n in ([name] if name is not None else list(layer.trainable_tokens_delta)):
        indices = layer.token_indices.get(n, [])
        rows = base.weight.shape[0]
        if len(set(indices)) != len(indices) or not all(0 <= int(i) < rows for i in indices):
            return f"adapter {n!r} lists a token twice or outside [0, {rows})"
        if tuple(layer.trainable_tokens_delta[n].shape) != (len(indices), base.weight.shape[1]):
            return f"adapter {n!r}'s trainable_tokens_delta does not hold one row per token"
    return None


class _TokensForward(_PatchedForward):
    """A patched PEFT TrainableTokensLayer (LoraConfig's trainable_token_indices: the rows of chosen
    tokens trained, e.g. new special tokens). PEFT's forward copies the whole [V, d] table with those
    rows replaced (index_copy) every call, and autograd forms the dense [V, d] gradient of that copy
    to keep n rows of it — for a head tied to the embedding, a second full GEMM dY^T X as well.
    Here the rows' replacement is a delta on W0 (values = row - W0[row], added in fp32, fp64 for an
    fp32 table, so the row read back is PEFT's) through sparse_delta_embedding, or, on a tied head,
    sparse_delta_linear with (1, d) blocks: the gradient is taken at the n rows only."""

    kind = "trainable-tokens"

    def __init__(self, layer, original):
        super().__init__(layer, original)
        self.rows: dict = {}  # (token indices, table shape, device) -> _rows' result

    def _rows(self, indices, weight):
        """(the sorted rows, their order in PEFT's list, the rows' flat positions in the table)."""
        key = (tuple(indices), tuple(weight.shape), str(weight.device))
        if key not in self.rows:
            rows, order = torch.sort(torch.tensor([int(i) for i in indices], dtype=torch.int64, device=weight.device))
            self.rows[key] = (rows, order, layout.row_positions(rows, weight.shape[1]))
        return self.rows[key]

    def __call__(self, x, *args, **kwargs):
        name, out, base = self._adapter_to_fuse(self.layer.trainable_tokens_delta, _tokens_reason, x, args, kwargs)
        if name is None:
            return out
        layer = self.layer
        weight = base.weight
        rows, order, index = self._rows(layer.token_indices[name], weight)
        acc = torch.float64 if weight.dtype in (torch.float32, torch.float64) else torch.float32
        new_rows = layer.trainable_tokens_delta[name].to(weight)[order]  # PEFT's cast to the table's dtype
        values = new_rows.to(acc) - weight.detach()[rows].to(acc)
        dim = weight.shape[1]
        if isinstance(base, nn.Embedding):
            y = sparse_delta_embedding(x, weight, values.reshape(-1), index, padding_idx=base.padding_idx)
            scale = layer._get_embed_scale() if hasattr(layer, "_get_embed_scale") else None
            return y if scale is None else y * scale.to(y.dtype)
        x, weight, _ = self._in_op_dtype(x, weight, None)  # the tied head: F.linear(x, W) without bias
        if x.dtype != weight.dtype:
            return self._dtype_mismatch(x, base.weight, args, kwargs)
        return sparse_delta_linear(x, weight, values.reshape(-1, 1, dim), rows.to(torch.int32), None,
                                   shape_or_block=(1, dim))


def _branch_reason(family, layer, name: str | None = None, base=None) -> str | None:
    """Why the adapter branch of this layer (or of its adapter ``name``) cannot be fused beside a
    base that runs its own forward (None if it can)."""
    for n in ([name] if name is not None else list(_attr(layer, family.attr))):
        why = family.reason(layer, n)
        if why is None and family.magnitude(layer, n) is not None:
            why = (f"adapter {n!r} is DoRA, which needs the base weight; the "
                   f"{type(layer.get_base_layer()).__name__} base computes its own product")
        if why is not None:
            return why
    return None


class _BranchForward(_FamilyForward):
    """A patched PEFT layer over a base computed by its own forward (bitsandbytes' Linear8bitLt with
    its LLM.int8 product, or a layer type peft_kernels does not know): result = base(x) + the adapter
    branch through lora_delta, with PEFT's casts — x to the adapter's dtype, then the sum back to
    the base output's dtype (PEFT's LoRA bnb 8-bit class: only outside autocast, the branch cast
    before the sum)."""

    def __init__(self, layer, original, family, bnb_8bit: bool):
        super().__init__(layer, original, family)
        self.bnb_8bit = bnb_8bit

    def reason(self, layer, name: str, base) -> str | None:
        return _branch_reason(self.family, layer, name, base)

    def __call__(self, x, *args, **kwargs):
        names, out, _ = self._active(x, args, kwargs)
        if names is None:
            return out
        layer = self.layer
        result = layer.base_layer(x)
        factors = _call_factors(self.family, layer, names)
        if not factors:  # every active adapter skipped for this call (LoHa's module dropout)
            return self.family.output(result, x)
        f, rest = _join(factors)
        convert = not (self.bnb_8bit and torch.is_autocast_enabled())  # peft.tuners.lora.bnb.Linear8bitLt's own test
        branch = None
        for g in [f] + rest:
            term = lora_delta(layer._cast_input_dtype(x, g.cast_dtype) if convert else x, g.A, g.B, **g.op_kwargs)
            branch = term if branch is None else branch + term
        if f.bias_extra is not None:  # lora_B's bias, scaled with the branch
            branch = branch + f.bias_extra.to(branch.dtype)
        if self.bnb_8bit:  # peft.tuners.lora.bnb.Linear8bitLt.forward
            return result + (branch.to(result.dtype) if convert else branch)
        return self.family.output((result + branch).to(result.dtype), x)  # lora.layer.Linear, SVDLinear, VeRA, LoHa


_LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _lokr_stored(layer, name: str) -> dict:
    """{part: Parameter} of the LoKr matrices adapter ``name`` stores (``_LOKR_PARTS``), read from the
    ParameterDicts' registries: this runs at every call, where PEFT's _available_adapters builds a set
    of seven dicts' keys and each ParameterDict read goes through nn.Module.__getattr__."""
    found = {}
    for part in _LOKR_PARTS:
        p = _attr(layer, part).__dict__["_parameters"].get(name)
        if p is not None:
            found[part] = p
    return found


class _LoKrAdapters:
    """Membership in a LoKr layer's adapters (what PEFT's _available_adapters holds), for
    _adapter_to_fuse's ``name in adapters``."""

    __slots__ = ("layer",)

    def __init__(self, layer):
        self.layer = layer

    def __contains__(self, name) -> bool:
        return any(name in _attr(self.layer, part).__dict__["_parameters"] for part in _LOKR_PARTS)


def _lokr_parts(stored: dict) -> tuple[list, list]:
    """(W1's matrices, W2's) among one adapter's stored ones (_lokr_stored): [lokr_w1] or [lokr_w1_a,
    lokr_w1_b], likewise for W2; None in place of one that is missing."""
    def pick(whole, a, b):
        return [stored[whole]] if whole in stored else [stored.get(a), stored.get(b)]

    return pick("lokr_w1", "lokr_w1_a", "lokr_w1_b"), pick("lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _lokr_factors(stored: dict):
    """(W1 [a, c], W2 parts) of one adapter's stored matrices (_lokr_stored): W1 = lokr_w1, or lokr_w1_a
    @ lokr_w1_b formed as PEFT forms it (a tiny [a, c]); W2 parts = (lokr_w2 [b, d],) or (lokr_w2_a
    [b, r], lokr_w2_b [r, d]), kept apart (W2's rank r is what makes the products cheap). Δ = s ·
    kron(W1, W2), out = a·b, in = c·d."""
    w1, w2 = _lokr_parts(stored)
    return (w1[0] if len(w1) == 1 else w1[0] @ w1[1]), tuple(w2)


def _lokr_reason(layer, name: str | None = None, base=None) -> str | None:
    """Why this PEFT LoKr Linear (or its adapter ``name``) cannot run as Kronecker-structured products
    (None if it can). Checked at patch time and at every call (``base``: the layer's base, if looked up)."""
    base = base if base is not None else layer.get_base_layer()
    out, inp = layer.out_features, layer.in_features
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (out, inp):
        # PEFT's own forward reshapes Δ to the base weight's shape (a packed 4-bit weight fails there)
        return f"its base's weight is not a [{out}, {inp}] tensor (PEFT reshapes Δ to it)"
    for n in ([name] if name is not None else sorted(layer._available_adapters)):
        stored = _lokr_stored(layer, n)
        if "lokr_t2" in stored:
            return f"adapter {n!r} uses LoKr's CP decomposition (lokr_t2: a convolution's)"
        w1, w2 = _lokr_parts(stored)
        parts = w1 + w2
        if any(p is None for p in parts):
            return f"adapter {n!r} lacks one of lokr_w1(_a/_b) / lokr_w2(_a/_b)"
        if any(p.dim() != 2 for p in parts) or any(p.dtype != parts[0].dtype for p in parts) \
                or (len(w1) == 2 and w1[0].shape[1] != w1[1].shape[0]) \
                or (len(w2) == 2 and w2[0].shape[1] != w2[1].shape[0]) \
                or w1[0].shape[0] * w2[0].shape[0] != out or w1[-1].shape[1] * w2[-1].shape[1] != inp:
            return (f"adapter {n!r}'s LoKr matrices differ in dtype or do not make a Kronecker product of the "
                    f"[{out}, {inp}] weight: " + " / ".join(f"{tuple(p.shape)} {p.dtype}" for p in parts))
    return None


def _kron_products(x3, w1, w2, w2_first: bool | None = None):
    """W1 X W2ᵀ for every grid X of x3 [N, c, d] -> [N, a, b]; W1 [a, c], w2 = (W2 [b, d],) or
    (W2a [b, r], W2b [r, d]). With W2 of rank r: ((X W2bᵀ) then W1, then W2aᵀ), r·(c·d + a·c + a·b)
    multiply-adds per token; with a full W2, X W2ᵀ first or W1 X first (``w2_first``), by default
    whichever costs fewer."""
    def w1_times(z):  # W1 Z over z's middle axis: one GEMM over all tokens (a 2-D @ 3-D matmul is a bmm)
        return torch.einsum("ac,ncj->naj", w1, z)

    if len(w2) == 2:
        w2a, w2b = w2
        return w1_times(x3 @ w2b.t()) @ w2a.t()
    (w2,) = w2
    (a, c), (b, d) = w1.shape, w2.shape
    if w2_first if w2_first is not None else c * b * (d + a) <= a * d * (c + b):
        return w1_times(x3 @ w2.t())
    return w1_times(x3) @ w2.t()


def _kron_delta(layer, name: str, x):
    """Adapter ``name``'s LoKr branch x Δᵀ, Δ = s · kron(W1, W2) [out, in] (rows masked by PEFT's rank
    dropout in training), without forming Δ: with in = c·d, each token's x is a [c, d] grid X and
    x kron(W1, W2)ᵀ is W1 X W2ᵀ read row-major, out = a·b. x cast as PEFT casts it (to the adapter's
    dtype); the result in that dtype."""
    w1, w2 = _lokr_factors(_lokr_stored(layer, name))
    x = layer._cast_input_dtype(x, w1.dtype)
    c, d = w1.shape[1], w2[-1].shape[1]
    y = _kron_products(x.reshape(-1, c, d), w1 * layer.scaling[name], w2)  # s on the tiny W1, as PEFT's mul_(s)
    y = y.reshape(*x.shape[:-1], w1.shape[0] * w2[0].shape[0])  # out = a·b (explicit: x may have no tokens)
    p = layer.rank_dropout[name]
    if layer.training and p:  # LoKrLayer.get_delta_weight's row mask: float32, normalized if rank_dropout_scale
        drop = _rank_dropout_rows(y.shape[-1], p, torch.float32, scale=layer.rank_dropout_scale[name])
        y = y * drop.to(device=y.device, dtype=y.dtype)
    return y


class _LoKrForward(_PatchedForward):
    """A patched PEFT LoKr Linear: y = base(x) + Σ_adapters x Δᵀ, Δ = s · kron(W1, W2). PEFT forms the
    dense [out, in] Δ every call and multiplies by it — a full extra GEMM forward, two backward (dX
    through Δ, and dΔ = dYᵀX) and Δ's gradient back through the Kronecker product, all [out, in]-sized.
    Here the base runs its own forward and each adapter's branch is W1 X W2ᵀ per token (_kron_delta:
    plain torch products, batched GEMMs of the factors' sizes, no [out, in] tensor; with LoKr's
    default r = 8 on a 4096-square layer, 24·8·4096 multiply-adds per token where PEFT does 4096²).
    Module dropout (an adapter skipped for the call) and rank dropout draw from torch's CPU generator
    in PEFT's order, so a seeded step repeats PEFT's."""

    kind = "LoKr"

    def reason(self, layer, name: str, base) -> str | None:  # a method, not a closure: torch.save pickles it
        return _lokr_reason(layer, name, base)  # the base runs its own forward: hooks on it run

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        names, out, _ = self._adapter_to_fuse(_LoKrAdapters(layer), self.reason, x, args, kwargs, several=True)
        if names is None:
            return out
        result = layer.base_layer(x)
        for name in names:  # LycorisLayer.forward's loop
            if _module_dropout_skips(layer, name):
                continue
            result = result + _kron_delta(layer, name, x)
        return result.to(x.dtype)


def _patched(module) -> _PatchedForward | None:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, _PatchedForward) else None


def _patch_layer(report: PatchReport, name: str, module, family, bnb_8bit: bool = False) -> None:
    """Patch one PEFT layer of ``family`` (whole-layer base: _FusedForward; any other: _BranchForward),
    or record why it is left alone."""
    base = module.get_base_layer()
    nested = _nested(module, base)  # another PEFT layer in between: its output is this layer's base output
    whole = _whole_layer_base(base) and not bnb_8bit and nested is None
    if _patched(module) is None:
        reason = _static_reason(module, family) if whole else _branch_reason(family, module)
        if reason is not None:
            report.skipped[name] = reason
            return
        module.forward = (_FusedForward(module, module.forward, family) if whole
                          else _BranchForward(module, module.forward, family, bnb_8bit))
    report.patched.append(name)
    if isinstance(_patched(module), _BranchForward):
        report.branch_only[name] = nested or type(base).__name__ + _why_branch(base)


def _patch_own_forward(report: PatchReport, name: str, module, reason, forward_class) -> None:
    """Patch one PEFT layer with a forward of its own kind (``forward_class``: _LoKrForward,
    _TokensForward), or record why it is left alone (``reason(module)``)."""
    if _patched(module) is None:
        if (why := reason(module)) is not None:
            report.skipped[name] = why
            return
        module.forward = forward_class(module, module.forward)
    report.patched.append(name)


def _patch_experts_chain(report: PatchReport, name: str, module, chained: dict) -> None:
    """Patch the outermost ParamWrapper of a chain (PEFT's LoRA on an MoE experts module's 3-D weights,
    target_parameters) with peft_experts.ExpertsForward, or record why not; its inner wrappers,
    met later in named_modules, share the outcome (``chained``: id(inner wrapper) -> its reason)."""
    from .peft_experts import ExpertsForward, chain, experts_reason

    if id(module) in chained:
        why = chained.pop(id(module))
    else:
        why = None
        if _patched(module) is None and (why := experts_reason(module)) is None:
            module.forward = ExpertsForward(module, module.forward)
        for inner in chain(module)[0][1:]:
            chained[id(inner)] = why
    if why is None:
        report.patched.append(name)
    else:
        report.skipped[name] = why


def _optional_class(module_name: str, class_name: str):
    """A PEFT class that older or leaner PEFT installs may lack (bnb-dependent ones), or None."""
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None


def patch_peft_model(model: nn.Module) -> PatchReport:
    """Route the HF PEFT layers of ``model`` (a PeftModel or any module containing PEFT layers)
    through peft_kernels' fused ops, in place: every LoRA Linear (DoRA, lora_bias, bnb 4-/8-bit
    bases included), AdaLoRA SVDLinear and the VeRA, LoHa (r <= 16), DeLoRA, VB-LoRA and UniLoRA
    Linear layers through lora_linear (their adapters are LoRA factors formed each call), every
    SHiRA Linear through sparse_delta_linear, every trainable-tokens layer
    (trainable_token_indices) through sparse_delta_embedding / sparse_delta_linear, and every LoKr
    Linear's Kronecker product as products of its factors beside the base's own forward (no dense
    [out, in] Δ), and every chain of ParamWrappers (LoRA on target_parameters) around a transformers
    MoE experts module as grouped products without PEFT's [E, out, in] W + B A stacks (the chain's
    inner wrappers are reported with it). Any other PEFT tuner layer is left to PEFT and listed, with why, in the returned
    PatchReport."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    # PEFT's own classes for LoRA over a bnb Linear4bit / Linear8bitLt (present when bnb is usable);
    # over the 8-bit base the LoRA branch alone is fused
    PeftLoraLinear8bit = _optional_class("peft.tuners.lora.bnb", "Linear8bitLt")
    lora_linear_types = tuple(t for t in (PeftLoraLinear, _optional_class("peft.tuners.lora.bnb", "Linear4bit"),
                                          PeftLoraLinear8bit) if t is not None)
    # AdaLoRA over a model loaded in 4 / 8 bits (transformers' is_loaded_in_*bit): PEFT's bnb classes,
    # the 4-bit one through qlora_linear over bnb's bytes, beside the 8-bit one's LLM.int8 product the branch
    AdaLoraLinear8bit = _optional_class("peft.tuners.adalora.bnb", "SVDLinear8bitLt")
    # PEFT's classes over a bnb Linear8bitLt: PEFT's 8-bit casts around the fused branch (_BranchForward)
    eight_bit = tuple(t for t in (PeftLoraLinear8bit, AdaLoraLinear8bit) if t is not None)
    # exact classes: their bnb / conv subclasses compute differently and stay PEFT's
    factored = {t: family for t, family in ((_optional_class("peft.tuners.adalora.layer", "SVDLinear"), _AdaLoRAFamily),
                                            (_optional_class("peft.tuners.adalora.bnb", "SVDLinear4bit"), _AdaLoRAFamily),
                                            (AdaLoraLinear8bit, _AdaLoRAFamily),
                                            (_optional_class("peft.tuners.vera.layer", "Linear"), _VeRAFamily),
                                            (_optional_class("peft.tuners.loha.layer", "Linear"), _LoHaFamily),
                                            (_optional_class("peft.tuners.delora.layer", "DeloraLinear"), _DeLoRAFamily),
                                            (_optional_class("peft.tuners.vblora.layer", "Linear"),
                                             _OwnFactorsFamily("VB-LoRA", "vblora_logits_A", "vblora_dropout",
                                                               "vblora_vector_bank")),
                                            (_optional_class("peft.tuners.unilora.layer", "Linear"),
                                             _OwnFactorsFamily("UniLoRA", "unilora_indices_A", "unilora_dropout",
                                                               "unilora_theta_d")))
                if t is not None}
    PeftShiraLinear = _optional_class("peft.tuners.shira.layer", "Linear")  # peft >= 0.17
    ShiraLayer = _optional_class("peft.tuners.shira.layer", "ShiraLayer")
    # LoraConfig's trainable_token_indices (peft >= 0.15)
    TrainableTokensLayer = _optional_class("peft.tuners.trainable_tokens.layer", "TrainableTokensLayer")
    LoKrLinear = _optional_class("peft.tuners.lokr.layer", "Linear")  # exact class: LoKr over a conv stays PEFT's
    ParamWrapper = _optional_class("peft.tuners.lora.layer", "ParamWrapper")  # target_parameters, peft >= 0.17

    report = PatchReport()
    chained: dict = {}  # ParamWrappers inside a chain met already: the chain's reason (None: patched)
    for name, module in model.named_modules():
        if ParamWrapper is not None and isinstance(module, ParamWrapper):
            _patch_experts_chain(report, name, module, chained)
            continue
        if LoKrLinear is not None and type(module) is LoKrLinear:
            _patch_own_forward(report, name, module, _lokr_reason, _LoKrForward)
            continue
        if TrainableTokensLayer is not None and isinstance(module, TrainableTokensLayer):
            _patch_own_forward(report, name, module, _tokens_reason, _TokensForward)
            continue
        if ShiraLayer is not None and isinstance(module, ShiraLayer):
            if _patched(module) is not None:
                report.patched.append(name)
            elif type(module) is not PeftShiraLinear:
                report.skipped[name] = f"{type(module).__module__}.{type(module).__name__} is not a SHiRA Linear"
            elif (reason := _shira_reason(module)) is not None:
                report.skipped[name] = reason
            else:
                module.forward = _ShiraForward(module, module.forward)
                report.patched.append(name)
            continue
        if type(module) in factored or isinstance(module, lora_linear_types):
            _patch_layer(report, name, module, factored.get(type(module), _LoRAFamily),
                         bnb_8bit=isinstance(module, eight_bit))
        elif isinstance(module, LoraLayer):
            report.skipped[name] = f"{type(module).__module__}.{type(module).__name__} is not a LoRA Linear"
        elif isinstance(module, BaseTunerLayer):  # IA3, OFT, LoHa / LoKr over a conv, ...: PEFT's forward as it is
            report.skipped[name] = (f"{type(module).__module__}.{type(module).__name__}: peft_kernels has no "
                                    "fused op for this PEFT layer type")
    return report


def _why_branch(base) -> str:
    """Why a base of a type the fused ops compute runs its own forward, for the report ("" for
    other types: the type name says it)."""
    if isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward:
        return f": {needs_branch(base)}"
    if is_conv1d(base) or bnb_linear4bit_class(base) is not None:
        why = _hooked(base) or ("its forward is replaced on the instance" if "forward" in vars(base) else None)
        return f": {why or f'its weight is a {type(base.weight).__name__}'}"
    return ""


def unpatch_peft_model(model: nn.Module) -> list[str]:
    """Undo ``patch_peft_model`` (a forward that was an instance attribute before, such as an
    accelerate hook, is put back); returns the names restored."""
    restored = []
    for name, module in model.named_modules():
        fused = _patched(module)
        if fused is not None:
            if fused.original_was_instance_attribute:
                module.forward = fused.original
            else:
                del module.forward
            restored.append(name)
    return restored


__all__ = ["COMPUTED_LAYERS", "PatchReport", "patch_peft_model", "unpatch_peft_model"]
