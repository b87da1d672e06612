"""Shared test helpers: fresh random inputs, an autograd float64 oracle, the error metric, the
CUDA kernels' CPU-emulator builds."""
import ctypes
import glob
import hashlib
import os
import subprocess
import tempfile

import torch

from peft_kernels.reference.rng import dropout_keep_mask

# Error floors per dtype: relative Frobenius error a correct kernel may always have, far below
# what any indexing/masking bug produces (O(1)).
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(lead, k, n, r, dtype, device, bias=True, b_scale=1.0):
    g = lambda *s: torch.randn(*s, dtype=torch.float32, device=device)  # noqa: E731
    x = g(*lead, k).to(dtype)
    w = (g(n, k) / k**0.5).to(dtype)
    a = (g(r, k) / k**0.5).to(dtype)
    b = (g(n, r) * b_scale / r**0.5).to(dtype)
    bias_t = g(n).to(dtype) if bias else None
    return x, w, a, b, bias_t


def eager_lora(x, w, a, b, bias, scaling, p, seed):
    """Plain autograd PyTorch LoRA with the kernels' dropout mask (the oracle's formula)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if p > 0:
        keep = dropout_keep_mask(seed, p, x2.shape[0], k, device=x.device)
        xd = torch.where(keep, x2, torch.zeros((), dtype=x.dtype, device=x.device)) / (1 - p)
    else:
        xd = x2
    y = torch.nn.functional.linear(x2, w, bias) + scaling * ((xd @ a.T) @ b.T)
    return y.reshape(*x.shape[:-1], w.shape[0])


def run_with_grads(fn, tensors, grad_out=None):
    """Run fn on leaf copies of tensors; return output and the grads of those requiring grad."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    y = fn(*leaves)
    g = grad_out if grad_out is not None else torch.ones_like(y)
    y.backward(g.to(y.dtype))
    return y.detach(), [t.grad if t is not None and t.requires_grad else None for t in leaves]


def assert_close_to_oracle(fn, tensors, scaling, p, seed, grad_out, oracle=None):
    """fn's output and grads vs a float64 oracle: error <= 2x plain PyTorch's in the same
    dtype (or the dtype floor), the flash-attention idiom. ``oracle(*tensors)``: the plain PyTorch
    formula (default: eager_lora with scaling, p, seed)."""
    dtype = tensors[0].dtype
    if oracle is None:
        oracle = lambda *t: eager_lora(*t, scaling, p, seed)  # noqa: E731
    y64, g64 = run_with_grads(oracle, [_as64(t) for t in tensors], grad_out.double())
    y_e, g_e = run_with_grads(oracle, tensors, grad_out)
    y_k, g_k = run_with_grads(fn, tensors, grad_out)
    pairs = [("y", y_k, y_e, y64)] + [(f"grad[{i}]", gk, ge, g6) for i, (gk, ge, g6) in
                                     enumerate(zip(g_k, g_e, g64)) if g6 is not None]
    for name, k, e, ref in pairs:
        assert k is not None, f"{name} missing"
        assert k.dtype == e.dtype and k.shape == e.shape, f"{name}: {k.dtype}{list(k.shape)} vs {e.dtype}{list(e.shape)}"
        err_k, err_e = rel_err(k, ref), rel_err(e, ref)
        assert err_k <= max(2 * err_e, FLOOR[dtype]), f"{name}: kernel err {err_k:.3e}, eager err {err_e:.3e}"


def _as64(t):
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)


def gloo_init(rank: int, world: int, init_file: str):
    """Join a gloo process group of ``world`` CPU processes (file rendezvous: no port to collide)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def gloo_exit():
    """End a gloo worker: a barrier, then exit without the teardown — PyTorch's gloo process group
    can deadlock in its destructor at exit (its worker thread waits for the GIL that the joining
    main thread holds; seen in CI on torch 2.13 after the work had finished)."""
    import os

    import torch.distributed as dist

    dist.barrier()
    os._exit(0)


def gloo_gather_exit(results, out_file: str):
    """End a gloo worker: every rank's ``results`` gathered to rank 0, which saves the list (one
    entry per rank) to ``out_file``; then gloo_exit()."""
    import torch
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        torch.save(gathered, out_file)
    gloo_exit()


def gloo_spawn(worker, args, nprocs: int = 2, timeout: float = 300.0):
    """Run worker(rank, *args) in ``nprocs`` processes; a hung rank fails the test instead of
    hanging CI."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the gloo workers did not finish within {timeout:.0f} s")


_HERE = os.path.dirname(os.path.abspath(__file__))


def emulated_cuda_library(*units: str) -> ctypes.CDLL:
    """CUDA kernel sources built with g++ against the CPU emulator (tests/cuda_emu/emu.h): the
    units (files in tests/cuda_emu) as one shared library, cached in the temp folder by a digest of
    them, emu.h and every csrc/*.cuh header they may include."""
    paths = [os.path.join(_HERE, "cuda_emu", u) for u in units]
    sources = paths + [os.path.join(_HERE, "cuda_emu", "emu.h")] + sorted(
        glob.glob(os.path.join(_HERE, "..", "csrc", "*.cuh")))
    digest = hashlib.sha256(b"".join(open(p, "rb").read() for p in sources)).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"peft_kernels_emu_{digest}.so")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}"
        subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
                        "-Wno-unknown-pragmas", "-o", tmp, *paths], check=True, capture_output=True)
        os.replace(tmp, path)
    return ctypes.CDLL(path)
