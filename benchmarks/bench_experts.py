"""LoRA on MoE experts' weights (PEFT target_parameters), unpatched and patched; see peft_kernels/bench/experts.py.

    python benchmarks/bench_experts.py --out benchmarks/results/experts_h100.json
"""
import sys

from peft_kernels.bench import experts

if __name__ == "__main__":
    sys.exit(experts.main())
