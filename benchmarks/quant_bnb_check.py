"""NF4/FP4 against bitsandbytes on the current device: identical bytes? and quantize time.

    python benchmarks/quant_bnb_check.py [--out FILE.json]
"""
import argparse
import sys

import torch

from peft_kernels.bench import harness
from peft_kernels.quant import FP4Weight, NF4Weight


def main():
    import bitsandbytes.functional as F

    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    torch.manual_seed(0)
    for quant_type, cls in (("nf4", NF4Weight), ("fp4", FP4Weight)):
        for shape in [(300, 257), (4096, 4096), (1031, 4095)]:
            for blocksize in (64, 128, 256):
                for nested in (False, True):
                    w = (torch.randn(*shape, device=dev) * 0.02).to(torch.bfloat16)
                    q, st = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
                    ours = cls.from_float(w, blocksize=blocksize, double_quant=nested)
                    row = {"quant_type": quant_type, "shape": list(shape), "blocksize": blocksize, "nested": nested,
                           "packed_equal": torch.equal(ours.packed, q),
                           "absmax_mismatches": int((ours.absmax != st.absmax).sum()),
                           "dequantize_equal": torch.equal(ours.dequantize(), F.dequantize_4bit(q, st))}
                    if nested:
                        row["absmax2_equal"] = torch.equal(ours.absmax2, st.state2.absmax)
                        row["offset_equal"] = torch.equal(ours.offset, st.offset)
                    rows.append(row)
                    print(row)
    w = (torch.randn(4096, 14336, device=dev) * 0.02).to(torch.bfloat16)
    timing = {
        "shape": [4096, 14336],
        "peft_kernels_from_float_ms": harness.time_ms(lambda: NF4Weight.from_float(w, 64, True), dev, 2, 10),
        "bnb_quantize_4bit_ms": harness.time_ms(
            lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True), dev, 2, 10),
    }
    print(timing)
    if args.out:
        harness.write_json(args.out, {"benchmark": "nf4/fp4 vs bitsandbytes", "env": harness.environment(dev),
                                      "results": rows, "quantize_timing": timing})
    return 0


if __name__ == "__main__":
    sys.exit(main())
