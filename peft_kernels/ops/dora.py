"""dora_linear: weight-decomposed LoRA with HF PEFT's semantics.

    mn = magnitude / ‖W + s·B·A‖_row            the norm detached (DoRA §4.3, as PEFT does)
    no dropout (p = 0 or eval):  y = mn ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + bias
    dropout:   y = x Wᵀ + bias + (mn − 1) ⊙ (x_d Wᵀ) + mn ⊙ s·(x_d Aᵀ Bᵀ)    x_d = dropout(x)
The dropout form is PEFT's exact formula: the dropped x goes through the base weight too.

Path over a dense base: ``dora_linear`` (validates, resolves the backend, computes mn) ->
``_DoRAFunction`` -> custom ops ``peft_kernels::dora_fwd`` / ``dora_bwd`` (schemas in _ops.py) ->
the backend module's ``dora_forward`` / ``dora_backward`` (reference/dora.py: formulas; triton/dora.py:
the LoRA kernels plus three DoRA kernels). The dropout mask comes from the seed and is regenerated
in backward; saved are x, u [M, r] and one [M, N] tensor for the magnitude's gradient.

The row norm never builds the out×in matrix W + s·B·A:
    ‖W_i + s(BA)_i‖² = ‖W_i‖² + 2s·Σ_j (W Aᵀ)_ij B_ij + s²·Σ_j (B (A Aᵀ))_ij B_ij
needs only W·Aᵀ [out, r] and A·Aᵀ [r, r] (arXiv 2603.22276 / PEFT PR #3387).

Over a quantized base (``weight`` an NF4Weight/FP4Weight/Int8Weight/Int4Weight, QDoRA): the same
op structure with the quantized base products — custom ops ``qdora_fwd`` / ``qdora_bwd`` (NF4/FP4:
the 4-bit matmul) and ``intq_dora_fwd`` / ``intq_dora_bwd`` (INT8/INT4: decoded windows); W·Aᵀ for the
norm is quant_linear(A, W)ᵀ (M = r rows), and ‖W_i‖², constant for a frozen W, is computed once by
row windows (``weight_row_sq``, cached by the QDoRA modules).
"""
from __future__ import annotations

import torch

from ..quant.bnb4bit import Bnb4bitWeight
from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Weight
from .. import _ops  # noqa: F401  (defines the schemas)
from .. import backends
from ..reference.lora import accumulation_dtype, dropped
from ..tensor_cache import TensorCache
from . import _checks
from .lora import _validate
from .quant_linear import check_qweight, join_parts, quant_linear, route

OP = "dora_linear"
backends.register(OP, "torch", "peft_kernels.reference.dora")
backends.register(OP, "triton", "peft_kernels.triton.dora")
OP_Q, OP_QINT = "qdora_linear", "qdora_linear_int"  # over NF4/FP4 and over INT8/INT4 bases
backends.register(OP_Q, "torch", "peft_kernels.reference.quant")
backends.register(OP_Q, "triton", "peft_kernels.triton.quant_matmul")
backends.register(OP_QINT, "torch", "peft_kernels.reference.intq")
backends.register(OP_QINT, "triton", "peft_kernels.triton.intq_lora")
ROW_WINDOW = 256  # rows of a quantized weight decoded at a time for ‖W_i‖²
QUANTIZED = (Bnb4bitWeight, Int8Weight, Int4Weight)


def weight_row_sq(weight, acc: torch.dtype = torch.float32) -> torch.Tensor:
    """‖W_i‖² per output row in ``acc``, for a dense weight or a quantized one (decoded ROW_WINDOW
    rows at a time, the format's exact values: never the whole full-precision weight)."""
    with torch.no_grad():
        if not isinstance(weight, QUANTIZED):
            return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()
        out_f = weight.shape[0]
        return torch.cat([torch.linalg.vector_norm(weight.dequantize_rows(r0, min(ROW_WINDOW, out_f - r0), acc),
                                                   dim=1, dtype=acc).square()
                          for r0 in range(0, out_f, ROW_WINDOW)])


