"""CPU tier, no GPU needed: every Triton kernel compiles, with the launch configurations the host
code really uses (bf16 included), to sm_80 and sm_90 cubins, within each target's shared memory
(peft_kernels.triton.compile_check). The interpreter tests check what kernels compute; this
catches what only the GPU compiler rejects. Runs in a subprocess: it needs TRITON_INTERPRET unset."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def _start(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_every_kernel_compiles_for_sm80_and_sm90():
    # One process per target, side by side: compiling is CPU-bound and single-threaded. sm_90 (the
    # H100 / H200 the GPU tier runs on) in every dtype; sm_80 in bf16, whose scenarios reach every
    # kernel and hit its smaller shared memory with 16-bit tiles (CI time: fp32's big kernels compile
    # slowly).
    dtypes = {80: "bfloat16", 90: "bfloat16,float16,float32"}
    procs = {arch: _start(["-m", "peft_kernels.triton.compile_check", "--arch", str(arch), "--quick",
                           "--dtypes", dtypes[arch]])
             for arch in (80, 90)}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=1500)
        assert proc.returncode == 0, out[-6000:] + err[-3000:]
        assert f"sm_{arch}:" in out and "never compiled" not in out
        assert all(f"| {dtype} " in out for dtype in dtypes[arch].split(","))
        for kernel in ("_lora_fused_fwd_kernel", "_lora_fused_bwd_kernel", "_matmul_4bit_aligned_kernel",
                       "_sddmm_block_kernel", "_dora_grad_kernel", "_dora_dropout_kernel", "_dora_norm_kernel",
                       "_merge_kernel"):
            assert kernel in out


def test_compile_check_reports_what_a_gpu_would_reject():
    from peft_kernels.triton.compile_check import SHARED_LIMIT
    proc = _start([str(ROOT / "tests" / "compile_check_cases.py")])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines() if line.strip()}
    assert lines["bad_shapes"] != "None", "a dot of [16,16] by [32,1] compiled"
    name, required = lines["huge_direct"].split()
    assert name == "OutOfResources" and int(required) > SHARED_LIMIT[90]
    assert lines["huge_policy"].startswith("RuntimeError") and "even at 1 pipeline stage" in lines["huge_policy"]
    stages, shared = map(int, lines["medium_policy"].split())
    assert stages == 1 and shared <= SHARED_LIMIT[90]
