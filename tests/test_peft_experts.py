"""PEFT LoRA on MoE experts' 3-D weights (LoraConfig target_parameters), patched: the experts computed
without PEFT's W + s·B_e A_e stack (peft_kernels/integrations/peft_experts.py), against unpatched PEFT."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_kernels
from helpers import FLOOR, rel_err

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
ParamWrapper = getattr(pytest.importorskip("peft.tuners.lora.layer"), "ParamWrapper", None)
moe = pytest.importorskip("transformers.integrations.moe")
if ParamWrapper is None or not hasattr(moe, "use_experts_implementation"):
    pytest.skip("needs PEFT's target_parameters (peft >= 0.17) and transformers' experts interface",
                allow_module_level=True)

BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _config(kind: str, hidden: int = 32, inter: int = 24, experts: int = 5, top_k: int = 3):
    common = dict(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if kind == "mixtral":
        return transformers.MixtralConfig(intermediate_size=inter, num_local_experts=experts,
                                          num_experts_per_tok=top_k, **common)
    if kind == "qwen3_moe":  # every layer sparse; its router normalizes the top-k weights
        return transformers.Qwen3MoeConfig(intermediate_size=2 * inter, moe_intermediate_size=inter,
                                           num_experts=experts, num_experts_per_tok=top_k,
                                           head_dim=hidden // 4, **common)
    # gpt-oss: [E, in, out] weights (is_transposed), biases, interleaved gate/up with a clamped gate
    return transformers.GptOssConfig(intermediate_size=inter, num_local_experts=experts,
                                     num_experts_per_tok=top_k, head_dim=hidden // 4,
                                     layer_types=["full_attention"] * 2, **common)


_MODELS = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}


def _moe_model(kind="mixtral", implementation="batched_mm", dtype=torch.float64, targets=tuple(BOTH),
               r=3, adapters=("default",), **dims):
    """A tiny transformers MoE model under PEFT LoRA on q_proj and on ``targets`` (target_parameters),
    every factor and bias drawn non-zero, in ``dtype``; ``adapters`` all added and active."""
    torch.manual_seed(0)
    model = getattr(transformers, _MODELS[kind])(_config(kind, **dims))
    model.set_experts_implementation(implementation)
    model = model.to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj_bias"):
                p.normal_()
    cfg = peft.LoraConfig(r=r, lora_alpha=5, target_modules=["q_proj"], target_parameters=list(targets),
                          init_lora_weights=False)
    model = peft.get_peft_model(model, cfg, adapter_name=adapters[0], autocast_adapter_dtype=False)
    for i, name in enumerate(adapters[1:]):
        model.add_adapter(name, peft.LoraConfig(r=r + 1 + i, lora_alpha=3, target_modules=["q_proj"],
                                                target_parameters=list(targets), init_lora_weights=False))
    if len(adapters) > 1:
        model.base_model.set_adapter(list(adapters))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def _step(model, ids, seed=1):
    """Logits and every gradient of one backward against a fixed random dY."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype))
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _no_peft_expert_stack(monkeypatch):
    """PEFT's W + s·B_e A_e parametrization (ParamWrapper._activate_lora) raises from here on."""
    def refuse(*args, **kwargs):
        raise AssertionError("the patched experts formed PEFT's expert stack")

    monkeypatch.setattr(ParamWrapper, "_activate_lora", refuse)


def _assert_same_step(ref, patched, ids, tol=1e-12):
    (o1, g1), (o2, g2) = ref, patched
    assert rel_err(o2, o1) <= tol
    assert g1.keys() == g2.keys() and any("lora_A" in n and "experts" in n for n in g1)
    for n in g1:
        assert rel_err(g2[n], g1[n]) <= tol, n


