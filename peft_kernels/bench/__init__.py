"""Benchmark harness shared by `peft-kernels bench` and benchmarks/bench_*.py."""
