"""backend="cuda": thin Python shims over the compiled ops of csrc/ (torch.ops.peft_kernels_cuda)."""
import contextlib


@contextlib.contextmanager
def small_m_on(lora_forward=False, lora_backward=False, quant_forward=False):
    """The chosen single-kernel small-M paths on for every M they take (SMALL_M_LIMIT) while the
    block runs, whatever their size rules say: benchmarks time them before those rules are set.
    Module-level settings, so a backward run by autograd's device thread sees them too."""
    from . import lora, quant

    knobs = [(lora, "SMALL_M_MAX_M", lora_forward), (lora, "SMALL_M_BWD_MAX_M", lora_backward),
             (quant, "SMALL_M_MAX_M", quant_forward)]
    saved = [(module, name, getattr(module, name)) for module, name, on in knobs if on]
    for module, name, _ in saved:
        setattr(module, name, lora.SMALL_M_LIMIT)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
