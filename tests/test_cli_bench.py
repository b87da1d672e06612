"""`peft-kernels bench --op ...` on CPU: every benchmark runs end to end on small shapes, writes
its JSON and a PNG chart, and the table covers every case."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from peft_kernels.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("op,extra", [("lora", ["--shapes", "48x64x40", "--no-compile"]),
                                      ("qlora", ["--shapes", "48x128x128"]),  # torchao NF4 needs in·out % 16384 == 0
                                      ("dora", ["--shapes", "48x64x40", "--no-compile"]),
                                      ("sparse", ["--shapes", "48x64x40"]),
                                      ("tuners", ["--shapes", "16x64x48", "--tuners", "loha,vera"])])
def test_bench_ops_write_json_and_plot(op, extra, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / f"{op}.json", tmp_path / f"{op}.png"
    assert main(["bench", "--op", op, "--reps", "1", "--out", str(out), "--plot", str(png)] + extra) == 0
    data = json.loads(out.read_text())
    cases = {r["case"] for r in data["results"]}
    assert "floor" in cases and len(cases) >= 3
    assert all(r["ms"] > 0 for r in data["results"])
    if op == "qlora":
        assert {"peft_kernels INT8 QLoRALinear p=0.05", "peft_kernels INT4 QLoRALinear p=0.05"} <= cases
        if importlib.util.find_spec("torchao") is not None:
            assert "torchao NF4 + eager LoRA p=0.05" in cases
        if importlib.util.find_spec("bitsandbytes") is not None:
            assert {"bitsandbytes Linear4bit (frozen NF4)", "HF PEFT QLoRA (bnb), fp32 adapters p=0.05"} <= cases
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "floor" in capsys.readouterr().out
    markdown = out.with_suffix(".md").read_text()  # the table beside the JSON, one row a case
    assert "M x K -> N" in markdown.splitlines()[2] and markdown.count("\n| ") == len(data["results"]) + 1
    assert all(r["saved_mib"] is not None for r in data["results"] if "compile" not in r["case"])
    if op != "lora":  # README tables (results_table.py) render these JSONs with the new column
        spec = importlib.util.spec_from_file_location("results_table", ROOT / "benchmarks" / "results_table.py")
        results_table = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(results_table)
        assert "saved for bwd MiB" in results_table.case_rows_table(out)


def test_bench_qlora_decode_has_the_decode_candidates(tmp_path, monkeypatch):
    # the decode run (--forward-only) carries the 4-bit decode candidates beside the default path
    from peft_kernels.triton import quant_matmul
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(quant_matmul, "DECODE_CANDIDATES", quant_matmul.DECODE_CANDIDATES[:2])  # interpreted: slow
    monkeypatch.setattr(quant_matmul, "SPLITK_CANDIDATES", quant_matmul.SPLITK_CANDIDATES[:1])
    out = tmp_path / "decode.json"
    assert main(["bench", "--op", "qlora", "--forward-only", "--reps", "1", "--shapes", "16x128x128",
                 "--out", str(out)]) == 0
    cases = {r["case"] for r in json.loads(out.read_text())["results"]}
    labels = {f"peft_kernels matmul_4bit {path} " + "x".join(map(str, t)) + " (frozen NF4)"
              for path, tiles in (("fused_aligned", quant_matmul.DECODE_CANDIDATES),
                                  ("splitk", quant_matmul.SPLITK_CANDIDATES)) for t in tiles}
    assert len(labels) == 3 and labels | {"peft_kernels quant_linear (frozen NF4)", "floor"} <= cases


def test_bench_model_on_cpu(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "model.json"
    assert main(["bench", "--op", "model", "--reps", "1", "--layers", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows[0]["case"] == "all weights frozen (floor)" and rows[0]["ratio"] == 1.0
    assert out.with_suffix(".md").read_text().count("\n| ") == len(rows) + 1
    cases = {r["case"]: r for r in rows}
    assert {"HF PEFT dora p=0.05", "peft_kernels (patched PEFT) dora p=0.05"} <= set(cases)
    if "HF PEFT shira p=0" in cases:  # PEFT's SHiRA keeps a whole cloned weight per layer for backward
        assert cases["peft_kernels (patched PEFT) shira p=0"]["saved_mib"] < cases["HF PEFT shira p=0"]["saved_mib"]


def test_bench_tuners_on_cpu(tmp_path):
    """--op tuners: the floor, then each PEFT tuner layer unpatched and patched (the patch leaves none
    of them to PEFT); patched LoHa and LoKr keep far less for backward than PEFT's, which keeps its
    dense [out, in] delta; a bad --tuners list is a usage error."""
    pytest.importorskip("peft")
    out = tmp_path / "tuners.json"
    assert main(["bench", "--op", "tuners", "--reps", "1", "--shapes", "16x256x256", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["benchmark"] == "PEFT tuner layers fwd+bwd"
    cases = {r["case"]: r for r in data["results"]}
    expected = {"floor"} | {f"{who} {t}" for t in ("lora", "adalora", "vera", "loha", "delora", "vblora", "lokr")
                            for who in ("HF PEFT", "patched")}
    assert expected <= set(cases), set(cases)
    for tuner in ("loha", "lokr"):
        assert cases[f"patched {tuner}"]["saved_mib"] < cases[f"HF PEFT {tuner}"]["saved_mib"] / 1.5, tuner
    with pytest.raises(SystemExit):
        main(["bench", "--op", "tuners", "--tuners", "lora,ia3"])


def test_bench_experts_on_cpu(tmp_path):
    """--op experts: the frozen MoE experts, PEFT's LoRA on their weights (target_parameters) and the
    same patched, which keeps less than half of PEFT's for backward (no [E, out, in] stacks); E and
    top-k from the options, recorded in the JSON; top-k above E is a usage error."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers.integrations.moe")
    out = tmp_path / "experts.json"
    assert main(["bench", "--op", "experts", "--reps", "1", "--shapes", "24x64x48", "--experts", "6",
                 "--top-k", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["routing"] == {"64->48": {"experts": 6, "top_k": 2}}
    cases = {r["case"]: r for r in data["results"]}
    assert set(cases) == {"floor", "HF PEFT experts", "patched experts"}
    assert cases["patched experts"]["saved_mib"] < cases["HF PEFT experts"]["saved_mib"] / 2
    with pytest.raises(SystemExit):
        main(["bench", "--op", "experts", "--experts", "2", "--top-k", "3"])


def test_host_timers_measure_the_call_in_microseconds():
    # host_us: one call's issue time; loop_us: back-to-back calls. A 2 ms call must read as
    # about 2000 us in both (the units and the per-call division are what this guards).
    import time

    from peft_kernels.bench.harness import host_us, loop_us
    for timer in (host_us, loop_us):
        us = timer(lambda: time.sleep(0.002), n=5)
        assert 2000 <= us < 20000, (timer.__name__, us)


def test_saved_mib_counts_new_saved_storage_once():
    """The harness's saved-for-backward metric: inputs are not counted, a new saved tensor is,
    once however many views of it are saved, and only while the graph still holds it. (torchao's NF4 wrapper subclass: the qlora bench.)"""
    from peft_kernels.bench.harness import saved_mib
    x = torch.randn(256, 1024, requires_grad=True)  # 1 MiB
    w = torch.randn(1024, 1024)
    assert saved_mib(lambda: x * w[:256]) == 0.0  # mul saves its two inputs: nothing new
    assert saved_mib(lambda: (x * 2).exp()) == 1.0  # exp saves its (new) output
    assert saved_mib(lambda: (x * 2).exp().t().tanh() + 0) == 2.0  # exp's and tanh's outputs
    y = x * 2
    assert saved_mib(lambda: y * y.t().t()) == 0.0  # y existed before the call
    assert saved_mib(lambda: (x * 2).exp().detach() + x) == 0.0  # exp's node is gone with the detach


@pytest.mark.parametrize("argv,message", [
    (["bench", "--shapes", "64x96"], "shape '64x96': expected MxKxN"),
    (["bench", "--op", "dora", "--shapes", "8x64x40,0x64x40"], "shape '0x64x40'"),
    (["bench", "--op", "qlora", "--reps", "0"], "--reps: must be >= 1, got 0"),
    (["bench", "--op", "sparse", "--device", "cuda:99" if torch.cuda.is_available() else "cuda"], "--device: cuda"),
    (["bench", "--op", "model", "--layers", "-1"], "--layers: must be >= 1"),
    (["demo", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["demo", "--lr", "nan"], "--lr: must be a finite number > 0"),
    (["demo", "--device", "tpu"], "not a torch device: 'tpu'"),
    (["info", "--verbose"], "unrecognized arguments: --verbose"),  # was ignored
    (["nope"], "invalid choice: 'nope'"),
])
def test_bad_command_lines_are_usage_errors(argv, message, capsys):
    """A bad option is argparse's usage error (exit 2) naming it, before anything runs — not a
    traceback from deep inside the benchmark, nor a zero-size or zero-step run."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_info_prints_a_table_or_json(capsys):
    import json

    import peft_kernels

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"peft_kernels {peft_kernels.__version__}" in out and "\ncpu: " in out
    # one kernel rule a line (they were one comma-joined line of eleven)
    from peft_kernels.info import triton_paths

    lines = out.splitlines()
    assert all(any(line.startswith(f"  {rule} ") for line in lines) for rule in triton_paths())
    assert "  LoKr Linear: products of its Kronecker factors" in out  # the PEFT layers patch_peft_model computes
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"] == torch.__version__ and data["devices"]["cpu"]["backends"]["torch"] == "available"
    assert data["patch_peft_model"]["SHiRA Linear"] == "sparse_delta_linear"
