"""The `peft-kernels` command.

    peft-kernels info [--json]   versions, devices, which backends run here and why others do not
    peft-kernels bench [--op lora|qlora|dora|sparse|model|tuners|experts] [...]
                                 fwd+bwd benchmarks as ratios to the frozen floor (default: LoRA);
                                 --op model: the whole-model step; --op tuners: HF PEFT's tuner
                                 layers unpatched and patched; --op experts: PEFT's LoRA on MoE
                                 experts' weights, unpatched and patched; --help for each one's options
    peft-kernels demo [...]      fine-tune a small LLaMA-shaped model: lora | qlora | dora | sparse,
                                 --compare-peft
"""
from __future__ import annotations

import argparse
import json
import sys


def _info(argv) -> int:
    parser = argparse.ArgumentParser(prog="peft-kernels info",
                                     description="Versions, devices, and which backends run here and why others do not")
    parser.add_argument("--json", action="store_true", help="print peft_kernels.info() as JSON instead")
    args = parser.parse_args(argv)
    from .info import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(f"peft_kernels {data['peft_kernels']}  python {data['python']}  torch {data['torch']} "
          f"(cuda {data['torch_cuda']})  triton {data['triton']}")
    if data["triton_interpret"]:
        print("TRITON_INTERPRET=1: Triton kernels run interpreted on CPU tensors (slow; for tests)")
    print(f"CUDA extension: {data['cuda_extension']}")
    print("with: " + "  ".join(f"{k} {v or 'not installed'}" for k, v in data["integrations"].items()))
    print(f"auto rules on a GPU (backend, max M): {json.dumps(data['auto_rules'])}")
    print("patch_peft_model computes these HF PEFT layers (any other keeps PEFT's forward, listed in its report):")
    for layer, how in data["patch_peft_model"].items():
        print(f"  {layer}: {how}")
    if data["deterministic"]:
        print("torch.use_deterministic_algorithms is on: split reductions sum per-split slices (no atomics); "
              "auto skips the cuda backend")
    if data["triton_paths"]:
        print("kernel size rules and opt-in kernels (0 / off = not used until timed on a GPU):")
        for k, v in data["triton_paths"].items():
            print(f"  {k} {('on' if v else 'off') if isinstance(v, bool) else v}")
    for dev, entry in data["devices"].items():
        print(f"\n{dev}: {entry['name']}")
        for backend, status in entry["backends"].items():
            print(f"  {backend:<7} {status}")
        print(f"  auto -> {json.dumps(entry['auto'])}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="peft-kernels", description="Fused kernels for parameter-efficient fine-tuning")
    parser.add_argument("command", choices=["info", "bench", "demo"],
                        help="info: what runs here; bench: benchmarks (--op); demo: a small fine-tune")
    args = parser.parse_args(argv[:1])
    if args.command == "info":
        return _info(argv[1:])
    if args.command == "demo":
        from .demo import main as demo

        demo(argv[1:])
        return 0
    import os

    import torch

    if not torch.cuda.is_available():
        # Run the Triton kernels interpreted too (must be chosen before triton is imported).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    ops = argparse.ArgumentParser(add_help=False)
    ops.add_argument("--op", choices=["lora", "qlora", "dora", "sparse", "model", "tuners", "experts"], default="lora")
    chosen, rest = ops.parse_known_args(argv[1:])
    if "-h" in rest or "--help" in rest:
        print(f"peft-kernels bench --op {{lora,qlora,dora,sparse,model,tuners,experts}} (this is --op {chosen.op}):\n")
    import importlib

    return importlib.import_module(f".bench.{chosen.op}", __package__).main(rest)


if __name__ == "__main__":
    sys.exit(main())
