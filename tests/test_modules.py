"""LoRALinear, apply_lora and info()."""
import copy
import math

import pytest
import torch
from torch import nn

import peft_kernels
from peft_kernels.nn import DoRALinear, LoRALinear

from helpers import rel_err


def test_from_linear_shares_and_freezes_base():
    base = nn.Linear(20, 12)
    layer = LoRALinear.from_linear(base, r=4, alpha=8, dropout=0.1)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0  # PEFT init: B = 0, so a new adapter is a no-op
    bound = 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    layer.eval()
    x = torch.randn(3, 20)
    assert torch.allclose(layer(x), base(x), atol=1e-6)


def test_rslora_scaling():
    layer = LoRALinear(8, 8, r=16, alpha=32, use_rslora=True)
    assert layer.scaling == 32 / 4


def test_training_flag_controls_dropout():
    layer = LoRALinear(16, 16, r=4, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(y1, layer(x))


def test_merge_unmerge_roundtrip():
    layer = LoRALinear(24, 10, r=3, alpha=6).eval()
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.clone()
    x = torch.randn(4, 24)
    y = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(layer.weight, w0)
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.weight, w0, atol=1e-6)
    assert torch.allclose(layer(x), y, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_in_float64_keeps_float64_precision(dora):
    """An fp64 layer merges in fp64 (it went through fp32: errors ~1e-8 where fp64 gives ~1e-15)."""
    from peft_kernels.nn import DoRALinear

    torch.manual_seed(0)
    cls = DoRALinear if dora else LoRALinear
    layer = cls.from_linear(nn.Linear(40, 30, dtype=torch.float64), r=4, alpha=8).eval()
    nn.init.normal_(layer.lora_B)
    w0, x = layer.weight.clone(), torch.randn(5, 40, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    assert (layer(x) - y).abs().max() <= 1e-12
    layer.unmerge()
    assert (layer.weight - w0).abs().max() <= 1e-14


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="r must be an integer >= 1, got 0"):
        LoRALinear(4, 4, r=0)
    for bad in (8.0, True, "8"):
        with pytest.raises(ValueError, match=f"r must be an integer >= 1, got {bad!r}"):
            LoRALinear.from_linear(nn.Linear(4, 4), r=bad)
    for bad in (float("nan"), "16", None):
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            DoRALinear.from_linear(nn.Linear(4, 4), r=2, alpha=bad)
    for bad in (1.5, None, True):
        with pytest.raises(ValueError, match="dropout must be a number in"):
            LoRALinear.from_linear(nn.Linear(4, 4), r=2, dropout=bad)
    with pytest.raises(ValueError, match="LoRALinear: unknown backend 'trition': expected auto, torch, triton, cuda"):
        peft_kernels.apply_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], backend="trition")
    with pytest.raises(ValueError, match="SparseDeltaLinear: unknown backend 'gpu'"):
        peft_kernels.apply_sparse(nn.Sequential(nn.Linear(4, 4)), ["0"], backend="gpu")
    np = pytest.importorskip("numpy")
    layer = LoRALinear.from_linear(nn.Linear(4, 4), r=np.int64(2), alpha=np.float32(4))
    assert type(layer.r) is int and type(layer.alpha) is float and layer.scaling == 2.0
    with pytest.raises(TypeError, match="expects nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(4, 4, 1))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.q_proj(x) + self.k_proj(x) * self.v_proj(x))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 5)

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return self.lm_head(x)


def test_apply_lora_targets_and_freezes():
    model = peft_kernels.apply_lora(Model(), ["q_proj", "v_proj"], r=2, alpha=4)
    replaced = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert replaced == {f"layers.{i}.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{w}" for m in replaced for w in ("lora_A", "lora_B")}
    out = model(torch.randn(3, 16))
    out.sum().backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_a_second_apply_keeps_the_first_adapters_trainable():
    """apply_lora / apply_sparse freeze the model's other parameters, but not the adapters an
    earlier call put on it (PEFT keeps every adapter trainable), nor a base parameter of those
    layers the user chose to train."""
    model = peft_kernels.apply_lora(Model(), ["q_proj"], r=2)
    model.layers[0].q_proj.bias.requires_grad_(True)
    model = peft_kernels.apply_lora(model, ["v_proj"], r=4, use_dora=True)
    model = peft_kernels.apply_sparse(model, ["lm_head"], density=0.5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({f"layers.{i}.q_proj.lora_{w}" for i in (0, 1) for w in "AB"}
                         | {f"layers.{i}.v_proj.{w}" for i in (0, 1) for w in ("lora_A", "lora_B", "magnitude")}
                         | {"layers.0.q_proj.bias", "lm_head.delta_values"})


def test_apply_that_fails_on_a_later_layer_changes_nothing():
    """A layer that cannot take the adapter (more sparse entries than it has, an INT4 group that does
    not divide it) is named, and the layers built before it give back their weights'
    requires_grad (HF models load trainable) and stay nn.Linear."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 48), nn.Linear(48, 8))
    with pytest.raises(ValueError, match=r"apply_sparse: 2 \[8, 48\]: .* between 1 and 384 positions, got 1000"):
        peft_kernels.apply_sparse(model, "all-linear", density=None, num_params=1000)
    assert all(p.requires_grad for p in model.parameters()) and all(type(m) is nn.Linear for m in model)
    with pytest.raises(ValueError, match=r"cannot quantize 2 \[8, 48\] as int4"):
        peft_kernels.apply_lora(model, "all-linear", quantize="int4", quant_options={"group_size": 64})
    assert all(p.requires_grad for p in model.parameters()) and all(type(m) is nn.Linear for m in model)


def test_apply_lora_refuses_linear_subclasses_it_cannot_replace_faithfully():
    """nn.MultiheadAttention reads out_proj's weight directly (an adapter there never ran: no
    gradient, no effect) and an unknown nn.Linear subclass may compute something else: a target
    naming one is an error; "all-linear" leaves them out with a warning."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.warns(UserWarning, match=r"leaves out \['self_attn.out_proj \(nn.MultiheadAttention reads"):
        peft_kernels.apply_lora(layer, "all-linear", r=2)
    assert type(layer.self_attn.out_proj) is not LoRALinear and isinstance(layer.linear1, LoRALinear)
    for m in layer.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B)
    layer(torch.randn(2, 5, 16)).sum().backward()
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"cannot replace \['self_attn.out_proj \(nn.MultiheadAttention"):
        peft_kernels.apply_lora(nn.TransformerEncoderLayer(16, 2, 32), ["out_proj"])

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Tagged(nn.Linear):  # nn.Linear's own forward: replaced like an nn.Linear
        pass

    with pytest.raises(ValueError, match=r"\['0 \(Scaled, a subclass of nn.Linear with a forward of its own\)'\]"):
        peft_kernels.apply_sparse(nn.Sequential(Scaled(4, 4), Tagged(4, 4)), ["0", "1"])
    assert isinstance(peft_kernels.apply_sparse(nn.Sequential(Tagged(4, 4)), ["0"])[0], peft_kernels.nn.SparseDeltaLinear)


