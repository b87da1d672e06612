"""Test tiers. CPU tier (always): the torch reference backend, and the Triton kernels under
TRITON_INTERPRET=1 on tiny odd shapes in fp32/fp16. GPU tier (@pytest.mark.gpu, skipped
without CUDA): bf16, real sizes, compiled kernels."""
import os

import pytest
import torch

# The interpreter must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device():
    """Where the triton backend runs in this tier: CUDA if present, else CPU (interpreted)."""
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")
