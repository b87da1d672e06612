"""The CUDA C++ single-kernel LoRA forward and backward for few tokens (csrc/lora_small_m.cuh,
lora_small_m_bwd.cuh) on the CPU tier:
the kernel source, unchanged, built with g++ against the CPU emulator of tests/cuda_emu/emu.h
(every thread a host thread, mma.sync m16n8k16 from the PTX ISA's fragment layout), run on odd
shapes against the float64 reference. What this cannot check — the real tensor cores, memory
ordering between SMs, speed — is the GPU tier's (tests/test_lora_cuda_gpu.py)."""
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from peft_kernels.reference import lora as ref

from helpers import FLOOR, emulated_cuda_library, rel_err

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the CUDA emulator")


@pytest.fixture(scope="module")
def lib():
    so = emulated_cuda_library("lora_small_m_emu.cpp", "lora_small_m_bwd_emu.cpp")
    so.emu_lora_small_m_fwd.restype = ctypes.c_int
    return so


def run(lib, x, w, a, b, bias, seed, s, p, *, qweight=None, sms=2, splits=0, producers=0):
    """(y, u, blocks launched, counters after the launch) from the emulated kernel. ``w``: the
    dense weight, or with ``qweight`` (an NF4Weight / FP4Weight) None. ``a`` None: no adapter."""
    M, K = x.shape
    N = w.shape[0] if qweight is None else qweight.shape[0]
    r = 0 if a is None else a.shape[0]
    y = torch.full((M, N), float("nan"), dtype=x.dtype)
    u = torch.full((M, max(r, 1)), float("nan"))
    counters = (ctypes.c_int * 4096)()
    packed, absmax, code, absmax2, code2, offset, blocksize, _ = (qweight.parts() if qweight is not None
                                                                  else (None,) * 6 + (0, None))
    offset = None if offset is None else offset.reshape(1).contiguous()

    def ptr(t):
        return None if t is None else ctypes.c_void_p(t.data_ptr())
    blocks = lib.emu_lora_small_m_fwd(
        ctypes.c_int(0 if x.dtype == torch.float16 else 1), ptr(x), ptr(w), ptr(a), ptr(b), ptr(bias), ptr(seed),
        ptr(y), ptr(u), ctypes.c_int64(M), ctypes.c_int64(K), ctypes.c_int64(N), ctypes.c_int64(r),
        ctypes.c_float(s), ctypes.c_double(p), ptr(packed), ptr(absmax), ptr(absmax2), ptr(code), ptr(code2),
        ptr(offset), ctypes.c_int64(blocksize), ctypes.c_int(sms), ctypes.c_int(splits), ctypes.c_int(producers),
        counters)
    return y, u[:, :r], blocks, list(counters[:4096])


def inputs(M, K, N, r, dtype, bias=True):
    g = torch.Generator().manual_seed(M * 7919 + K * 31 + N * 7 + r)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)  # noqa: E731
    return (rand(M, K), rand(N, K, scale=K ** -0.5), rand(r, K, scale=K ** -0.5), rand(N, r, scale=r ** -0.5),
            rand(N) if bias else None)


def check(y, u, x, w, a, b, bias, s, p, seed, w_exact=None):
    """y within 2x the error of the reference in x's dtype (or the dtype floor) of the float64
    result; u (fp32 accumulation of exact 16-bit products) within 1e-5. ``w_exact``: the weight
    the float64 result uses (a 4-bit weight's fp32 decode; ``w`` is then that decode in x's dtype,
    which is what the kernel and the reference multiply)."""
    wide = [None if t is None else t.double() for t in (x, w if w_exact is None else w_exact, a, b, bias)]
    if a is None:  # the frozen layer alone
        y64 = torch.nn.functional.linear(*wide[:2], wide[4])
        y_e = torch.nn.functional.linear(x, w, bias)
    else:
        y64, u64 = ref.lora_forward(*wide, s, p, seed)
        y_e, _ = ref.lora_forward(x, w, a, b, bias, s, p, seed)
        assert rel_err(u, u64) <= 1e-5
    assert rel_err(y, y64) <= max(2 * rel_err(y_e, y64), FLOOR[x.dtype]), (rel_err(y, y64), rel_err(y_e, y64))