def test_apply_lora_puts_a_branch_beside_a_linear_subclass_with_its_own_forward():
    """An nn.Linear subclass that computes something else (here 2 · linear(x)) keeps computing it:
    apply_lora wraps it in a LoRABranchLinear (base frozen as base_layer, the branch through
    lora_delta), which equals base(x) + s · dropout(x) Aᵀ Bᵀ in value and every gradient (float64);
    "all-linear" takes it as PEFT does; DoRA, quantize= and merging need the base weight and say so."""
    from peft_kernels.nn import LoRABranchLinear
    from peft_kernels.reference.rng import dropout_keep_mask

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(12, 10, dtype=torch.float64), nn.Tanh(), nn.Linear(10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"0 \(Scaled, a subclass of nn.Linear with a forward of its own\) .*quantize="):
        peft_kernels.apply_lora(model, ["0"], quantize="nf4")
    peft_kernels.apply_lora(model, "all-linear", r=3, alpha=6, dropout=0.25)
    layer = model[0]
    assert type(layer) is LoRABranchLinear and isinstance(model[2], LoRALinear)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 5, 12, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(7)  # the op's seed is the generator's next draw: the same mask
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    keep = dropout_keep_mask(seed, 0.25, 20, 12, device=x.device).reshape(4, 5, 12)
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    x0 = x.detach().clone().requires_grad_()
    base = layer.base_layer
    ref = 2 * (x0 @ base.weight.T + base.bias) + 2.0 * ((torch.where(keep, x0, 0.0) / 0.75) @ a.T) @ b.T
    ref.backward(g)
    assert 0 < keep.float().mean() < 1 and torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in ((x.grad, x0.grad), (layer.lora_A.grad, a.grad), (layer.lora_B.grad, b.grad)):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"merge_and_unload: \['0 \(Scaled\)'\]"):
        peft_kernels.merge_and_unload(model)
    assert type(model[0]) is LoRABranchLinear  # nothing was changed


