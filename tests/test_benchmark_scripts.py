"""CPU tier: the GPU-only benchmark scripts that `benchmarks/gpu_session.sh` runs and no
`peft-kernels bench` test covers run end to end here (triton interpreted, fp32, tiny shapes), so a
broken script is found before it costs GPU time. Their figures here are CPU ones and not
measurements; what is checked is that every case runs, the JSON is complete, and the products the
sweep compares against its own reference agree."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def _run(script, *args, tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--device", "cpu", *args,
                           "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _module(script):
    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_lora_backends_runs(tmp_path):
    data, stdout = _run("bench_lora_backends.py", "--kn", "40x24", "--ms", "5", "--reps", "1", tmp_path=tmp_path)
    assert "backend cuda skipped" in stdout  # said, not silently dropped
    cases = {(r["mode"], r["case"]) for r in data["rows"]}
    for mode in ("fwd+bwd", "forward"):
        assert {(mode, c) for c in ("floor", "triton", "triton fused-fwd", "triton fused fwd+bwd")} <= cases
    assert data["env"]["device_type"] == "cpu" and data["config"]["dtype"] == "float32"


def test_quant_matmul_tiles_runs_and_every_path_is_right(tmp_path):
    data, _ = _run("quant_matmul_tiles.py", "--nk", "40x128", "--ms", "5", "--reps", "1", tmp_path=tmp_path)
    sweep = _module("quant_matmul_tiles.py")
    assert len(data["decoders"]) == len(sweep.DECODES) and all(d["exact"] for d in data["decoders"])
    # both directions; the split-K forward has no backward
    assert len(data["rows"]) == 2 * (len(sweep.FUSED) + len(sweep.ALIGNED) + len(sweep.CHUNKS)) + len(sweep.SPLITK)
    assert {row["path"] for row in data["rows"]} == {"fused", "fused_aligned", "splitk", "chunked"}
    for row in data["rows"]:  # fp32 against the float product of the decoded weight
        assert row["ms"] is not None and row["max_err"] < 1e-4, row


def test_lora_fused_sweep_runs(tmp_path):
    # the script itself asserts that every fused configuration matches the unfused path
    data, _ = _run("lora_fused_sweep.py", "--shapes", "48x40", "--ms", "3", "--bn", "16,32", "--bk", "16",
                   "--stages", "2", "--split", "1,2", "--bwd-bn", "16", "--bwd-bk", "16,32", "--reps", "1", tmp_path=tmp_path)
    cases = {(r["direction"], r["case"]) for r in data["rows"]}
    assert {("fwd", "fused bn=16 bk=16 stages=2 split=1"), ("fwd", "fused bn=32 bk=16 stages=2 split=2"),
            ("bwd", "fused bn=16 bk=16 stages=2"), ("bwd", "fused bn=16 bk=32 stages=2"),
            ("bwd", "dy/dx kernels + cuBLAS")} <= cases, cases
    assert all(r.get("ms") is not None for r in data["rows"]), [r for r in data["rows"] if "error" in r]


def test_bench_model_moe_runs(tmp_path):
    """--moe: the Qwen3-MoE-shaped model (tiny on CPU) with LoRA on attention and the experts'
    weights: floor, HF PEFT and patched (the experts' chains patched, none left to PEFT); the README
    table renders it."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers.integrations.moe")
    out = tmp_path / "model_moe.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--device", "cpu", "--moe",
                           "--layers", "1", "--reps", "1", "--out", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "left unpatched" not in proc.stderr
    data = json.loads(out.read_text())
    assert [r["case"] for r in data["results"]] == ["all weights frozen (floor)", "HF PEFT moe-lora p=0",
                                                     "peft_kernels (patched PEFT) moe-lora p=0"]
    assert data["config"]["num_experts"] == 8 and "mlp.experts.down_proj" in data["config"]["targets"]
    assert all(r["saved_mib"] > 0 for r in data["results"])
    assert "moe-lora" in _module("results_table.py").model_table(out)


def test_bench_model_runs_and_renders_in_the_readme_table(tmp_path):
    """The whole-model benchmark on CPU (tiny LLaMA, one layer): every case runs, each reports what
    autograd keeps for backward, and results_table.py renders its JSON (as it will the GPU one)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    out = tmp_path / "model.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--device", "cpu",
                           "--layers", "1", "--reps", "1", "--out", str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    cases = [r["case"] for r in data["results"]]
    assert cases[0] == "all weights frozen (floor)" and "peft_kernels (patched PEFT) dora p=0.05" in cases
    assert all(r["saved_mib"] > 0 for r in data["results"])
    model_table = _module("results_table.py").model_table
    table = model_table(out)
    assert all(c in table for c in cases) and "saved for bwd MiB" in table
    assert all(r["host_issue_ms"] is None for r in data["results"]) and "host issue" not in table  # CPU: no such figure
    for i, r in enumerate(data["results"]):  # a GPU run's JSON carries the host issue time of each step
        r["host_issue_ms"] = 10.0 + i
    out.write_text(json.dumps(data))
    rows = [line for line in model_table(out).splitlines() if line.startswith("| all weights frozen")]
    assert "host issue ms" in model_table(out) and rows and "| 10.0 |" in rows[0]
    assert all(r["graphed_ms"] is None and r["graphed_ratio"] is None for r in data["results"])  # CPU: none
    assert "graphed" not in model_table(out)
    for i, r in enumerate(data["results"]):  # a GPU run's JSON carries each step replayed from a CUDA graph
        r["graphed_ratio"] = 1.0 + i / 100
    out.write_text(json.dumps(data))
    table = model_table(out)
    rows = [line for line in table.splitlines() if line.startswith("| all weights frozen")]
    assert "graphed / floor" in table and "| 1.00× | 10.0 |" in rows[0]


def test_host_stubbed_runs(tmp_path):
    data, stdout = _run("host_stubbed.py", "--reps", "5", tmp_path=tmp_path)
    assert data["launches"] == "stubbed" and "host us per fwd+bwd" in stdout
    assert [r["op"].split()[0] for r in data["rows"]] == ["lora_linear", "dora_linear", "dora_linear", "qlora_linear",
                                                          "sparse_delta_linear", "patched"]
    assert all(r["host_us"] > 0 for r in data["rows"])


def test_launch_overhead_runs(tmp_path):
    # on CPU only Triton's own path runs (the relaunch needs compiled kernels); every case reports
    data, stdout = _run("launch_overhead.py", "--reps", "2", tmp_path=tmp_path)
    assert [r["case"].split()[0] for r in data["rows"]] == ["lora_linear", "lora_linear", "qlora_linear",
                                                             "quant_linear"]
    assert all(r["host_us"] > 0 and r["eager_ms"] > 0 and not r["fast_launch"] for r in data["rows"])
