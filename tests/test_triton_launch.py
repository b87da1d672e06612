"""peft_kernels.triton.launch: a launch that needs more shared memory than the GPU has is retried
with fewer pipeline stages, the count that fits is remembered per configuration, and a kernel
that does not fit even at one stage fails with a clear message. A stand-in kernel raises Triton's
OutOfResources the way a real launch does (before running anything)."""
import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from peft_kernels.triton import launch as policy  # noqa: E402


class FakeKernel:
    """kernel[grid](*args, **meta): shared memory = per_stage * num_stages; fails above limit."""

    def __init__(self, per_stage, limit, resource="shared memory"):
        self.per_stage, self.limit, self.resource = per_stage, limit, resource
        self.attempts = []

    def __getitem__(self, grid):
        def run(*args, num_stages, **meta):
            self.attempts.append(num_stages)
            need = self.per_stage * num_stages
            if need > self.limit:
                raise OutOfResources(need, self.limit, self.resource)
            return ("ran", grid, num_stages, meta)
        return run


def test_stages_lowered_until_it_fits_and_remembered():
    k = FakeKernel(per_stage=80, limit=170)  # 3 stages: 240 > 170; 2: 160 fits
    x = torch.zeros(4)
    assert policy.launch(k, (1,), x, BM=64) == ("ran", (1,), 2, {"BM": 64})
    assert k.attempts == [3, 2]
    policy.launch(k, (7,), x, BM=64)  # same configuration: straight to 2 stages
    assert k.attempts == [3, 2, 2]
    policy.launch(k, (1,), x.half(), BM=64)  # another dtype is another configuration
    assert k.attempts[3:] == [3, 2]
    policy.launch(k, (1,), x, BM=64, num_stages=1)  # a caller asking for fewer keeps fewer
    assert k.attempts[-1] == 1


def test_kernel_that_never_fits_fails_clearly():
    k = FakeKernel(per_stage=300, limit=170)
    with pytest.raises(RuntimeError, match=r"needs 300 B of shared memory even at 1 pipeline stage.*170 B"):
        policy.launch(k, (1,), torch.zeros(2), BM=256)
    assert k.attempts == [3, 2, 1]


def test_other_resources_are_not_retried():
    k = FakeKernel(per_stage=1, limit=0, resource="threads")
    with pytest.raises(RuntimeError, match="threads"):
        policy.launch(k, (1,), torch.zeros(2), BM=16)
    assert k.attempts == [3]