def test_apply_lora_regex_and_all_linear():
    model = peft_kernels.apply_lora(Model(), r"layers\.0\..*_proj", r=2)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 3
    model = peft_kernels.apply_lora(Model(), "all-linear", r=2)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)


def test_all_linear_leaves_the_output_layer_and_heads_out():
    """PEFT's "all-linear": not the output layer (get_output_embeddings(), whatever its name) nor a
    classification head (score / classifier)."""
    class WithHead(Model):
        def __init__(self):
            super().__init__()
            self.unembed, self.score = nn.Linear(16, 7), nn.Linear(16, 2)

        def get_output_embeddings(self):
            return self.unembed

    model = peft_kernels.apply_lora(WithHead(), "all-linear", r=2)
    assert {type(model.unembed), type(model.score), type(model.lm_head)} == {nn.Linear}
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6


def test_apply_lora_no_match():
    with pytest.raises(ValueError, match="no nn.Linear / Conv1D matches target_modules=\\['o_proj'\\]"):
        peft_kernels.apply_lora(Model(), ["o_proj"])
    with pytest.raises(ValueError, match="a string is a full-match regex .* pass \\['q_proj'\\]"):
        peft_kernels.apply_lora(Model(), "q_proj")
    model = peft_kernels.apply_lora(Model(), ["q_proj"])
    with pytest.raises(ValueError, match=r"already adapted: \['.*q_proj \(LoRALinear\)'\]"):
        peft_kernels.apply_lora(model, ["q_proj"])


def test_info_reports_backends():
    info = peft_kernels.info()
    cpu = info["devices"]["cpu"]
    assert cpu["backends"]["torch"] == "available"
    assert cpu["backends"]["cuda"].startswith("unavailable: ")
    assert cpu["auto"]["lora_linear M=16"] == "torch" and cpu["auto"]["sparse_delta"] == "torch"
    assert info["auto_rules"]["lora_linear"] == [["cuda", 1024], ["triton", None]]
    from peft_kernels.triton import lora as triton_lora
    assert info["triton_paths"]["lora single-launch backward: M <="] == triton_lora.FUSED_BWD_MAX_M
    opt_in = {k: v for k, v in info["triton_paths"].items() if "opt-in until timed" in k}
    assert sorted(k.split(" (")[0] for k in opt_in) == ["dora one-launch row norm", "fast relaunch of compiled kernels"]
    from peft_kernels.triton import launch as triton_launch
    assert [opt_in[k] for k in sorted(opt_in)] == [False, triton_launch.FAST_LAUNCH]  # the norm: off by default
    assert "cuda_extension" in info
    assert info["torch"] == torch.__version__
    peft = pytest.importorskip("peft")
    assert info["integrations"]["peft"] == peft.__version__


def test_auto_on_a_gpu_without_kernels_warns_before_running_the_reference(monkeypatch):
    """backend="auto" on a CUDA tensor when no kernel backend can run (a broken triton, no
    extension) falls back to the PyTorch reference — the slow path — with a warning, once per op."""
    import warnings

    from peft_kernels import backends

    monkeypatch.setattr(backends, "_TRITON_ERROR", ["triton not importable (broken for this test)"])
    monkeypatch.setattr(backends, "_WARNED", set())
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match=r"lora_linear: no kernel backend can run on cuda \(triton: triton not "
                                         r"importable \(broken for this test\)\); running the pure-PyTorch reference"):
        assert backends.resolve("lora_linear", "auto", cuda, rows=4096) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("lora_linear", "auto", cuda, rows=4096) == "torch"  # said once
        assert backends.resolve("lora_linear", "auto", torch.device("cpu")) == "torch"  # CPU: the expected path


MERGE_KINDS = [dict(), dict(use_dora=True), dict(quantize="nf4"), dict(quantize="fp4", use_dora=True),
               dict(quantize="int8"), dict(quantize="int4", use_dora=True), "sparse"]


