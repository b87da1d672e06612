"""HF PEFT interop on CPU: patched PEFT models match unpatched ones; adapters round-trip
between peft_kernels and HF PEFT in PEFT's format."""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

import peft_kernels
from peft_kernels import backends

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.up = nn.Linear(d, 40)
        self.down = nn.Linear(40, d)

    def forward(self, x):
        h = self.o_proj(torch.tanh(self.q_proj(x)) * self.v_proj(x))
        return x + self.down(torch.relu(self.up(h)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return self.head(x)


def _peft_model(dropout=0.0, targets=("q_proj", "v_proj", "up"), **kw):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets), **kw)
    model = peft.get_peft_model(Net(), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)  # a trained adapter, not PEFT's zero init
    return model


def _run(model, x):
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = model(xi)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), xi.grad, grads


def _assert_runs_as(model, x, reference):
    """model's output, input gradient and parameter gradients on x equal ``reference`` (_run's
    result, e.g. of the unpatched model); returns the gradients."""
    y0, gx0, g0 = reference
    y1, gx1, g1 = _run(model, x)
    assert torch.allclose(y1, y0, atol=1e-5) and torch.allclose(gx1, gx0, atol=1e-5)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-5), n
    return g1


def _assert_same_run(result, reference, label=""):
    """Two _run results, float64 (patched and PEFT's): output, input gradient and every parameter
    gradient equal to rounding, the same parameters given one; returns the gradients (by name)."""
    (y1, gx1, g1), (y0, gx0, g0) = result, reference
    assert torch.allclose(y1, y0, rtol=1e-10, atol=1e-12) and torch.allclose(gx1, gx0, rtol=1e-10, atol=1e-12), label
    assert g0.keys() == g1.keys(), label
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-10, atol=1e-12), (label, n)
    return g1


def _assert_train_and_eval_steps_match(model, patched, x, seed, label):
    """A training step and an eval step of ``patched`` equal ``model``'s (_assert_same_run), each from
    torch.manual_seed(seed) so that PEFT's own random draws repeat."""
    for train in (True, False):
        model.train(train)
        patched.train(train)
        torch.manual_seed(seed)
        reference = _run(model, x)
        torch.manual_seed(seed)
        _assert_same_run(_run(patched, x), reference, (label, train))


@pytest.mark.parametrize("train", [True, False])
def test_patched_matches_unpatched(train):
    model = _peft_model(dropout=0.0 if train else 0.2)
    model.train(train)
    x = torch.randn(3, 7, 24)
    y0, gx0, g0 = _run(model, x)
    report = peft_kernels.patch_peft_model(model)
    assert len(report.patched) == 6 and not report.skipped
    assert "layers.0.q_proj" in str(report)
    y1, gx1, g1 = _run(model, x)
    assert backends.last_used("lora_linear") == "torch"
    assert torch.allclose(y1, y0, atol=1e-5) and torch.allclose(gx1, gx0, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) == 12
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-5), n
    assert len(peft_kernels.unpatch_peft_model(model)) == 6
    assert all("forward" not in vars(m) for m in model.modules())
    y2, _, _ = _run(model, x)
    assert torch.equal(y2, y0)


@pytest.mark.parametrize("seed", range(12))
def test_patched_matches_unpatched_on_random_configurations(seed):
    """Random LoraConfigs (rank, alpha, rsLoRA, DoRA, bias mode, which layers, odd widths down to 1),
    float64, train and eval: outputs and every gradient equal unpatched PEFT's."""
    import random
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d, h = rng.randint(1, 40), rng.randint(1, 40)
    net = nn.Sequential(nn.Linear(d, h, bias=rng.random() < 0.5), nn.Tanh(), nn.Linear(h, h), nn.ReLU(),
                        nn.Linear(h, 3)).double()
    cfg = peft.LoraConfig(r=rng.choice([1, 2, 8]), lora_alpha=rng.choice([1, 16]), use_rslora=rng.random() < 0.3,
                          use_dora=rng.random() < 0.4, bias=rng.choice(["none", "all", "lora_only"]),
                          target_modules=rng.sample(["0", "2", "4"], rng.randint(1, 3)))
    model = peft.get_peft_model(net, cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert len(report.patched) == len(cfg.target_modules) and not report.skipped
    x = torch.randn(rng.randint(1, 5), 3, d, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        patched.train(train)
        reference = _run(model, x)
        _assert_same_run(_run(patched, x), reference)


@pytest.mark.parametrize("seed", range(14))
def test_patched_factored_tuners_match_unpatched_on_random_configurations(seed):
    """Random configurations of the tuners patched as LoRA with formed factors — AdaLoRA, VeRA, LoHa
    (its rank and module dropout on: seeded, they repeat PEFT's draws), DeLoRA, VB-LoRA, UniLoRA —
    and of LoKr (Kronecker products of its factors; rank and module dropout likewise), over odd
    widths down to 1 (prime widths: a Kronecker factor of width 1), random ranks and targets,
    float64, train (a seeded step) and eval: outputs and every gradient equal unpatched PEFT's."""
    import random
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tuner = ["adalora", "vera", "loha", "delora", "vblora", "unilora", "lokr"][seed % 7]
    unit = rng.choice([1, 2, 4]) if tuner == "vblora" else 1  # VB-LoRA's vectors tile both widths
    d, h = unit * rng.randint(1, 12), unit * rng.randint(1, 12)
    net = nn.Sequential(nn.Linear(d, h, bias=rng.random() < 0.5), nn.Tanh(), nn.Linear(h, h), nn.ReLU(),
                        nn.Linear(h, 3 * unit)).double()
    targets = rng.sample(["0", "2", "4"], rng.randint(1, 3))
    r = rng.choice([1, 2, 5])
    cfg = {"adalora": lambda: peft.AdaLoraConfig(init_r=r + 1, target_r=1, total_step=10, lora_alpha=rng.choice([1, 8]),
                                                 target_modules=targets),
           "vera": lambda: peft.VeraConfig(r=rng.choice([1, 4, 16]), target_modules=targets),
           "loha": lambda: peft.LoHaConfig(r=rng.choice([1, 2, 5, 16]), alpha=rng.choice([1, 3, 16]),
                                           rank_dropout=rng.choice([0.0, 0.3]), module_dropout=rng.choice([0.0, 0.4]),
                                           target_modules=targets, init_weights=False),
           "delora": lambda: peft.DeloraConfig(r=r, delora_lambda=rng.choice([1, 15]), target_modules=targets),
           "vblora": lambda: peft.VBLoRAConfig(r=r, num_vectors=rng.choice([4, 9]), vector_length=unit,
                                               topk=rng.choice([1, 2]), target_modules=targets),
           "unilora": lambda: peft.UniLoraConfig(r=r, theta_d_length=rng.choice([7, 64]), target_modules=targets,
                                                 init_weights=False),
           "lokr": lambda: peft.LoKrConfig(r=r, alpha=rng.choice([1, 3, 16]), decompose_both=rng.random() < 0.5,
                                           decompose_factor=rng.choice([-1, 2, 3]),
                                           rank_dropout=rng.choice([0.0, 0.3]), module_dropout=rng.choice([0.0, 0.4]),
                                           target_modules=targets, init_weights=False)}[tuner]()
    model = peft.get_peft_model(net, cfg)
    for name, p in model.named_parameters():
        if any(part in name for part in ("lora_E", "vera_lambda_b", "delora_B")):  # PEFT starts these at zero
            nn.init.normal_(p, std=0.5)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert len(report.patched) == len(targets) and not report.skipped, (tuner, str(report))
    _assert_train_and_eval_steps_match(model, patched, torch.randn(rng.randint(1, 5), 3, d, dtype=torch.float64),
                                       seed, tuner)


def _two_adapters(model, cfg):
    """``model`` with a second adapter "other" (``cfg``) and both active, as
    ``base_model.set_adapter([...])`` makes them; its lora_B not zero."""
    model.add_adapter("other", cfg)
    model.base_model.set_adapter(["default", "other"])
    for name, p in model.named_parameters():
        if "lora_B.other" in name or "vera_lambda_b.other" in name or "hada_w2_b.other" in name:
            nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", ["lora", "lora over own forward", "vera", "loha"])
def test_several_active_adapters_run_fused_and_match_unpatched(kind, train):
    """PEFT sums the branches of several active adapters. Without active dropout (training at p = 0,
    or eval) they are one product of joined factors — one lora_linear per layer (lora_delta beside a
    base of its own forward) — and outputs and every gradient of both adapters equal PEFT's."""
    from unittest import mock

    from peft_kernels.integrations import peft as integration

    p = 0.0 if train else 0.3
    if kind == "vera":
        model = _vera_model(dropout=p, dtype=torch.float64)
        model = _two_adapters(model, peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "up", "down"],
                                                     vera_dropout=p))
        op, calls = "lora_linear", 8
    elif kind == "loha":  # ranks 3² + 2² = 13 joined
        model = _two_adapters(_loha_model(), peft.LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj", "up"]))
        op, calls = "lora_linear", 6
    elif kind == "lora":
        model = _peft_model(dropout=p).double()
        model = _two_adapters(model, peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=p, lora_bias=True,
                                                     target_modules=["q_proj", "v_proj", "up"]))
        op, calls = "lora_linear", 6
    else:
        model = _branch_model("own forward", dropout=p, dtype=torch.float64)
        model = _two_adapters(model, peft.LoraConfig(r=3, lora_alpha=3, lora_dropout=p, target_modules=["0", "2"]))
        op, calls = "lora_delta", 1  # the OwnForwardLinear layer, both adapters joined; "2" runs lora_linear
    model.train(train)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    reference = _run(model, x)
    assert all(any(f".{a}." in n + "." for n in reference[2]) for a in ("default", "other"))
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert not report.skipped
    with mock.patch.object(integration, op, wraps=getattr(integration, op)) as fused, \
            mock.patch.object(integration, "lora_delta", wraps=integration.lora_delta) as delta:
        result = _run(patched, x)
    assert fused.call_count == calls and (op == "lora_delta" or delta.call_count == 0)
    _assert_same_run(result, reference)


def test_several_active_adapters_keep_one_dropout_mask_each():
    """With dropout in training each active adapter keeps a mask of its own, as PEFT draws one per
    adapter: the first rides in lora_linear, the other is a lora_delta beside it (seeded from torch's
    generator, so torch.manual_seed repeats the step); DoRA among several active adapters runs
    PEFT's forward."""
    from unittest import mock

    from peft_kernels.integrations import peft as integration

    model = _two_adapters(_peft_model(dropout=0.3), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.3,
                                                                    target_modules=["q_proj", "v_proj", "up"])).train()
    peft_kernels.patch_peft_model(model)
    x = torch.randn(4, 24)
    with mock.patch.object(integration, "lora_linear", wraps=integration.lora_linear) as fused, \
            mock.patch.object(integration, "lora_delta", wraps=integration.lora_delta) as delta:
        model(x)
    assert fused.call_count == delta.call_count == 6
    assert all(call.kwargs["dropout_p"] == 0.3 for call in fused.call_args_list + delta.call_args_list)
    _assert_dropout_follows_manual_seed(model, x)

    dora = _two_adapters(_peft_model(use_dora=True).double(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    xd = torch.randn(3, 24, dtype=torch.float64)
    reference = _run(dora, xd)
    assert not peft_kernels.patch_peft_model(dora).skipped
    with mock.patch.object(integration, "dora_linear", wraps=integration.dora_linear) as fused:
        _assert_runs_as(dora, xd, reference)
    assert fused.call_count == 4  # v_proj and up: one active DoRA adapter each; q_proj: PEFT's forward


def _three_adapters():
    """_peft_model (float64, eval) with adapters "b" (r=2, lora_bias, on q_proj / up) and "c" (r=5, on
    q_proj / v_proj) beside "default" (r=4, on q_proj / v_proj / up); every lora_B non-zero."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's lora_bias warning for bias-free bases
        model = _peft_model().double()
        model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, lora_bias=True, target_modules=["q_proj", "up"]))
        model.add_adapter("c", peft.LoraConfig(r=5, lora_alpha=5, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
        if "lora_" in name:
            p.requires_grad_(True)  # PEFT trains the active adapter only; here every adapter's gradient counts
    return model.eval()


def test_mixed_adapter_batches_run_as_two_products_and_match_peft():
    """PEFT's mixed-adapter batches (inference: adapter_names, one per sample, "__base__" for none):
    patched, every layer computes them as two products of the joined factors, whatever the number of
    adapters, instead of PEFT's copy-out / copy-back per adapter; outputs and every gradient equal
    PEFT's, for layers that hold only some of the named adapters too; PEFT's own argument errors
    stay."""
    from unittest import mock

    model = _three_adapters()
    x = torch.randn(5, 7, 24, dtype=torch.float64)
    names = ["b", "__base__", "default", "c", "b"]
    reference = _run_mixed(model, x, names)
    patched = copy.deepcopy(model)
    assert len(peft_kernels.patch_peft_model(patched).patched) == 6
    peft_linear = type(patched.base_model.model.layers[0].q_proj)
    with mock.patch.object(peft_linear, "_mixed_batch_forward", side_effect=AssertionError("PEFT's path ran")):
        result = _run_mixed(patched, x, names)
        base_only = patched(x, adapter_names=["__base__"] * 5)
    assert any("lora_B.b.bias" in n for n in _assert_same_run(result, reference))
    with patched.disable_adapter():
        assert torch.allclose(base_only, patched(x), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        patched(x, adapter_names=["b"])
    with pytest.raises(ValueError, match="training mode"):
        patched.train()(x, adapter_names=names)
    noisy = _peft_model(dropout=0.3).train()  # a layer called with dropout active: PEFT's path
    peft_kernels.patch_peft_model(noisy)
    with mock.patch.object(peft_linear, "_mixed_batch_forward", return_value="PEFT's") as peft_path:
        assert noisy.base_model.model.layers[0].q_proj(torch.randn(2, 24), adapter_names=["default"] * 2) == "PEFT's"
    assert peft_path.call_count == 1


def _run_mixed(model, x, names):
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = model(xi, adapter_names=names)
    y.square().sum().backward()
    return y.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_dropout_follows_manual_seed(model, x):
    """``model`` (training, dropout > 0) repeats its output under the same torch.manual_seed and
    changes under another; returns the first output."""
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    torch.manual_seed(2)
    assert torch.equal(a, b) and not torch.equal(a, model(x))
    return a


@pytest.mark.parametrize("family", ["lora", "adalora", "vera", "vblora", "unilora", "delora"])
def test_dropout_runs_fused_and_follows_manual_seed(family):
    formed = {kind: (lambda dropout, kind=kind: _formed_factors_model(kind, dropout, torch.float32))
              for kind in ("vblora", "unilora", "delora")}
    model = {"lora": _peft_model, "adalora": _adalora_model, "vera": _vera_model, **formed}[family](dropout=0.3).train()
    plain = copy.deepcopy(model).eval()
    peft_kernels.patch_peft_model(model)
    x = torch.randn(4, 24)
    assert not torch.equal(_assert_dropout_follows_manual_seed(model, x), plain(x))


def test_states_peft_keeps():
    model = _peft_model().eval()
    x = torch.randn(2, 24)
    peft_kernels.patch_peft_model(model)
    with model.disable_adapter():
        plain = model(x)
    model.merge_adapter()
    merged = model(x)
    model.unmerge_adapter()
    assert torch.allclose(merged, model(x), atol=1e-5)
    assert not torch.allclose(plain, merged, atol=1e-3)


@pytest.mark.parametrize("train", [True, False])
def test_lora_bias_runs_fused_and_matches_unpatched(train):
    """PEFT's lora_bias=True (a bias on lora_B, scaled with the branch) is folded into the fused op's
    bias: outputs and every gradient, lora_B's bias included, equal PEFT's; over a bias-free base
    too (PEFT warns and adds the term alone)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's warning for v_proj, which has no bias
        model = _peft_model(dropout=0.0 if train else 0.2, targets=("q_proj", "v_proj", "o_proj"), lora_bias=True)
    for name, p in model.named_parameters():
        if "lora_B" in name and name.endswith("bias"):
            nn.init.normal_(p, std=0.5)
    model.train(train)
    x = torch.randn(3, 7, 24)
    reference = _run(model, x)
    report = peft_kernels.patch_peft_model(model)
    assert len(report.patched) == 6 and not report.skipped
    grads = _assert_runs_as(model, x, reference)
    assert sum(n.endswith("lora_B.default.bias") for n in grads) == 6


def test_unsupported_layers_are_reported():
    """PEFT layers without a fused op — LoRA over an embedding, and tuner types peft_kernels does not
    compute (IA3 here) — are listed with why and keep PEFT's forward."""
    class EmbNet(Net):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 24)

        def forward(self, ids):
            return super().forward(self.emb(ids))

    torch.manual_seed(0)
    model = peft.get_peft_model(EmbNet(), peft.LoraConfig(r=4, target_modules=["emb", "q_proj"]))
    report = peft_kernels.patch_peft_model(model)
    assert len(report.patched) == 2 and list(report.skipped) == ["base_model.model.emb"]
    assert "is not a LoRA Linear" in report.skipped["base_model.model.emb"]
    ia3 = peft.get_peft_model(Net(), peft.IA3Config(target_modules=["q_proj", "up"], feedforward_modules=["up"],
                                                    init_ia3_weights=False))
    x = torch.randn(2, 24)
    before = ia3(x)
    report = peft_kernels.patch_peft_model(ia3)
    assert not report.patched and len(report.skipped) == 4
    assert all("no fused op for this PEFT layer type" in why for why in report.skipped.values())
    assert torch.equal(ia3(x), before)


def test_mica_adapters_run_fused_and_load_with_lora_B_frozen(tmp_path):
    """PEFT's MiCA (init_lora_weights="mica") computes plain LoRA with lora_B frozen: patched, it runs
    the fused op (no gradient for lora_B) and matches PEFT; saved, it loads with lora_B frozen."""
    model = _peft_model(init_lora_weights="mica")
    x = torch.randn(3, 7, 24)
    reference = _run(model, x)
    report = peft_kernels.patch_peft_model(model)
    assert len(report.patched) == 6 and not report.skipped
    assert not any("lora_B" in n for n in _assert_runs_as(model, x, reference))
    peft_kernels.unpatch_peft_model(model)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    ours = peft_kernels.load_adapter(Net(), tmp_path)
    layers = [m for m in ours.modules() if isinstance(m, peft_kernels.nn.LoRALinear)]
    assert len(layers) == 6 and all(m.lora_A.requires_grad and not m.lora_B.requires_grad for m in layers)
    assert torch.allclose(ours.eval()(x), model.eval()(x), atol=1e-5)


def _adalora_model(dropout=0.0, dtype=torch.float32, net=None, targets=("q_proj", "v_proj", "up")):
    """AdaLoRA (init_r 6, lora_alpha 8) on ``net`` (default Net()), E drawn non-zero."""
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=1, lora_alpha=8,
                             lora_dropout=dropout, target_modules=list(targets))
    model = peft.get_peft_model((net or Net()).to(dtype), cfg)
    for name, p in model.named_parameters():
        if "lora_E" in name:
            nn.init.normal_(p, std=0.5)  # PEFT starts E at zero: the branch would compute nothing
    return model


