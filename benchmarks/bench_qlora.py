"""QLoRA (NF4 base) fwd+bwd benchmark; see peft_kernels/bench/qlora.py.

    python benchmarks/bench_qlora.py --out benchmarks/results/qlora_h100.json
    python benchmarks/bench_qlora.py --forward-only --out benchmarks/results/qlora_decode_h100.json
"""
import sys

from peft_kernels.bench import qlora

if __name__ == "__main__":
    sys.exit(qlora.main())
