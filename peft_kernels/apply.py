"""apply_lora / apply_sparse: put adapters (LoRA, QLoRA, DoRA) or sparse deltas on the nn.Linear
modules of any model, PEFT-style."""
from __future__ import annotations

import contextlib
import re
import warnings

import torch
from torch import nn

from .nn._adapter import LoRAAdapter, features, is_conv1d, linear_holding
from .nn.branch import LoRABranchLinear, has_module_hooks, needs_branch
from .nn.dora import DoRALinear
from .nn.lora import LoRALinear
from .nn.qlora import IntQDoRALinear, IntQLoRALinear, QDoRALinear, QLoRALinear
from .nn.sparse import SparseDeltaLinear
from .nn.sparse_embedding import SparseDeltaEmbedding, TiedRowsHead, unsupported_embedding
from .ops import _checks
from .quant.bnb4bit import bnb_linear4bit_class, is_bnb_linear4bit
from .quant.int8 import Int8Weight, is_bnb_linear8bit
from .sparse import layout
from .sparse.masking import is_tied, parameter_names, set_submodule


ALL_LINEAR_SKIPS = ("lm_head", "output", "classifier", "score")  # output layers and heads, by name


def target_matches(name: str, target_modules) -> bool:
    """PEFT's target_modules rule: a string is a full-match regex on the module's name; a list
    matches a name equal to an entry or ending in "." + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def pattern_matches(key: str, name: str) -> bool:
    """HF PEFT's rank_pattern / alpha_pattern rule (peft.utils.other.get_pattern_key): ``key`` is a
    regex matching the whole module ``name`` or its end after a "."."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def pattern_value(pattern: dict | None, name: str, default):
    """The value of the first key of ``pattern`` matching module ``name`` (PEFT's rule), else default."""
    return next((v for k, v in (pattern or {}).items() if pattern_matches(k, name)), default)


def unsupported_linear(op: str, parent: nn.Module, module: nn.Module) -> str | None:
    """Why ``op`` cannot replace this nn.Linear (None if it can): only a layer computing nn.Linear's
    forward, called as a module, keeps its meaning when swapped for an adapter layer (and
    bitsandbytes' 4/8-bit layers, whose bytes apply_lora reads)."""
    replaced = is_bnb_linear4bit(module) or is_bnb_linear8bit(module) or is_conv1d(module)
    if replaced and (has_module_hooks(module) or "forward" in vars(module)):
        # apply_lora replaces these layers whole (no LoRABranchLinear over them): their hooks (an
        # accelerate offloading hook among them) would be dropped without a word
        return (f"hooks are registered on this {type(module).__name__} or its forward is replaced on the instance "
                "(accelerate's hooks): replacing it would drop them")
    if is_bnb_linear4bit(module) or is_bnb_linear8bit(module):
        return None if op == "apply_lora" else "a bitsandbytes quantized layer (sparse deltas need a full-precision base)"
    if is_conv1d(module):
        return None if _checks.plain_tensor(module.weight) else \
            f"its weight is a {type(module.weight).__name__} (a tensor subclass), which the kernels cannot read"
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its weight directly: an adapter there would never run"
    why = needs_branch(module)
    if why is not None and op != "apply_lora":  # apply_lora puts a LoRABranchLinear beside such a base
        return why + (": sparse deltas need a full-precision base" if not _checks.plain_tensor(module.weight) else "")
    return None