def _vera_model(dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "up", "down"], vera_dropout=dropout)
    model = peft.get_peft_model(Net().to(dtype), cfg)
    for name, p in model.named_parameters():
        if "vera_lambda_b" in name:
            nn.init.normal_(p, std=0.5)  # PEFT starts lambda_b at zero
    return model


@pytest.mark.parametrize("family", ["adalora", "vera"])
@pytest.mark.parametrize("train", [True, False])
def test_adalora_and_vera_run_fused_and_match_unpatched(family, train):
    """AdaLoRA's SVDLinear and VeRA's Linear are LoRA with other factors (A ⊙ E / ranknum; A_s and
    diag(λ_b) B_s diag(λ_d) of the shared frozen matrices, A_s passed frozen so that the op skips its
    gradient): patched, each runs one lora_linear, and outputs and every gradient (lora_A / lora_E /
    lora_B; λ_d / λ_b) equal PEFT's, with some of AdaLoRA's singular values masked to zero as its
    rank allocator does; dropout (eval) is the identity."""
    from unittest import mock

    from peft_kernels.integrations import peft as integration

    model = (_adalora_model if family == "adalora" else _vera_model)(dropout=0.0 if train else 0.3, dtype=torch.float64)
    if family == "adalora":
        with torch.no_grad():
            model.base_model.model.layers[0].q_proj.lora_E["default"][[1, 4]] = 0.0
    model.train(train)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    reference = _run(model, x)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert len(report.patched) == (6 if family == "adalora" else 8) and not report.skipped, str(report)
    with mock.patch.object(integration, "lora_linear", wraps=integration.lora_linear) as op:
        result = _run(patched, x)
    assert op.call_count == len(report.patched)
    assert all(call.args[2].requires_grad == (family == "adalora") for call in op.call_args_list)
    # the same gradients by name (PEFT < 0.22 gives AdaLoRA's ranknum a gradient too, and so do we there)
    grads = _assert_same_run(result, reference)
    parts = ("lora_A", "lora_E", "lora_B") if family == "adalora" else ("vera_lambda_d", "vera_lambda_b")
    assert sum(n.endswith(f"{part}.default") for n in grads for part in parts) == (18 if family == "adalora" else 16)
    assert len(peft_kernels.unpatch_peft_model(patched)) == len(report.patched)
    assert torch.equal(patched(x), model(x))


@pytest.mark.parametrize("family", ["adalora", "vera"])
def test_adalora_and_vera_keep_peft_dtypes_over_a_bf16_base(family):
    """fp32 adapters (get_peft_model's autocast_adapter_dtype) over a bf16 model, plain and under bf16
    autocast: bf16 outputs equal PEFT's to bf16 rounding, gradients back in fp32."""
    model = (_adalora_model if family == "adalora" else _vera_model)(dtype=torch.bfloat16).train()
    patched = copy.deepcopy(model)
    assert not peft_kernels.patch_peft_model(patched).skipped
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    for cast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            y0, y1 = model(x.float() if cast else x), patched(x.float() if cast else x)
        assert y1.dtype == y0.dtype == torch.bfloat16
        assert torch.allclose(y1.float(), y0.float(), rtol=1e-2, atol=1e-2)
    y1.float().square().sum().backward()
    trained = [p for p in patched.parameters() if p.requires_grad and p.grad is not None]
    assert trained and all(p.grad.dtype == p.dtype == torch.float32 for p in trained)


def test_adalora_rank_allocation_trains_patched_as_unpatched():
    """AdaLoRA's training loop, patched: its rank allocator reads the gradients the fused op gives
    lora_A / lora_E / lora_B and masks singular values; three steps of SGD with update_and_allocate
    leave every parameter, the masked E entries included, as unpatched PEFT leaves them (float64)."""
    models = [_adalora_model(dtype=torch.float64) for _ in range(2)]
    assert len(peft_kernels.patch_peft_model(models[1]).patched) == 6
    x = torch.randn(4, 5, 24, dtype=torch.float64)
    for model in models:
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for step in range(4):
            model(x).square().mean().backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
    zeros = [int((p == 0).sum()) for n, p in models[1].named_parameters() if "lora_E" in n]
    assert sum(zeros) > 0  # the allocator masked some singular values
    for (n, p0), (_, p1) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.allclose(p1, p0, rtol=1e-9, atol=1e-12), n


def test_adalora_and_vera_checks_and_fallbacks():
    """A VeRA adapter whose shared matrices do not chain with its vectors, or an AdaLoRA adapter of
    rank 0, is left to PEFT with why; a dropout module changed after patching runs PEFT's forward
    with a warning; AdaLoRA over a base of its own forward fuses the branch alone."""
    vera = _vera_model()
    layer = vera.base_model.model.layers[0].q_proj
    layer.vera_lambda_d["default"] = nn.Parameter(torch.randn(5))
    report = peft_kernels.patch_peft_model(vera)
    assert list(report.skipped) == ["base_model.model.layers.0.q_proj"] and len(report.patched) == 7
    assert "shapes do not chain" in report.skipped["base_model.model.layers.0.q_proj"]

    ada = _adalora_model()
    layer = ada.base_model.model.layers[1].up
    for part in ("lora_A", "lora_E", "lora_B"):
        old = getattr(layer, part)["default"]
        getattr(layer, part)["default"] = nn.Parameter(old[:0] if part != "lora_B" else old[:, :0])
    report = peft_kernels.patch_peft_model(ada)
    assert "rank 0" in report.skipped["base_model.model.layers.1.up"] and len(report.patched) == 5

    ada = _adalora_model()
    peft_kernels.patch_peft_model(ada)
    x = torch.randn(2, 24)
    ada.base_model.model.layers[0].q_proj.lora_dropout["default"] = nn.AlphaDropout(0.1)
    with pytest.warns(UserWarning, match="AlphaDropout"):
        ada.eval()(x)

    model = _adalora_model(net=nn.Sequential(OwnForwardLinear(24, 40), nn.Tanh(), nn.Linear(40, 6)),
                           targets=["0", "2"])
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert report.branch_only == {"base_model.model.0": "OwnForwardLinear"} and len(report.patched) == 2
    xr = torch.randn(3, 24)
    _assert_runs_as(patched, xr, _run(model, xr))


def _loha_model(r=3, rank_dropout=0.0, module_dropout=0.0, dtype=torch.float64, net=None,
                targets=("q_proj", "v_proj", "up")):
    """LoHa (alpha 5: a scaling that float32 rounds) on ``net`` (default Net()), every factor drawn
    non-zero (init_weights=False)."""
    torch.manual_seed(0)
    cfg = peft.LoHaConfig(r=r, alpha=5, rank_dropout=rank_dropout, module_dropout=module_dropout,
                          target_modules=list(targets), init_weights=False)
    return peft.get_peft_model((net or Net()).to(dtype), cfg)


@pytest.mark.parametrize("train", [True, False])
def test_loha_runs_fused_as_lora_of_rank_r_squared_and_matches_unpatched(train):
    """PEFT's LoHa forms Δ = s (W1a W1b) ⊙ (W2a W2b) [out, in] every call and multiplies by it; patched,
    the Hadamard product runs as one lora_linear of rank r² (Khatri-Rao factors), and outputs and the
    gradients of all four factors equal PEFT's (float64)."""
    from unittest import mock

    from peft_kernels.integrations import peft as integration

    model = _loha_model().train(train)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    reference = _run(model, x)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert len(report.patched) == 6 and not report.skipped, str(report)
    with mock.patch.object(integration, "lora_linear", wraps=integration.lora_linear) as op, \
            mock.patch.object(type(patched.base_model.model.layers[0].q_proj), "get_delta_weight",
                              side_effect=AssertionError("PEFT's dense delta was formed")):
        result = _run(patched, x)
    assert op.call_count == 6 and all(call.args[2].shape[0] == 9 for call in op.call_args_list)  # rank r² = 9
    assert sum(".hada_" in n for n in _assert_same_run(result, reference)) == 24
    assert len(peft_kernels.unpatch_peft_model(patched)) == 6
    assert torch.equal(patched(x), model(x))


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr without rank_dropout_scale"])
def test_loha_and_lokr_rank_and_module_dropout_draw_as_peft_does(kind):
    """LoHa's and LoKr's module dropout (an adapter skipped for the step) and rank dropout (rows of Δ
    masked, scaled by the mask's mean — LoKr's in float32, and only with rank_dropout_scale) are drawn
    from torch's CPU generator; patched, they are drawn in PEFT's order, so a seeded training step
    equals unpatched PEFT's — output, every gradient, and the generator's state after it — whichever
    adapters a seed skips."""
    if kind == "loha":
        model = _loha_model(rank_dropout=0.3, module_dropout=0.4).train()
    else:
        model = _lokr_model(rank_dropout=0.3, module_dropout=0.4, rank_dropout_scale=kind == "lokr").train()
    patched = copy.deepcopy(model)
    peft_kernels.patch_peft_model(patched)
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    trained = set()
    for seed in range(6):
        torch.manual_seed(seed)
        reference = _run(model, x)
        after0 = torch.rand(3)
        torch.manual_seed(seed)
        result = _run(patched, x)
        assert torch.equal(torch.rand(3), after0), seed
        trained.add(len(_assert_same_run(result, reference, seed)))
    assert len(trained) > 1  # some seeds skipped some adapters, others not
    torch.manual_seed(0)
    plain = copy.deepcopy(patched).eval()(x)
    assert not torch.allclose(_run(patched, x)[0], plain)  # the masks act in training


def test_loha_scaling_is_rounded_to_float32_as_torch_tensor_rounds_it():
    """PEFT multiplies LoHa's Δ by torch.tensor(scaling), a float32: the patch rounds the scaling the
    same way in plain Python (no host tensor per call; torch.compile folds it) — every value, ties to
    even, float32's overflow and subnormals included."""
    from peft_kernels.integrations.peft import _as_float32

    g = torch.Generator().manual_seed(0)
    values = (torch.randn(20000, generator=g, dtype=torch.float64) * torch.exp(torch.randn(20000, generator=g,
                                                                                           dtype=torch.float64) * 20))
    f32 = torch.tensor([1.0, 1.5, 1.75], dtype=torch.float32)
    ties = (f32.double() + torch.nextafter(f32, torch.tensor(2.0)).double()) / 2  # halfway between floats
    extremes = torch.tensor([5 / 3, 3.4028235e38, 3.40282357e38, -1e300, 2.0**-130, -(2.0**-149), 0.0],
                            dtype=torch.float64)
    for v in torch.cat([values, ties, extremes]).tolist():
        assert _as_float32(v) == torch.tensor(v, dtype=torch.float32).item() or v != v, v


def _assert_conv_left_to_peft(cfg):
    """A Conv2d and a Linear under PEFT's ``cfg``: patched, the Linear is computed by the patch, the
    convolution left to PEFT with why, and the model computes as unpatched."""
    conv = peft.get_peft_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)), cfg)
    xc = torch.randn(2, 3, 6, 6)
    reference = _run(conv, xc)
    report = peft_kernels.patch_peft_model(conv)
    assert report.patched == ["base_model.model.2"] and "no fused op" in report.skipped["base_model.model.0"]
    _assert_runs_as(conv, xc, reference)


