"""HF PEFT tuner layers, unpatched and patched; see peft_kernels/bench/tuners.py.

    python benchmarks/bench_tuners.py --out benchmarks/results/tuners_h100.json
"""
import sys

from peft_kernels.bench import tuners

if __name__ == "__main__":
    sys.exit(tuners.main())
