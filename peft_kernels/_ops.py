"""Every custom-op schema of peft_kernels, declared in one place, with its fake (meta)
implementation so torch.compile / FakeTensor tracing sees one opaque op per call.

The real implementations and autograd formulas live in peft_kernels/ops/<op>.py; the ``backend``
argument is always concrete here ("torch" | "triton" | "cuda"): ``auto`` is resolved before the
op is called, so a traced graph records which backend it runs.
"""
import torch

from .reference.lora import accumulation_dtype

LIB = torch.library.Library("peft_kernels", "DEF")

LIB.define(
    "lora_fwd(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, "
    "float dropout_p, Tensor? seed, str backend) -> (Tensor, Tensor)"
)
LIB.define(
    "lora_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, float scaling, "
    "float dropout_p, Tensor? seed, bool need_dx, str backend) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("peft_kernels::lora_fwd")
def _lora_fwd_fake(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    return (
        x.new_empty((x.shape[0], weight.shape[0])),
        x.new_empty((x.shape[0], lora_A.shape[0]), dtype=accumulation_dtype(x.dtype)),
    )


@torch.library.register_fake("peft_kernels::lora_bwd")
def _lora_bwd_fake(grad_y, x, weight, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, backend):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


# The LoRA branch alone (peft_kernels/ops/lora_delta.py): y = s·dropout(x)·Aᵀ·Bᵀ [M, N], u [M, r].
LIB.define(
    "lora_delta_fwd(Tensor x, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor? seed, "
    "str backend) -> (Tensor, Tensor)"
)
LIB.define(
    "lora_delta_bwd(Tensor grad_y, Tensor x, Tensor lora_A, Tensor lora_B, Tensor u, float scaling, "
    "float dropout_p, Tensor? seed, bool need_dx, str backend) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("peft_kernels::lora_delta_fwd")
def _lora_delta_fwd_fake(x, lora_A, lora_B, scaling, dropout_p, seed, backend):
    return (x.new_empty((x.shape[0], lora_B.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=accumulation_dtype(x.dtype)))


@torch.library.register_fake("peft_kernels::lora_delta_bwd")
def _lora_delta_bwd_fake(grad_y, x, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx, backend):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


# DoRA (dense base): mn = magnitude / ‖W + s·BA‖_row in the accumulation dtype; w [M, N] is saved
# for the magnitude's gradient (peft_kernels/reference/dora.py).
LIB.define(
    "dora_fwd(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor mn, Tensor? bias, float scaling, "
    "float dropout_p, Tensor? seed, str backend) -> (Tensor, Tensor, Tensor)"
)
LIB.define(
    "dora_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, Tensor w, "
    "Tensor mn, float scaling, float dropout_p, Tensor? seed, bool need_dx, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("peft_kernels::dora_fwd")
def _dora_fwd_fake(x, weight, lora_A, lora_B, mn, bias, scaling, dropout_p, seed, backend):
    return _dora_fwd_outputs(x, weight.shape, lora_A)


@torch.library.register_fake("peft_kernels::dora_bwd")
def _dora_bwd_fake(grad_y, x, weight, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed, need_dx, backend):
    return _dora_bwd_outputs(x, lora_A, lora_B, mn, need_dx)


# DoRA over a quantized base: the 4-bit weight as in qlora_fwd, INT8/INT4 as in intq_lora_fwd.
LIB.define(
    "qdora_fwd(Tensor x, Tensor[] qweight, int blocksize, int[] shape, Tensor lora_A, Tensor lora_B, Tensor mn, "
    "Tensor? bias, float scaling, float dropout_p, Tensor? seed, str backend) -> (Tensor, Tensor, Tensor)"
)
LIB.define(
    "qdora_bwd(Tensor grad_y, Tensor x, Tensor[] qweight, int blocksize, int[] shape, Tensor lora_A, "
    "Tensor lora_B, Tensor u, Tensor w, Tensor mn, float scaling, float dropout_p, Tensor? seed, bool need_dx, "
    "str backend) -> (Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "intq_dora_fwd(Tensor x, Tensor[] qweight, str fmt, int group_size, int[] shape, Tensor lora_A, "
    "Tensor lora_B, Tensor mn, Tensor? bias, float scaling, float dropout_p, Tensor? seed, str backend) "
    "-> (Tensor, Tensor, Tensor)"
)
LIB.define(
    "intq_dora_bwd(Tensor grad_y, Tensor x, Tensor[] qweight, str fmt, int group_size, int[] shape, "
    "Tensor lora_A, Tensor lora_B, Tensor u, Tensor w, Tensor mn, float scaling, float dropout_p, Tensor? seed, "
    "bool need_dx, str backend) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _dora_fwd_outputs(x, shape, lora_A):
    M, N = x.shape[0], shape[0]
    return (x.new_empty((M, N)), x.new_empty((M, lora_A.shape[0]), dtype=accumulation_dtype(x.dtype)),
            x.new_empty((M, N)))


def _dora_bwd_outputs(x, lora_A, lora_B, mn, need_dx):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), mn.new_empty(mn.shape)


@torch.library.register_fake("peft_kernels::qdora_fwd")
def _qdora_fwd_fake(x, qweight, blocksize, shape, lora_A, lora_B, mn, bias, scaling, dropout_p, seed, backend):
    return _dora_fwd_outputs(x, shape, lora_A)


@torch.library.register_fake("peft_kernels::qdora_bwd")
def _qdora_bwd_fake(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, w, mn, scaling, dropout_p, seed,
                    need_dx, backend):
    return _dora_bwd_outputs(x, lora_A, lora_B, mn, need_dx)


@torch.library.register_fake("peft_kernels::intq_dora_fwd")
def _intq_dora_fwd_fake(x, qweight, fmt, group_size, shape, lora_A, lora_B, mn, bias, scaling, dropout_p, seed,
                        backend):
    return _dora_fwd_outputs(x, shape, lora_A)


@torch.library.register_fake("peft_kernels::intq_dora_bwd")
def _intq_dora_bwd_fake(grad_y, x, qweight, fmt, group_size, shape, lora_A, lora_B, u, w, mn, scaling, dropout_p,
                        seed, need_dx, backend):
    return _dora_bwd_outputs(x, lora_A, lora_B, mn, need_dx)


# Frozen 4-bit (bitsandbytes-format) base weights. ``qweight`` = [packed, absmax, code] or
# [packed, absmax, code, absmax2, code2, offset] (double quantization); shape = [out, in].
LIB.define(
    "quant_linear_fwd(Tensor x, Tensor[] qweight, int blocksize, int[] shape, Tensor? bias, "
    "str backend) -> Tensor"
)
LIB.define(
    "quant_linear_bwd(Tensor grad_y, Tensor[] qweight, int blocksize, int[] shape, str backend) "
    "-> Tensor"
)
LIB.define(
    "qlora_fwd(Tensor x, Tensor[] qweight, int blocksize, int[] shape, Tensor lora_A, "
    "Tensor lora_B, Tensor? bias, float scaling, float dropout_p, Tensor? seed, str backend) -> (Tensor, Tensor)"
)
LIB.define(
    "qlora_bwd(Tensor grad_y, Tensor x, Tensor[] qweight, int blocksize, int[] shape, "
    "Tensor lora_A, Tensor lora_B, Tensor u, float scaling, float dropout_p, Tensor? seed, bool need_dx, "
    "str backend) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("peft_kernels::quant_linear_fwd")
def _quant_linear_fwd_fake(x, qweight, blocksize, shape, bias, backend):
    return x.new_empty((x.shape[0], shape[0]))


@torch.library.register_fake("peft_kernels::quant_linear_bwd")
def _quant_linear_bwd_fake(grad_y, qweight, blocksize, shape, backend):
    return grad_y.new_empty((grad_y.shape[0], shape[1]))


@torch.library.register_fake("peft_kernels::qlora_fwd")
def _qlora_fwd_fake(x, qweight, blocksize, shape, lora_A, lora_B, bias, scaling, dropout_p, seed, backend):
    return (x.new_empty((x.shape[0], shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=accumulation_dtype(x.dtype)))


@torch.library.register_fake("peft_kernels::qlora_bwd")
def _qlora_bwd_fake(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, scaling, dropout_p, seed,
                    need_dx, backend):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


# Frozen INT8 / INT4 bases (peft_kernels/ops/quant_linear.py): qweight = [CB, SCB] (int8) or
# [packed, scales, zeros] (int4, group_size); shape = [out, in].
LIB.define(
    "intq_linear_fwd(Tensor x, Tensor[] qweight, str fmt, int group_size, int[] shape, Tensor? bias, "
    "str backend) -> Tensor"
)
LIB.define(
    "intq_linear_bwd(Tensor grad_y, Tensor[] qweight, str fmt, int group_size, int[] shape, str backend) -> Tensor"
)


@torch.library.register_fake("peft_kernels::intq_linear_fwd")
def _intq_linear_fwd_fake(x, qweight, fmt, group_size, shape, bias, backend):
    return x.new_empty((x.shape[0], shape[0]))


@torch.library.register_fake("peft_kernels::intq_linear_bwd")
def _intq_linear_bwd_fake(grad_y, qweight, fmt, group_size, shape, backend):
    return grad_y.new_empty((grad_y.shape[0], shape[1]))


# LoRA over a frozen INT8 / INT4 base (qlora_linear with an Int8Weight / Int4Weight): qlora_fwd /
# qlora_bwd with the integer weight's (qweight, fmt, group_size) in place of the 4-bit one's.
LIB.define(
    "intq_lora_fwd(Tensor x, Tensor[] qweight, str fmt, int group_size, int[] shape, Tensor lora_A, "
    "Tensor lora_B, Tensor? bias, float scaling, float dropout_p, Tensor? seed, str backend) -> (Tensor, Tensor)"
)
LIB.define(
    "intq_lora_bwd(Tensor grad_y, Tensor x, Tensor[] qweight, str fmt, int group_size, int[] shape, "
    "Tensor lora_A, Tensor lora_B, Tensor u, float scaling, float dropout_p, Tensor? seed, bool need_dx, "
    "str backend) -> (Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("peft_kernels::intq_lora_fwd")
def _intq_lora_fwd_fake(x, qweight, fmt, group_size, shape, lora_A, lora_B, bias, scaling, dropout_p, seed,
                        backend):
    return _qlora_fwd_fake(x, qweight, 0, shape, lora_A, lora_B, bias, scaling, dropout_p, seed, backend)


@torch.library.register_fake("peft_kernels::intq_lora_bwd")
def _intq_lora_bwd_fake(grad_y, x, qweight, fmt, group_size, shape, lora_A, lora_B, u, scaling, dropout_p, seed,
                        need_dx, backend):
    return _qlora_bwd_fake(grad_y, x, qweight, 0, shape, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx,
                           backend)


# Sparse deltas: dW at the delta's positions (peft_kernels/ops/sparse_delta.py). index int32/64
# [k]; block = [] (unstructured, result [k]) or [bh, bw] (result [k, bh, bw]); fp32 result.
LIB.define("sparse_sddmm(Tensor grad_y, Tensor x, Tensor index, int[] shape, int[] block, str backend) -> Tensor")


@torch.library.register_fake("peft_kernels::sparse_sddmm")
def _sparse_sddmm_fake(grad_y, x, index, shape, block, backend):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((index.shape[0], *block), dtype=dtype)


# Sparse deltas on an embedding table (peft_kernels/ops/sparse_embedding.py): ids int64 [M]; weight
# [V, d]; index int32/64 [k] sorted flat positions row * d + col; values [k]. Forward: the rows of
# W0 + delta, [M, d] in weight's dtype. Backward: d delta [k] (fp32; fp64 for an fp64 dY); tokens
# equal to padding_idx (-1: none) give no gradient, as nn.Embedding's.
LIB.define("sparse_embedding_fwd(Tensor ids, Tensor weight, Tensor values, Tensor index, str backend) -> Tensor")
LIB.define("sparse_embedding_bwd(Tensor grad_y, Tensor ids, Tensor index, int num_rows, int padding_idx, "
           "str backend) -> Tensor")


@torch.library.register_fake("peft_kernels::sparse_embedding_fwd")
def _sparse_embedding_fwd_fake(ids, weight, values, index, backend):
    return weight.new_empty((ids.shape[0], weight.shape[1]))


@torch.library.register_fake("peft_kernels::sparse_embedding_bwd")
def _sparse_embedding_bwd_fake(grad_y, ids, index, num_rows, padding_idx, backend):
    dtype = torch.float64 if grad_y.dtype == torch.float64 else torch.float32
    return grad_y.new_empty((index.shape[0],), dtype=dtype)


# Rows of x sorted by expert, each times its expert's matrix (peft_kernels/ops/expert_matmul.py):
# x [S, k], w [E, k, n], ends [E] int32 -> y [S, n]; backward dX [S, k] and dW [E, k, n], each only if asked.
LIB.define("expert_mm_fwd(Tensor x, Tensor w, Tensor ends) -> Tensor")
LIB.define("expert_mm_bwd(Tensor grad_y, Tensor x, Tensor w, Tensor ends, bool need_dx, bool need_dw) "
           "-> (Tensor, Tensor)")


@torch.library.register_fake("peft_kernels::expert_mm_fwd")
def _expert_mm_fwd_fake(x, w, ends):
    return x.new_empty((x.shape[0], w.shape[2]))


@torch.library.register_fake("peft_kernels::expert_mm_bwd")
def _expert_mm_bwd_fake(grad_y, x, w, ends, need_dx, need_dw):
    dx = grad_y.new_empty((grad_y.shape[0], w.shape[1])) if need_dx else grad_y.new_empty(0)
    return dx, (w.new_empty(w.shape) if need_dw else w.new_empty(0))