CASES = [  # M, K, N, r, p, bias, splits, producers
    (1, 8, 1, 1, 0.0, False, 0, 0),        # one of everything
    (5, 40, 24, 4, 0.0, True, 3, 2),       # more splits than steps: empty K ranges still arrive
    (16, 264, 70, 16, 0.1, True, 3, 3),    # a partial last 32-step, N not a multiple of 8
    (17, 104, 65, 9, 0.2, False, 2, 1),    # two m16 tiles, one row in the second
    (33, 128, 130, 33, 0.3, True, 1, 2),   # four m16 tiles, three row groups, rank tiles past r
    (64, 520, 64, 64, 0.0, True, 4, 2),    # the largest M and rank
    (7, 1032, 40, 16, 0.05, True, 0, 0),   # the plan's own splits and producers
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r,p,has_bias,splits,producers", CASES)
def test_emulated_kernel_matches_reference(lib, dtype, M, K, N, r, p, has_bias, splits, producers):
    x, w, a, b, bias = inputs(M, K, N, r, dtype, has_bias)
    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64) if p else None
    y, u, blocks, counters = run(lib, x, w, a, b, bias, seed, 1.5, p, splits=splits, producers=producers)
    assert blocks > 0
    check(y, u, x, w, a, b, bias, 1.5, p, None if seed is None else int(seed))


QUANT_CASES = [  # M, K, N, r, quant_type, blocksize, double_quant, p, splits
    (1, 128, 24, 0, "nf4", 64, True, 0.0, 0),       # the frozen layer alone, decode
    (16, 384, 70, 16, "nf4", 64, True, 0.1, 2),     # a half 128-step at the end (K % 128 = 0 is not needed)
    (5, 256, 130, 8, "fp4", 128, False, 0.0, 3),    # FP4, plain fp32 absmax, three row groups
    (33, 512, 40, 5, "nf4", 256, True, 0.2, 1),     # blocksize 256, four m16 tiles
    (9, 96, 33, 0, "fp4", 32, True, 0.0, 4),        # blocksize 32, more splits than steps
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r,quant_type,blocksize,double_quant,p,splits", QUANT_CASES)
def test_emulated_4bit_kernel_matches_reference(lib, dtype, M, K, N, r, quant_type, blocksize, double_quant, p,
                                                splits):
    """The same kernel over bitsandbytes 4-bit weights: W decoded in registers, compared with the
    float64 product of the exact (fp32) decode; the reference in x's dtype multiplies the decode
    rounded to x's dtype, as the kernel does."""
    from peft_kernels.quant import FP4Weight, NF4Weight

    x, w, a, b, bias = inputs(M, K, N, max(r, 1), dtype)
    kind = NF4Weight if quant_type == "nf4" else FP4Weight
    q = kind.from_float(w.float(), blocksize=blocksize, double_quant=double_quant)
    if r == 0:
        a = b = None
    seed = torch.tensor([99], dtype=torch.int64) if p else None
    y, u, blocks, _ = run(lib, x, None, a, b, bias, seed, 0.5, p, qweight=q, splits=splits)
    assert blocks > 0
    check(y, u, x, q.dequantize(dtype), a, b, bias, 0.5, p, 99 if p else None, w_exact=q.dequantize(torch.float32))


def test_counters_count_every_block_and_the_flag(lib):
    """Every main block arrives once at its group's counter, every producer once at theirs, and
    the last producer raises the u-ready flag: the protocol the last arrivals rely on."""
    M, K, N, r = 9, 200, 150, 8  # 3 row groups, 7 steps
    x, w, a, b, bias = inputs(M, K, N, r, torch.float16)
    _, _, blocks, counters = run(lib, x, w, a, b, bias, None, 1.0, 0.0, splits=3, producers=2)
    assert blocks == 2 + 3 * 3
    assert counters[:6] == [3, 3, 3, 2, 1, 0]


def test_deterministic_and_dropout_follows_the_seed(lib):
    M, K, N, r = 16, 256, 72, 16
    x, w, a, b, bias = inputs(M, K, N, r, torch.bfloat16)
    s1, s2 = torch.tensor([11], dtype=torch.int64), torch.tensor([12], dtype=torch.int64)
    y1, u1, *_ = run(lib, x, w, a, b, bias, s1, 2.0, 0.25, splits=4, producers=2)
    y1b, u1b, *_ = run(lib, x, w, a, b, bias, s1, 2.0, 0.25, splits=4, producers=2)
    y2, u2, *_ = run(lib, x, w, a, b, bias, s2, 2.0, 0.25, splits=4, producers=2)
    assert torch.equal(y1, y1b) and torch.equal(u1, u1b)  # fixed summation order
    assert not torch.equal(u1, u2)  # another seed, another mask
    # u is dropout(x) A^T with the reference's mask, p = 0.25 of x dropped
    keep = ref.keep_mask(x, 0.25, 11)
    assert abs(keep.float().mean().item() - 0.75) < 0.03
    torch.testing.assert_close(u1, (ref.masked(x, keep).double() @ a.double().T).float() / 0.75, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,K,N,sms", [(16, 4096, 4096, 132), (1, 4096, 14336, 132), (64, 14336, 4096, 108),
                                       (3, 40, 24, 132)])