def _targets(op: str, model: nn.Module, target_modules):
    """(name, parent, attribute, nn.Linear or Conv1D) of every targeted linear layer (PEFT's rule:
    nn.Linear and transformers' Conv1D). A targeted subclass that cannot be replaced faithfully is
    an error; "all-linear" leaves it out, with a warning."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    if target_modules == "all-linear":
        # PEFT's rule: not the output layer (an HF model's get_output_embeddings(), else by name) nor
        # a classification head
        get_output = getattr(model, "get_output_embeddings", None)
        output = get_output() if callable(get_output) else None
        chosen = [n for n in names if n.split(".")[-1] not in ALL_LINEAR_SKIPS
                  and (output is None or model.get_submodule(n) is not output)]
    else:
        chosen = [n for n in names if target_matches(n, target_modules)]
    # HF PEFT's LoRA layers hold nn.Linear modules of their own (base_layer, lora_A / lora_B):
    # adapters there would be adapters on adapters. So does a LoRABranchLinear (its base_layer),
    # which is an adapter already: its insides are not targets.
    peft_layers = [n for n, m in model.named_modules() if n and hasattr(m, "base_layer") and hasattr(m, "lora_A")
                   and not isinstance(m, LoRAAdapter)]
    ours = [n for n, m in model.named_modules() if n and isinstance(m, LoRAAdapter)]
    chosen = [n for n in chosen if not any(n.startswith(o + ".") for o in ours)]
    out, refused = [], []
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        owner = next((n for n in peft_layers if name.startswith(n + ".")), None)
        reason = (f"inside HF PEFT's LoRA layer {owner}: use peft_kernels.patch_peft_model on PEFT models"
                  if owner is not None else unsupported_linear(op, parent, module))
        if reason is None:
            out.append((name, parent, child, module))
        else:
            refused.append(f"{name} ({reason})")
    if refused and target_modules != "all-linear":
        raise ValueError(f"{op}: cannot replace {refused[:5]}")
    if refused:
        warnings.warn(f"{op}: all-linear leaves out {refused[:5]}{' ...' if len(refused) > 5 else ''}", stacklevel=3)
    if not out:
        adapted = [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                   if isinstance(m, (LoRAAdapter, SparseDeltaLinear))
                   and (target_modules == "all-linear" or target_matches(n, target_modules))]
        hint = f"; already adapted: {adapted[:5]}" if adapted else ""
        if isinstance(target_modules, str) and target_modules != "all-linear" and any(
                n.endswith("." + target_modules) for n in names):
            hint += (f"; a string is a full-match regex on the whole name (PEFT's rule): for every layer named "
                     f"{target_modules!r} pass [{target_modules!r}]")
        raise ValueError(f"{op}: no nn.Linear / Conv1D matches target_modules={target_modules!r}; "
                         f"linear modules are: {names[:20]}{' ...' if len(names) > 20 else ''}{hint}")
    return out


def apply_sparse(model: nn.Module, target_modules, density: float | None = 0.01, num_params=None,
                 mask="random", block=None, seed: int = 0, backend: str = "auto") -> nn.Module:
    """Replace the targeted nn.Linear modules (as in apply_lora) with SparseDeltaLinear: each
    trains ``density`` of its weight entries (or ``num_params``: a count, or a callable(linear) ->
    count per layer, e.g. ``lambda lin: 4 * (lin.in_features + lin.out_features)`` — PEFT SHiRA's
    size for r = 4, which save_adapter needs; ``mask`` and ``block`` as in
    SparseDeltaLinear.from_linear; layer i's random mask uses seed + i). Everything else is
    frozen. Returns ``model``, modified in place; train it with peft_kernels.sparse.SparseAdamW.
    GPT-2's transformers Conv1D layers are targets too: the layer holds their weight transposed
    ([out, in], a copy; masks and scores in that orientation) and merge_and_unload gives a Conv1D back.
    A targeted layer whose weight is tied to another module's (an LM head sharing the input
    embedding) gets its delta merged around each product, never into the shared weight
    (merge_in_place=False): the delta belongs to this layer only, as a LoRA adapter would."""
    targets = _targets("apply_sparse", model, target_modules)
    names = parameter_names(model)
    tied_conv1d = [n for n, _, _, linear in targets if is_conv1d(linear) and is_tied(names, linear.weight)]
    if tied_conv1d:
        raise ValueError(f"apply_sparse: {tied_conv1d[:3]} are Conv1D layers whose weight other modules share: "
                         "the layer would hold a transposed copy of it (untie the weights first)")
    new = []
    with requires_grad_restored_on_error(model):
        for i, (name, _, _, linear) in enumerate(targets):
            try:
                count = num_params(linear) if callable(num_params) else num_params
                new.append(SparseDeltaLinear.from_linear(linear, density=density, num_params=count, mask=mask,
                                                         block=block, seed=seed + i, backend=backend,
                                                         merge_in_place=not is_tied(names, linear.weight)))
            except ValueError as exc:  # e.g. num_params larger than this layer: say which layer
                raise ValueError(f"apply_sparse: {name} {list(features(linear))}: {exc}") from exc
    return _replace(model, targets, new)


@contextlib.contextmanager
def requires_grad_restored_on_error(model: nn.Module):
    """Put every parameter's requires_grad back if the block raises: building an adapter or sparse
    layer freezes the base weight and bias it shares, before a later layer may fail to build."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


