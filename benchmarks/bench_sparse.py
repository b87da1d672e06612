"""Sparse fine-tuning fwd+bwd benchmark; see peft_kernels/bench/sparse.py.

    python benchmarks/bench_sparse.py --out benchmarks/results/sparse_h100.json
"""
import sys

from peft_kernels.bench import sparse

if __name__ == "__main__":
    sys.exit(sparse.main())
