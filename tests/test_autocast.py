"""torch.autocast: every op computes as F.linear does under autocast — x, a dense weight and the
bias in the autocast dtype, the output in it, gradients back in each leaf's own dtype. The oracle
is the same op called without autocast on inputs cast by hand: it must agree bit for bit (on a
GPU up to the order of atomic adds).
(Before, the reference backend crashed in backward on mixed dtypes, DoRA ran in fp32, and the
Triton kernels ran every product in fp32: a silent slow path under mixed-precision training.)"""
import pytest
import torch

import peft_kernels
from peft_kernels.quant import Int4Weight, NF4Weight

from helpers import FLOOR, make_inputs, rel_err


def _autocast_dtype(backend):
    # The interpreter's bf16 tl.dot is wrong (see conftest); fp16 autocast exercises the same path.
    return torch.bfloat16 if backend == "torch" or torch.cuda.is_available() else torch.float16


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _case(op, backend, device, dt):
    """(fn(x, w, a, b, bias) -> y, weight object) for one op; w is dense or quantized."""
    torch.manual_seed(0)
    x, w, a, b, bias = make_inputs((2, 5), 64, 24, 4, torch.float32, device)
    kw = dict(backend=backend)
    if op == "lora":
        return lambda x, w, a, b, bias: peft_kernels.lora_linear(x, w, a, b, bias, scaling=2.0, dropout_p=0.1,
                                                                 seed=7, **kw), (x, w, a, b, bias)
    if op == "dora":
        m = torch.rand(24, device=device) + 0.5
        return lambda x, w, a, b, bias: peft_kernels.dora_linear(x, w, a, b, m, bias, scaling=2.0, dropout_p=0.1,
                                                                 seed=7, **kw), (x, w, a, b, bias)
    if op in ("qlora", "qlora-int4"):
        q = NF4Weight.from_float(w) if op == "qlora" else Int4Weight.from_float(w, group_size=32)
        return lambda x, w, a, b, bias: peft_kernels.qlora_linear(x, q, a, b, bias, scaling=2.0, dropout_p=0.1,
                                                                  seed=7, **kw), (x, None, a, b, bias)
    if op == "quant":
        q = NF4Weight.from_float(w)
        return lambda x, w, a, b, bias: peft_kernels.quant_linear(x, q, bias, **kw), (x, None, None, None, bias)
    assert op == "sparse"
    index = torch.sort(torch.randperm(24 * 64)[:50]).values.to(torch.int32).to(device)
    values = torch.randn(50, device=device)
    return lambda x, w, a, b, bias: peft_kernels.sparse_delta_linear(
        x, w.detach(), values if a is None else a, index, bias, **kw), (x, w, values, None, bias)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["lora", "dora", "qlora", "qlora-int4", "quant", "sparse"])
def test_autocast_equals_explicit_casts(op, backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    dt = _autocast_dtype(backend)
    fn, inputs = _case(op, backend, device, dt)
    leaves = _leaves(*inputs)
    x, w, a, b, bias = leaves
    if op == "sparse":
        w.requires_grad_(False)  # the frozen base of a sparse delta; ``a`` holds the trainable values
    with torch.autocast(device.type, dtype=dt):
        y = fn(x, w, a, b, bias)
    assert y.dtype == dt
    gy = torch.randn_like(y)
    y.backward(gy)
    got = [y.detach()] + [t.grad for t in leaves if t is not None and t.requires_grad]

    ref_leaves = _leaves(*inputs)
    rx, rw, ra, rb, rbias = ref_leaves
    if op == "sparse":
        rw.requires_grad_(False)
    cast = lambda t: t.to(dt) if t is not None else None  # noqa: E731  (by hand: x, dense weight, bias)
    y_ref = fn(cast(rx), cast(rw) if op != "sparse" else rw.to(dt), ra, rb, cast(rbias))
    y_ref.backward(gy)
    want = [y_ref.detach()] + [t.grad for t in ref_leaves if t is not None and t.requires_grad]
    assert len(got) == len(want) >= 3
    for i, (g, e) in enumerate(zip(got, want)):
        assert g.dtype == e.dtype, i
        if device.type == "cuda":  # split reductions add with atomics: the order, so the last bits, vary
            assert rel_err(g, e) <= FLOOR[dt] / 4, i
        else:
            assert torch.equal(g, e), i
    assert all(t.grad.dtype == torch.float32 for t in leaves if t is not None and t.requires_grad)


def test_modules_under_autocast_train():
    """The modules apply_lora / apply_sparse make train under autocast (the reference backward
    crashed on mixed dtypes) and compute in the autocast dtype."""
    torch.manual_seed(0)
    for quantize, dora in ((None, False), (None, True), ("nf4", False), ("int8", True)):
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        peft_kernels.apply_lora(model, ["0"], r=4, dropout=0.1, quantize=quantize, use_dora=dora)
        x = torch.randn(5, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model[0](x)
            loss = model[2](model[1](h)).float().square().mean()
        loss.backward()
        assert h.dtype == torch.bfloat16 and model[0].lora_A.grad.dtype == torch.float32
    model = peft_kernels.apply_sparse(torch.nn.Sequential(torch.nn.Linear(64, 8)), ["0"], density=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(5, 64))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and model[0].delta_values.grad.dtype == torch.float32
