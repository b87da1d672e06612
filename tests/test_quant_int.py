"""INT8 (LLM.int8 layout) and INT4 (group-wise) weights: layout, exact rules, SQNR."""
import math

import pytest
import torch

from peft_kernels.quant import Int4Weight, Int8Weight


def sqnr_db(w, w_hat):
    w, w_hat = w.double(), w_hat.double()
    return 10 * math.log10((w.square().sum() / (w - w_hat).square().sum()).item())


def test_int8_matches_bitsandbytes_rule():
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(37, 129) * 0.05
    ours = Int8Weight.from_float(w)
    cb, scb, _ = F.int8_vectorwise_quant(w.clone())
    assert torch.equal(ours.CB, cb) and torch.equal(ours.SCB, scb)
    assert torch.equal(ours.dequantize(torch.float32), F.int8_vectorwise_dequant(cb, scb))


def test_int8_from_bnb_shares_llm_int8_codes_and_scales():
    """A quantized bitsandbytes Linear8bitLt is read as it is: CB and SCB shared, the nominal
    dtype its bias's; the codes and scales are our own quantizer's on the same (fp16) weight: one
    rule, LLM.int8's."""
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(24, 40) * 0.1
    layer = bnb.nn.Linear8bitLt(40, 24, has_fp16_weights=False).to(torch.bfloat16)
    layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")  # bnb quantizes on the move to a device
    q = Int8Weight.from_bnb(layer)
    assert q.CB.data_ptr() == layer.weight.data_ptr() and q.SCB is layer.weight.SCB and q.dtype == torch.bfloat16
    ours = Int8Weight.from_float(w.half())  # bnb quantizes the weight from fp16
    assert torch.equal(q.CB, ours.CB) and torch.equal(q.SCB, ours.SCB)
    with pytest.raises(ValueError, match="expected a quantized bitsandbytes Int8Params"):
        Int8Weight.from_bnb(bnb.nn.Linear8bitLt(40, 24, has_fp16_weights=False))  # not moved yet: fp32


def test_int8_layout_and_sqnr():
    w = torch.randn(256, 1024, dtype=torch.bfloat16)
    q = Int8Weight.from_float(w)
    assert q.CB.dtype == torch.int8 and q.SCB.shape == (256,) and q.CB.abs().max() == 127
    # Uniform step absmax/127 on Gaussian rows (absmax ~ 3.3 sigma at 1024 samples):
    # SQNR ~ 10 log10(12 * 127**2 / 3.3**2) ~ 42 dB. A scale or rounding bug falls far below.
    assert sqnr_db(w.float(), q.dequantize(torch.float32)) > 39
    assert q.dequantize().dtype == torch.bfloat16


def test_int8_zero_row():
    w = torch.randn(3, 16)
    w[1] = 0
    q = Int8Weight.from_float(w)
    assert torch.equal(q.CB[1], torch.zeros(16, dtype=torch.int8)) and torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("group_size,min_db", [(32, 20.5), (64, 19.5), (128, 18.5)])
def test_int4_sqnr(group_size, min_db):
    # Step = range/15 with range ~ 4.1 / 4.6 / 5.1 sigma for 32 / 64 / 128 Gaussian samples:
    # SQNR ~ 10 log10(12 * 15**2 / range**2) ~ 22.1 / 21.1 / 20.2 dB; thresholds leave ~1.5 dB.
    w = torch.randn(128, 512)
    q = Int4Weight.from_float(w, group_size)
    assert sqnr_db(w, q.dequantize()) > min_db


def test_int4_layout_exact_rule_and_idempotence():
    w = torch.randn(5, 64) * 0.1
    q = Int4Weight.from_float(w, group_size=32)
    assert q.packed.shape == (5, 32) and q.scales.shape == (5, 2) and q.zeros.shape == (5, 2)
    codes = q.codes()
    assert torch.equal(codes[:, 0], q.packed[:, 0] >> 4) and torch.equal(codes[:, 1], q.packed[:, 0] & 0xF)
    g = w.view(5, 2, 32)
    lo, hi = g.amin(2).clamp(max=0), g.amax(2).clamp(min=0)
    assert torch.allclose(q.scales, (hi - lo) / 15)
    # min and max of each group are representable (to rounding): the grid spans the group.
    deq = q.dequantize().view(5, 2, 32)
    assert torch.allclose(deq.amin(2), lo, atol=(q.scales / 2 + 1e-7).max().item())
    # Quantizing the dequantized weight reproduces the same codes.
    again = Int4Weight.from_float(q.dequantize(), group_size=32)
    assert torch.equal(again.codes(), codes)


def test_int4_groups_not_straddling_zero():
    w = torch.full((2, 32), 0.25)
    w[1] = -torch.rand(32) - 1.0  # all negative
    q = Int4Weight.from_float(w, 32)
    assert torch.allclose(q.dequantize()[0], w[0])
    assert (q.dequantize()[1] - w[1]).abs().max() <= q.scales[1, 0] / 2 + 1e-6
    assert torch.equal(Int4Weight.from_float(torch.zeros(1, 32), 32).dequantize(), torch.zeros(1, 32))


def test_bad_inputs():
    with pytest.raises(ValueError, match="not divisible by group_size 64"):
        Int4Weight.from_float(torch.randn(4, 96), group_size=64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Weight.from_float(torch.randn(4, 96), group_size=48)
    with pytest.raises(ValueError, match="must be 2-D"):
        Int8Weight.from_float(torch.randn(4))
    with pytest.raises(ValueError, match="CB must be int8"):
        Int8Weight(torch.zeros(2, 2), torch.zeros(2), torch.float32)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int_ops_opcheck_and_errors(fmt):
    import peft_kernels

    w = torch.randn(24, 64)
    q = Int8Weight.from_float(w) if fmt == "int8" else Int4Weight.from_float(w, group_size=32)
    group = 0 if fmt == "int8" else 32
    x, gy, bias = torch.randn(5, 64), torch.randn(5, 24), torch.randn(24)
    torch.library.opcheck(torch.ops.peft_kernels.intq_linear_fwd.default, (x, q.tensors(), fmt, group, [24, 64],
                                                                          bias, "torch"))
    torch.library.opcheck(torch.ops.peft_kernels.intq_linear_bwd.default, (gy, q.tensors(), fmt, group, [24, 64],
                                                                          "torch"))
    with pytest.raises(ValueError, match="in_features|features"):
        peft_kernels.quant_linear(torch.randn(5, 63), q)
    with pytest.raises(RuntimeError, match="no 'triton' implementation|unavailable"):
        peft_kernels.quant_linear(x, q, backend="triton")


def test_int_weights_move_between_devices():
    w = torch.randn(6, 64)
    for q in (Int8Weight.from_float(w), Int4Weight.from_float(w, group_size=32)):
        moved = q.to("meta")
        assert moved.device.type == "meta" and moved.shape == q.shape and type(moved) is type(q)
        assert torch.equal(q.to("cpu").dequantize(), q.dequantize())
