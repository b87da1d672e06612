"""NF4/FP4 storage, byte for byte against bitsandbytes (which runs on CPU since 0.47)."""
import copy
import json

import pytest
import torch

from peft_kernels.quant import FP4Weight, NF4Weight
from peft_kernels.quant.bnb4bit import dynamic_map_signed

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

CLASSES = {"nf4": NF4Weight, "fp4": FP4Weight}
SHAPES = [(7, 37), (33, 129), (300, 257), (1, 5), (64, 64)]


def bnb_dequantize(q, st):
    """bitsandbytes' dequantize_4bit of these bytes. Its native CPU kernel (0.50, seen on an AVX512
    machine) takes the blocks row by row, so it mis-scales every block that spans two rows (last dim
    % blocksize != 0), e.g. [64, 64] at blocksize 128; bnb's CUDA kernel and its own torch fallback
    (odd last dims) do not. One flat row is a layout all of them handle: the same bytes and
    absmax, dequantized as [1, numel] and reshaped."""
    flat = copy.copy(st)
    flat.shape = torch.Size([1, st.shape.numel()])
    return F.dequantize_4bit(q, flat).view(st.shape)


def test_dynamic_map_is_bnbs():
    assert torch.equal(dynamic_map_signed(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("shape", SHAPES)
def test_single_quant_bytes_identical(quant_type, blocksize, shape):
    w = torch.randn(*shape, dtype=torch.float32) * 0.05
    q, st = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    ours = CLASSES[quant_type].from_float(w, blocksize=blocksize, double_quant=False)
    assert ours.packed.dtype == torch.uint8 and ours.packed.shape == q.shape
    assert torch.equal(ours.packed, q)
    assert torch.equal(ours.absmax, st.absmax)
    assert torch.equal(ours.dequantize(), bnb_dequantize(q, st))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", [(300, 257), (129, 1031)])
def test_double_quant_matches_bnb_and_is_never_less_accurate(quant_type, blocksize, shape):
    w = torch.randn(*shape, dtype=torch.float32) * 0.05
    q, st = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    ours = CLASSES[quant_type].from_float(w, blocksize=blocksize, double_quant=True)
    assert torch.equal(ours.packed, q)
    assert torch.equal(ours.offset, st.offset) and torch.equal(ours.absmax2, st.state2.absmax)
    assert ours.absmax.dtype == torch.uint8 and ours.absmax.shape == st.absmax.shape
    # The 8-bit codes of (absmax - offset): ours is the nearest map entry; bnb's CPU lookup is
    # approximate. Where they differ, ours must be at least as close, and differences are rare.
    true = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)[1].absmax
    ours_err = (ours.absmax_fp32() - true).abs()
    bnb_err = (F.dequantize_blockwise(st.absmax, st.state2) + st.offset - true).abs()
    assert (ours_err <= bnb_err + 1e-12).all()
    assert (ours.absmax != st.absmax).float().mean() < 0.02
    # Dequantizing bnb's own bytes through our class gives bnb's values exactly.
    theirs = CLASSES[quant_type](q, st.absmax, st.shape, st.dtype, blocksize, offset=st.offset,
                                 absmax2=st.state2.absmax, code2=st.state2.code)
    assert torch.equal(theirs.dequantize(), bnb_dequantize(q, st))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(dtype):
    w = (torch.randn(40, 72) * 0.05).to(dtype)
    q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = NF4Weight.from_float(w, blocksize=64, double_quant=False)
    assert torch.equal(ours.packed, q) and torch.equal(ours.absmax, st.absmax)
    deq = ours.dequantize()
    assert deq.dtype == dtype and torch.equal(deq, bnb_dequantize(q, st))


def test_all_zero_blocks_dequantize_to_zero():
    w = torch.randn(4, 128) * 0.1
    w[1] = 0.0  # two whole zero blocks at blocksize 64
    assert torch.equal(NF4Weight.from_float(w, blocksize=64).dequantize()[1], torch.zeros(128))
    ours = NF4Weight.from_float(w, blocksize=64, double_quant=False)
    q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(ours.dequantize(), bnb_dequantize(q, st))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_params_round_trip_without_requantizing(quant_type):
    w = torch.randn(48, 80) * 0.05
    ours = CLASSES[quant_type].from_float(w, blocksize=64)
    param = ours.to_bnb()
    assert isinstance(param, bnb.nn.Params4bit)
    assert torch.equal(bnb_dequantize(param.data, param.quant_state), ours.dequantize())
    back = CLASSES[quant_type].from_bnb(param)
    assert back.packed.data_ptr() == param.data.data_ptr()  # shared, not copied
    assert torch.equal(back.dequantize(), ours.dequantize())
    with pytest.raises(ValueError, match="use"):
        CLASSES["fp4" if quant_type == "nf4" else "nf4"].from_bnb(param)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_from_bnb_reads_bytes_kept_in_another_storage_dtype(storage):
    """FSDP QLoRA sets bnb's quant_storage (e.g. bf16): the packed bytes are held as a bf16 / fp32
    tensor. from_bnb reads the same bytes (shared) and decodes as bnb's own Linear4bit computes."""
    torch.manual_seed(0)
    w = torch.randn(24, 128) * 0.05
    layer = bnb.nn.Linear4bit(128, 24, bias=False, quant_type="nf4", quant_storage=storage, compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=storage, blocksize=64)
    layer = layer.to("cpu")  # quantizes
    assert layer.weight.dtype == storage
    ours = NF4Weight.from_bnb(layer)
    assert ours.packed.data_ptr() == layer.weight.data_ptr()
    assert torch.equal(ours.packed.flatten(), NF4Weight.from_float(w, blocksize=64).packed.flatten())
    x = torch.randn(3, 128)
    assert torch.equal(layer(x), x @ ours.dequantize().T)


@pytest.mark.parametrize("nested", [True, False])
def test_state_dict_matches_linear4bit(nested):
    w = torch.randn(24, 40) * 0.05
    ours = NF4Weight.from_float(w, blocksize=64, double_quant=nested)
    layer = bnb.nn.Linear4bit(40, 24, bias=False, quant_type="nf4", compress_statistics=nested)
    layer.weight = ours.to_bnb()
    theirs = layer.state_dict()
    mine = ours.state_dict("weight")
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        if "quant_state" in key:
            assert json.loads(bytes(mine[key].tolist())) == json.loads(bytes(value.tolist()))
        else:
            assert torch.equal(mine[key], value), key
    loaded = NF4Weight.from_state_dict(theirs, "weight")
    assert torch.equal(loaded.dequantize(), ours.dequantize())


def test_bits_per_parameter():
    w = torch.randn(512, 512)
    assert NF4Weight.from_float(w, blocksize=64, double_quant=True).bits_per_parameter <= 4.13
    assert NF4Weight.from_float(w, blocksize=64, double_quant=False).bits_per_parameter == 4.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="blocksize must be one of"):
        NF4Weight.from_float(torch.randn(4, 4), blocksize=48)
    with pytest.raises(ValueError, match="must be 2-D"):
        NF4Weight.from_float(torch.randn(16))
    with pytest.raises(TypeError, match="floating-point"):
        NF4Weight.from_float(torch.ones(4, 4, dtype=torch.int32))
    w = torch.randn(4, 4)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        NF4Weight.from_float(w)
    with pytest.raises(KeyError, match="bitsandbytes__nf4"):
        NF4Weight.from_state_dict({"weight": torch.zeros(2, 1, dtype=torch.uint8)})


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 1024])
@pytest.mark.parametrize("shape", [(7, 37), (33, 129), (1, 5), (64, 64)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_triton_quantize_is_byte_identical_to_torch_path(quant_type, blocksize, shape, double_quant, kernel_device):
    from peft_kernels.quant.bnb4bit import _quantize_parts

    # fp32 weights, and 16-bit ones where the product of the parametrization allows (widened exactly)
    dtype = (torch.float32, torch.float16, torch.bfloat16)[(blocksize + sum(shape)) % 3]
    w = (torch.randn(*shape) * 0.05).to(dtype)
    w.view(-1)[:3] = 0.0  # zeros and (for small shapes) an all-zero or partial block
    w.view(-1)[-2:] = -0.0  # FP4 has both zeros: the sign nibble of exact zeros must follow the torch path
    ref_packed, ref_absmax, ref_nested = _quantize_parts(w, quant_type, blocksize, double_quant, use_triton=False)
    packed, absmax, nested = _quantize_parts(w.to(kernel_device), quant_type, blocksize, double_quant,
                                             use_triton=True)
    assert torch.equal(packed.cpu(), ref_packed) and torch.equal(absmax.cpu(), ref_absmax)
    assert (nested is None) == (ref_nested is None) == (not double_quant)
    if double_quant:
        for got, want in zip(nested, ref_nested):
            assert got.dtype == want.dtype and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("tail", [0, 1, 100, 255])
def test_triton_nested_quantize_is_byte_identical_to_torch_path(tail, kernel_device):
    """The 8-bit double quantization alone, on absmax vectors spanning several 256-blocks with a
    partial (or no) last one and a block of equal values (scaled by their own tiny absmax)."""
    from peft_kernels.quant.bnb4bit import _quantize_nested_torch
    from peft_kernels.triton.quantize import quantize_nested

    absmax = torch.rand(3 * 256 + tail) * 0.1
    absmax[256:512] = absmax.mean()
    want = _quantize_nested_torch(absmax)
    got = quantize_nested(absmax.to(kernel_device))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w)
    assert want[0].unique().numel() > 50  # the codes cover much of the map


def test_triton_nested_quantize_breaks_midpoint_ties_like_torch(kernel_device):
    """Values exactly on the dynamic map's midpoints (offset 0 and block absmax 1, so the scaled
    value is the input) go to the lower sorted entry, as torch.bucketize does; every midpoint and
    both of its neighbouring floats are tried."""
    from peft_kernels.quant.bnb4bit import _quantize_nested_torch, code_search_tables
    from peft_kernels.triton.quantize import quantize_nested

    mids, _ = code_search_tables("dynamic")
    values = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    absmax = torch.cat([torch.tensor([1.0]), values, torch.zeros(256 - (values.numel() + 1) % 256)])
    zero = torch.zeros(())
    want = _quantize_nested_torch(absmax, zero)
    got = quantize_nested(absmax.to(kernel_device), zero.to(kernel_device))
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    assert want[0].unique().numel() == 256  # every code is reached


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_triton_quantize_counts_nonfinite_values(bad, kernel_device):
    from peft_kernels.quant.bnb4bit import _quantize_parts
    from peft_kernels.triton.quantize import quantize_4bit

    w = torch.randn(9, 70)
    assert quantize_4bit(w.to(kernel_device), "nf4", 64)[2].item() == 0
    w[4, 69] = bad
    w[8, 1] = bad
    assert quantize_4bit(w.to(kernel_device), "nf4", 64)[2].item() == 2
    with pytest.raises(ValueError, match="NaN or Inf"):
        _quantize_parts(w.to(kernel_device), "nf4", 64, True, use_triton=True)
