"""Sparse deltas (issue: sparse gradient masking): SDDMM kernels, the op, the module, SparseAdamW,
regrowth, mask_gradients_, save/load, and bad input. Oracles: float64 dense gradients, masked."""
import copy

import pytest
import torch
from torch import nn

import peft_kernels
from peft_kernels.nn import SparseDeltaLinear
from peft_kernels.reference import sparse as ref_sparse
from peft_kernels.sparse import SparseAdamW, layout, load_sparse_delta, mask_gradients_, save_sparse_delta
from peft_kernels.triton import sparse as tri_sparse

from helpers import FLOOR, rel_err

BACKENDS = ["torch", "triton"]


def _device(backend, kernel_device):
    return kernel_device if backend == "triton" else torch.device("cpu")


def _random_index(shape, k, block=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(layout.grid_size(shape, block), generator=g)[:k]).values.to(torch.int32)


def _dense_at(dense, index, shape, block):
    """dense [out, in] read at the delta's positions, in values' layout."""
    pos = layout.element_positions(index, shape, block)
    return dense.reshape(-1)[pos.to(dense.device)].reshape(layout.values_shape(index.numel(), block))


def _check_sddmm(fn, gy, x, index, shape, block):
    """fn's dDelta vs the float64 dense gradient at the positions: error <= 2x an eager dense
    gradient in the inputs' dtype (the tolerance idiom), or the dtype floor."""
    ref = _dense_at(gy.double().T @ x.double(), index, shape, block)
    eager = _dense_at((gy.T @ x).float(), index, shape, block)
    out = fn(gy, x, index.to(x.device), shape, block)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_err(out, ref) <= max(2 * rel_err(eager, ref), FLOOR[x.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method", ["panel", "gather_t"])
@pytest.mark.parametrize("density", [0.003, 0.1, 1.0])
def test_triton_sddmm_unstructured(dtype, method, density, kernel_device, monkeypatch):
    """Odd shapes, M not a multiple of the token step; panels of 4 rows, so many panels, a
    partial last one, and (at low density) panels without entries that are skipped."""
    monkeypatch.setattr(tri_sparse, "PANEL_ELEMENTS", 4 * 70)
    shape, M = (53, 70), 37
    k = max(1, round(density * shape[0] * shape[1]))
    index = _random_index(shape, k)
    gy = torch.randn(M, shape[0], device=kernel_device).to(dtype)
    x = torch.randn(M, shape[1], device=kernel_device).to(dtype)
    _check_sddmm(lambda *a: tri_sparse.sddmm(*a, method=method), gy, x, index, shape, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block", [(16, 16), (3, 5), (8, 32)])
def test_triton_sddmm_blocks(dtype, block, kernel_device):
    shape, M = (48, 160), 37
    grid = layout.grid_size(shape, block)
    index = _random_index(shape, max(1, grid // 3), block)
    gy = torch.randn(M, shape[0], device=kernel_device).to(dtype)
    x = torch.randn(M, shape[1], device=kernel_device).to(dtype)
    _check_sddmm(tri_sparse.sddmm, gy, x, index, shape, block)


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("block", [None, (3, 5), (136, 8)], ids=["unstructured", "3x5", "taller than MAX_BLOCK_SIDE"])
def test_triton_sddmm_no_entries_and_blocks_beyond_the_kernel(k, block, kernel_device):
    """An empty delta (k = 0) gives an empty dDelta; a block side above MAX_BLOCK_SIDE (136 > 128)
    leaves the tile kernel for batched products, still writing only the masked blocks."""
    assert max(block or (0,)) <= tri_sparse.MAX_BLOCK_SIDE or block == (136, 8)
    shape, M = (272, 40), 9
    index = _random_index(shape, k, block, seed=k)
    gy, x = torch.randn(M, shape[0], device=kernel_device), torch.randn(M, shape[1], device=kernel_device)
    _check_sddmm(tri_sparse.sddmm, gy, x, index, shape, block)
    if block is None:
        for method in ("panel", "gather_t"):
            _check_sddmm(lambda *a: tri_sparse.sddmm(*a, method=method), gy, x, index, shape, block)
        with pytest.raises(ValueError, match="method must be 'panel' or 'gather_t'"):
            tri_sparse.sddmm(gy, x, _random_index(shape, 2).to(kernel_device), shape, None, method="dense")


def test_triton_transpose(kernel_device):
    t = torch.randn(70, 131, device=kernel_device).half()[:, 3:100]
    assert torch.equal(tri_sparse.transpose(t), t.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_sddmm_blocks_split_over_tokens(dtype, kernel_device):
    """Few blocks and many tokens: the token range is split across programs that add into a
    zeroed output (the fill-the-GPU path), including a short last slice."""
    shape, M = (48, 160), 700
    index = torch.tensor([3, 17], dtype=torch.int32)
    gy = torch.randn(M, shape[0], device=kernel_device).to(dtype)
    x = torch.randn(M, shape[1], device=kernel_device).to(dtype)
    _check_sddmm(tri_sparse.sddmm, gy, x, index, shape, (16, 16))


@pytest.mark.parametrize("block", [None, (4, 5)])
def test_reference_sddmm_chunks(block, monkeypatch):
    """The reference in small chunks equals one pass (no [out, in] buffer, any chunking)."""
    shape, M = (40, 55), 23
    index = _random_index(shape, 97 if block is None else 30, block)
    gy, x = torch.randn(M, shape[0]), torch.randn(M, shape[1])
    _check_sddmm(ref_sparse.sddmm, gy, x, index, shape, block)
    # Chunks sum in another order: compared on float64 inputs, fp32 sums differed past 1e-6 in ~2 %
    # of draws by rounding order alone, which says nothing about the chunking.
    gy, x = gy.double(), x.double()
    whole = ref_sparse.sddmm(gy, x, index, shape, block)
    monkeypatch.setattr(ref_sparse, "CHUNK_ELEMENTS", 50)
    assert torch.allclose(ref_sparse.sddmm(gy, x, index, shape, block), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["panel", "gather_t"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_reference_sddmm_methods(method, dtype, monkeypatch):
    """Both CPU methods of the reference's unstructured dDelta against the float64 dense gradient:
    panels of 3 rows (a short last one, panels without entries skipped), gather_t in chunks of a
    few entries; fp16 inputs accumulate in fp32, fp64 stays fp64."""
    monkeypatch.setattr(ref_sparse, "PANEL_MIN_DENSITY", 0.0 if method == "panel" else 2.0)
    monkeypatch.setattr(ref_sparse, "PANEL_ELEMENTS", 3 * 55)
    monkeypatch.setattr(ref_sparse, "CHUNK_ELEMENTS", 23 * 4)
    shape, M = (40, 55), 23
    index = _random_index(shape, 97)
    index = index[(index // 55 < 9) | (index // 55 > 20)]  # rows 9..20: four panels with no entry
    gy, x = torch.randn(M, shape[0]).to(dtype), torch.randn(M, shape[1]).to(dtype)
    got = ref_sparse.sddmm(gy, x, index, shape, None)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = (gy.double().t() @ x.double()).view(-1)[index.long()]
    assert torch.allclose(got.double(), want, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-5)


def _oracle_linear(x, w0, values, index, bias, block):
    """Dense autograd formula: W = W0 + scatter(values)."""
    shape = tuple(w0.shape)
    pos = layout.element_positions(index, shape, block).to(w0.device)
    delta = torch.zeros(w0.numel(), dtype=values.dtype, device=w0.device).index_put((pos,), values.reshape(-1))
    w = w0 + delta.view(shape).to(w0.dtype)
    return torch.nn.functional.linear(x, w, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block", [None, (3, 5)])
@pytest.mark.parametrize("merged", [False, True])
def test_sparse_delta_linear_matches_oracle(backend, dtype, block, merged, kernel_device):
    device = _device(backend, kernel_device)
    shape = (51, 70)
    index = _random_index(shape, 120 if block is None else 40, block).to(device)
    w0 = (torch.randn(shape, device=device) / 8).to(dtype)
    values = (torch.randn(layout.values_shape(index.numel(), block), device=device) / 8).to(dtype)
    bias = torch.randn(shape[0], device=device).to(dtype)
    x = torch.randn(3, 7, shape[1], device=device).to(dtype)
    gout = torch.randn(3, 7, shape[0], device=device).to(dtype)

    def grads(fn, dt):
        xs, vs, bs = (t.detach().to(dt).requires_grad_() for t in (x, values, bias))
        y = fn(xs, vs, bs)
        y.backward(gout.to(dt))
        return [y.detach(), xs.grad, vs.grad, bs.grad]

    w_in = w0.clone()
    if merged:
        w_in.view(-1)[layout.element_positions(index, shape, block)] += values.reshape(-1)
    w_before = w_in.clone()
    ours = grads(lambda a, v, b: peft_kernels.sparse_delta_linear(a, w_in, v, index, b, shape_or_block=block,
                                                                  merged=merged, backend=backend), dtype)
    assert torch.equal(w_in, w_before), "the weight must be left bit-exact"
    eager = grads(lambda a, v, b: _oracle_linear(a, w0, v, index, b, block), dtype)
    exact = grads(lambda a, v, b: _oracle_linear(a, w0.double(), v, index, b, block), torch.float64)
    for name, o, e, r in zip(["y", "dx", "dvalues", "dbias"], ours, eager, exact):
        assert o.dtype == e.dtype and o.shape == e.shape, name
        assert rel_err(o, r) <= max(2 * rel_err(e, r), FLOOR[dtype]), name


def test_no_dense_weight_gradient(kernel_device):
    """The frozen weight never receives a gradient; the values get exactly k numbers."""
    lin = nn.Linear(40, 30).to(kernel_device)
    sd = SparseDeltaLinear.from_linear(lin, density=0.05)
    sd(torch.randn(5, 40, device=kernel_device)).sum().backward()
    assert sd.weight.grad is None and sd.delta_values.grad.shape == (60,)


def _trained_layer(block=None):
    torch.manual_seed(4)
    lin = nn.Linear(24, 16, dtype=torch.float64)
    sd = SparseDeltaLinear.from_linear(lin, density=0.25, block=block, values_dtype=torch.float64, backend="torch")
    with torch.no_grad():
        sd.delta_values.normal_()
    return sd


def _exact(sd, x, gy):
    """Output and (dx, dvalues) of x @ (W0 + Delta)^T + b by dense float64 autograd."""
    w0 = sd.base_weight()
    delta = torch.zeros_like(w0).view(-1).index_put((sd._positions(),), sd.delta_values.detach().reshape(-1))
    x = x.detach().clone().requires_grad_()
    values = sd.delta_values.detach().clone().requires_grad_()
    dense = w0.view(-1).index_put((sd._positions(),), w0.view(-1)[sd._positions()] + values.reshape(-1))
    y = torch.nn.functional.linear(x, dense.view_as(w0), sd.bias)
    y.backward(gy)
    assert delta.abs().sum() > 0
    return y.detach(), x.grad, values.grad


@pytest.mark.parametrize("block", [None, (4, 8)])
@pytest.mark.parametrize("how", ["assign", "swapped", "deepcopy", "pickle"])
def test_layer_whose_weight_was_replaced_merges_around_each_product(block, how, tmp_path):
    """keeps_merged: a weight put in the layer's place by someone else (FSDP's shards and gathered
    copies, load_state_dict(assign=True)) may hold W0 or a stale W0 + delta at the positions, and
    a write into it may not last until backward: the layer then merges base_values + delta
    around each product. A copied or unpickled layer adopts its own weight."""
    import pickle
    sd = _trained_layer(block)
    x, gy = torch.randn(5, 24, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    sd(x)  # the adopted weight now holds W0 + delta at the positions
    if how == "assign":
        sd.load_state_dict(sd.state_dict(), assign=True)  # a new Parameter, W0 + delta at the positions
    elif how == "swapped":  # a stand-in that holds a stale delta there, as an FSDP shard can
        stale = sd.weight.detach().clone()
        stale.view(-1)[sd._positions()] += 0.5
        sd.weight = nn.Parameter(stale, requires_grad=False)
    elif how == "deepcopy":
        sd = copy.deepcopy(sd)
    else:
        path = tmp_path / "layer.pt"
        path.write_bytes(pickle.dumps(sd))
        sd = pickle.loads(path.read_bytes())
    assert sd.keeps_merged == (how in ("deepcopy", "pickle"))
    before = sd.weight.detach().clone()
    y_ref, dx_ref, dv_ref = _exact(sd, x, gy)
    xs = x.clone().requires_grad_()
    sd.delta_values.grad = None
    y = sd(xs)
    y.backward(gy)
    assert torch.allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(xs.grad, dx_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(sd.delta_values.grad, dv_ref, rtol=1e-12, atol=1e-12)
    if not sd.keeps_merged:
        assert torch.equal(sd.weight, before)  # put back after each product, never merged into
    assert torch.allclose(sd.merge(), (sd.base_weight().view(-1).index_put(
        (sd._positions(),), sd.base_values + sd.delta_values.detach().reshape(-1))).view_as(before))


def test_sparse_adamw_leaves_a_replaced_weight_alone():
    sd = _trained_layer()
    sd.load_state_dict(sd.state_dict(), assign=True)
    before = sd.weight.detach().clone()
    opt = SparseAdamW(sd, lr=0.1)
    sd(torch.randn(3, 24, dtype=torch.float64)).sum().backward()
    old = sd.delta_values.detach().clone()
    opt.step()
    assert not torch.equal(sd.delta_values, old) and torch.equal(sd.weight, before)


def test_base_values_argument_is_checked():
    sd = _trained_layer()
    x = torch.randn(2, 24, dtype=torch.float64)
    args = (x, sd.weight, sd.delta_values, sd.delta_index)
    with pytest.raises(ValueError, match="base_values is for merged=False"):
        peft_kernels.sparse_delta_linear(*args, merged=True, base_values=sd.base_values)
    with pytest.raises(ValueError, match="base_values must hold W0 at the 96 delta positions"):
        peft_kernels.sparse_delta_linear(*args, base_values=sd.base_values[:-1])


def test_extremes_one_entry_and_full(kernel_device):
    lin = nn.Linear(9, 7, dtype=torch.float64)
    x = torch.randn(4, 9, dtype=torch.float64)
    for n in (1, 63):
        sd = SparseDeltaLinear.from_linear(lin, num_params=n, values_dtype=torch.float64, backend="torch")
        with torch.no_grad():
            sd.delta_values.copy_(torch.randn(n, dtype=torch.float64))
        gy = torch.randn(4, 7, dtype=torch.float64)
        sd(x).backward(gy)
        dense = (gy.T @ x).reshape(-1)[sd.delta_index.long()]
        assert torch.allclose(sd.delta_values.grad, dense, rtol=1e-12, atol=1e-12)
        assert torch.allclose(sd(x), x @ sd.merge().T + lin.bias, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [None, (16, 16), (32, 64)], ids=["unstructured", "16x16", "one block = the weight"])
def test_no_tokens_and_a_block_as_large_as_the_weight(backend, block, kernel_device):
    """M = 0 gives an empty output and a zero dDelta (the triton block path divided by M); a block
    equal to weight.shape is a block (the values are [nb, bh, bw]), not the unstructured layout."""
    device = _device(backend, kernel_device)
    shape = (32, 64)
    k = 1 if block == shape else 3
    index = _random_index(shape, k, block, seed=k).to(device)
    values = torch.randn(layout.values_shape(k, block), device=device, requires_grad=True)
    w = torch.randn(*shape, device=device)
    for M in (0, 5):
        x = torch.randn(M, 64, device=device, requires_grad=True)
        y = peft_kernels.sparse_delta_linear(x, w, values, index, shape_or_block=block, backend=backend)
        assert y.shape == (M, 32)
        gy = torch.randn_like(y)
        y.backward(gy)
        want = _dense_at(gy.T @ x.detach(), index, shape, block)
        assert torch.allclose(values.grad, want, rtol=1e-5, atol=1e-5)
        values.grad = None


@pytest.mark.parametrize("mask", ["random", "magnitude", "gradient", "bool", "callable"])
def test_masks(mask):
    torch.manual_seed(0)
    lin = nn.Linear(30, 20)
    w = lin.weight.detach()
    scores = torch.randn(20, 30).abs()
    kw = {"random": dict(mask="random", seed=3), "magnitude": dict(mask="magnitude"),
          "gradient": dict(mask="gradient", scores=scores), "bool": dict(mask=scores > 1.5),
          "callable": dict(mask=lambda weight: weight.abs() * 0 + scores)}[mask]
    sd = SparseDeltaLinear.from_linear(lin, density=0.1, **kw)
    idx = sd.delta_index.long()
    if mask == "magnitude":
        assert w.abs().reshape(-1)[idx].min() >= torch.topk(w.abs().reshape(-1), 60).values.min()
    elif mask in ("gradient", "callable"):
        assert torch.equal(idx, torch.sort(torch.topk(scores.reshape(-1), 60).indices).values)
    elif mask == "bool":
        assert torch.equal(idx, (scores > 1.5).reshape(-1).nonzero().reshape(-1))
    else:
        assert idx.numel() == 60 and torch.equal(
            idx, SparseDeltaLinear.from_linear(lin, density=0.1, seed=3).delta_index.long())
    assert bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(sd(torch.ones(2, 30)), lin(torch.ones(2, 30)))  # a fresh delta is zero


def test_block_masks():
    lin = nn.Linear(64, 32)
    sd = SparseDeltaLinear.from_linear(lin, density=0.25, block=(8, 16), mask="magnitude")
    assert sd.delta_values.shape == (4, 8, 16)
    norms = lin.weight.detach().reshape(4, 8, 4, 16).pow(2).sum((1, 3)).reshape(-1)
    assert torch.equal(sd.delta_index.long(), torch.sort(torch.topk(norms, 4).indices).values)
    full = torch.zeros(32, 64, dtype=torch.bool)
    full[8:16, 16:32] = True
    sd2 = SparseDeltaLinear.from_linear(lin, mask=full, block=(8, 16))
    assert sd2.delta_index.tolist() == [1 * 4 + 1]
    half = full.clone()
    half[8, 16] = False
    with pytest.raises(ValueError, match="whole"):
        SparseDeltaLinear.from_linear(lin, mask=half, block=(8, 16))


def _dense_adamw_then_mask(w_shape, pos, values, grads, lr, wd, betas, eps):
    """torch.optim.AdamW on a dense delta whose gradient is zero off the mask, read at the mask."""
    dense = torch.zeros(w_shape, dtype=torch.float64).reshape(-1)
    dense[pos] = values.double()
    p = nn.Parameter(dense.clone())
    opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for g in grads:
        gd = torch.zeros_like(dense)
        gd[pos] = g.double()
        p.grad = gd
        opt.step()
    return p.detach()[pos]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [None, (2, 3)])
def test_sparse_adamw_equals_dense_adamw_masked(backend, block, kernel_device):
    """Three steps of SparseAdamW vs torch.optim.AdamW applied densely then masked (float64
    oracle; the fp32 kernels are held to 2x torch's own fp32 AdamW error, or 1e-6), and the
    merged weight equals base + values after every step."""
    device = _device(backend, kernel_device)
    lin = nn.Linear(30, 20).to(device)
    sd = SparseDeltaLinear.from_linear(lin, density=0.2, block=block, backend=backend)
    k = sd.delta_values.numel()
    with torch.no_grad():
        sd.delta_values.copy_(torch.randn_like(sd.delta_values) * 0.1)
    init = sd.delta_values.detach().clone().reshape(-1).cpu()
    grads = [torch.randn(k) for _ in range(3)]
    hp = dict(lr=0.01, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    opt = SparseAdamW(sd, **hp)
    base_w0 = sd.base_weight()
    for g in grads:
        sd.delta_values.grad = g.to(device).reshape(sd.delta_values.shape)
        if backend == "triton" and device.type == "cpu":  # run the Triton kernel under the interpreter
            st = opt._state(sd.delta_values)
            tri_sparse.sparse_adamw_(sd.delta_values.data, sd.delta_values.grad, st["exp_avg"], st["exp_avg_sq"],
                                     st["steps"], lr=hp["lr"], beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                                     merged=sd.weight.data, index=sd.delta_index, shape=tuple(sd.weight.shape),
                                     block=sd.block, base=sd.base_values)
            sd.mark_synced()
        else:
            opt.step()
        pos = layout.element_positions(sd.delta_index, tuple(sd.weight.shape), block)
        expect = (base_w0.reshape(-1)[pos] + sd.delta_values.detach().reshape(-1)).to(sd.weight.dtype)
        assert torch.equal(sd.weight.detach().reshape(-1)[pos], expect)
    pos = layout.element_positions(sd.delta_index.cpu(), tuple(sd.weight.shape), block)
    ref = _dense_adamw_then_mask(tuple(sd.weight.shape), pos, init, grads, hp["lr"], hp["weight_decay"],
                                 hp["betas"], hp["eps"])
    p32 = nn.Parameter(init.clone())
    o32 = torch.optim.AdamW([p32], **hp)
    for g in grads:
        p32.grad = g.clone()
        o32.step()
    err_torch = rel_err(p32.detach(), ref)
    assert rel_err(sd.delta_values.detach().reshape(-1), ref) <= max(2 * err_torch, 1e-6)
    assert opt.state_bytes_per_entry() == 12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])
def test_sparse_adamw_resumes_from_its_state_dict_exactly(backend, values_dtype, kernel_device):
    """Training 4 steps equals 2 steps, optimizer.state_dict() into a fresh optimizer, 2 more —
    bit for bit. torch's load_state_dict casts state to the parameter's dtype (int32 step counts
    became float; with bf16 values the fp32 moments became bf16); the counts must stay int32."""
    device = _device(backend, kernel_device)
    torch.manual_seed(0)
    lin = nn.Linear(24, 10, device=device)
    xs = [torch.randn(6, 24, device=device) for _ in range(4)]

    def run(resume: bool):
        sd = SparseDeltaLinear.from_linear(copy.deepcopy(lin), num_params=30, values_dtype=values_dtype,
                                           backend=backend)
        opt = SparseAdamW(sd, lr=0.05)
        for i, x in enumerate(xs):
            if resume and i == 2:
                saved = copy.deepcopy(opt.state_dict())
                opt = SparseAdamW(sd, lr=0.05)
                opt.load_state_dict(saved)
                st = opt.state[sd.delta_values]
                assert st["steps"].dtype == torch.int32 and st["exp_avg"].dtype == torch.float32
                assert st["exp_avg"].data_ptr() != saved["state"][0]["exp_avg"].data_ptr()  # a copy
            sd(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
        return sd.delta_values.detach(), sd.weight.detach()

    for a, b in zip(run(False), run(True)):
        if device.type == "cuda":  # the SDDMM's split reductions add with atomics: the last bits vary
            tol = 1e-2 if a.dtype == torch.bfloat16 else 1e-5
            assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol / 10)
        else:
            assert torch.equal(a, b)
    bad = SparseAdamW(SparseDeltaLinear.from_linear(copy.deepcopy(lin), num_params=31), lr=0.05)
    sd = SparseDeltaLinear.from_linear(copy.deepcopy(lin), num_params=30)
    opt = SparseAdamW(sd, lr=0.05)
    sd(xs[0]).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match=r"exp_avg has shape \[30\], its parameter \[31\]"):
        bad.load_state_dict(opt.state_dict())


def test_sparse_adamw_refuses_state_of_another_shape():
    """set_index_ with another number of entries leaves the optimizer's state at the old size:
    the next step must say so, not read past the buffers."""
    torch.manual_seed(0)
    sd = SparseDeltaLinear.from_linear(nn.Linear(12, 10), num_params=20)
    opt = SparseAdamW(sd, lr=0.05)
    sd(torch.randn(4, 12)).sum().backward()
    opt.step()
    sd.set_index_(_random_index((10, 12), 30, seed=3))
    opt.zero_grad()
    sd(torch.randn(4, 12)).sum().backward()
    with pytest.raises(RuntimeError, match=r"shape \[30\] has optimizer state of shape \[20\]"):
        opt.step()
    opt.state.pop(sd.delta_values)
    opt.step()  # fresh state at the new size
    assert opt.state[sd.delta_values]["exp_avg"].shape == (30,)


@pytest.mark.parametrize("block", [None, (2, 4)])
@pytest.mark.parametrize("optimizer", ["AdamW", "SparseAdamW"])
def test_module_compiles_fullgraph_and_trains_like_eager(block, optimizer):
    """torch.compile(fullgraph=True) of SparseDeltaLinear over several token counts: the merged
    weight is rewritten inside the graph (the eager version bookkeeping reads data pointers, which
    broke the graph), so values updated by any optimizer are seen; training matches eager."""
    torch.manual_seed(0)
    base = SparseDeltaLinear.from_linear(nn.Linear(32, 24), density=0.2, block=block)
    eager, compiled_module = copy.deepcopy(base), copy.deepcopy(base)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)

    def make(m):
        return torch.optim.AdamW([m.delta_values], lr=0.05) if optimizer == "AdamW" else SparseAdamW(m, lr=0.05)

    opts = make(eager), make(compiled_module)
    for M in (3, 5, 9, 5):
        x = torch.randn(2, M, 32)
        for fn, opt in zip((eager, compiled), opts):
            fn(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    x = torch.randn(4, 32)
    assert torch.allclose(compiled(x), eager(x), atol=1e-5)
    assert torch.allclose(compiled_module.delta_values, eager.delta_values, atol=1e-6)


def test_per_entry_steps_and_regrowth():
    """regrow_: k constant; the smallest |delta| dropped (weight back to W0 there); the best-scored
    unmasked positions added at delta 0 with fresh optimizer state (step 0)."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    w0 = lin.weight.detach().clone()
    sd = SparseDeltaLinear.from_linear(lin, num_params=20)
    opt = SparseAdamW(sd, lr=0.05)
    for _ in range(2):
        sd(torch.randn(4, 12)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    old_idx = sd.delta_index.clone()
    old_vals = sd.delta_values.detach().clone()
    dropped = old_idx[torch.topk(old_vals.abs(), 5, largest=False).indices].long()
    scores = torch.rand(10, 12)
    masked_scores = scores.reshape(-1).clone()
    masked_scores[old_idx.long()] = -1
    grown = torch.topk(masked_scores, 5).indices
    assert sd.regrow_(0.25, scores, optimizer=opt) == 5
    idx = sd.delta_index.long()
    assert idx.numel() == 20 and bool((idx[1:] > idx[:-1]).all())
    assert set(idx.tolist()) == (set(old_idx.tolist()) - set(dropped.tolist())) | set(grown.tolist())
    assert torch.equal(sd.weight.detach().reshape(-1)[dropped], w0.reshape(-1)[dropped])
    steps = opt.state[sd.delta_values]["steps"]
    is_new = torch.isin(idx, grown)
    assert bool((steps[is_new] == 0).all()) and bool((steps[~is_new] == 2).all())
    assert bool((sd.delta_values.detach()[is_new] == 0).all())
    kept = ~is_new
    assert torch.equal(sd.delta_values.detach()[kept], old_vals[torch.isin(old_idx.long(), idx)])
    sd(torch.randn(4, 12)).pow(2).sum().backward()
    opt.step()
    assert bool((opt.state[sd.delta_values]["steps"][is_new] == 1).all())


def test_module_training_matches_dense_masked_training():
    """A few steps of a SparseDeltaLinear + SparseAdamW model equal dense-gradient masking with
    torch.optim.AdamW (float64, so exact up to rounding)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, dtype=torch.float64)
    sd = SparseDeltaLinear.from_linear(lin, density=0.25, values_dtype=torch.float64, backend="torch")
    pos = sd.delta_index.long()
    mask = torch.zeros(8 * 16, dtype=torch.bool)
    mask[pos] = True
    dense_w = nn.Parameter(lin.weight.detach().clone())
    opt_d = torch.optim.AdamW([dense_w], lr=0.01)
    opt_s = SparseAdamW(sd, lr=0.01)
    xs = [torch.randn(5, 16, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        sd(x).pow(2).sum().backward()
        opt_s.step()
        opt_s.zero_grad()
        torch.nn.functional.linear(x, dense_w, lin.bias).pow(2).sum().backward()
        dense_w.grad.view(-1)[~mask] = 0
        opt_d.step()
        opt_d.zero_grad()
    # weight decay touches only the delta in SparseAdamW, the whole W in the dense run: compare Deltas
    assert torch.allclose(sd.merge().reshape(-1)[~mask], lin.weight.detach().reshape(-1)[~mask])
    assert rel_err(sd.merge().reshape(-1)[mask] - sd.base_values, sd.delta_values.detach()) < 1e-12
    assert sd.merge().shape == (8, 16) and torch.equal(sd.base_weight().reshape(-1)[pos], sd.base_values)


def _foreign_optimizers():
    yield "torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True)
    yield "torch SGD", lambda ps: torch.optim.SGD(ps, lr=0.05)
    try:
        import bitsandbytes as bnb
    except Exception:  # not installed on this platform
        return
    yield "bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=0.05)


@pytest.mark.parametrize("make", [pytest.param(make, id=name) for name, make in _foreign_optimizers()])
def test_forward_sees_updates_that_do_not_bump_the_version(make):
    """Every forward uses W0 + the current delta, whatever updated delta_values. The forward used to
    trust delta_values' version counter, which torch.optim.AdamW(fused=True) (HF Trainer's
    adamw_torch_fused), bitsandbytes' optimizers and writes through .data leave as it was: the
    model then trained delta while its output stayed at W0 — silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40))
    peft_kernels.apply_sparse(model, ["0"], density=0.2, backend="torch")
    sd = model[0]
    opt = make([sd.delta_values])
    x = torch.randn(6, 24)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert sd.delta_values.detach().abs().max() > 0  # it did train
    want = x @ sd.merge().T + sd.bias.detach()  # W0 + delta, built afresh from base_values
    assert rel_err(model(x).detach(), want) < FLOOR[torch.float32]
    sd.delta_values.data.normal_()  # no version bump either
    want = x @ sd.merge().T + sd.bias.detach()
    assert rel_err(model(x).detach(), want) < FLOOR[torch.float32]
    # SparseAdamW writes the merged weight itself and lets the next forwards skip the write
    writes = []
    sd._write_merged = lambda: writes.append(1)
    opt = SparseAdamW(sd, lr=0.05)
    model(x).square().mean().backward()
    assert len(writes) == 1
    opt.step()
    model(x)
    model(x)
    assert len(writes) == 1


def test_mask_gradients_tied_heads_and_patterns_that_match_nothing():
    """A head tied to the embedding is listed once by named_parameters() (as the embedding):
    "head.*" must still select it. A pattern matching no name is an error, not a frozen model."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.body = nn.Embedding(10, 6), nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    rep = mask_gradients_(model, {"head.*": True})
    assert rep.dense == ["head.weight"] and rep.trainable == 60
    assert model.embed.weight.requires_grad and not model.body.weight.requires_grad
    with pytest.raises(ValueError, match=r"\['lm_head\.\*'\] match no parameter name"):
        mask_gradients_(Tied(), {"*.bias": True, "lm_head.*": True})
    with pytest.raises(ValueError, match="shared by"):
        mask_gradients_(Tied(), {"head.weight": torch.rand(10, 6) < 0.5})


class _TiedLM(nn.Module):
    def __init__(self, vocab=30, dim=12):
        super().__init__()
        self.embed, self.body = nn.Embedding(vocab, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.embed(tokens))))


def test_a_delta_on_a_tied_head_leaves_the_embedding_alone(tmp_path):
    """apply_sparse on a head tied to the input embedding: the delta is the head's alone (as a LoRA
    adapter on it would be), merged around each product, never into the shared weight — the
    merged write used to change the embedding too, which no gradient accounted for. Loading
    (both formats) keeps that; merge_and_unload unties the head."""
    torch.manual_seed(0)
    model = _TiedLM()
    original = copy.deepcopy(model)
    w0 = model.embed.weight.detach().clone()
    # k = in + out per layer: PEFT SHiRA's size for r = 1, so that save_adapter can write it
    peft_kernels.apply_sparse(model, ["head", "body"], num_params=lambda lin: lin.in_features + lin.out_features,
                              backend="torch")
    head, body = model.head, model.body
    assert not head.merge_in_place and not head.keeps_merged and body.keeps_merged
    opt = SparseAdamW(model, lr=0.05)
    tokens = torch.randint(0, 30, (4, 5))
    for _ in range(3):
        model(tokens).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert head.delta_values.detach().abs().max() > 0
    assert torch.equal(model.embed.weight, w0) and head.weight is model.embed.weight
    h = torch.tanh(body(model.embed(tokens)))
    assert rel_err(model(tokens).detach(), (h @ head.merge().T).detach()) < FLOOR[torch.float32]

    save_sparse_delta(model, str(tmp_path / "delta.safetensors"))
    peft_kernels.save_adapter(model, tmp_path / "shira")
    for load in (lambda m: load_sparse_delta(m, str(tmp_path / "delta.safetensors"), backend="torch"),
                 lambda m: peft_kernels.load_adapter(m, tmp_path / "shira", backend="torch")):
        twin = copy.deepcopy(original)
        load(twin)
        assert not twin.head.keeps_merged and twin.body.keeps_merged and torch.equal(twin.embed.weight, w0)
        assert torch.allclose(twin(tokens), model(tokens), rtol=1e-6, atol=1e-6)

    merged = peft_kernels.merge_and_unload(copy.deepcopy(model))
    assert merged.head.weight is not merged.embed.weight and torch.equal(merged.embed.weight, w0)
    assert torch.equal(merged.head.weight, head.merge())

    with torch.no_grad():  # the embedding trains too: the head is the shared weight as it is now + delta,
        model.embed.weight.add_(0.5)  # and moving the delta must not write over it
    trained_embedding = model.embed.weight.detach().clone()
    want = trained_embedding.clone()
    want.view(-1)[head.delta_index.long()] += head.delta_values.detach()
    assert torch.equal(head.merge(), want) and torch.equal(head.base_weight(), trained_embedding)
    h = torch.randn(4, 12)
    assert torch.allclose(head(h), h @ want.T, rtol=1e-6, atol=1e-6)
    compiled = torch.compile(head, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(h), h @ want.T, rtol=1e-6, atol=1e-6)
    head.set_index_(torch.arange(0, 360, 9, dtype=torch.int32))
    assert torch.equal(model.embed.weight, trained_embedding)


def test_mask_gradients_bitfit_head_and_partial():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.LayerNorm(12), nn.Linear(12, 4))
    partial = torch.rand(12, 10) < 0.2
    rep = mask_gradients_(model, {"*.bias": True, "0.weight": partial})
    assert isinstance(model[0], SparseDeltaLinear) and rep.sparse == ["0.weight"]
    assert set(rep.dense) == {"0.bias", "1.bias", "2.bias"}
    assert not model[2].weight.requires_grad and not model[1].weight.requires_grad
    model(torch.randn(3, 10)).sum().backward()
    assert model[0].delta_values.grad.numel() == int(partial.sum()) and model[0].weight.grad is None
    assert model[2].bias.grad is not None and model[2].weight.grad is None
    assert model[0].bias.requires_grad and model[0].bias.grad is not None  # "*.bias" holds for the sparse layer's too
    assert rep.trainable == int(partial.sum()) + 12 + 12 + 4
    with pytest.raises(ValueError, match="nn.Linear, Conv1D and nn.Embedding weights"):
        mask_gradients_(nn.Sequential(nn.LayerNorm(5)), {"0.weight": torch.tensor([True, False] * 2 + [True])})
    with pytest.raises(ValueError, match="shape"):
        mask_gradients_(nn.Sequential(nn.Linear(3, 2)), {"0.weight": torch.ones(3, 2, dtype=torch.bool)})
    # nn.MultiheadAttention reads out_proj.weight itself: a SparseDeltaLinear there would get no gradient
    with pytest.raises(ValueError, match="self_attn.out_proj.weight cannot be trained: nn.MultiheadAttention"):
        mask_gradients_(nn.TransformerEncoderLayer(8, 2, 16), {"self_attn.out_proj.weight": torch.rand(8, 8) < 0.5})


def test_mask_gradients_error_leaves_the_model_as_it_was():
    """A bad rule found after others were decided (a partial mask on a LayerNorm, a block mask that
    does not tile its weight) changes nothing: no flag, no module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 4))
    model[1].weight.requires_grad_(False)
    for masks, kw in [({"*.bias": False, "0.weight": torch.rand(12, 8) < 0.5, "1.weight": torch.rand(12) < 0.5}, {}),
                      ({"2.*": True, "0.*": torch.rand(12, 8) < 0.5}, {"block": (5, 5)})]:
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        with pytest.raises(ValueError):
            mask_gradients_(model, masks, **kw)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert [type(m) for m in model] == [nn.Linear, nn.LayerNorm, nn.Linear]


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 4))
    fresh = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 4))
    fresh.load_state_dict(model.state_dict())
    model[0] = SparseDeltaLinear.from_linear(model[0], density=0.1)
    model[1] = SparseDeltaLinear.from_linear(model[1], density=0.25, block=(2, 3))
    with torch.no_grad():
        for m in (model[0], model[1]):
            m.delta_values.copy_(torch.randn_like(m.delta_values))
    x = torch.randn(3, 10)
    y = model(x)
    save_sparse_delta(model, str(tmp_path / "delta.safetensors"))
    assert load_sparse_delta(fresh, str(tmp_path / "delta.safetensors")) == ["0", "1"]
    assert isinstance(fresh[1], SparseDeltaLinear) and fresh[1].block == (2, 3)
    assert torch.equal(fresh(x), y)
    # A file whose second entry does not fit leaves the model as it was (no first layer swapped).
    other = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 5))
    with pytest.raises(ValueError, match=r"1 has an \[out, in\] weight \[5, 12\], the file \[4, 12\]"):
        load_sparse_delta(other, str(tmp_path / "delta.safetensors"))
    assert type(other[0]) is nn.Linear
    with pytest.raises(ValueError, match="no module '1'"):
        load_sparse_delta(nn.Sequential(nn.Linear(10, 12)), str(tmp_path / "delta.safetensors"))
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a file save_sparse_delta wrote"):
        load_sparse_delta(fresh, str(tmp_path / "other.safetensors"))


def test_index_validation_is_not_skipped_for_a_new_tensor_at_a_freed_address():
    """The index check is cached per tensor. A new index at a freed one's address and version (the
    CUDA caching allocator reuses blocks at once; here forced through the same storage) is checked
    again: duplicates must not reach the kernels."""
    w, x = torch.randn(6, 8), torch.randn(2, 8)
    good = torch.empty(3, dtype=torch.int32).copy_(torch.tensor([1, 5, 9], dtype=torch.int32))
    peft_kernels.sparse_delta_linear(x, w, torch.zeros(3), good, shape_or_block=(6, 8))
    storage, version = good.untyped_storage(), good._version
    del good
    bad = torch.empty(0, dtype=torch.int32).set_(storage, 0, (3,))
    bad.data.copy_(torch.tensor([1, 5, 5], dtype=torch.int32))  # .data: no version bump
    assert bad._version == version  # same address, version and size as the validated index
    with pytest.raises(ValueError, match="duplicate positions"):
        peft_kernels.sparse_delta_linear(x, w, torch.zeros(3), bad, shape_or_block=(6, 8))


def test_panel_offsets_are_not_reused_for_a_new_index_at_a_freed_address(kernel_device, monkeypatch):
    """The panel SDDMM caches where each panel's entries start. A new index in a freed one's block
    with the same version and size (a regrowth's fresh index on the CUDA caching allocator; here
    forced through the same storage) must get its own offsets, not the old ones: wrong offsets give
    wrong dDelta with no error."""
    monkeypatch.setattr(tri_sparse, "PANEL_ELEMENTS", 4 * 16)
    shape, M = (24, 16), 9
    gy, x = torch.randn(M, 24, device=kernel_device), torch.randn(M, 16, device=kernel_device)
    first = torch.empty(40, dtype=torch.int32, device=kernel_device).copy_(_random_index(shape, 40, seed=1))
    sddmm = lambda gy, x, index, shape, block: tri_sparse.sddmm(gy, x, index, shape, block, method="panel")  # noqa: E731
    _check_sddmm(sddmm, gy, x, first, shape, None)
    storage, version = first.untyped_storage(), first._version
    del first
    second = torch.empty(0, dtype=torch.int32, device=kernel_device).set_(storage, 0, (40,))
    second.data.copy_(torch.sort(torch.randperm(24 * 16)[:40]).values.to(torch.int32))  # .data: no version bump
    assert second._version == version
    _check_sddmm(sddmm, gy, x, second, shape, None)


def test_bad_inputs():
    w = torch.randn(6, 8)
    x = torch.randn(2, 8)
    idx = torch.tensor([1, 5, 9], dtype=torch.int32)
    v = torch.randn(3)
    f = peft_kernels.sparse_delta_linear
    with pytest.raises(ValueError, match="out of range"):
        f(x, w, v, torch.tensor([1, 5, 48], dtype=torch.int32))
    with pytest.raises(ValueError, match="duplicate"):
        f(x, w, v, torch.tensor([1, 5, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="sorted"):
        f(x, w, v, torch.tensor([5, 1, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="delta_values must have shape"):
        f(x, w, torch.randn(4), idx)
    with pytest.raises(ValueError, match="int32/int64"):
        f(x, w, v, idx.float())
    with pytest.raises(ValueError, match="frozen"):
        f(x, w.requires_grad_(), v, idx)
    w.requires_grad_(False)
    with pytest.raises(ValueError, match="divide"):
        f(x, w, torch.randn(1, 4, 3), torch.tensor([0], dtype=torch.int32), shape_or_block=(4, 3))
    with pytest.raises(ValueError, match="in_features|last dimension|features"):
        f(torch.randn(2, 7), w, v, idx)
    with pytest.raises(ValueError, match="bool mask must have shape"):
        SparseDeltaLinear.from_linear(nn.Linear(8, 6), mask=torch.ones(8, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="density"):
        SparseDeltaLinear.from_linear(nn.Linear(8, 6), density=1.5)
    with pytest.raises(ValueError, match="scores"):
        SparseDeltaLinear.from_linear(nn.Linear(8, 6), mask="gradient")
    assert torch.equal(w, w.clone())


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_sddmm(backend, kernel_device):
    device = _device(backend, kernel_device)
    gy, x = torch.randn(6, 12, device=device), torch.randn(6, 20, device=device)
    idx = _random_index((12, 20), 30).to(device)
    torch.library.opcheck(torch.ops.peft_kernels.sparse_sddmm.default, (gy, x, idx, [12, 20], [], backend))
    bidx = _random_index((12, 20), 4, (4, 5)).to(device)
    torch.library.opcheck(torch.ops.peft_kernels.sparse_sddmm.default, (gy, x, bidx, [12, 20], [4, 5], backend))



@pytest.mark.parametrize("block", [None, (2, 3)])
def test_candidate_tracking_and_regrowth_without_dense_gradients(block):
    """track_candidates_ accumulates |dW| (block norm) at unmasked candidates through the SDDMM
    op; it equals the dense gradient read there, summed over steps; regrow_() without scores
    regrows the best candidates and draws fresh ones outside the new mask."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 10, dtype=torch.float64)
    sd = SparseDeltaLinear.from_linear(lin, num_params=6 if block else 20, block=block,
                                       values_dtype=torch.float64, backend="torch")
    with pytest.raises(ValueError, match="track_candidates_"):
        sd.regrow_(0.5)
    sd.track_candidates_(num=8)
    cand = sd.candidate_index.long()
    assert not bool(torch.isin(cand, sd.delta_index.long()).any())
    dense_sum = torch.zeros(10, 12, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(5, 12, dtype=torch.float64)
        gy = torch.randn(5, 10, dtype=torch.float64)
        sd(x).backward(gy)
        dense = gy.T @ x
        if block is None:
            dense_sum.view(-1)[cand] += dense.reshape(-1)[cand].abs()
        else:
            norms = dense.reshape(5, 2, 4, 3).pow(2).sum((1, 3)).sqrt().reshape(-1)
            dense_sum.view(-1)[cand] += norms[cand]
    assert torch.allclose(sd.candidate_scores.double(), dense_sum.view(-1)[cand], rtol=1e-5)
    best = cand[torch.topk(sd.candidate_scores, 3).indices]
    opt = SparseAdamW(sd, lr=0.01)
    assert sd.regrow_(0.5 if block else 0.15, optimizer=opt) == 3
    assert set(best.tolist()) <= set(sd.delta_index.long().tolist())
    assert sd.candidate_index is not None and float(sd.candidate_scores.abs().sum()) == 0.0
    assert not bool(torch.isin(sd.candidate_index.long(), sd.delta_index.long()).any())
    assert not any(k.startswith("candidate_") for k in sd.state_dict())
    sd.to("meta")  # the tracking state moves with the module
    assert sd.candidate_index.device.type == "meta" and sd.candidate_scores.device.type == "meta"


def test_fp64_weights_keep_w0_in_fp64_under_fp32_values():
    """W0 + delta at the k positions is added in the wider of the two dtypes: an fp64 weight with
    fp32 values (the default) kept W0 only to fp32 there — the module's merged weight, the op's
    temporary merge and SparseAdamW's merged write alike."""
    torch.manual_seed(0)
    lin = nn.Linear(30, 20).double()
    w0 = lin.weight.detach().clone()
    sd = SparseDeltaLinear.from_linear(lin, density=0.2)
    pos = sd.delta_index.long()
    with torch.no_grad():
        sd.delta_values.normal_()
    sd.sync_()
    want = w0.view(-1)[pos] + sd.delta_values.detach().double()
    assert torch.equal(sd.weight.view(-1)[pos], want)

    x = torch.randn(4, 30, dtype=torch.float64)
    dense = w0.clone()
    dense.view(-1)[pos] = want
    y = peft_kernels.sparse_delta_linear(x, w0.clone(), sd.delta_values, sd.delta_index)  # merged=False
    assert torch.allclose(y, x @ dense.T, rtol=1e-14, atol=1e-14)

    opt = SparseAdamW(sd, lr=0.1)
    sd(x).sum().backward()
    opt.step()
    assert torch.equal(sd.weight.view(-1)[pos], w0.view(-1)[pos] + sd.delta_values.detach().double())


@pytest.mark.parametrize("block", [None, (3, 5)])
@pytest.mark.parametrize("w_dtype,v_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                             (torch.float64, torch.float32)])
@pytest.mark.parametrize("with_base", [False, True])
def test_triton_merge_and_restore_are_the_references_bits(block, w_dtype, v_dtype, with_base, kernel_device):
    """triton/sparse.py merge_at / restore_at (one launch each; the temporary merge of merged=False and
    SparseDeltaLinear's per-forward write) against reference.sparse's torch ops: the same bits written
    at the positions, nothing written elsewhere, the old values returned, and restore_at undoing it
    exactly. fp64 weights take the reference's path."""
    from peft_kernels.reference import sparse as ref
    from peft_kernels.triton import sparse as tri
    if w_dtype == torch.bfloat16 and kernel_device.type == "cpu":
        pytest.skip("the Triton interpreter casts fp32 to bf16 by truncation (merge_at takes the torch path "
                    "there); the GPU tier runs this case")
    shape = (51, 70)
    torch.manual_seed(7)
    index = _random_index(shape, 120 if block is None else 40, block).to(kernel_device)
    n = layout.values_shape(index.numel(), block)
    w = torch.randn(shape, device=kernel_device).to(w_dtype)
    values = (torch.randn(n, device=kernel_device) / 3).to(v_dtype)
    pos = layout.element_positions(index, shape, block)
    base = (w.view(-1)[pos] + 0.25).clone() if with_base else None  # W0 differing from what W holds
    want, got = w.clone(), w.clone()
    saved_want = ref.merge_at(want, values, index, shape, block, base, save=True)
    saved_got = tri.merge_at(got, values, index, shape, block, base, save=True)
    assert torch.equal(got, want) and torch.equal(saved_got, saved_want) and torch.equal(saved_got, w.view(-1)[pos])
    assert not torch.equal(got, w)  # something was written
    tri.restore_at(got, saved_got, index, shape, block)
    assert torch.equal(got, w)
    assert tri.merge_at(got, values, index, shape, block, base) is None and torch.equal(got, want)  # no save


@pytest.mark.parametrize("block", [None, (2, 4)])
def test_strided_index_and_values_are_read_as_laid_out(block, kernel_device):
    """delta_index and delta_values given as strided views (every other entry of larger tensors):
    the kernels read them as flat arrays, so the op copies them (k entries); output and gradients
    equal the torch backend's. (The one-launch merge first read such views as contiguous.)"""
    torch.manual_seed(9)
    shape = (16, 24)
    full = _random_index(shape, 30, block)
    index = full.repeat_interleave(2)[::2].to(kernel_device)  # the same positions, stride 2
    assert not index.is_contiguous()
    n = layout.values_shape(index.numel(), block)
    w = torch.randn(shape, device=kernel_device)
    x = torch.randn(5, shape[1], device=kernel_device)
    base = torch.randn(2 * int(torch.tensor(n).prod()), device=kernel_device)
    out = {}
    for backend in ("torch", "triton"):
        values = base.clone().requires_grad_()
        strided = values[::2].view(n)
        wi = w.clone()
        y = peft_kernels.sparse_delta_linear(x, wi, strided, index, shape_or_block=block, backend=backend)
        g, = torch.autograd.grad(y.square().sum(), values)
        out[backend] = (y.detach().cpu(), g.cpu())
        assert torch.equal(wi, w)
    assert rel_err(out["triton"][0], out["torch"][0]) < 1e-5 and rel_err(out["triton"][1], out["torch"][1]) < 1e-5
