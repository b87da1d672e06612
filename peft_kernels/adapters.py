"""Save and load LoRA / DoRA adapters in HF PEFT's format (adapter_config.json +
adapter_model.safetensors), so an adapter trained with peft_kernels loads in HF PEFT and back —
over any base apply_lora makes (bf16/fp16/fp32, NF4/FP4, INT8/INT4) — and sparse deltas
(SparseDeltaLinear, unstructured) as PEFT's SHiRA adapters.

Keys follow PEFT's saved layout: ``base_model.model.<module name>.lora_A.weight`` / ``.lora_B.weight``,
and for DoRA ``.lora_magnitude_vector``; SHiRA: ``.shira_weight`` [k] and ``.shira_indices``
[2, k] int32 (row, column), k = r·(in + out) for the config's one r.
"""
from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .apply import (BIAS_OPTIONS, TRAINED_BIAS, TRAINED_WHOLE, _replace, _targets, _token_targets, apply_lora,
                    input_embedding_name, pattern_matches, pattern_value, requires_grad_restored_on_error,
                    target_matches, token_rows_layers)
from .nn._adapter import LoRAAdapter, features, is_conv1d
from .nn.sparse import SparseDeltaLinear
from .nn.sparse_embedding import SparseDeltaEmbedding
from .ops._checks import check_materialized
from .reference.sparse import w0_plus_delta
from .sparse import layout
from .sparse.masking import is_tied, parameter_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _lora_modules(model: nn.Module) -> dict[str, LoRAAdapter]:
    """Every adapter module of ``model``: LoRALinear, DoRALinear, QLoRALinear, QDoRALinear,
    IntQLoRALinear, IntQDoRALinear."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAAdapter)}


def _per_module(values: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The most common value, and PEFT's pattern ({"^<escaped name>": value}) for the modules with
    another: anchored and escaped, each key matches its own module only."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {"^" + re.escape(n): v for n, v in values.items() if v != common}


def _target_modules(model: nn.Module, names) -> list[str] | str:
    """PEFT's target_modules for the adapted ``names``: their last name parts (["q_proj",
    "v_proj"], as PEFT writes them and serving tools such as LoRAX list them) when PEFT's list rule picks
    out exactly these modules of ``model``; else a regex matching exactly the full names (a list
    of full names would also pick "1.0" for "0")."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    picked = {n for n, _ in model.named_modules() if n and target_matches(n, leaves)}
    if picked == set(names):
        return leaves
    return "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def _trained_whole(model: nn.Module) -> dict[str, nn.Module]:
    """The modules apply_lora(modules_to_save=...) trains whole, by name."""
    return {name: m for name, m in model.named_modules() if getattr(m, TRAINED_WHOLE, False)}


def _trained_biases(model: nn.Module, whole: dict) -> tuple[str, dict[str, torch.Tensor]]:
    """(HF PEFT's bias option, {PEFT key: bias}) for the biases apply_lora(bias=...) trains. PEFT
    keeps an adapted layer's bias on its base_layer, so LoRALinear "q.bias" is saved as
    "q.base_layer.bias" (a LoRABranchLinear's bias_module is that base_layer already). Biases of
    modules_to_save modules are saved with their module."""
    owners = {n: m for n, m in model.named_modules(remove_duplicate=False)
              if getattr(m, TRAINED_BIAS, None) and getattr(m, "bias", None) is not None
              and not any(n == w or n.startswith(w + ".") for w in whole)}
    options = {getattr(m, TRAINED_BIAS) for m in owners.values()}
    if len(options) > 1:
        raise ValueError(f"save_adapter: the model's biases were trained under several bias options {sorted(options)} "
                         "(apply_lora calls with different bias=); PEFT's config has one")
    tensors = {}
    for n, m in owners.items():
        name = f"{n}.base_layer" if isinstance(m, LoRAAdapter) else n
        tensors[f"{PREFIX}{name}.bias"] = m.bias.detach().clone()  # a shared bias: safetensors wants one owner
    return (options.pop() if options else "none"), tensors


TOKENS_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's key for a trainable-tokens layer's rows