def _assert_bf16_model_keeps_peft_dtypes(cfg, trained: int):
    """A bf16 Net under PEFT's ``cfg`` (adapters in fp32, PEFT's autocast_adapter_dtype), patched: with
    and without autocast, a layer returns x's dtype and the model bf16 as PEFT's do, values agree to
    bf16 rounding, and the ``trained`` adapter parameters get fp32 gradients."""
    torch.manual_seed(0)
    bf16 = peft.get_peft_model(Net().to(torch.bfloat16), cfg).train()
    patched = copy.deepcopy(bf16)
    assert not peft_kernels.patch_peft_model(patched).skipped
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    for cast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            xi = x.float() if cast else x
            q0, q1 = bf16.base_model.model.layers[0].q_proj(xi), patched.base_model.model.layers[0].q_proj(xi)
            y0, y1 = bf16(xi), patched(xi)
        assert q1.dtype == q0.dtype == xi.dtype and y1.dtype == y0.dtype == torch.bfloat16
        assert torch.allclose(q1.float(), q0.float(), rtol=2e-2, atol=2e-2)
        assert torch.allclose(y1.float(), y0.float(), rtol=2e-2, atol=2e-2)
    y1.float().square().sum().backward()
    params = [p for p in patched.parameters() if p.requires_grad and p.grad is not None]
    assert len(params) == trained and all(p.grad.dtype == p.dtype == torch.float32 for p in params)


def test_loha_layers_the_fused_op_cannot_take_are_left_to_peft():
    """LoHa of rank 17 (r² = 289 LoRA columns, above what one kernel takes) and LoHa over a Conv2d
    are left to PEFT with why; LoHa over a base of its own forward fuses the branch alone (lora_delta),
    and a bf16 model's fp32 adapters keep PEFT's dtypes: under autocast LoHa returns x's dtype."""
    report = peft_kernels.patch_peft_model(_loha_model(r=17))
    assert not report.patched and len(report.skipped) == 6
    assert all("r² = 289" in why for why in report.skipped.values())

    _assert_conv_left_to_peft(peft.LoHaConfig(r=2, target_modules=["0", "2"], init_weights=False))

    model = _loha_model(net=nn.Sequential(OwnForwardLinear(24, 40), nn.Tanh(), nn.Linear(40, 6)), targets=["0", "2"])
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert report.branch_only == {"base_model.model.0": "OwnForwardLinear"} and len(report.patched) == 2
    xr = torch.randn(3, 24, dtype=torch.float64)
    _assert_runs_as(patched, xr, _run(model, xr))

    _assert_bf16_model_keeps_peft_dtypes(peft.LoHaConfig(r=3, target_modules=["q_proj", "up"], init_weights=False),
                                         trained=16)


def _lokr_model(rank_dropout=0.0, module_dropout=0.0, dtype=torch.float64, net=None,
                targets=("q_proj", "v_proj", "up"), **kw):
    """LoKr (r 2 unless given, alpha 5) on ``net`` (default Net()), every factor drawn non-zero
    (init_weights=False). On Net's 24 -> 24 / 24 -> 40 layers: W1 [4, 4] / [5, 4] full, W2 of rank r."""
    torch.manual_seed(0)
    kw.setdefault("r", 2)
    cfg = peft.LoKrConfig(alpha=5, rank_dropout=rank_dropout, module_dropout=module_dropout,
                          target_modules=list(targets), init_weights=False, **kw)
    return peft.get_peft_model((net or Net()).to(dtype), cfg)


# (W1 full, W2 of rank 2), (both full), (both of rank 2), (W1 [4, 4] by decompose_factor, W2 of rank 1)
_LOKR_SHAPES = [{}, {"r": 8}, {"decompose_both": True}, {"r": 1, "decompose_factor": 4}]


@pytest.mark.parametrize("config", _LOKR_SHAPES, ids=["w2-low-rank", "both-full", "both-low-rank", "factor-4"])
@pytest.mark.parametrize("train", [True, False])
def test_lokr_runs_as_kronecker_products_and_matches_unpatched(config, train):
    """PEFT's LoKr forms Δ = s · kron(W1, W2) [out, in] every call and multiplies by it; patched, no
    Kronecker product is formed (each token's x as a [c, d] grid X: W1 X W2ᵀ), and outputs and the
    gradients of every factor equal PEFT's (float64), over every way LoKr stores W1 and W2."""
    from unittest import mock

    model = _lokr_model(targets=("q_proj", "v_proj", "up", "down"), **config).train(train)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    reference = _run(model, x)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert len(report.patched) == 8 and not report.skipped, str(report)
    assert "patched  base_model.model.layers.0.q_proj" in str(report)
    with mock.patch.object(type(patched.base_model.model.layers[0].q_proj), "get_delta_weight",
                           side_effect=AssertionError("PEFT's dense delta was formed")), \
            mock.patch.object(torch, "kron", side_effect=AssertionError("a Kronecker product was formed")):
        result = _run(patched, x)
    grads = _assert_same_run(result, reference)
    stored = {n.split(".lokr_")[1].split(".")[0] for n, p in patched.named_parameters() if ".lokr_" in n}
    assert grads.keys() == {n for n, p in patched.named_parameters() if ".lokr_" in n} and stored == {
        0: {"w1", "w2_a", "w2_b"}, 1: {"w1", "w2"}, 2: {"w1", "w1_a", "w1_b", "w2_a", "w2_b"},
        3: {"w1", "w2_a", "w2_b"}}[_LOKR_SHAPES.index(config)]  # decompose_both leaves the 4 x 4 W1s whole
    assert len(peft_kernels.unpatch_peft_model(patched)) == 8
    assert torch.equal(patched(x), model(x))


def test_kron_products_equal_the_dense_kronecker_product_in_every_order():
    """_kron_products (W1 X W2ᵀ per token) against x kron(W1, W2)ᵀ formed densely, float64, over random
    factor shapes (widths 1 to 7, W2 full or of rank 1 to 3): the low-rank chain, and a full W2 in
    either order (forced, and the cheaper one by default), agree with the dense product."""
    import random

    from peft_kernels.integrations import peft as integration

    rng = random.Random(0)
    for _ in range(60):
        a, b, c, d = (rng.randint(1, 7) for _ in range(4))
        w1 = torch.randn(a, c, dtype=torch.float64)
        r = rng.randint(1, 3)
        w2 = (torch.randn(b, d, dtype=torch.float64),) if rng.random() < 0.6 else \
            (torch.randn(b, r, dtype=torch.float64), torch.randn(r, d, dtype=torch.float64))
        x = torch.randn(rng.randint(1, 4), c * d, dtype=torch.float64)
        dense = w2[0] if len(w2) == 1 else w2[0] @ w2[1]
        for order in (None, True, False):
            got = integration._kron_products(x.reshape(-1, c, d), w1, w2, order).reshape(x.shape[0], a * b)
            assert torch.allclose(got, x @ torch.kron(w1, dense).t(), rtol=1e-12, atol=1e-12), (a, b, c, d, order)


def test_lokr_layers_kept_by_peft_and_its_dtypes():
    """LoKr over a Conv2d and LoKr whose factors do not make the base's [out, in] weight are left to
    PEFT with why; over a base of its own forward the products run beside it; two active adapters are
    summed as PEFT sums them; a bf16 model's fp32 adapters keep PEFT's dtypes (x cast to the adapter's,
    the result back to x's), with and without autocast."""
    _assert_conv_left_to_peft(peft.LoKrConfig(r=2, target_modules=["0", "2"], init_weights=False))

    broken = _lokr_model()
    broken.base_model.model.layers[0].up.lokr_w1["default"] = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    del broken.base_model.model.layers[1].v_proj.lokr_w2_b["default"]
    report = peft_kernels.patch_peft_model(broken)
    assert len(report.patched) == 4 and "do not make a Kronecker product of the [40, 24] weight" in \
        report.skipped["base_model.model.layers.0.up"]
    assert "lacks one of" in report.skipped["base_model.model.layers.1.v_proj"]

    model = _lokr_model(net=nn.Sequential(OwnForwardLinear(24, 40), nn.Tanh(), nn.Linear(40, 6)), targets=["0", "2"])
    model.add_adapter("other", peft.LoKrConfig(r=3, alpha=2, target_modules=["0", "2"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    patched = copy.deepcopy(model)
    assert len(peft_kernels.patch_peft_model(patched).patched) == 2
    xr = torch.randn(3, 24, dtype=torch.float64)
    assert len(_assert_same_run(_run(patched, xr), _run(model, xr))) == 12  # 2 layers x 2 adapters x 3 parts

    _assert_bf16_model_keeps_peft_dtypes(peft.LoKrConfig(r=2, target_modules=["q_proj", "up"], init_weights=False),
                                         trained=12)


@pytest.mark.parametrize("kind", ["lora", "vera", "loha", "lokr", "delora"])
def test_patched_tuners_take_any_leading_shape(kind):
    """x with no tokens, no batch dimension, three batch dimensions, or non-contiguous: patched,
    outputs and every gradient equal PEFT's (float64; LoHa's and LoKr's rank dropout on, seeded)."""
    model = {"lora": lambda: _peft_model().double(), "vera": lambda: _vera_model(dtype=torch.float64),
             "loha": lambda: _loha_model(rank_dropout=0.2), "lokr": lambda: _lokr_model(rank_dropout=0.2),
             "delora": lambda: _formed_factors_model("delora")}[kind]().train()
    patched = copy.deepcopy(model)
    assert not peft_kernels.patch_peft_model(patched).skipped
    for x in (torch.randn(0, 24, dtype=torch.float64), torch.randn(24, dtype=torch.float64),
              torch.randn(2, 3, 4, 24, dtype=torch.float64), torch.randn(24, 6, dtype=torch.float64).t()):
        torch.manual_seed(1)
        reference = _run(model, x)
        torch.manual_seed(1)
        _assert_same_run(_run(patched, x), reference, tuple(x.shape))


def _mixed_config(kind, targets=("q_proj", "up")):
    targets = list(targets)
    # LoRA's dropout mask comes from the op's own seed, not PEFT's draws: p = 0 for step parity here
    return {"lora": peft.LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False),
            "dora": peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False, use_dora=True),
            "loha": peft.LoHaConfig(r=2, rank_dropout=0.2, target_modules=targets, init_weights=False),
            "lokr": peft.LoKrConfig(r=2, module_dropout=0.3, target_modules=targets, init_weights=False)}[kind]


@pytest.mark.parametrize("kinds", [("lora", "loha"), ("loha", "lora"), ("lokr", "loha"), ("loha", "lokr"),
                                   ("lora", "loha", "lokr"), ("loha", "dora")], ids="+".join)
def test_mixed_models_nested_layers_each_add_their_own_adapter(kinds):
    """PEFT's mixed models (PeftMixedModel) nest one adapter type's layer in another's: the outer
    layer's base is the inner PEFT layer, whose output it adds to. Patched, a layer over another
    PEFT layer runs it (its base_layer) and adds its own branch — it must not compute the innermost
    nn.Linear itself, which would drop the inner adapter —, a nested DoRA layer (it needs the base
    weight) stays PEFT's, and a seeded training step (LoHa's rank and LoKr's module dropout on) equals
    PEFT's (float64)."""
    torch.manual_seed(0)
    model = peft.get_peft_model(Net().double(), _mixed_config(kinds[0]), adapter_name="first", mixed=True)
    for i, kind in enumerate(kinds[1:]):
        model.add_adapter(f"then{i}", _mixed_config(kind))
    model.set_adapter(["first"] + [f"then{i}" for i in range(len(kinds) - 1)])
    model.train()
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    layers = 4 * len(kinds)  # q_proj and up of both blocks, one PEFT layer per adapter type
    if kinds[-1] == "dora":
        assert len(report.patched) == layers - 4 and all("DoRA" in why for why in report.skipped.values())
    else:
        assert len(report.patched) == layers and not report.skipped, str(report)
    nested = [n for n, why in report.branch_only.items() if "a mixed model's nesting" in why]
    assert len(nested) == 4 * sum(kind in ("lora", "loha") for kind in kinds[1:])  # LoKr always runs its base
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    for seed in range(3):
        torch.manual_seed(seed)
        reference = _run(model, x)
        torch.manual_seed(seed)
        _assert_same_run(_run(patched, x), reference, seed)


@pytest.mark.parametrize("seed", range(8))
def test_patched_mixed_models_match_unpatched_on_random_configurations(seed):
    """Random PeftMixedModels: one to three adapters of random types (LoRA, DoRA, LoHa, LoKr, AdaLoRA)
    nested in random order over random targets of a net with odd widths, a random set active, LoHa's
    and LoKr's module dropout on: a seeded training step and an eval step equal PEFT's (float64)."""
    import random
    rng = random.Random(seed)
    torch.manual_seed(seed)
    d, h = rng.randint(1, 12), rng.randint(1, 12)
    net = nn.Sequential(nn.Linear(d, h, bias=rng.random() < 0.5), nn.Tanh(), nn.Linear(h, h), nn.ReLU(),
                        nn.Linear(h, 3)).double()

    def config(kind):
        targets, r, alpha = rng.sample(["0", "2", "4"], rng.randint(1, 3)), rng.choice([1, 2, 3]), rng.choice([1, 3])
        if kind in ("lora", "dora"):
            return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                                   use_dora=kind == "dora")
        if kind == "adalora":
            return peft.AdaLoraConfig(init_r=r + 1, target_r=1, total_step=10, target_modules=targets,
                                      init_lora_weights=False)
        cls = peft.LoHaConfig if kind == "loha" else peft.LoKrConfig
        return cls(r=r, alpha=alpha, module_dropout=rng.choice([0.0, 0.3]), target_modules=targets, init_weights=False)

    kinds = [rng.choice(["lora", "dora", "loha", "lokr", "adalora"]) for _ in range(rng.randint(1, 3))]
    model = peft.get_peft_model(net, config(kinds[0]), adapter_name="a0", mixed=True)
    for i, kind in enumerate(kinds[1:], 1):
        model.add_adapter(f"a{i}", config(kind))
    model.set_adapter(rng.sample([f"a{i}" for i in range(len(kinds))], rng.randint(1, len(kinds))))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_E" in name:
                p.normal_(std=0.5)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    patched = copy.deepcopy(model)
    peft_kernels.patch_peft_model(patched)
    _assert_train_and_eval_steps_match(model, patched, torch.randn(rng.randint(1, 4), d, dtype=torch.float64), seed,
                                       kinds)


