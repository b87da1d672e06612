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


_BACKGROUND: list = []  # test modules whose subprocess work runs beside the session's other tests


def pytest_collection_finish(session):
    """A test module with slow CPU-bound subprocess work (test_triton_compile.py: compiling every
    kernel) defines start_in_background / stop_background; it starts as soon as collection has
    selected one of its tests, and so runs beside the single-threaded interpreter tests."""
    if session.config.option.collectonly:
        return
    selected: dict = {}
    for item in session.items:
        module = getattr(item, "module", None)
        if hasattr(module, "start_in_background"):
            selected.setdefault(module, []).append(item.originalname)
    for module, names in selected.items():
        _BACKGROUND.append(module)
        module.start_in_background(names)


def pytest_sessionfinish(session, exitstatus):
    for module in _BACKGROUND:
        module.stop_background()
    _BACKGROUND.clear()


@pytest.fixture
def kernel_device():
    """Where the triton backend runs in this tier: CUDA if present, else CPU (interpreted)."""
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")
