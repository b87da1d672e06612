"""NF4 / FP4 frozen weights, bit-compatible with bitsandbytes (see ../shared/NF4.md).

Layout (what bitsandbytes stores, byte for byte):
    packed   uint8 [(n + 1) // 2, 1]  two 4-bit codes per byte, the even (first) element in
                                      the HIGH nibble; n = out * in, row-major
    absmax   fp32 [nblocks], or uint8 [nblocks] with double quantization ("nested"), where
             blocks are ``blocksize`` consecutive flat elements (the last may be partial)
    nested:  absmax2 fp32 [ceil(nblocks / 256)], code2 fp32 [256] (bnb's signed dynamic map),
             offset (fp32 mean of absmax);  absmax = fp32(code2[q] * absmax2[b // 256]) + offset

Quantize: scaled = x * (1 / absmax) clamped to [-1, 1] (the partial last block divides, as
bitsandbytes' reference path does); code = nearest table entry, an exact midpoint going to the
lower index. Dequantize: fp32(code[idx] * absmax[block]) cast once to the weight's dtype.

Compatibility, measured (benchmarks/results/quant_bnb_h100.json, tests/test_quant_bnb4bit.py):
- NF4, single and double quantization: byte-identical to bitsandbytes 0.50.2's CUDA quantizer
  (H100; odd shapes, blocksizes 64-256). Against its CPU quantizer the 4-bit codes, fp32 absmax,
  nested scales and offset are identical; only the nested 8-bit absmax codes differ in ~0.4 %
  of blocks, where bnb's CPU lookup (approximate, native code) does not pick the nearest map
  entry and ours — the nearest, as bnb's CUDA kernel does — is never less accurate.
- FP4: byte-identical to bitsandbytes' CPU path; its CUDA kernel encodes FP4 by a different rule
  (bnb's two paths disagree with each other), so FP4 bytes quantized here differ from bnb-CUDA's.
- Any bytes bnb wrote are read as they are (from_bnb / from_state_dict) and decoded by the same
  table lookup as bnb's dequantize.
"""
from __future__ import annotations

import functools
import json
import math

import torch

from ..ops._checks import check_materialized

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (e2m1-like) in index order: bit 3 is the sign; normalised by its max, 12, in fp32.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


_FP4 = torch.tensor(FP4_RAW, dtype=torch.float32)
_CODES = {"nf4": torch.tensor(NF4_CODE, dtype=torch.float32), "fp4": _FP4 / _FP4.abs().max()}


_CODES_ON: dict = {}


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16 fp32 values a 4-bit index decodes to (bnb's ``quant_map``), one cached copy per
    device: a fresh host-to-device copy on every op call would synchronize the stream and break
    CUDA-graph capture (it did: the QLoRA steps could not be graphed)."""
    if quant_type not in _CODES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return _table_on(quant_type, device)


def _table_on(name: str, device=None) -> torch.Tensor:
    """Code table ``name`` ("nf4", "fp4" or "dynamic", bnb's signed 8-bit map) on ``device``, one
    cached copy per device (no host copy per call)."""
    key = (name, str(torch.device(device) if device is not None else "cpu"))
    table = _CODES_ON.get(key)
    if table is None:
        table = _CODES_ON[key] = (dynamic_map_signed() if name == "dynamic" else _CODES[name]).to(device)
    return table


@functools.lru_cache(maxsize=None)
def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map (256 sorted fp32 values): for each
    exponent e in 0..6, 2**e + 1 evenly spaced fractions in [0.1, 1], the midpoints of
    consecutive ones scaled by 10**(e - 6), both signs; then 0 and 1, zero-padded, sorted."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


_SEARCH_ON: dict = {}


def code_search_tables(name: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints fp32 [len - 1], order int32 [len]) of code table ``name`` ("nf4", "fp4" or
    "dynamic", bnb's signed 8-bit map), one cached copy per device: the nearest entry of x is
    ``order[#{midpoints < x}]``, an exact midpoint going to the lower sorted index. Sorted stably
    on the CPU: FP4 holds both 0.0 and -0.0, and an unstable sort may order that tie differently
    per device, which would flip the sign nibble of exact zeros. Cached so a quantizer on a GPU
    neither synchronizes nor copies from the host."""
    key = (name, str(torch.device(device) if device is not None else "cpu"))
    tables = _SEARCH_ON.get(key)
    if tables is None:
        code = _table_on(name)
        order = torch.argsort(code, stable=True)
        ordered = code[order]
        tables = _SEARCH_ON[key] = (((ordered[:-1] + ordered[1:]) / 2).to(device),
                                    order.to(torch.int32).to(device))
    return tables


def _nearest_codes(scaled: torch.Tensor, name: str) -> torch.Tensor:
    """Index (int32) of the nearest entry of code table ``name`` (code_search_tables' rule)."""
    bounds, order = code_search_tables(name, scaled.device)
    return order[torch.bucketize(scaled, bounds, out_int32=True)]


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled values in [-1, 1], fp32 absmax per block) for a flat fp32 tensor. An all-zero
    block keeps absmax 0, as bitsandbytes' CUDA quantizer stores it (its values scale to 0)."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if rem:
        tail_max = flat[full:].abs().max()
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max.clamp(min=1e-38), -1, 1)])
    return scaled, absmax


