"""@triton.jit kernels, grouped by op family. Importing this package needs triton, not a GPU."""
