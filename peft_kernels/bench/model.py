"""Whole-model step (ANCHORS.md): a LLaMA-3-8B-shaped decoder, 4 layers, batch 2 x 2048 tokens,
adapters r=16 on q, k, v, o, gate, up, down; sdpa attention; loss + backward. Cases: every weight
frozen (the floor), HF PEFT LoRA (p = 0 and 0.05), DoRA (p = 0.05), QLoRA over bitsandbytes NF4
(when bnb runs here), SHiRA r=16 (k = 16·(in + out) trained entries per weight, LoRA r=16's
parameter count; when peft has it), LoRA with 16 trainable tokens (trainable_token_indices: 16
rows of the untied embedding table trained, ids of the batch) and LoHa r=8 (PEFT's default rank;
patched, its Hadamard product runs as LoRA of rank 64), each unpatched and patched by
peft_kernels.patch_peft_model (on a GPU, patched DoRA once more with triton's one-launch row norm
switched on: opt-in until timed). The input embeddings require grad in every case, so backward runs
through all layers even in the floor; the trainable-tokens case feeds ids instead (its embedding's
lookup and row gradient are part of what it measures).
Memory: the peak (CUDA) and, on any device, what autograd keeps for backward (harness.saved_mib).
On a GPU each step is also replayed from one CUDA graph (its device time without the host's
launches: how far the host is the limit) and its host issue time is recorded.

With --moe: a Qwen3-30B-A3B-shaped MoE decoder instead (4 layers of 128 experts, 2048 -> 768, top 8;
batch 2 x 2048), LoRA r=16 on q, k, v, o and, through PEFT's target_parameters, on every layer's
experts' gate_up_proj and down_proj; cases: the floor, HF PEFT and patched (PEFT forbids dropout
on target_parameters: p = 0).

    python benchmarks/bench_model.py --out benchmarks/results/model_h100.json
    python benchmarks/bench_model.py --moe --out benchmarks/results/model_moe_h100.json
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from . import harness
from .dora import _with_norm_kernel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPU_CFG = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
               num_attention_heads=32, num_key_value_heads=8, batch=2, seq=2048)
CPU_CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, batch=2, seq=32)
# --moe: a Qwen3-30B-A3B-shaped decoder (the MoE case of #7's whole-model step)
MOE_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MOE_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
GPU_MOE_CFG = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                   num_experts=128, num_experts_per_tok=8, num_hidden_layers=4, num_attention_heads=32,
                   num_key_value_heads=4, head_dim=128, batch=2, seq=2048)
CPU_MOE_CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_experts=8,
                   num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, batch=2, seq=32)


def _base(cfg, device, dtype):
    """The frozen decoder: LLaMA-shaped, or Qwen3-MoE-shaped when cfg names experts (--moe)."""
    import transformers

    torch.manual_seed(0)
    model_cfg = {k: v for k, v in cfg.items() if k not in ("batch", "seq")}
    config_class, model_class = ((transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM) if "num_experts" in cfg
                                 else (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    model = model_class(config_class(**model_cfg, max_position_embeddings=max(4096, cfg["seq"]),
                                     attn_implementation="sdpa")).to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _to_bnb_nf4(model, dtype):
    """Replace the targeted Linears by bitsandbytes NF4 Linear4bit (quantized on the GPU)."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in TARGETS:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None, compute_dtype=dtype,
                                  quant_type="nf4", device="cpu")
            q.weight = bnb.nn.Params4bit(mod.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, q.to(mod.weight.device))
    return model


def _adapted(base, method, p, patched, dtype, token_ids=None):
    import peft

    model = copy.deepcopy(base)
    if method == "qlora":
        model = _to_bnb_nf4(model, dtype)
    if method == "shira":
        cfg = peft.ShiraConfig(r=16, target_modules=TARGETS, random_seed=0)
    elif method == "loha":  # r=8: PEFT's default; the Hadamard product is LoRA of rank 64 patched
        cfg = peft.LoHaConfig(r=8, alpha=16, target_modules=TARGETS, init_weights=False)
    elif method == "moe-lora":  # the MoE model: attention and every layer's experts (target_parameters)
        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=MOE_ATTENTION, target_parameters=MOE_EXPERTS)
    else:
        cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=p, target_modules=TARGETS, use_dora=method == "dora",
                              trainable_token_indices=token_ids if method == "lora+tokens" else None)
    model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False)
    for n, prm in model.named_parameters():
        if prm.requires_grad:
            prm.data = prm.data.to(dtype)
            if "lora_B" in n or "shira_weight" in n:
                torch.nn.init.normal_(prm, std=0.02 if "lora_B" in n else 1e-3)  # trained, not PEFT's zeros
            if "trainable_tokens_delta" in n:
                prm.data.add_(torch.randn_like(prm) * 1e-3)
    if patched:
        from .. import patch_peft_model

        report = patch_peft_model(model)
        if report.skipped:
            print(f"\n  ({len(report.skipped)} layers left unpatched: {next(iter(report.skipped.values()))})",
                  file=sys.stderr)
    return model


def _has_shira() -> bool:
    try:
        import peft
    except ImportError:
        return False
    return hasattr(peft, "ShiraConfig")  # peft >= 0.17


NORM_KERNEL_LABEL = "one-launch norm"