def cached_weight_row_sq(cache: TensorCache, key: torch.Tensor, weight, x: torch.Tensor) -> torch.Tensor | None:
    """‖W_i‖² [out] of a frozen ``weight`` — dense (``key``, or a view of it such as a Conv1D
    weight's transpose) or quantized (the format object over ``key``'s bytes) — exactly as
    dora_linear computes it for ``x`` (a dense weight cast to the autocast dtype when autocast is
    on), computed once and reused while ``key`` is the same tensor at the same version: an optimizer
    step, merge or load_state_dict on it recomputes. It is a full read of W per call otherwise, for
    a value that never changes while W is frozen. None (dora_linear recomputes) inside
    torch.compile, where the graph computes it, for a weight made under inference mode (such a
    tensor has no version counter to tell a change by), and for a weight that trains: it changes
    every step anyway, and torch's fused AdamW or bitsandbytes' optimizers update it without
    bumping the version counter, which left a stale ‖W_i‖² in use."""
    if torch.compiler.is_compiling() or key.is_inference() or key.requires_grad:
        return None
    if isinstance(weight, QUANTIZED):  # the format's exact values: autocast does not recast them
        extra = (type(weight).__name__,)
    else:
        autocast = _checks.autocast_dtype(x)
        if autocast is not None:
            (weight,) = _checks.to_autocast(autocast, weight)
        extra = (weight.dtype, weight.shape, weight.stride())
    row_sq = cache.get(key, extra)
    if row_sq is None:  # in dora_weight_norm's accumulation dtype
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        row_sq = cache.put(key, weight_row_sq(weight, acc), extra)
    return row_sq


