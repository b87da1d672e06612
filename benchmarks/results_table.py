"""Regenerate README.md's results section from benchmarks/results/*.json (the LoRA, QLoRA, DoRA and
sparse fwd+bwd benchmarks, PEFT's tuner layers patched and not, PEFT's LoRA on MoE experts patched and
not, the LoRA backends side by side, the whole-model step).

    python benchmarks/results_table.py            # rewrite the block between the README markers
    python benchmarks/results_table.py --print    # print it only
"""
import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _rel(path: Path) -> str:
    """The path as the README cites it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _shape(r):
    return f"{r['M']}×{r['K']}→{r['N']}"


def lora_table(path: Path) -> str:
    data = json.loads(path.read_text())
    env, results = data["env"], data["results"]
    shapes = list(dict.fromkeys(_shape(r) for r in results))
    cases = [c for c in dict.fromkeys(r["case"] for r in results) if c != "floor"]
    by = {(_shape(r), r["case"]): r for r in results}
    head = ["M×K→N", "floor ms"] + cases + ["peak extra MiB: floor / PEFT / ours p=0.05"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in shapes:
        floor = by[(s, "floor")]
        row = [s, f"{floor['ms']:.3f}"]
        for c in cases:
            r = by.get((s, c))
            if r is None:
                row.append("—")
                continue
            cell = f"{r['ratio']:.2f}×"
            if r.get("graphed_ratio"):
                cell += f" ({r['graphed_ratio']:.2f}×)"
            row.append(cell)
        mem = [by.get((s, c), {}).get("peak_extra_mib") for c in ("floor", "HF PEFT p=0.05", "peft_kernels p=0.05")]
        row.append(" / ".join("—" if m is None else f"{m:.0f}" for m in mem))
        lines.append("| " + " | ".join(row) + " |")
    cfg = data["config"]
    caption = (f"`{_rel(path)}`: {env['device']}, torch {env['torch']}, triton {env['triton']}, "
               f"peft {env['peft']}; {cfg['dtype']}, r={cfg['r']}, alpha={cfg['alpha']:g}; {cfg['timing']}, "
               f"{env['date']}. Each cell: time / frozen floor, then in parentheses the same step replayed "
               f"from a CUDA graph (device time without host launch overhead).")
    return caption + "\n\n" + "\n".join(lines)


def case_rows_table(path: Path) -> str:
    """One row per (shape, case): for benchmarks whose cases differ per op (QLoRA, sparse)."""
    data = json.loads(path.read_text())
    env, cfg = data["env"], data["config"]
    saved = any(r.get("saved_mib") is not None for r in data["results"])  # JSON written since the column exists
    lines = ["| M×K→N | case | ms | / floor | graphed / floor | peak extra MiB |" + (" saved for bwd MiB |" if saved else ""),
             "|---|---|---|---|---|---|" + ("---|" if saved else "")]
    for r in data["results"]:
        g = f"{r['graphed_ratio']:.2f}×" if r.get("graphed_ratio") else "—"
        mem = "—" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.0f}"
        kept = (" —" if r.get("saved_mib") is None else f" {r['saved_mib']:.1f}") + " |" if saved else ""
        lines.append(f"| {_shape(r)} | {r['case']} | {r['ms']:.3f} | {r['ratio']:.2f}× | {g} | {mem} |{kept}")
    caption = (f"`{_rel(path)}` ({data['benchmark']}): {env['device']}, torch {env['torch']}, "
               f"triton {env['triton']}; {cfg['dtype']}; {cfg['timing']}, {env['date']}.")
    if "routing" in cfg:  # the experts benchmark: M tokens x K hidden -> N intermediate, E experts, top-k each
        caption += " M×K→N: tokens × hidden → each expert's intermediate width; " + ", ".join(
            f"{kn}: {r['experts']} experts, top {r['top_k']}" for kn, r in cfg["routing"].items()) + f"; r={cfg['rank']}."
    if env.get("device_type") == "cpu":
        caption += (" CPU figures: the torch reference backend (the CPU path and the tests' oracle), not the GPU "
                    "kernels; what carries over is what a formula saves, not a kernel's speed.")
    return caption + "\n\n" + "\n".join(lines)


def model_table(path: Path) -> str:
    """The whole-model step (bench_model.py): one row per case."""
    data = json.loads(path.read_text())
    env, cfg = data["env"], data["config"]
    host = any(r.get("host_issue_ms") is not None for r in data["results"])  # runs since 2026-11-24
    graphed = any(r.get("graphed_ratio") is not None for r in data["results"])  # runs since 2026-11-24 (5th)
    lines = ["| case | step ms | / floor |" + (" graphed / floor |" if graphed else "")
             + (" host issue ms |" if host else "") + " peak GiB | saved for bwd MiB |",
             "|---|---|---|" + ("---|" if graphed else "") + ("---|" if host else "") + "---|---|"]
    for r in data["results"]:
        peak = "—" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        kept = "—" if r.get("saved_mib") is None else f"{r['saved_mib']:.0f}"
        replay = ""
        if graphed:
            replay = (" —" if r.get("graphed_ratio") is None else f" {r['graphed_ratio']:.2f}×") + " |"
        issue = (" —" if r.get("host_issue_ms") is None else f" {r['host_issue_ms']:.1f}") + " |" if host else ""
        lines.append(f"| {r['case']} | {r['ms']:.2f} | {r['ratio']:.2f}× |{replay}{issue} {peak} | {kept} |")
    caption = (f"`{_rel(path)}` (whole-model step: {cfg['num_hidden_layers']} layers, hidden "
               f"{cfg['hidden_size']}, batch {cfg['batch']}×{cfg['seq']}, r={cfg['r']} on {', '.join(cfg['targets'])}): "
               f"{env['device']}, torch {env['torch']}; {cfg['dtype']}; {cfg['timing']}, {cfg['date']}.")
    return caption + "\n\n" + "\n".join(lines)


def backends_table(path: Path) -> str:
    data = json.loads(path.read_text())
    env = data["env"]
    by = {(r["M"], r["mode"], r["case"]): r for r in data["rows"]}
    keys = list(dict.fromkeys((r["M"], r["mode"]) for r in data["rows"]))
    cases = [c for c in dict.fromkeys(r["case"] for r in data["rows"]) if c != "floor"]
    lines = ["| M (4096→4096) | mode | floor ms | " + " | ".join(cases) + " |", "|---|---|---|" + "---|" * len(cases)]
    for M, mode in keys:
        cells = []
        for c in cases:
            r = by.get((M, mode, c))
            cell = "—" if r is None else f"{r['ratio']:.2f}×"
            if r is not None and r.get("graphed_ratio"):
                cell += f" ({r['graphed_ratio']:.2f}×)"
            cells.append(cell)
        lines.append(f"| {M} | {mode} | {by[(M, mode, 'floor')]['ms']:.3f} | " + " | ".join(cells) + " |")
    caption = (f"`{_rel(path)}` (lora_linear, backend by backend): {env['device']}, torch "
               f"{env['torch']}; bf16, r=16, p=0.05, eager launch (CUDA-graphed in parentheses), {env['date']}.")
    return caption + "\n\n" + "\n".join(lines)


def block() -> str:
    tables = []
    for p in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        data = json.loads(p.read_text())
        kind = data.get("benchmark")
        if kind == "lora_linear fwd+bwd":
            tables.append(lora_table(p))
        elif kind in ("qlora_linear fwd+bwd", "dora_linear fwd+bwd", "sparse_delta_linear fwd+bwd",
                      "PEFT tuner layers fwd+bwd", "LoRA on MoE experts (target_parameters) fwd+bwd"):
            tables.append(case_rows_table(p))
        elif kind == "whole-model step":
            tables.append(model_table(p))
        elif p.name.startswith("lora_backends"):
            tables.append(backends_table(p))
    return "\n\n".join(tables) if tables else "No results committed yet."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--print", action="store_true")
    args = ap.parse_args()
    text = block()
    if args.print:
        print(text)
        return
    readme = ROOT / "README.md"
    content = readme.read_text()
    pre, rest = content.split(START, 1)
    _, post = rest.split(END, 1)
    readme.write_text(f"{pre}{START}\n{text}\n{END}{post}")


if __name__ == "__main__":
    main()
