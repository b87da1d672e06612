"""GPU tier for sparse deltas: bf16, real sizes, both SDDMM kernels, memory, SparseAdamW on CUDA."""
import pytest
import torch
from torch import nn

from peft_kernels.nn import SparseDeltaLinear
from peft_kernels.reference import sparse as ref_sparse
from peft_kernels.sparse import SparseAdamW, layout
from peft_kernels.triton import sparse as tri_sparse

from helpers import rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method,density,block", [("panel", 0.01, None),
                                                  ("gather_t", 0.001, None), ("gather_t", 0.01, None),
                                                  ("panel", 0.1, None), ("block", 0.01, (32, 32)),
                                                  ("block", 0.05, (16, 64))])
def test_sddmm_bf16_real_size(method, density, block):
    N, K, M = 4096, 4096, 2048
    grid = layout.grid_size((N, K), block)
    index = torch.sort(torch.randperm(grid, device="cuda")[: int(density * grid)]).values.to(torch.int32)
    gy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    out = tri_sparse.sddmm(gy, x, index, (N, K), block, method=None if method == "block" else method)
    ref = ref_sparse.sddmm(gy.double(), x.double(), index, (N, K), block)
    eager = ref_sparse.sddmm(gy, x, index, (N, K), block)  # fp32 accumulation of bf16 products
    assert rel_err(out, ref) <= max(2 * rel_err(eager, ref), 1e-5)


def test_backward_allocates_no_dense_gradient():
    """Peak extra memory of fwd+bwd stays far below one [out, in] buffer (the dense-grad way)."""
    N, K, M = 4096, 14336, 512
    lin = nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    sd = SparseDeltaLinear.from_linear(lin, density=0.01)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sd(x).sum().backward()  # warm-up (plans, compilation)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    x.grad = sd.delta_values.grad = None
    sd(x).sum().backward()
    extra = torch.cuda.max_memory_allocated() - before
    # what remains: dY, dX, the panel workspace (16 MiB) — half of one dense bf16 dW at most
    assert extra < 0.5 * N * K * 2, f"{extra / 2**20:.0f} MiB extra vs a dense dW of {N * K * 2 / 2**20:.0f} MiB"


@pytest.mark.parametrize("block", [None, (32, 32)])
def test_sparse_adamw_cuda_matches_reference(block):
    lin = nn.Linear(1024, 512, device="cuda", dtype=torch.bfloat16)
    a = SparseDeltaLinear.from_linear(lin, density=0.02, block=block)
    b = SparseDeltaLinear.from_linear(nn.Linear(1024, 512, device="cuda", dtype=torch.bfloat16), density=0.02,
                                      block=block)
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.delta_index.copy_(a.delta_index)
        b.base_values.copy_(a.base_values)
        b.delta_values.copy_(torch.randn_like(b.delta_values) * 0.01)
        a.delta_values.copy_(b.delta_values)
    opt = SparseAdamW(a, lr=1e-3, weight_decay=0.1)
    state = {n: torch.zeros_like(a.delta_values) for n in ("m", "v")}
    steps = torch.zeros(a.delta_values.shape, dtype=torch.int32, device="cuda")
    for _ in range(3):
        g = torch.randn_like(a.delta_values)
        a.delta_values.grad = g
        opt.step()
        with torch.no_grad():
            ref_sparse.sparse_adamw_(b.delta_values.data, g, state["m"], state["v"], steps, lr=1e-3, beta1=0.9,
                                     beta2=0.999, eps=1e-8, weight_decay=0.1, merged=b.weight.data,
                                     index=b.delta_index, shape=tuple(b.weight.shape), block=block,
                                     base=b.base_values)
    assert rel_err(a.delta_values.detach(), b.delta_values.detach()) < 1e-5
    assert torch.equal(a.weight, b.weight) or rel_err(a.weight, b.weight) < 1e-3