def dora_weight_norm(weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     row_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + scaling·B·A‖ per output row, [out] in fp32 (fp64 for fp64 inputs), detached, via the
    factorization above. W (dense or quantized) is read in its own dtype: only
    [out, r] and [r, r] temporaries, no out×in one. ``row_sq``: ‖W_i‖² if already known."""
    with torch.no_grad():
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w_sq = weight_row_sq(weight, acc) if row_sq is None else row_sq.to(acc)
        if isinstance(weight, QUANTIZED):
            wa = quant_linear(lora_A.to(weight.dtype), weight).T.to(acc)
        else:
            wa = (weight @ lora_A.to(weight.dtype).T).to(acc)
        a, b = lora_A.to(acc), lora_B.to(acc)
        cross = (wa * b).sum(1)
        quad = ((b @ (a @ a.T)) * b).sum(1)
        return (w_sq + 2 * scaling * cross + scaling**2 * quad).clamp_min(0).sqrt()


def _row_norm(weight, lora_A, lora_B, scaling: float, row_sq, backend: str) -> torch.Tensor:
    """dora_weight_norm, or on the triton backend (when its one-launch norm is switched on: see
    triton/dora.py NORM_KERNEL) the same value from one kernel. Under torch.compile the formula is
    traced, and Inductor fuses it."""
    if not torch.compiler.is_compiling() and backend == "triton":
        impl = backends.implementation(OP, backend)
        if impl.use_norm_kernel(weight, lora_A):
            return impl.weight_norm(weight, lora_A, lora_B, scaling, row_sq)
    return dora_weight_norm(weight, lora_A, lora_B, scaling, row_sq)


@torch.library.impl(_ops.LIB, "dora_fwd", "CompositeExplicitAutograd")
def _dora_fwd(x, weight, lora_A, lora_B, mn, bias, scaling, dropout_p, seed, backend):
    impl, seed = _checks.implementation_and_seed(OP, backend, seed)
    return impl.dora_forward(x, weight, lora_A, lora_B, mn, bias, scaling, dropout_p, seed)


@torch.library.impl(_ops.LIB, "dora_bwd", "CompositeExplicitAutograd")
def _dora_bwd(grad_y, x, weight, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx, backend):
    impl, seed = _checks.implementation_and_seed(OP, backend, seed)
    return impl.dora_backward(grad_y, x, weight, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx)


@torch.library.impl(_ops.LIB, "qdora_fwd", "CompositeExplicitAutograd")
def _qdora_fwd(x, qweight, blocksize, shape, lora_A, lora_B, mn, bias, scaling, dropout_p, seed, backend):
    impl, seed = _checks.implementation_and_seed(OP_Q, backend, seed)
    return impl.qdora_forward(x, join_parts(qweight), blocksize, tuple(shape), lora_A, lora_B, mn, bias, scaling,
                              dropout_p, seed)


@torch.library.impl(_ops.LIB, "qdora_bwd", "CompositeExplicitAutograd")
def _qdora_bwd(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx,
               backend):
    impl, seed = _checks.implementation_and_seed(OP_Q, backend, seed)
    return impl.qdora_backward(grad_y, x, join_parts(qweight), blocksize, tuple(shape), lora_A, lora_B, u, w, mn,
                               scaling, dropout_p, seed, need_dx)


@torch.library.impl(_ops.LIB, "intq_dora_fwd", "CompositeExplicitAutograd")
def _intq_dora_fwd(x, qweight, fmt, group_size, shape, lora_A, lora_B, mn, bias, scaling, dropout_p, seed,
                   backend):
    impl, seed = _checks.implementation_and_seed(OP_QINT, backend, seed)
    return impl.qdora_forward(x, qweight, fmt, group_size, tuple(shape), lora_A, lora_B, mn, bias, scaling,
                              dropout_p, seed)


@torch.library.impl(_ops.LIB, "intq_dora_bwd", "CompositeExplicitAutograd")
def _intq_dora_bwd(grad_y, x, qweight, fmt, group_size, shape, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed,
                   need_dx, backend):
    impl, seed = _checks.implementation_and_seed(OP_QINT, backend, seed)
    return impl.qdora_backward(grad_y, x, qweight, fmt, group_size, tuple(shape), lora_A, lora_B, u, w, mn,
                               scaling, dropout_p, seed, need_dx)


class _QDoRAFunction(torch.autograd.Function):
    """y, u, w = fwd(x, *meta, lora_A, lora_B, mn, bias, scaling, p, seed, backend); backward through
    bwd with the same meta (quant_linear.route: the NF4/FP4 or the INT8/INT4 ops). The quantized
    weight is frozen: no gradient for it."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, mn, bias, seed, fwd, bwd, meta, scaling, dropout_p, backend):
        y, u, w = fwd(x, *meta, lora_A, lora_B, mn, bias, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x, lora_A, lora_B, u, w, mn, seed)
        ctx.rest = (bwd, meta, scaling, dropout_p, backend)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, u, w, mn, seed = ctx.saved_tensors
        bwd, meta, scaling, dropout_p, backend = ctx.rest
        _checks.first_derivative_only(OP, backend)
        need_x, need_a, need_b, need_mn, need_bias = ctx.needs_input_grad[:5]
        dx, da, db, dmn = bwd(grad_y, x, *meta, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_x, backend)
        return (dx if need_x else None, da if need_a else None, db if need_b else None, dmn if need_mn else None,
                grad_y.sum(0) if need_bias else None) + (None,) * 7


class _DoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, mn, bias, scaling, dropout_p, seed, backend):
        y, u, w = torch.ops.peft_kernels.dora_fwd(x, weight, lora_A, lora_B, mn, bias, scaling, dropout_p, seed,
                                                  backend)
        ctx.save_for_backward(x, weight, lora_A, lora_B, u, w, mn, seed)
        ctx.hyper = (scaling, dropout_p, backend)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, u, w, mn, seed = ctx.saved_tensors
        scaling, dropout_p, backend = ctx.hyper
        _checks.first_derivative_only(OP, backend, differentiable=backend == "torch")
        need_x, need_w, need_a, need_b, need_mn, need_bias = ctx.needs_input_grad[:6]
        grad_x = grad_w = grad_a = grad_b = grad_mn = grad_bias = None
        if need_x or need_a or need_b or need_mn:
            dx, da, db, dmn = torch.ops.peft_kernels.dora_bwd(
                grad_y, x, weight, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_x, backend)
            grad_x, grad_a, grad_b = (dx if need_x else None), (da if need_a else None), (db if need_b else None)
            grad_mn = dmn if need_mn else None
        if need_w:  # a trainable base (rare): plain ops, the mask regenerated by the reference
            g = grad_y.to(mn.dtype)
            if dropout_p == 0.0:
                grad_w = (g * mn).to(x.dtype).t().mm(x)
            else:
                xd = dropped(x, dropout_p, _checks.seed_value(seed))
                grad_w = grad_y.t().mm(x).addmm_((g * (mn - 1)).to(x.dtype).t(), xd)
        if need_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_w, grad_a, grad_b, grad_mn, grad_bias, None, None, None, None


