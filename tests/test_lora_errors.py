"""Bad inputs raise clear errors before anything runs; inputs are left untouched."""
import pytest
import torch

import peft_kernels


def _good(dtype=torch.float32):
    return dict(x=torch.randn(2, 3, 8, dtype=dtype), weight=torch.randn(6, 8, dtype=dtype),
                lora_A=torch.randn(2, 8, dtype=dtype), lora_B=torch.randn(6, 2, dtype=dtype),
                bias=torch.randn(6, dtype=dtype))


def _call(backend="torch", **over):
    args = _good()
    kwargs = {k: over.pop(k) for k in ("scaling", "dropout_p", "seed") if k in over}
    args.update(over)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and not v.is_meta}
    try:
        return peft_kernels.lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"], args["bias"],
                                        backend=backend, **kwargs)
    finally:
        for k, v in snapshot.items():
            assert torch.equal(args[k], v), f"{k} was modified"


@pytest.mark.parametrize("over,match", [
    (dict(x=torch.randn(2, 7)), "last dim must equal weight's in_features 8"),
    (dict(lora_A=torch.randn(2, 9)), r"lora_A must be \[r, in\]"),
    (dict(lora_B=torch.randn(5, 2)), r"lora_B must be \[out, r\] = \[6, 2\]"),
    (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), "rank r must be >= 1"),
    (dict(bias=torch.randn(5)), r"bias must be \[6\]"),
    (dict(weight=torch.randn(6, 8, dtype=torch.float64)), "weight dtype torch.float64 must equal x dtype"),
    (dict(lora_B=torch.randn(6, 2, dtype=torch.float16)), "must share a dtype"),
    (dict(weight=torch.randn(6, 8, device="meta")), "all tensors must be on one device"),
    (dict(weight=torch.randn(6, 8, 1)), "weight must be 2-D"),
    (dict(scaling=float("nan")), "scaling must be finite"),
    (dict(dropout_p=1.0), "dropout_p must be < 1.0"),
    (dict(dropout_p=-0.1), "dropout_p must be >= 0.0"),
])
def test_bad_inputs_raise_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


def test_type_errors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        _call(x=[1.0] * 8)
    with pytest.raises(TypeError, match="seed must be an int"):
        _call(dropout_p=0.1, seed=1.5)
    with pytest.raises(TypeError, match="scaling must be a Python number"):
        _call(scaling=torch.tensor(1.0))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        _call(x=torch.ones(2, 8, dtype=torch.int64))


def test_backend_errors():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        _call(backend="nope")
    with pytest.raises(RuntimeError, match="backend 'cuda' unavailable: the cuda backend needs a CUDA tensor"):
        _call(backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tier: triton runs interpreted")
def test_triton_limits():
    args = _good(torch.float64)
    with pytest.raises(ValueError, match="triton backend takes fp16/bf16/fp32"):
        peft_kernels.lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"], backend="triton")
    with pytest.raises(ValueError, match="supports r <= 256, got r=257"):
        peft_kernels.lora_linear(torch.randn(2, 8), torch.randn(6, 8), torch.randn(257, 8), torch.randn(6, 257),
                                 backend="triton")
    # The interpreter's tl.dot on bf16 returned ~1e10 relative error: refused, also under autocast
    bf16 = _good(torch.bfloat16)
    with pytest.raises(ValueError, match="computes tl.dot on bf16 operands wrongly"):
        peft_kernels.lora_linear(bf16["x"], bf16["weight"], bf16["lora_A"], bf16["lora_B"], backend="triton")
    from peft_kernels.quant import NF4Weight
    q = NF4Weight.from_float(torch.randn(6, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(ValueError, match="qlora_linear: the Triton interpreter"):
        peft_kernels.qlora_linear(torch.randn(3, 64), q, torch.randn(2, 64), torch.randn(6, 2), backend="triton")


def test_env_override(monkeypatch):
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PEFT_KERNELS_BACKEND='bogus'"):
        _call(backend="auto")
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "torch")
    _call(backend="auto")
    assert peft_kernels.backends.last_used("lora_linear") == "torch"
