"""DoRA fwd+bwd benchmark; see peft_kernels/bench/dora.py.

    python benchmarks/bench_dora.py --out benchmarks/results/dora_h100.json
"""
import sys

from peft_kernels.bench import dora

if __name__ == "__main__":
    sys.exit(dora.main())
