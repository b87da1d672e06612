"""Sparse deltas on embedding tables (issue: sparse gradient masking, "any existing parameter"):
the op on both backends against a float64 oracle (F.embedding of the dense W0 + Delta table and
its masked dense gradient), the module, mask_gradients_ on an nn.Embedding (new tokens' rows),
save / load, merge_and_unload, torch.compile, and bad input."""
import copy
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_kernels
from peft_kernels.nn import SparseDeltaEmbedding
from peft_kernels.reference import sparse_embedding as ref
from peft_kernels.sparse import SparseAdamW, load_sparse_delta, mask_gradients_, save_sparse_delta

from helpers import FLOOR, rel_err

BACKENDS = ["torch", "triton"]


def _device(backend, kernel_device):
    return kernel_device if backend == "triton" else torch.device("cpu")


def _index(shape, mask):
    return mask.reshape(-1).nonzero().reshape(-1).to(torch.int32)


def _oracle(ids, w0, values, index, padding_idx, grad_out, dtype):
    """(y, dDelta) from F.embedding over the dense table W0 + Delta in ``dtype`` (the merge added in
    fp32 — fp64 for fp64 — and rounded once, as the op's and SparseDeltaLinear's merges are), the
    gradient of the dense table read at the positions."""
    acc = torch.promote_types(torch.float64 if dtype == torch.float64 else torch.float32, values.dtype)
    table = w0.to(acc).reshape(-1).index_add(0, index.long(), values.to(acc)).to(dtype).reshape(w0.shape)
    table.requires_grad_()
    y = F.embedding(ids, table, padding_idx=padding_idx)
    y.backward(grad_out.to(dtype))
    return y.detach(), table.grad.reshape(-1)[index.long()]


def _run(backend, ids, w0, values, index, padding_idx, grad_out):
    v = values.detach().clone().requires_grad_()
    y = peft_kernels.sparse_delta_embedding(ids, w0, v, index, padding_idx=padding_idx, backend=backend)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), v.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("padding_idx", [None, 4, -2])
