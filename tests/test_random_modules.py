"""Random module configurations (fixed seeds), end to end through what a user does with them:
apply_lora over a small model (dense, NF4/FP4/INT8/INT4 bases, LoRA or DoRA, dropout, rsLoRA,
fp64/fp32/bf16; a first layer that is an nn.Linear, GPT-2's Conv1D or a subclass with its own forward), a training step, dropout replayed by the seed, save_adapter / load_adapter onto
a fresh base (identical outputs), merge / unmerge (dense bases), casts there and back (quantized
bases: the quantization state stays exact). Each case checks properties tested one by one
elsewhere; together they catch what only a combination breaks."""
import copy
import random

import pytest
import torch
from torch import nn

import peft_kernels
from peft_kernels.nn import LoRALinear

CASES = 80


def _config(seed: int) -> dict:
    rng = random.Random(seed)
    quant = rng.choice([None, None, "nf4", "fp4", "int8", "int4"])
    sizes = [64, 128, 192] if quant == "int4" else [7, 32, 33, 64, 96]
    cfg = dict(quant=quant, dims=[rng.choice(sizes) for _ in range(3)], dora=rng.random() < 0.4,
               bias=rng.random() < 0.7, r=rng.choice([1, 2, 3, 8]), alpha=rng.choice([1, 8, 16.0]),
               p=rng.choice([0.0, 0.0, 0.1, 0.5]), rslora=rng.random() < 0.3,
               dtype=rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16]),
               targets=rng.choice([["0"], ["2"], ["0", "2"], "all-linear"]))
    # the first layer: an nn.Linear, GPT-2's Conv1D ([in, out] weight), or a subclass with a forward
    # of its own (a LoRABranchLinear beside it; LoRA only, over its own dense computation)
    first = rng.choice(["linear", "linear", "linear", "conv1d", "scaled"])
    cfg["first"] = "linear" if first == "scaled" and (cfg["quant"] or cfg["dora"]) else first
    return cfg


class Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _first_layer(cfg, d0, d1):
    if cfg["first"] == "conv1d":
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        return conv1d(d1, d0)  # always with a bias
    return (Scaled if cfg["first"] == "scaled" else nn.Linear)(d0, d1, bias=cfg["bias"])


@pytest.mark.parametrize("seed", range(CASES))
def test_random_module_configuration(seed, tmp_path):
    cfg = _config(seed)
    torch.manual_seed(seed)
    d0, d1, d2 = cfg["dims"]
    base = nn.Sequential(_first_layer(cfg, d0, d1), nn.GELU(),
                         nn.Linear(d1, d2, bias=cfg["bias"])).to(cfg["dtype"])
    model = peft_kernels.apply_lora(copy.deepcopy(base), cfg["targets"], r=cfg["r"], alpha=cfg["alpha"],
                                    dropout=cfg["p"], use_rslora=cfg["rslora"], quantize=cfg["quant"],
                                    use_dora=cfg["dora"])
    for m in model.modules():
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B, std=0.1)
            if hasattr(m, "magnitude"):
                m.magnitude.data.mul_(1.3)
    x = torch.randn(5, d0, dtype=cfg["dtype"])

    model.train()
    torch.manual_seed(1)
    y = model(x)
    y.float().square().sum().backward()
    torch.manual_seed(1)
    assert torch.equal(model(x), y)  # the dropout mask is a function of the drawn seed
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "magnitude" in n) for n in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())

    model.eval()
    y_eval = model(x)
    peft_kernels.save_adapter(model, tmp_path)
    loaded = peft_kernels.load_adapter(copy.deepcopy(base), tmp_path, quantize=cfg["quant"])
    assert torch.equal(loaded.eval()(x), y_eval)

    if cfg["quant"] is None:
        layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        for m in layers:
            m.merge()
        tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 6e-2}[cfg["dtype"]]
        assert (model(x) - y_eval).abs().max() <= tol * (1 + y_eval.abs().max())
        for m in layers:
            m.unmerge()
    else:
        state = {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1].startswith("qweight_")}
        model.half().to(cfg["dtype"])
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
