"""Random sparse-training runs (fixed seeds): SparseDeltaLinear (unstructured or blocks, both
backends, several panel sizes) trained by SparseAdamW through regrowths. At every step the
forward equals x (W0 + Delta)^T, dDelta equals the dense gradient read at the current positions,
and at the end the merged weight and the saved W0 values are exact. Regrowth replaces the index
tensor, which is what stale per-index caches (panel offsets, validation) got wrong."""
import random

import pytest
import torch
from torch import nn

from peft_kernels.nn import SparseDeltaLinear
from peft_kernels.sparse import SparseAdamW, layout
from peft_kernels.triton import sparse as tri_sparse

CASES = 16


@pytest.mark.parametrize("seed", range(CASES))
def test_random_sparse_training_run(seed, kernel_device, monkeypatch):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    out_f, in_f = rng.choice([8, 12, 24, 40]), rng.choice([6, 16, 30])
    block = rng.choice([None, None, (2, 2), (4, 3)])
    if block and (out_f % block[0] or in_f % block[1]):
        block = None
    backend = "triton" if seed % 2 else "torch"
    device = kernel_device if backend == "triton" else torch.device("cpu")
    dtype = torch.float32 if backend == "triton" else torch.float64
    monkeypatch.setattr(tri_sparse, "PANEL_ELEMENTS", rng.choice([4 * in_f, 8 * in_f, 4 * 1024 * 1024]))
    k = rng.randint(1, max(1, layout.grid_size((out_f, in_f), block) // 2))
    lin = nn.Linear(in_f, out_f, dtype=dtype, device=device)
    w0 = lin.weight.detach().clone()
    sd = SparseDeltaLinear.from_linear(lin, num_params=k, block=block, backend=backend, values_dtype=dtype)
    opt = SparseAdamW(sd, lr=0.01)
    sd.track_candidates_()
    tol = 1e-10 if dtype == torch.float64 else 1e-4

    def positions():
        return layout.element_positions(sd.delta_index, (out_f, in_f), block)

    for step in range(6):
        x = torch.randn(rng.randint(1, 9), in_f, dtype=dtype, device=device)
        gy = torch.randn(x.shape[0], out_f, dtype=dtype, device=device)
        w = w0.clone().reshape(-1)
        w[positions()] += sd.delta_values.detach().reshape(-1)
        y = sd(x)
        ref = x @ w.view(out_f, in_f).T + lin.bias.detach()
        assert (y - ref).abs().max() <= tol * (1 + ref.abs().max()), f"forward, step {step}"
        y.backward(gy)
        g = (gy.T @ x).reshape(-1)[positions()].reshape(sd.delta_values.shape)
        assert (sd.delta_values.grad - g).abs().max() <= tol * (1 + g.abs().max()), f"dDelta, step {step}"
        opt.step()
        opt.zero_grad()
        if step % 2 == 1 and layout.grid_size((out_f, in_f), block) > k:
            sd.regrow_(0.5, optimizer=opt)
    expect = w0.clone().reshape(-1)
    expect[positions()] = sd.base_values + sd.delta_values.detach().reshape(-1)
    assert torch.equal(sd.merge().reshape(-1), expect)
    assert torch.equal(sd.base_values, w0.reshape(-1)[positions()])
