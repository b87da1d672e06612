"""Save and load LoRA / DoRA adapters in HF PEFT's format (adapter_config.json +
adapter_model.safetensors), so an adapter trained with peft_kernels loads in HF PEFT and back —
over any base apply_lora makes (bf16/fp16/fp32, NF4/FP4, INT8/INT4).

Keys follow PEFT's saved layout: ``base_model.model.<module name>.lora_A.weight`` / ``.lora_B.weight``,
and for DoRA ``.lora_magnitude_vector``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .apply import apply_lora
from .nn._adapter import LoRAAdapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def _lora_modules(model: nn.Module) -> dict[str, LoRAAdapter]:
    """Every adapter module of ``model``: LoRALinear, DoRALinear, QLoRALinear, QDoRALinear,
    IntQLoRALinear, IntQDoRALinear."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAAdapter)}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the LoRA (or DoRA) adapters of ``model`` (one r / alpha / dropout / rsLoRA / DoRA
    setting for all, as apply_lora makes them) to ``directory`` in PEFT's format."""
    from safetensors.torch import save_file

    modules = _lora_modules(model)
    if not modules:
        raise ValueError("save_adapter: the model has no LoRA adapter modules (apply_lora makes them)")
    settings = {(m.r, m.alpha, m.dropout, m.use_rslora, hasattr(m, "magnitude")) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"save_adapter: all adapters must share r/alpha/dropout/use_rslora/DoRA, "
                         f"got {sorted(settings)}")
    r, alpha, dropout, use_rslora, use_dora = settings.pop()
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
    save_file(tensors, str(directory / WEIGHTS_NAME))
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
        "target_modules": sorted(modules), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": use_dora,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_adapter(model: nn.Module, directory: str | Path, backend: str = "auto",
                 quantize: str | None = None, quant_options: dict | None = None) -> nn.Module:
    """Put the PEFT-format LoRA (or DoRA) adapter in ``directory`` on ``model`` (its nn.Linear
    modules become adapter layers, everything else is frozen) and return the model. ``quantize``
    ("nf4" | "fp4" | "int8" | "int4") and ``quant_options`` store the adapted base weights
    quantized, as apply_lora does."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapter: peft_type {config.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("fan_in_fan_out", "rank_pattern", "alpha_pattern") if config.get(k)]
    if unsupported or config.get("bias", "none") != "none":
        raise ValueError(f"load_adapter: adapter options not supported yet: {unsupported or ['bias']}")
    use_dora = bool(config.get("use_dora"))
    state = load_file(str(directory / WEIGHTS_NAME))
    names = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in state if k.startswith(PREFIX)})
    if len(names) * (3 if use_dora else 2) != len(state):
        known = (".lora_A.", ".lora_B.", ".lora_magnitude_vector")
        raise ValueError(f"load_adapter: unexpected keys in {WEIGHTS_NAME}: "
                         f"{[k for k in state if not any(p in k for p in known)][:5]}")
    # The saved names are full module names: match them exactly (a list would also take any module
    # whose name ends in "." + name, e.g. "1.0" for "0").
    exact = "|".join(re.escape(n) for n in names)
    apply_lora(model, exact, r=config["r"], alpha=config["lora_alpha"], dropout=config["lora_dropout"],
               use_rslora=config.get("use_rslora", False), backend=backend, quantize=quantize, use_dora=use_dora,
               quant_options=quant_options)
    modules = _lora_modules(model)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"load_adapter: the model has no nn.Linear named {missing[:5]}")
    with torch.no_grad():
        for name in names:
            m = modules[name]
            m.lora_A.copy_(state[f"{PREFIX}{name}.lora_A.weight"])
            m.lora_B.copy_(state[f"{PREFIX}{name}.lora_B.weight"])
            if use_dora:
                m.magnitude.copy_(state[f"{PREFIX}{name}.lora_magnitude_vector"])
    return model
