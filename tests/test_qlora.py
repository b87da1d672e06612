"""quant_linear / qlora_linear over NF4/FP4 (and INT8/INT4) weights: both backends against a
float64 oracle on the dequantized weight; the 4-bit matmul kernel's tiling; modules; registration;
errors."""
import pytest
import torch

import peft_kernels
from peft_kernels.nn import QLoRALinear
from peft_kernels.quant import FP4Weight, Int4Weight, Int8Weight, NF4Weight
from peft_kernels.reference.lora import dropped
from peft_kernels.triton import lora, quant_matmul as qm
from peft_kernels.triton.quant_matmul import matmul_4bit

from helpers import FLOOR, assert_close_to_oracle, make_inputs, rel_err

BACKENDS = ["torch", "triton"]
FORMATS = {"nf4": NF4Weight, "fp4": FP4Weight}


def _device(backend, kernel_device):
    return kernel_device if backend == "triton" else torch.device("cpu")


def _assert_qlora_matches_dequantized(q, w_deq, x, a, b, bias, p, backend):
    """qlora_linear over ``q`` against the float64 oracle on ``w_deq``, exactly what the quantized
    weight decodes to: outputs and gradients of x, A and B."""
    for t in (x, a, b):
        t.requires_grad_(True)
    fn = lambda x, w, a, b, bias: peft_kernels.qlora_linear(  # noqa: E731
        x, q, a, b, bias, scaling=0.7, dropout_p=p, seed=11, backend=backend)
    grad_out = torch.randn(*x.shape[:-1], w_deq.shape[0], device=x.device).to(x.dtype)
    assert_close_to_oracle(fn, [x, w_deq, a, b, bias], 0.7, p, 11, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_qlora_matches_oracle(backend, dtype, fmt, nested, p, kernel_device):
    device = _device(backend, kernel_device)
    x, w, a, b, bias = make_inputs((3, 7), 37, 53, 5, dtype, device)
    q = FORMATS[fmt].from_float(w, blocksize=32, double_quant=nested)
    _assert_qlora_matches_dequantized(q, q.dequantize(), x, a, b, bias, p, backend)


@pytest.mark.parametrize("fmt,nested", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reference_decodes_4bit_weights_by_windows(fmt, nested, p, monkeypatch):
    """The torch backend (the CPU path) never decodes more than WINDOW_ELEMENTS weights at once —
    windows of whole rows, a partial last one, forward and backward — and matches the oracle on
    the dequantized weight; quant_linear and dora_linear over 4 bits too."""
    from peft_kernels.quant import bnb4bit
    from peft_kernels.reference import quant as ref_quant
    monkeypatch.setattr(ref_quant, "WINDOW_ELEMENTS", 20 * 37)  # 20 rows of W [53, 37] a window
    windows = []
    decode = bnb4bit.decode_flat_parts

    def counting(*args):
        out = decode(*args)
        windows.append(out.numel())
        return out
    monkeypatch.setattr(ref_quant, "decode_flat_parts", counting)
    x, w, a, b, bias = make_inputs((3, 7), 37, 53, 5, torch.float32, "cpu")
    q = FORMATS[fmt].from_float(w, blocksize=32, double_quant=nested)
    _assert_qlora_matches_dequantized(q, q.dequantize(), x, a, b, bias, p, "torch")
    # rows 20 + 20 + 13, forward then backward (dX sums the windows' dY[:, rows] W[rows])
    assert windows == [20 * 37, 20 * 37, 13 * 37] * 2
    y = peft_kernels.quant_linear(x, q, bias, backend="torch")
    assert rel_err(y, x.double() @ q.dequantize().double().T + bias.double()) <= FLOOR[torch.float32]
    m = torch.rand(53) + 0.5
    y = peft_kernels.dora_linear(x, q, a, b, m, bias, scaling=0.7, dropout_p=p, seed=3, backend="torch")
    want = peft_kernels.dora_linear(x, q.dequantize(), a, b, m, bias, scaling=0.7, dropout_p=p, seed=3,
                                    backend="torch")
    assert rel_err(y, want) <= FLOOR[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_qlora_over_int_bases_matches_oracle(backend, dtype, fmt, p, kernel_device, monkeypatch):
    """INT8/INT4 bases: the adapter kernels (triton) or the reference (torch) with the base by
    windows of decoded weight — several windows, a partial last one — into the epilogue input."""
    from peft_kernels.reference import intq
    monkeypatch.setattr(intq, "WINDOW_ELEMENTS", 20 * 32)  # 20 rows / 32 columns of W per window
    device = _device(backend, kernel_device)
    x, w, a, b, bias = make_inputs((3, 7), 64, 53, 5, dtype, device)
    q = Int8Weight.from_float(w) if fmt == "int8" else Int4Weight.from_float(w, group_size=32)
    _assert_qlora_matches_dequantized(q, q.dequantize(dtype), x, a, b, bias, p, backend)
    assert peft_kernels.backends.last_used("qlora_linear_int") == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int_qlora_opcheck(backend, fmt, kernel_device):
    device = _device(backend, kernel_device)
    w = torch.randn(12, 32, device=device)
    q = Int8Weight.from_float(w) if fmt == "int8" else Int4Weight.from_float(w, group_size=32)
    group = 32 if fmt == "int4" else 0
    x, a, b = torch.randn(6, 32, device=device), torch.randn(3, 32, device=device), torch.randn(12, 3, device=device)
    seed = torch.tensor([5], device=device)
    ops = torch.ops.peft_kernels
    args = (x, q.tensors(), fmt, group, [12, 32], a, b, torch.randn(12, device=device), 0.5, 0.2, seed, backend)
    torch.library.opcheck(ops.intq_lora_fwd.default, args)
    _, u = ops.intq_lora_fwd(*args)
    torch.library.opcheck(ops.intq_lora_bwd.default, (torch.randn(6, 12, device=device), x, q.tensors(), fmt, group,
                                                      [12, 32], a, b, u, 0.5, 0.2, seed, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quant_linear_matches_dequantized(backend, dtype, kernel_device):
    device = _device(backend, kernel_device)
    w = torch.randn(29, 50, device=device) * 0.1
    q = NF4Weight.from_float(w.to(dtype), blocksize=64)
    x = torch.randn(2, 9, 50, device=device).to(dtype).requires_grad_()
    bias = torch.randn(29, device=device).to(dtype).requires_grad_()
    y = peft_kernels.quant_linear(x, q, bias, backend=backend)
    g = torch.randn_like(y)
    y.backward(g)
    w64 = q.dequantize(torch.float64)
    ref = x.double() @ w64.T + bias.double()
    assert y.shape == (2, 9, 29) and y.dtype == dtype
    assert rel_err(y, ref) <= FLOOR[dtype]
    assert rel_err(x.grad, g.double() @ w64) <= FLOOR[dtype]
    assert torch.allclose(bias.grad.double(), g.double().sum((0, 1)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("nested", [False, True])
def test_matmul_4bit_tiling(transpose, nested, kernel_device):
    """Tiles smaller than the problem: several programs, several reduction steps, partial
    edge tiles on every side, grouped program order, with and without an epilogue input."""
    N, K, M = 45, 71, 37
    q = NF4Weight.from_float(torch.randn(N, K, device=kernel_device) * 0.1, blocksize=64, double_quant=nested)
    a = torch.randn(M, N if transpose else K, device=kernel_device)
    c = torch.randn(M, K if transpose else N, device=kernel_device)
    w64 = q.dequantize(torch.float64)
    ref = a.double() @ (w64 if transpose else w64.T) + c.double()
    out = matmul_4bit(a, *q.parts(), c=c.clone(), transpose=transpose, tiles=(16, 16, 16, 4, 1))
    assert rel_err(out, ref) <= FLOOR[torch.float32]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("epilogue", ["none", "c", "bias", "c+bias"])
@pytest.mark.parametrize("K", [71, 192])
def test_matmul_4bit_chunked(transpose, epilogue, K, kernel_device, monkeypatch):
    """The large-M path: windows of the weight decoded into a workspace and multiplied by the
    BLAS, several windows with a partial last one, writing column slices of the output. K=71
    takes the any-shape decoder, K=192 the block-aligned one."""
    monkeypatch.setattr(qm, "WINDOW_ALIGN", 16 if K == 71 else 64)
    monkeypatch.setattr(qm, "CHUNK_ELEMENTS", 16 * 80 if K == 71 else 64 * 50)
    N, M = 45, 37
    q = NF4Weight.from_float(torch.randn(N, K, device=kernel_device) * 0.1, blocksize=64, double_quant=True)
    a = torch.randn(M, N if transpose else K, device=kernel_device)
    P = K if transpose else N
    c = torch.randn(M, P, device=kernel_device) if "c" in epilogue else None
    bias = torch.randn(P, device=kernel_device) if "bias" in epilogue else None
    w64 = q.dequantize(torch.float64)
    ref = a.double() @ (w64 if transpose else w64.T)
    ref = ref + (c.double() if c is not None else 0) + (bias.double() if bias is not None else 0)
    out = qm.matmul_4bit(a, *q.parts(), c=None if c is None else c.clone(), bias=bias, transpose=transpose,
                         path="chunked")
    assert rel_err(out, ref) <= FLOOR[torch.float32]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("epilogue", ["none", "c+bias"])
@pytest.mark.parametrize("nb", [1, 2, 4])
def test_matmul_4bit_fused_aligned(transpose, nested, epilogue, nb, kernel_device):
    """The block-aligned fused candidate: partial tiles on every side (M=37, N=45 rows of W, and
    for the backward reduction a partial last step), blocksize 64 with in = 192; forward with 2
    blocks per reduction step leaves a partial last step (3 blocks a row)."""
    N, K, M = 45, 192, 37
    q = NF4Weight.from_float(torch.randn(N, K, device=kernel_device) * 0.1, blocksize=64, double_quant=nested)
    a = torch.randn(M, N if transpose else K, device=kernel_device)
    P = K if transpose else N
    c = torch.randn(M, P, device=kernel_device) if epilogue != "none" else None
    bias = torch.randn(P, device=kernel_device) if epilogue != "none" else None
    w64 = q.dequantize(torch.float64)
    ref = a.double() @ (w64 if transpose else w64.T)
    ref = ref + (c.double() + bias.double() if c is not None else 0)
    out = qm.matmul_4bit(a, *q.parts(), c=None if c is None else c.clone(), bias=bias, transpose=transpose,
                         path="fused_aligned", tiles=(16, 16, nb, 4))
    assert rel_err(out, ref) <= FLOOR[torch.float32]
    with pytest.raises(ValueError, match="fused_aligned"):
        q2 = NF4Weight.from_float(torch.randn(8, 40, device=kernel_device), blocksize=64)
        qm.matmul_4bit(torch.randn(3, 40, device=kernel_device), *q2.parts(), path="fused_aligned")


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("K,nb,per_sm,splits", [(192, 1, 8, 3), (192, 1, 4, 2), (192, 2, 8, 2), (448, 2, 4, 2),
                                                (448, 1, 1, 1), (448, 4, 64, 2), (192, 4, 8, 1)])
def test_matmul_4bit_splitk(nested, K, nb, per_sm, splits, kernel_device, monkeypatch):
    """The split-K forward: partial tiles on every side (M = 37, N = 45), the reduction split into
    `splits` ranges (uneven ones, a partial last step when 2 blocks a step meet 3 or 7 blocks a
    row), the epilogue (c and bias) written once per tile by the last program; one range is the
    fused_aligned product bit for bit."""
    monkeypatch.setattr(lora, "_OVERRIDE", {"sms": 4})
    N, M = 45, 37
    q = NF4Weight.from_float(torch.randn(N, K, device=kernel_device) * 0.1, blocksize=64, double_quant=nested)
    a = torch.randn(M, K, device=kernel_device)
    c, bias = torch.randn(M, N, device=kernel_device), torch.randn(N, device=kernel_device)
    tiles = (16, 16, nb, 4, per_sm)
    assert qm.splitk_plan(M, N, K, 64, tiles, 4)[3] == splits
    w64 = q.dequantize(torch.float64)
    ref = a.double() @ w64.T + c.double() + bias.double()
    out = qm.matmul_4bit(a, *q.parts(), c=c.clone(), bias=bias, path="splitk", tiles=tiles)
    assert rel_err(out, ref) <= FLOOR[torch.float32]
    plain = qm.matmul_4bit(a, *q.parts(), path="splitk", tiles=tiles)
    assert rel_err(plain, a.double() @ w64.T) <= FLOOR[torch.float32]
    if splits == 1:
        aligned = qm.matmul_4bit(a, *q.parts(), c=c.clone(), bias=bias, path="fused_aligned", tiles=(16, 16, nb, 4))
        assert torch.equal(out, aligned)
    # x = rows of I (fp32, one nonzero product per sum; the other ranges add exact zeros): the decoded
    # weight's columns, about 40 of them spread over every block and split range (and the last)
    cols = torch.cat([torch.arange(0, K, K // 37), torch.tensor([K - 1])]).to(kernel_device)
    eye = torch.eye(K, device=kernel_device)[cols]
    assert torch.equal(qm.matmul_4bit(eye, *q.parts(), path="splitk", tiles=tiles), q.dequantize().T[cols])


def test_matmul_4bit_splitk_refuses_what_it_cannot_do(kernel_device):
    q = NF4Weight.from_float(torch.randn(8, 96, device=kernel_device), blocksize=64)
    with pytest.raises(ValueError, match="splitk"):
        qm.matmul_4bit(torch.randn(3, 96, device=kernel_device), *q.parts(), path="splitk")
    q = NF4Weight.from_float(torch.randn(8, 128, device=kernel_device), blocksize=64)
    with pytest.raises(ValueError, match="splitk"):
        qm.matmul_4bit(torch.randn(3, 8, device=kernel_device), *q.parts(), transpose=True, path="splitk")


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("case", ["any-shape", "block-aligned", "aligned-last-partial"])
@pytest.mark.parametrize("tiles", [None, (16, 3, 4)])  # 3 blocks per program: a partly empty last group
def test_dequantize_window_is_exact(nested, case, tiles, kernel_device):
    """The workspace decoders (any shape; block-aligned, one scale per row and block) give
    dequantize()'s values bit for bit, for interior windows."""
    shape, window = {"any-shape": ((37, 83), (5, 20, 11, 50)),
                     "block-aligned": ((37, 256), (5, 20, 64, 128)),
                     "aligned-last-partial": ((37, 256), (3, 33, 128, 128))}[case]
    q = NF4Weight.from_float(torch.randn(*shape, device=kernel_device), blocksize=64, double_quant=nested)
    r0, rows, c0, cols = window
    out = torch.empty(rows, cols, device=kernel_device)
    qm.dequantize_window(*q.parts(), r0, rows, c0, cols, out, tiles=tiles)
    assert torch.equal(out, q.dequantize(torch.float32)[r0:r0 + rows, c0:c0 + cols])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, kernel_device):
    device = _device(backend, kernel_device)
    q = NF4Weight.from_float(torch.randn(12, 20, device=device), blocksize=32)
    from peft_kernels.ops.quant_linear import split_parts
    tensors, blocksize, shape = split_parts(q)
    x = torch.randn(6, 20, device=device)
    a, b = torch.randn(3, 20, device=device), torch.randn(12, 3, device=device)
    bias = torch.randn(12, device=device)
    seed = torch.tensor([5], device=device)
    ops = torch.ops.peft_kernels
    torch.library.opcheck(ops.quant_linear_fwd.default, (x, tensors, blocksize, shape, bias, backend))
    torch.library.opcheck(ops.quant_linear_bwd.default, (torch.randn(6, 12, device=device), tensors, blocksize,
                                                         shape, backend))
    args = (x, tensors, blocksize, shape, a, b, bias, 0.5, 0.2, seed, backend)
    torch.library.opcheck(ops.qlora_fwd.default, args)
    _, u = ops.qlora_fwd(*args)
    torch.library.opcheck(ops.qlora_bwd.default, (torch.randn(6, 12, device=device), x, tensors, blocksize,
                                                  shape, a, b, u, 0.5, 0.2, seed, True, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_compiles_without_graph_breaks(backend, kernel_device):
    device = _device(backend, kernel_device)
    torch._dynamo.reset()
    layer = QLoRALinear.from_linear(torch.nn.Linear(32, 24).to(device), r=4, alpha=8, dropout=0.1, backend=backend)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 32, device=device)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    y_c = compiled(x)
    y_c.sum().backward()
    g_c = layer.lora_A.grad.clone()
    layer.lora_A.grad = None
    torch.manual_seed(0)
    y_e = layer(x)
    y_e.sum().backward()
    assert torch.allclose(y_c, y_e, atol=1e-6) and torch.allclose(g_c, layer.lora_A.grad, atol=1e-5)


def test_module_from_linear_and_state():
    base = torch.nn.Linear(64, 48)
    layer = QLoRALinear.from_linear(base, quant="nf4", r=4, alpha=8)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert "weight" not in dict(layer.named_parameters())  # no full-precision copy kept
    assert layer.qweight_packed.dtype == torch.uint8 and layer.qweight_packed.numel() == 64 * 48 // 2
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(x, NF4Weight.from_float(base.weight.detach()).dequantize(), base.bias)
    assert torch.allclose(layer.eval()(x), expected, atol=1e-5)  # B = 0: the adapter starts as a no-op
    sd = layer.state_dict()
    assert {"qweight_packed", "qweight_absmax", "qweight_absmax2", "qweight_code2", "qweight_offset"} <= set(sd)
    with pytest.raises(ValueError, match="quant must be one of nf4, fp4, int8, int4"):
        QLoRALinear.from_linear(base, quant="int3")


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_int_qlora_module_matches_the_dequantized_lora(quant, p, monkeypatch):
    """QLoRALinear over INT8/INT4: the windowed base product (windows forced small: several, a
    partial last one) plus the adapter equal LoRA on the dequantized weight with the same dropout
    seed — output and the x, lora_A, lora_B gradients against a float64 oracle."""
    from peft_kernels.nn import IntQLoRALinear
    from peft_kernels.reference import intq

    monkeypatch.setattr(intq, "WINDOW_ELEMENTS", 64 * 20)
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 45)
    layer = QLoRALinear.from_linear(base, quant=quant, r=3, alpha=6, dropout=p, group_size=32).train()
    assert isinstance(layer, IntQLoRALinear)
    assert [n for n, q in layer.named_parameters() if q.requires_grad] == ["lora_A", "lora_B"]
    torch.nn.init.normal_(layer.lora_B, std=0.2)
    x, gy = torch.randn(2, 7, 64, requires_grad=True), torch.randn(2, 7, 45)
    torch.manual_seed(3)
    y = layer(x)
    y.backward(gy)
    ours = [y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]

    w64 = layer.qweight.dequantize(torch.float32).double()
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B)]
    torch.manual_seed(3)  # the same seed draw as the module's
    seed = int(torch.randint(0, 2**62, ()).item()) if p > 0 else None
    xd = dropped(leaves[0].reshape(-1, 64), p, seed).reshape(leaves[0].shape)
    y64 = (torch.nn.functional.linear(leaves[0], w64, base.bias.detach().double())
           + 2.0 * torch.nn.functional.linear(torch.nn.functional.linear(xd, leaves[1]), leaves[2]))
    y64.backward(gy.double())
    for name, o, e in zip(["y", "dx", "dA", "dB"], ours, [y64.detach()] + [t.grad for t in leaves]):
        assert rel_err(o, e) <= FLOOR[torch.float32], name


def test_module_from_bnb_reads_bytes_as_is():
    bnb = pytest.importorskip("bitsandbytes")
    q = NF4Weight.from_float(torch.randn(40, 64) * 0.05)
    lin = bnb.nn.Linear4bit(64, 40, bias=False, quant_type="nf4")
    lin.weight = q.to_bnb()
    layer = QLoRALinear.from_bnb(lin, r=2)
    assert layer.qweight_packed.data_ptr() == lin.weight.data.data_ptr()
    assert torch.equal(layer.qweight.dequantize(), q.dequantize())


def test_apply_lora_quantize():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    peft_kernels.apply_lora(model, ["0"], r=2, quantize="nf4")
    assert isinstance(model[0], QLoRALinear) and isinstance(model[2], torch.nn.Linear)
    model(torch.randn(4, 32)).sum().backward()
    assert model[0].lora_A.grad is not None and not model[2].weight.requires_grad
    with pytest.raises(ValueError, match="quantize must be None, 'nf4', 'fp4', 'int8' or 'int4'"):
        peft_kernels.apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"], quantize="int3")
    int_model = torch.nn.Sequential(torch.nn.Linear(64, 16))
    peft_kernels.apply_lora(int_model, ["0"], r=2, quantize="int4")
    int_model(torch.randn(4, 64)).sum().backward()
    assert int_model[0].lora_A.grad is not None and int_model[0].qweight.bits_per_parameter < 5


def test_apply_lora_quant_options_and_errors_leave_the_model_untouched():
    """quant_options reach the quantizer (an INT4 group of 32 for in = 96; NF4 blocksize and
    double quantization); a layer that cannot be quantized is named in the error, and the model
    is left exactly as it was (no layer swapped, nothing frozen)."""
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8))

    m = peft_kernels.apply_lora(model(), "all-linear", r=2, quantize="int4", quant_options={"group_size": 32})
    assert m[2].qweight.group_size == 32 and m[2].qweight.scales.shape == (8, 3)
    m = peft_kernels.apply_lora(model(), ["0"], r=2, quantize="nf4",
                                quant_options={"blocksize": 128, "double_quant": False})
    assert m[0].qweight.blocksize == 128 and not m[0].qweight.nested
    untouched = model()
    with pytest.raises(ValueError, match=r"cannot quantize 2 \[8, 96\] as int4: .*group_size 64"):
        peft_kernels.apply_lora(untouched, "all-linear", r=2, quantize="int4")
    assert all(type(layer) is not QLoRALinear for layer in untouched) and all(
        p.requires_grad for p in untouched.parameters())
    with pytest.raises(ValueError, match="given without quantize"):
        peft_kernels.apply_lora(model(), ["0"], quant_options={"group_size": 32})
    with pytest.raises(ValueError, match=r"\['group_size'\] do not apply to 'nf4'"):
        peft_kernels.apply_lora(model(), ["0"], quantize="nf4", quant_options={"group_size": 32})


def _bnb_model(bnb):
    """A model loaded the way transformers loads one in 4 / 8 bits: a quantized NF4 Linear4bit, a
    quantized LLM.int8 Linear8bitLt (bnb quantizes both on the move to a device), a plain head."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        bnb.nn.Linear4bit(64, 48, quant_type="nf4", compute_dtype=torch.float32), torch.nn.Tanh(),
        bnb.nn.Linear8bitLt(48, 32, has_fp16_weights=False), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    model[0].weight = bnb.nn.Params4bit(torch.randn(48, 64) * 0.1, requires_grad=False, quant_type="nf4",
                                        blocksize=64)
    model[2].weight = bnb.nn.Int8Params(torch.randn(32, 48) * 0.1, requires_grad=False, has_fp16_weights=False)
    return model.to("cpu")


@pytest.mark.parametrize("use_dora", [False, True])
def test_apply_lora_over_bitsandbytes_layers_reads_their_bytes(use_dora):
    """apply_lora on a model loaded in 4 / 8 bits (bnb layers are nn.Linear subclasses): the
    Linear4bit becomes a QLoRALinear over bnb's own bytes (outputs as bnb's with B = 0), the
    Linear8bitLt an IntQLoRALinear over its CB / SCB (x · deq(W), without LLM.int8's activation
    quantization), nothing re-quantized or copied; the adapters train."""
    bnb = pytest.importorskip("bitsandbytes")
    model = _bnb_model(bnb)
    x = torch.randn(5, 64)
    h4 = model[0](x)
    packed, cb = model[0].weight.data_ptr(), model[2].weight.data_ptr()
    scb = model[2].weight.SCB
    deq8 = model[2].weight.data.float() * scb[:, None] / 127
    peft_kernels.apply_lora(model, "all-linear", r=3, use_dora=use_dora)
    assert [type(m).__name__ for m in model] == (["QDoRALinear", "Tanh", "IntQDoRALinear", "Tanh", "DoRALinear"]
                                                  if use_dora else
                                                  ["QLoRALinear", "Tanh", "IntQLoRALinear", "Tanh", "LoRALinear"])
    assert model[0].qweight_packed.data_ptr() == packed and model[2].qweight_0.data_ptr() == cb
    assert torch.equal(model[0](x), h4)
    h = torch.randn(5, 48)
    assert rel_err(model[2](h), torch.nn.functional.linear(h.double(), deq8.double(), model[2].bias.double())) < 1e-6
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_apply_lora_and_apply_sparse_over_bitsandbytes_layers_errors():
    bnb = pytest.importorskip("bitsandbytes")
    for kwargs, error in [(dict(quantize="int4"), r"0 \(Linear4bit\): it is already quantized by bitsandbytes \(nf4\)"),
                          (dict(quantize="nf4", quant_options={"blocksize": 128}), "pass quantize=None"),
                          (dict(quantize="int8", quant_options={}), None)]:
        model = _bnb_model(bnb)
        if error is None:  # "int8" is what the Linear8bitLt holds; nf4 is not what quantize says for 0
            with pytest.raises(ValueError, match=r"0 \(Linear4bit\)"):
                peft_kernels.apply_lora(model, "all-linear", **kwargs)
            continue
        with pytest.raises(ValueError, match=error):
            peft_kernels.apply_lora(model, "all-linear", **kwargs)
        assert type(model[0]).__name__ == "Linear4bit"
    fresh = torch.nn.Sequential(bnb.nn.Linear4bit(64, 48, quant_type="nf4"))  # not moved to a device: not quantized
    with pytest.raises(ValueError, match="not quantized yet"):
        peft_kernels.apply_lora(fresh, ["0"])
    with pytest.raises(ValueError, match=r"cannot replace \['0 \(a bitsandbytes quantized layer"):
        peft_kernels.apply_sparse(_bnb_model(bnb), ["0"])


def test_bad_inputs():
    q = NF4Weight.from_float(torch.randn(8, 16))
    a, b = torch.randn(2, 16), torch.randn(8, 2)
    with pytest.raises(TypeError, match="qweight must be an NF4Weight, FP4Weight, Int8Weight or Int4Weight"):
        peft_kernels.qlora_linear(torch.randn(3, 16), torch.randn(8, 16), a, b)
    with pytest.raises(ValueError, match="last dim must equal weight's in_features 16"):
        peft_kernels.qlora_linear(torch.randn(3, 15), q, a, b)
    with pytest.raises(ValueError, match=r"lora_B must be \[out, r\] = \[8, 2\]"):
        peft_kernels.qlora_linear(torch.randn(3, 16), q, a, torch.randn(9, 2))
    with pytest.raises(ValueError, match="qweight is on cpu, x on meta"):
        peft_kernels.quant_linear(torch.randn(3, 16, device="meta"), q)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        peft_kernels.quant_linear(torch.randn(3, 16), q, torch.randn(7))


@pytest.mark.parametrize("nested", [False, True])
def test_kernel_decodes_exactly_what_dequantize_gives(nested, kernel_device):
    """x = I in fp32 (exact products, one nonzero term per sum): the 4-bit matmul must return the
    dequantized weight bit for bit, including the unfused nested-absmax rounding."""
    q = FP4Weight.from_float(torch.randn(40, 64, device=kernel_device) * 0.1, blocksize=32, double_quant=nested)
    eye = torch.eye(64, device=kernel_device)
    assert torch.equal(peft_kernels.quant_linear(eye, q, backend="triton"), q.dequantize().T)


@pytest.mark.parametrize("quant,nested,dora", [("nf4", True, False), ("nf4", False, False), ("fp4", True, True),
                                               ("int8", False, False), ("int4", False, True)])
def test_dtype_cast_keeps_the_quantization_state_exact(quant, nested, dora):
    """module.to(bf16) / .half() cast the adapter, bias and magnitude but never the quantization
    state: a bf16 absmax / SCB / scale would change every base weight without a word (it did; INT8
    then failed at the next forward). Cast there and back: outputs identical to the original's."""
    from peft_kernels.nn import QDoRALinear

    torch.manual_seed(0)
    cls = QDoRALinear if dora else QLoRALinear
    layer = cls.from_linear(torch.nn.Linear(64, 40), quant=quant, r=4, double_quant=nested, group_size=32).eval()
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    with torch.no_grad():  # parameters exact in bf16 and fp16, so that only the cast state could differ
        for name, param in layer.named_parameters():
            if not name.startswith("qweight_"):  # the quantized bytes are frozen parameters too
                param.copy_(torch.where(param.abs() < 1e-3, 0.0, param.bfloat16().float()))
    x = torch.randn(3, 64)
    y0, w0 = layer(x), layer.qweight.dequantize(torch.float32)
    state = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("qweight_") or k == "weight_row_sq"}
    assert any(v.is_floating_point() for v in state.values())  # something a cast could have rounded
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
        cast(layer)
        dtype = layer.lora_A.dtype
        assert layer.lora_B.dtype == dtype and layer.bias.dtype == dtype and layer.qweight.dtype == dtype
        for k, v in state.items():
            assert layer.state_dict()[k].dtype == v.dtype and torch.equal(layer.state_dict()[k], v), k
        assert torch.equal(layer.qweight.dequantize(torch.float32), w0)
        y = layer(x.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all()
    layer.float()
    assert torch.equal(layer(x), y0)
    layer.to("meta")  # a device move still moves every buffer and parameter
    assert all(t.device.type == "meta" for t in [*layer.buffers(), *layer.parameters()])


def test_quantized_weights_reject_inconsistent_parts():
    """The kernels index the packed bytes and statistics by the layout: a part of the wrong dtype
    or length is an error at construction, never a silently different weight."""
    q = NF4Weight.from_float(torch.randn(8, 40), blocksize=32, double_quant=True)
    parts = dict(packed=q.packed, absmax=q.absmax, shape=q.shape, dtype=q.dtype, blocksize=32, offset=q.offset,
                 absmax2=q.absmax2, code2=q.code2)
    NF4Weight(**parts)  # the consistent set is accepted
    bad = [(dict(absmax2=q.absmax2.bfloat16()), "fp32"), (dict(code2=q.code2[:255]), "256 entries"),
           (dict(absmax=q.absmax.float()), "absmax must be torch.uint8 with 10 entries"),
           (dict(packed=q.packed[:-1]), "160 bytes"), (dict(blocksize=48), "blocksize must be one of"),
           (dict(offset=None), "together"), (dict(shape=(8, 40, 1)), r"shape must be \[out, in\]")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            NF4Weight(**{**parts, **change})
    single = NF4Weight.from_float(torch.randn(8, 40), blocksize=32, double_quant=False)
    with pytest.raises(ValueError, match="absmax must be torch.float32 with 10 entries"):
        NF4Weight(single.packed, single.absmax.bfloat16(), single.shape, torch.float32, 32)
    with pytest.raises(ValueError, match="one device"):
        NF4Weight(single.packed, single.absmax.to("meta"), single.shape, torch.float32, 32)
    i4 = Int4Weight.from_float(torch.randn(8, 64), group_size=32)
    for args, message in [((i4.packed, i4.scales[:, :1], i4.zeros, 32), r"scales must be floating point \[8, 2\]"),
                          ((i4.packed, i4.scales, i4.zeros.int(), 32), "zeros must be uint8"),
                          ((i4.packed, i4.scales, i4.zeros, 48), "group_size must be one of"),
                          ((i4.packed.int(), i4.scales, i4.zeros, 32), "packed must be uint8"),
                          ((i4.packed, i4.scales.to("meta"), i4.zeros, 32), "share a device")]:
        with pytest.raises(ValueError, match=message):
            Int4Weight(*args, torch.float32)
    i8 = Int8Weight.from_float(torch.randn(8, 64))
    with pytest.raises(ValueError, match="share a device"):
        Int8Weight(i8.CB, i8.SCB.to("meta"), torch.float32)


@pytest.mark.parametrize("nested", [False, True])
def test_wide_weights_index_in_int64(nested, kernel_device, monkeypatch):
    """Weights of 2**31 elements or more index their bytes in int64 (WIDE). Forced on for a small
    weight, every 4-bit path (fused, block-aligned fused, both workspace decoders) must give the
    same bits as the int32 indexing it replaces — the only way the CPU tier runs those branches."""
    q = NF4Weight.from_float(torch.randn(45, 192, device=kernel_device) * 0.1, blocksize=64, double_quant=nested)
    a, a_t = torch.randn(37, 192, device=kernel_device), torch.randn(37, 45, device=kernel_device)
    monkeypatch.setattr(qm, "CHUNK_ELEMENTS", 64 * 50)
    monkeypatch.setattr(qm, "WINDOW_ALIGN", 64)

    def every_path():
        outs = [qm.matmul_4bit(a, *q.parts(), path="fused", tiles=(16, 16, 16, 4, 1)),
                qm.matmul_4bit(a_t, *q.parts(), transpose=True, path="fused", tiles=(16, 16, 16, 4, 1)),
                qm.matmul_4bit(a, *q.parts(), path="fused_aligned", tiles=(16, 16, 2, 4)),
                qm.matmul_4bit(a, *q.parts(), path="splitk", tiles=(16, 16, 1, 4, 8)),
                qm.matmul_4bit(a_t, *q.parts(), transpose=True, path="fused_aligned", tiles=(16, 16, 1, 4)),
                qm.matmul_4bit(a, *q.parts(), path="chunked")]
        for c0, cols in ((64, 128), (11, 50)):  # the block-aligned and the any-shape decoder
            out = torch.empty(20, cols, device=kernel_device)
            outs.append(qm.dequantize_window(*q.parts(), 5, 20, c0, cols, out))
        return outs

    narrow = every_path()
    monkeypatch.setattr(qm, "WIDE_FROM", 0)
    for i, (wide, ref) in enumerate(zip(every_path(), narrow)):
        assert torch.equal(wide, ref), i
    assert torch.equal(narrow[-2], q.dequantize(torch.float32)[5:25, 64:192])