def test_a_peft_layer_nested_under_a_patched_one_after_patching_runs_peft_forward():
    """A patched LoRA layer whose base_layer becomes another PEFT layer after patching (the nesting a
    mixed model makes) must not compute the innermost nn.Linear itself: at call time it runs PEFT's
    forward, said once in a warning, and computes what unpatched PEFT computes."""
    model = _peft_model(targets=["q_proj"]).double()
    patched = copy.deepcopy(model)
    peft_kernels.patch_peft_model(patched)
    x = torch.randn(3, 24, dtype=torch.float64)
    layers = [m.base_model.model.layers[0].q_proj for m in (model, patched)]
    for layer in layers:  # the same LoHa layer (weights drawn from seed 0) around each one's own base
        torch.manual_seed(0)
        layer.base_layer = peft.get_peft_model(nn.Sequential(layer.base_layer), peft.LoHaConfig(
            r=2, target_modules=["0"], init_weights=False)).base_model.model[0]
    with pytest.warns(UserWarning, match="another PEFT layer .*loha.*mixed model"):
        result = _run(patched, x)
    assert len(_assert_same_run(result, _run(model, x))) == 4 + 4  # two q_proj LoRA pairs, the LoHa four


def _formed_factors_model(kind, dropout=0.0, dtype=torch.float64):
    """VB-LoRA (r 4, a bank of 16 vectors of length 8, top-2), UniLoRA (r 4, one shared vector of 64
    entries) or DeLoRA (r 4, lambda 7) on Net()'s q_proj / v_proj / up; every factor non-zero."""
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "up"]
    if kind == "vblora":
        cfg = peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=8, topk=2, vblora_dropout=dropout,
                                target_modules=targets)
    elif kind == "unilora":
        cfg = peft.UniLoraConfig(r=4, theta_d_length=64, unilora_dropout=dropout, target_modules=targets,
                                 init_weights=False)
    else:
        cfg = peft.DeloraConfig(r=4, delora_lambda=7, module_dropout=dropout, target_modules=targets)
    model = peft.get_peft_model(Net().to(dtype), cfg)
    for name, p in model.named_parameters():
        if "delora_B" in name:
            nn.init.normal_(p, std=0.3)  # PEFT starts DeLoRA's B at zero
    return model


@pytest.mark.parametrize("kind", ["vblora", "unilora", "delora"])
@pytest.mark.parametrize("train", [True, False])
def test_vblora_unilora_and_delora_run_fused_over_their_formed_factors(kind, train):
    """VB-LoRA, UniLoRA and DeLoRA compute LoRA's formula over factors formed each call (top-k mixtures
    of a shared vector bank; scaled entries of one shared vector — both by PEFT's own
    _get_lora_matrices —; DeLoRA's A scaled by the base's column norms and per row by λ / (r ‖A_i‖
    ‖B_:i‖)): patched, one lora_linear runs per layer, and outputs and every gradient (the shared bank /
    vector, VB-LoRA's logits, DeLoRA's A, B and λ through the norms) equal PEFT's (float64; eval with
    dropout: the identity)."""
    from unittest import mock

    from peft_kernels.integrations import peft as integration

    model = _formed_factors_model(kind, dropout=0.0 if train else 0.3).train(train)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    reference = _run(model, x)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert len(report.patched) == 6 and not report.skipped, str(report)
    with mock.patch.object(integration, "lora_linear", wraps=integration.lora_linear) as op:
        result = _run(patched, x)
    assert op.call_count == 6
    # VB-LoRA: 6 x 2 logits + the bank; UniLoRA: one vector; DeLoRA: 6 x (A, B, λ)
    assert len(_assert_same_run(result, reference)) == {"vblora": 13, "unilora": 1, "delora": 18}[kind]
    assert len(peft_kernels.unpatch_peft_model(patched)) == 6


@pytest.mark.parametrize("kind", ["loha", "delora", "vblora", "unilora", "lokr"])
def test_formed_factor_tuners_keep_peft_states_and_save_patched(kind):
    """The new families patched: disabled adapters and merged weights run PEFT's forward (merged equals
    fused); torch.save / torch.load of the patched model gives a model that is still patched and
    computes the same."""
    import io

    model = {"loha": _loha_model, "lokr": _lokr_model}.get(kind, lambda: _formed_factors_model(kind))().eval()
    assert not peft_kernels.patch_peft_model(model).skipped
    x = torch.randn(2, 24, dtype=torch.float64)
    fused = model(x)
    with model.disable_adapter():
        plain = model(x)
    model.merge_adapter()
    merged = model(x)
    model.unmerge_adapter()
    assert torch.allclose(merged, fused, rtol=1e-10, atol=1e-12) and not torch.allclose(plain, fused, atol=1e-6)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.base_model.model.layers[0].q_proj.__dict__.get("forward")).__name__ == (
        "_LoKrForward" if kind == "lokr" else "_FusedForward")
    assert torch.equal(loaded(x), model(x))  # (after unmerge the base weight is W + Δ - Δ: not fused's W)


def test_lora_variants_that_compute_something_else_are_left_to_peft(tmp_path):
    """aLoRA (activated LoRA: the adapter acts only after its invocation tokens) is not plain LoRA:
    patch_peft_model leaves its layers to PEFT, and load_adapter refuses its adapter rather than
    load it as plain LoRA."""
    with pytest.warns(UserWarning, match="CAUSAL_LM"):
        model = _peft_model(alora_invocation_tokens=[1, 2])
    report = peft_kernels.patch_peft_model(model)
    assert not report.patched and len(report.skipped) == 6
    assert all("ALoraLinearVariant" in why for why in report.skipped.values())
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not supported yet: \['alora_invocation_tokens'\]"):
        peft_kernels.load_adapter(Net(), tmp_path)


