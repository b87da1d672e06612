"""The CUDA backend's LoRA pieces around cuBLAS (csrc/lora_kernels.cuh: down, up, dY·B, the dA / dB
reductions split over token slices with atomics, the dX term) on the CPU tier: the kernel bodies and
launch plans, unchanged, built with g++ against the CPU emulator of tests/cuda_emu/emu.h (every
thread a host thread, warp shuffles as the GPU's butterfly, fp32 atomics) and composed as
csrc/lora.cpp composes them, with torch standing in for the two cuBLAS products. Compared with the
float64 reference on odd shapes, every dtype, with and without dropout. The real GPU run of the same
op is tests/test_lora_cuda_gpu.py."""
import ctypes
import shutil

import pytest
import torch

from peft_kernels.reference import lora as ref

from helpers import FLOOR, emulated_cuda_library, rel_err

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the CUDA emulator")

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # lora_kernels.h DType


@pytest.fixture(scope="module")
def lib():
    so = emulated_cuda_library("lora_kernels_emu.cpp")
    so.emu_lora_weight_grad.restype = ctypes.c_int
    return so


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _i(v):
    return ctypes.c_int64(v)


def emulated_lora(lib, x, w, a, b, bias, dy, s, p, seed, sms):
    """lora.cpp's lora_fwd and lora_bwd with the emulated pieces: (y, u, dx, dA, dB, slices of dB's
    and dA's reductions). cuBLAS's two products (C + x W^T, D + dY W) are fp32 torch products
    rounded once to x's dtype, as addmm_ with the LoRA term as its C input."""
    M, K = x.shape
    N, r = b.shape
    dt = ctypes.c_int(DTYPE_CODE[x.dtype])
    seed_t = torch.tensor([seed], dtype=torch.int64) if p else None
    u = torch.full((M, r), float("nan"))
    lib.emu_lora_down(dt, _ptr(x), _ptr(a), _ptr(seed_t), _ptr(u), _i(M), _i(K), _i(r), ctypes.c_double(p))
    c = torch.full((M, N), float("nan"), dtype=x.dtype)
    lib.emu_lora_up(dt, _ptr(u), _ptr(b), _ptr(bias), _ptr(c), _i(M), _i(N), _i(r), ctypes.c_float(s))
    y = (c.float() + x.float() @ w.float().T).to(x.dtype)

    v = torch.full((M, r), float("nan"))
    lib.emu_lora_dy(dt, _ptr(dy), _ptr(b), _ptr(v), _i(M), _i(N), _i(r))
    grad_b = torch.zeros(N, r)  # zeroed: the token slices add into it
    slices_b = lib.emu_lora_weight_grad(dt, _ptr(dy), _ptr(u), None, _ptr(grad_b), _i(M), _i(N), _i(r),
                                        ctypes.c_float(s), ctypes.c_double(0.0), ctypes.c_int(sms))
    grad_a_t = torch.zeros(K, r)
    slices_a = lib.emu_lora_weight_grad(dt, _ptr(x), _ptr(v), _ptr(seed_t), _ptr(grad_a_t), _i(M), _i(K), _i(r),
                                        ctypes.c_float(s), ctypes.c_double(p), ctypes.c_int(sms))
    d = torch.full((M, K), float("nan"), dtype=x.dtype)
    lib.emu_lora_dx(dt, _ptr(v), _ptr(a), _ptr(seed_t), _ptr(d), _i(M), _i(K), _i(r), ctypes.c_float(s),
                    ctypes.c_double(p))
    dx = (d.float() + dy.float() @ w.float()).to(x.dtype)
    return y, u, dx, grad_a_t.T.to(a.dtype), grad_b.to(b.dtype), (slices_b, slices_a)