def test_plan_fills_the_gpu_and_stays_in_range(lib, M, K, N, sms):
    out = (ctypes.c_int * 4)()
    lib.emu_lora_small_m_plan(ctypes.c_int64(M), ctypes.c_int64(K), ctypes.c_int64(N), ctypes.c_int64(16),
                              ctypes.c_int(sms), ctypes.c_int(0), out)
    groups, splits, producers, tiles = list(out)
    steps = -(-K // 32)
    assert groups == -(-N // 64) and tiles == (1 if M <= 16 else 2 if M <= 32 else 4)
    assert 1 <= splits <= max(1, steps // 4) and 1 <= producers <= 16
    if steps >= 4 * 4 * sms // groups:  # enough K to split: about four blocks per SM
        assert groups * splits >= 4 * sms - groups


def test_rule_says_why_the_kernel_does_not_apply():
    """cuda_backend.lora.small_m_reason: the single-kernel forward runs only where it is correct
    and on (SMALL_M_MAX_M; 0 = off until timed on a GPU), else the three-launch path does, and the
    reason is readable."""
    from peft_kernels.cuda_backend import lora as cuda_lora

    x, w, a = torch.randn(16, 64).half(), torch.randn(40, 64).half(), torch.randn(8, 64).half()
    assert "SMALL_M_MAX_M" in cuda_lora.small_m_reason(x, w, a)  # off by default
    assert cuda_lora.small_m_reason(x, w, a, max_m=64) is None
    assert "outside" in cuda_lora.small_m_reason(torch.randn(65, 64).half(), w, a, max_m=1000)  # kernel limit
    assert "fp16 / bf16" in cuda_lora.small_m_reason(x.float(), w.float(), a.float(), max_m=64)
    assert "rank" in cuda_lora.small_m_reason(x, w, torch.randn(65, 64).half(), max_m=64)
    x60 = torch.randn(16, 60).half()
    assert "multiple of 8" in cuda_lora.small_m_reason(x60, torch.randn(40, 60).half(), torch.randn(8, 60).half(),
                                                       max_m=64)
    shifted = torch.randn(16 * 64 + 1).half()[1:].view(16, 64)  # 2 bytes past a 16-byte boundary
    assert "aligned" in cuda_lora.small_m_reason(shifted, w, a, max_m=64)


def test_4bit_rule_and_backend_errors():
    """cuda_backend.quant.small_m_reason says why the 4-bit single-kernel forward does not apply;
    backend="cuda" for the 4-bit ops is a clear error off a GPU; INT8/INT4 weights have no cuda
    implementation."""
    import peft_kernels
    from peft_kernels import backends
    from peft_kernels.cuda_backend import quant as cuda_quant
    from peft_kernels.quant import NF4Weight

    q = NF4Weight.from_float(torch.randn(40, 128))
    parts = q.parts()
    x = torch.randn(16, 128).half()
    assert "SMALL_M_MAX_M" in cuda_quant.small_m_reason(x, parts[:6], 64, (40, 128))
    assert cuda_quant.small_m_reason(x, parts[:6], 64, (40, 128), max_m=64) is None
    assert "blocksize" in cuda_quant.small_m_reason(x, parts[:6], 256, (40, 128), max_m=64)
    assert "fp16 / bf16" in cuda_quant.small_m_reason(x.float(), parts[:6], 64, (40, 128), max_m=64)
    assert "rank" in cuda_quant.small_m_reason(x, parts[:6], 64, (40, 128), torch.randn(65, 128).half(), max_m=64)
    with pytest.raises(RuntimeError, match="backend 'cuda' unavailable"):
        peft_kernels.quant_linear(x.float(), q, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' unavailable"):
        peft_kernels.qlora_linear(x.float(), q, torch.randn(4, 128), torch.zeros(40, 4), backend="cuda")
    with pytest.raises(RuntimeError, match="no 'cuda' implementation"):
        backends.implementation("quant_linear_int", "cuda")
    assert backends.implementation("qlora_linear", "cuda") is cuda_quant


def run_bwd(lib, dy, x, w, a, b, u, seed, s, p, *, need_dx=True, sms=2, splits=0, producers=0):
    """(dx or None, dA, dB, blocks launched, counters) from the emulated backward kernel."""
    M, K = x.shape
    N, r = w.shape[0], a.shape[0]
    dx = torch.full((M, K), float("nan"), dtype=x.dtype) if need_dx else None
    da = torch.full((r, K), float("nan"), dtype=x.dtype)
    db = torch.full((N, r), float("nan"), dtype=x.dtype)
    counters = (ctypes.c_int * 4096)()

    def ptr(t):
        return None if t is None else ctypes.c_void_p(t.data_ptr())
    blocks = lib.emu_lora_small_m_bwd(
        ctypes.c_int(0 if x.dtype == torch.float16 else 1), ptr(dy), ptr(x), ptr(w), ptr(a), ptr(b), ptr(u), ptr(seed),
        ptr(dx), ptr(da), ptr(db), ctypes.c_int64(M), ctypes.c_int64(K), ctypes.c_int64(N), ctypes.c_int64(r),
        ctypes.c_float(s), ctypes.c_double(p), ctypes.c_int(sms), ctypes.c_int(splits), ctypes.c_int(producers),
        counters)
    return dx, da, db, blocks, list(counters[:4096])


BWD_CASES = [  # M, K, N, r, p, splits, producers
    (1, 8, 8, 1, 0.0, 0, 0),           # one of everything
    (5, 40, 24, 4, 0.0, 2, 2),         # more splits than 32-row steps of W: empty ranges still arrive
    (16, 264, 72, 16, 0.1, 3, 3),      # partial 64-column group and partial 32-row step
    (33, 128, 136, 9, 0.3, 1, 1),      # four m16 tiles, rank tiles past r
    (64, 520, 64, 64, 0.0, 2, 1),      # the largest M and rank
    (7, 1032, 1040, 16, 0.05, 0, 0),   # the plan's own splits and producers
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N,r,p,splits,producers", BWD_CASES)
def test_emulated_backward_matches_reference(lib, dtype, M, K, N, r, p, splits, producers):
    """dX, dA and dB against the float64 reference backward (the same u, the reference's mask):
    each within 2x the error of the reference in x's dtype (or the dtype floor); without dX the
    same dA and dB bits."""
    x, w, a, b, _ = inputs(M, K, N, r, dtype, bias=False)
    dy = inputs(M, N, 8, 1, dtype, bias=False)[0]
    seed_int = 4321 if p else None
    seed = torch.tensor([4321], dtype=torch.int64) if p else None
    wide = [t.double() for t in (x, w, a, b)]
    u = ref.lora_forward(*wide, None, 1.5, p, seed_int)[1].float()
    dx, da, db, blocks, _ = run_bwd(lib, dy, x, w, a, b, u, seed, 1.5, p, splits=splits, producers=producers)
    assert blocks > 0
    want = ref.lora_backward(dy.double(), *wide, u.double(), 1.5, p, seed_int, True)
    eager = ref.lora_backward(dy, x, w, a, b, u, 1.5, p, seed_int, True)
    for name, got, e, w64 in zip(("dx", "dA", "dB"), (dx, da, db), eager, want):
        assert rel_err(got, w64) <= max(2 * rel_err(e, w64), FLOOR[dtype]), (name, rel_err(got, w64), rel_err(e, w64))
    no_dx, da2, db2, *_ = run_bwd(lib, dy, x, w, a, b, u, seed, 1.5, p, need_dx=False, producers=producers or 0)
    assert no_dx is None
    if producers:  # v summed over the same producer ranges: identical bits
        assert torch.equal(da2, da) and torch.equal(db2, db)


def test_backward_rule_says_why():
    from peft_kernels.cuda_backend import lora as cuda_lora

    dy, w, a = torch.randn(16, 40).half(), torch.randn(40, 64).half(), torch.randn(8, 64).half()
    assert "SMALL_M_BWD_MAX_M" in cuda_lora.small_m_bwd_reason(dy, w, a)  # off by default
    assert cuda_lora.small_m_bwd_reason(dy, w, a, max_m=64) is None
    assert "multiples of 8" in cuda_lora.small_m_bwd_reason(torch.randn(16, 42).half(), torch.randn(42, 64).half(), a,
                                                            max_m=64)
    assert "fp16 / bf16" in cuda_lora.small_m_bwd_reason(dy.float(), w.float(), a.float(), max_m=64)
    shifted = torch.randn(16 * 40 + 1).half()[1:].view(16, 40)
    assert "aligned" in cuda_lora.small_m_bwd_reason(shifted, w, a, max_m=64)


def test_memcheck_under_address_sanitizer(tmp_path):
    """The kernels' index arithmetic never leaves their buffers: tests/cuda_emu/memcheck_driver.cpp
    runs every kernel (dense and 4-bit forward, backward with and without dX, and the LoRA pieces
    around cuBLAS of csrc/lora_kernels.cuh) on odd shapes with
    each buffer its own exact-size allocation, built with AddressSanitizer and UBSan — the CPU
    tier's compute-sanitizer memcheck. (Changing a bound in load_row8 from >= to > makes it fail.)"""
    exe = tmp_path / "memcheck"
    units = [os.path.join(HERE, "cuda_emu", f) for f in ("memcheck_driver.cpp", "lora_kernels_emu.cpp")]
    build = subprocess.run(["g++", "-std=c++20", "-O1", "-g", "-pthread", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                            "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-o", str(exe), *units],
                           capture_output=True, text=True)
    if build.returncode and "asan" in build.stderr.lower() and "cannot find" in build.stderr.lower():
        pytest.skip(f"no AddressSanitizer runtime for g++: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr[-2000:]
    run_ = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    assert run_.returncode == 0 and run_.stdout.strip() == "ok", (run_.stdout[-500:], run_.stderr[-3000:])


def test_4bit_cuda_backend_needs_triton_too(monkeypatch):
    """The 4-bit ops' cuda backend delegates all but its small-M forward to the Triton kernels: with
    the extension usable and triton not, the call says so before anything runs."""
    import peft_kernels
    from peft_kernels import backends
    from peft_kernels.quant import NF4Weight

    real = backends.unavailable_reason
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda b, d: None if b == "cuda" else "no triton here" if b == "triton" else real(b, d))
    q = NF4Weight.from_float(torch.randn(40, 128))
    x = torch.randn(4, 128)
    with pytest.raises(RuntimeError, match="runs the Triton kernels beside its own, and triton is unavailable: no triton"):
        peft_kernels.quant_linear(x, q, backend="cuda")
    with pytest.raises(RuntimeError, match="runs the Triton kernels beside its own"):
        peft_kernels.qlora_linear(x, q, torch.randn(4, 128), torch.zeros(40, 4), backend="cuda")


def test_small_m_on_sets_and_restores_the_chosen_rules():
    from peft_kernels.cuda_backend import lora as cuda_lora, quant as cuda_quant, small_m_on

    before = (cuda_lora.SMALL_M_MAX_M, cuda_lora.SMALL_M_BWD_MAX_M, cuda_quant.SMALL_M_MAX_M)
    with small_m_on(lora_forward=True, quant_forward=True):
        assert cuda_lora.SMALL_M_MAX_M == cuda_quant.SMALL_M_MAX_M == cuda_lora.SMALL_M_LIMIT
        assert cuda_lora.SMALL_M_BWD_MAX_M == before[1]  # not chosen: untouched
    assert (cuda_lora.SMALL_M_MAX_M, cuda_lora.SMALL_M_BWD_MAX_M, cuda_quant.SMALL_M_MAX_M) == before