@pytest.mark.parametrize("mask", ["random", "rows", "one", "all"])
def test_sparse_delta_embedding_matches_oracle(backend, dtype, padding_idx, mask, kernel_device):
    """Outputs equal the dense table's lookup exactly (the op adds each entry to W0 once, in fp32,
    as the merged table holds it); dDelta equals the dense table gradient at the positions (held to
    2x an eager dense gradient in the dtype, or the floor). Tokens repeat, the padding row and
    rows with no entries are read, and the table (V = 37, d = 19) is odd-sized."""
    device = _device(backend, kernel_device)
    V, d = 37, 19
    g = torch.Generator().manual_seed(zlib.crc32(f"{mask} {dtype} {padding_idx}".encode()))
    table_mask = {"random": torch.rand(V, d, generator=g) < 0.15,
                  "rows": torch.zeros(V, d, dtype=torch.bool).index_fill_(0, torch.tensor([4, 9, 35]), True),
                  "one": torch.zeros(V, d, dtype=torch.bool).index_fill_(0, torch.tensor([9]), True)
                  .logical_and_(torch.arange(d) == 7),
                  "all": torch.ones(V, d, dtype=torch.bool)}[mask]
    index = _index((V, d), table_mask).to(device)
    w0 = torch.randn(V, d, generator=g).to(dtype).to(device)
    values = (torch.randn(index.numel(), generator=g) / 4).to(device)
    ids = torch.randint(0, V, (3, 11), generator=g)
    ids[0, :4] = 9  # a row with entries, read by several tokens
    ids[1, :3] = 4 if padding_idx == 4 else 35
    ids = ids.to(device)
    grad_out = torch.randn(3, 11, d, generator=g).to(dtype).to(device)  # what backward hands the op: the oracle's too
    y, dv = _run(backend, ids, w0, values, index, padding_idx, grad_out)
    y_exact, dv_exact = _oracle(ids, w0, values, index, padding_idx, grad_out, torch.float64)
    y_dtype, dv_dtype = _oracle(ids, w0, values, index, padding_idx, grad_out, dtype)
    assert y.dtype == dtype and y.shape == (3, 11, d) and dv.dtype == values.dtype
    assert torch.equal(y, y_dtype)
    assert rel_err(dv, dv_exact) <= max(2 * rel_err(dv_dtype.float(), dv_exact), FLOOR[dtype])
    if padding_idx is not None:  # the padding row's entries get no gradient
        rows = index.long() // d
        assert torch.all(dv[rows == padding_idx % V] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_entries_no_tokens_and_fp64(backend, kernel_device):
    device = _device(backend, kernel_device)
    w0 = torch.randn(6, 5, device=device)
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    ids = torch.tensor([[1, 5, 0]], device=device)
    y, dv = _run(backend, ids, w0, torch.zeros(0, device=device), empty, None, torch.randn(1, 3, 5, device=device))
    assert torch.equal(y, F.embedding(ids, w0)) and dv.shape == (0,)
    index = torch.tensor([3, 26], dtype=torch.int32, device=device)
    y, dv = _run(backend, ids[:, :0], w0, torch.ones(2, device=device), index, None, torch.zeros(1, 0, 5, device=device))
    assert y.shape == (1, 0, 5) and torch.equal(dv, torch.zeros(2, device=device))
    if backend == "torch":  # fp64 tables: values added in fp64
        w64 = w0.double().cpu()
        vals = torch.tensor([1e-12, 2.0], dtype=torch.float64)
        y, dv = _run("torch", ids.cpu(), w64, vals, index.cpu(), None, torch.ones(1, 3, 5))
        assert y[0, 2, 3] == w64[0, 3] + 1e-12 and y[0, 1, 1] == w64[5, 1] + 2.0  # ids [1, 5, 0]; d = 5
        assert dv.tolist() == [1.0, 1.0]


def test_the_gradient_is_compact():
    """Only delta_values gets a gradient, of k entries; the [V, d] table none."""
    emb = nn.Embedding(1000, 16)
    layer = SparseDeltaEmbedding.from_embedding(emb, density=0.001)
    layer(torch.randint(0, 1000, (4, 9))).sum().backward()
    assert layer.weight.grad is None and layer.delta_values.grad.shape == (16,)


def test_module_masks_and_from_embedding_checks():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8, padding_idx=0)
    layer = SparseDeltaEmbedding.from_embedding(emb, num_params=40, mask="magnitude")
    assert layer.weight is emb.weight and layer.padding_idx == 0 and layer.num_trainable == 40
    top = torch.topk(emb.weight.detach().abs().reshape(-1), 40).indices.sort().values
    assert torch.equal(layer.delta_index.long(), top)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(layer(ids), emb(ids))  # a fresh delta is zero
    with pytest.raises(ValueError, match=r"\['max_norm'\] not supported"):
        SparseDeltaEmbedding.from_embedding(nn.Embedding(5, 3, max_norm=1.0))
    hooked = nn.Embedding(5, 3)
    hooked.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="hooks are registered"):
        SparseDeltaEmbedding.from_embedding(hooked)
    with pytest.raises(TypeError, match="expects nn.Embedding"):
        SparseDeltaEmbedding.from_embedding(nn.Linear(3, 5))


def test_bad_input_is_refused():
    w0 = torch.randn(6, 5)
    index = torch.tensor([3, 26], dtype=torch.int32)
    vals = torch.zeros(2, requires_grad=True)
    ids = torch.tensor([1, 2])
    op = peft_kernels.sparse_delta_embedding
    with pytest.raises(TypeError, match="ids must be an int32/int64 tensor"):
        op(ids.float(), w0, vals, index)
    with pytest.raises(ValueError, match="weight must be frozen"):
        op(ids, w0.clone().requires_grad_(), vals, index)
    with pytest.raises(ValueError, match=r"delta_values must have shape \[2\]"):
        op(ids, w0, torch.zeros(3), index)
    with pytest.raises(ValueError, match="out of range"):
        op(ids, w0, vals, torch.tensor([3, 30], dtype=torch.int32))
    with pytest.raises(ValueError, match="duplicate"):
        op(ids, w0, vals, torch.tensor([3, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="padding_idx must be in"):
        op(ids, w0, vals, index, padding_idx=6)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        op(ids, w0[0], vals, index)
    with pytest.raises(ValueError, match="Triton interpreter"):
        op(ids, w0.bfloat16(), vals, index, backend="triton")


def test_reference_pairs_cover_exactly_the_entries_of_each_tokens_row():
    index = torch.tensor([2, 5, 6, 13, 19], dtype=torch.int32)  # d = 4: rows 0, 1, 1, 3, 4
    tokens, entries = ref.token_entry_pairs(torch.tensor([1, 2, 3, 1, 4]), index, 4)
    assert sorted(zip(tokens.tolist(), entries.tolist())) == [(0, 1), (0, 2), (2, 3), (3, 1), (3, 2), (4, 4)]


def test_module_compiles_fullgraph_and_matches_eager():
    torch.manual_seed(0)
    emb = nn.Embedding(40, 12)
    eager = SparseDeltaEmbedding.from_embedding(emb, density=0.1)
    with torch.no_grad():
        eager.delta_values.normal_()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    for n in (5, 9):
        ids = torch.randint(0, 40, (2, n))
        for layer, fn in ((eager, eager), (compiled_layer, compiled)):
            layer.delta_values.grad = None
            fn(ids).square().sum().backward()
        assert torch.equal(compiled(ids), eager(ids))
        assert torch.equal(compiled_layer.delta_values.grad, eager.delta_values.grad)


class _TinyLM(nn.Module):
    def __init__(self, vocab=60, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.embed(ids))))