# Set on a module that apply_lora(modules_to_save=...) trains whole; save_adapter writes it.
TRAINED_WHOLE = "peft_kernels_trained_whole"
# Set, to the bias option ("all" | "lora_only"), on a module whose bias apply_lora(bias=...) trains;
# a later call keeps that bias trainable and save_adapter writes it under PEFT's key.
TRAINED_BIAS = "peft_kernels_trained_bias"
BIAS_OPTIONS = ("none", "all", "lora_only")


def _bias_owners(model: nn.Module, new_modules, bias: str) -> list[nn.Module]:
    """The modules whose bias HF PEFT's ``bias`` option trains: "all" every parameter named bias in
    the model; "lora_only" those of the adapter layers ``new_modules`` (LoRAAdapter.bias_module)."""
    if bias == "all":
        return [model.get_submodule(n.rpartition(".")[0]) for n, p in model.named_parameters(remove_duplicate=False)
                if n.rpartition(".")[2] == "bias"]
    if bias == "lora_only":
        owners = [m.bias_module for m in new_modules if isinstance(m, LoRAAdapter)]  # not token layers
        return [m for m in owners if getattr(m, "bias", None) is not None]
    return []


def _replace(model: nn.Module, targets, new_modules, trained_whole=(), bias: str = "none") -> nn.Module:
    """Freeze ``model`` (but for the adapter / sparse-delta modules, modules trained whole and
    biases trained that an earlier call put on it, left as they are), swap the new modules in, once
    every one of them was built (under requires_grad_restored_on_error: an error while building
    leaves the model as it was), make ``trained_whole`` (modules) trainable and marked for
    save_adapter, and train the biases HF PEFT's ``bias`` option names (marked alike)."""
    kept = {id(p) for m in model.modules()
            if isinstance(m, (LoRAAdapter, SparseDeltaLinear, SparseDeltaEmbedding)) or getattr(m, TRAINED_WHOLE, False)
            for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in kept:
            p.requires_grad_(False)
    for (_, parent, child, old), module in zip(targets, new_modules):
        setattr(parent, child, module)
        if getattr(old, TRAINED_BIAS, None):  # the bias now lives in the new layer (a branch's: ``old`` itself)
            setattr(module.bias_module if isinstance(module, LoRAAdapter) else module, TRAINED_BIAS,
                    getattr(old, TRAINED_BIAS))
    for module in trained_whole:
        setattr(module, TRAINED_WHOLE, True)
        module.requires_grad_(True)
    for module in _bias_owners(model, new_modules, bias):
        setattr(module, TRAINED_BIAS, bias)
    for module in model.modules():  # building an adapter layer froze the bias it took over
        if getattr(module, TRAINED_BIAS, None) and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
    return model


def _modules_to_save(model: nn.Module, modules_to_save, targets) -> list[nn.Module]:
    """The modules ``modules_to_save`` names (PEFT's list rule), checked: each entry matches a
    module, and none is or holds a targeted layer."""
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str) or not all(isinstance(n, str) for n in modules_to_save):
        raise TypeError(f"apply_lora: modules_to_save must be a list of module names, got {modules_to_save!r}")
    found = [(n, m) for n, m in model.named_modules() if n and target_matches(n, modules_to_save)]
    unmatched = [k for k in modules_to_save if not any(target_matches(n, [k]) for n, _ in found)]
    if unmatched:
        raise ValueError(f"apply_lora: modules_to_save {unmatched} match no module of the model")
    overlap = [n for n, _ in found for t, *_ in targets if t == n or t.startswith(n + ".")]
    if overlap:
        raise ValueError(f"apply_lora: modules_to_save {sorted(set(overlap))} are or hold targeted layers")
    return [m for _, m in found]


