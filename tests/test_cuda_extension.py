"""The CUDA C++ extension on the CPU tier: it must build, link and import (CI builds it against
torch's CUDA wheel and sets PEFT_KERNELS_EXPECT_EXTENSION=1, so a silently skipped build fails
here); without it, the cuda backend must say why, clearly. Kernels run only in the GPU tier."""
import os

import pytest
import torch

import peft_kernels
from peft_kernels import backends, cuda

EXPECT = os.environ.get("PEFT_KERNELS_EXPECT_EXTENSION") == "1"


def test_extension_state_is_reported():
    text = peft_kernels.info()["cuda_extension"]
    if cuda.load() is not None:
        assert text.startswith(("built at install", "JIT-built")) and "lora_fwd" in text
    else:
        assert not EXPECT, f"PEFT_KERNELS_EXPECT_EXTENSION=1 but: {text}"
        assert "not built" in text and "JIT" in text


@pytest.mark.skipif(not EXPECT and cuda.load() is None, reason="extension not built in this environment")
def test_extension_registers_the_lora_ops():
    """The compiled ops exist with the Python-defined schemas (minus the backend argument)."""
    mod = cuda.load()
    assert mod is not None, cuda.reason()
    # lora_fwd_small_m: the forward for few tokens in one kernel, lora_fwd's schema
    # qlora_fwd_small_m: the same over a 4-bit weight, qlora_fwd's schema
    python_op = {"lora_fwd": "lora_fwd", "lora_fwd_small_m": "lora_fwd", "qlora_fwd_small_m": "qlora_fwd",
                 "lora_bwd": "lora_bwd", "lora_bwd_small_m": "lora_bwd"}
    assert set(mod.ops) == set(python_op)
    for name in mod.ops:
        compiled = getattr(torch.ops.peft_kernels_cuda, name).default._schema
        python = getattr(torch.ops.peft_kernels, python_op[name]).default._schema
        want = [(a.name, str(a.type)) for a in python.arguments if a.name != "backend"]
        assert [(a.name, str(a.type)) for a in compiled.arguments] == want
        assert [str(r.type) for r in compiled.returns] == [str(r.type) for r in python.returns]


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(RuntimeError, match="backend 'cuda' unavailable: the cuda backend needs a CUDA tensor"):
        peft_kernels.lora_linear(x, w, a, b, backend="cuda")
    assert backends.unavailable_reason("cuda", torch.device("cpu")) is not None


def test_the_extension_probe_runs_untraced_under_torch_compile(monkeypatch):
    """backend="auto" on a GPU asks whether the extension loads while dynamo traces the op's
    wrapper; a first probe there imports it, which dynamo cannot trace (fullgraph failed on a GPU
    machine without the extension). cuda.reason() runs outside the trace and is a constant in it."""
    monkeypatch.setattr(cuda, "_state", {})  # the first probe happens inside the trace

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + (1 if backends.unavailable_reason("cuda", torch.device("cuda")) is None else 2)

    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0 if cuda.reason() is None else 3.0))


def test_importing_the_package_imports_neither_triton_nor_dynamo():
    """`peft-kernels bench` on a CPU machine sets TRITON_INTERPRET after `import peft_kernels` and
    before triton's import; triton imported earlier leaves its language helpers compiled-mode and
    every interpreted kernel fails ("Cannot call @triton.jit'd outside of the scope of a kernel").
    torch._dynamo imports triton, so the package must not import it either."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys, peft_kernels; print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
