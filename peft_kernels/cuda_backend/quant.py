"""quant_linear / qlora_linear over a bitsandbytes 4-bit weight (NF4 / FP4) on the CUDA C++
extension: the forward for few tokens in one kernel (csrc/lora_small_m.cuh: W decoded in registers
from the packed codes, split K, the LoRA terms in the same launch); the backward and every other
forward run the Triton backend's kernels (peft_kernels/triton/quant_matmul.py), so this backend
needs triton as well. Signatures mirror peft_kernels.triton.quant_matmul.
"""
from __future__ import annotations

from . import lora as cuda_lora

# The single-kernel forward runs for M <= SMALL_M_MAX_M where small_m_reason allows it. 0 = off:
# it has run only in the CPU emulator (tests/test_cuda_small_m_emulated.py) and compiled for sm_80 /
# sm_90; on once `bench --op qlora --forward-only` (row "cuda small-M") shows it beating the Triton
# decode (#4's goal: the frozen NF4 forward at M = 16 in <= 0.5x the bf16 F.linear).
SMALL_M_MAX_M = 0
SMALL_M_LIMIT = cuda_lora.SMALL_M_LIMIT


def _triton():
    from ..triton import quant_matmul
    return quant_matmul


def small_m_reason(x, qweight, blocksize, shape, lora_A=None, max_m=None) -> str | None:
    """None when the single-kernel forward takes these (contiguous) inputs, else why not."""
    M, K = x.shape
    why = cuda_lora.common_reason(M, x.dtype, 0 if lora_A is None else lora_A.shape[0],
                                  SMALL_M_MAX_M if max_m is None else max_m, "SMALL_M_MAX_M")
    if why is not None:
        return why
    if blocksize < 32 or K % blocksize or shape[0] == 0:
        return f"in_features {K} not a multiple of the blocksize {blocksize} (>= 32), or no out_features"
    if any(t.data_ptr() % 16 for t in (x, qweight[0]) + (() if lora_A is None else (lora_A,))):
        return "x, the packed weight or lora_A not 16-byte aligned"
    return None


def _parts(qweight):
    packed, absmax, code, absmax2, code2, offset = qweight
    return [packed, absmax, code] + ([] if absmax2 is None else [absmax2, code2, offset.reshape(1)])


def quant_linear_forward(x, qweight, blocksize, shape, bias):
    """x [M, K] -> x @ deq(W)^T + bias [M, N] in x.dtype."""
    x = x.contiguous()
    if small_m_reason(x, qweight, blocksize, shape) is not None:
        return _triton().quant_linear_forward(x, qweight, blocksize, shape, bias)
    no_a, no_b = x.new_empty((0, shape[1])), x.new_empty((shape[0], 0))
    y, _ = cuda_lora._ops().qlora_fwd_small_m(x, _parts(qweight), blocksize, list(shape), no_a, no_b,
                                              None if bias is None else bias.contiguous(), 1.0, 0.0, None)
    return y


def quant_linear_backward(grad_y, qweight, blocksize, shape):
    return _triton().quant_linear_backward(grad_y, qweight, blocksize, shape)


def qlora_forward(x, qweight, blocksize, shape, lora_A, lora_B, bias, scaling, dropout_p, seed):
    """(y [M, N] in x.dtype, u [M, r] fp32), as triton.quant_matmul.qlora_forward."""
    x, lora_A = x.contiguous(), lora_A.contiguous()
    if lora_A.shape[0] == 0 or small_m_reason(x, qweight, blocksize, shape, lora_A) is not None:
        return _triton().qlora_forward(x, qweight, blocksize, shape, lora_A, lora_B, bias, scaling, dropout_p, seed)
    return cuda_lora._ops().qlora_fwd_small_m(x, _parts(qweight), blocksize, list(shape), lora_A, lora_B.contiguous(),
                                              None if bias is None else bias.contiguous(), float(scaling),
                                              float(dropout_p), seed)


def qlora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, scaling, dropout_p, seed, need_dx):
    return _triton().qlora_backward(grad_y, x, qweight, blocksize, shape, lora_A, lora_B, u, scaling, dropout_p,
                                    seed, need_dx)