def dora_linear(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                magnitude: torch.Tensor, bias: torch.Tensor | None = None, *, scaling: float = 1.0,
                dropout_p: float = 0.0, training: bool = True, seed: int | None = None,
                backend: str = "auto", weight_row_sq: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA linear layer (HF PEFT semantics). Shapes as lora_linear, plus magnitude [out]:

        x [..., in], weight [out, in], lora_A [r, in], lora_B [out, r], magnitude [out],
        bias [out] or None  ->  [..., out] in x.dtype

    ``weight``: the frozen [out, in] tensor (the fused dora_fwd / dora_bwd ops; backends "torch"
    and "triton"), or an NF4Weight/FP4Weight/Int8Weight/Int4Weight (QDoRA: the qdora_* /
    intq_dora_* ops, the base products on the 4-bit matmul / decoded INT windows).
    ``weight_row_sq`` [out] = ‖W_i‖², e.g. from weight_row_sq(), skips recomputing it every call.
    Gradients flow to x, lora_A, lora_B and magnitude (the row norm is detached, as in PEFT), and
    to weight / bias when they require grad. Dropout: as lora_linear
    (mask from ``seed``, never stored). ``peft_kernels.backends.last_used("dora_linear")`` tells
    which backend ran (over a quantized base: ``last_used("qdora_linear")``, or
    ``"qdora_linear_int"`` for INT8/INT4). Under torch.autocast it computes in the autocast dtype.
    """
    autocast = _checks.autocast_dtype(x)
    if autocast is not None:  # F.linear's rule (see _checks.autocast_dtype); magnitude stays as it is
        x, weight, bias = _checks.to_autocast(autocast, x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            return dora_linear(x, weight, lora_A, lora_B, magnitude, bias, scaling=scaling, dropout_p=dropout_p,
                               training=training, seed=seed, backend=backend, weight_row_sq=weight_row_sq)
    if isinstance(weight, QUANTIZED):
        return _quantized_dora(x, weight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, training, seed,
                               backend, weight_row_sq)
    backend = _validate(x, weight, lora_A, lora_B, bias, scaling, dropout_p, backend, op=OP)
    _check_magnitude(magnitude, weight.shape[0], x, weight_row_sq)
    norm = _row_norm(weight, lora_A, lora_B, float(scaling), weight_row_sq, backend)
    mn = magnitude.to(accumulation_dtype(x.dtype)) / norm
    p, seed_t, lora_A, lora_B = _checks.adapter_call_args(OP, x, lora_A, lora_B, dropout_p, training, seed)
    x2 = x.reshape(-1, weight.shape[1])
    y = _DoRAFunction.apply(x2, weight, lora_A, lora_B, mn, _checks.contiguous_bias(bias), float(scaling), p, seed_t,
                            backend)
    return _checks.unflatten_rows(y, x)


def _quantized_dora(x, qweight, lora_A, lora_B, magnitude, bias, scaling, dropout_p, training, seed, backend,
                    weight_row_sq):
    """dora_linear over a quantized base: validation, then the qdora / intq_dora ops."""
    out_features, in_features = check_qweight(OP, x, qweight, allow_int=True)
    _checks.check_input(OP, x, in_features, out_features, bias)
    r = _checks.check_adapter(OP, lora_A, lora_B, in_features, out_features, scaling, dropout_p)
    _checks.check_same_device(OP, x=x, lora_A=lora_A, lora_B=lora_B, bias=bias)
    _check_magnitude(magnitude, out_features, x, weight_row_sq)
    ops = torch.ops.peft_kernels
    backend, fwd, bwd, meta = route(qweight, backend, x.device, (OP_Q, ops.qdora_fwd, ops.qdora_bwd),
                                    (OP_QINT, ops.intq_dora_fwd, ops.intq_dora_bwd))
    if backend == "triton":
        _checks.check_triton(OP, x, r)
    norm = dora_weight_norm(qweight, lora_A, lora_B, float(scaling), weight_row_sq)
    mn = magnitude.to(accumulation_dtype(x.dtype)) / norm
    p, seed_t, lora_A, lora_B = _checks.adapter_call_args(OP, x, lora_A, lora_B, dropout_p, training, seed)
    y = _QDoRAFunction.apply(x.reshape(-1, in_features), lora_A, lora_B, mn, _checks.contiguous_bias(bias), seed_t,
                             fwd, bwd, meta, float(scaling), p, backend)
    return _checks.unflatten_rows(y, x)


def _check_magnitude(magnitude, out_features, x, row_sq=None):
    """magnitude (and weight_row_sq when given): [out] on x's device."""
    for t, name in ((magnitude, "magnitude"), (row_sq, "weight_row_sq")):
        if t is None:
            continue
        _checks.check_tensor(t, name, OP, 1)
        if t.shape[0] != out_features:
            _checks.fail(OP, f"{name} must be [{out_features}], got {list(t.shape)}")
        _checks.check_same_device(OP, x=x, **{name: t})


__all__ = ["cached_weight_row_sq", "dora_linear", "dora_weight_norm", "weight_row_sq"]