def input_embedding_name(model: nn.Module) -> str | None:
    """The name of the model's input embedding (HF's get_input_embeddings(), else a module named
    embed_tokens): where HF PEFT puts a list of trainable_token_indices."""
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    for name, module in model.named_modules():
        if (embedding is not None and module is embedding) or (embedding is None and name.split(".")[-1] == "embed_tokens"):
            return name
    return None


def _token_targets(model: nn.Module, trainable_token_indices, modules_to_save) -> list:
    """(name, parent, attribute, nn.Embedding, sorted unique rows, tied heads) for HF PEFT's
    trainable_token_indices: a list of token ids (the input embedding's rows) or {embedding
    module name (PEFT's suffix rule): token ids}. Checked: each names an nn.Embedding whose weight
    only plain nn.Linear heads share (tied_heads: they compute with the trained rows too) and that
    modules_to_save does not train whole."""
    if trainable_token_indices is None:
        return []
    if isinstance(trainable_token_indices, dict):
        wanted = dict(trainable_token_indices)
    else:
        name = input_embedding_name(model)
        if name is None:
            raise ValueError("apply_lora: trainable_token_indices as a list needs an input embedding "
                             "(get_input_embeddings() or a module named embed_tokens); give {name: ids}")
        wanted = {name: trainable_token_indices}
    tied = parameter_names(model)
    out = []
    for key, ids in wanted.items():
        found = [(n, m) for n, m in model.named_modules() if n and target_matches(n, [key])]
        if len(found) != 1 or not isinstance(found[0][1], nn.Embedding):
            raise ValueError(f"apply_lora: trainable_token_indices {key!r} must name one nn.Embedding, found "
                             f"{[(n, type(m).__name__) for n, m in found][:3]}")
        name, embedding = found[0]
        heads = tied_heads(model, name, embedding) if is_tied(tied, embedding.weight) else []
        why = unsupported_embedding(embedding) or (
            "its weight is shared with a module other than a plain nn.Linear head" if heads is None else None) or (
            "modules_to_save trains it whole" if modules_to_save and target_matches(name, modules_to_save) else None)
        if why is not None:
            raise ValueError(f"apply_lora: trainable_token_indices on {name}: {why}")
        rows = sorted({int(i) for i in ids})
        if not rows or len(rows) != len(ids) or rows[0] < 0 or rows[-1] >= embedding.num_embeddings:
            raise ValueError(f"apply_lora: trainable_token_indices for {name} must be distinct ids in "
                             f"[0, {embedding.num_embeddings}), got {list(ids)[:10]}")
        parent_name, _, child = name.rpartition(".")
        out.append((name, model.get_submodule(parent_name) if parent_name else model, child, embedding, rows, heads))
    return out


def tied_heads(model: nn.Module, name: str, embedding: nn.Embedding) -> list | None:
    """(name, parent, attribute, nn.Linear) of the heads sharing ``embedding``'s weight (tied
    embeddings), or None if another kind of module shares it."""
    heads = []
    for other_name, module in model.named_modules():
        if other_name == name or module is embedding or getattr(module, "weight", None) is not embedding.weight:
            continue
        if type(module) is not nn.Linear or has_module_hooks(module) or "forward" in vars(module):
            return None
        parent_name, _, child = other_name.rpartition(".")
        heads.append((other_name, model.get_submodule(parent_name) if parent_name else model, child, module))
    return heads


def token_rows_layers(token_targets: list, backend: str) -> tuple[list, list]:
    """(places, layers) for _replace from _token_targets' entries: a SparseDeltaEmbedding over the rows
    of each embedding, and a TiedRowsHead for each head tied to it."""
    places, layers = [], []
    for name, parent, child, embedding, rows, heads in token_targets:
        layer = token_rows_layer(embedding, rows, backend)
        places.append((name, parent, child, embedding))
        layers.append(layer)
        for head in heads:  # a head tied to the table computes with the same trained rows
            places.append(head)
            layers.append(TiedRowsHead(head[3], layer, backend))
    return places, layers