def _trainable_tokens(model: nn.Module, key: str = TOKENS_KEY) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """({embedding name: token ids}, {PEFT key: the rows' values [n, d]}) of the model's
    SparseDeltaEmbedding layers, which must train whole rows: HF PEFT's trainable tokens, which
    store the rows' new values (W0 + Delta) in the table's dtype. ``key``: the tensor's name under
    the embedding's (beside LoRA: under its token_adapter; a TRAINABLE_TOKENS adapter: its own)."""
    indices, tensors = {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, SparseDeltaEmbedding):
            continue
        rows = m.token_rows()
        if rows is None:
            raise ValueError(f"save_adapter: {name} trains entries that are not whole rows of its table; PEFT's "
                             "trainable tokens hold whole rows (peft_kernels.sparse.save_sparse_delta saves any delta)")
        indices[name] = rows.tolist()
        w0 = m.weight.detach()[rows]  # the rows only: never the [V, d] table merged
        tensors[f"{PREFIX}{name}.{key}"] = w0_plus_delta(w0.reshape(-1), m.delta_values.detach(),
                                                          w0.dtype).reshape(w0.shape)
    return indices, tensors


def _saved_tokens(model: nn.Module, token_indices, to_save, key: str = TOKENS_KEY) -> dict[str, tuple]:
    """{embedding name: (sorted rows, PEFT's key of their saved values, the ids in the saved order,
    _token_targets' entry)} for an adapter config's trainable_token_indices (a list: the input
    embedding's; or {name: ids}), checked as apply_lora checks them."""
    if token_indices is None:
        return {}
    out = {}
    for target in _token_targets(model, token_indices, to_save):
        name, rows = target[0], target[4]
        ids = token_indices if not isinstance(token_indices, dict) else \
            next(v for k, v in token_indices.items() if target_matches(name, [k]))
        out[name] = (rows, f"{PREFIX}{name}.{key}", list(ids), target)
    return out


def _check_saved_tokens(state: dict, tokens: dict, model: nn.Module):
    """Every saved rows tensor is there, [len(ids), embedding_dim]."""
    for name, (_, key, ids, _) in tokens.items():
        want = (len(ids), model.get_submodule(name).embedding_dim)
        if key not in state or tuple(state[key].shape) != want:
            raise ValueError(f"load_adapter: {key[len(PREFIX):]} is "
                             f"{list(state[key].shape) if key in state else 'missing'}, the {len(ids)} trainable "
                             f"tokens of {name} need {list(want)}")


@torch.no_grad()
def _load_token_rows(state: dict, tokens: dict, model: nn.Module):
    """The saved rows' values into the SparseDeltaEmbedding layers now at ``tokens``' names: PEFT saves
    the rows' new values, the layer holds their delta from W0."""
    for name, (rows, key, ids, _) in tokens.items():
        layer = model.get_submodule(name)
        saved = state[key][torch.argsort(torch.tensor(ids))].to(layer.weight.device)  # the sorted rows' order
        acc = layer.delta_values.dtype
        layer.delta_values.copy_((saved.to(acc) - layer.weight[torch.tensor(rows)].to(acc)).reshape(-1))


TOKENS_ONLY_KEY = "trainable_tokens_delta"  # a TRAINABLE_TOKENS adapter's rows, under the embedding's name


def _save_tokens_only(model: nn.Module, directory: Path) -> Path:
    """SparseDeltaEmbedding row layers, no LoRA: PEFT's TRAINABLE_TOKENS adapter (one token list for
    every targeted embedding)."""
    from safetensors.torch import save_file

    indices, tensors = _trainable_tokens(model, TOKENS_ONLY_KEY)
    lists = {tuple(v) for v in indices.values()}
    if len(lists) != 1:
        raise ValueError(f"save_adapter: PEFT's TRAINABLE_TOKENS adapter has one token list for all its embeddings; "
                         f"the model trains {dict(list(indices.items())[:3])}")
    directory.mkdir(parents=True, exist_ok=True)
    _warn_unsaved(model)
    save_file(tensors, str(directory / WEIGHTS_NAME))
    config = {"peft_type": "TRAINABLE_TOKENS", "task_type": None, "base_model_name_or_path": None,
              "inference_mode": True, "target_modules": _target_modules(model, indices),
              "token_indices": list(lists.pop()), "init_weights": True}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _load_tokens_only(model: nn.Module, directory: Path, config: dict, backend: str) -> nn.Module:
    """PEFT's TRAINABLE_TOKENS adapter: the targeted embeddings (the input embedding when
    target_modules is empty) become SparseDeltaEmbedding layers over the token rows; everything
    else is frozen. Checked before the model changes."""
    from safetensors.torch import load_file

    state = load_file(str(directory / WEIGHTS_NAME))
    targets = config.get("target_modules")
    if targets:
        names = [n for n, m in model.named_modules() if n and isinstance(m, nn.Embedding) and target_matches(n, targets)]
    else:
        names = [input_embedding_name(model)]
    if not names or None in names:
        raise ValueError(f"load_adapter: no nn.Embedding of the model matches target_modules={targets!r}")
    tokens = _saved_tokens(model, {n: config["token_indices"] for n in names}, None, TOKENS_ONLY_KEY)
    unexpected = sorted(set(state) - {key for _, key, _, _ in tokens.values()})
    if unexpected:
        raise ValueError(f"load_adapter: {WEIGHTS_NAME} holds tensors no targeted embedding takes: {unexpected[:5]}")
    _check_saved_tokens(state, tokens, model)
    with requires_grad_restored_on_error(model):
        places, layers = token_rows_layers([t for *_, t in tokens.values()], backend)
    _replace(model, places, layers)
    _load_token_rows(state, tokens, model)
    return model


