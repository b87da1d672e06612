"""DistributedDataParallel and FSDP2's fully_shard (gloo, two CPU processes): every adapter kind
trains as one process does on the whole batch — the adapters' gradients are all-reduced (or
reduce-scattered), the frozen bases and the sparse layers' bookkeeping stay consistent, 4-bit bases
are sharded, and replicas regrow sparse masks alike."""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import peft_kernels
from peft_kernels.sparse import SparseAdamW, mask_gradients_

from helpers import gloo_gather_exit, gloo_init, gloo_spawn

KINDS = ["lora", "dora", "nf4", "int4", "sparse", "mask", "embedding"]
SPARSE_KINDS = ("sparse", "mask", "embedding")  # trained with SparseAdamW
STEPS, BATCH = 3, 8


class _ToIds(nn.Module):
    """Token ids from the float batch (one per sample), so the "embedding" kind runs the same steps."""

    def forward(self, x):
        return (x[:, 0].abs() * 1000).long() % 50


def _model(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    if kind == "embedding":  # a sparse delta on an embedding table (SparseDeltaEmbedding) and a head
        model = nn.Sequential(_ToIds(), nn.Embedding(50, 32), nn.ReLU(), nn.Linear(32, 16))
        mask_gradients_(model, {"1.weight": torch.rand(50, 32) < 0.3, "3.*": True}, backend="torch")
    elif kind == "sparse":
        peft_kernels.apply_sparse(model, ["0", "2"], density=0.2, backend="torch")
    elif kind == "mask":
        mask_gradients_(model, {"*.bias": True, "2.weight": torch.rand(16, 64) < 0.3}, backend="torch")
    else:
        quantize = {"nf4": "nf4", "int4": "int4"}.get(kind)
        peft_kernels.apply_lora(model, ["0", "2"], r=4, backend="torch", use_dora=kind == "dora", quantize=quantize,
                                quant_options={"group_size": 32} if kind == "int4" else None)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)  # a trained adapter, not the zero init
    sparse = kind in SPARSE_KINDS
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = SparseAdamW(model, lr=1e-2) if sparse else torch.optim.AdamW(trainable, lr=1e-2)
    return model, opt


def _steps(net, opt, rank, world):
    """STEPS optimizer steps, this rank on its share of each batch."""
    data = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, target = torch.randn(BATCH, 32, generator=data), torch.randn(BATCH, 16, generator=data)
        loss = (net(x.chunk(world)[rank]) - target.chunk(world)[rank]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _train(kind, rank=0, world=1):
    model, opt = _model(kind)
    _steps(nn.parallel.DistributedDataParallel(model) if world > 1 else model, opt, rank, world)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world, init_file, out_file):
    gloo_init(rank, world, init_file)
    results = {kind: _train(kind, rank, world) for kind in KINDS}
    gloo_gather_exit(results, out_file)


def _assert_ranks_match(ranks, kind, single, rtol=1e-5, atol=1e-6):
    """Every rank's state for ``kind`` equals one process's (``single``): the mean of two half-batch
    gradients is the whole batch's up to fp32 rounding."""
    for rank in ranks:
        assert rank[kind].keys() == single.keys()
        for key, value in single.items():
            assert torch.allclose(rank[kind][key].float(), value.float(), rtol=rtol, atol=atol), (kind, key)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_trains_every_adapter_kind_like_one_process(tmp_path):
    gloo_spawn(_worker, (2, str(tmp_path / "init"), str(tmp_path / "out.pt")))
    ranks = torch.load(tmp_path / "out.pt")
    for kind in KINDS:
        single = _train(kind)
        _assert_ranks_match(ranks, kind, single)
        assert any(not torch.equal(single[k], _model(kind)[0].state_dict()[k]) for k in single), kind  # it trained


# ----------------------------------------------------------------------------- FSDP2

def _fsdp_available():
    try:
        import torch.distributed.fsdp as fsdp
    except ImportError:
        return False
    return hasattr(fsdp, "fully_shard") and dist.is_available() and dist.is_gloo_available()


def _w0_at_delta_positions(model, state):
    """``state`` with each SparseDeltaLinear weight read as W0 (its base_values at the delta
    positions): the layer keeps W0 + delta there while it owns its weight, but under FSDP the shards
    hold W0 and the layer merges around each product (SparseDeltaLinear.keeps_merged)."""
    from peft_kernels.nn import SparseDeltaLinear
    state = dict(state)
    for name, mod in model.named_modules():
        if isinstance(mod, SparseDeltaLinear):
            w = state[f"{name}.weight"].clone()
            w.view(-1)[mod._positions()] = state[f"{name}.base_values"]
            state[f"{name}.weight"] = w
    return state


# "sparse/adamw": sparse deltas trained by torch's AdamW (no merged-weight upkeep by the optimizer)
FSDP_KINDS = KINDS + ["sparse/adamw"]


def _train_fsdp(kind, rank=0, world=1, compiled=False):
    """_train with fully_shard on every layer holding parameters and on the model (world > 1),
    under torch.compile when ``compiled`` (the sharded ranks only: the reference is eager);
    returns the full (gathered) state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model, opt = _model(kind.split("/")[0])
    if world > 1:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if world > 1 or kind == "sparse/adamw":  # the optimizer must see the sharded parameters
        opt = type(opt)(model, lr=1e-2) if kind in SPARSE_KINDS else \
            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _steps(torch.compile(model) if compiled else model, opt, rank, world)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}
    return _w0_at_delta_positions(model, full)


def _regrow_error_when_sharded(world):
    """What regrow_ says on a layer whose weight and values are FSDP shards (each rank holds a slice
    of the values, so the mask cannot change there)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model, _ = _model("sparse")
    fully_shard(model[0], mesh=init_device_mesh("cpu", (world,)))
    try:
        model[0].regrow_(0.5, scores=torch.rand(64, 32))
    except RuntimeError as exc:
        return str(exc)
    return None


