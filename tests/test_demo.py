"""The `peft-kernels demo` main job runs every method end to end and the adapters learn."""
import pytest

pytest.importorskip("transformers")

from peft_kernels.demo import main  # noqa: E402


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "sparse"])
def test_demo_runs_and_loss_falls(method):
    runs = main(["--method", method, "--steps", "8", "--device", "cpu", "--lr", "1e-2"])
    assert len(runs) == 1 and runs[0]["trainable_params"] > 0
    assert runs[0]["last_loss"] < runs[0]["first_loss"]


def test_demo_compare_peft():
    pytest.importorskip("peft")
    runs = main(["--method", "lora", "--steps", "3", "--device", "cpu", "--compare-peft"])
    assert [r["label"] for r in runs] == ["peft_kernels", "HF PEFT"]
    assert runs[0]["trainable_params"] == runs[1]["trainable_params"]


def test_demo_sparse_compares_with_dense_grad_masking():
    """Same masks, same optimizer math: SparseAdamW on compact deltas and torch AdamW on dense
    weights with masked gradients train the same number of values to nearly the same loss."""
    runs = main(["--method", "sparse", "--steps", "3", "--device", "cpu", "--compare-peft"])
    assert [r["label"] for r in runs] == ["peft_kernels", "dense-grad masking"]
    assert runs[0]["trainable_params"] == runs[1]["trainable_params"]
    moved = runs[1]["first_loss"] - runs[1]["last_loss"]
    assert moved > 1e-3 * runs[1]["first_loss"]  # training moved the loss far more than the tolerance
    assert abs(runs[0]["last_loss"] - runs[1]["last_loss"]) < 1e-5 * runs[1]["last_loss"]


def test_demo_qlora_compares_with_peft_over_bitsandbytes():
    """--compare-peft qlora: HF PEFT over bitsandbytes Linear4bit layers holding the very NF4 bytes
    apply_lora(quantize="nf4") made; with B = 0 at the start both models compute the same first loss."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    runs = main(["--method", "qlora", "--steps", "3", "--device", "cpu", "--compare-peft"])
    assert [r["label"] for r in runs] == ["peft_kernels", "HF PEFT"]
    assert runs[0]["trainable_params"] == runs[1]["trainable_params"]
    assert abs(runs[0]["first_loss"] - runs[1]["first_loss"]) < 1e-5 * runs[1]["first_loss"]
