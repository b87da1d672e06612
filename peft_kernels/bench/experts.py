"""LoRA on an MoE experts module's weights (HF PEFT's target_parameters) fwd+bwd, unpatched and patched.

One transformers MixtralExperts module (E experts, gate_up_proj [E, 2N, K], down_proj [E, K, N],
SiLU-gated), frozen, run by transformers' grouped_mm experts implementation, M tokens each routed
to top_k experts (seeded random routing, softmaxed weights). Cases: the frozen experts (the floor:
forward and dX), "HF PEFT experts" (LoRA r=16 on both weights through PEFT's ParamWrappers, which
form W + s·B_e A_e for every expert each call), and "patched experts" (the same module after
patch_peft_model: the frozen weights' grouped products plus each expert's rank-r products, no
[E, out, in] stack; torch's grouped GEMMs, not a kernel of ours). Shapes are M x K -> N = tokens x
hidden -> the experts' intermediate width; --experts / --top-k set E and k (defaults per shape below).

    python benchmarks/bench_experts.py --out benchmarks/results/experts_h100.json
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys

import torch

from . import harness

RANK = 16
# (M tokens, K hidden, N intermediate) -> (experts, top_k): a Qwen3-30B-A3B-shaped layer (128 experts of
# 2048 -> 768, top 8) and a Mixtral-8x7B-shaped one (8 experts of 4096 -> 14336, top 2), 4096 tokens
GPU_SHAPES = [(4096, 2048, 768), (4096, 4096, 14336)]
CPU_SHAPES = [(256, 256, 128), (128, 128, 512)]
ROUTING = {(2048, 768): (128, 8), (4096, 14336): (8, 2), (256, 128): (32, 4), (128, 512): (8, 2)}
DEFAULT_ROUTING = (8, 2)


def experts_module(K: int, N: int, experts: int, device, dtype):
    """A frozen transformers MixtralExperts (hidden K, intermediate N) run by the grouped_mm
    implementation, weights drawn ~ 1/sqrt(fan-in)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=K, intermediate_size=N, num_local_experts=experts)
    config._experts_implementation = "grouped_mm"
    module = MixtralExperts(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.gate_up_proj.normal_(0.0, K ** -0.5)
        module.down_proj.normal_(0.0, N ** -0.5)
    return module.requires_grad_(False)


def peft_experts(module, rank: int = RANK):
    """HF PEFT's ParamWrapper chain (LoRA r=``rank`` on gate_up_proj and down_proj) around ``module``,
    every adapter factor drawn non-zero, in the weights' dtype."""
    import peft

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = module

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    chain = peft.get_peft_model(Holder(), config, autocast_adapter_dtype=False).base_model.model.experts
    weight = module.down_proj
    for p in chain.parameters():
        if p.requires_grad:
            p.data = p.data.to(weight.dtype)
    return chain


def routing(M: int, experts: int, top_k: int, device, dtype):
    """(top_k_index [M, top_k], top_k_weights [M, top_k]): distinct random experts per token, softmaxed weights."""
    g = torch.Generator().manual_seed(2)
    index = torch.rand(M, experts, generator=g).argsort(dim=1)[:, :top_k]
    weights = torch.randn(M, top_k, generator=g).softmax(dim=1)
    return index.to(device), weights.to(device=device, dtype=dtype)


def cases(M, K, N, device, dtype, experts: int, top_k: int):
    """{name: fwd+bwd callable}: the frozen experts (floor), HF PEFT's chain, the patched chain."""
    from .. import patch_peft_model

    torch.manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, K, device=device, dtype=dtype)
    index, weights = routing(M, experts, top_k, device, dtype)
    frozen = experts_module(K, N, experts, device, dtype)
    chain = peft_experts(copy.deepcopy(frozen))
    patched = copy.deepcopy(chain)
    report = patch_peft_model(patched)
    if report.skipped:  # recorded, not hidden: the "patched" row would be PEFT's forward
        print(f"\n  (patched experts left to PEFT: {next(iter(report.skipped.values()))})", file=sys.stderr)
    out = {}
    for label, module in (("floor", frozen), ("HF PEFT experts", chain), ("patched experts", patched)):
        params = [x] + [p for p in module.parameters() if p.requires_grad]
        out[label] = harness.fwd_bwd_step(lambda module=module: module(x, index, weights), params, dy)
        # a loop over experts (CPU float32 or unaligned widths) reads their token counts on the host
        out[label].graphable = device.type == "cuda"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_experts", description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=harness.positive_int, default=None, help="E (default: per shape)")
    ap.add_argument("--top-k", type=harness.positive_int, default=None, help="experts per token (default: per shape)")
    args = harness.add_bench_args(ap).parse_args(argv)
    for lib in ("peft", "transformers"):
        if importlib.util.find_spec(lib) is None:
            ap.error(f"the experts benchmark builds transformers' experts under HF PEFT: pip install {lib}")
    device, shapes, dtype, reps = harness.bench_setup(args, GPU_SHAPES, CPU_SHAPES)

    def routing_for(K, N):
        E, k = ROUTING.get((K, N), DEFAULT_ROUTING)
        E = args.experts or E
        k = args.top_k or min(k, E)
        if k > E:
            ap.error(f"--top-k {k} exceeds the {E} experts")
        return E, k

    for K, N in {(K, N) for _, K, N in shapes}:
        routing_for(K, N)  # option errors before any timing
    payload = harness.run_shapes("experts", shapes, lambda M, K, N: cases(M, K, N, device, dtype, *routing_for(K, N)),
                                 device, reps)
    payload["benchmark"] = "LoRA on MoE experts (target_parameters) fwd+bwd"
    payload["config"].update(dtype=str(dtype), rank=RANK, routing={f"{K}->{N}": dict(zip(("experts", "top_k"),
                                                                                        routing_for(K, N)))
                                                                   for _, K, N in shapes})
    harness.report(payload, args.out, args.plot)
    return 0
