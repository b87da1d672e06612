"""LoRA fwd+bwd benchmark.

Script mode (writes the JSON committed under benchmarks/results/):
    python benchmarks/bench_lora.py --out benchmarks/results/lora_<device>.json
pytest-benchmark mode (one mid-sized shape, GPU only):
    python -m pytest benchmarks/bench_lora.py --benchmark-only
"""
import sys

import pytest
import torch

from peft_kernels.bench import lora


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["floor", "eager p=0.05", "HF PEFT p=0.05", "peft_kernels p=0.05"])
def test_lora_fwd_bwd(benchmark, case):
    named = lora.cases(4096, 4096, 4096, torch.device("cuda"), torch.bfloat16, include_compile=False)
    if case not in named:
        pytest.skip(f"{case} not available here")
    fn = named[case]

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, warmup_rounds=5, rounds=25)


if __name__ == "__main__":
    sys.exit(lora.main())