@pytest.mark.parametrize("kind", sorted(_MODELS))
@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_moe_models_match_peft_float64(kind, implementation, monkeypatch):
    """Mixtral, Qwen3-MoE and gpt-oss (transposed weights, biases, a clamped interleaved gate) under
    LoRA on both expert weights: patched logits and every gradient equal PEFT's, over transformers'
    eager and batched_mm experts implementations, and PEFT's expert stack is never formed."""
    model = _moe_model(kind, implementation)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    experts = [n for n in report.patched if n.endswith("mlp.experts")]
    assert len(experts) == 2 and not report.skipped
    assert peft_kernels.patch_peft_model(patched).patched == report.patched, "patching again changes nothing"
    assert all(n + ".base_layer" in report.patched for n in experts), "the inner wrapper is part of the chain"
    ids = torch.randint(0, 64, (2, 9))
    ref = _step(model, ids)
    _no_peft_expert_stack(monkeypatch)
    _assert_same_step(ref, _step(patched, ids), ids)


@pytest.mark.parametrize("targets", [["mlp.experts.gate_up_proj"], ["mlp.experts.down_proj"]])
def test_one_expert_weight_targeted(targets, monkeypatch):
    model = _moe_model("qwen3_moe", targets=targets)
    patched = copy.deepcopy(model)
    assert sum(n.endswith("experts") for n in peft_kernels.patch_peft_model(patched).patched) == 2
    ids = torch.randint(0, 64, (3, 5))
    ref = _step(model, ids)
    _no_peft_expert_stack(monkeypatch)
    _assert_same_step(ref, _step(patched, ids), ids)


def test_two_active_adapters_sum(monkeypatch):
    model = _moe_model("mixtral", adapters=("one", "two"))
    assert model.base_model.model.model.layers[0].mlp.experts.active_adapters == ["one", "two"]
    patched = copy.deepcopy(model)
    peft_kernels.patch_peft_model(patched)
    ids = torch.randint(0, 64, (2, 6))
    ref = _step(model, ids)
    _no_peft_expert_stack(monkeypatch)
    out = _step(patched, ids)
    _assert_same_step(ref, out, ids)
    assert any(".two." in n for n in out[1])


def _experts_class(**flags):
    """A transformers experts module built with use_experts_implementation(**flags): SiLU-gated
    (or ReLU without a gate), optional biases and post-expert norm, weights [E, out, in] or, with
    is_transposed, [E, in, out]. Its own (eager) forward is never used here."""

    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            E, H, inner = config.num_local_experts, config.hidden_size, config.intermediate_size
            up = 2 * inner if flags.get("has_gate", True) else inner
            shape = (lambda o, i: (E, i, o)) if flags.get("is_transposed") else (lambda o, i: (E, o, i))
            setattr(self, "gate_up_proj" if flags.get("has_gate", True) else "up_proj",
                    nn.Parameter(torch.randn(*shape(up, H)) / H**0.5))
            self.down_proj = nn.Parameter(torch.randn(*shape(H, inner)) / inner**0.5)
            if flags.get("has_bias"):
                name = "gate_up_proj" if flags.get("has_gate", True) else "up_proj"
                setattr(self, name + "_bias", nn.Parameter(torch.randn(E, up)))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H))
            if flags.get("has_post_expert_norm"):
                self.post_expert_norm = nn.LayerNorm(H)
            self.act_fn = nn.SiLU() if flags.get("has_gate", True) else nn.ReLU()
            self.num_experts = E

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the eager forward is not under test")

    return moe.use_experts_implementation(Experts, **flags)


class _Holder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts


def _routing(tokens, experts, top_k, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    index = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, :top_k]
    return index, torch.rand(tokens, top_k, generator=g, dtype=torch.float64).to(dtype)


def _experts_chain(flags, dtype=torch.float64, hidden=20, inner=12, experts=6, r=3):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inner, num_local_experts=experts)
    config._experts_implementation = "batched_mm"
    module = _experts_class(**flags)(config).to(dtype)
    up = "gate_up_proj" if flags.get("has_gate", True) else "up_proj"
    cfg = peft.LoraConfig(r=r, lora_alpha=4, target_parameters=[f"experts.{up}", "experts.down_proj"],
                          init_lora_weights=False)
    chain = peft.get_peft_model(_Holder(module), cfg, autocast_adapter_dtype=False).base_model.model.experts
    for p in chain.parameters():
        p.data = p.data.to(dtype)
    return chain


