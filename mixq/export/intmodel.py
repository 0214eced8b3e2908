"""The mixq integer model: a file format and a reference executor that uses integers only.

File: a safetensors container (no pickle) with two uint8 tensors. `data` is the raw bytes of every
array back to back: packed weight codes, per-slice bit widths and step exponents, int biases, input
lookup tables and codebooks. `manifest` is zlib-compressed JSON: the graph (one node per layer or
op), per-layer bits and bytes, the data set's normalization, the index of the arrays in `data`
(name, dtype, shape, offset) and a SHA-256 of every array, so damage is detected on load. Two
tensors instead of one per array, and a compressed manifest, keep the file's overhead over the sum
of its layer bits to a few KiB (a safetensors header costs about 100 bytes per tensor).

Executor: every tensor between layers is exact fixed point, `Fixed(v, e, d)` = v * 2^e / d with
integer values v (int64), a power-of-two exponent e per channel and an integer divisor d (from
average pooling). Convolutions accumulate integer codes in int32 where no sum can overflow it
(checked per layer and batch), else in int64; requantization to the next quantizer's codes is a
shift (or, for non power-of-two steps, an integer multiplier and shift) with round-half-to-even,
the rounding torch.round uses; a left shift that would overflow int64 raises instead of wrapping.
Nothing here touches floating point until the final logits are reported.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .pack import unpack_base_k, unpack_bits

FORMAT = "mixq-int/2"


class ExportFormatError(ValueError):
    """A damaged, truncated or foreign file."""


@dataclass
class Fixed:
    """v * 2^e / d: v int64 (N, C, ...) or (N, F), e int64 (C,) or (F,), d a positive int."""

    v: np.ndarray
    e: np.ndarray
    d: int = 1

    def channel_shape(self) -> tuple[int, ...]:
        return (1, -1) + (1,) * (self.v.ndim - 2)

    def aligned(self) -> tuple[np.ndarray, int]:
        """(values at the common exponent min(e), that exponent): exact left shifts."""
        base = int(self.e.min())
        return _shl(self.v, (self.e - base).reshape(self.channel_shape())), base

    def to_float(self) -> np.ndarray:
        return self.v * np.exp2(self.e.astype(np.float64)).reshape(self.channel_shape()) / self.d


def round_half_even_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """round(num / den) with ties to even, in integers (den > 0). Powers of two take shifts."""
    den = np.asarray(den, dtype=np.int64)
    if den.size and not (den & (den - 1)).any():  # every den = 2^k: shift and mask, no division
        k = np.frexp(den.astype(np.float64))[1].astype(np.int64) - 1  # exact for powers of two
        q = num >> k
        rem = num & (den - 1)
    else:
        q = np.floor_divide(num, den)
        rem = num - q * den
    twice = rem << 1
    return q + ((twice > den) | ((twice == den) & ((q & 1) == 1)))


def _shl(v: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """v << shift (shift >= 0, broadcast), refusing to overflow int64 instead of wrapping."""
    top = int(np.max(shift)) if np.size(shift) else 0
    if top and v.size and int(np.abs(v).max()).bit_length() + top > 62:
        raise OverflowError(f"fixed-point value needs more than 62 bits (shift {top})")
    return v << shift


def dyadic(step: float, mult_bits: int = 15) -> tuple[int, int]:
    """step ~= mult * 2^exp with an odd integer mult < 2^mult_bits (mult = 1 for powers of two)."""
    exp = int(np.floor(np.log2(step))) - (mult_bits - 1)
    mult = int(round(step / 2.0**exp))
    while mult % 2 == 0:
        mult, exp = mult // 2, exp + 1
    return mult, exp


def requantize(x: Fixed, quant: dict) -> np.ndarray:
    """Integer codes clamp(round(x / step), lo, n) of a quantizer with step = mult * 2^exp:
    x / step = v 2^(e - exp) / (d mult), one exact integer division with ties to even."""
    shift = (x.e - int(quant["exp"])).reshape(x.channel_shape())
    num = _shl(x.v, np.maximum(shift, 0))
    den = _shl(np.asarray(x.d * int(quant.get("mult", 1)), dtype=np.int64), np.maximum(-shift, 0))
    codes = round_half_even_div(num, den)
    lo = -int(quant["n"]) if quant["signed"] else 0
    return np.clip(codes, lo, int(quant["n"]))


def _int_dtype(x_bound: int, w: np.ndarray) -> type:
    """int32 when no accumulator (nor partial sum) can leave int32: max|x| * max_o sum|w_o| < 2^31."""
    w_sum = int(np.abs(w).reshape(len(w), -1).sum(axis=1).max()) if w.size else 0
    return np.int32 if x_bound * w_sum < 2**31 else np.int64


def matmul_int(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (M, K) @ w (O, K).T exactly, int64 result; int32 arithmetic where provably safe."""
    dt = _int_dtype(int(np.abs(x).max()) if x.size else 0, w)
    if dt is np.int64:
        return x.astype(np.int64) @ w.astype(np.int64).T
    return np.einsum("mk,ok->mo", x.astype(dt), w.astype(dt)).astype(np.int64)


