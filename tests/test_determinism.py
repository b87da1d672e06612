"""torch.use_deterministic_algorithms(True): the Triton kernels' split reductions write one slice
per split (summed by the host) instead of adding with fp32 atomics, and "auto" never picks the
CUDA C++ backend, whose reductions have no such path (peft_kernels.determinism).

The interpreter runs programs one after another, so atomics are reproducible here anyway: the CPU
tier checks which kernels were launched atomically (none, in deterministic mode) and that the
sliced reductions give the oracle's results; the GPU tier checks bitwise repeatability."""
import warnings

import pytest
import torch

import peft_kernels
from peft_kernels import backends, determinism
from peft_kernels.triton import dora as tri_dora
from peft_kernels.triton import lora as tri_lora
from peft_kernels.triton import sparse as tri_sparse

from helpers import assert_close_to_oracle, eager_lora

import test_dora_op
import test_lora_op
import test_sparse

ATOMIC_FLAGS = ("ATOMIC", "V_ATOMIC", "DB_ATOMIC", "DA_ATOMIC", "SPLIT")


@pytest.fixture
def deterministic():
    """Deterministic mode for one test, restored after it whatever happens."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch of the LoRA, DoRA and sparse modules as (kernel name, its meta-parameters)."""
    seen = []
    for module in (tri_lora, tri_dora, tri_sparse):
        real = module.launch

        def spy(kernel, grid, *args, _real=real, **meta):
            seen.append((kernel.fn.__name__, grid, meta))
            return _real(kernel, grid, *args, **meta)
        monkeypatch.setattr(module, "launch", spy)
    return seen


def _atomic(seen):
    """The launches that add partial sums atomically, as (kernel, flag)."""
    return [(name, f) for name, _, meta in seen for f in ATOMIC_FLAGS if meta.get(f)]


def _split(seen):
    """The launches whose reduction grid axis has more than one program (kernel names)."""
    return {name for name, grid, _ in seen if len(grid) > 1 and grid[1] > 1}


# Small tiles and many SMs: every LoRA reduction (u over K, v over N, dB over row tiles, dA over
# rows) is split across programs, each split ending on a partial tile.
LORA_SPLITS = dict(sms=256, down_bm=16, down_bk=16, up_bm=16, up_bn=16, dy_bm=16, dy_bn=16, dx_bm=16, dx_bk=16)


@pytest.mark.parametrize("dtype,p", [(torch.float32, 0.3), (torch.float16, 0.0)])
def test_lora_split_reductions_without_atomics(dtype, p, deterministic, launches, kernel_device):
    with tri_lora.launch_override(**LORA_SPLITS):
        test_lora_op._check("triton", kernel_device, dtype, (45,), 71, 39, 6, p=p)
    assert not _atomic(launches)
    assert {"_lora_down_kernel", "_lora_dy_kernel", "_lora_dx_kernel"} <= _split(launches)


def test_the_same_launches_add_atomically_outside_deterministic_mode(launches, kernel_device):
    """The configuration above does reach the atomic paths when the mode is off (so the test
    above checks something), and the results are the oracle's either way."""
    with tri_lora.launch_override(**LORA_SPLITS):
        test_lora_op._check("triton", kernel_device, torch.float32, (45,), 71, 39, 6, p=0.3)
    assert {("_lora_down_kernel", "ATOMIC"), ("_lora_dy_kernel", "V_ATOMIC"), ("_lora_dy_kernel", "DB_ATOMIC"),
            ("_lora_dx_kernel", "DA_ATOMIC")} <= set(_atomic(launches))