@pytest.mark.parametrize("kind", MERGE_KINDS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merge_and_unload_gives_plain_linears_with_the_same_outputs(kind, dtype):
    """Every adapter kind becomes an nn.Linear of the layer's effective weight (a quantized base
    decoded): the model's outputs do not change beyond the dtype's rounding; the base weights
    stay frozen, a trained bias stays trained."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8)).to(dtype)
    if kind == "sparse":
        peft_kernels.apply_sparse(model, ["0", "2"], density=0.3)
    else:
        peft_kernels.apply_lora(model, ["0", "2"], r=3, alpha=5, **kind,
                                **({"quant_options": {"group_size": 32}} if kind.get("quantize") == "int4" else {}))
    model[2].bias.requires_grad_(True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)  # a trained adapter (B, Delta, m away from their init)
    x = torch.randn(5, 64, dtype=dtype)
    before = model.eval()(x)
    merged = peft_kernels.merge_and_unload(model)
    assert merged is model and [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear]
    assert model[0].weight.dtype == dtype and not model[0].weight.requires_grad and model[2].bias.requires_grad
    assert rel_err(model(x), before) < (1e-12 if dtype == torch.float64 else 2e-6)


def test_merged_weight_in_low_precision_and_while_merged():
    """bf16 bases: the merged weight is computed in fp32 and rounded once; a layer already merged
    gives its weight; a model without adapters is an error."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 24).to(torch.bfloat16)
    layer = DoRALinear.from_linear(lin, r=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    exact = DoRALinear.from_linear(nn.Linear(48, 24).double(), r=4, alpha=8)
    exact.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    w = layer.merged_weight()
    assert w.dtype == torch.bfloat16 and rel_err(w, exact.merged_weight()) < 2.5e-3  # one bf16 rounding: 2^-9
    layer.merge()
    assert torch.equal(layer.merged_weight(), layer.weight) and torch.equal(layer.to_linear().weight, w)
    with pytest.raises(ValueError, match="no adapter or sparse-delta layers"):
        peft_kernels.merge_and_unload(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_an_adapter_on_a_tied_head_warns_and_merge_and_unload_unties(use_dora):
    """A head tied to the input embedding: apply_lora warns (as HF PEFT does) that the layer's
    merge() would fold the adapter into the shared weight; merge_and_unload unties the head and
    keeps the model's outputs and the embedding as they were."""
    torch.manual_seed(0)
    embed, head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    w0 = embed.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"\['head'\] have weights tied to other modules"):
        peft_kernels.apply_lora(model, ["head"], r=2, use_dora=use_dora)
    nn.init.normal_(model["head"].lora_B)
    tokens = torch.randint(0, 20, (3, 4))
    want = model["head"](model["embed"](tokens))
    peft_kernels.merge_and_unload(model)
    assert model["head"].weight is not model["embed"].weight and torch.equal(model["embed"].weight, w0)
    assert rel_err(model["head"](model["embed"](tokens)), want) < 1e-5


def _two_layer():
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_model_built_on_the_meta_device(use_dora):
    """Built on the meta device (shapes only), materialized with to_empty, base weights loaded:
    the adapters hold uninitialized memory until reset_lora_parameters(), after which the model
    computes its base again (B = 0; DoRA's magnitude = ‖W‖ of the loaded W) and trains."""
    torch.manual_seed(0)
    pretrained = _two_layer()
    with torch.device("meta"):
        model = peft_kernels.apply_lora(_two_layer(), ["0", "2"], r=4, use_dora=use_dora)
    model.to_empty(device="cpu")
    result = model.load_state_dict(pretrained.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".lora_" in k or k.endswith("magnitude") for k in result.missing_keys)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.reset_lora_parameters()
    x = torch.randn(5, 16)
    assert torch.allclose(model(x), pretrained(x), atol=1e-6)
    model(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_reset_parameters_follows_nn_linear():
    """reset_parameters (what FSDP-style materialization calls on each module) gives every tensor
    the layer owns a fresh layer's value: base as nn.Linear draws it (same generator state, same
    numbers), a no-op adapter, DoRA's magnitude the new ‖W‖; a merged layer is unmerged first.
    reset_lora_parameters keeps the base."""
    for cls in (LoRALinear, DoRALinear):
        layer = cls(16, 24, r=4, alpha=8)
        nn.init.normal_(layer.lora_B)
        layer.merge()
        torch.manual_seed(3)
        layer.reset_parameters()
        torch.manual_seed(3)
        fresh = nn.Linear(16, 24)
        assert not layer.merged and torch.equal(layer.weight, fresh.weight) and torch.equal(layer.bias, fresh.bias)
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
        x = torch.randn(3, 16)
        assert torch.allclose(layer(x), fresh(x), atol=1e-6)
        if cls is DoRALinear:
            assert torch.allclose(layer.magnitude, fresh.weight.norm(dim=1))
        w = layer.weight.clone()
        nn.init.normal_(layer.lora_B)
        layer.reset_lora_parameters()
        assert torch.equal(layer.weight, w) and torch.count_nonzero(layer.lora_B) == 0
    q = peft_kernels.nn.QDoRALinear.from_linear(nn.Linear(64, 8), quant="nf4", r=2)
    packed = q.qweight.packed.clone()
    nn.init.normal_(q.lora_B)
    with torch.no_grad():
        q.magnitude.mul_(2)
    q.reset_parameters()  # a quantized base has no random init: kept; the adapter is fresh
    x = torch.randn(3, 64)
    assert torch.equal(q.qweight.packed, packed)
    assert torch.allclose(q(x), peft_kernels.quant_linear(x, q.qweight, q.bias), rtol=1e-5, atol=1e-6)


def test_values_needed_on_the_meta_device_are_refused_clearly(tmp_path):
    """Quantizing, sparse positions and loading into a meta model need values: a clear error
    naming the fix, and nothing changed — copying an adapter into meta tensors dropped it silently."""
    torch.manual_seed(0)
    trained = peft_kernels.apply_lora(_two_layer(), ["0"], r=2)
    nn.init.normal_(trained[0].lora_B)
    peft_kernels.save_adapter(trained, tmp_path / "a")
    sparse = peft_kernels.apply_sparse(_two_layer(), ["2"], density=0.2)
    peft_kernels.sparse.save_sparse_delta(sparse, str(tmp_path / "s.safetensors"))
    with torch.device("meta"):
        model = _two_layer()
    materialize = "Materialize the model first"
    cases = [
        (lambda: peft_kernels.apply_lora(model, ["0"], quantize="nf4"), "quantizing a weight"),
        (lambda: peft_kernels.apply_lora(model, ["0"], quantize="int8"), "quantizing a weight"),
        (lambda: peft_kernels.apply_sparse(model, ["0"], density=0.1), "on the meta device"),
        (lambda: peft_kernels.mask_gradients_(model, {"0.weight": torch.rand(24, 16) < 0.1}), "meta device"),
        (lambda: peft_kernels.load_adapter(model, tmp_path / "a"), "load_adapter: 0.weight is on the meta"),
        (lambda: peft_kernels.sparse.load_sparse_delta(model, str(tmp_path / "s.safetensors")), "load_sparse_delta"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert materialize in str(info.value)
        assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.Linear]
        assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_op_returns_a_tensor_that_is_not_a_view(lead, backend, kernel_device):
    """As F.linear: the output owns its place in autograd (no ._base). A module returning a view
    makes FSDP2 warn that an in-place op on it would skip its pre-backward hook. In-place use of
    the output stays correct (the gradient below goes through an add_)."""
    from peft_kernels.quant import NF4Weight
    device = kernel_device if backend == "triton" else torch.device("cpu")
    torch.manual_seed(0)
    x = torch.randn(*lead, 64, device=device, requires_grad=True)
    w = torch.randn(32, 64, device=device) / 8
    a, b = torch.randn(4, 64, device=device) / 8, torch.randn(32, 4, device=device)
    index = torch.arange(0, 2048, 37, dtype=torch.int32, device=device)
    values = torch.randn(index.numel(), device=device, requires_grad=True)
    calls = {
        "lora_linear": lambda: peft_kernels.lora_linear(x, w, a, b, backend=backend),
        "lora_delta": lambda: peft_kernels.lora_delta(x, a, b, backend=backend),
        "dora_linear": lambda: peft_kernels.dora_linear(x, w, a, b, w.norm(dim=1), backend=backend),
        "qlora_linear": lambda: peft_kernels.qlora_linear(x, NF4Weight.from_float(w), a, b, backend=backend),
        "quant_linear": lambda: peft_kernels.quant_linear(x, NF4Weight.from_float(w), backend=backend),
        "sparse_delta_linear": lambda: peft_kernels.sparse_delta_linear(x, w, values, index, backend=backend),
    }
    for name, call in calls.items():
        y = call()
        assert y.shape == (*lead, 32) and y._base is None, name
        x.grad = None
        y.add_(1.0).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), name


@pytest.mark.parametrize("kind", ["lora", "dora", "nf4", "int8", "int4", "sparse"])
def test_a_torch_export_ed_model_runs_for_inference(kind):
    """torch.export of a model with adapter / sparse layers gives a program that computes what the
    eager model does, also when run with grad mode on (its parameters require grad): the
    quantized bases' windowed products used out= BLAS calls, which refused such inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    if kind == "sparse":
        peft_kernels.apply_sparse(model, ["0", "2"], density=0.1)
    else:
        peft_kernels.apply_lora(model, ["0", "2"], r=4, use_dora=kind == "dora",
                                quantize=None if kind in ("lora", "dora") else kind)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    model.eval()
    x = torch.randn(3, 64)
    want = model(x).detach()
    program = torch.export.export(model, (x,)).module()
    assert any(p.requires_grad for p in program.parameters())
    assert torch.allclose(program(x), want, rtol=1e-5, atol=1e-5)


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("kind", ["lora", "dora", "nf4", "int8", "branch"])
def test_fp32_adapters_over_a_half_precision_model(kind, tmp_path):
    """apply_lora(adapter_dtype=torch.float32), HF PEFT's default over a bf16 / fp16 model: the
    trained tensors are fp32 (fp16 ones made torch.amp.GradScaler refuse to unscale), the layers
    still compute and return fp16, merge_and_unload gives fp16 Linears again (a quantized base
    keeps its nominal dtype), module casts move that nominal dtype, and load_adapter takes it too."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 32))
    if kind == "branch":
        own = _OwnForward(64, 64)
        own.load_state_dict(base[0].state_dict())
        base[0] = own
    base = base.half()
    options = dict(r=4, use_dora=kind == "dora", quantize=kind if kind in ("nf4", "int8") else None)
    if kind != "branch":  # fp16 adapters: the scaler refuses them
        plain = peft_kernels.apply_lora(copy.deepcopy(base), ["0", "2"], **options)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(plain(torch.randn(2, 64).half()).float().sum()).backward()
        with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
            scaler.unscale_(torch.optim.SGD([p for p in plain.parameters() if p.requires_grad]))
    targets = ["0"] if kind == "branch" else ["0", "2"]
    model = peft_kernels.apply_lora(copy.deepcopy(base), targets, adapter_dtype=torch.float32, **options)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    opt = torch.optim.AdamW(trained, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    x = torch.randn(4, 64).half()
    for _ in range(2):
        y = model(x)
        assert y.dtype == torch.float16
        scaler.scale(y.float().square().mean()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert all(p.dtype == torch.float32 for p in trained)
    y = model(x)
    if kind != "branch":
        merged = peft_kernels.merge_and_unload(copy.deepcopy(model))
        assert {p.dtype for p in merged.parameters()} == {torch.float16}
        assert rel_err(merged(x), y) < 5e-3  # fp16 roundings of the merged weight and the product
        peft_kernels.save_adapter(model, tmp_path)
        loaded = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path, adapter_dtype=torch.float32,
                                           quant_options=None, quantize=options["quantize"])
        assert all(p.dtype == torch.float32 for p in loaded.parameters() if p.requires_grad)
        assert torch.equal(loaded(x), y)
    as_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert {p.dtype for p in as_bf16.parameters() if p.requires_grad} == {torch.bfloat16}
    assert as_bf16(x.bfloat16()).dtype == torch.bfloat16
    if kind in ("nf4", "int8"):
        assert as_bf16[0].qweight.dtype == torch.bfloat16 and model[0].qweight.dtype == torch.float16
    with pytest.raises(TypeError, match="adapter_dtype must be None or a floating torch.dtype"):
        peft_kernels.apply_lora(copy.deepcopy(base), targets, adapter_dtype=torch.int8)