COMPILED_KINDS = ["lora", "nf4", "sparse", "mask"]


def _fsdp_compiled_worker(rank, world, init_file, out_file):
    gloo_init(rank, world, init_file)
    gloo_gather_exit({kind: _train_fsdp(kind, rank, world, compiled=True) for kind in COMPILED_KINDS}, out_file)


@pytest.mark.skipif(not _fsdp_available(), reason="needs torch.distributed FSDP2 (fully_shard) with gloo")
def test_fsdp2_under_torch_compile_trains_like_one_eager_process(tmp_path):
    """fully_shard and torch.compile together (the usual large-model setup): the same parameters as
    one eager process. The compiled sparse layer wrote W0 + delta once per forward and relied on it
    until backward, which FSDP's re-gathered weight does not keep: its gradients were wrong."""
    gloo_spawn(_fsdp_compiled_worker, (2, str(tmp_path / "init"), str(tmp_path / "out.pt")))
    ranks = torch.load(tmp_path / "out.pt")
    for kind in COMPILED_KINDS:
        _assert_ranks_match(ranks, kind, _train_fsdp(kind), rtol=1e-4, atol=1e-5)


def _quantized_storage_shares(world):
    """For NF4 and INT4 layers under fully_shard: (local, whole) element counts of the packed base
    weight on this rank — the 4-bit bytes are sharded like any parameter, not copied to every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    out = {}
    for kind, name in (("nf4", "qweight_packed"), ("int4", "qweight_0")):
        model, _ = _model(kind)
        fully_shard(model[0], mesh=init_device_mesh("cpu", (world,)))
        t = getattr(model[0], name)
        out[kind] = (t.to_local().numel(), t.numel()) if hasattr(t, "to_local") else (t.numel(), t.numel())
    return out


def _fsdp_worker(rank, world, init_file, out_file):
    import warnings
    gloo_init(rank, world, init_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = {kind: _train_fsdp(kind, rank, world) for kind in FSDP_KINDS}
    results["warnings"] = sorted({str(w.message)[:160] for w in caught if "view" in str(w.message)})
    results["regrow"] = _regrow_error_when_sharded(world)
    results["quantized shares"] = _quantized_storage_shares(world)
    gloo_gather_exit(results, out_file)


@pytest.mark.skipif(not _fsdp_available(), reason="needs torch.distributed FSDP2 (fully_shard) with gloo")
def test_fsdp2_trains_every_adapter_kind_like_one_process(tmp_path):
    """fully_shard (FSDP2, gloo on CPU) on every layer: the same parameters as one process on the
    whole batch. FSDP gathers each layer's weight for forward and again for backward from shards
    a merged write never reaches, so sparse layers merge around each product there; and the
    layers return outputs that are not views (F.linear's rule), so FSDP2 has nothing to warn of."""
    gloo_spawn(_fsdp_worker, (2, str(tmp_path / "init"), str(tmp_path / "out.pt")))
    ranks = torch.load(tmp_path / "out.pt")
    for rank in ranks:
        assert rank.pop("warnings") == []
        assert "sharded (FSDP's fully_shard)" in rank.pop("regrow")
        for kind, (local, whole) in rank.pop("quantized shares").items():
            assert local * 2 == whole, kind  # each of the two ranks holds half of the 4-bit base
    for kind in FSDP_KINDS:
        _assert_ranks_match(ranks, kind, _train_fsdp(kind))


# ----------------------------------------------------------------------------- regrowth under DDP

def _regrow_worker(rank, world, init_file, out_file):
    """Replicas of one sparse layer track candidates on their own batches, then regrow twice."""
    gloo_init(rank, world, init_file)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 20))
    peft_kernels.apply_sparse(model, ["0"], density=0.1, backend="torch")
    layer = model[0]
    layer.track_candidates_(num=60, seed=3)
    net = nn.parallel.DistributedDataParallel(model)
    opt = SparseAdamW(model, lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    indices = []
    torch.manual_seed(rank)  # and its own generator state (the next candidates' seed is drawn from it)
    for _ in range(2):
        for _ in range(3):
            loss = net(torch.randn(6, 24, generator=data)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        layer.regrow_(0.3, optimizer=opt)
        indices.append((layer.delta_index.clone(), layer.candidate_index.clone()))
    gloo_gather_exit(indices, out_file)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_replicas_regrow_the_same_positions(tmp_path):
    """Candidate magnitudes come from each rank's own batches; regrow_ sums them over the replicas
    and shares the next candidates' seed, so every replica keeps the same mask (unsynchronized, the
    ranks would train different positions while DDP averages their gradients as if the same)."""
    gloo_spawn(_regrow_worker, (2, str(tmp_path / "init"), str(tmp_path / "out.pt")))
    first, second = torch.load(tmp_path / "out.pt")
    for (index_a, cand_a), (index_b, cand_b) in zip(first, second):
        assert torch.equal(index_a, index_b) and torch.equal(cand_a, cand_b)
    assert not torch.equal(first[0][0], first[1][0])  # the mask did change
