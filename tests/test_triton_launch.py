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


# ----------------------------------------------------------------------------- fast relaunch

class FakeCompiled:
    """What kernel[grid](...) returns on a GPU: a CompiledKernel with a launcher (``run``)."""

    def __init__(self):
        self.function, self.packed_metadata, self.launches = "fn-handle", ("meta",), []

    def run(self, *launch_args):
        self.launches.append(launch_args)


class FakeJit(FakeKernel):
    """A JITFunction stand-in: parameters (x, n, scale, BM, HAS_B), compiles once per call."""

    arg_names = ["x_ptr", "n", "scale", "BM", "HAS_B"]

    def __init__(self, **kw):
        super().__init__(per_stage=kw.pop("per_stage", 1), limit=kw.pop("limit", 10))
        self.compiled = []

    def __getitem__(self, grid):
        inner = super().__getitem__(grid)

        def run(*args, num_stages, **meta):
            inner(*args, num_stages=num_stages, **meta)
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]
        return run


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(policy, "FAST_LAUNCH", True)
    monkeypatch.setattr(policy, "_COMPILED", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"cuda_stream": 1234})())


def test_fast_relaunch_calls_the_compiled_launcher_with_every_parameter(fast):
    k, x = FakeJit(), torch.zeros(64)
    first = policy.launch(k, (3, 2), x, 5, 0.5, BM=16, HAS_B=True, num_warps=4)
    assert len(k.attempts) == 1 and first.launches == []  # Triton's own path, then kept
    again = policy.launch(k, (7,), x, 5, 0.5, BM=16, HAS_B=True, num_warps=4)
    assert again is first and len(k.attempts) == 1  # no binding, no compile: the launcher directly
    assert first.launches == [(7, 1, 1, 1234, "fn-handle", ("meta",), None, None, None, x, 5, 0.5, 16, True)]


@pytest.mark.parametrize("change", ["int", "float", "bool for int", "constexpr", "option", "dtype", "unaligned"])
def test_fast_relaunch_misses_whatever_triton_could_specialize_on(fast, change):
    k, x = FakeJit(), torch.zeros(64)
    args, meta = [x, 1 if change == "bool for int" else 16, 0.5], dict(BM=16, HAS_B=True, num_warps=4)
    policy.launch(k, (1,), *args, **meta)
    if change == "int":
        args[1] = 17
    elif change == "float":
        args[2] = 0.25
    elif change == "bool for int":
        args[1] = True  # == 1, but Triton types it i1, not i32
    elif change == "constexpr":
        meta["BM"] = 32
    elif change == "option":
        meta["num_warps"] = 8
    elif change == "dtype":
        args[0] = x.half()
    else:
        args[0] = x[1:]  # 4 bytes past an aligned pointer: Triton specializes on 16-byte alignment
    policy.launch(k, (1,), *args, **meta)
    assert len(k.attempts) == 2 and k.compiled[0].launches == []


def test_fast_relaunch_steps_aside(fast, monkeypatch):
    from triton import knobs

    k, x = FakeJit(), torch.zeros(64)
    # a parameter left to its default is not in the call's keywords: never cached
    policy.launch(k, (1,), x, 5, 0.5, BM=16)
    policy.launch(k, (1,), x, 5, 0.5, BM=16)
    assert len(k.attempts) == 2 and not policy._COMPILED
    # an argument of a type the key does not know
    policy.launch(k, (1,), x, "s", 0.5, BM=16, HAS_B=False)
    policy.launch(k, (1,), x, "s", 0.5, BM=16, HAS_B=False)
    assert len(k.attempts) == 4 and not policy._COMPILED
    # a launch hook set (a profiler): Triton's full path every time
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(2):
            policy.launch(k, (1,), x, 5, 0.5, BM=16, HAS_B=False)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(k.attempts) == 6 and not policy._COMPILED


def test_fast_relaunch_after_fewer_stages_keeps_the_fitted_count(fast):
    k, x = FakeJit(per_stage=4, limit=10), torch.zeros(64)  # 3 stages: 12 > 10; 2 fit
    policy.launch(k, (1,), x, 5, 0.5, BM=16, HAS_B=True)
    assert k.attempts == [3, 2] and not policy._COMPILED  # the retried launch is not kept ...
    policy.launch(k, (1,), x, 5, 0.5, BM=16, HAS_B=True)
    assert k.attempts == [3, 2, 2] and len(policy._COMPILED) == 1  # ... the next one, at 2 stages, is
    policy.launch(k, (1,), x, 5, 0.5, BM=16, HAS_B=True)
    assert k.attempts == [3, 2, 2] and len(k.compiled[-1].launches) == 1


def test_fast_relaunch_table_is_bounded(fast, monkeypatch):
    monkeypatch.setattr(policy, "FAST_LAUNCH_ENTRIES", 3)
    k, x = FakeJit(), torch.zeros(64)
    for n in range(5):  # a new size each call, as with varying sequence lengths
        policy.launch(k, (1,), x, n, 0.5, BM=16, HAS_B=True)
    assert 1 <= len(policy._COMPILED) <= 3
