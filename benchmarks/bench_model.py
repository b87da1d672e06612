"""Whole-model step benchmark; see peft_kernels/bench/model.py.

    python benchmarks/bench_model.py --out benchmarks/results/model_h100.json
"""
import sys

from peft_kernels.bench import model

if __name__ == "__main__":
    sys.exit(model.main())