def _chain_step(chain, x, index, weights, seed=4):
    chain.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_()
    y = chain(xi, index, weights)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype))
    # by name: PEFT's forward re-registers the weight it parametrized, which reorders chain.parameters()
    return [y.detach(), xi.grad] + [p.grad for _, p in sorted(chain.named_parameters()) if p.requires_grad]


@pytest.mark.parametrize("flags", [dict(has_gate=False, is_transposed=True), dict(has_post_expert_norm=True),
                                   dict(has_bias=True), dict(has_gate=False, has_bias=True)],
                         ids=["no-gate-transposed", "post-norm", "bias", "no-gate-bias"])
def test_experts_interface_flags_float64(flags, monkeypatch):
    """Each flag of transformers' experts interface (no gate: the activation alone; the post-expert
    norm; biases; [E, in, out] weights) computed as transformers' batched_mm implementation does."""
    chain = _experts_chain(flags)
    patched = copy.deepcopy(chain)
    assert peft_kernels.patch_peft_model(patched).patched == ["", "base_layer"]
    x = torch.randn(11, 20, dtype=torch.float64)
    index, weights = _routing(11, 6, 2, torch.float64)
    ref = _chain_step(chain, x, index, weights)
    _no_peft_expert_stack(monkeypatch)
    got = _chain_step(patched, x, index, weights)
    assert len(got) == len(ref) == 6
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) <= 1e-12, i


def test_trainable_expert_weights_too():
    """Expert weights left trainable (LoRA beside full fine-tuning of the experts): their gradients,
    biases' and the adapters' equal PEFT's (whose dW' flows to W and to A, B)."""
    chain = _experts_chain(dict(has_bias=True))
    for name, p in chain.named_parameters():
        p.requires_grad_(True)
    patched = copy.deepcopy(chain)
    peft_kernels.patch_peft_model(patched)
    x = torch.randn(11, 20, dtype=torch.float64)
    index, weights = _routing(11, 6, 2, torch.float64)
    ref, got = _chain_step(chain, x, index, weights), _chain_step(patched, x, index, weights)
    assert len(got) == len(ref) == 10
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) <= 1e-12, i


