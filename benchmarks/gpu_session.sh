#!/usr/bin/env bash
# The GPU work of a session, in parts that each fit one device call (10 minutes; the GPU machine
# starts bare, so each part builds what it needs). Run from the repository root on the GPU machine:
#
#     bash benchmarks/gpu_session.sh first     # with 15 minutes of device time (the present budget: one
#                                              # call after the machine's start), the prepared-but-unmeasured
#                                              # single-kernel paths only: their tests, then their rows
#     bash benchmarks/gpu_session.sh check     # build the extension, GPU tests, compute-sanitizer
#     bash benchmarks/gpu_session.sh lora      # LoRA: vs HF PEFT, backends side by side, fused-forward sweep,
#                                              # host time per piece
#     bash benchmarks/gpu_session.sh quant     # QLoRA fwd+bwd and decode, 4-bit matmul tiles, NF4 vs bnb
#     bash benchmarks/gpu_session.sh rest      # DoRA, sparse, whole model
#     bash benchmarks/gpu_session.sh peft      # HF PEFT's tuner layers (LoRA, AdaLoRA, VeRA, LoHa, DeLoRA, VB-LoRA, SHiRA, LoKr)
#                                              # unpatched and patched, and their GPU test
#     bash benchmarks/gpu_session.sh experts   # PEFT's LoRA on MoE experts' weights (target_parameters), unpatched
#                                              # and patched (torch grouped GEMMs; no build needed): its GPU test, one
#                                              # layer, and a Qwen3-MoE-shaped whole-model step (bench_model.py --moe)
#
# Everything lands in $OUT (at most 8 files come back from the device tool): JSON named
# <bench>_<gpu>.json for benchmarks/results/, and a log per part. bitsandbytes / torchao wheels in
# .whl/ (carried) are installed first when present; the benchmarks skip their rows otherwise.
set -uo pipefail
part=${1:?usage: gpu_session.sh first|check|lora|quant|rest|peft|experts}
OUT=${OUT:-/tmp/peft_kernels_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
log="$OUT/${part}.log"

build() {  # the CUDA extension in place (~30 s on 16 cores), then insist that it loads
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PEFT_KERNELS_BUILD_CUDA=1 python3 setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 \
    || { echo "extension build failed (build.log)"; return 1; }
  export PEFT_KERNELS_EXPECT_EXTENSION=1
}

step() {  # step SECONDS CMD...: one bounded step; a hang or crash is logged, the part goes on
  local limit=$1; shift
  echo "== $* (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$log"
}

case "$part" in
  first)
    # (limits: build ~30 s + 150 + 150 + 120 = about 8 minutes, inside one call with the start's margin)
    build
    # the single-kernel CUDA paths against the oracle, and the direct-op bad inputs (open crash bug;
    # the test runs them in a child process and reports the signal and backtrace)
    step 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE -k "small_m or bad_inputs" \
      tests/test_lora_cuda_gpu.py tests/test_qlora_gpu.py
    # LoRA at M = 16 / 64: "cuda small-M fwd" (#3's ≤ 1.15x forward goal) and "cuda small-M fwd+bwd"
    step 150 python3 benchmarks/bench_lora_backends.py --ms 16,64 --out "$OUT/lora_backends_small_m_$gpu.json"
    # the frozen 4-bit decode (#4's ≤ 0.5x F.linear goal): "cuda small-M" beside the Triton paths
    step 120 python3 benchmarks/bench_qlora.py --forward-only --out "$OUT/qlora_decode_$gpu.json"
    ;;
  check)
    build
    # CUBLAS_WORKSPACE_CONFIG: cuBLAS's deterministic mode, for tests/test_determinism.py's GPU test
    # -n 8 (pytest-xdist is on the GPU machine): the Triton compiles run in parallel; 152 tests in
    # about 80 s on 2026-11-24 instead of minutes
    # the CUDA C++ single-kernel forwards first, alone: their first GPU run (a fault there must not
    # take the rest of the tier with it)
    # (limits: build ~30 s + 90 + 330 + 120 stays inside one 10-minute device call)
    step 90 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE -k small_m tests/test_lora_cuda_gpu.py \
      tests/test_qlora_gpu.py
    CUBLAS_WORKSPACE_CONFIG=:4096:8 step 330 python3 -m pytest -q -m gpu -p no:cacheprovider -n 8 -rfE \
      -k "not small_m" tests
    if command -v compute-sanitizer >/dev/null; then
      step 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
        tests/test_lora_cuda_gpu.py -k "oracle and 37"
    else
      echo "compute-sanitizer not found" | tee -a "$log"
    fi
    ;;
  lora)
    build
    step 200 python3 benchmarks/bench_lora.py --out "$OUT/lora_$gpu.json"
    step 150 python3 benchmarks/bench_lora_backends.py --out "$OUT/lora_backends_$gpu.json"
    # the forward's K splits at decode sizes (the full tile sweep: lora_fused_h100.json of 2026-11-24)
    step 150 python3 benchmarks/lora_fused_sweep.py --passes fwd --ms 1,16,64 --bn 16,64 --bk 128 --split 1,2,4,8 \
      --out "$OUT/lora_fused_$gpu.json"
    # host issue time vs back-to-back time per piece: which of host and device limits small M
    step 45 python3 benchmarks/lora_host_pieces.py \
      >"$OUT/lora_host_$gpu.txt"
    # our host code alone per op (Triton launches stubbed): compare with the CPU figures in NOTES.md
    step 30 python3 benchmarks/host_stubbed.py --device cuda --reps 500 --out "$OUT/host_stubbed_$gpu.json"
    # Triton's launch path vs the fast relaunch (PEFT_KERNELS_FAST_LAUNCH): decides whether it goes on
    step 90 python3 benchmarks/launch_overhead.py --out "$OUT/launch_overhead_$gpu.json"
    ;;
  quant)
    build  # the decode rows include the CUDA C++ single-kernel forward ("cuda small-M")
    step 200 python3 benchmarks/bench_qlora.py --out "$OUT/qlora_$gpu.json"
    step 60 python3 benchmarks/bench_qlora.py --forward-only --out "$OUT/qlora_decode_$gpu.json"
    step 200 python3 benchmarks/quant_matmul_tiles.py --out "$OUT/quant_matmul_tiles_$gpu.json"
    step 60 python3 benchmarks/quant_bnb_check.py --out "$OUT/quant_bnb_$gpu.json"
    ;;
  rest)
    # --no-compile: its torch.compile row would not fit this part's 10 minutes beside the others
    step 150 python3 benchmarks/bench_dora.py --no-compile --out "$OUT/dora_$gpu.json"
    step 150 python3 benchmarks/bench_sparse.py --out "$OUT/sparse_$gpu.json"
    step 250 python3 benchmarks/bench_model.py --out "$OUT/model_$gpu.json"
    ;;
  peft)
    # (limits: build ~30 s + 120 + 380 < 600: the Triton compiles for ranks 64 (LoHa r=8) and 256 (VeRA) are new; LoKr adds two rows a shape)
    build
    step 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE -k patched_peft tests/test_lora_gpu.py
    step 380 python3 benchmarks/bench_tuners.py --out "$OUT/tuners_$gpu.json"
    ;;
  experts)
    step 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_peft_experts.py
    step 240 python3 benchmarks/bench_experts.py --out "$OUT/experts_$gpu.json"
    step 200 python3 benchmarks/bench_model.py --moe --out "$OUT/model_moe_$gpu.json"
    ;;
  *)
    echo "unknown part $part: expected first, check, lora, quant, rest, peft or experts" >&2
    exit 2
    ;;
esac
