"""expert_matmul (an MoE experts layer's grouped product, peft_kernels/ops/expert_matmul.py): grouped_mm
and the loop over experts against a per-expert float64 product, its custom ops' fake implementations,
torch.compile, what backward keeps and forms, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from helpers import FLOOR, rel_err
from peft_kernels.ops.expert_matmul import expert_matmul


def _groups(sizes):
    return torch.tensor(sizes).cumsum(0).to(torch.int32)


def _reference(x, w, sizes):
    return torch.cat([p @ w[e] for e, p in enumerate(torch.split(x, sizes))])


def _case(sizes, k, n, dtype, transposed, w_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), k, generator=g, dtype=torch.float64)
    w = torch.randn(len(sizes), n, k, generator=g, dtype=torch.float64).transpose(-2, -1) if transposed \
        else torch.randn(len(sizes), k, n, generator=g, dtype=torch.float64)
    dy = torch.randn(sum(sizes), n, generator=g, dtype=torch.float64)
    return x, w, dy


def _run(fn, x, w, dy, dtype, w_grad=True):
    xi = x.detach().to(dtype).requires_grad_()
    wi = w.detach().to(dtype).requires_grad_(w_grad)
    y = fn(xi, wi)
    y.backward(dy.to(dtype))
    return [y.detach(), xi.grad] + ([wi.grad] if w_grad else [])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True], ids=["w-rows", "w-transposed-view"])
@pytest.mark.parametrize("k,n", [(16, 24), (13, 7)], ids=["aligned", "odd"])
def test_matches_per_expert_products(dtype, transposed, k, n, monkeypatch):
    """Output, dX and dW against the per-expert float64 product, within 2x the error of the same
    per-expert product in ``dtype`` (experts without rows included); aligned fp32/bf16/fp16 widths
    run torch's grouped_mm (forward, dX, dW), float64 and odd widths the loop."""
    sizes = [5, 0, 9, 1, 0, 7]
    x, w, dy = _case(sizes, k, n, dtype, transposed)
    ends = _groups(sizes)
    calls = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ours = _run(lambda xi, wi: expert_matmul(xi, wi, ends), x, w, dy, dtype)
    grouped = len(calls)
    ref = _run(lambda xi, wi: _reference(xi, wi, sizes), x, w, dy, torch.float64)
    plain = _run(lambda xi, wi: _reference(xi, wi, sizes), x, w, dy, dtype)
    assert grouped == (3 if dtype != torch.float64 and k == 16 else 0)
    for i, (o, p, r) in enumerate(zip(ours, plain, ref)):
        assert o.dtype == dtype and o.shape == r.shape, i
        assert rel_err(o, r) <= max(2 * rel_err(p, r), FLOOR[dtype]), i
    assert torch.count_nonzero(ours[2][[1, 4]]) == 0, "an expert without rows gets a zero gradient"


def test_frozen_w_keeps_no_x():
    """A w without grad (a frozen expert weight): x is not kept for backward, and dX is right."""
    sizes = [3, 4]
    x, w, dy = _case(sizes, 8, 8, torch.float32, False)
    xi, ends = x.float().requires_grad_(), _groups(sizes)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = expert_matmul(xi, w.float(), ends)
    assert saved and not any(t.shape == xi.shape for t in saved), "x is kept only for dW"
    y.backward(dy.float())
    want = _run(lambda a, b: _reference(a, b, sizes), x, w, dy, torch.float64, w_grad=False)[1]
    assert rel_err(xi.grad, want) <= FLOOR[torch.float32]


def test_no_rows():
    w = torch.randn(3, 8, 8, requires_grad=True)
    x = torch.randn(0, 8, requires_grad=True)
    y = expert_matmul(x, w, torch.zeros(3, dtype=torch.int32))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8) and torch.count_nonzero(w.grad) == 0


def test_custom_ops_pass_opcheck():
    """The fake (meta) implementations agree with the real ones in shape, dtype and strides."""
    x, w, dy = _case([4, 0, 5], 16, 8, torch.float32, True)
    x, w, dy = x.float(), w.float(), dy.float()
    ends = _groups([4, 0, 5])
    torch.library.opcheck(torch.ops.peft_kernels.expert_mm_fwd, (x, w, ends))
    for need_dx, need_dw in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.peft_kernels.expert_mm_bwd, (dy, x, w, ends, need_dx, need_dw))


def test_compiles_fullgraph():
    sizes = [3, 0, 6]
    x, w, dy = _case(sizes, 16, 8, torch.float32, True)
    ends = _groups(sizes)
    compiled = torch.compile(lambda a, b: expert_matmul(a, b, ends), fullgraph=True)
    eager = _run(lambda a, b: expert_matmul(a, b, ends), x, w, dy, torch.float32)
    for got, want in zip(_run(compiled, x, w, dy, torch.float32), eager):
        assert rel_err(got, want) <= FLOOR[torch.float32]


def test_bad_input_raises_clearly():
    x, w = torch.randn(5, 8), torch.randn(2, 8, 4)
    ends = _groups([2, 3])
    with pytest.raises(ValueError, match="int32"):
        expert_matmul(x, w, ends.long())
    with pytest.raises(ValueError, match="x is torch.float32 but w is torch.float64"):
        expert_matmul(x, w.double(), ends)
    with pytest.raises(ValueError, match="do not fit"):
        expert_matmul(x, torch.randn(2, 7, 4), ends)
    with pytest.raises(ValueError, match="do not fit"):
        expert_matmul(x, w, _groups([1, 1, 3]))
    with pytest.raises(ValueError, match="3-D"):
        expert_matmul(x, w[0], ends)
