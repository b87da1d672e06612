"""lora_delta (the LoRA branch alone) on every backend of this tier against a float64 oracle, its
dropout mask against lora_linear's, opcheck, torch.compile, and bad inputs."""
import pytest
import torch

import peft_kernels
from peft_kernels import backends
from peft_kernels.ops.lora_delta import lora_delta
from peft_kernels.reference.lora import dropped

from helpers import assert_close_to_oracle, make_inputs

BACKENDS = ["torch", "triton"]


def _oracle(scaling, p, seed):
    """The branch as plain ops, with lora_delta's own mask (peft_kernels.reference.lora.dropped)."""
    def branch(x, a, b):
        x2 = x.reshape(-1, x.shape[-1])
        xd = dropped(x2, p, seed) if p else x2
        return (scaling * (xd @ a.T) @ b.T).reshape(*x.shape[:-1], b.shape[0])
    return branch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [((3, 7), 37, 53, 5), ((1,), 1, 1, 1), ((70,), 130, 9, 17)])
def test_matches_oracle(backend, dtype, p, shape, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    lead, k, n, r = shape
    x, _, a, b, _ = make_inputs(lead, k, n, r, dtype, device, bias=False)
    for t in (x, a, b):
        t.requires_grad_(True)
    grad_out = torch.randn(*lead, n, device=device).to(dtype)
    fn = lambda x, a, b: lora_delta(x, a, b, scaling=0.7, dropout_p=p, seed=99, backend=backend)  # noqa: E731
    assert_close_to_oracle(fn, [x, a, b], 0.7, p, 99, grad_out, oracle=_oracle(0.7, p, 99))
    assert backends.last_used("lora_delta") == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_mask_as_lora_linear_and_no_dx_path(backend, kernel_device):
    """lora_linear(x, W, ...) = x Wᵀ + lora_delta(x, ...) for one seed (one mask); without a
    gradient for x only the adapter's gradients are computed, equal to the full op's."""
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, w, a, b, _ = make_inputs((4, 6), 29, 31, 3, torch.float32, device, bias=False)
    a.requires_grad_(True)
    b.requires_grad_(True)
    full = peft_kernels.lora_linear(x, w, a, b, scaling=2.0, dropout_p=0.4, seed=5, backend=backend)
    grads_full = torch.autograd.grad(full.square().sum(), [a, b])
    delta = lora_delta(x, a, b, scaling=2.0, dropout_p=0.4, seed=5, backend=backend)
    assert torch.allclose(full, x @ w.T + delta, rtol=1e-5, atol=1e-5)
    y = x @ w.T + delta
    grads = torch.autograd.grad(y.square().sum(), [a, b])
    for got, want in zip(grads, grads_full):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    off = lora_delta(x, a, b, scaling=2.0, dropout_p=0.4, training=False, seed=5, backend=backend)
    assert torch.allclose(off, 2.0 * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_and_compile(backend, p, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, _, a, b, _ = make_inputs((9,), 24, 16, 4, torch.float32, device, bias=False)
    seed = torch.tensor([17], device=device) if p > 0 else None
    args = (x, a, b, 0.5, p, seed, backend)
    torch.library.opcheck(torch.ops.peft_kernels.lora_delta_fwd.default, args)
    y, u = torch.ops.peft_kernels.lora_delta_fwd(*args)
    for need_dx in (True, False):
        torch.library.opcheck(torch.ops.peft_kernels.lora_delta_bwd.default,
                              (torch.randn_like(y), x, a, b, u, 0.5, p, seed, need_dx, backend))
    torch._dynamo.reset()
    fn = lambda x, a, b: lora_delta(x, a, b, scaling=0.5, dropout_p=p, seed=3, backend=backend)  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    a.requires_grad_(True)
    got, want = compiled(x, a, b), fn(x, a, b)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(got.sum(), a)[0], torch.autograd.grad(want.sum(), a)[0], atol=1e-5)


def test_autocast_and_adapter_dtype():
    """Under autocast the branch runs in the autocast dtype (F.linear's rule); fp32 adapters under
    an fp16 x are cast for the kernels and their gradients come back in fp32."""
    x = torch.randn(5, 12)
    a = torch.randn(3, 12, requires_grad=True)
    b = torch.randn(7, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_delta(x, a, b, scaling=1.5)
    want = lora_delta(x.bfloat16(), a.bfloat16(), b.bfloat16(), scaling=1.5)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_bad_inputs():
    x, a, b = torch.randn(4, 8), torch.randn(2, 8), torch.randn(5, 2)
    cases = [
        ((x, torch.randn(2, 9), b), {}, ValueError, r"lora_A must be \[r, in\] = \[r, 8\]"),
        ((x, a, torch.randn(5, 3)), {}, ValueError, r"lora_B must be \[out, r\] = \[5, 2\]"),
        ((x, a, b.double()), {}, ValueError, "must share a dtype"),
        ((x.long(), a, b), {}, ValueError, "x must be a floating-point tensor"),
        ((x, a, b), {"dropout_p": 1.0}, ValueError, "dropout_p must be < 1"),
        ((x, a, b), {"scaling": float("nan")}, ValueError, "scaling must be finite"),
        ((x, a, b), {"backend": "cuda"}, RuntimeError, "no 'cuda' implementation|unavailable"),
        ((x, torch.randn(0, 8), torch.randn(5, 0)), {}, ValueError, "rank r must be >= 1"),
    ]
    for args, kwargs, exc, message in cases:
        with pytest.raises(exc, match=message):
            lora_delta(*args, **kwargs)