def run(cfg, device, dtype, reps, methods):
    ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    base = _base(cfg, device, dtype)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
    token_ids = sorted(set(ids[0].tolist()))[:16]  # trainable tokens that the batch reads
    plan = [("all weights frozen (floor)", None, 0.0, False)]
    for method, p in methods:
        for patched in (False, True):
            who = "peft_kernels (patched PEFT)" if patched else "HF PEFT"
            plan.append((f"{who} {method} p={p:g}", method, p, patched))
    if device.type == "cuda" and ("dora", 0.05) in methods:  # triton's one-launch DoRA row norm, opt-in until timed
        plan.append((f"peft_kernels (patched PEFT) dora p=0.05, {NORM_KERNEL_LABEL}", "dora", 0.05, True))
    rows, floor, floor_graphed = [], None, None
    prog = harness.Progress(len(plan), "model")
    for label, method, p, patched in plan:
        prog.step(label)
        try:
            model = base if method is None else _adapted(base, method, p, patched, dtype, token_ids)
        except Exception as exc:  # e.g. bitsandbytes without a GPU: recorded, not hidden
            print(f"\n  ({label} skipped: {type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
            continue
        model.train()
        x = embeds.detach().clone().requires_grad_()
        inputs = {"input_ids": ids} if method == "lora+tokens" else {"inputs_embeds": x}

        def step():
            x.grad = None
            model.zero_grad(set_to_none=True)
            model(**inputs, labels=ids).loss.backward()
        if label.endswith(NORM_KERNEL_LABEL):
            step = _with_norm_kernel(step)

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        ms = harness.time_ms(step, device, warmup=3 if device.type == "cuda" else 1, reps=reps)
        # the same step replayed from one CUDA graph: its device time, without the host's launches
        # (None on CPU, or with the reason printed when something in the step cannot be captured)
        graphed = harness.time_ms_graphed(step, device, reps)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        # host time to issue one step from an idle device: near the step time, the step is host-bound
        # (benchmarks/NOTES.md, 2026-11-24: patched QLoRA issued 88 ms of work for a 93 ms step)
        host = harness.host_us(step, n=5, warmup=1) / 1e3 if device.type == "cuda" else None
        saved = harness.saved_mib(lambda: model(**inputs, labels=ids).loss)  # activations kept for bwd
        if method is None:
            floor, floor_graphed = ms, graphed
        rows.append({"case": label, "ms": ms, "ratio": ms / floor, "host_issue_ms": host, "peak_gib": peak,
                     "saved_mib": saved, "graphed_ms": graphed,
                     "graphed_ratio": graphed / floor_graphed if graphed and floor_graphed else None})
        if model is not base:
            del model
    targets = MOE_ATTENTION + MOE_EXPERTS if "num_experts" in cfg else TARGETS
    return {"env": harness.environment(device), "benchmark": "whole-model step",
            "config": {**cfg, "dtype": str(dtype), "r": 16, "alpha": 32, "targets": targets, "reps": reps,
                       "timing": "median of reps, CUDA events" if device.type == "cuda" else "median wall clock (CPU)",
                       "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")},
            "results": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_model", description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=harness.device_arg, default=harness.default_device())
    ap.add_argument("--layers", type=harness.positive_int, default=None, help="decoder layers (default: 4 on a GPU)")
    ap.add_argument("--reps", type=harness.positive_int, default=None, help="timed steps (median)")
    ap.add_argument("--no-qlora", action="store_true", help="skip the QLoRA (NF4) case")
    ap.add_argument("--moe", action="store_true",
                    help="a Qwen3-MoE-shaped model, LoRA on attention and on its experts' weights (target_parameters)")
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    device = args.device
    gpu = device.type == "cuda"
    cfg = dict((GPU_MOE_CFG if gpu else CPU_MOE_CFG) if args.moe else (GPU_CFG if gpu else CPU_CFG))
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    if not gpu:
        print(f"No CUDA device: a tiny {'Qwen3-MoE' if args.moe else 'LLaMA'}-shaped model on CPU (fp32); these are "
              "CPU figures.", file=sys.stderr)
    if args.moe:
        methods = [("moe-lora", 0.0)]
    else:
        methods = [("lora", 0.0), ("lora", 0.05), ("dora", 0.05)] + ([] if args.no_qlora or not gpu else [("qlora", 0.05)])
        if _has_shira():
            methods.append(("shira", 0.0))
        methods.append(("lora+tokens", 0.0))
        methods.append(("loha", 0.0))
    payload = run(cfg, device, torch.bfloat16 if gpu else torch.float32, args.reps or (10 if gpu else 2), methods)
    title = f"{payload['env']['device']} — torch {payload['env']['torch']}"
    table = harness.markdown_table(["case", "step ms", "/ floor", "graphed / floor", "host issue ms", "peak GiB",
                                    "saved for bwd MiB"],
                                   [[r["case"], r["ms"], f"{r['ratio']:.2f}x",
                                     None if r["graphed_ratio"] is None else f"{r['graphed_ratio']:.2f}x",
                                     r["host_issue_ms"],
                                     None if r["peak_gib"] is None else round(r["peak_gib"], 2), r["saved_mib"]]
                                    for r in payload["results"]])
    print(f"\n{title}")
    print(table)
    if args.out:
        harness.write_report(args.out, payload, f"**whole-model training step** — {title}", table)
    return 0
