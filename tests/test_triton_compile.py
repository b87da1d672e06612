"""CPU tier, no GPU needed: every Triton kernel compiles, with the launch configurations the host
code really uses (bf16 included), to sm_80 and sm_90 cubins, within each target's shared memory
(peft_kernels.triton.compile_check). The interpreter tests check what kernels compute; this
catches what only the GPU compiler rejects. Runs in subprocesses (they need TRITON_INTERPRET
unset), started as soon as the session has collected this file's tests (conftest.py calls
start_in_background) so that the compiles, CPU-bound, run beside the single-threaded interpreter
tests; the tests here wait for them."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
# sm_90 (the H100 / H200 the GPU tier runs on) in every dtype; sm_80 in bf16, whose scenarios reach
# every kernel and hit its smaller shared memory with 16-bit tiles (CI time: fp32's big kernels
# compile slowly).
CHECKS = {
    "sm80": ["-m", "peft_kernels.triton.compile_check", "--arch", "80", "--quick", "--dtypes", "bfloat16"],
    "sm90": ["-m", "peft_kernels.triton.compile_check", "--arch", "90", "--quick", "--dtypes",
             "bfloat16,float16,float32"],
    "cases": [str(ROOT / "tests" / "compile_check_cases.py")],
}
_RUNNING: dict = {}  # name -> (Popen, stdout file, stderr file)


def _lower_priority():
    os.nice(10)


def _start(name):
    if name not in _RUNNING:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill unread
        # niced: the session's own tests, one after another, are the longer chain; the compiles fill idle cores
        proc = subprocess.Popen([sys.executable, *CHECKS[name]], env=env, cwd=ROOT, stdout=out, stderr=err, text=True,
                                preexec_fn=_lower_priority)
        _RUNNING[name] = (proc, out, err)
    return _RUNNING[name]


def _result(name, timeout):
    proc, out, err = _start(name)
    proc.wait(timeout=timeout)
    out.seek(0)
    err.seek(0)
    return proc.returncode, out.read(), err.read()


NEEDS = {"test_every_kernel_compiles_for_sm80_and_sm90": ("sm80", "sm90"),
         "test_compile_check_reports_what_a_gpu_would_reject": ("cases",)}


def start_in_background(selected):
    """Called by conftest.py with the names of this file's tests that collection selected."""
    for test in selected:
        for name in NEEDS[test]:
            _start(name)


def stop_background():
    """Called by conftest.py at the session's end: nothing outlives an interrupted run."""
    for proc, out, err in _RUNNING.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()
    _RUNNING.clear()


def test_every_kernel_compiles_for_sm80_and_sm90():
    for name, arch in (("sm80", 80), ("sm90", 90)):
        code, out, err = _result(name, timeout=1800)
        assert code == 0, out[-6000:] + err[-3000:]
        assert f"sm_{arch}:" in out and "never compiled" not in out
        dtypes = CHECKS[name][-1].split(",")
        assert all(f"| {dtype} " in out for dtype in dtypes)
        for kernel in ("_lora_fused_fwd_kernel", "_lora_fused_bwd_kernel", "_matmul_4bit_aligned_kernel",
                       "_sddmm_block_kernel", "_dora_grad_kernel", "_dora_dropout_kernel", "_dora_norm_kernel",
                       "_merge_kernel"):
            assert kernel in out


def test_compile_check_reports_what_a_gpu_would_reject():
    from peft_kernels.triton.compile_check import SHARED_LIMIT
    code, out, err = _result("cases", timeout=600)
    assert code == 0, err[-3000:]
    lines = {line.split()[0]: line.split(maxsplit=1)[1] for line in out.splitlines() if line.strip()}
    assert lines["bad_shapes"] != "None", "a dot of [16,16] by [32,1] compiled"
    name, required = lines["huge_direct"].split()
    assert name == "OutOfResources" and int(required) > SHARED_LIMIT[90]
    assert lines["huge_policy"].startswith("RuntimeError") and "even at 1 pipeline stage" in lines["huge_policy"]
    stages, shared = map(int, lines["medium_policy"].split())
    assert stages == 1 and shared <= SHARED_LIMIT[90]
