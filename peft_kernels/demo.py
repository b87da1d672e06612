"""`peft-kernels demo`: fine-tune a small LLaMA-shaped model on a bundled text (no download),
printing loss, tokens/s and peak memory as it goes; ``--compare-peft`` runs HF PEFT beside it.

The model is a transformers LlamaForCausalLM with a small random-initialised config and a
byte-level vocabulary (256 tokens: no tokenizer needed); the base weights are frozen and only
the adapters train, so the loss falls as the adapters fit the text.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import resource
import sys
import time
from importlib import resources

import torch

from . import apply_lora, apply_sparse
from .bench import harness
from .sparse import SparseAdamW
from .sparse.masking import set_submodule

METHODS = ("lora", "qlora", "dora", "sparse")
SPARSE_DENSITY = 0.01


def _text_tokens(device) -> torch.Tensor:
    text = resources.files("peft_kernels").joinpath("data/demo.txt").read_bytes()
    return torch.tensor(list(text), dtype=torch.long, device=device)


def _model(hidden, layers, device, dtype):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise SystemExit("peft-kernels demo needs transformers: pip install 'peft_kernels[hf]'") from None
    torch.manual_seed(0)
    # sizes in multiples of 64 (LLaMA's are of 256): bitsandbytes' native CPU 4-bit kernels (0.50)
    # decode a weight whose in_features is not a multiple of the blocksize wrongly (blocks taken
    # per row, the format's are flat), which would spoil --compare-peft qlora on CPU
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), max_position_embeddings=1024,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _with_adapters(base, method, engine, r, alpha, dropout):
    model = copy.deepcopy(base)
    if method == "sparse":
        apply_sparse(model, TARGETS, density=SPARSE_DENSITY)
        if engine != "peft_kernels":  # the usual way: dense trainable weights, gradient x mask
            _to_dense_grad_masking(model)
        return model
    if engine == "peft_kernels":
        kwargs = {"quantize": "nf4"} if method == "qlora" else {"use_dora": method == "dora"}
        return apply_lora(model, TARGETS, r=r, alpha=alpha, dropout=dropout, **kwargs)
    import peft

    if method == "qlora":
        _to_bnb_nf4(model, TARGETS)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS,
                          use_dora=method == "dora")
    return peft.get_peft_model(model, cfg, autocast_adapter_dtype=False)


def _to_bnb_nf4(model, targets):
    """QLoRA the usual way: each targeted nn.Linear becomes a bitsandbytes Linear4bit holding the
    NF4 bytes apply_lora(quantize="nf4") computes from the same weight (NF4Weight.to_bnb, no
    re-quantization), so both engines train over the same frozen 4-bit base."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit("--compare-peft with qlora needs bitsandbytes (pip install bitsandbytes)")
    from .apply import target_matches
    from .quant import NF4Weight

    for name, lin in list(model.named_modules()):
        if isinstance(lin, torch.nn.Linear) and target_matches(name, targets):
            set_submodule(model, name, NF4Weight.from_float(lin.weight.detach()).to_bnb_linear(lin.bias))


def _to_dense_grad_masking(model):
    """Put the same masks back as dense-gradient masking: each SparseDeltaLinear becomes an
    nn.Linear with a trainable weight whose full gradient is multiplied by the mask."""
    from .nn.sparse import SparseDeltaLinear
    from .sparse import layout

    for name, mod in list(model.named_modules()):
        if isinstance(mod, SparseDeltaLinear):
            lin = mod.to_linear()
            mask = torch.zeros(lin.weight.numel(), dtype=lin.weight.dtype, device=lin.weight.device)
            mask[layout.element_positions(mod.delta_index, tuple(lin.weight.shape), mod.block)] = 1
            lin.weight.requires_grad_(True)
            lin.weight.register_hook(lambda g, m=mask.view_as(lin.weight): g * m)
            lin.weight.masked_entries = mod.num_trainable
            if lin.bias is not None:
                lin.bias.requires_grad_(False)
            set_submodule(model, name, lin)


def _peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS, MiB