@pytest.mark.parametrize("sms", [1, 256])
def test_deterministic_mode_with_few_and_many_splits(sms, deterministic, kernel_device):
    """sms=1: u, v and dA each in one program (one slice), dB still one slice per row tile;
    sms=256: every reduction in many slices. Both equal the oracle at rank 17 (padded to 32)."""
    torch.manual_seed(5)
    with tri_lora.launch_override(**{**LORA_SPLITS, "sms": sms}):
        test_lora_op._check("triton", kernel_device, torch.float32, (3, 29), 50, 41, 17, p=0.1)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dora_without_atomics(p, deterministic, launches, kernel_device):
    torch.manual_seed(11)
    tensors = test_dora_op._inputs((37,), 45, 33, 5, torch.float32, kernel_device)
    for t in tensors[:1] + tensors[2:5]:
        t.requires_grad_()
    with tri_lora.launch_override(dora_bm=16, dora_bn=16, **LORA_SPLITS):
        test_dora_op._check(tensors, 0.7, p, 99, "triton")
    assert not _atomic(launches)
    assert "_dora_grad_kernel" in _split(launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_sparse_sddmm_split_over_tokens_without_atomics(dtype, deterministic, launches, kernel_device):
    shape, M = (48, 160), 700  # two blocks, 700 tokens: the token range is split across programs
    index = torch.tensor([3, 17], dtype=torch.int32)
    gy = torch.randn(M, shape[0], device=kernel_device).to(dtype)
    x = torch.randn(M, shape[1], device=kernel_device).to(dtype)
    test_sparse._check_sddmm(tri_sparse.sddmm, gy, x, index, shape, (16, 16))
    assert not _atomic(launches)
    assert "_sddmm_block_kernel" in _split(launches)


def test_qlora_adapter_kernels_without_atomics(deterministic, launches, kernel_device):
    """QLoRA's adapter work runs the LoRA kernels: no atomics there either."""
    from peft_kernels.quant import NF4Weight
    torch.manual_seed(2)
    q = NF4Weight.from_float(torch.randn(40, 128) / 11, blocksize=64).to(kernel_device)
    x = torch.randn(45, 128, device=kernel_device)
    a = torch.randn(6, 128, device=kernel_device) / 11
    b = torch.randn(40, 6, device=kernel_device)
    for t in (x, a, b):
        t.requires_grad_()

    def ours(x, a, b):
        return peft_kernels.qlora_linear(x, q, a, b, scaling=0.5, dropout_p=0.2, seed=3, backend="triton")

    def oracle(x, a, b):
        return eager_lora(x, q.dequantize().to(x.device, x.dtype), a, b, None, 0.5, 0.2, 3)
    with tri_lora.launch_override(**LORA_SPLITS):
        assert_close_to_oracle(ours, [x, a, b], 0.5, 0.2, 3, torch.randn(45, 40, device=kernel_device), oracle=oracle)
    assert not _atomic(launches)
    assert {"_lora_down_kernel", "_lora_dy_kernel", "_lora_dx_kernel"} <= _split(launches)


# ----------------------------------------------------------------------------- backend choice

def _pretend_every_backend_runs(monkeypatch):
    monkeypatch.setattr(backends, "unavailable_reason", lambda backend, device: None)


def test_auto_does_not_pick_the_cuda_backend(monkeypatch):
    _pretend_every_backend_runs(monkeypatch)
    cuda = torch.device("cuda", 0)
    assert backends.resolve("lora_linear", "auto", cuda, rows=16) == "cuda"
    torch.use_deterministic_algorithms(True)
    try:
        assert backends.resolve("lora_linear", "auto", cuda, rows=16) == "triton"
    finally:
        torch.use_deterministic_algorithms(False)


def test_asking_for_the_cuda_backend_raises_or_warns(monkeypatch):
    _pretend_every_backend_runs(monkeypatch)
    cuda = torch.device("cuda", 0)
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="use_deterministic_algorithms.*backend='triton'"):
            backends.resolve("lora_linear", "cuda", cuda, rows=16)
        monkeypatch.setenv("PEFT_KERNELS_BACKEND", "cuda")  # the override is an explicit choice too
        with pytest.raises(RuntimeError, match="atomicAdd"):
            backends.resolve("lora_linear", "auto", cuda, rows=16)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            assert backends.resolve("lora_linear", "cuda", cuda, rows=16) == "cuda"
    finally:
        torch.use_deterministic_algorithms(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("lora_linear", "cuda", cuda, rows=16) == "cuda"


def test_alert_is_silent_outside_deterministic_mode():
    determinism.alert("anything")
    assert not determinism.enabled()


# ----------------------------------------------------------------------------- GPU tier

@pytest.mark.gpu
@pytest.mark.parametrize("op", ["lora", "dora", "qlora", "sparse_block"])
def test_bitwise_repeatable_at_real_sizes(op, deterministic):
    """bf16 at a real size, every reduction split across many programs: two runs give the same
    bits (with atomics the adapter gradients differ run to run in their last bits)."""
    import os
    if not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        pytest.skip("deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts")
    torch.manual_seed(0)
    dev, dt, M, K, N, r = torch.device("cuda"), torch.bfloat16, 4096, 4096, 4096, 16
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(N, K, device=dev) / K**0.5).to(dt)
    a = (torch.randn(r, K, device=dev) / K**0.5).to(dt).requires_grad_()
    b = (torch.randn(N, r, device=dev) / r**0.5).to(dt).requires_grad_()
    g = torch.randn(M, N, device=dev, dtype=dt)
    if op == "lora":
        leaves, run = (x, a, b), lambda: peft_kernels.lora_linear(x, w, a, b, scaling=2.0, dropout_p=0.05, seed=7,
                                                                  backend="triton")
    elif op == "dora":
        m = (torch.linalg.norm(w.float(), dim=1) * 1.1).to(dt).requires_grad_()
        leaves, run = (x, a, b, m), lambda: peft_kernels.dora_linear(x, w, a, b, m, scaling=2.0, dropout_p=0.05,
                                                                     seed=7, backend="triton")
    elif op == "qlora":
        from peft_kernels.quant import NF4Weight
        q = NF4Weight.from_float(w)
        leaves, run = (x, a, b), lambda: peft_kernels.qlora_linear(x, q, a, b, scaling=2.0, dropout_p=0.05, seed=7,
                                                                   backend="triton")
    else:
        from peft_kernels.sparse import layout
        nb = layout.grid_size((N, K), (32, 32))
        index = torch.sort(torch.randperm(nb, device=dev)[: nb // 100]).values.to(torch.int32)
        values = (torch.randn(index.numel(), 32, 32, device=dev) / 100).to(dt).requires_grad_()
        leaves, run = (x, values), lambda: peft_kernels.sparse_delta_linear(
            x, w, values, index, shape_or_block=(32, 32), backend="triton")

    def step():
        for t in leaves:
            t.grad = None
        y = run()
        y.backward(g)
        return [y.detach().clone()] + [t.grad.clone() for t in leaves]
    first, second = step(), step()
    for i, (u, v) in enumerate(zip(first, second)):
        assert torch.equal(u, v), f"{op}: output/grad {i} differs between two deterministic runs"