def conv2d_int(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups: int,
               chunk_elements: int = 1 << 22) -> np.ndarray:
    """Integer 2-D convolution, exact, int64 result. x (N, C, H, W), w (O, C/groups, kh, kw).

    Accumulates in int32 when max|x| * max_o sum|w_o| < 2^31 (then no partial sum can overflow),
    else in int64. Depthwise convs (C/groups = 1) are a sum over the kernel taps of shifted
    products; the others an im2col matmul on channels-last patches, `chunk_elements` at a time.
    The result is laid out channels-last in memory (a transposed view), which the next layer's
    im2col reads without a copy.
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    dt = _int_dtype(int(np.abs(x).max()) if x.size else 0, w)
    wt = w.astype(dt)

    def tap(a, i, j):  # the input pixels that kernel tap (i, j) meets, on H, W axes 1 and 2
        return a[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]

    xt = np.pad(x.transpose(0, 2, 3, 1).astype(dt), ((0, 0), (ph, ph), (pw, pw), (0, 0)))  # NHWC
    if cg == 1:  # depthwise (output channel k reads input channel k // og)
        if og > 1:
            xt = np.repeat(xt, og, axis=3)
        out = np.zeros((n, oh, ow, o), dtype=dt)
        for i in range(kh):
            for j in range(kw):
                out += tap(xt, i, j) * wt[:, 0, i, j]
        return out.astype(np.int64).transpose(0, 3, 1, 2)
    out = np.empty((n, oh, ow, o), dtype=dt)
    step = max(1, chunk_elements // max(1, oh * ow * kh * kw * cg))
    for g in range(groups):
        xs = xt[..., g * cg:(g + 1) * cg]
        wg = wt[g * og:(g + 1) * og].transpose(0, 2, 3, 1).reshape(og, -1)  # (og, kh kw cg)
        for a in range(0, n, step):
            part = xs[a:a + step]
            cols = np.empty((len(part), oh, ow, kh, kw, cg), dtype=dt)
            for i in range(kh):
                for j in range(kw):
                    cols[:, :, :, i, j] = tap(part, i, j)
            cols = cols.reshape(-1, kh * kw * cg)
            res = np.einsum("mk,ok->mo", cols, wg) if dt is np.int32 else cols @ wg.T
            out[a:a + step, ..., g * og:(g + 1) * og] = res.reshape(len(part), oh, ow, og)
    return out.astype(np.int64).transpose(0, 3, 1, 2)


def _pool(x: np.ndarray, kernel, stride, padding, fill: int, reduce) -> np.ndarray:
    """Max (reduce=np.maximum) or sum (np.add) over pooling windows, one kernel tap at a time."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    _, _, h, wd = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    out = None
    for i in range(kh):
        for j in range(kw):
            t = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            out = t.copy() if out is None else reduce(out, t, out=out)
    return out