def train(model, tokens, steps, batch, seq, lr, device, label, log_every, sparse_optimizer=False):
    params = [p for p in model.parameters() if p.requires_grad]
    # weight_decay 0: dense-grad masking would otherwise decay every entry of its weights
    opt = SparseAdamW(model, lr=lr, weight_decay=0.0) if sparse_optimizer else torch.optim.AdamW(
        params, lr=lr, weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    losses, t0, n_tok = [], None, 0
    for step in range(1, steps + 1):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
        ids = torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])
        loss = model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 2:  # first steps include compilation / allocator warm-up
            t0, n_tok = time.perf_counter(), 0
        elif t0 is not None:
            n_tok += batch * seq
        if step % log_every == 0 or step == steps:
            tps = n_tok / (time.perf_counter() - t0) if t0 and n_tok else float("nan")
            print(f"  {label:<14} step {step:4d}  loss {loss.item():.4f}  {tps:10.0f} tok/s  "
                  f"peak {_peak_mib(device):8.1f} MiB", flush=True)
    elapsed = time.perf_counter() - t0 if t0 else float("nan")
    return {"label": label, "first_loss": losses[0], "last_loss": losses[-1],
            "tokens_per_s": n_tok / elapsed if n_tok else None, "peak_mib": _peak_mib(device),
            "trainable_params": _trainable(model)}


def _trainable(model) -> int:
    """Trained values: a dense-grad-masked weight counts only its masked entries."""
    return sum(getattr(p, "masked_entries", p.numel()) for p in model.parameters() if p.requires_grad)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="peft-kernels demo", description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=METHODS, default="lora")
    ap.add_argument("--steps", type=harness.positive_int, default=None, help="optimizer steps (default 60 GPU, 30 CPU)")
    ap.add_argument("--compare-peft", action="store_true",
                    help="also run the same with HF PEFT (qlora: over bitsandbytes Linear4bit with the same NF4 "
                         "bytes; sparse: with dense-gradient masking)")
    ap.add_argument("--device", type=harness.device_arg, default=harness.default_device())
    ap.add_argument("--r", type=harness.positive_int, default=16, help="LoRA rank")
    ap.add_argument("--lr", type=harness.positive_float, default=3e-3, help="learning rate")
    args = ap.parse_args(argv)
    device = args.device
    gpu = device.type == "cuda"
    hidden, layers, batch, seq = (1024, 4, 8, 512) if gpu else (128, 2, 4, 64)
    steps = args.steps or (60 if gpu else 30)
    dtype = torch.bfloat16 if gpu else torch.float32
    what = f"sparse {100 * SPARSE_DENSITY:g}%" if args.method == "sparse" else f"{args.method} r={args.r}"
    print(f"demo: {what} on a LLaMA-shaped model (hidden {hidden}, {layers} layers, byte vocab) "
          f"— {device} {dtype}, batch {batch}x{seq}, {steps} steps"
          + ("" if gpu else " (CPU: small sizes; figures are CPU ones)"), flush=True)
    tokens = _text_tokens(device)
    base = _model(hidden, layers, device, dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    runs = []
    other = "dense-grad masking" if args.method == "sparse" else "HF PEFT"
    engines = ["peft_kernels"] + ([other] if args.compare_peft else [])
    for engine in engines:
        model = _with_adapters(base, args.method, engine, args.r, 2 * args.r, 0.05)
        runs.append(train(model, tokens, steps, batch, seq, args.lr, device, engine, max(1, steps // 6),
                          sparse_optimizer=args.method == "sparse" and engine == "peft_kernels"))
        del model
    rows = [[r["label"], r["trainable_params"], r["first_loss"], r["last_loss"], r["tokens_per_s"], r["peak_mib"]]
            for r in runs]
    print()
    mem = "peak MiB" if gpu else "process peak RSS MiB (cumulative: not comparable across rows)"
    print(harness.markdown_table(["engine", "trainable", "first loss", "last loss", "tokens/s", mem], rows))
    if runs[0]["last_loss"] >= runs[0]["first_loss"]:
        print("warning: the loss did not fall; try more --steps or a larger --lr", file=sys.stderr)
    return runs