def test_keyword_routing_and_no_tokens():
    """A call naming the routing arguments (any names the experts' forward gives them) equals the
    positional one; zero tokens give [0, H] and a backward."""
    chain = _experts_chain({})
    patched = copy.deepcopy(chain)
    peft_kernels.patch_peft_model(patched)
    x = torch.randn(7, 20, dtype=torch.float64)
    index, weights = _routing(7, 6, 3, torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        _no_peft_expert_stack(mp)
        y = patched(x, index, weights)
        assert torch.equal(patched(x, top_k_index=index, top_k_weights=weights), y)
        assert torch.equal(patched(x, index, top_k_weights=weights), y)
    assert rel_err(y, chain(x, index, weights)) <= 1e-12
    x0 = torch.randn(0, 20, dtype=torch.float64, requires_grad=True)
    y0 = patched(x0, index[:0], weights[:0])
    assert y0.shape == (0, 20)
    y0.sum().backward()
    assert x0.grad.shape == (0, 20)


def _count_grouped_mm(monkeypatch):
    calls = []
    real = F.grouped_mm

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", counted)
    return calls


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without nn.functional.grouped_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("aligned", [True, False], ids=["grouped_mm", "loop"])
def test_grouped_and_looped_products_low_precision(dtype, aligned, monkeypatch):
    """fp32 / bf16 against a float64 oracle, within 2x PEFT's own error in that dtype (flash-attention's
    idiom): 16-byte-aligned widths run every product as torch's grouped_mm (rank 3 padded with zero
    rows to stay aligned), odd widths loop over the experts."""
    hidden, inner = (32, 24) if aligned else (18, 13)
    chain = _experts_chain({}, dtype=dtype, hidden=hidden, inner=inner, experts=7)
    oracle = copy.deepcopy(chain).double()
    patched = copy.deepcopy(chain)
    peft_kernels.patch_peft_model(patched)
    x = torch.randn(33, hidden, dtype=torch.float64)
    index, weights = _routing(33, 7, 2, torch.float64)
    ref = _chain_step(oracle, x, index, weights)
    eager = _chain_step(chain, x.to(dtype), index, weights.to(dtype))
    calls = _count_grouped_mm(monkeypatch)
    _no_peft_expert_stack(monkeypatch)
    ours = _chain_step(patched, x.to(dtype), index, weights.to(dtype))
    # forward: 2 projections x (base + 2 LoRA products); backward: per projection dX through the frozen W,
    # dX and dW of each LoRA product — and no dW of a frozen expert weight (the 2-D x 2-D weight-gradient form)
    assert len(calls) == (16 if aligned else 0), calls
    assert sum(len(shape) == 2 for shape in calls) == (4 if aligned else 0), calls
    for i, (k, e, r) in enumerate(zip(ours, eager, ref)):
        assert k.dtype == e.dtype == dtype and k.shape == e.shape, i
        err_k, err_e = rel_err(k, r), rel_err(e, r)
        assert err_k <= max(2 * err_e, FLOOR[dtype]), f"[{i}] patched {err_k:.3e}, PEFT {err_e:.3e}"


def test_fp32_adapters_over_bf16_experts():
    """get_peft_model's default keeps the adapters in fp32 over a bf16 model: PEFT casts the factors to
    the weight's dtype for its stack, the patch for its products; gradients come back in fp32, within
    2x PEFT's error against the float64 oracle."""
    chain = _experts_chain({}, dtype=torch.bfloat16, hidden=32, inner=24)
    for name, p in chain.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    oracle = copy.deepcopy(chain).double()
    patched = copy.deepcopy(chain)
    peft_kernels.patch_peft_model(patched)
    x = torch.randn(21, 32, dtype=torch.float64)
    index, weights = _routing(21, 6, 3, torch.float64)
    ref = _chain_step(oracle, x, index, weights)
    eager = _chain_step(chain, x.to(torch.bfloat16), index, weights.to(torch.bfloat16))
    ours = _chain_step(patched, x.to(torch.bfloat16), index, weights.to(torch.bfloat16))
    assert [t.dtype for t in ours] == [t.dtype for t in eager] == [torch.bfloat16] * 2 + [torch.float32] * 4
    for i, (k, e, r) in enumerate(zip(ours, eager, ref)):
        assert rel_err(k, r) <= max(2 * rel_err(e, r), FLOOR[torch.bfloat16]), i


def test_patched_chain_compiles_fullgraph():
    """torch.compile(fullgraph=True) of a patched chain in bf16 (grouped_mm, rank 3 padded): output,
    dX and every adapter gradient within 2x PEFT's bf16 error against the float64 oracle."""
    chain = _experts_chain({}, dtype=torch.bfloat16, hidden=32, inner=24)
    oracle = copy.deepcopy(chain).double()
    patched = copy.deepcopy(chain)
    peft_kernels.patch_peft_model(patched)
    compiled = torch.compile(patched, fullgraph=True)
    x = torch.randn(19, 32, dtype=torch.float64)
    index, weights = _routing(19, 6, 2, torch.float64)
    ref = _chain_step(oracle, x, index, weights)
    eager = _chain_step(chain, x.to(torch.bfloat16), index, weights.to(torch.bfloat16))
    ours = _chain_step(compiled, x.to(torch.bfloat16), index, weights.to(torch.bfloat16))
    for i, (k, e, r) in enumerate(zip(ours, eager, ref)):
        assert k.dtype == torch.bfloat16 and rel_err(k, r) <= max(2 * rel_err(e, r), FLOOR[torch.bfloat16]), i


def test_states_unpatch_copy_and_save():
    """Adapters disabled, merged (PEFT's forward: the merged weights), unpatched; a deep copy computes
    with its own weights; torch.save round trip."""
    model = _moe_model("mixtral")
    patched = copy.deepcopy(model)
    peft_kernels.patch_peft_model(patched)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert rel_err(patched(input_ids=ids).logits, want) <= 1e-12
        with model.disable_adapter(), patched.disable_adapter():
            base = model(input_ids=ids).logits
            assert torch.equal(patched(input_ids=ids).logits, base)
        assert rel_err(base, want) > 1e-3, "the adapters change the output"
        patched.base_model.merge_adapter()
        assert rel_err(patched(input_ids=ids).logits, want) <= 1e-10
        patched.base_model.unmerge_adapter()
        twin = copy.deepcopy(patched)
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(0.1)
        assert rel_err(patched(input_ids=ids).logits, want) <= 1e-12
        assert rel_err(twin(input_ids=ids).logits, want) > 1e-3
        buf = io.BytesIO()
        torch.save(patched, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert rel_err(loaded(input_ids=ids).logits, want) <= 1e-12
    assert len(peft_kernels.unpatch_peft_model(patched)) == 4  # q_proj x 2 and the two chains (their outer wrappers)
    assert not any("forward" in vars(m) for m in patched.modules() if isinstance(m, ParamWrapper))


def test_call_time_changes_run_peft_and_say_so():
    """Expert parallelism switched on after patching: PEFT's forward, warned once; a mixed-adapter
    batch raises PEFT's own error."""
    chain = _experts_chain({})
    patched = copy.deepcopy(chain)
    peft_kernels.patch_peft_model(patched)
    x = torch.randn(5, 20, dtype=torch.float64)
    index, weights = _routing(5, 6, 2, torch.float64)
    with pytest.raises(ValueError, match="mixed"):
        patched(x, index, weights, adapter_names=["default"] * 5)
    patched.get_base_layer()._is_expert_parallel = True
    chain.get_base_layer()._is_expert_parallel = True
    with pytest.warns(UserWarning, match="expert-parallel"):
        y = patched(x, index, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patched(x, index, weights)  # said once
    assert torch.equal(y, chain(x, index, weights))


def test_report_leaves_other_param_wrappers_to_peft():
    """target_parameters on something that is not a transformers experts module (a Linear's 2-D weight)
    stays PEFT's, with why."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 6)

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_parameters=["proj.weight"]))
    report = peft_kernels.patch_peft_model(model)
    assert not report.patched
    (name, why), = report.skipped.items()
    assert name.endswith("proj") and "not a transformers experts module" in why
    x = torch.randn(3, 8)
    assert model(x).shape == (3, 6)


def test_one_transposed_expert_stays_peft():
    """gpt-oss with a single expert ([1, in, out] weights): PEFT treats a one-expert weight as a 2-D
    Linear's and adds B A [out, in] to [1, in, out] — an error unless in == out, transposed if equal.
    Left to PEFT, with why, rather than computing something PEFT does not."""
    model = _moe_model("gpt_oss", experts=1, top_k=1, inter=16, hidden=32)
    report = peft_kernels.patch_peft_model(model)
    assert all(n.endswith("q_proj") for n in report.patched)
    assert len(report.skipped) == 4 and all("one expert in the [E, in, out] layout" in why
                                            for why in report.skipped.values())


def test_training_steps_match_peft_with_checkpointing(monkeypatch):
    """Three AdamW steps of a Qwen3-MoE model with gradient checkpointing: every trained parameter
    equals PEFT's after them."""
    model = _moe_model("qwen3_moe")
    patched = copy.deepcopy(model)
    peft_kernels.patch_peft_model(patched)
    ids = torch.randint(0, 64, (2, 8))
    params = {}
    for m in (model, patched):
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.2x
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        params[id(m)] = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
        if m is model:
            _no_peft_expert_stack(monkeypatch)
    a, b = params[id(model)], params[id(patched)]
    assert a.keys() == b.keys() and any("experts" in n for n in a)
    for n in a:
        assert rel_err(b[n], a[n]) <= 1e-10, n


def test_backward_keeps_no_expert_stack():
    """Saved for backward: PEFT keeps W + s·B_e A_e for each targeted weight (the [E, out, in] stacks);
    patched, the frozen weights and the LoRA's thin tensors only — less than half of PEFT's here."""
    from peft_kernels.bench import harness

    chain = _experts_chain({}, dtype=torch.float32, hidden=64, inner=48, experts=16)
    patched = copy.deepcopy(chain)
    peft_kernels.patch_peft_model(patched)
    x = torch.randn(24, 64, requires_grad=True)
    index, weights = _routing(24, 16, 2, torch.float32)
    saved_peft = harness.saved_mib(lambda: chain(x, index, weights))
    saved_ours = harness.saved_mib(lambda: patched(x, index, weights))
    stacks = sum(p.numel() for n, p in chain.named_parameters() if n.endswith("_proj")) * 4 / 2**20
    assert saved_peft >= stacks, (saved_peft, stacks)
    assert saved_ours < 0.5 * saved_peft, (saved_ours, saved_peft)


@pytest.mark.gpu
def test_patched_experts_bf16_on_cuda():
    """A Qwen3-MoE-shaped experts layer on the GPU (64 experts of 1024 -> 512, top 8, 2048 tokens,
    LoRA r=16 on both weights, bf16): patched against the same chain in float64, output, dX and every
    adapter gradient within 2x the error of unpatched PEFT in bf16; every product through grouped_mm
    (no per-expert loop warning)."""
    from peft_kernels.bench.experts import experts_module, peft_experts, routing

    chain = peft_experts(experts_module(1024, 512, 64, "cuda", torch.bfloat16))
    patched = copy.deepcopy(chain)
    assert peft_kernels.patch_peft_model(patched).patched == ["", "base_layer"]
    oracle = copy.deepcopy(chain).double()
    oracle.get_base_layer().config._experts_implementation = "batched_mm"  # grouped_mm takes bf16 only
    index, weights = routing(2048, 64, 8, "cuda", torch.bfloat16)
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.float64)
    dy = torch.randn(2048, 1024, device="cuda", dtype=torch.float64)

    def run(module, dtype):
        module.zero_grad(set_to_none=True)
        xi = x.to(dtype).requires_grad_()
        y = module(xi, index, weights.to(dtype))
        y.backward(dy.to(dtype))
        return [y.detach(), xi.grad] + [p.grad for _, p in sorted(module.named_parameters()) if p.requires_grad]

    ref, eager = run(oracle, torch.float64), run(chain, torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = run(patched, torch.bfloat16)
    assert not [w for w in caught if "expert by expert" in str(w.message)], "a product looped over the experts"
    assert len(ours) == len(ref) == 6
    for i, (k, e, r) in enumerate(zip(ours, eager, ref)):
        err_k, err_e = rel_err(k, r), rel_err(e, r)
        assert err_k <= max(2 * err_e, FLOOR[torch.bfloat16]), f"[{i}] patched {err_k:.3e}, PEFT bf16 {err_e:.3e}"


@pytest.mark.parametrize("seed", range(8))
def test_random_moe_configs_match_peft(seed, monkeypatch):
    """Random models (kind, experts implementation, expert count down to 1, top-k, widths down to 1,
    which weights are targeted) under one to three adapters of random rank / alpha / rsLoRA with a
    random active set: logits and every gradient equal PEFT's in float64."""
    import random

    rnd = random.Random(seed)
    kind = rnd.choice(sorted(_MODELS))
    experts = rnd.randint(2 if kind == "gpt_oss" else 1, 7)  # one transposed expert: PEFT's own (above)
    targets = rnd.choice([BOTH[:1], BOTH[1:], BOTH])
    model = _moe_model(kind, rnd.choice(["eager", "batched_mm"]), targets=targets, experts=experts,
                       top_k=rnd.randint(1, experts), hidden=rnd.choice([16, 24]), inter=rnd.randint(1, 20))
    for i in range(rnd.randint(0, 2)):
        model.add_adapter(f"extra{i}", peft.LoraConfig(r=rnd.randint(1, 6), lora_alpha=rnd.randint(1, 9),
                                                       use_rslora=rnd.random() < 0.5, target_modules=["v_proj"],
                                                       target_parameters=targets, init_lora_weights=False))
    names = list(model.peft_config)
    model.base_model.set_adapter(rnd.sample(names, rnd.randint(1, len(names))))
    for p in model.parameters():
        p.data = p.data.double()
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert not report.skipped
    ids = torch.randint(0, 64, (rnd.randint(1, 3), rnd.randint(2, 9)))  # >= 2 tokens: q_proj's gradient is not 0
    ref = _step(model, ids)
    _no_peft_expert_stack(monkeypatch)
    got = _step(patched, ids)
    assert rel_err(got[0], ref[0]) <= 1e-12 and got[1].keys() == ref[1].keys()
    for n in ref[1]:
        assert rel_err(got[1][n], ref[1][n]) <= 1e-11, n


def test_trainer_trains_a_patched_moe_model(tmp_path, monkeypatch):
    """transformers.Trainer on a patched Qwen3-MoE model: the loss is finite and falls, the experts'
    adapters move, and the patched experts computed every step (PEFT's expert stack never formed)."""
    from peft_kernels.integrations import peft_experts

    model = _moe_model("qwen3_moe", dtype=torch.float32)
    assert sum(n.endswith("experts") for n in peft_kernels.patch_peft_model(model).patched) == 2
    calls = []
    real = peft_experts.experts_with_lora
    monkeypatch.setattr(peft_experts, "experts_with_lora", lambda *a, **k: calls.append(1) or real(*a, **k))
    _no_peft_expert_stack(monkeypatch)
    g = torch.Generator().manual_seed(3)
    sequences = torch.randint(0, 64, (4, 10), generator=g)  # four sequences, each seen four times: learnable
    data = [{"input_ids": sequences[i % 4], "labels": sequences[i % 4]} for i in range(16)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                                          learning_rate=3e-2, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert len(calls) == 5 * 2, "two patched experts layers, five steps"
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())]
    assert any("experts" in n and "lora_A" in n for n in moved) and any("experts" in n and "lora_B" in n for n in moved)


def _ddp_steps(rank=0, world=1):
    """Three AdamW steps of a patched experts chain, this rank on its half of each batch (DDP when world > 1)."""
    chain = _experts_chain(dict(has_bias=True), dtype=torch.float32, hidden=16, inner=8, experts=4)
    peft_kernels.patch_peft_model(chain)
    net = nn.parallel.DistributedDataParallel(chain) if world > 1 else chain
    opt = torch.optim.AdamW([p for p in chain.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(12, 16, generator=g)
        index, weights = _routing(12, 4, 2, torch.float32, seed=int(torch.randint(0, 99, (1,), generator=g)))
        target = torch.randn(12, 16, generator=g)
        rows = slice(rank * 12 // world, (rank + 1) * 12 // world)
        loss = (net(x[rows], index[rows], weights[rows]) - target[rows]).square().sum() / 12 * world
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in chain.named_parameters() if p.requires_grad}


def _ddp_worker(rank, world, init_file, out_file):
    from helpers import gloo_gather_exit, gloo_init

    gloo_init(rank, world, init_file)
    gloo_gather_exit(_ddp_steps(rank, world), out_file)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_ddp_trains_patched_experts_like_one_process(tmp_path):
    """DistributedDataParallel over a patched experts chain (two gloo CPU processes, half the batch
    each): every rank's adapters after three AdamW steps equal one process's on the whole batch."""
    from helpers import gloo_spawn

    gloo_spawn(_ddp_worker, (2, str(tmp_path / "init"), str(tmp_path / "out.pt")))
    single = _ddp_steps()
    start = {n: p for n, p in _experts_chain(dict(has_bias=True), dtype=torch.float32, hidden=16, inner=8,
                                             experts=4).named_parameters() if p.requires_grad}
    assert any(not torch.equal(single[n], start[n].float()) for n in single), "it trained"
    for rank in torch.load(tmp_path / "out.pt"):
        assert rank.keys() == single.keys()
        for n in single:
            assert torch.allclose(rank[n], single[n], rtol=1e-5, atol=1e-6), n