def token_rows_layer(embedding: nn.Embedding, rows: list, backend: str) -> SparseDeltaEmbedding:
    """A SparseDeltaEmbedding training whole rows ``rows`` (sorted) of ``embedding`` (trainable
    tokens): its index is those rows' positions, built without a [V, d] mask."""
    index = layout.row_positions(torch.tensor(rows, device=embedding.weight.device), embedding.embedding_dim)
    return SparseDeltaEmbedding(embedding.weight, index, padding_idx=embedding.padding_idx, backend=backend,
                                values_dtype=torch.promote_types(embedding.weight.dtype, torch.float32))


_QUANT_OPTIONS = {"nf4": {"blocksize", "double_quant"}, "fp4": {"blocksize", "double_quant"}, "int8": set(),
                  "int4": {"group_size"}}


def apply_lora(model: nn.Module, target_modules, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               use_rslora: bool = False, backend: str = "auto", quantize: str | None = None,
               use_dora: bool = False, quant_options: dict | None = None, rank_pattern: dict | None = None,
               alpha_pattern: dict | None = None, modules_to_save=None,
               adapter_dtype: torch.dtype | None = None, bias: str = "none",
               trainable_token_indices=None) -> nn.Module:
    """Replace the nn.Linear modules of ``model`` named by ``target_modules`` with LoRALinear
    (sharing their weights), freeze every other parameter (adapters an earlier call made keep
    theirs), and return ``model`` (modified in place). target_modules: a list of names/suffixes
    (e.g. ["q_proj", "v_proj"]), a regex string, or "all-linear" (every nn.Linear except
    the output layer: an HF model's get_output_embeddings(), or one named lm_head / output /
    classifier / score). rank_pattern / alpha_pattern ({regex: r or alpha}, HF PEFT's
    LoraConfig options and matching rule, e.g. {"layers.0.q_proj": 16} or {"^model.*up": 4}) give
    the matching layers another r / alpha; a key that matches no targeted layer is an error.
    modules_to_save (PEFT's option, e.g. ["score"] for a new classification head): modules trained
    whole beside the adapters; save_adapter writes them too.
    quantize="nf4" | "fp4" | "int8" | "int4" stores each targeted base weight quantized
    (QLoRALinear / IntQLoRALinear; the full-precision weight is released), with
    ``quant_options``: {"blocksize": 64, "double_quant": True} for nf4/fp4, {"group_size": 64}
    for int4 (QLoRALinear.from_linear's defaults); use_dora=True makes DoRALinear layers
    (QDoRALinear / IntQDoRALinear with quantize). bitsandbytes layers (a model loaded in 4 or 8
    bits) keep their bytes: a Linear4bit becomes QLoRALinear.from_bnb (QDoRA with use_dora), a
    Linear8bitLt an IntQLoRALinear over its CB / SCB (which computes x · deq(W) without LLM.int8's
    activation quantization). Raises ValueError if nothing matches, and names a targeted layer
    that cannot be replaced faithfully (an nn.Linear subclass with a forward of its own,
    nn.MultiheadAttention's out_proj, a layer inside HF PEFT's) — "all-linear" leaves those out
    with a warning.
    adapter_dtype: the dtype of the trained tensors (lora_A, lora_B, DoRA's magnitude); None keeps
    the base weight's. torch.float32 over a bf16 / fp16 model is HF PEFT's default
    (get_peft_model's autocast_adapter_dtype): the optimizer updates fp32 values, and
    torch.amp.GradScaler (fp16 mixed precision) accepts their gradients, which it refuses in fp16.
    The kernels compute in the input's dtype either way.
    bias: HF PEFT's LoraConfig option — "none" (every bias frozen), "all" (every parameter named
    bias in the model trains, LayerNorms' included) or "lora_only" (the adapted layers' biases
    train); save_adapter writes the trained biases under PEFT's keys, load_adapter reads them.
    trainable_token_indices: HF PEFT's option — token ids whose embedding rows train (new special
    tokens), a list for the input embedding or {embedding name: ids}; each such embedding becomes a
    SparseDeltaEmbedding over those rows (no [V, d] gradient), saved in PEFT's format. A head tied
    to the embedding (one weight) becomes a TiedRowsHead computing with the same trained rows, as
    HF PEFT's tied trainable tokens do."""
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"apply_lora: bias must be one of {BIAS_OPTIONS} (HF PEFT's option), got {bias!r}")
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
        raise TypeError(f"apply_lora: adapter_dtype must be None or a floating torch.dtype, got {adapter_dtype!r}")
    if quantize not in (None, *_QUANT_OPTIONS):
        raise ValueError(f"apply_lora: quantize must be None, 'nf4', 'fp4', 'int8' or 'int4', got {quantize!r}")
    quant_options = dict(quant_options or {})
    if quant_options and quantize is None:
        raise ValueError(f"apply_lora: quant_options {quant_options} given without quantize")
    unknown = set(quant_options) - _QUANT_OPTIONS.get(quantize, set())
    if unknown:
        raise ValueError(f"apply_lora: quant_options {sorted(unknown)} do not apply to {quantize!r} "
                         f"(it takes {sorted(_QUANT_OPTIONS[quantize]) or 'none'})")
    targets = _targets("apply_lora", model, target_modules)
    for option, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if pattern is not None and not isinstance(pattern, dict):
            raise TypeError(f"apply_lora: {option} must be a dict {{regex: value}}, got {type(pattern).__name__}")
        for key in pattern or {}:
            try:
                re.compile(key)
            except (re.error, TypeError) as exc:
                raise ValueError(f"apply_lora: {option} key {key!r} is not a regex: {exc}") from exc
        unmatched = [k for k in pattern or {} if not any(pattern_matches(k, n) for n, *_ in targets)]
        if unmatched:
            raise ValueError(f"apply_lora: {option} keys {unmatched} match none of the targeted layers "
                             f"{[n for n, *_ in targets][:10]}")
    trained_whole = _modules_to_save(model, modules_to_save, targets)
    token_targets = _token_targets(model, trainable_token_indices, modules_to_save)
    lora_on_heads = [h[0] for *_, heads in token_targets for h in heads if any(h[0] == t[0] for t in targets)]
    if lora_on_heads:
        raise ValueError(f"apply_lora: {lora_on_heads} share the table whose rows trainable_token_indices trains; "
                         "a LoRA adapter there is not supported")
    names = parameter_names(model)
    tied = {name: names[id(linear.weight)] for name, _, _, linear in targets if is_tied(names, linear.weight)}
    if tied and quantize is None:
        warnings.warn(f"apply_lora: {sorted(tied)[:3]} have weights tied to other modules "
                      f"({[n for ns in tied.values() for n in ns][:4]}): an adapter is the layer's alone, but the "
                      "layer's merge() folds it into the shared weight, changing every user of it; "
                      "merge_and_unload() unties instead (HF PEFT warns alike)", stacklevel=2)
    new = []
    with requires_grad_restored_on_error(model):
        for name, _, _, linear in targets:
            kw = dict(r=pattern_value(rank_pattern, name, r), alpha=pattern_value(alpha_pattern, name, alpha),
                      dropout=dropout, use_rslora=use_rslora, backend=backend)
            own_forward = None if is_conv1d(linear) or is_bnb_linear4bit(linear) or is_bnb_linear8bit(linear) \
                else needs_branch(linear)
            if own_forward is not None:  # the base keeps its forward; the branch runs beside it
                if use_dora or quantize is not None:
                    raise ValueError(f"apply_lora: {name} ({own_forward}) keeps its own forward under a LoRA "
                                     f"branch (LoRABranchLinear); {'DoRA' if use_dora else 'quantize='} needs "
                                     "the base weight itself")
                new.append(LoRABranchLinear(linear, **kw))
            elif is_bnb_linear4bit(linear) or is_bnb_linear8bit(linear):
                new.append(_over_bnb(name, linear, quantize, quant_options, use_dora, kw))
            elif quantize is None:
                new.append((DoRALinear if use_dora else LoRALinear).from_linear(linear, **kw))
            else:
                try:
                    new.append((QDoRALinear if use_dora else QLoRALinear).from_linear(linear, quant=quantize, **kw,
                                                                                     **quant_options))
                except ValueError as exc:  # e.g. in_features not divisible by the INT4 group: say which layer
                    raise ValueError(f"apply_lora: cannot quantize {name} "
                                     f"{list(features(linear))} as {quantize}: {exc}") from exc
    if adapter_dtype is not None:
        for module in new:
            module.cast_adapter_(adapter_dtype)
    with requires_grad_restored_on_error(model):  # the layers freeze the embeddings they take over
        token_places, token_layers = token_rows_layers(token_targets, backend)
    return _replace(model, targets + token_places, new + token_layers, trained_whole, bias)