def test_patched_peft_shira_bf16_on_cuda():
    """HF PEFT's SHiRA layer patched (triton SDDMM) against PEFT's own forward, bf16 at 2048 x
    4096 -> 4096, r=16: outputs and dX to bf16 rounding, the values' gradient (fp32 accumulation
    on both sides, summed over 2048 tokens) to a few bf16 ulps of its scale."""
    peft = pytest.importorskip("peft")
    if not hasattr(peft, "ShiraConfig"):
        pytest.skip("this peft has no SHiRA")
    import copy

    import peft_kernels

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(4096, 4096, bias=False)).to("cuda", torch.bfloat16)
    model = peft.get_peft_model(holder, peft.ShiraConfig(r=16, target_modules=["0"], random_seed=0))
    values = model.base_model.model[0].shira_weight["default"]
    with torch.no_grad():
        values.normal_(0, 0.02)
    patched = copy.deepcopy(model)
    assert len(peft_kernels.patch_peft_model(patched).patched) == 1
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    out = []
    for m in (model, patched):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        out.append((y.float(), xi.grad.float(), m.base_model.model[0].shira_weight["default"].grad.float()))
    assert peft_kernels.backends.last_used("sparse_delta") == "triton"
    (y0, gx0, gv0), (y1, gx1, gv1) = out
    assert rel_err(y1, y0) < 1e-2 and rel_err(gx1, gx0) < 1e-2 and rel_err(gv1, gv0) < 1e-2


@pytest.mark.parametrize("what", ["1% of the table", "new tokens' rows"])
def test_sparse_delta_embedding_bf16_real_size(what):
    """A LLaMA-3-sized table (128256 x 4096, bf16) and 8192 tokens: the Triton op's rows equal the
    dense lookup of W0 + Delta bit for bit, dDelta the float64 oracle (2x the fp32 reference's
    error), and no [V, d] gradient is allocated."""
    from peft_kernels import sparse_delta_embedding
    from peft_kernels.reference import sparse_embedding as ref_emb
    V, d, M = 128256, 4096, 8192
    w0 = torch.randn(V, d, device="cuda", dtype=torch.bfloat16)
    if what == "new tokens' rows":
        rows = torch.arange(V - 8, V, device="cuda")
        index = (rows[:, None] * d + torch.arange(d, device="cuda")).reshape(-1).to(torch.int32)
    else:
        index = torch.sort(torch.randperm(V * d, device="cuda")[: V * d // 100]).values.to(torch.int32)
    values = torch.randn(index.numel(), device="cuda", requires_grad=True)
    ids = torch.randint(0, V, (M,), device="cuda")
    ids[:64] = V - 1  # a new token, read often
    gy = torch.randn(M, d, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = sparse_delta_embedding(ids, w0, values, index, backend="triton")
    y.backward(gy)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < V * d * 2 // 4  # far below one bf16 [V, d] buffer
    table = w0.clone()
    table.view(-1)[index.long()] = (w0.view(-1)[index.long()].float() + values.detach()).to(torch.bfloat16)
    assert torch.equal(y, torch.nn.functional.embedding(ids, table))
    exact = ref_emb.backward(gy.double(), ids, index, V, -1)
    eager = ref_emb.backward(gy.float(), ids, index, V, -1)
    assert rel_err(values.grad, exact) <= max(2 * rel_err(eager, exact), 1e-6)


def test_patched_peft_trainable_tokens_bf16_on_cuda():
    """PEFT's trainable tokens over a tied bf16 Llama on CUDA, patched (Triton sparse ops) vs
    unpatched: logits equal up to bf16 rounding of the head's product, row gradients close."""
    import copy

    import peft
    import transformers

    import peft_kernels
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16),
                                peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                trainable_token_indices=[4090, 4091, 7]))
    patched = copy.deepcopy(model)
    assert len([n for n in peft_kernels.patch_peft_model(patched).patched if "token_adapter" in n]) == 2
    ids = torch.randint(0, 4096, (2, 256), device="cuda")
    ids[:, :3] = torch.tensor([4090, 4091, 7])
    grads = []
    for m in (model, patched):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append((out.logits.float(), next(p.grad.float() for n, p in m.named_parameters()
                                                if "trainable_tokens_delta" in n)))
    assert rel_err(grads[1][0], grads[0][0]) < 1e-2 and rel_err(grads[1][1], grads[0][1]) < 2e-2
