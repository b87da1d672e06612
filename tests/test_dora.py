"""DoRA: dora_linear / DoRALinear against HF PEFT's DoRA layer (CPU, float64), the norm
factorization against the dense norm, merge/unmerge, errors."""
import pytest
import torch
from torch import nn

import peft_kernels
from peft_kernels.nn import DoRALinear, QDoRALinear
from peft_kernels.ops.dora import dora_weight_norm, weight_row_sq
from peft_kernels.quant import NF4Weight
from peft_kernels.reference.lora import dropped

peft = pytest.importorskip("peft")


def test_norm_factorization_equals_dense_norm():
    w, a, b = torch.randn(37, 53, dtype=torch.float64), torch.randn(5, 53, dtype=torch.float64), \
        torch.randn(37, 5, dtype=torch.float64)
    dense = torch.linalg.norm(w + 0.7 * b @ a, dim=1)
    assert torch.allclose(dora_weight_norm(w, a, b, 0.7), dense, rtol=1e-12, atol=1e-12)


class OurMask(nn.Module):
    """Stand-in for PEFT's nn.Dropout that applies peft_kernels' counter-based mask, so both
    sides drop exactly the same elements."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return dropped(x.reshape(-1, x.shape[-1]), self.p, self.seed).reshape(x.shape)


def _peft_dora_layer(in_f, out_f, dropout, bias=True):
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).double()
    model = peft.get_peft_model(holder, peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout,
                                                        target_modules=["0"], use_dora=True))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.3)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.randn(out_f, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("mode", ["train p=0", "eval p=0.3", "train p=0.3"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_peft_dora(mode, bias):
    p = 0.3 if "0.3" in mode else 0.0
    layer = _peft_dora_layer(21, 17, p, bias)
    layer.train("train" in mode)
    seed = 1234
    if "train" in mode and p > 0:
        layer.lora_dropout["default"] = OurMask(p, seed)
    base = layer.get_base_layer()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    x = torch.randn(2, 5, 21, dtype=torch.float64)

    x1 = x.clone().requires_grad_()
    y_peft = layer(x1)
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    want = [x1.grad, A.grad.clone(), B.grad.clone(), m.grad.clone()]

    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, m)]
    y = peft_kernels.dora_linear(leaves[0], base.weight, leaves[1], leaves[2], leaves[3], base.bias,
                                 scaling=layer.scaling["default"], dropout_p=p, training=layer.training,
                                 seed=seed, backend="torch")
    y.backward(g)
    assert torch.allclose(y, y_peft, rtol=1e-10, atol=1e-10)
    for got, exp in zip((t.grad for t in leaves), want):
        assert torch.allclose(got, exp, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_matches_peft_without_dropout(backend, kernel_device):
    layer = _peft_dora_layer(24, 20, 0.0).float().to(kernel_device)
    ours = DoRALinear.from_linear(nn.Linear(24, 20).to(kernel_device), r=3, alpha=6, backend=backend)
    with torch.no_grad():
        ours.weight.copy_(layer.get_base_layer().weight)
        ours.bias.copy_(layer.get_base_layer().bias)
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
        ours.magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
    x = torch.randn(6, 24, device=kernel_device)
    assert torch.allclose(ours(x), layer(x), rtol=1e-5, atol=1e-5)
    assert peft_kernels.backends.last_used("dora_linear") == backend


def test_fresh_module_is_the_base_layer_and_merge_roundtrip():
    base = nn.Linear(16, 12)
    layer = DoRALinear.from_linear(base, r=4, alpha=8).eval()
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x), base(x), atol=1e-6)  # m = ‖W‖ and B = 0
    nn.init.normal_(layer.lora_B, std=0.2)
    with torch.no_grad():
        layer.magnitude.mul_(1.1)
    y = layer(x)
    w0 = layer.weight.clone()
    layer.merge()
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.weight, w0, atol=1e-6) and torch.allclose(layer(x), y, atol=1e-5)
    layer.merge()  # the merge scale moves with the module and stays out of the state_dict
    assert "_merge_scale" not in layer.state_dict()
    layer.double().unmerge()
    assert torch.allclose(layer.weight.float(), w0, atol=1e-6)
    layer.merge()
    layer.to("meta").unmerge()  # was: a CPU tensor left behind, and unmerge mixing devices
    assert layer.weight.device.type == "meta" and not layer.merged


def test_apply_lora_use_dora_and_errors():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    peft_kernels.apply_lora(model, ["0"], r=2, use_dora=True)
    assert isinstance(model[0], DoRALinear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B", "0.magnitude"}
    imodel = peft_kernels.apply_lora(nn.Sequential(nn.Linear(64, 8)), ["0"], r=2, use_dora=True, quantize="int4")
    assert type(imodel[0]).__name__ == "IntQDoRALinear"
    assert {n for n, p in imodel.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B", "0.magnitude"}
    assert torch.allclose(imodel[0].magnitude, imodel[0].qweight.dequantize(torch.float32).norm(dim=1), rtol=1e-6)
    imodel(torch.randn(3, 64)).sum().backward()
    assert imodel[0].magnitude.grad is not None and imodel[0].lora_A.grad is not None
    qmodel = peft_kernels.apply_lora(nn.Sequential(nn.Linear(64, 8)), ["0"], r=2, use_dora=True, quantize="nf4")
    assert isinstance(qmodel[0], QDoRALinear)
    assert {n for n, p in qmodel.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B", "0.magnitude"}
    q = qmodel[0].qweight
    assert torch.allclose(qmodel[0].magnitude, q.dequantize(torch.float32).norm(dim=1), rtol=1e-6)
    x = torch.randn(3, 64)
    assert torch.allclose(qmodel(x), peft_kernels.quant_linear(x, q, qmodel[0].bias), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"peft_kernels.dora_linear: magnitude must be \[4\]"):
        peft_kernels.dora_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(1, 3), torch.randn(4, 1),
                                 torch.randn(5))


@pytest.mark.parametrize("nested", [False, True])
def test_row_sq_of_a_4bit_weight_is_the_dequantized_one(nested, monkeypatch):
    """‖W_i‖² decoded window by window (several windows, odd in: bytes straddle rows) equals
    the norm of the whole dequantized weight."""
    import peft_kernels.ops.dora as dora_ops

    monkeypatch.setattr(dora_ops, "ROW_WINDOW", 4)
    q = NF4Weight.from_float(torch.randn(13, 37), blocksize=64, double_quant=nested)
    ref = torch.linalg.vector_norm(q.dequantize(torch.float32), dim=1).square()
    assert torch.equal(weight_row_sq(q), ref)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_row_sq_of_an_int_weight_is_the_dequantized_one(fmt, monkeypatch):
    import peft_kernels.ops.dora as dora_ops
    from peft_kernels.quant import Int4Weight, Int8Weight

    monkeypatch.setattr(dora_ops, "ROW_WINDOW", 4)
    w = torch.randn(13, 64)
    q = Int8Weight.from_float(w) if fmt == "int8" else Int4Weight.from_float(w, group_size=32)
    ref = torch.linalg.vector_norm(q.dequantize(torch.float32), dim=1).square()
    assert torch.allclose(weight_row_sq(q), ref, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fmt", ["nf4", "int8", "int4"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_dora_over_quantized_equals_dora_over_the_dequantized_weight(backend, fmt, p, bias, kernel_device):
    """QDoRA (the qdora / intq_dora ops: the quantized base products) against the PEFT-verified
    dense form on deq(W) (the reference), same seed: outputs and gradients of x, A, B and
    magnitude, float64 oracle, the tolerance idiom; on the triton backend with small elementwise
    tiles, so partial tiles and split reductions run."""
    from helpers import FLOOR, rel_err
    from peft_kernels.quant import Int4Weight, Int8Weight
    from peft_kernels.triton import lora as triton_lora

    torch.manual_seed(0)
    K = 40 if fmt == "nf4" else 64  # NF4: 64-blocks straddle rows; INT4: groups of 32 divide K
    w0 = torch.randn(29, K) * 0.2
    q = {"nf4": lambda: NF4Weight.from_float(w0, blocksize=64), "int8": lambda: Int8Weight.from_float(w0),
         "int4": lambda: Int4Weight.from_float(w0, group_size=32)}[fmt]()
    w = q.dequantize(torch.float32)
    x, a, b = torch.randn(3, 5, K), torch.randn(4, K) * 0.2, torch.randn(29, 4) * 0.2
    mag, bias_t = torch.rand(29) + 0.5, (torch.randn(29) if bias else None)
    gy = torch.randn(3, 5, 29)

    def run(weight, dt, backend="torch", device="cpu"):
        leaves = [t.detach().to(device, dt).requires_grad_() for t in (x, a, b, mag)]
        y = peft_kernels.dora_linear(leaves[0], weight, *leaves[1:3], leaves[3], None if bias_t is None else
                                     bias_t.to(device, dt), scaling=1.5, dropout_p=p, seed=11, backend=backend)
        y.backward(gy.to(device, dt))
        return [t.cpu() for t in [y.detach()] + [t.grad for t in leaves]]

    device = kernel_device if backend == "triton" else torch.device("cpu")
    with triton_lora.launch_override(dora_bm=16, dora_bn=16, sms=8):
        ours = run(q.to(device), torch.float32, backend, device)
    assert peft_kernels.backends.last_used("qdora_linear" if fmt == "nf4" else "qdora_linear_int") == backend
    dense = run(w, torch.float32)
    exact = run(w.double(), torch.float64)
    for name, o, d, e in zip(["y", "dx", "dA", "dB", "dmag"], ours, dense, exact):
        assert rel_err(o, e) <= max(2 * rel_err(d, e), FLOOR[torch.float32]), name


def _counting_row_sq(monkeypatch):
    """Count the ‖W_i‖² computations (every path — the module cache, the op — calls this)."""
    import peft_kernels.ops.dora as dora_ops

    calls = []
    real = dora_ops.weight_row_sq

    def counted(weight, *args):
        calls.append(tuple(weight.shape))
        return real(weight, *args)

    monkeypatch.setattr(dora_ops, "weight_row_sq", counted)
    return calls


def test_module_computes_the_frozen_row_norm_once_per_weight_version(monkeypatch):
    """DoRALinear reads W for ‖W_i‖² once, not every step, and recomputes it whenever W changes
    in place (an optimizer step on a trainable base, load_state_dict, merge / unmerge) — each
    output bit-equal to dora_linear computing the norm afresh."""
    torch.manual_seed(0)
    layer = DoRALinear.from_linear(nn.Linear(19, 11), r=3, alpha=6, dropout=0.1)
    nn.init.normal_(layer.lora_B, std=0.3)
    calls = _counting_row_sq(monkeypatch)

    def fresh(x):
        return peft_kernels.dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.bias,
                                        scaling=layer.scaling, dropout_p=layer.dropout, training=layer.training,
                                        seed=7)

    def check(x):  # the module's output and how many norms it computed
        del calls[:]
        got = layer(x)
        return got, len(calls)

    x = torch.randn(4, 19)
    layer.eval()
    y1, n1 = check(x)
    y2, n2 = check(x)
    assert (n1, n2) == (1, 0)
    assert torch.equal(y1, y2) and torch.equal(y1, fresh(x))
    layer.train()
    del calls[:]
    layer(x).sum().backward()  # a training step reuses it too
    assert len(calls) == 0

    with torch.no_grad():  # W changes in place: recomputed, and the output follows it
        layer.weight.mul_(1.5)
    layer.eval()
    y3, n3 = check(x)
    assert n3 == 1 and torch.equal(y3, fresh(x)) and not torch.equal(y3, y1)

    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight"].add_(0.25)
    layer.load_state_dict(state)
    y4, n4 = check(x)
    assert n4 == 1 and torch.equal(y4, fresh(x))

    layer.merge()
    layer.unmerge()
    y5, n5 = check(x)
    assert n5 == 1 and torch.allclose(y5, y4, atol=1e-5)


def test_a_trained_base_weight_is_never_served_a_cached_row_norm(monkeypatch):
    """A base weight that trains gets ‖W_i‖² afresh on every call: torch's fused AdamW (HF Trainer's
    adamw_torch_fused) updates it without bumping its version counter, and the cached norm of the
    step-0 weight stayed in use."""
    torch.manual_seed(0)
    layer = DoRALinear.from_linear(nn.Linear(19, 11), r=3, alpha=6)
    nn.init.normal_(layer.lora_B, std=0.3)
    layer.weight.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, fused=True)
    x = torch.randn(4, 19)
    for _ in range(2):
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    want = peft_kernels.dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.bias,
                                    scaling=layer.scaling)
    assert torch.equal(layer(x), want)
    calls = _counting_row_sq(monkeypatch)
    layer(x)
    layer(x)
    assert len(calls) == 2


def test_module_row_norm_cache_under_autocast_inference_mode_and_copies(monkeypatch):
    """Under autocast the cached norm is the autocast-cast weight's (bit-equal to the op's own);
    a norm cached under inference mode serves a later training step; a layer built under
    inference mode (its weight has no version counter) runs uncached; a deep copy starts with
    its own cache."""
    torch.manual_seed(0)
    layer = DoRALinear.from_linear(nn.Linear(24, 10), r=4, alpha=8)
    nn.init.normal_(layer.lora_B, std=0.3)
    calls = _counting_row_sq(monkeypatch)
    x = torch.randn(3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        got2 = layer(x)
        want = peft_kernels.dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.bias,
                                        scaling=layer.scaling)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want) and torch.equal(got2, want)
    assert len(calls) == 2  # the module's once, the uncached op call's once
    fp32 = layer(x)  # the fp32 norm is another entry
    assert torch.equal(fp32, peft_kernels.dora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.magnitude,
                                                      layer.bias, scaling=layer.scaling))

    fresh = DoRALinear.from_linear(nn.Linear(24, 10), r=4, alpha=8)
    del calls[:]
    with torch.inference_mode():
        fresh(x)
    fresh(x.requires_grad_()).sum().backward()
    assert fresh.magnitude.grad is not None and len(calls) == 1
    with torch.inference_mode():
        built_there = DoRALinear.from_linear(nn.Linear(24, 10), r=4, alpha=8)
        assert torch.allclose(built_there(x), built_there.to_linear()(x), atol=1e-6)  # raised: no version counter

    import copy
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.mul_(2.0)
    assert not torch.equal(twin(x), layer(x))
    twin.double()  # the norm accumulates in fp64 for an fp64 weight, as the op's own
    x64 = x.detach().double()
    assert torch.equal(twin(x64), peft_kernels.dora_linear(x64, twin.weight, twin.lora_A, twin.lora_B,
                                                           twin.magnitude, twin.bias, scaling=twin.scaling))
    twin.float()
    assert torch.allclose(twin(x), peft_kernels.dora_linear(x, twin.weight, twin.lora_A, twin.lora_B,
                                                            twin.magnitude, twin.bias, scaling=twin.scaling))
