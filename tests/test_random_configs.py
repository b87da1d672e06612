"""Random configurations, the triton backend (interpreted in the CPU tier, compiled in the GPU
tier) against the torch reference: shapes from 0 rows, transposed and gapped strides, fp32/fp16, a
bias that is a strided view or none, dropout, block masks, any subset of inputs needing grad,
several SM counts (split reductions) — for every fused linear op. Each configuration is drawn from a fixed seed, so a failure names a reproducible case.
(A run of this kind found the strided-bias bug and the sparse M = 0 and whole-weight-block bugs.)"""
import random

import pytest
import torch

import peft_kernels
from peft_kernels.quant import FP4Weight, Int4Weight, Int8Weight, NF4Weight
from peft_kernels.triton import lora as triton_lora

from helpers import rel_err

OPS = ["lora", "dora", "qlora", "qdora", "quant_linear", "sparse"]
QUANT = {"nf4": lambda w: NF4Weight.from_float(w, blocksize=64), "fp4": lambda w: FP4Weight.from_float(w, blocksize=64),
         "int8": Int8Weight.from_float, "int4": lambda w: Int4Weight.from_float(w, group_size=32)}


class _Arg:
    """Values with a storage layout: contiguous, transposed (2-D) or gapped (every other column of
    a twice-as-wide buffer). Each run makes a fresh leaf storage (so the view keeps its strides:
    .clone() of a gapped view would be contiguous) and passes the view; grads are read on the leaf."""

    def __init__(self, values, kind="contiguous"):
        self.values, self.kind = values, kind

    def leaf_and_view(self, requires_grad):
        v = self.values
        if self.kind == "transposed" and v.dim() == 2:
            leaf = v.t().contiguous().requires_grad_(requires_grad)
            return leaf, leaf.t()
        if self.kind == "gapped":
            leaf = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype, device=v.device)
            leaf[..., ::2] = v
            leaf.requires_grad_(requires_grad)
            return leaf, leaf[..., ::2]
        leaf = v.clone().requires_grad_(requires_grad)
        return leaf, leaf


def _case(op, seed, device):
    """(dtype, triton's outputs and grads, the reference's) for configuration ``seed`` of ``op``;
    values drawn on the CPU, then moved to ``device``."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.float16])
    M = rng.choice([0, 1, rng.randint(2, 40)])
    K = rng.choice([1, 3, 33, 64, 100]) if op in ("lora", "dora") else rng.choice([64, 128])
    N, r = rng.randint(1, 70), rng.choice([1, 5, 16, 17])
    block = rng.choice([None, (1, 16), (16, 16), (32, 32)]) if op == "sparse" else None
    if block is not None:  # block masks: the weight a whole number of blocks (sometimes just one)
        N, K = block[0] * rng.randint(1, 3), block[1] * rng.randint(1, 3)
    x = _Arg(torch.randn(M, K, generator=g).to(dtype), rng.choice(["contiguous", "transposed", "gapped"]))
    w = torch.randn(N, K, generator=g).to(dtype) / K**0.5
    a = _Arg((torch.randn(r, K, generator=g) / K**0.5).to(dtype), rng.choice(["contiguous", "transposed"]))
    b = _Arg(torch.randn(N, r, generator=g).to(dtype), rng.choice(["contiguous", "transposed"]))
    m = _Arg((torch.rand(N, generator=g) + 0.5).to(dtype))
    bias = rng.choice([None, _Arg(torch.randn(N, generator=g).to(dtype)),
                       _Arg(torch.randn(N, generator=g).to(dtype), "gapped")])
    p, s = rng.choice([0.0, 0.3]), rng.choice([0.5, 2.0])
    if op in ("qlora", "qdora", "quant_linear"):
        w = QUANT[rng.choice(["nf4", "fp4"] if op == "quant_linear" else ["nf4", "int8", "int4"])](w)
    if op == "sparse":
        slots = N * K if block is None else (N // block[0]) * (K // block[1])
        k = rng.randint(1, slots)
        a = _Arg(torch.randn(k, *(block or ()), generator=g).to(dtype))  # the delta's values
        b = torch.randperm(slots, generator=g)[:k].sort().values.to(torch.int32)  # and positions
    need = [rng.random() < 0.8 for _ in range(3)] + [True]
    sms = rng.choice([1, 8])
    for arg in (x, a, b, m, bias):
        if isinstance(arg, _Arg):
            arg.values = arg.values.to(device)
    w = w.to(device)
    if op == "sparse":
        b = b.to(device)  # the delta's positions

    def run(backend):
        pairs = [t.leaf_and_view(n) if isinstance(t, _Arg) else (None, t) for t, n in zip((x, a, b, m), need)]
        pairs.append((None, None) if bias is None else bias.leaf_and_view(True))
        X, A, B, Mg, Bias = (view for _, view in pairs)
        kw = dict(scaling=s, dropout_p=p, seed=5, backend=backend)
        y = {"lora": lambda: peft_kernels.lora_linear(X, w, A, B, Bias, **kw),
             "dora": lambda: peft_kernels.dora_linear(X, w, A, B, Mg, Bias, **kw),
             "qlora": lambda: peft_kernels.qlora_linear(X, w, A, B, Bias, **kw),
             "qdora": lambda: peft_kernels.dora_linear(X, w, A, B, Mg, Bias, **kw),
             "quant_linear": lambda: peft_kernels.quant_linear(X, w, Bias, backend=backend),
             "sparse": lambda: peft_kernels.sparse_delta_linear(X, w, A, B, Bias, shape_or_block=block,
                                                                backend=backend)}[op]()
        if y.requires_grad:
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype))
        return [y.detach()] + [leaf.grad for leaf, _ in pairs if leaf is not None and leaf.requires_grad]

    with triton_lora.launch_override(dora_bm=16, dora_bn=16, sms=sms):
        got = run("triton")
    return dtype, got, run("torch")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("seed", range(25))
def test_triton_equals_reference_on_random_configurations(op, seed, kernel_device):
    dtype, got, want = _case(op, 1000 * OPS.index(op) + seed, kernel_device)
    assert len(got) == len(want)
    for i, (u, v) in enumerate(zip(got, want)):
        assert (u is None) == (v is None), f"output {i}: a gradient on one backend only"
        if v is None:  # an input this op does not use (the magnitude outside DoRA)
            continue
        assert u.shape == v.shape and u.dtype == v.dtype, i
        if v.numel() and v.abs().max() > 0:
            assert rel_err(u, v) <= (1e-4 if dtype == torch.float32 else 2e-2), f"output {i}"