CASES = [  # M, K, N, r, p, bias, sms, token slices of the weight gradients
    (1, 8, 1, 1, 0.0, False, 1, 1),           # one of everything
    (3, 300, 260, 17, 0.3, True, 1, 1),       # K, N past one block of 256 threads; a partial third rank block
    (9, 129, 67, 13, 0.1, True, 1, 2),        # two token slices (4 blocks an SM over 2 column blocks)
    (9, 129, 67, 13, 0.0, False, 64, 9),      # a slice per token (the plan caps slices at M)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r,p,has_bias,sms,slices", CASES)
def test_emulated_pieces_match_reference(lib, dtype, M, K, N, r, p, has_bias, sms, slices):
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + N * 7 + r)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    x, w, a, b = rand(M, K), rand(N, K, scale=K ** -0.5), rand(r, K, scale=K ** -0.5), rand(N, r, scale=r ** -0.5)
    bias, dy = (rand(N) if has_bias else None), rand(M, N)
    seed, s = 0x1234_5678_9ABC, 1.5
    y, u, dx, grad_a, grad_b, launched = emulated_lora(lib, x, w, a, b, bias, dy, s, p, seed, sms)
    assert launched == (slices, slices)

    wide = [None if t is None else t.double() for t in (x, w, a, b, bias)]
    y64, u64 = ref.lora_forward(*wide, s, p, seed)
    dx64, da64, db64 = ref.lora_backward(dy.double(), wide[0], wide[1], wide[2], wide[3], u64, s, p, seed, True)
    # the reference in x's dtype: the error a correct implementation has
    y_e, u_e = ref.lora_forward(x, w, a, b, bias, s, p, seed)
    dx_e, da_e, db_e = ref.lora_backward(dy, x, w, a, b, u_e, s, p, seed, True)
    assert rel_err(u, u64) <= 1e-5  # fp32 sums of exact products
    for name, got, e, exact in (("y", y, y_e, y64), ("dx", dx, dx_e, dx64), ("dA", grad_a, da_e, da64),
                                ("dB", grad_b, db_e, db64)):
        assert rel_err(got, exact) <= max(2 * rel_err(e, exact), FLOOR[dtype]), (name, rel_err(got, exact),
                                                                                  rel_err(e, exact))


def test_dropout_zeroes_exactly_the_reference_mask(lib):
    """The dX term is zero exactly where the reference mask drops (with A and v dense, a kept
    element is never zero), so forward and backward regenerate the mask the other backends use."""
    M, K, N, r, p, seed = 5, 300, 40, 3, 0.4, 987654321
    g = torch.Generator().manual_seed(1)
    x, a, b = (torch.randn(*sh, generator=g) for sh in ((M, K), (r, K), (N, r)))
    v = torch.randn(M, N, generator=g) @ b
    d, seed_t = torch.full((M, K), float("nan")), torch.tensor([seed], dtype=torch.int64)
    lib.emu_lora_dx(ctypes.c_int(0), _ptr(v), _ptr(a), _ptr(seed_t), _ptr(d), _i(M), _i(K), _i(r),
                    ctypes.c_float(1.0), ctypes.c_double(p))
    keep = ref.keep_mask(x, p, seed)
    assert torch.equal(d != 0, keep)
    assert 0.3 < 1 - keep.float().mean().item() < 0.5


def test_weight_grad_plan_edges(lib):
    """No launch for an empty token range or no columns (the host skips them; the plan must not
    divide by zero), and never more slices than tokens."""
    acc = torch.zeros(4, 2)
    src, w = torch.randn(3, 4), torch.randn(3, 2)
    for M, cols in ((0, 4), (3, 0)):
        assert lib.emu_lora_weight_grad(ctypes.c_int(0), _ptr(src), _ptr(w), None, _ptr(acc), _i(M), _i(cols), _i(2),
                                        ctypes.c_float(1.0), ctypes.c_double(0.0), ctypes.c_int(132)) == 0
    assert torch.equal(acc, torch.zeros(4, 2))
    assert lib.emu_lora_weight_grad(ctypes.c_int(0), _ptr(src), _ptr(w), None, _ptr(acc), _i(3), _i(4), _i(2),
                                    ctypes.c_float(1.0), ctypes.c_double(0.0), ctypes.c_int(132)) == 3
    torch.testing.assert_close(acc, src.T @ w, rtol=1e-6, atol=1e-6)