def _over_bnb(name: str, linear: nn.Module, quantize, quant_options: dict, use_dora: bool, kw: dict):
    """The adapter layer over a bitsandbytes Linear4bit (QLoRALinear / QDoRALinear) or
    Linear8bitLt (IntQLoRALinear / IntQDoRALinear over its CB / SCB), reading its bytes as they
    are: never re-quantized, never decoded whole."""
    fmt = bnb_linear4bit_class(linear)
    try:
        if is_bnb_linear4bit(linear) and fmt is None:
            raise ValueError("its weight is not quantized yet (bitsandbytes quantizes it on the move to a device)")
        stored = fmt.quant_type if fmt is not None else "int8"
        if quantize not in (None, stored) or quant_options:
            raise ValueError(f"it is already quantized by bitsandbytes ({stored}) and is used as it is: "
                             f"pass quantize=None and no quant_options")
        if fmt is not None:
            return (QDoRALinear if use_dora else QLoRALinear).from_bnb(linear, **kw)
        return (IntQDoRALinear if use_dora else IntQLoRALinear)(Int8Weight.from_bnb(linear), linear.bias, **kw)
    except ValueError as exc:
        raise ValueError(f"apply_lora: {name} ({type(linear).__name__}): {exc}") from exc


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer apply_lora / apply_sparse / mask_gradients_ / load_adapter put on
    ``model`` (LoRA, DoRA, QLoRA and their INT forms, SparseDeltaLinear) with a plain nn.Linear
    holding its merged weight (``to_linear()``: over a quantized base the decoded weight, in the
    adapter's dtype) — or, for a layer whose base was a transformers Conv1D, a Conv1D; a
    SparseDeltaEmbedding with an nn.Embedding holding W0 + Delta — in place,
    and return ``model``: HF PEFT's merge_and_unload, for export or inference without peft_kernels."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (LoRAAdapter, SparseDeltaLinear, SparseDeltaEmbedding, TiedRowsHead))]
    if not layers:
        raise ValueError("merge_and_unload: the model has no adapter or sparse-delta layers")
    # all built before the model changes; a layer over a Conv1D becomes a Conv1D again
    branch = [f"{n} ({type(m.base_layer).__name__})" for n, m in layers if isinstance(m, LoRABranchLinear)]
    if branch:
        raise ValueError(f"merge_and_unload: {branch[:5]} keep a base that computes its own forward "
                         "(LoRABranchLinear): the adapter cannot be folded into it here; nothing was changed")
    merged = {name: m.unloaded() for name, m in layers if not isinstance(m, TiedRowsHead)}
    tables = {id(m): merged[name] for name, m in layers if isinstance(m, SparseDeltaEmbedding)}
    for name, m in layers:
        if isinstance(m, TiedRowsHead):  # tied again, to the merged table
            if id(m.embedding) not in tables:
                raise ValueError(f"merge_and_unload: {name} is tied to an embedding this model no longer holds")
            merged[name] = linear_holding(tables[id(m.embedding)].weight, m.bias)
    for name, linear in merged.items():
        set_submodule(model, name, linear)
    return model