@pytest.mark.parametrize("train", [True, False])
def test_patched_dora_matches_unpatched(train):
    model = _peft_model(dropout=0.0 if train else 0.2, use_dora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    model.train(train)
    x = torch.randn(3, 7, 24)
    reference = _run(model, x)
    report = peft_kernels.patch_peft_model(model)
    assert len(report.patched) == 6 and not report.skipped
    assert len(_assert_runs_as(model, x, reference)) == 18  # lora_A, lora_B, magnitude x 6


def test_patched_dora_on_the_triton_backend_with_the_one_launch_norm_matches_unpatched(monkeypatch, kernel_device):
    """The patched DoRA layers on the triton backend (interpreted here), with triton/dora.py's one-launch
    row norm switched on, equal PEFT's own forward and gradients (fp32), and the norm kernel ran."""
    from peft_kernels.triton import dora as triton_dora
    from peft_kernels.triton import lora as triton_lora
    calls = []
    kernel = triton_dora.weight_norm
    monkeypatch.setattr(triton_dora, "weight_norm", lambda *a: calls.append(1) or kernel(*a))
    model = _peft_model(use_dora=True).to(kernel_device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    x = torch.randn(3, 7, 24, device=kernel_device)
    reference = _run(model, x)
    peft_kernels.patch_peft_model(model)
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    with triton_lora.launch_override(dora_norm=True):
        assert len(_assert_runs_as(model, x, reference)) == 18
    assert len(calls) == 6 and peft_kernels.backends.last_used("dora_linear") == "triton"


@pytest.mark.parametrize("kind", ["adalora", "vera", "loha", "vblora", "delora", "two lora adapters"])
def test_factored_layers_on_the_triton_backend_match_unpatched(kind, monkeypatch, kernel_device):
    """AdaLoRA, VeRA, LoHa, VB-LoRA, DeLoRA and two joined LoRA adapters (lora_bias on one) on the
    triton backend (interpreted here): the factors formed each call go through the kernels, and outputs and every
    gradient equal PEFT's (fp32)."""
    if kind == "adalora":
        model = _adalora_model()
    elif kind == "loha":
        model = _loha_model(dtype=torch.float32)
    elif kind in ("vblora", "delora"):
        model = _formed_factors_model(kind, dtype=torch.float32)
    elif kind == "vera":
        model = _vera_model()
    else:
        model = _two_adapters(_peft_model(), peft.LoraConfig(r=3, lora_alpha=3, lora_bias=True,
                                                             target_modules=["q_proj", "up"]))
    model = model.to(kernel_device)
    x = torch.randn(3, 5, 24, device=kernel_device)
    reference = _run(model, x)
    assert not peft_kernels.patch_peft_model(model).skipped
    monkeypatch.setenv("PEFT_KERNELS_BACKEND", "triton")
    backends._LAST_USED.clear()
    _assert_runs_as(model, x, reference)
    assert peft_kernels.backends.last_used("lora_linear") == "triton"


def test_patched_dora_reads_the_frozen_row_norms_once_per_weight_version(monkeypatch):
    """A patched DoRA layer computes ‖W_i‖² of its frozen base once, not every step; changed in
    place (another checkpoint copied in), the base's norms are recomputed and the outputs and
    gradients stay PEFT's own."""
    import peft_kernels.ops.dora as dora_ops

    model = _peft_model(use_dora=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    peft_kernels.patch_peft_model(model)
    calls = []
    real = dora_ops.weight_row_sq
    monkeypatch.setattr(dora_ops, "weight_row_sq", lambda w, *a: calls.append(w.shape) or real(w, *a))
    x = torch.randn(3, 7, 24)
    _run(model, x)
    _run(model, x)
    assert len(calls) == 6  # the six adapted layers, once each
    with torch.no_grad():
        model.base_model.model.layers[1].up.base_layer.weight.mul_(1.3)
    del calls[:]
    y1, gx1, g1 = _run(model, x)
    assert calls == [torch.Size([40, 24])]
    peft_kernels.unpatch_peft_model(model)
    y0, gx0, g0 = _run(model, x)
    assert torch.allclose(y1, y0, atol=1e-5) and torch.allclose(gx1, gx0, atol=1e-5)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-5), n


def test_dtype_mismatch_warns_and_runs_peft_forward():
    layer = _peft_model().eval().base_model.model.layers[0].q_proj
    peft_kernels.patch_peft_model(layer)
    with pytest.warns(UserWarning, match="running PEFT's unfused forward"):
        with pytest.raises(RuntimeError):  # what PEFT itself does with this input
            layer(torch.randn(2, 24, dtype=torch.float64))


def test_autocast_runs_fused_in_the_autocast_dtype():
    model = _peft_model().eval()
    x = torch.randn(3, 24)
    backends._LAST_USED.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0 = model(x)
        peft_kernels.patch_peft_model(model)
        y1 = model(x)
    assert y1.dtype == y0.dtype
    assert backends.last_used("lora_linear") == "torch"
    assert torch.allclose(y1.float(), y0.float(), rtol=3e-2, atol=3e-2)  # both bf16 computations


def test_apply_lora_on_a_peft_model_points_to_patch_peft_model():
    """apply_lora on an HF PEFT model put LoRALinear on PEFT's own base_layer, lora_A and lora_B
    (adapters on adapters); it now refuses them, naming patch_peft_model, and adapts only layers
    outside PEFT's."""
    model = _peft_model()
    with pytest.raises(ValueError, match=r"inside HF PEFT's LoRA layer base_model.model.layers.0.q_proj: use "
                                         r"peft_kernels.patch_peft_model"):
        peft_kernels.apply_lora(model, ["base_layer"])
    with pytest.warns(UserWarning, match="all-linear leaves out"):
        peft_kernels.apply_lora(model, "all-linear", r=2)
    adapted = {n for n, m in model.named_modules() if isinstance(m, peft_kernels.nn.LoRALinear)}
    assert adapted == {f"base_model.model.layers.{i}.{p}" for i in (0, 1) for p in ("o_proj", "down")} | {
        "base_model.model.head"}


def test_adapter_saved_by_peft_kernels_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    base = Net()
    ours = peft_kernels.apply_lora(copy.deepcopy(base), ["q_proj", "up"], r=4, alpha=8)
    for m in ours.modules():
        if isinstance(m, peft_kernels.nn.LoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
    peft_kernels.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(5, 24)
    assert torch.allclose(theirs.eval()(x), ours.eval()(x), atol=1e-5)


def test_adapter_saved_by_peft_loads_in_peft_kernels(tmp_path):
    model = _peft_model()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    ours = peft_kernels.load_adapter(Net(), tmp_path)  # Net() under seed 0: the same base weights
    x = torch.randn(5, 24)
    assert torch.allclose(ours.eval()(x), model.eval()(x), atol=1e-5)
    assert sum(isinstance(m, peft_kernels.nn.LoRALinear) for m in ours.modules()) == 6


def test_dora_adapter_round_trips_with_peft(tmp_path):
    """DoRA: ours saved (magnitude as PEFT's lora_magnitude_vector) loads in HF PEFT with equal
    outputs, and PEFT's loads in ours."""
    torch.manual_seed(0)
    base = Net()
    ours = peft_kernels.apply_lora(copy.deepcopy(base), ["q_proj", "up"], r=4, alpha=8, use_dora=True)
    for m in ours.modules():
        if isinstance(m, peft_kernels.nn.DoRALinear):
            nn.init.normal_(m.lora_B, std=0.1)
            m.magnitude.data.mul_(torch.rand_like(m.magnitude) + 0.5)  # trained, not the initial ‖W‖
    peft_kernels.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    x = torch.randn(5, 24)
    assert torch.allclose(theirs.eval()(x), ours.eval()(x), atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert sum(isinstance(m, peft_kernels.nn.DoRALinear) for m in back.modules()) == 4
    assert torch.allclose(back.eval()(x), theirs(x), atol=1e-5)


@pytest.mark.parametrize("quantize,use_dora", [("nf4", False), ("int8", False), ("int4", True)])
def test_adapters_over_quantized_bases_save_and_load(quantize, use_dora, tmp_path):
    """Adapters trained over a quantized base save in PEFT's format and load back onto a base
    quantized the same way (load_adapter(quantize=...)) with equal outputs."""
    torch.manual_seed(0)
    base = QuantNet()
    ours = peft_kernels.apply_lora(copy.deepcopy(base), ["proj"], r=4, alpha=8, quantize=quantize, use_dora=use_dora)
    layer = ours.proj
    nn.init.normal_(layer.lora_B, std=0.1)
    if use_dora:
        layer.magnitude.data.mul_(1.5)
    peft_kernels.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is use_dora and config["target_modules"] == ["proj"]
    back = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path, quantize=quantize)
    assert type(back.proj) is type(layer)
    x = torch.randn(3, 64)
    assert torch.equal(back.eval()(x), ours.eval()(x))


def test_adapter_loads_onto_a_model_loaded_in_4bit(tmp_path):
    """QLoRA inference: an adapter trained over apply_lora's NF4 base loads onto the same weights
    loaded by bitsandbytes (a Linear4bit holding the same bytes), reading bnb's bytes as they are,
    with outputs bit for bit equal."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft_kernels.quant import NF4Weight

    torch.manual_seed(0)
    base = QuantNet()
    ours = peft_kernels.apply_lora(copy.deepcopy(base), ["proj"], r=4, alpha=8, quantize="nf4")
    nn.init.normal_(ours.proj.lora_B, std=0.1)
    peft_kernels.save_adapter(ours, tmp_path)
    in_4bit = QuantNet()
    in_4bit.proj = bnb.nn.Linear4bit(64, 16, quant_type="nf4", compute_dtype=torch.float32)
    in_4bit.proj.weight = NF4Weight.from_float(base.proj.weight.detach()).to_bnb()
    in_4bit.proj.bias = nn.Parameter(base.proj.bias.detach().clone(), requires_grad=False)
    packed = in_4bit.proj.weight.data_ptr()
    back = peft_kernels.load_adapter(in_4bit, tmp_path)
    assert type(back.proj) is type(ours.proj) and back.proj.qweight_packed.data_ptr() == packed
    x = torch.randn(3, 64)
    assert torch.equal(back.eval()(x), ours.eval()(x))


def test_load_adapter_targets_exactly_the_saved_modules(tmp_path):
    """Saved names are full module names: loading an adapter saved for "0" must not also adapt
    "1.0" (PEFT's list rule would match it by suffix)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))
    ours = peft_kernels.apply_lora(copy.deepcopy(base), "0", r=2, alpha=4)
    nn.init.normal_(ours[0].lora_B)
    peft_kernels.save_adapter(ours, tmp_path)
    back = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path)
    assert isinstance(back[0], peft_kernels.nn.LoRALinear) and type(back[1][0]) is nn.Linear
    x = torch.randn(3, 8)
    assert torch.equal(back(x), ours(x))
    # HF PEFT adapts "0" only too: the config's target_modules is a regex of the exact names here
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "(?:0)"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert [n for n, m in theirs.named_modules() if n.endswith("lora_A")] == ["base_model.model.0.lora_A"]
    assert torch.allclose(theirs(x), ours(x), atol=1e-6)


def test_saved_target_modules_are_the_layer_names_people_write(tmp_path):
    """apply_lora(["q_proj", "up"]) saves target_modules ["q_proj", "up"], as PEFT does, not
    every full module name; PEFT then adapts exactly the saved layers."""
    torch.manual_seed(0)
    ours = peft_kernels.apply_lora(Net(), ["q_proj", "up"], r=2)
    peft_kernels.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "up"]
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path)
    assert _ranks(theirs).keys() == _ranks(ours).keys()


PATTERNS = dict(rank_pattern={"q_proj": 2, "layers.1.up": 6}, alpha_pattern={"^layers.0.*": 3})


def _ranks(model):
    """{module name: (r, alpha)} of peft_kernels' or HF PEFT's LoRA layers."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, peft_kernels.nn.LoRALinear):
            out[name] = (m.r, m.alpha)
        elif isinstance(getattr(m, "r", None), dict):
            out[name.removeprefix("base_model.model.")] = (m.r["default"], m.lora_alpha["default"])
    return out


def test_rank_and_alpha_patterns_follow_peft(tmp_path):
    """apply_lora's rank_pattern / alpha_pattern give each layer the r / alpha PEFT's LoraConfig
    gives it; adapters with per-layer ranks round-trip with PEFT both ways (PEFT's patterns are
    read; ours are written as PEFT's, anchored to one module each)."""
    model = _peft_model(**PATTERNS)
    expected = {f"layers.{i}.{p}": (4, 8) for i in (0, 1) for p in ("q_proj", "v_proj", "up")}
    expected.update({"layers.0.q_proj": (2, 3), "layers.0.v_proj": (4, 3), "layers.0.up": (4, 3),
                     "layers.1.q_proj": (2, 8), "layers.1.up": (6, 8)})
    assert _ranks(model) == expected
    torch.manual_seed(0)
    ours = peft_kernels.apply_lora(Net(), ["q_proj", "v_proj", "up"], r=4, alpha=8, **PATTERNS)
    assert _ranks(ours) == expected
    model.save_pretrained(tmp_path / "theirs")
    torch.manual_seed(0)
    loaded = peft_kernels.load_adapter(Net(), tmp_path / "theirs")
    assert _ranks(loaded) == expected
    x = torch.randn(5, 24)
    assert torch.allclose(loaded.eval()(x), model.eval()(x), atol=1e-5)
    peft_kernels.save_adapter(loaded, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {"^layers\\.0\\.q_proj": 2, "^layers\\.1\\.q_proj": 2,
                                                           "^layers\\.1\\.up": 6}
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    assert _ranks(theirs) == expected
    assert torch.allclose(theirs.eval()(x), model(x), atol=1e-5)


def test_modules_to_save_round_trip_with_peft(tmp_path):
    """PEFT's modules_to_save (a head trained whole beside the adapters): apply_lora trains it,
    save_adapter writes it under PEFT's keys, and adapters with one load both ways with equal
    outputs; a second apply_lora keeps it trainable."""
    model = _peft_model(modules_to_save=["head"])
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.add_(1.0)  # a trained head
    model.save_pretrained(tmp_path / "theirs")
    torch.manual_seed(0)
    loaded = peft_kernels.load_adapter(Net(), tmp_path / "theirs")
    x = torch.randn(5, 24)
    assert torch.allclose(loaded.eval()(x), model.eval()(x), atol=1e-5)
    assert loaded.head.weight.requires_grad and not loaded.layers[0].o_proj.weight.requires_grad
    peft_kernels.save_adapter(loaded, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"]
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    assert torch.allclose(theirs.eval()(x), model(x), atol=1e-5)
    peft_kernels.apply_lora(loaded, ["o_proj"], r=2)
    assert loaded.head.weight.requires_grad and loaded.layers[0].q_proj.lora_A.requires_grad


class NormedNet(Net):
    """Net behind a LayerNorm: a bias outside every linear layer, which PEFT's bias="all" trains."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(24)

    def forward(self, x):
        return super().forward(self.norm(x))


def _trainable_non_adapter(model):
    return sorted(n.replace("base_model.model.", "").replace(".base_layer", "").replace(".modules_to_save.default", "")
                  for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)


@pytest.mark.parametrize("bias,modules_to_save,quantize", [("lora_only", None, None), ("all", None, None),
                                                           ("all", ["head"], None), ("lora_only", None, "nf4")])
def test_trained_biases_follow_peft_and_round_trip(bias, modules_to_save, quantize, tmp_path):
    """PEFT's bias option: apply_lora(bias=...) trains the biases PEFT's get_peft_model trains,
    save_adapter writes them under PEFT's keys (an adapted layer's as <layer>.base_layer.bias), and
    adapters with trained biases load both ways with equal outputs; a second apply_lora keeps them
    trainable."""
    torch.manual_seed(0)
    base = NormedNet()
    ours = peft_kernels.apply_lora(copy.deepcopy(base), ["q_proj", "up"], r=4, alpha=8, bias=bias,
                                   modules_to_save=modules_to_save, quantize=quantize)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "up"], bias=bias, modules_to_save=modules_to_save))
    trained = _trainable_non_adapter(ours)
    assert trained == _trainable_non_adapter(theirs) and "layers.0.q_proj.bias" in trained
    assert ("norm.bias" in trained) == (bias == "all")
    with torch.no_grad():  # train what each trains
        for model in (ours, theirs):
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(5, 24)
    peft_kernels.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file
    ours_keys, their_keys = (set(load_file(str(tmp_path / d / "adapter_model.safetensors"))) for d in ("ours", "theirs"))
    # PEFT also writes, under bias="all", its modules_to_save copies' biases (their values are in head.bias)
    assert their_keys - ours_keys == ({"base_model.model.head.modules_to_save.bias",
                                       "base_model.model.head.original_module.bias"} if modules_to_save else set())
    assert ours_keys <= their_keys
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["bias"] == bias
    if quantize is None:  # PEFT over our file computes as ours does
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        assert torch.allclose(reloaded.eval()(x), ours.eval()(x), atol=1e-5)
    back = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path / "ours", quantize=quantize)
    assert torch.equal(back.eval()(x), ours.eval()(x)) and _trainable_non_adapter(back) == trained
    mine = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert torch.allclose(mine.eval()(x), theirs.eval()(x), atol=1e-5)
    peft_kernels.apply_lora(mine, ["o_proj"], r=2)
    assert _trainable_non_adapter(mine) == trained


def test_bias_option_errors(tmp_path):
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'all', 'lora_only'\)"):
        peft_kernels.apply_lora(Net(), ["q_proj"], bias="lora")
    a = peft_kernels.apply_lora(Net(), ["q_proj"], bias="all")
    peft_kernels.apply_lora(a, ["up"], bias="lora_only")
    with pytest.raises(ValueError, match="several bias options"):
        peft_kernels.save_adapter(a, tmp_path / "mixed")
    _peft_model(bias="all").save_pretrained(tmp_path / "all")
    no_home, no_bias = Net(), Net()
    del no_home.layers[0].o_proj  # the saved layers.0.o_proj.bias has no module to go to
    no_bias.layers[1].o_proj.bias = None
    for model, match in ((no_home, "no such module"), (no_bias, "layers.1.o_proj.bias', \"the model's bias is absent")):
        flags = [p.requires_grad for p in model.parameters()]
        with pytest.raises(ValueError, match=f"saved biases.*{match}"):
            peft_kernels.load_adapter(model, tmp_path / "all")
        assert [p.requires_grad for p in model.parameters()] == flags
        assert not any(isinstance(m, peft_kernels.nn.LoRALinear) for m in model.modules())


def test_modules_to_save_errors(tmp_path):
    with pytest.raises(ValueError, match=r"modules_to_save \['tail'\] match no module"):
        peft_kernels.apply_lora(Net(), ["q_proj"], modules_to_save=["head", "tail"])
    with pytest.raises(ValueError, match=r"modules_to_save \['layers.0.q_proj', 'layers.1.q_proj'\] are or hold"):
        peft_kernels.apply_lora(Net(), ["q_proj"], modules_to_save=["q_proj"])
    with pytest.raises(TypeError, match="must be a list of module names"):
        peft_kernels.apply_lora(Net(), ["q_proj"], modules_to_save="head")
    _peft_model(modules_to_save=["head"]).save_pretrained(tmp_path)
    other = Net()
    other.head = nn.Linear(24, 7)
    with pytest.raises(ValueError, match="modules_to_save tensors do not fit"):
        peft_kernels.load_adapter(other, tmp_path)
    assert not any(isinstance(m, peft_kernels.nn.LoRALinear) for m in other.modules())


def test_pattern_and_adapter_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"rank_pattern keys \['k_proj'\] match none of the targeted layers"):
        peft_kernels.apply_lora(Net(), ["q_proj"], rank_pattern={"q_proj": 2, "k_proj": 4})
    with pytest.raises(ValueError, match=r"alpha_pattern key 'q_proj\[' is not a regex"):
        peft_kernels.apply_lora(Net(), ["q_proj"], alpha_pattern={"q_proj[": 2})
    with pytest.raises(TypeError, match="rank_pattern must be a dict"):
        peft_kernels.apply_lora(Net(), ["q_proj"], rank_pattern=[("q_proj", 2)])
    model = _peft_model(**PATTERNS)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "rank_pattern": {}}))
    with pytest.raises(ValueError, match=r"do not fit .*\('layers.0.q_proj.lora_A.weight', \(2, 24\), \(4, 24\)\)"):
        peft_kernels.load_adapter(Net(), tmp_path)
    config_path.write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(ValueError, match=r"not supported yet: \['lora_bias'\]"):
        peft_kernels.load_adapter(Net(), tmp_path)
    from safetensors.torch import load_file, save_file

    config_path.write_text(json.dumps(config))
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    state["base_model.model.layers.0.q_proj.lora_B.bias"] = torch.zeros(24)
    del state["base_model.model.layers.1.up.lora_A.weight"]
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['base_model.model.layers.0.q_proj.lora_B.bias'\], "
                                         r"missing \['layers.1.up.lora_A.weight'\]"):
        peft_kernels.load_adapter(Net(), tmp_path)


def test_load_adapter_checks_the_model_before_changing_it(tmp_path):
    """An adapter for another model (a layer it lacks, a layer of another size, a layer already
    adapted) is refused with the layer named, and the model is left as it was."""
    _peft_model().save_pretrained(tmp_path)
    small = nn.Sequential()
    small.layers = nn.ModuleList([Block(), Block()])
    del small.layers[1].up
    wide = Net()
    wide.layers[1].up = nn.Linear(24, 48)
    adapted = peft_kernels.apply_lora(Net(), ["layers.1.up"], r=2)
    for model, error in [(small, r"no nn.Linear / Conv1D named \['layers.1.up'\]$"),
                         (wide, r"\('layers.1.up.lora_B.weight', \(40, 4\), \(48, 4\)\)"),
                         (adapted, r"no nn.Linear / Conv1D named \['layers.1.up'\] \(\['layers.1.up'\] already carry")]:
        before = {n: (type(m), m.training) for n, m in model.named_modules()}
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match=error):
            peft_kernels.load_adapter(model, tmp_path)
        assert {n: (type(m), m.training) for n, m in model.named_modules()} == before
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


class QuantNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 16)

    def forward(self, x):
        return self.proj(x)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter modules"):
        peft_kernels.save_adapter(Net(), tmp_path)
    model = peft_kernels.apply_lora(Net(), ["q_proj"], r=2)
    model.layers[0].q_proj.dropout = 0.1
    with pytest.raises(ValueError, match="must share dropout/use_rslora/DoRA"):
        peft_kernels.save_adapter(model, tmp_path)


IN_4BIT = 128


class Bnb4bitNet(nn.Module):
    """A model whose projection is a bitsandbytes Linear4bit holding known NF4 bytes. in_features
    is a multiple of the blocksize (64): bnb 0.50's native CPU dequantize, which the unpatched
    model runs, mis-scales blocks that span two rows of the weight (tests/test_quant_bnb4bit.py)."""

    def __init__(self, compute_dtype=torch.float32):
        super().__init__()
        bnb = pytest.importorskip("bitsandbytes")
        from peft_kernels.quant import NF4Weight

        self.q_proj = bnb.nn.Linear4bit(IN_4BIT, 24, bias=True, compute_dtype=compute_dtype, quant_type="nf4")
        self.q_proj.weight = NF4Weight.from_float(torch.randn(24, IN_4BIT) * 0.1).to_bnb()
        self.q_proj.bias = nn.Parameter(torch.randn(24), requires_grad=False)
        self.out = nn.Linear(24, 6)

    def forward(self, x):
        return self.out(torch.tanh(self.q_proj(x)))


@pytest.mark.parametrize("lora_bias", [False, True])
def test_patched_qlora_over_bnb_linear4bit_matches_unpatched(lora_bias):
    torch.manual_seed(0)
    model = peft.get_peft_model(Bnb4bitNet(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                              lora_bias=lora_bias))
    up = model.base_model.model.q_proj.lora_B["default"]
    nn.init.normal_(up.weight, std=0.1)
    if lora_bias:
        nn.init.normal_(up.bias, std=0.5)
    model.train()
    x = torch.randn(5, IN_4BIT)
    y0, gx0, g0 = _run(model, x)
    report = peft_kernels.patch_peft_model(model)
    assert report.patched == ["base_model.model.q_proj"], str(report)
    backends._LAST_USED.clear()
    y1, gx1, g1 = _run(model, x)
    assert backends.last_used("qlora_linear") == "torch"
    assert torch.allclose(y1, y0, atol=1e-5) and torch.allclose(gx1, gx0, atol=1e-5)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-5), n


@pytest.mark.parametrize("family", ["adalora", "vera"])
def test_patched_adalora_and_vera_over_bnb_linear4bit_run_qlora_linear(family):
    """AdaLoRA / VeRA over a bitsandbytes Linear4bit base: qlora_linear over bnb's bytes with the
    family's factors; outputs and every gradient equal unpatched PEFT's."""
    torch.manual_seed(0)
    cfg = (peft.AdaLoraConfig(init_r=4, target_r=2, total_step=5, target_modules=["q_proj"]) if family == "adalora"
           else peft.VeraConfig(r=8, target_modules=["q_proj"]))
    model = peft.get_peft_model(Bnb4bitNet(), cfg)
    for name, p in model.named_parameters():
        if "lora_E" in name or "lambda_b" in name:
            nn.init.normal_(p, std=0.5)
    x = torch.randn(5, IN_4BIT)
    reference = _run(model, x)
    assert peft_kernels.patch_peft_model(model).patched == ["base_model.model.q_proj"]
    backends._LAST_USED.clear()
    _assert_runs_as(model, x, reference)
    assert backends.last_used("qlora_linear") == "torch"


@pytest.mark.parametrize("bits", [4, 8])
def test_patched_adalora_over_a_model_loaded_in_4_or_8_bits(bits):
    """AdaLoRA over a model loaded in 4 / 8 bits (transformers sets is_loaded_in_4bit / _8bit) gets
    PEFT's bnb classes, SVDLinear4bit / SVDLinear8bitLt — once reported as "not a LoRA Linear" and left
    to PEFT. Patched: over the 4-bit base qlora_linear reads bnb's bytes (A' = A ⊙ E / ranknum);
    beside the 8-bit base's LLM.int8 product the branch runs lora_delta; outputs and every gradient
    equal PEFT's, with some singular values masked as the rank allocator does."""
    from unittest import mock

    from peft_kernels.integrations import peft as integration

    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    if bits == 4:
        net = Bnb4bitNet()
        net.is_loaded_in_4bit = True
        x = torch.randn(5, IN_4BIT)
    else:
        first = bnb.nn.Linear8bitLt(24, 40, has_fp16_weights=False, threshold=6.0)
        first.load_state_dict(nn.Linear(24, 40).state_dict())
        net = nn.Sequential(first, nn.Tanh(), nn.Linear(40, 6)).to("cpu")  # bnb quantizes on the move
        net.is_loaded_in_8bit = True
        x = torch.randn(3, 5, 24)
    target = "q_proj" if bits == 4 else "0"
    model = peft.get_peft_model(net, peft.AdaLoraConfig(init_r=4, target_r=2, total_step=5, lora_alpha=8,
                                                        target_modules=[target]))
    layer = model.base_model.model.get_submodule(target)
    assert type(layer).__name__ == ("SVDLinear4bit" if bits == 4 else "SVDLinear8bitLt")
    with torch.no_grad():
        layer.lora_E["default"].normal_(0.0, 0.5)
        layer.lora_E["default"][1] = 0.0
    reference = _run(model, x)
    report = peft_kernels.patch_peft_model(model)
    assert report.patched == [f"base_model.model.{target}"] and not report.skipped, str(report)
    assert bool(report.branch_only) == (bits == 8)
    op = "qlora_linear" if bits == 4 else "lora_delta"
    with mock.patch.object(integration, op, wraps=getattr(integration, op)) as fused:
        grads = _assert_runs_as(model, x, reference)
    assert fused.call_count == 1 and {n.rsplit(".", 2)[-2] for n in grads} >= {"lora_A", "lora_E", "lora_B"}


def _repack_for_bnb_cpu(layer):
    """What bnb's own eval-mode, no-grad CPU forward does to a Linear4bit on an AVX512-BF16 CPU
    (called directly: whether this machine's CPU would do it does not matter here)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    if not hasattr(functional, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU repacking")
    layer.weight.data, layer.weight.quant_state = functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)


def test_bnb_weights_repacked_for_bnbs_cpu_kernel_are_not_read_as_standard_bytes():
    """After bnb's CPU inference repacked a Linear4bit (another byte layout, absmax in bf16) its
    bytes must not be decoded as bnb's standard format: from_bnb / apply_lora say why, and a
    patched PEFT layer hands that call to PEFT's own forward (bnb computes it) with a warning."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft_kernels.quant import NF4Weight

    def net():
        torch.manual_seed(0)
        model = nn.Sequential(bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32))
        model[0].weight = NF4Weight.from_float(torch.randn(32, 64) * 0.1).to_bnb()
        return model

    model = net()
    _repack_for_bnb_cpu(model[0])
    with pytest.raises(ValueError, match="repacked this weight for its CPU kernel"):
        NF4Weight.from_bnb(model[0])
    with pytest.raises(ValueError, match=r"apply_lora: 0 \(Linear4bit\): from_bnb: bitsandbytes has repacked"):
        peft_kernels.apply_lora(model, ["0"])
    patched = peft.get_peft_model(net(), peft.LoraConfig(r=2, target_modules=["0"]))
    peft_kernels.patch_peft_model(patched)
    layer = patched.base_model.model[0]
    _repack_for_bnb_cpu(layer.get_base_layer())
    layer.forward.original = lambda x: "PEFT's forward"  # bnb's repacked kernel may not run on this CPU
    with pytest.warns(UserWarning, match="runs PEFT's unfused forward: bitsandbytes repacked"):
        assert layer(torch.randn(3, 64)) == "PEFT's forward"


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_patched_qdora_over_bnb_linear4bit_matches_unpatched(dropout, monkeypatch):
    """DoRA over a bnb 4-bit base: bnb's bytes read as they are, the magnitude and every adapter
    gradient equal to PEFT's own DoRA forward (which dequantizes the whole weight)."""
    torch.manual_seed(0)
    model = peft.get_peft_model(Bnb4bitNet(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                              use_dora=True, lora_dropout=dropout))
    nn.init.normal_(model.base_model.model.q_proj.lora_B["default"].weight, std=0.1)
    model.train()
    x = torch.randn(5, IN_4BIT)
    torch.manual_seed(1)
    y0, gx0, g0 = _run(model, x) if dropout == 0 else (None, None, None)
    report = peft_kernels.patch_peft_model(model)
    assert report.patched == ["base_model.model.q_proj"], str(report)
    if dropout:  # the masks differ between PEFT's nn.Dropout and ours: check ours runs and trains
        y1, gx1, g1 = _run(model, x)
        assert torch.isfinite(y1).all() and any(k.endswith("lora_magnitude_vector.default.weight") for k in g1)
        return
    y1, gx1, g1 = _run(model, x)
    assert torch.allclose(y1, y0, atol=1e-5) and torch.allclose(gx1, gx0, atol=1e-5)
    assert g0.keys() == g1.keys() and any("magnitude" in k for k in g0)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-5), n
    import peft_kernels.ops.dora as dora_ops  # ‖W_i‖² of the 4-bit base: decoded once, not every step
    monkeypatch.setattr(dora_ops, "weight_row_sq", lambda *a: pytest.fail("‖W_i‖² recomputed"))
    assert torch.equal(_run(model, x)[0], y1)


