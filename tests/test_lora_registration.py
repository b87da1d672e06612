"""The custom ops behave as torch.library ops: opcheck, and torch.compile without graph breaks
(the LoRA and the DoRA ops; DoRA's opcheck is in test_dora_op.py)."""
import pytest
import torch

from peft_kernels.nn import DoRALinear, LoRALinear


def _op_args(device, backend, p):
    x = torch.randn(6, 20, device=device)
    w = torch.randn(12, 20, device=device)
    a = torch.randn(3, 20, device=device)
    b = torch.randn(12, 3, device=device)
    bias = torch.randn(12, device=device)
    seed = torch.tensor([17], device=device) if p > 0 else None
    return x, w, a, b, bias, 0.5, p, seed, backend


@pytest.mark.parametrize("backend", ["torch", "triton", "triton single-launch"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck(backend, p, kernel_device):
    from peft_kernels.triton import lora as triton_lora
    fused = backend.endswith("single-launch")  # the small-M kernels must honour the same fake impls
    backend = backend.split()[0]
    device = kernel_device if backend == "triton" else torch.device("cpu")
    args = _op_args(device, backend, p)
    override = dict(fused_max_m=256, fused_bwd_max_m=256) if fused else {}
    with triton_lora.launch_override(**override):
        torch.library.opcheck(torch.ops.peft_kernels.lora_fwd.default, args)
        x, w, a, b, bias, s, p, seed, backend = args
        y, u = torch.ops.peft_kernels.lora_fwd(*args)
        dy = torch.randn_like(y)
        for need_dx in (True, False):
            torch.library.opcheck(torch.ops.peft_kernels.lora_bwd.default,
                                  (dy, x, w, a, b, u, s, p, seed, need_dx, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear], ids=["lora", "dora"])
def test_compile_fullgraph_no_graph_breaks(backend, cls, kernel_device):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    torch._dynamo.reset()
    layer = cls(24, 16, r=4, alpha=8, dropout=0.2, backend=backend).to(device)
    torch.nn.init.normal_(layer.lora_B)
    model = torch.nn.Sequential(layer, torch.nn.Tanh(), torch.nn.Linear(16, 8).to(device))
    x = torch.randn(5, 24, device=device, requires_grad=True)
    # fullgraph=True raises on any graph break; aot_eager also traces the backward graph
    # through the fake implementations.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    def run(m):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        y = m(x)
        y.square().sum().backward()
        return [y.detach()] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]

    for got, want in zip(run(compiled), run(model)):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear], ids=["lora", "dora"])
def test_compile_dynamic_shapes_fullgraph(cls):
    """torch.compile(dynamic=True) — symbolic token counts, and module floats (scaling) traced as
    symbols — compiles the layer without graph breaks (math.isfinite on a symbolic scaling broke
    it) and matches eager over several token counts."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = cls(24, 16, r=4, alpha=8, dropout=0.2, backend="torch")
    torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    for M in (3, 7, 12):
        x = torch.randn(2, M, 24)
        torch.manual_seed(M)
        got = compiled(x)
        torch.manual_seed(M)
        assert torch.allclose(got, layer(x), rtol=1e-5, atol=1e-6)