@dataclass
class IntModel:
    """An exported model: `manifest` (JSON-able) and `tensors` (numpy arrays)."""

    manifest: dict
    tensors: dict[str, np.ndarray]
    _weights: dict = field(default_factory=dict, repr=False)

    # -- file --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> int:
        """Write the file; returns its size in bytes."""
        from safetensors.numpy import save_file

        index, offset, parts = [], 0, []
        for name in sorted(self.tensors):
            a = np.ascontiguousarray(self.tensors[name])
            index.append([name, a.dtype.str, list(a.shape), offset])
            parts.append(a.tobytes())
            offset += a.nbytes
        manifest = dict(self.manifest, arrays=index, sha256=_digest(self.tensors))
        packed = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
        save_file({"data": np.frombuffer(b"".join(parts) or b"\0", dtype=np.uint8),
                   "manifest": np.frombuffer(packed, dtype=np.uint8)}, str(path), metadata={"format": FORMAT})
        return Path(path).stat().st_size

    @classmethod
    def load(cls, path: str | Path) -> IntModel:
        """Read a file written by `save`; a damaged or foreign file raises ExportFormatError."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no exported model at {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                stored = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises several kinds on damaged headers
            raise ExportFormatError(f"{path} is not a readable mixq integer model (damaged or "
                                    f"truncated?): {err}") from None
        if meta.get("format") != FORMAT:
            raise ExportFormatError(f"{path} is not a {FORMAT} file (format {meta.get('format')!r}); "
                                    "export the run again with this version of mixq")
        try:
            manifest = json.loads(zlib.decompress(stored["manifest"].tobytes()))
            data = stored["data"].tobytes()
            tensors = {}
            for name, dtype, shape, offset in manifest.pop("arrays"):
                count = int(np.prod(shape, dtype=np.int64))
                tensors[name] = np.frombuffer(data, dtype=np.dtype(dtype), count=count,
                                              offset=offset).reshape(shape).copy()
        except (KeyError, ValueError, TypeError, zlib.error) as err:
            raise ExportFormatError(f"{path} has a damaged manifest or data block: {err}") from None
        if manifest.pop("sha256", None) != _digest(tensors):
            raise ExportFormatError(f"{path} is damaged: its tensors fail the SHA-256 checksum")
        return cls(manifest, tensors)

    # -- weights -------------------------------------------------------------------------------
    def weight_codes(self, layer: dict) -> np.ndarray:
        """Integer weights of a layer (O, ...), decoded once: uniform codes, or codebook values."""
        name = layer["name"]
        if name not in self._weights:
            t, shape = self.tensors, layer["weight_shape"]
            count = int(np.prod(shape))
            slice_bits = t[f"{name}.w_slices"][:, 0].astype(np.int64)
            per_slice = count // len(slice_bits)
            if layer.get("codebook"):
                k = layer["levels"]
                blob = t[f"{name}.w_packed"].tobytes()
                if layer["packing"] == "base_k":
                    idx = unpack_base_k(blob, k, count)
                else:
                    idx = unpack_bits(blob, np.repeat(slice_bits, per_slice), signed=False)
                book = t[f"{name}.codebook"].astype(np.int64)  # (S, k)
                rows = idx.reshape(len(book), -1)
                codes = np.take_along_axis(book, rows, axis=1)
            else:
                codes = unpack_bits(t[f"{name}.w_packed"].tobytes(), np.repeat(slice_bits, per_slice),
                                    signed=True)
            self._weights[name] = codes.reshape(shape).astype(np.int64)
        return self._weights[name]

    # -- execution -----------------------------------------------------------------------------
    @property
    def exact_steps(self) -> bool:
        """Every step a power of two: the executor then computes exactly what the float64
        fake-quantized model computes. Arbitrary steps are approximated by 15-bit integer
        multipliers (`dyadic`), so an activation that sits within about 2^-15 of a rounding
        boundary may land on the neighbouring code."""
        quants = [v["in_quant"] for v in self.manifest["layers"].values()]
        quants += [n["quant"] for n in self.manifest["graph"] if n["op"] == "quant"]
        return (all(q.get("mult", 1) == 1 for q in quants)
                and not any(k.endswith(".w_mult") for k in self.tensors))

    def output_step(self, out: Fixed) -> np.ndarray:
        """The grid step of each output channel (class): 2^e / d, times the integer multipliers
        (input mult x weight mult) of the layer that produced it when only grid-preserving ops
        (flatten, pooling, ReLU) lie between."""
        nodes = {n["name"]: n for n in self.manifest["graph"]}
        node = nodes[self.manifest["graph"][-1]["inputs"][0]]
        while node["op"] in ("identity", "flatten", "gap", "avgpool", "maxpool", "relu"):
            node = nodes[node["inputs"][0]]
        step = np.exp2(out.e.astype(np.float64)) / out.d
        if node["op"] in ("conv", "linear"):
            layer = self.manifest["layers"][node["layer"]]
            name, slices = layer["name"], self.tensors[f"{layer['name']}.w_slices"]
            w_mult = self.tensors.get(f"{name}.w_mult", np.ones(len(slices))).astype(np.float64)
            mult = np.repeat(w_mult, layer["weight_shape"][0] // len(slices))
            mult = mult * layer["in_quant"].get("mult", 1)
            step = step * np.repeat(mult, len(step) // len(mult))
        return step

    def run(self, images: np.ndarray) -> Fixed:
        """Execute on uint8 images (N, C, H, W); returns the output as exact fixed point."""
        values: dict[str, Fixed | np.ndarray] = {}
        for node in self.manifest["graph"]:
            op, args = node["op"], [values[i] for i in node["inputs"]]
            values[node["name"]] = self._op(op, node, args, images)
        return values[self.manifest["graph"][-1]["name"]]

    def predict(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            v, _ = self.run(images[i:i + batch_size]).aligned()  # same exponent and divisor
            out.append(v.argmax(axis=1))
        return np.concatenate(out)

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.run(images).to_float()

    def _op(self, op, node, args, images):
        if op == "input":
            return images
        if op == "output":
            return args[0]
        if op in ("conv", "linear"):
            return self._layer(node, args[0])
        if op == "quant":
            x = args[0]
            if node.get("cap") is not None:
                x = _clamp_max(x, node["cap"])
            q = node["quant"]
            return Fixed(requantize(x, q) * int(q.get("mult", 1)), np.full(x.v.shape[1], q["exp"]))
        x = args[0]
        if op == "relu":
            return Fixed(np.maximum(x.v, 0), x.e, x.d)
        if op == "relu6":
            return _clamp_max(Fixed(np.maximum(x.v, 0), x.e, x.d), 6.0)
        if op == "identity":
            return x
        if op == "add":
            return _add(*args)
        if op == "maxpool":
            lowest = np.iinfo(np.int64).min
            return Fixed(_pool(x.v, node["kernel"], node["stride"], node["padding"], lowest, np.maximum),
                         x.e, x.d)
        if op == "avgpool":
            v = _pool(x.v, node["kernel"], node["stride"], node["padding"], 0, np.add)
            return Fixed(v, x.e, x.d * int(np.prod(node["kernel"])))
        if op == "gap":
            return Fixed(x.v.sum(axis=(2, 3), keepdims=node.get("keepdim", True)), x.e,
                         x.d * x.v.shape[2] * x.v.shape[3])
        if op == "flatten":
            spatial = int(np.prod(x.v.shape[2:])) if x.v.ndim > 2 else 1
            return Fixed(x.v.reshape(len(x.v), -1), np.repeat(x.e, spatial), x.d)
        if op == "subsample":
            s = node["stride"]
            return Fixed(x.v[:, :, ::s[0], ::s[1]], x.e, x.d)
        if op == "pad_channels":
            lo, hi = node["pad"]
            v = np.pad(x.v, ((0, 0), (lo, hi)) + ((0, 0),) * (x.v.ndim - 2))
            e = np.pad(x.e, (lo, hi), constant_values=int(x.e.min()))
            return Fixed(v, e, x.d)
        raise ExportFormatError(f"unknown op {op!r} in node {node['name']!r}")

    def _layer(self, node: dict, x) -> Fixed:
        layer = self.manifest["layers"][node["layer"]]
        name, quant = layer["name"], layer["in_quant"]
        if isinstance(x, np.ndarray):  # the raw uint8 image: per-channel lookup table to codes
            lut = self.tensors[f"{name}.in_lut"].astype(np.int64)  # (C, 256)
            codes = np.stack([lut[c][x[:, c]] for c in range(x.shape[1])], axis=1)
        else:
            codes = requantize(x, quant)
        w = self.weight_codes(layer)
        if node["op"] == "conv":
            acc = conv2d_int(codes, w, layer["stride"], layer["padding"], layer["dilation"], layer["groups"])
        else:
            acc = matmul_int(codes, w)
        slices = self.tensors[f"{name}.w_slices"].astype(np.int64)  # (S, 2): bits, exponent
        per_slice = w.shape[0] // len(slices)
        w_exp = np.repeat(slices[:, 1], per_slice)
        w_mult = np.repeat(self.tensors.get(f"{name}.w_mult", np.ones(len(slices))).astype(np.int64),
                           per_slice)
        shape = (1, -1) + (1,) * (acc.ndim - 2)
        if f"{name}.bias" in self.tensors:  # on the accumulator grid: units of step_in * step_w
            acc = acc + self.tensors[f"{name}.bias"].astype(np.int64).reshape(shape)
        scale = (int(quant.get("mult", 1)) * w_mult).reshape(shape)
        return Fixed(acc * scale, int(quant["exp"]) + w_exp, 1)


def _digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(np.ascontiguousarray(tensors[k]).tobytes())
    return h.hexdigest()


def _clamp_max(x: Fixed, cap: float) -> Fixed:
    """min(x, cap) exactly: shift x to an exponent at which cap is an integer multiple."""
    e = np.minimum(x.e, 0)
    v = _shl(x.v, (x.e - e).reshape(x.channel_shape()))
    bound = (np.round(cap * x.d * np.exp2(-e.astype(np.float64)))).astype(np.int64)
    return Fixed(np.minimum(v, bound.reshape(x.channel_shape())), e, x.d)


def _add(a: Fixed, b: Fixed) -> Fixed:
    """a + b exactly: common divisor, then the smaller exponent per channel."""
    e = np.minimum(a.e, b.e)
    va = _shl(a.v * b.d, (a.e - e).reshape(a.channel_shape()))
    vb = _shl(b.v * a.d, (b.e - e).reshape(b.channel_shape()))
    return Fixed(va + vb, e, a.d * b.d)
