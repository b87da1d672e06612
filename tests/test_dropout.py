"""The fused dropout: counter-based mask, identical in forward, backward and the reference."""
import pytest
import torch
import torch.utils.checkpoint

import peft_kernels
from peft_kernels.reference.rng import dropout_keep_mask


def _identity_adapter(k, device, dtype=torch.float32):
    # With r = in = out, A = B = I and W random, y - x W^T = s * dropout(x): the mask is visible.
    eye = torch.eye(k, device=device, dtype=dtype)
    return eye.clone(), eye.clone()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_mask_is_the_reference_mask(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    m, k, p, seed = 37, 16, 0.3, 123456789
    x = torch.rand(m, k, device=device) + 0.5  # strictly positive: a dropped entry is exactly 0
    w = torch.randn(k, k, device=device)
    a, b = _identity_adapter(k, device)
    y = peft_kernels.lora_linear(x, w, a, b, scaling=1.0, dropout_p=p, seed=seed, backend=backend)
    kept = (y - x @ w.T).abs() > 1e-3
    assert torch.equal(kept.cpu(), dropout_keep_mask(seed, p, m, k))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_uses_the_forward_mask(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    m, k, p, seed = 29, 16, 0.4, 99
    x = (torch.rand(m, k, device=device) + 0.5).requires_grad_()
    w = torch.randn(k, k, device=device)
    a, b = _identity_adapter(k, device)
    dy = torch.rand(m, k, device=device) + 0.5
    peft_kernels.lora_linear(x, w, a, b, scaling=1.0, dropout_p=p, seed=seed, backend=backend).backward(dy)
    lora_part = x.grad - dy @ w  # = mask * dy / (1 - p)
    kept = lora_part.abs() > 1e-3
    assert torch.equal(kept.cpu(), dropout_keep_mask(seed, p, m, k))
    assert torch.allclose(lora_part[kept], (dy / (1 - p))[kept], rtol=1e-5, atol=1e-5)


def test_mask_rate_and_row_independence():
    p, rows, cols = 0.05, 2000, 1000
    keep = dropout_keep_mask(2024, p, rows, cols)
    rate = 1 - keep.double().mean().item()
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(rate - p) < 5 * sigma
    # Per-row drop counts must vary like Binomial(cols, p), not be identical across rows.
    per_row = (~keep).sum(1).double()
    assert abs(per_row.var().item() / (cols * p * (1 - p)) - 1) < 0.2
    # Different seeds give (nearly) uncorrelated masks.
    other = dropout_keep_mask(2025, p, rows, cols)
    both_dropped = ((~keep) & (~other)).double().mean().item()
    assert abs(both_dropped - p * p) < 5 * (p * p / keep.numel()) ** 0.5


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**62 - 1, -3])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.999])
def test_cpu_mask_equals_the_int32_torch_mask(seed, p):
    """The CPU path (numpy uint32) and the torch int32 path (any device) are one function."""
    from peft_kernels.reference.rng import _keep_mask_numpy, _keep_mask_torch
    for rows, cols in ((1, 1), (37, 53), (70000, 3)):  # rows past 2**16: the row key's high bits
        assert torch.equal(_keep_mask_numpy(seed, p, rows, cols), _keep_mask_torch(seed, p, rows, cols, "cpu"))


def test_large_seeds_and_rows_use_all_bits():
    a = dropout_keep_mask(1, 0.5, 4, 64)
    b = dropout_keep_mask(1 + 2**32, 0.5, 4, 64)  # differs only in the seed's high word
    assert not torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_same_seed_same_result_and_seed_none_follows_manual_seed(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, w = torch.randn(11, 24, device=device), torch.randn(13, 24, device=device)
    a, b = torch.randn(4, 24, device=device), torch.randn(13, 4, device=device)
    run = lambda seed: peft_kernels.lora_linear(x, w, a, b, dropout_p=0.5, seed=seed, backend=backend)  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    torch.manual_seed(3)
    first = run(None)
    torch.manual_seed(3)
    assert torch.equal(first, run(None))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cls", ["LoRALinear", "DoRALinear"])
def test_checkpoint_recomputation_gives_identical_grads(backend, cls, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    layer = getattr(peft_kernels.nn, cls)(24, 19, r=4, alpha=8, dropout=0.3, backend=backend).to(device)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 24, device=device)

    def grads(use_checkpoint):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(11)
        y = torch.utils.checkpoint.checkpoint(layer, xi, use_reentrant=False) if use_checkpoint else layer(xi)
        y.pow(2).sum().backward()
        return [xi.grad] + [p.grad for p in layer.parameters() if p.requires_grad]

    plain, recomputed = grads(False), grads(True)
    for g0, g1 in zip(plain, recomputed):
        if device.type == "cpu":
            assert torch.equal(g0, g1)
        else:  # fp32 atomics may reorder the split reductions on the GPU
            assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-6)
