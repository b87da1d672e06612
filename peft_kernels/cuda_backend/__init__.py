"""backend="cuda": thin Python shims over the compiled ops of csrc/ (torch.ops.peft_kernels_cuda)."""