def _warn_unsaved(model: nn.Module):
    """Warn, by name, of trainable parameters PEFT's files cannot hold (e.g. biases or norms made
    trainable by hand or by mask_gradients_): a reload would lose what they learned."""
    saved = set()
    for m in model.modules():
        if isinstance(m, LoRAAdapter):
            saved |= {id(m._parameters[k]) for k in ("lora_A", "lora_B", "magnitude") if m._parameters.get(k) is not None}
        elif isinstance(m, (SparseDeltaLinear, SparseDeltaEmbedding)):
            saved.add(id(m.delta_values))
        if getattr(m, TRAINED_WHOLE, False):
            saved |= {id(p) for p in m.parameters()}
        if getattr(m, TRAINED_BIAS, None) and getattr(m, "bias", None) is not None:
            saved.add(id(m.bias))
    unsaved = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved]
    if unsaved:
        warnings.warn(f"save_adapter: {len(unsaved)} trainable parameters are not part of PEFT's adapter format and "
                      f"are not saved: {unsaved[:5]}{' ...' if len(unsaved) > 5 else ''} (apply_lora's "
                      "modules_to_save / bias= options save them)", stacklevel=3)


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the LoRA (or DoRA) adapters of ``model`` to ``directory`` in PEFT's format, with the
    modules apply_lora trains whole (PEFT's modules_to_save). The adapters share one dropout /
    rsLoRA / DoRA setting (PEFT's config has one); r and alpha may differ per module (written as
    PEFT's rank_pattern / alpha_pattern). A model whose trained layers are SparseDeltaLinear is
    written as PEFT's SHiRA adapter (unstructured, k = r·(in + out) entries per layer). Biases
    trained by apply_lora(bias="all" | "lora_only") are written as PEFT writes them, and
    embedding rows trained by apply_lora(trainable_token_indices=...) as PEFT's trainable tokens —
    without LoRA layers beside them, as PEFT's TRAINABLE_TOKENS adapter."""
    from safetensors.torch import save_file

    modules = _lora_modules(model)
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
    if sparse and modules:
        raise ValueError(f"save_adapter: the model has both LoRA adapters and sparse deltas ({sorted(sparse)[:3]}); "
                         "PEFT's adapter files hold one kind (save the deltas with peft_kernels.sparse."
                         "save_sparse_delta)")
    embeddings = sorted(n for n, m in model.named_modules() if isinstance(m, SparseDeltaEmbedding))
    if sparse and embeddings:  # the SHiRA file would drop the embedding's delta without a word
        raise ValueError(f"save_adapter: the model has sparse deltas on linear layers and on embeddings "
                         f"({embeddings[:3]}); PEFT's SHiRA adapter holds linear layers only (save both with "
                         "peft_kernels.sparse.save_sparse_delta)")
    if sparse:
        return _save_shira(model, sparse, Path(directory))
    if not modules and embeddings:
        return _save_tokens_only(model, Path(directory))
    if not modules:
        raise ValueError("save_adapter: the model has no LoRA adapter modules (apply_lora makes them), no "
                         "SparseDeltaLinear (apply_sparse) and no SparseDeltaEmbedding")
    settings = {(m.dropout, m.use_rslora, hasattr(m, "magnitude")) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"save_adapter: all adapters must share dropout/use_rslora/DoRA (PEFT's config has one "
                         f"of each), got {sorted(settings)}")
    dropout, use_rslora, use_dora = settings.pop()
    r, rank_pattern = _per_module({n: m.r for n, m in modules.items()})
    alpha, alpha_pattern = _per_module({n: m.alpha for n, m in modules.items()})
    if any(getattr(m, "merged", False) for m in modules.values()):
        raise ValueError("save_adapter: unmerge the adapters first (merged weights would be saved twice)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
        if use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = m.magnitude.detach().contiguous()
    whole = _trained_whole(model)
    for name, m in whole.items():  # PEFT's modules_to_save: the module's state under its own keys
        for key, t in m.state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = t.detach().contiguous()
    bias, biases = _trained_biases(model, whole)
    tensors.update(biases)
    token_indices, token_tensors = _trainable_tokens(model)
    tensors.update(token_tensors)
    if list(token_indices) == [input_embedding_name(model)]:  # PEFT's list form: the input embedding
        token_indices = next(iter(token_indices.values()))
    _warn_unsaved(model)
    save_file(tensors, str(directory / WEIGHTS_NAME))
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
        # PEFT's fan_in_fan_out: the bases are transformers Conv1D layers (PEFT sets it per layer
        # from the base type anyway, with a warning where a mixed model disagrees with the flag)
        "target_modules": _target_modules(model, modules), "bias": bias,
        "fan_in_fan_out": all(m.fan_in_fan_out for m in modules.values()),
        "init_lora_weights": True, "modules_to_save": sorted(whole) or None, "use_dora": use_dora,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "trainable_token_indices": token_indices or None,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _save_shira(model: nn.Module, modules: dict, directory: Path) -> Path:
    """SparseDeltaLinear layers as PEFT's SHiRA adapter: delta_values as shira_weight, the sorted
    positions as [2, k] (row, column) shira_indices. PEFT builds each SHiRA layer with k = r·(in +
    out) values for its config's one r before reading the file, so every layer's k must be that."""
    from safetensors.torch import save_file

    conv1d = sorted(n for n, m in modules.items() if m.fan_in_fan_out)
    if conv1d:
        raise ValueError(f"save_adapter: {conv1d[:3]} were built over transformers Conv1D layers; PEFT's SHiRA "
                         "adapts nn.Linear only (peft_kernels.sparse.save_sparse_delta saves any delta)")
    blocks = sorted(n for n, m in modules.items() if m.block is not None)
    if blocks:
        raise ValueError(f"save_adapter: {blocks[:3]} are block-sparse; PEFT's SHiRA holds unstructured "
                         "entries only (peft_kernels.sparse.save_sparse_delta saves any delta)")
    sizes = {n: (m.delta_index.numel(), m.in_features + m.out_features) for n, m in modules.items()}
    ranks = {k // width for k, width in sizes.values()}
    if len(ranks) != 1 or 0 in ranks or any(k % width for k, width in sizes.values()):
        raise ValueError("save_adapter: PEFT's SHiRA needs k = r * (in + out) trained entries in every layer for "
                         f"one r; got (k, in + out) {dict(list(sizes.items())[:4])}. Build the layers with "
                         "apply_sparse(..., density=None, num_params=lambda lin: r * (lin.in_features + "
                         "lin.out_features)), or save with peft_kernels.sparse.save_sparse_delta")
    _warn_unsaved(model)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in modules.items():
        flat = m.delta_index.long()
        tensors[f"{PREFIX}{name}.shira_weight"] = m.delta_values.detach().reshape(-1).contiguous()
        tensors[f"{PREFIX}{name}.shira_indices"] = torch.stack([flat // m.in_features, flat % m.in_features]) \
            .to(torch.int32).contiguous()
    save_file(tensors, str(directory / WEIGHTS_NAME))
    config = {
        "peft_type": "SHIRA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": ranks.pop(), "mask_type": "random", "random_seed": None, "target_modules": _target_modules(model, modules),
        "fan_in_fan_out": False, "init_weights": True, "modules_to_save": None,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _load_shira(model: nn.Module, directory: Path, config: dict, backend: str) -> nn.Module:
    """PEFT's SHiRA adapter onto ``model``: each named nn.Linear becomes a SparseDeltaLinear at the
    saved positions (sorted, values permuted alike) holding the saved values; everything else is
    frozen. PEFT does not save set_scale's factor: the values are taken at scale 1, as PEFT loads
    them. Checked before the model changes."""
    from safetensors.torch import load_file

    unsupported = [k for k in ("fan_in_fan_out", "modules_to_save") if config.get(k)]
    if unsupported:
        raise ValueError(f"load_adapter: SHiRA adapter options not supported yet: {unsupported}")
    state = load_file(str(directory / WEIGHTS_NAME))
    parts = (".shira_weight", ".shira_indices")
    names = sorted({k[len(PREFIX):].rsplit(".shira_", 1)[0] for k in state if k.startswith(PREFIX) and k.endswith(parts)})
    unexpected = [k for k in state if not (k.startswith(PREFIX) and k.endswith(parts))]
    missing = [n + p for n in names for p in parts if PREFIX + n + p not in state]
    if unexpected or missing or not names:
        raise ValueError(f"load_adapter: {WEIGHTS_NAME} does not hold a SHiRA adapter's tensors only: "
                         f"unexpected {unexpected[:5]}, missing {missing[:5]}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    absent = [n for n in names if n not in linears]
    if absent:
        raise ValueError(f"load_adapter: the model has no nn.Linear named {absent[:5]}")
    entries = {}
    for n in names:
        linear, values = linears[n], state[f"{PREFIX}{n}.shira_weight"]
        check_materialized(linear.weight, f"{n}.weight", "load_adapter")
        indices = state[f"{PREFIX}{n}.shira_indices"].to(torch.int64)  # PEFT wrote floats on Windows
        out_f, in_f = linear.weight.shape
        if indices.dim() != 2 or indices.shape[0] != 2 or values.dim() != 1 or indices.shape[1] != values.numel():
            raise ValueError(f"load_adapter: {n}: shira_indices must be [2, k] beside shira_weight [k], got "
                             f"{list(indices.shape)} and {list(values.shape)}")
        if values.numel() and not (0 <= int(indices[0].min()) and int(indices[0].max()) < out_f
                                   and 0 <= int(indices[1].min()) and int(indices[1].max()) < in_f):
            raise ValueError(f"load_adapter: {n}: shira_indices fall outside its [{out_f}, {in_f}] weight")
        index, order, repeats = layout.index_from_rows_cols(indices, in_f)
        if repeats:
            raise ValueError(f"load_adapter: {n}: shira_indices list a position twice")
        entries[n] = (index, values if order is None else values[order])
    targets = _targets("load_adapter", model, "|".join(re.escape(n) for n in names))
    tied = parameter_names(model)
    new = []
    with requires_grad_restored_on_error(model):
        for name, _, _, linear in targets:
            index, values = entries[name]
            layer = SparseDeltaLinear(linear.weight, linear.bias, index, backend=backend,  # fp32, or fp64 as saved
                                      values_dtype=torch.promote_types(values.dtype, torch.float32),
                                      merge_in_place=not is_tied(tied, linear.weight))
            with torch.no_grad():
                layer.delta_values.copy_(values)
            layer.sync_()  # the merged weight holds W0 + delta at the positions
            new.append(layer)
    return _replace(model, targets, new)


def _saved_bias_places(model: nn.Module, state: dict, keys, names: list, linears: dict, bias: str) -> dict:
    """{saved bias key: (adapted layer's name, None) | (None, module name)}, checked against the model
    before it changes: PEFT saves an adapted layer's bias as "<layer>.base_layer.bias" and, under
    bias="all", any other bias under its own name."""
    places, wrong = {}, []
    modules = dict(model.named_modules())
    for key in sorted(keys):
        name = key[len(PREFIX):].rpartition(".")[0]
        layer = name[:-len(".base_layer")] if name.endswith(".base_layer") else None
        if layer in names:
            places[key], target = (layer, None), linears[layer].bias
        elif bias == "all" and name in modules:
            places[key], target = (None, name), getattr(modules[name], "bias", None)
        else:
            wrong.append((key, "no such " + ("adapted layer" if bias == "lora_only" else "module")))
            continue
        if not isinstance(target, torch.Tensor) or target.shape != state[key].shape:
            wrong.append((key, "the model's bias is " + ("absent" if not isinstance(target, torch.Tensor)
                                                         else f"{list(target.shape)}")))
        else:
            check_materialized(target, key[len(PREFIX):], "load_adapter")
    if wrong:
        raise ValueError(f"load_adapter: saved biases (bias={bias!r}) do not fit the model: {wrong[:5]}")
    return places


_UNSUPPORTED_LORA_OPTIONS = ("lora_bias", "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora",
                             "velora_config", "monteclora_config", "kasa_config", "layer_replication",
                             "target_parameters")


def load_adapter(model: nn.Module, directory: str | Path, backend: str = "auto",
                 quantize: str | None = None, quant_options: dict | None = None,
                 adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Put the PEFT-format LoRA (or DoRA) adapter in ``directory`` on ``model`` (its nn.Linear
    modules become adapter layers, everything else is frozen) and return the model — or a SHiRA
    adapter, whose layers become SparseDeltaLinear (train them with SparseAdamW). Per-module
    ranks and alphas (PEFT's rank_pattern / alpha_pattern) are honoured, and PEFT's modules_to_save
    are loaded and trained whole, as are the biases PEFT's ``bias`` option trains ("lora_only" / "all",
    saved as "<layer>.base_layer.bias" for an adapted layer); PEFT's trainable_token_indices become
    a SparseDeltaEmbedding over those rows of each embedding (a head tied to it a TiedRowsHead), as
    do the rows of a standalone TRAINABLE_TOKENS adapter. ``quantize``
    ("nf4" | "fp4" | "int8" | "int4") and ``quant_options`` store the adapted base weights
    quantized, and ``adapter_dtype`` (e.g. torch.float32 over a bf16 model, as PEFT loads by
    default) holds the adapter tensors, as apply_lora does."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("peft_type") == "SHIRA":
        if quantize is not None:
            raise ValueError("load_adapter: a SHiRA adapter trains entries of the weight itself; quantize= does "
                             "not apply")
        return _load_shira(model, directory, config, backend)
    if config.get("peft_type") == "TRAINABLE_TOKENS":
        if quantize is not None:
            raise ValueError("load_adapter: a TRAINABLE_TOKENS adapter trains embedding rows; quantize= does not apply")
        return _load_tokens_only(model, directory, config, backend)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: peft_type {config.get('peft_type')!r} is none of LORA, SHIRA and "
                         "TRAINABLE_TOKENS")
    # fan_in_fan_out needs nothing here: a Conv1D base is told by its type, as PEFT does. The options
    # below change what the adapted layer computes (LoRA variants, extra trained tensors, another
    # model structure): loading such an adapter as plain LoRA would compute something else.
    unsupported = [k for k in _UNSUPPORTED_LORA_OPTIONS if config.get(k)]
    bias = config.get("bias") or "none"
    if bias not in BIAS_OPTIONS:
        unsupported.append(f"bias={bias!r}")
    if unsupported:
        raise ValueError(f"load_adapter: adapter options not supported yet: {unsupported}")
    mica = config.get("init_lora_weights") == "mica"  # plain LoRA whose lora_B stays frozen
    use_dora = bool(config.get("use_dora"))
    state = load_file(str(directory / WEIGHTS_NAME))
    # PEFT's modules_to_save: whole modules, saved under their own keys
    to_save = [n for n, _ in model.named_modules() if n and target_matches(n, config.get("modules_to_save") or [])]
    whole = {k for k in state if any(k.startswith(f"{PREFIX}{n}.") for n in to_save)}
    # bias="all": PEFT also writes the biases of a modules_to_save module's two copies, which its
    # own keys hold (the trained one) or the model does (the original): skipped
    copies = {f"{PREFIX}{n}.{c}.bias" for n in to_save for c in ("modules_to_save", "original_module")} \
        if bias == "all" else set()
    whole -= copies
    parts = (".lora_A.weight", ".lora_B.weight") + ((".lora_magnitude_vector",) if use_dora else ())
    biases = {k for k in state if bias != "none" and k.startswith(PREFIX) and k.endswith(".bias")
              and k not in whole and k not in copies}
    # PEFT's trainable tokens: the new values of chosen embedding rows (SparseDeltaEmbedding here)
    tokens = _saved_tokens(model, config.get("trainable_token_indices"), to_save)
    token_keys = {key for _, key, _, _ in tokens.values()}
    other = whole | biases | copies | token_keys
    unexpected = [k for k in state if k not in other and not (k.startswith(PREFIX) and k.endswith(parts))]
    names = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in state if k not in unexpected and k not in other})
    missing = [n + p for n in names for p in parts if PREFIX + n + p not in state]
    if unexpected or missing:
        raise ValueError(f"load_adapter: {WEIGHTS_NAME} does not hold a {'DoRA' if use_dora else 'LoRA'} "
                         f"adapter's tensors only: unexpected {unexpected[:5]}, missing {missing[:5]}")
    # Everything is checked before the model changes. Only the pattern keys that match a saved module
    # matter (PEFT keeps keys that matched nothing, with a warning).
    rank_pattern, alpha_pattern = ({k: v for k, v in (config.get(option) or {}).items()
                                    if any(pattern_matches(k, n) for n in names)}
                                   for option in ("rank_pattern", "alpha_pattern"))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    absent = [n for n in names if n not in linears]
    if absent:
        adapted = [n for n in absent if n in _lora_modules(model)]
        raise ValueError(f"load_adapter: the model has no nn.Linear / Conv1D named {absent[:5]}"
                         + (f" ({adapted[:5]} already carry an adapter)" if adapted else ""))
    wrong = []
    for n in names:
        r = pattern_value(rank_pattern, n, config["r"])
        out_features, in_features = features(linears[n])
        shapes = {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}
        if use_dora:
            shapes["lora_magnitude_vector"] = (out_features,)
        wrong += [(f"{n}.{p}", tuple(state[f"{PREFIX}{n}.{p}"].shape), want) for p, want in shapes.items()
                  if tuple(state[f"{PREFIX}{n}.{p}"].shape) != want]
    if wrong:
        raise ValueError(f"load_adapter: saved tensors do not fit the model's layers with the config's r / "
                         f"rank_pattern (tensor, saved shape, expected): {wrong[:5]}")
    for n in names:  # copying into a meta tensor would drop the saved values without a word
        check_materialized(linears[n].weight, f"{n}.weight", "load_adapter")
    whole_states = {n: model.get_submodule(n).state_dict() for n in to_save}
    for key, t in ((f"{n}.{k}", t) for n, sd in whole_states.items() for k, t in sd.items()):
        check_materialized(t, key, "load_adapter")
    expected = {f"{PREFIX}{n}.{k}": tuple(t.shape) for n, sd in whole_states.items() for k, t in sd.items()}
    unfit = sorted((set(expected) ^ whole) | {k for k in whole & set(expected) if tuple(state[k].shape) != expected[k]})
    if unfit:
        raise ValueError(f"load_adapter: the saved modules_to_save tensors do not fit the model's modules "
                         f"{to_save[:5]}: {unfit[:5]}")
    bias_at = _saved_bias_places(model, state, biases, names, linears, bias)
    _check_saved_tokens(state, tokens, model)
    # The saved names are full module names: match them exactly (a list would also take any module
    # whose name ends in "." + name, e.g. "1.0" for "0").
    exact = "|".join(re.escape(n) for n in names)
    apply_lora(model, exact, r=config["r"], alpha=config["lora_alpha"], dropout=config["lora_dropout"],
               use_rslora=config.get("use_rslora", False), backend=backend, quantize=quantize, use_dora=use_dora,
               quant_options=quant_options, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
               modules_to_save=to_save or None, adapter_dtype=adapter_dtype, bias=bias,
               trainable_token_indices={name: ids for name, (_, _, ids, _) in tokens.items()} or None)
    for n in to_save:
        model.get_submodule(n).load_state_dict({k: state[f"{PREFIX}{n}.{k}"] for k in whole_states[n]})
    modules = _lora_modules(model)
    with torch.no_grad():
        for key, (layer, name) in bias_at.items():  # the adapter layer now holding the saved layer's bias
            owner = modules[layer].bias_module if layer is not None else model.get_submodule(name)
            owner.bias.copy_(state[key])
        for name in names:
            m = modules[name]
            m.lora_A.copy_(state[f"{PREFIX}{name}.lora_A.weight"])
            m.lora_B.copy_(state[f"{PREFIX}{name}.lora_B.weight"])
            if use_dora:
                m.magnitude.copy_(state[f"{PREFIX}{name}.lora_magnitude_vector"])
            if mica:  # MiCA (init_lora_weights="mica") trains lora_A only, as PEFT does
                m.lora_B.requires_grad_(False)
    _load_token_rows(state, tokens, model)
    return model