def test_deep_copies_and_saved_models_of_a_patched_model_use_their_own_weights(tmp_path):
    """copy.deepcopy of a patched model (TRL's reference model, an EMA copy) is patched too and
    computes — and trains — with the copy's weights: the patched forward was a closure over the
    original layer, so the copy ran the original's adapter and sent its gradients there.
    torch.save / torch.load of a patched model works and stays patched."""
    import functools

    model = _peft_model(use_dora=False)
    assert peft_kernels.patch_peft_model(model).patched
    copy_ = copy.deepcopy(model)
    for name, p in copy_.named_parameters():
        if "lora_B" in name:
            p.data.mul_(3.0)
    x = torch.randn(4, 24)
    y = copy_(x)
    y.square().sum().backward()
    assert all(p.grad is None for p in model.parameters())  # the original got no gradient
    assert all(p.grad is not None for n, p in copy_.named_parameters() if "lora_" in n)
    restored = peft_kernels.unpatch_peft_model(copy_)
    assert restored and torch.allclose(copy_(x), y, atol=1e-6)  # the same as PEFT on the copy
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(loaded(x), model(x)) and peft_kernels.unpatch_peft_model(loaded) == restored
    # A forward that was an instance attribute before patching (an accelerate hook) comes back.
    layer = model.base_model.model.layers[0].q_proj
    hook = functools.partial(type(layer).forward, layer)
    peft_kernels.unpatch_peft_model(model)
    layer.forward = hook
    peft_kernels.patch_peft_model(model)
    assert layer.forward is not hook
    peft_kernels.unpatch_peft_model(model)
    assert layer.forward is hook


def test_adapters_changed_after_patching_run_peft_forward():
    """An adapter changed after patch_peft_model is computed as it is now: a bias put on lora_B
    joins the fused op's bias; another dropout module must not be taken as p = 0: the layer runs
    PEFT's forward for it, with a warning. Both equal unpatched PEFT."""
    class HalfDropout(nn.Module):
        def forward(self, x):
            return x * 0.5

    model = _peft_model()
    peft_kernels.patch_peft_model(model)
    layer = model.base_model.model.layers[0].q_proj
    reference = copy.deepcopy(model)
    peft_kernels.unpatch_peft_model(reference)
    x = torch.randn(4, 24)
    for m in (model, reference):
        target = m.base_model.model.layers[0].q_proj
        target.lora_B["default"].bias = nn.Parameter(torch.linspace(-1, 1, target.out_features))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = model(x)
    assert torch.allclose(y, reference(x), atol=1e-6) and not layer.forward.unfused
    for m in (model, reference):
        m.base_model.model.layers[0].q_proj.lora_dropout["default"] = HalfDropout()
    with pytest.warns(UserWarning, match="runs PEFT's unfused forward: adapter 'default' uses dropout HalfDropout"):
        y = model(x)
    assert torch.allclose(y, reference(x), atol=1e-6)
    assert layer.forward.unfused == {"default"}


# ----------------------------------------------------------------------------- SHiRA


def _shira_model(seed, r=2, scale=1.0, dtype=torch.float64, targets=("q_proj", "v_proj", "up")):
    if not hasattr(peft, "ShiraConfig"):
        pytest.skip("this peft has no SHiRA")
    torch.manual_seed(seed)
    model = peft.get_peft_model(Net().to(dtype), peft.ShiraConfig(r=r, target_modules=list(targets),
                                                                 random_seed=seed))
    for name, p in model.named_parameters():
        if "shira_weight" in name:
            nn.init.normal_(p, std=0.3)  # trained values, not PEFT's zero init
    for m in model.modules():
        if hasattr(m, "shira_weight"):
            m.set_scale("default", scale)
    return model


def _shira_layers(model):
    return [m for m in model.modules() if hasattr(m, "shira_indices")]


@pytest.mark.parametrize("seed,r,scale", [(0, 1, 1.0), (1, 2, 0.7), (2, 4, 1.0), (3, 3, 2.5)])
def test_patched_shira_matches_unpatched(seed, r, scale):
    """PEFT's SHiRA layers run sparse_delta_linear: outputs, dX and every values' gradient equal
    PEFT's own forward (which clones W every step and forms the dense weight gradient), float64,
    train and eval, with a trainable base bias too; the base weight is left bit-identical."""
    from unittest import mock

    from peft_kernels.integrations import peft as integration

    model = _shira_model(seed, r=r, scale=scale)
    model.base_model.model.layers[0].q_proj.base_layer.bias.requires_grad_(True)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert len(report.patched) == 6 and not report.skipped, str(report)
    weights = {n: p.clone() for n, p in patched.named_parameters() if "base_layer.weight" in n}
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    for train in (True, False):
        model.train(train)
        patched.train(train)
        with mock.patch.object(integration, "sparse_delta_linear", wraps=integration.sparse_delta_linear) as op:
            result = _run(patched, x)
        assert op.call_count == 6
        assert len(_assert_same_run(result, _run(model, x))) == 7  # six shira_weight, one bias
    assert all(torch.equal(p, weights[n]) for n, p in patched.named_parameters() if n in weights)


def test_patched_shira_states_and_fallbacks():
    """PEFT's states (adapter disabled, merged) keep PEFT's semantics; unsorted indices are
    sorted with their values; repeated positions, a trainable base weight or an x of another
    dtype run PEFT's forward with a warning; autocast runs fused in bf16; unpatch restores."""
    model = _shira_model(5)
    patched = copy.deepcopy(model)
    peft_kernels.patch_peft_model(patched)
    x = torch.randn(4, 24, dtype=torch.float64)
    with model.disable_adapter(), patched.disable_adapter():
        assert torch.equal(patched(x), model(x))
    patched.merge_adapter()
    model.merge_adapter()
    assert torch.allclose(patched(x), model(x), atol=1e-12)
    patched.unmerge_adapter()
    model.unmerge_adapter()
    assert torch.allclose(patched(x), model(x), atol=1e-12)

    # the same adapter with its (index, value) pairs listed in another order
    layer = _shira_layers(patched)[0]
    perm = torch.randperm(layer.shira_weight["default"].numel())
    layer.shira_indices["default"] = layer.shira_indices["default"][:, perm].contiguous()
    with torch.no_grad():
        layer.shira_weight["default"].copy_(layer.shira_weight["default"][perm])
    (y1, gx1, g1), (y0, gx0, g0) = _run(patched, x), _run(model, x)
    assert torch.allclose(y1, y0, atol=1e-12) and torch.allclose(gx1, gx0, atol=1e-12)
    name = next(n for n in g1 if "layers.0.q_proj" in n)
    assert torch.allclose(g1[name], g0[name][perm], atol=1e-12)
    assert not layer.forward.unfused

    twice = _shira_layers(patched)[1]
    twice.shira_indices["default"] = twice.shira_indices["default"].clone()
    twice.shira_indices["default"][:, 1] = twice.shira_indices["default"][:, 0]
    with pytest.warns(UserWarning, match="SHiRA layer runs PEFT's unfused forward: .* lists a position twice"):
        patched(x)
    third = _shira_layers(patched)[2]
    third.get_base_layer().weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="the base weight requires grad"):
        patched(x)
    with pytest.warns(UserWarning, match="got x in torch.float32"):
        with pytest.raises(RuntimeError):  # what PEFT itself does with this input
            patched(x.float())

    bf = _shira_model(6, dtype=torch.float32)
    fused = copy.deepcopy(bf)
    peft_kernels.patch_peft_model(fused)
    x32 = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fused, y_peft = fused(x32), bf(x32)
    assert y_fused.dtype == y_peft.dtype == torch.bfloat16
    assert torch.allclose(y_fused.float(), y_peft.float(), rtol=1e-2, atol=1e-2)  # ~2 bf16 ulps; seen: 1
    assert peft_kernels.backends.last_used("sparse_delta") == "torch"
    assert len(peft_kernels.unpatch_peft_model(fused)) == 6
    assert all("forward" not in vars(m) for m in fused.modules())


def _shira_r(r):
    return lambda lin: r * (lin.in_features + lin.out_features)