def _dequantize_blockwise(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 values [n] times their block's absmax."""
    n = values.numel()
    idx = torch.arange(n, device=values.device) // blocksize
    return values * absmax[idx]


def _quantize_4bit_torch(w: torch.Tensor, quant_type: str, blocksize: int):
    """(packed uint8 [(n + 1) // 2, 1], absmax fp32 [n_blocks]), vectorized torch."""
    scaled, absmax = _blockwise_scale(w.detach().reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = _nearest_codes(scaled, quant_type).to(torch.uint8)
    return ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1), absmax


def _quantize_nested_torch(absmax: torch.Tensor, offset: torch.Tensor | None = None):
    """bitsandbytes' double quantization of fp32 absmax [nblocks]: (codes uint8 [nblocks], absmax2
    fp32 [ceil(nblocks / 256)], offset fp32 scalar, absmax.mean() unless given)."""
    offset = absmax.mean() if offset is None else offset
    scaled2, absmax2 = _blockwise_scale(absmax - offset, NESTED_BLOCKSIZE)
    return _nearest_codes(scaled2, "dynamic").to(torch.uint8), absmax2, offset


def _quantize_parts(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, use_triton: bool):
    """(packed, absmax, (codes, absmax2, offset) or None) of a float [out, in] weight, by the
    Triton kernels (``use_triton``; they also refuse NaN / Inf) or by vectorized torch."""
    if not use_triton:
        packed, absmax = _quantize_4bit_torch(w, quant_type, blocksize)
        return packed, absmax, _quantize_nested_torch(absmax) if double_quant else None
    from ..triton import quantize as kernels
    packed, absmax, nonfinite = kernels.quantize_4bit(w.contiguous(), quant_type, blocksize)
    nested = kernels.quantize_nested(absmax) if double_quant else None
    if nonfinite.item():
        raise ValueError(_NONFINITE.format(name="weight"))
    return packed, absmax, nested


def dequantize_parts(packed, absmax, code, absmax2, code2, offset, blocksize, shape, dtype) -> torch.Tensor:
    """Decode bitsandbytes 4-bit parts to a [out, in] tensor in ``dtype`` (bnb's exact rule)."""
    return decode_flat_parts(packed, absmax, code, absmax2, code2, offset, blocksize, 0, math.prod(shape),
                             dtype).view(*shape)


def decode_flat_parts(packed, absmax, code, absmax2, code2, offset, blocksize, start, count,
                      dtype) -> torch.Tensor:
    """Elements [start, start + count) of the flattened weight of bitsandbytes 4-bit parts, in
    ``dtype``, with dequantize_parts' exact values, decoding only that range (plain torch, any
    device): whole rows of W are such a range."""
    if count == 0:
        return torch.empty(0, dtype=dtype, device=packed.device)
    b0 = start // 2
    byte = packed.reshape(-1)[b0:(start + count + 1) // 2]
    nibble = torch.stack([byte >> 4, byte & 0xF], dim=1).reshape(-1)[start - 2 * b0:start - 2 * b0 + count]
    k0, k1 = start // blocksize, (start + count - 1) // blocksize + 1
    if absmax2 is None:
        scale = absmax[k0:k1].float()
    else:
        blocks = torch.arange(k0, k1, device=packed.device)
        scale = code2[absmax[k0:k1].long()] * absmax2[blocks // NESTED_BLOCKSIZE] + offset
    scale = scale.repeat_interleave(blocksize)[start - k0 * blocksize:start - k0 * blocksize + count]
    return (code[nibble.long()] * scale).to(dtype)


_NONFINITE = ("{name} contains NaN or Inf; quantizing needs finite values (they would corrupt their "
              "block's scale)")


def _check_float_matrix(w: torch.Tensor, name: str, finite: bool = True):
    """A float [out, in] tensor holding data; ``finite``: and no NaN / Inf (a full pass and a
    host synchronization; the Triton quantizer counts them in its own pass instead)."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {list(w.shape)}")
    check_materialized(w, name, "quantizing a weight")
    if finite and not torch.isfinite(w).all():
        raise ValueError(_NONFINITE.format(name=name))


class Bnb4bitWeight:
    """A frozen [out, in] weight in bitsandbytes' 4-bit format (``quant_type`` nf4 or fp4)."""

    quant_type = "nf4"

    def __init__(self, packed, absmax, shape, dtype, blocksize, offset=None, absmax2=None, code2=None):
        self.packed, self.absmax = packed, absmax
        self.shape, self.dtype, self.blocksize = torch.Size(shape), dtype, blocksize
        self.offset, self.absmax2, self.code2 = offset, absmax2, code2
        self._validate()

    def _validate(self):
        # The kernels index these buffers by the layout above and read the statistics as fp32:
        # a bf16 absmax, a short buffer or a missing nested part would decode other weights, not fail.
        name = type(self).__name__
        if len(self.shape) != 2 or min(self.shape) < 0:
            raise ValueError(f"{name}: shape must be [out, in], got {list(self.shape)}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"{name}: blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        n = self.shape.numel()
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"{name}: packed must be uint8 with {(n + 1) // 2} bytes for shape {list(self.shape)}, "
                             f"got {self.packed.dtype} with {self.packed.numel()}")
        nested_parts = (self.offset, self.absmax2, self.code2)
        if any(t is None for t in nested_parts) and any(t is not None for t in nested_parts):
            raise ValueError(f"{name}: double quantization needs offset, absmax2 and code2 together")
        nblocks = -(-n // self.blocksize)
        want = torch.uint8 if self.absmax2 is not None else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != nblocks:
            raise ValueError(f"{name}: absmax must be {want} with {nblocks} entries, got {self.absmax.dtype} "
                             f"with {self.absmax.numel()}")
        if self.absmax2 is not None:
            for part, count in ((self.offset, 1), (self.absmax2, -(-nblocks // NESTED_BLOCKSIZE)), (self.code2, 256)):
                if part.dtype != torch.float32 or part.numel() != count:
                    raise ValueError(f"{name}: offset, absmax2 and code2 must be fp32 with 1, "
                                     f"{-(-nblocks // NESTED_BLOCKSIZE)} and 256 entries, got {part.dtype} "
                                     f"with {part.numel()}")
        devices = {t.device for t in (self.packed, self.absmax, *nested_parts) if t is not None}
        if len(devices) > 1:
            raise ValueError(f"{name}: all parts must be on one device, got {sorted(map(str, devices))}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(cls, w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
        """Quantize a float [out, in] weight: on a GPU two Triton launches and torch's mean of
        the absmax, the only host synchronization the final check for NaN / Inf; elsewhere
        vectorized torch. The two give the same bytes (tests)."""
        _check_float_matrix(w, "weight", finite=not w.is_cuda)
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
        packed, absmax, nested = _quantize_parts(w.detach(), cls.quant_type, blocksize, double_quant,
                                                 use_triton=w.is_cuda)
        if nested is None:
            return cls(packed, absmax, w.shape, w.dtype, blocksize)
        q, absmax2, offset = nested
        code2 = _table_on("dynamic", w.device).clone()  # each weight its own: the cached map stays intact
        return cls(packed, q, w.shape, w.dtype, blocksize, offset=offset, absmax2=absmax2, code2=code2)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block scales in fp32 (decoding the double quantization if any)."""
        if not self.nested:
            return self.absmax
        return _dequantize_blockwise(self.code2[self.absmax.long()], self.absmax2, NESTED_BLOCKSIZE) + self.offset

    @property
    def code(self) -> torch.Tensor:
        return code_table(self.quant_type, self.device)

    def parts(self) -> tuple:
        """(packed, absmax, code, absmax2, code2, offset, blocksize, shape): the plain values an op
        or kernel needs (custom ops take tensors and scalars only). absmax2, code2 and offset (an
        fp32 tensor [] or [1]) are None without double quantization."""
        return (self.packed, self.absmax, self.code, self.absmax2, self.code2, self.offset, self.blocksize,
                tuple(self.shape))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] weight in ``dtype`` (default: the original dtype)."""
        if self.packed.is_cuda:  # one Triton pass, bit-identical to the torch rule below (tests)
            return self.dequantize_rows(0, self.shape[0], dtype)
        return dequantize_parts(self.packed, self.absmax, self.code, self.absmax2, self.code2, self.offset,
                                self.blocksize, self.shape, dtype or self.dtype)

    def dequantize_rows(self, r0: int, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W[r0:r0+rows], [rows, in] in ``dtype``, with dequantize()'s exact values: a Triton pass on
        CUDA, bnb's rule on the flat range of these rows on CPU (a byte may straddle two rows when
        in is odd)."""
        dtype = dtype or self.dtype
        in_f = self.shape[1]
        if self.packed.is_cuda:
            from ..triton.quant_matmul import dequantize_window

            out = torch.empty((rows, in_f), dtype=dtype, device=self.packed.device)
            return dequantize_window(*self.parts(), r0, rows, 0, in_f, out)
        return decode_flat_parts(*self.parts()[:7], r0 * in_f, rows * in_f, dtype).view(rows, in_f)

    @property
    def bits_per_parameter(self) -> float:
        total = self.packed.numel() * 8 + self.absmax.numel() * self.absmax.element_size() * 8
        if self.nested:
            total += (self.absmax2.numel() + 1) * 32  # + offset; the 256-entry map is shared
        return total / self.shape.numel()

    def to(self, device) -> "Bnb4bitWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return type(self)(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
                          move(self.offset), move(self.absmax2), move(self.code2))

    # ------------------------------------------------------------------ bitsandbytes interop
    @classmethod
    def from_bnb(cls, param_or_linear):
        """Wrap a bitsandbytes Params4bit (or a Linear4bit's weight) without re-quantizing: the
        packed bytes and statistics are shared, not copied."""
        param = getattr(param_or_linear, "weight", param_or_linear)
        qs = getattr(param, "quant_state", None)
        if qs is None:
            raise ValueError("from_bnb: expected a quantized bitsandbytes Params4bit / Linear4bit "
                             "(no quant_state: move it to its device first to quantize it)")
        if bnb_cpu_repacked(param):
            raise ValueError("from_bnb: bitsandbytes has repacked this weight for its CPU kernel (quant_state."
                             "packing_format_for_cpu, done by an eval-mode forward without gradients on a CPU with "
                             "AVX512-BF16): the bytes are not bnb's standard layout and absmax was rounded to bf16. "
                             "Wrap the layer before running it that way, or load it again")
        if qs.quant_type != cls.quant_type:
            other = NF4Weight if qs.quant_type == "nf4" else FP4Weight
            raise ValueError(f"from_bnb: the weight is {qs.quant_type}; use {other.__name__}.from_bnb")
        packed = param.data.view(torch.uint8).reshape(-1, 1)
        if qs.nested:
            return cls(packed, qs.absmax, qs.shape, qs.dtype, qs.blocksize, offset=qs.offset,
                       absmax2=qs.state2.absmax, code2=qs.state2.code)
        return cls(packed, qs.absmax, qs.shape, qs.dtype, qs.blocksize)

    def to_bnb(self):
        """A bitsandbytes Params4bit holding these exact bytes (no re-quantization)."""
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        qs = QuantState(absmax=self.absmax, shape=self.shape, code=code_table(self.quant_type, self.device),
                        blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
                        offset=self.offset, state2=state2)
        return bnb.nn.Params4bit(self.packed, requires_grad=False, quant_state=qs, blocksize=self.blocksize,
                                 compress_statistics=self.nested, quant_type=self.quant_type,
                                 bnb_quantized=True, module=None)

    def to_bnb_linear(self, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        """A bitsandbytes Linear4bit over these exact bytes (``to_bnb()``) and ``bias`` (frozen,
        sharing its storage), computing in ``compute_dtype`` (default: this weight's dtype)."""
        import bitsandbytes as bnb

        out_features, in_features = self.shape
        lin = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None,
                                compute_dtype=compute_dtype or self.dtype, quant_type=self.quant_type)
        lin.weight = self.to_bnb()
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
        return lin

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' Linear4bit writes for its weight, under the same keys."""
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax,
               f"{prefix}.quant_map": code_table(self.quant_type, self.device)}
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                "dtype": str(self.dtype).replace("torch.", ""), "shape": list(self.shape)}
        if self.nested:
            out[f"{prefix}.nested_absmax"] = self.absmax2
            out[f"{prefix}.nested_quant_map"] = self.code2
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=float(self.offset))
        blob = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "weight"):
        """Inverse of ``state_dict``; also reads a bitsandbytes Linear4bit state_dict."""
        key = f"{prefix}.quant_state.bitsandbytes__{cls.quant_type}"
        if key not in sd:
            found = [k for k in sd if k.startswith(f"{prefix}.quant_state.")]
            raise KeyError(f"from_state_dict: no {key!r} entry (found {found})")
        meta = json.loads(bytes(sd[key].tolist()).decode("utf-8"))
        dtype = getattr(torch, meta["dtype"])
        packed, absmax = sd[prefix].view(torch.uint8).reshape(-1, 1), sd[f"{prefix}.absmax"]
        if f"{prefix}.nested_absmax" in sd:
            offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=absmax.device)
            return cls(packed, absmax, meta["shape"], dtype, meta["blocksize"], offset=offset,
                       absmax2=sd[f"{prefix}.nested_absmax"], code2=sd[f"{prefix}.nested_quant_map"])
        return cls(packed, absmax, meta["shape"], dtype, meta["blocksize"])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={list(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.nested}, bits/param={self.bits_per_parameter:.3f}, device={self.device})")


class NF4Weight(Bnb4bitWeight):
    """4-bit NormalFloat weight, bit-compatible with bitsandbytes (QLoRA's storage)."""

    quant_type = "nf4"


class FP4Weight(Bnb4bitWeight):
    """bitsandbytes' 4-bit float weight (Params4bit's default quant_type)."""

    quant_type = "fp4"


def bnb_cpu_repacked(param) -> bool:
    """True when bitsandbytes' CPU inference has repacked a Params4bit in place for its own kernel
    (another byte layout, absmax in bf16): only bnb can compute with it then."""
    return bool(getattr(getattr(param, "quant_state", None), "packing_format_for_cpu", False))


def is_bnb_linear4bit(module) -> bool:
    """True for a bitsandbytes Linear4bit (quantized or not yet)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def bnb_linear4bit_class(module):
    """NF4Weight / FP4Weight for a quantized bitsandbytes Linear4bit, else None (another module,
    or a Linear4bit whose weight is not quantized yet: bnb quantizes it on the move to a device)."""
    if not is_bnb_linear4bit(module):
        return None
    qs = getattr(module.weight, "quant_state", None)
    return {"nf4": NF4Weight, "fp4": FP4Weight}.get(qs.quant_type) if qs is not None else None


__all__ = ["NF4Weight", "FP4Weight", "code_table", "dynamic_map_signed", "BLOCKSIZES", "bnb_linear4bit_class",
           "bnb_cpu_repacked", "is_bnb_linear4bit"]