def test_mask_gradients_trains_new_token_rows_and_round_trips(tmp_path):
    """The vocabulary-extension case: mask_gradients_ with the new tokens' rows of the embedding
    (and the head whole) trains exactly those entries — gradient equal to the dense one there —
    with SparseAdamW; save_sparse_delta / load_sparse_delta rebuild it on a fresh model and
    merge_and_unload gives an nn.Embedding holding W0 + Delta."""
    torch.manual_seed(0)
    base = _TinyLM().double()
    new_tokens = torch.tensor([55, 57, 59])
    rows = torch.zeros(60, 16, dtype=torch.bool)
    rows[new_tokens] = True
    model = copy.deepcopy(base)
    report = mask_gradients_(model, {"embed.weight": rows, "head.*": True})
    assert isinstance(model.embed, SparseDeltaEmbedding) and report.sparse == ["embed.weight"]
    assert report.trainable == 3 * 16 + 60 * 16
    ids = torch.randint(0, 60, (4, 10))
    ids[:, :3] = new_tokens  # each new token is read (as an input, not only a target)
    loss = lambda m: F.cross_entropy(m(ids[:, :-1]).reshape(-1, 60), ids[:, 1:].reshape(-1))  # noqa: E731
    loss(model).backward()
    dense = copy.deepcopy(base)
    loss(dense).backward()
    assert torch.allclose(model.embed.delta_values.grad.double(), dense.embed.weight.grad[new_tokens].reshape(-1),
                          rtol=1e-6, atol=1e-9)
    optimizer = SparseAdamW(model, lr=0.05)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        step_loss = loss(model)
        step_loss.backward()
        optimizer.step()
        losses.append(step_loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert torch.equal(model.embed.weight, base.embed.weight)  # the table is never written
        changed = (model.embed.merge() != base.embed.weight).any(1)
        assert changed.nonzero().reshape(-1).tolist() == new_tokens.tolist()
    save_sparse_delta(model, str(tmp_path / "delta.safetensors"))
    fresh = copy.deepcopy(base)
    fresh.head.load_state_dict(model.head.state_dict())
    assert load_sparse_delta(fresh, str(tmp_path / "delta.safetensors")) == ["embed"]
    with torch.no_grad():
        want = model(ids)
        assert torch.equal(fresh(ids), want)
    merged = peft_kernels.merge_and_unload(model)
    assert type(merged.embed) is nn.Embedding and not merged.embed.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(merged(ids), want)


def test_tied_and_unsupported_embeddings_are_refused(tmp_path):
    tied = _TinyLM()
    tied.head.weight = tied.embed.weight
    with pytest.raises(ValueError, match="shared by"):
        mask_gradients_(tied, {"embed.weight": torch.rand(60, 16) < 0.1})
    model = _TinyLM()
    mask_gradients_(model, {"embed.weight": torch.rand(60, 16) < 0.1})
    save_sparse_delta(model, str(tmp_path / "delta.safetensors"))
    with pytest.raises(ValueError, match="shared with other modules"):
        load_sparse_delta(tied, str(tmp_path / "delta.safetensors"))
    assert type(tied.embed) is nn.Embedding
    normed = _TinyLM()
    normed.embed = nn.Embedding(60, 16, max_norm=1.0)
    with pytest.raises(ValueError, match="embed.weight: .*max_norm"):
        mask_gradients_(normed, {"embed.weight": torch.rand(60, 16) < 0.1})
    with pytest.raises(ValueError, match="max_norm"):
        load_sparse_delta(normed, str(tmp_path / "delta.safetensors"))
    assert type(normed.embed) is nn.Embedding


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, kernel_device):
    """The two custom ops pass torch.library.opcheck (schema, fake implementation, dispatch)."""
    device = _device(backend, kernel_device)
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(23, 9, generator=g).to(device)
    index = _index((23, 9), torch.rand(23, 9, generator=g) < 0.2).to(device)
    ids = torch.randint(0, 23, (17,), generator=g).to(device)
    values = torch.randn(index.numel(), generator=g).to(device)
    torch.library.opcheck(torch.ops.peft_kernels.sparse_embedding_fwd.default, (ids, w0, values, index, backend))
    torch.library.opcheck(torch.ops.peft_kernels.sparse_embedding_bwd.default,
                          (torch.randn(17, 9, generator=g).to(device), ids, index, 23, 5, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_past_int32_positions_index_in_int64(backend, kernel_device, monkeypatch):
    """A table of 2^31 or more entries gets an int64 index (int32 flat positions would wrap): the
    threshold lowered to this small table, the int64 paths of both backends match the oracle, and
    SparseDeltaLinear, whose index is int32, refuses such a weight by name."""
    from peft_kernels.sparse import layout
    monkeypatch.setattr(layout, "INT32_POSITIONS", 100)
    device = _device(backend, kernel_device)
    emb = nn.Embedding(23, 9).to(device)
    layer = SparseDeltaEmbedding.from_embedding(emb, density=0.3, backend=backend)
    assert layer.delta_index.dtype == torch.int64
    with torch.no_grad():
        layer.delta_values.normal_()
    ids = torch.randint(0, 23, (4, 6), device=device)
    grad_out = torch.randn(4, 6, 9, device=device)
    y = layer(ids)
    y.backward(grad_out)
    y_exact, dv_exact = _oracle(ids, emb.weight.detach(), layer.delta_values.detach(), layer.delta_index, None,
                                grad_out, torch.float64)
    assert torch.allclose(y.double(), y_exact, atol=1e-6) and rel_err(layer.delta_values.grad, dv_exact) <= FLOOR[torch.float32]
    with pytest.raises(ValueError, match="2\\^31 or more positions"):
        peft_kernels.nn.SparseDeltaLinear.from_linear(nn.Linear(10, 12), density=0.1)


def test_save_adapter_refuses_to_drop_an_embedding_delta(tmp_path):
    """PEFT's SHiRA file holds linear layers only: a model with sparse deltas on both keeps its
    embedding delta through save_sparse_delta, and save_adapter says so instead of dropping it."""
    model = _TinyLM()
    mask_gradients_(model, {"embed.weight": torch.rand(60, 16) < 0.1, "proj.weight": torch.rand(16, 16) < 0.2})
    with pytest.raises(ValueError, match="on linear layers and on embeddings .*save_sparse_delta"):
        peft_kernels.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_strided_index_and_values_are_read_as_laid_out(kernel_device):
    """delta_index and delta_values given as strided views: the triton kernels read flat arrays, so
    the op copies them (k entries); output and gradient equal the torch backend's (the triton path
    first read such views as contiguous)."""
    torch.manual_seed(5)
    V, d = 20, 8
    w = torch.randn(V, d, device=kernel_device)
    ids = torch.randint(0, V, (3, 7), device=kernel_device)
    index = torch.arange(0, V * d, 5, dtype=torch.int64, device=kernel_device).repeat_interleave(2)[::2]
    assert not index.is_contiguous()
    base = torch.randn(2 * index.numel(), device=kernel_device)
    out = {}
    for backend in ("torch", "triton"):
        values = base.clone().requires_grad_()
        y = peft_kernels.sparse_delta_embedding(ids, w, values[::2], index, backend=backend)
        g, = torch.autograd.grad(y.square().sum(), values)
        out[backend] = (y.detach(), g)
    assert rel_err(out["triton"][0], out["torch"][0]) < 1e-6 and rel_err(out["triton"][1], out["torch"][1]) < 1e-6