def test_shira_adapter_saved_by_peft_loads_as_sparse_deltas(tmp_path):
    """A SHiRA adapter PEFT saved loads onto a plain model as SparseDeltaLinear layers (indices in
    any order, values permuted alike) with PEFT's outputs; it then trains its values only, with
    SparseAdamW."""
    model = _shira_model(7, r=2, scale=1.0)
    layer = _shira_layers(model)[1]  # PEFT's order need not be sorted: a file may list any order
    perm = torch.randperm(layer.shira_weight["default"].numel())
    layer.shira_indices["default"] = layer.shira_indices["default"][:, perm].contiguous()
    with torch.no_grad():
        layer.shira_weight["default"].copy_(layer.shira_weight["default"][perm])
    model.save_pretrained(tmp_path)
    torch.manual_seed(7)
    ours = peft_kernels.load_adapter(Net().double(), tmp_path)
    assert sum(isinstance(m, peft_kernels.nn.SparseDeltaLinear) for m in ours.modules()) == 6
    x = torch.randn(3, 4, 24, dtype=torch.float64)
    assert torch.allclose(ours(x), model(x), rtol=1e-12, atol=1e-12)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == 6 and all(n.endswith("delta_values") for n in trainable)
    opt = peft_kernels.sparse.SparseAdamW(ours, lr=1e-2)
    ours(x).square().sum().backward()
    opt.step()
    assert not torch.allclose(ours(x), model(x), atol=1e-6)


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.float64])
def test_sparse_deltas_saved_as_shira_load_in_peft_and_back(values_dtype, tmp_path):
    """apply_sparse with SHiRA's size (k = r·(in + out)) and trained values: save_adapter writes
    PEFT's SHiRA format, PeftModel.from_pretrained gives the same outputs, and load_adapter reads
    it back to the same positions and values."""
    if not hasattr(peft, "ShiraConfig"):
        pytest.skip("this peft has no SHiRA")
    torch.manual_seed(0)
    base = Net().double()
    ours = peft_kernels.apply_sparse(copy.deepcopy(base), ["q_proj", "up"], density=None, num_params=_shira_r(3))
    for m in ours.modules():
        if isinstance(m, peft_kernels.nn.SparseDeltaLinear):
            m.delta_values.data = torch.randn_like(m.delta_values, dtype=values_dtype) * 0.1
    peft_kernels.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == 3 and config["target_modules"] == ["q_proj", "up"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(5, 24, dtype=torch.float64)
    assert torch.allclose(theirs(x), ours(x), rtol=1e-12, atol=1e-12)
    back = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path)
    for (n, a), (_, b) in zip(((n, m) for n, m in ours.named_modules() if hasattr(m, "delta_index")),
                              ((n, m) for n, m in back.named_modules() if hasattr(m, "delta_index"))):
        assert torch.equal(a.delta_index, b.delta_index) and torch.allclose(a.delta_values.double(),
                                                                            b.delta_values.double()), n
    assert torch.allclose(back(x), ours(x), rtol=1e-6, atol=1e-9)


def test_shira_save_and_load_errors(tmp_path):
    """What PEFT's SHiRA cannot hold is refused with the way out, and a bad file leaves the model
    as it was."""
    by_density = peft_kernels.apply_sparse(Net(), ["q_proj"], density=0.05)
    with pytest.raises(ValueError, match=r"k = r \* \(in \+ out\).*num_params=lambda lin"):
        peft_kernels.save_adapter(by_density, tmp_path / "a")
    blocks = peft_kernels.apply_sparse(Net(), ["up"], density=None, num_params=2, block=(8, 8))
    with pytest.raises(ValueError, match="block-sparse"):
        peft_kernels.save_adapter(blocks, tmp_path / "b")
    mixed = peft_kernels.apply_lora(peft_kernels.apply_sparse(Net(), ["up"]), ["q_proj"])
    with pytest.raises(ValueError, match="both LoRA adapters and sparse deltas"):
        peft_kernels.save_adapter(mixed, tmp_path / "c")
    with pytest.raises(ValueError, match="no LoRA adapter modules .*, no SparseDeltaLinear .* and no SparseDeltaEmbedding"):
        peft_kernels.save_adapter(Net(), tmp_path / "d")

    good = peft_kernels.apply_sparse(Net(), ["q_proj", "up"], density=None, num_params=_shira_r(1))
    peft_kernels.save_adapter(good, tmp_path / "e")
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "e" / "adapter_model.safetensors"))
    key = "base_model.model.layers.1.up.shira_indices"
    for broken, message in [(lambda s: s[key][1].__setitem__(0, 99), "fall outside"),
                            (lambda s: s[key][:, 1].copy_(s[key][:, 0]), "a position twice")]:
        bad = {k: v.clone() for k, v in state.items()}
        broken(bad)
        save_file(bad, str(tmp_path / "e" / "adapter_model.safetensors"))
        model = Net()
        with pytest.raises(ValueError, match=message):
            peft_kernels.load_adapter(model, tmp_path / "e")
        assert not any(isinstance(m, peft_kernels.nn.SparseDeltaLinear) for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="quantize= does not apply"):
        peft_kernels.load_adapter(Net(), tmp_path / "e", quantize="nf4")


# ----------------------------------------------------------------------------- the LoRA branch alone
class OwnForwardLinear(nn.Linear):
    """A base layer type peft_kernels does not know (its own forward): runs beside the branch."""

    def forward(self, x):
        return super().forward(x) * 1.5


def _branch_model(kind, dropout=0.0, use_dora=False, adapter_dtype=None, dtype=torch.float32, lora_bias=False):
    torch.manual_seed(0)
    if kind == "bnb 8-bit":
        bnb = pytest.importorskip("bitsandbytes")
        first = bnb.nn.Linear8bitLt(24, 40, has_fp16_weights=False, threshold=6.0)
        first.load_state_dict(nn.Linear(24, 40).state_dict())
    else:
        first = OwnForwardLinear(24, 40)
    holder = nn.Sequential(first, nn.Tanh(), nn.Linear(40, 6))
    holder = holder.to("cpu") if kind == "bnb 8-bit" else holder.to(dtype)  # bnb quantizes on the move
    holder.is_loaded_in_8bit = kind == "bnb 8-bit"  # what transformers sets: PEFT then uses its bnb class
    model = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                        target_modules=["0", "2"], use_dora=use_dora,
                                                        lora_bias=lora_bias),
                                autocast_adapter_dtype=adapter_dtype is not None)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.3)  # lora_bias' biases too
    return model


class SameForwardLinear(nn.Linear):
    """A Linear subclass that keeps nn.Linear's forward: the fused ops compute it whole."""


def test_offloaded_bases_run_their_own_forward_beside_the_fused_branch():
    """accelerate's offloading hook (device_map with CPU / disk offload) replaces a base layer's
    forward on the instance and leaves its weight on the meta device between calls: the fused op
    read that weight and failed. Such a base now runs its own forward beside the fused LoRA
    branch, as apply_lora's LoRABranchLinear does; a Linear subclass keeping nn.Linear's forward is
    fused whole, as apply_lora does."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    torch.manual_seed(0)
    model = _peft_model(targets=("q_proj", "up"))
    model.base_model.model.layers[1].up.base_layer.__class__ = SameForwardLinear
    x = torch.randn(3, 7, 24)
    reference = _run(model, x)
    offloaded = []
    for name, mod in model.named_modules():
        if name.endswith("q_proj.base_layer"):
            state = {k: v.detach().clone() for k, v in mod.state_dict().items()}
            add_hook_to_module(mod, AlignDevicesHook(execution_device="cpu", offload=True, weights_map=state))
            offloaded.append(name.rpartition(".")[0])
    assert model.base_model.model.layers[0].q_proj.base_layer.weight.device.type == "meta"
    report = peft_kernels.patch_peft_model(model)
    assert len(report.patched) == 4 and not report.skipped
    assert sorted(report.branch_only) == sorted(offloaded)
    assert all("AlignDevicesHook" in why for why in report.branch_only.values())
    _assert_runs_as(model, x, reference)

    # apply_lora: the hooked Linear keeps its forward under a LoRABranchLinear (adapter on the hook's
    # execution device, not on the meta device of the offloaded weight)
    def hooked_net():
        torch.manual_seed(0)
        net = Net()
        hooked = net.layers[0].q_proj
        state = {k: v.detach().clone() for k, v in hooked.state_dict().items()}
        add_hook_to_module(hooked, AlignDevicesHook(execution_device="cpu", offload=True, weights_map=state))
        return net

    net = hooked_net()
    want = net(x)
    with pytest.raises(ValueError, match="forward is replaced on the instance.*DoRA needs the base weight"):
        peft_kernels.apply_lora(net, ["q_proj"], r=2, use_dora=True)
    peft_kernels.apply_lora(net, ["q_proj"], r=2)
    assert isinstance(net.layers[0].q_proj, peft_kernels.nn.LoRABranchLinear)
    assert isinstance(net.layers[1].q_proj, peft_kernels.nn.LoRALinear)
    assert net.layers[0].q_proj.lora_A.device.type == "cpu"
    assert torch.allclose(net(x), want, atol=1e-6)


def test_hooks_on_base_layers_keep_running():
    """A hook on a base layer runs only in that layer's own forward, which the fused op skips: a
    base hooked at patch time runs its forward beside the fused branch; one hooked later, or an
    adapter whose lora_A / lora_B modules carry hooks, runs PEFT's forward (warned once); under
    DeepSpeed ZeRO-3 (parameters marked ``ds_id``, gathered by each module's own hooks) PEFT's
    forward runs too. apply_lora keeps such a base's forward (LoRABranchLinear). Outputs and
    gradients equal unpatched PEFT's throughout."""
    model = _peft_model(targets=("q_proj", "up"))
    x = torch.randn(3, 7, 24)
    seen = []
    hooked = model.base_model.model.layers[0].q_proj.base_layer
    hooked.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    reference = _run(model, x)
    assert len(seen) == 1
    report = peft_kernels.patch_peft_model(model)
    assert len(report.patched) == 4 and "hooks are registered" in report.branch_only["base_model.model.layers.0.q_proj"]

    def same():
        _assert_runs_as(model, x, reference)

    same()
    assert len(seen) == 2
    late = model.base_model.model.layers[1].up.base_layer
    late.register_forward_pre_hook(lambda mod, args: seen.append("late"))
    with pytest.warns(UserWarning, match="hooks are registered on its base layer"):
        same()
    assert seen[-1] == "late"
    # hooks on an adapter's own modules (Opacus' per-sample gradients hook lora_A / lora_B)
    lora_a = model.base_model.model.layers[0].up.lora_A["default"]
    lora_a.register_full_backward_hook(lambda mod, gin, gout: seen.append("lora_A backward"))
    with pytest.warns(UserWarning, match="has hooks on its lora_A modules"):
        same()
    assert seen[-1] == "lora_A backward"
    for layer in (model.base_model.model.layers[0].up, model.base_model.model.layers[1].q_proj):
        layer.get_base_layer().weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.warns(UserWarning, match="DeepSpeed ZeRO-3 partitions its parameters"):
        same()

    torch.manual_seed(0)
    net = Net()
    net.layers[0].q_proj.register_forward_hook(lambda mod, args, out: seen.append("ours"))
    want = net(x)
    peft_kernels.apply_lora(net, ["q_proj"], r=2)
    assert isinstance(net.layers[0].q_proj, peft_kernels.nn.LoRABranchLinear)
    assert isinstance(net.layers[1].q_proj, peft_kernels.nn.LoRALinear)
    del seen[:]
    assert torch.allclose(net(x), want, atol=1e-6) and seen == ["ours"]
    # a hooked layer apply_lora would replace whole (Conv1D, bitsandbytes) is refused by name
    from transformers.pytorch_utils import Conv1D
    gpt2_like = nn.Sequential(Conv1D(16, 8))
    gpt2_like[0].register_forward_hook(lambda mod, args, out: None)
    with pytest.raises(ValueError, match="hooks are registered on this Conv1D .* replacing it would drop them"):
        peft_kernels.apply_lora(gpt2_like, ["0"], r=2)


@pytest.mark.parametrize("kind,lora_bias", [("bnb 8-bit", False), ("own forward", False), ("bnb 8-bit", True),
                                            ("own forward", True)])
def test_lora_over_other_bases_runs_the_fused_branch(kind, lora_bias):
    """PEFT's LoRA over a base peft_kernels cannot compute itself — bitsandbytes' LLM.int8
    Linear8bitLt (PEFT's bnb class), a Linear subclass with its own forward (PEFT's Linear class) —
    is patched: the base runs its own forward, the LoRA branch runs lora_delta (plus lora_B's bias,
    scaled, with lora_bias=True); outputs and every gradient equal PEFT's; dropout follows
    torch.manual_seed; unpatch restores."""
    from unittest import mock

    from peft_kernels.integrations import peft as integration

    model = _branch_model(kind, lora_bias=lora_bias)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert len(report.patched) == 2 and not report.skipped
    base_type = "Linear8bitLt" if kind == "bnb 8-bit" else "OwnForwardLinear"
    assert report.branch_only == {"base_model.model.0": base_type} and "runs its own forward" in str(report)
    x = torch.randn(3, 5, 24)
    with mock.patch.object(integration, "lora_delta", wraps=integration.lora_delta) as branch:
        y1, gx1, g1 = _run(patched, x)
    assert branch.call_count == 1
    y0, gx0, g0 = _run(model, x)
    assert torch.allclose(y1, y0, atol=1e-5) and torch.allclose(gx1, gx0, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) == (6 if lora_bias else 4)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-5), n

    noisy = _branch_model(kind, dropout=0.3, lora_bias=lora_bias)
    peft_kernels.patch_peft_model(noisy)
    torch.manual_seed(1)
    a = noisy(x)
    torch.manual_seed(1)
    b = noisy(x)
    torch.manual_seed(2)
    assert torch.equal(a, b) and not torch.equal(a, noisy(x))
    assert len(peft_kernels.unpatch_peft_model(patched)) == 2
    assert torch.equal(patched(x), model(x))


def test_fused_branch_keeps_peft_dtypes_and_refuses_dora():
    """fp32 adapters (PEFT's autocast_adapter_dtype) over a bf16 base of its own forward: x goes
    to fp32 for the branch, the sum back to bf16, as PEFT does; DoRA needs the base weight and is
    left to PEFT with the reason."""
    model = _branch_model("own forward", adapter_dtype=torch.float32, dtype=torch.bfloat16)
    assert model.base_model.model[0].lora_A["default"].weight.dtype == torch.float32
    patched = copy.deepcopy(model)
    assert peft_kernels.patch_peft_model(patched).branch_only
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    y0, y1 = model(x), patched(x)
    assert y1.dtype == y0.dtype == torch.bfloat16 and torch.allclose(y1.float(), y0.float(), rtol=1e-2, atol=1e-2)
    dora = _branch_model("own forward", use_dora=True)
    report = peft_kernels.patch_peft_model(dora)
    assert "base_model.model.0" in report.skipped and "DoRA, which needs the base weight" in \
        report.skipped["base_model.model.0"]


