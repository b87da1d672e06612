"""lora_linear on every backend of this tier against a float64 autograd oracle."""
import pytest
import torch

import peft_kernels
from peft_kernels import backends
from peft_kernels.triton import lora as triton_lora

from helpers import assert_close_to_oracle, make_inputs, rel_err

BACKENDS = ["torch", "triton"]


def _fn(backend, scaling, p, seed):
    return lambda x, w, a, b, bias: peft_kernels.lora_linear(
        x, w, a, b, bias, scaling=scaling, dropout_p=p, seed=seed, backend=backend)


def _check(backend, device, dtype, lead, k, n, r, bias=True, p=0.0, scaling=0.7, train_base=False, seed=1234):
    x, w, a, b, bias_t = make_inputs(lead, k, n, r, dtype, device, bias)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    if train_base:
        w.requires_grad_(True)
        if bias_t is not None:
            bias_t.requires_grad_(True)
    grad_out = torch.randn(*lead, n, device=device).to(dtype)
    assert_close_to_oracle(_fn(backend, scaling, p, seed), [x, w, a, b, bias_t], scaling, p, seed, grad_out)
    assert backends.last_used("lora_linear") == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_oracle_odd_shape(backend, dtype, p, bias, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    _check(backend, device, dtype, (3, 7), 37, 53, 5, bias=bias, p=p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_weight_and_bias_grads_when_trainable(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    _check(backend, device, torch.float32, (2, 9), 21, 19, 3, p=0.2, train_base=True)


def test_reference_in_float64_matches_oracle():
    _check("torch", torch.device("cpu"), torch.float64, (4, 5), 13, 11, 2, p=0.25)


@pytest.mark.parametrize("r", [1, 16, 17, 40, 129])
def test_triton_ranks(r, kernel_device):
    _check("triton", kernel_device, torch.float32, (9,), 33, 35, r, p=0.1)


@pytest.mark.parametrize("sms", [1, 256])
def test_triton_split_and_unsplit_reductions(sms, kernel_device):
    """sms=1: every reduction in one program (plain stores); sms=256: every reduction split
    across programs (fp32 atomics) — with tiles small enough that every loop runs several
    iterations and ends on a partial tile."""
    tiles = dict(down_bm=16, down_bk=16, up_bm=16, up_bn=16, dy_bm=16, dy_bn=16, dx_bm=16, dx_bk=16)
    with triton_lora.launch_override(sms=sms, **tiles):
        _check("triton", kernel_device, torch.float32, (45,), 71, 39, 6, p=0.3)
        _check("triton", kernel_device, torch.float16, (45,), 71, 39, 6, p=0.0)


@pytest.mark.parametrize("lead,k,n,r,p,bias", [((1,), 37, 53, 5, 0.3, True),   # one row (decode)
                                               ((3, 7), 37, 53, 5, 0.0, False),
                                               ((64,), 71, 39, 17, 0.2, True),  # BM = 64, r padded to 32
                                               ((5, 40), 37, 23, 5, 0.1, True),  # 200 rows: BM = 256, 8 warps
                                               ((9,), 16, 16, 1, 0.5, False)])  # K, N exactly one tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_triton_single_launch_forward(lead, k, n, r, p, bias, dtype, split, kernel_device):
    """The small-M forward in one launch (x@W^T, u and the up-projection in one kernel), with
    16-wide tiles so N spans several programs (only the first writes u) and K several partial
    iterations; its u feeds the usual backward kernels. split > 1: K reduced in that many ranges
    (uneven ones for K = 37 and 71; K = 16 has one range), the last program of each tile summing
    the partials of x@W^T and u."""
    from unittest import mock
    with triton_lora.launch_override(fused_max_m=256, fused_bn=16, fused_bk=16, fused_split=split), \
            mock.patch.object(triton_lora, "fused_forward", wraps=triton_lora.fused_forward) as fused:
        _check("triton", kernel_device, dtype, lead, k, n, r, bias=bias, p=p)
    assert fused.call_count >= 1


def test_triton_single_launch_forward_split_is_deterministic_and_close_to_unsplit(kernel_device):
    """Split K: the same bits on every call, and (fp32) within rounding of the one-range result."""
    torch.manual_seed(0)
    x, w = torch.randn(9, 100, device=kernel_device), torch.randn(23, 100, device=kernel_device)
    a, b, bias = (torch.randn(5, 100, device=kernel_device), torch.randn(23, 5, device=kernel_device),
                  torch.randn(23, device=kernel_device))
    seed = torch.tensor([7], dtype=torch.int64, device=kernel_device)
    outs = {}
    for split in (1, 4):
        with triton_lora.launch_override(fused_bn=16, fused_bk=16, fused_split=split):
            runs = [triton_lora.fused_forward(x, w, a, b, bias, 1.5, 0.2, seed) for _ in range(2)]
        assert all(torch.equal(r0, r1) for r0, r1 in zip(*runs))
        outs[split] = runs[0]
    for one, four in zip(outs[1], outs[4]):
        assert torch.allclose(one, four, rtol=1e-5, atol=1e-5) and not torch.equal(one, torch.zeros_like(one))


@pytest.mark.parametrize("lead,k,n,r,p,bias", [((1,), 37, 53, 5, 0.3, True),   # 3 programs, 4 dB chunks (wraps)
                                               ((3, 7), 71, 39, 5, 0.0, False),  # 5 programs, 3 dB chunks
                                               ((64,), 71, 39, 17, 0.2, True),  # BM = 64, r padded to 32
                                               ((5, 40), 37, 23, 5, 0.1, True),  # 200 rows: BM = 256, 8 warps
                                               ((9,), 16, 16, 1, 0.5, False)])  # K, N exactly one tile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fused_forward", [False, True])
def test_triton_single_launch_backward(lead, k, n, r, p, bias, dtype, fused_forward, kernel_device):
    """The small-M backward in one launch (dY@W, v, dB, dA and the masked adapter part of dX in one
    kernel), 16-wide tiles so several programs split dX's columns and share out dB's row chunks,
    after either forward; every gradient against the float64 oracle."""
    from unittest import mock
    forward = dict(fused_max_m=256, fused_bn=16, fused_bk=16) if fused_forward else {}
    with triton_lora.launch_override(fused_bwd_max_m=256, fused_bwd_bn=16, fused_bwd_bk=16, **forward), \
            mock.patch.object(triton_lora, "fused_backward", wraps=triton_lora.fused_backward) as fused:
        _check("triton", kernel_device, dtype, lead, k, n, r, bias=bias, p=p)
    assert fused.call_count >= 1


def test_triton_single_launch_backward_only_with_dx_and_small_m():
    limit = triton_lora.FUSED_LIMIT
    with triton_lora.launch_override(fused_bwd_max_m=10**6):
        assert triton_lora.use_fused_backward(limit, 16, True)
        assert not triton_lora.use_fused_backward(limit + 1, 16, True)
        assert not triton_lora.use_fused_backward(16, 16, False)  # no dx wanted: W need not be read
        # the [rows, rank] accumulators bound rows x rank: r=256 only up to 64 rows
        assert triton_lora.use_fused_backward(64, 256, True) and not triton_lora.use_fused_backward(65, 256, True)
    assert not triton_lora.use_fused_backward(16, 16, True)  # off by default until timed


def test_triton_single_launch_forward_off_above_its_limit():
    limit = triton_lora.FUSED_LIMIT
    with triton_lora.launch_override(fused_max_m=10**6):
        assert triton_lora.use_fused_forward(limit, 64) and not triton_lora.use_fused_forward(limit + 1, 64)
        assert not triton_lora.use_fused_forward(limit, 65)  # padded to 128: rows x rank too large
        assert not triton_lora.use_fused_forward(0, 16)
    assert not triton_lora.use_fused_forward(16, 16)  # off by default until timed


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    k, n, r = 29, 23, 4
    x = torch.randn(k, 2, 11, device=device).permute(1, 2, 0)  # [2, 11, k], not contiguous
    w = torch.randn(k, n, device=device).t() / k**0.5  # [n, k], transposed storage
    a = torch.randn(k, r, device=device).t()
    b = torch.randn(r, n, device=device).t()
    assert not (x.is_contiguous() or w.is_contiguous() or a.is_contiguous() or b.is_contiguous())
    for t in (x, a, b):
        t.requires_grad_(True)
    grad_out = torch.randn(2, 11, n, device=device)
    assert_close_to_oracle(_fn(backend, 1.5, 0.2, 7), [x, w, a, b, None], 1.5, 0.2, 7, grad_out)
    if backend == "triton":  # the single-launch forward and backward read the same strides
        with triton_lora.launch_override(fused_max_m=256, fused_bn=16, fused_bk=16, fused_bwd_max_m=256,
                                         fused_bwd_bn=16, fused_bwd_bk=16):
            assert_close_to_oracle(_fn(backend, 1.5, 0.2, 7), [x, w, a, b, None], 1.5, 0.2, 7, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["lora", "dora", "qlora nf4", "qlora int8", "quant_linear nf4", "dora nf4"])
def test_strided_bias_every_linear_op(backend, op, kernel_device):
    """A bias that is a strided view (every other entry of a larger tensor) gives the result of its
    contiguous copy, and its gradient reaches the view. (The Triton kernels read bias[n] at
    bias_ptr + n: they once read the wrong entries of such a view, silently.)"""
    from peft_kernels.quant import Int8Weight, NF4Weight
    device = kernel_device if backend == "triton" else torch.device("cpu")
    torch.manual_seed(5)
    k, n, r = 64, 23, 3
    x, w = torch.randn(7, k, device=device), torch.randn(n, k, device=device) / 8
    a, b, m = torch.randn(r, k, device=device) / 8, torch.randn(n, r, device=device), torch.rand(n, device=device) + 1
    base = w
    if op.endswith("nf4"):
        base = NF4Weight.from_float(w.cpu(), blocksize=64).to(device)
    elif op.endswith("int8"):
        base = Int8Weight.from_float(w.cpu()).to(device)
    kw = dict(scaling=0.5, dropout_p=0.2, seed=3, backend=backend)
    call = {"lora": lambda bias: peft_kernels.lora_linear(x, base, a, b, bias, **kw),
            "dora": lambda bias: peft_kernels.dora_linear(x, base, a, b, m, bias, **kw),
            "qlora": lambda bias: peft_kernels.qlora_linear(x, base, a, b, bias, **kw),
            "quant_linear": lambda bias: peft_kernels.quant_linear(x, base, bias, backend=backend)}[op.split()[0]]
    big = torch.randn(2 * n, device=device, requires_grad=True)
    strided = big[::2]
    assert not strided.is_contiguous()
    y = call(strided)
    want = call(strided.detach().contiguous())
    assert torch.allclose(y, want, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(big.grad[::2], g.sum(0), rtol=1e-5, atol=1e-5) and not big.grad[1::2].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_output(backend, kernel_device):
    """y.sum().backward() hands backward a stride-0 gradient."""
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, w, a, b, bias = make_inputs((6,), 17, 9, 3, torch.float32, device)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    xs = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    from helpers import eager_lora
    eager_lora(xs[0], w, xs[1], xs[2], bias, 2.0, 0.1, 5).sum().backward()
    fused = [{}] if backend == "torch" else [{}, dict(fused_max_m=256, fused_bwd_max_m=256, fused_bwd_bn=16,
                                                         fused_bwd_bk=16)]
    for override in fused:  # triton: the tiled and the single-launch kernels
        x.grad = a.grad = b.grad = None
        with triton_lora.launch_override(**override):
            y = peft_kernels.lora_linear(x, w, a, b, bias, scaling=2.0, dropout_p=0.1, seed=5, backend=backend)
            y.sum().backward()
        for got, want in zip((x.grad, a.grad, b.grad), (t.grad for t in xs)):
            assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_dtype_differs_from_x(backend, kernel_device):
    """fp32 adapters on an fp16 base (PEFT's default upcast): grads come back in fp32."""
    device = kernel_device if backend == "triton" else torch.device("cpu")
    x, w, a, b, _ = make_inputs((5,), 24, 20, 4, torch.float16, device)
    a = a.float().requires_grad_()
    b = b.float().requires_grad_()
    y = peft_kernels.lora_linear(x, w, a, b, scaling=1.0, backend=backend)
    y.float().sum().backward()
    assert y.dtype == torch.float16 and a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_empty_batch(kernel_device):
    for backend in BACKENDS:
        device = kernel_device if backend == "triton" else torch.device("cpu")
        x, w, a, b, bias = make_inputs((0,), 8, 6, 2, torch.float32, device)
        a.requires_grad_(True)
        for p in (0.0, 0.5):
            a.grad = None
            y = peft_kernels.lora_linear(x, w, a, b, bias, dropout_p=p, backend=backend)
            y.sum().backward()
            assert y.shape == (0, 6) and a.grad.shape == a.shape and (a.grad == 0).all()


def test_eval_mode_disables_dropout(kernel_device):
    x, w, a, b, bias = make_inputs((7,), 19, 13, 3, torch.float32, kernel_device)
    y_eval = peft_kernels.lora_linear(x, w, a, b, bias, scaling=1.0, dropout_p=0.5, training=False, seed=1,
                                      backend="triton")
    y_nodrop = peft_kernels.lora_linear(x, w, a, b, bias, scaling=1.0, dropout_p=0.0, backend="triton")
    assert torch.equal(y_eval, y_nodrop)


def _second_derivative(call, x, params):
    """d/d(params) of |d loss / dx|^2: a second derivative through the op (create_graph=True)."""
    y = call()
    (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    return torch.autograd.grad(gx.square().sum(), params)


def test_second_derivatives_on_the_torch_backend_and_refused_elsewhere(kernel_device):
    """create_graph=True (Hessian-vector products, gradient penalties): the torch backend of the
    dense LoRA / DoRA ops differentiates its own backward exactly (float64 against the formula);
    every other backend and op refuses, by name — their kernels and windowed products would give
    a second derivative missing terms, silently."""
    from peft_kernels.quant import NF4Weight
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(5, 16, **f64, requires_grad=True)
    w = torch.randn(12, 16, **f64)
    a = torch.randn(3, 16, **f64, requires_grad=True)
    b = torch.randn(12, 3, **f64, requires_grad=True)
    mag = (torch.rand(12, **f64) + 0.5).requires_grad_()

    def dora_formula():
        merged = w + 0.5 * b @ a
        return (x @ merged.T) * (mag / merged.norm(dim=1).detach())

    cases = [
        (lambda: peft_kernels.lora_linear(x, w, a, b, scaling=0.5, backend="torch"),
         lambda: x @ w.T + 0.5 * (x @ a.T) @ b.T, [a, b]),
        (lambda: peft_kernels.lora_delta(x, a, b, scaling=0.5, backend="torch"),
         lambda: 0.5 * (x @ a.T) @ b.T, [a, b]),
        (lambda: peft_kernels.dora_linear(x, w, a, b, mag, scaling=0.5, backend="torch"), dora_formula, [a, b, mag]),
    ]
    for ours, formula, params in cases:
        for got, want in zip(_second_derivative(ours, x, params), _second_derivative(formula, x, params)):
            assert rel_err(got, want) < 1e-12

    dev = dict(device=kernel_device)
    xk = torch.randn(5, 64, **dev, requires_grad=True)
    ak, bk = torch.randn(3, 64, **dev, requires_grad=True), torch.randn(12, 3, **dev, requires_grad=True)
    q = NF4Weight.from_float(torch.randn(12, 64, **dev))
    refused = [
        (lambda: peft_kernels.lora_linear(xk, torch.randn(12, 64, **dev), ak, bk, backend="triton"), "lora_linear",
         "'triton' backend; lora_linear, lora_delta and dora_linear"),
        (lambda: peft_kernels.qlora_linear(xk, q, ak, bk, backend="torch"), "qlora_linear", "'torch' backend"),
        (lambda: peft_kernels.quant_linear(xk, q, backend="torch"), "quant_linear", "'torch' backend"),
        (lambda: peft_kernels.sparse_delta_linear(xk, torch.randn(12, 64, **dev), torch.randn(4, **dev,
                                                  requires_grad=True), torch.tensor([1, 7, 30, 99], **dev,
                                                  dtype=torch.int32), backend="torch"), "sparse_delta",
         "'torch' backend"),
    ]
    for call, op, message in refused:
        with pytest.raises(RuntimeError, match=rf"{op}: a second derivative .* not supported by its {message}"):
            _second_derivative(call, xk, [xk])
        call().sum().backward()  # a first derivative is fine