def test_torchao_quantized_bases_fuse_the_branch_patched_and_under_apply_lora(tmp_path):
    """A torchao-quantized nn.Linear (its weight a tensor subclass) under PEFT's LoRA was taken for
    a plain layer: the fused op got the subclass and raised NotImplementedError at the first
    forward. Its base now runs its own (quantized) forward beside the fused branch, equal to PEFT's.
    apply_lora, which refused such a layer, puts a LoRABranchLinear there: equal to PEFT's LoRA
    over the same quantized base, saved in PEFT's format both ways; DoRA, merging and sparse deltas
    are refused by name."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 8))
    quantize_(holder, Int8WeightOnlyConfig())
    model = peft.get_peft_model(holder, peft.LoraConfig(r=4, target_modules=["0"]))
    nn.init.normal_(model.base_model.model[0].lora_B["default"].weight, std=0.3)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert report.patched == ["base_model.model.0"] and "its weight is a Int8Tensor" in str(report)
    x = torch.randn(5, 64)
    (y1, gx1, g1), (y0, gx0, g0) = _run(patched, x), _run(model, x)
    assert torch.allclose(y1, y0, atol=1e-5) and torch.allclose(gx1, gx0, atol=1e-5)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-4, atol=1e-5), n

    quantized = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 8))
    quantize_(quantized, Int8WeightOnlyConfig(), filter_fn=lambda m, name: name == "0")
    with pytest.raises(ValueError, match="sparse deltas need a full-precision base"):
        peft_kernels.apply_sparse(quantized, ["0"])
    with pytest.raises(ValueError, match="partial mask on 0.weight.*sparse deltas need a full-precision base"):
        peft_kernels.mask_gradients_(quantized, {"0.weight": torch.rand(48, 64) < 0.1})
    with pytest.raises(ValueError, match=r"apply_lora: 0 \(its weight is a Int8Tensor .*DoRA needs the base weight"):
        peft_kernels.apply_lora(copy.deepcopy(quantized), ["0"], use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(quantized), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    nn.init.normal_(theirs.base_model.model[0].lora_B["default"].weight, std=0.3)
    ours = peft_kernels.apply_lora(copy.deepcopy(quantized), "all-linear", r=4, alpha=8)  # no warning: none left out
    assert type(ours[0]) is peft_kernels.nn.LoRABranchLinear and isinstance(ours[2], peft_kernels.nn.LoRALinear)
    with torch.no_grad():
        ours[0].lora_A.copy_(theirs.base_model.model[0].lora_A["default"].weight)
        ours[0].lora_B.copy_(theirs.base_model.model[0].lora_B["default"].weight)
        ours[2].lora_B.zero_()  # PEFT adapted only "0"
    (y1, gx1, g1), (y0, gx0, g0) = _run(ours, x), _run(theirs, x)
    assert torch.allclose(y1, y0, atol=1e-5) and torch.allclose(gx1, gx0, atol=1e-5)
    for ours_name, peft_name in (("0.lora_A", "base_model.model.0.lora_A.default.weight"),
                                 ("0.lora_B", "base_model.model.0.lora_B.default.weight")):
        assert torch.allclose(g1[ours_name], g0[peft_name], rtol=1e-4, atol=1e-5), ours_name
    assert all(not n.startswith("0.base_layer") for n in g1)  # the quantized base stays frozen
    ours[2] = quantized[2]  # only "0" adapted, as in PEFT's model, for the files
    peft_kernels.save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    back = peft_kernels.load_adapter(copy.deepcopy(quantized), tmp_path / "theirs")
    assert type(back[0]) is peft_kernels.nn.LoRABranchLinear
    with torch.no_grad():
        assert torch.allclose(loaded(x), y0, atol=1e-5) and torch.allclose(back(x), y0, atol=1e-5)
    with pytest.raises(ValueError, match=r"merge_and_unload: \['0 \(Linear\)'\] keep a base that computes its own"):
        peft_kernels.merge_and_unload(back)


def _plain_llama(tie: bool, dtype=torch.float64):
    """A small transformers Llama (vocabulary 64, width 32), the same weights on every call."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _tokens_llama(tie: bool, dtype=torch.float64):
    """_plain_llama with HF PEFT LoRA and trainable_token_indices (three trained embedding rows,
    shared with the head when the embeddings are tied), rows and lora_B moved off their init."""
    model = peft.get_peft_model(_plain_llama(tie, dtype),
                                peft.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[60, 61, 3]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _lm_run(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True])
def test_patched_trainable_tokens_match_unpatched(tie, monkeypatch):
    """PEFT's trainable tokens (LoraConfig trainable_token_indices) run through the sparse ops —
    sparse_delta_embedding on the embedding, sparse_delta_linear with (1, d) blocks on a tied
    head — with PEFT's logits bit for bit and its gradients (float64), no [V, d] gradient; the
    states PEFT keeps (adapters disabled, merged) run PEFT's forward, and unpatch restores it."""
    from peft_kernels.integrations import peft as integration
    model = _tokens_llama(tie)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    tokens = [n for n in report.patched if n.endswith("token_adapter")]
    assert len(tokens) == (2 if tie else 1) and not report.skipped
    calls = []
    for op in ("sparse_delta_embedding", "sparse_delta_linear"):
        real = getattr(integration, op)
        monkeypatch.setattr(integration, op, lambda *a, real=real, op=op, **k: (calls.append(op), real(*a, **k))[1])
    ids = torch.randint(0, 64, (2, 9))
    ids[:, :3] = torch.tensor([60, 61, 3])
    y0, g0 = _lm_run(model, ids)
    y1, g1 = _lm_run(patched, ids)
    assert sorted(calls) == (["sparse_delta_embedding", "sparse_delta_linear"] if tie else ["sparse_delta_embedding"])
    assert torch.equal(y1, y0) and g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g1[name], g0[name], rtol=1e-10, atol=1e-15), name
    calls.clear()
    with patched.disable_adapter(), model.disable_adapter():
        assert torch.equal(patched(input_ids=ids).logits, model(input_ids=ids).logits)
    patched.merge_adapter()
    model.merge_adapter()
    assert torch.allclose(patched(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-12)
    assert calls == []
    patched.unmerge_adapter()
    assert sorted(peft_kernels.unpatch_peft_model(patched)) == sorted(report.patched)


def test_trainable_tokens_patch_checks_its_layers():
    model = _tokens_llama(False)
    layer = model.base_model.model.model.embed_tokens.token_adapter
    layer.token_indices["default"] = [60, 60, 3]  # PEFT's index_copy with a repeated row: left to PEFT
    report = peft_kernels.patch_peft_model(model)
    assert "lists a token twice" in report.skipped["base_model.model.model.embed_tokens.token_adapter"]
    layer.token_indices["default"] = [60, 61, 3]
    layer.get_base_layer().weight.requires_grad_(True)
    report = peft_kernels.patch_peft_model(copy.deepcopy(model))
    assert "requires grad" in report.skipped["base_model.model.model.embed_tokens.token_adapter"]


def test_trainable_tokens_round_trip_with_peft(tmp_path):
    """PEFT's trainable_token_indices both ways: PEFT's adapter loads as LoRA + a SparseDeltaEmbedding
    over those rows (logits bit-equal), apply_lora(trainable_token_indices=...) trains exactly those
    rows, and save_adapter writes them in PEFT's format (the rows' new values), which PEFT loads
    with our logits."""
    from peft_kernels.nn import SparseDeltaEmbedding
    theirs = _tokens_llama(False, torch.float32)
    base = _plain_llama(False, torch.float32)  # the weights PEFT wrapped
    theirs.save_pretrained(tmp_path / "theirs")
    ids = torch.randint(0, 64, (2, 9))
    ids[:, :5] = torch.tensor([60, 61, 3, 7, 2])
    ours = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert isinstance(ours.model.embed_tokens, SparseDeltaEmbedding)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    fresh = peft_kernels.apply_lora(copy.deepcopy(base), ["q_proj"], r=4, trainable_token_indices={"embed_tokens": [7, 2]})
    assert [n for n, p in fresh.named_parameters() if p.requires_grad and "lora" not in n] == ["model.embed_tokens.delta_values"]
    optimizer = peft_kernels.sparse.SparseAdamW(fresh, lr=0.1)
    fresh(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    moved = (fresh.model.embed_tokens.merge() != base.model.embed_tokens.weight).any(1).nonzero().reshape(-1)
    assert moved.tolist() == [2, 7]
    for model, rows in ((ours, [3, 60, 61]), (fresh, [2, 7])):
        out = tmp_path / f"ours{len(rows)}"
        peft_kernels.save_adapter(model, out)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["trainable_token_indices"] == rows  # the input embedding's: PEFT's list form
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_trainable_tokens_errors(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2)
    torch.manual_seed(0)
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **cfg))
    with pytest.raises(ValueError, match=r"\['lm_head'\] share the table .* a LoRA adapter there"):
        peft_kernels.apply_lora(tied, ["q_proj", "lm_head"], trainable_token_indices=[1, 2])
    tied.lm_head.register_forward_hook(lambda *a: None)  # a head that must keep its own forward
    with pytest.raises(ValueError, match="shared with a module other than a plain nn.Linear head"):
        peft_kernels.apply_lora(tied, ["q_proj"], trainable_token_indices=[1, 2])
    _tokens_llama(True, torch.float32).save_pretrained(tmp_path / "tied")
    flags = [p.requires_grad for p in tied.parameters()]
    with pytest.raises(ValueError, match="shared with a module other than"):
        peft_kernels.load_adapter(tied, tmp_path / "tied")
    assert not any(isinstance(m, peft_kernels.nn.LoRALinear) for m in tied.modules())
    assert [p.requires_grad for p in tied.parameters()] == flags
    untied = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=False, **cfg))
    with pytest.raises(ValueError, match="must be distinct ids in \\[0, 64\\)"):
        peft_kernels.apply_lora(untied, ["q_proj"], trainable_token_indices=[1, 1])
    with pytest.raises(ValueError, match="must name one nn.Embedding"):
        peft_kernels.apply_lora(untied, ["q_proj"], trainable_token_indices={"q_proj": [1]})
    model = peft_kernels.apply_lora(untied, ["q_proj"], r=2)
    peft_kernels.mask_gradients_(model, {"model.embed_tokens.weight": torch.rand(64, 32) < 0.1,
                                         "*lora_*": True})
    with pytest.raises(ValueError, match="not whole rows"):
        peft_kernels.save_adapter(model, tmp_path / "partial")


def test_trainable_tokens_adapters_round_trip_with_peft(tmp_path):
    """PEFT's standalone TRAINABLE_TOKENS adapter (TrainableTokensConfig): it loads as a
    SparseDeltaEmbedding over those rows with PEFT's logits bit for bit, saves back in that format
    (a model whose only trained layers are such rows), which PEFT loads, and PEFT's layer is patched."""
    from peft_kernels.nn import SparseDeltaEmbedding
    base = _plain_llama(False, torch.float32)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.TrainableTokensConfig(token_indices=[60, 3],
                                                                                  target_modules=["embed_tokens"]))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs")
    ids = torch.randint(0, 64, (2, 9))
    ids[:, :2] = torch.tensor([60, 3])
    ours = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert isinstance(ours.model.embed_tokens, SparseDeltaEmbedding)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["model.embed_tokens.delta_values"]
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert torch.equal(ours(input_ids=ids).logits, want)
        peft_kernels.save_adapter(ours, tmp_path / "ours")
        config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == [3, 60]
        assert torch.equal(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")(input_ids=ids).logits,
                           want)
        patched = copy.deepcopy(theirs)
        assert peft_kernels.patch_peft_model(patched).patched == ["base_model.model.model.embed_tokens"]
        assert torch.equal(patched(input_ids=ids).logits, want)
    with pytest.raises(ValueError, match="quantize= does not apply"):
        peft_kernels.load_adapter(copy.deepcopy(base), tmp_path / "theirs", quantize="nf4")


def test_save_adapter_warns_of_trainable_parameters_it_cannot_hold(tmp_path):
    """A parameter made trainable by hand (or by mask_gradients_) is not in PEFT's format: named in a
    warning, not dropped without a word; what the options save draws no warning."""
    model = peft_kernels.apply_lora(NormedNet(), ["q_proj"], r=2, bias="lora_only", modules_to_save=["head"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft_kernels.save_adapter(model, tmp_path / "a")
    model.norm.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"1 trainable parameters are not part of PEFT's .*\['norm.weight'\]"):
        peft_kernels.save_adapter(model, tmp_path / "b")


class _ScaledEmbedding(nn.Embedding):
    """Gemma's kind of embedding: the lookup times a scale (PEFT's trainable tokens apply it too)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(3.0), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale


class _TokensNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.lin, self.head = _ScaledEmbedding(40, 8), nn.Linear(8, 8), nn.Linear(8, 40)

    def forward(self, ids):
        return self.head(torch.tanh(self.lin(self.embed(ids))))


def test_patched_trainable_tokens_keep_an_embedding_scale():
    torch.manual_seed(0)
    model = peft.get_peft_model(_TokensNet().double(), peft.LoraConfig(r=2, target_modules=["lin"],
                                                                      trainable_token_indices={"embed": [3, 5]}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    patched = copy.deepcopy(model)
    assert "base_model.model.embed.token_adapter" in peft_kernels.patch_peft_model(patched).patched
    ids = torch.randint(0, 40, (3, 7))
    ids[0, :2] = torch.tensor([3, 5])
    assert torch.equal(patched(ids), model(ids))


def test_tied_trainable_tokens_follow_peft(tmp_path):
    """On a model whose head is tied to the embedding, trainable tokens train the rows of both, as
    HF PEFT's do: PEFT's adapter loads as a SparseDeltaEmbedding plus a TiedRowsHead sharing its
    table and delta (logits and the rows' gradient equal PEFT's, float64), saves back in PEFT's
    format (PEFT loads it tied), and merge_and_unload gives a plain model, still tied."""
    from peft_kernels.nn import SparseDeltaEmbedding, TiedRowsHead
    theirs = _tokens_llama(True)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peft_kernels.load_adapter(_plain_llama(True), tmp_path / "theirs")
    assert isinstance(ours.model.embed_tokens, SparseDeltaEmbedding) and isinstance(ours.lm_head, TiedRowsHead)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 9))
    ids[:, :3] = torch.tensor([60, 61, 3])
    y0, g0 = _lm_run(theirs, ids)
    y1, g1 = _lm_run(ours, ids)
    assert torch.allclose(y1, y0, rtol=0, atol=1e-12)
    rows = g0["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    order = torch.argsort(torch.tensor([60, 61, 3]))  # ours holds the rows sorted
    assert torch.allclose(g1["model.embed_tokens.delta_values"].reshape(3, -1), rows[order], rtol=1e-10, atol=1e-15)
    peft_kernels.save_adapter(ours, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(_plain_llama(True), tmp_path / "ours")
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, y1, rtol=0, atol=1e-12)
        merged = peft_kernels.merge_and_unload(ours)
        assert type(merged.lm_head) is nn.Linear and merged.lm_head.weight is merged.model.embed_tokens.weight
        assert torch.allclose(merged(input_ids=ids).logits, y1, rtol=0, atol=1e-12)


def test_lora_only_bias_leaves_a_tied_heads_bias_alone():
    """bias="lora_only" trains the LoRA layers' biases only (PEFT's rule), not the bias of a head
    that trainable_token_indices turned into a TiedRowsHead."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.lin, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.lin(self.embed(ids))))

    model = peft_kernels.apply_lora(Tied(), ["lin"], r=2, bias="lora_only", trainable_token_indices={"embed": [3]})
    assert isinstance(model.head, peft_kernels.nn.TiedRowsHead)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "embed.delta_values", "lin.lora_A", "lin.lora_B", "lin.bias"]
