"""Bit packing: integer codes with mixed widths (one width per slice) into one little-endian
bitstream, and back. No padding between elements or slices: a tensor of N elements at widths b_i
takes exactly ceil(sum b_i / 8) bytes. Also base-k packing (several k-ary codes per byte), the
storage NUUQ's equivalent bits log2(k) are closest to.
"""

from __future__ import annotations

import math

import numpy as np

from ..flexible import codes_per_word


def to_unsigned(codes: np.ndarray, bits: np.ndarray, signed: bool) -> np.ndarray:
    """Two's complement of signed codes in `bits` bits (as uint64), unsigned codes unchanged."""
    codes = codes.astype(np.int64)
    lo = -(1 << (bits - 1)) if signed else 0
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    if (codes < lo).any() or (codes > hi).any():
        raise ValueError("a code does not fit its bit width")
    return (codes & ((1 << bits) - 1)).astype(np.uint64)


def from_unsigned(values: np.ndarray, bits: np.ndarray, signed: bool) -> np.ndarray:
    values = values.astype(np.int64)
    if not signed:
        return values
    sign = (values >> (bits - 1)) & 1
    return values - (sign << bits)


def pack_bits(codes: np.ndarray, bits: np.ndarray, signed: bool) -> bytes:
    """Pack `codes` (any shape, flattened in C order) with per-element widths `bits` (same size)."""
    codes, bits = np.asarray(codes).ravel(), np.asarray(bits, dtype=np.int64).ravel()
    if codes.size != bits.size:
        raise ValueError(f"{codes.size} codes but {bits.size} widths")
    if codes.size == 0:
        return b""
    if bits.min() < 1 or bits.max() > 32:
        raise ValueError("bit widths must lie in 1..32")
    values = to_unsigned(codes, bits, signed)
    offsets = np.concatenate([[0], np.cumsum(bits)[:-1]])
    stream = np.zeros(int(bits.sum()), dtype=np.uint8)
    for j in range(int(bits.max())):  # one pass per bit position: vectorized over elements
        active = bits > j
        stream[offsets[active] + j] = (values[active] >> np.uint64(j)) & np.uint64(1)
    return np.packbits(stream, bitorder="little").tobytes()


def unpack_bits(blob: bytes, bits: np.ndarray, signed: bool) -> np.ndarray:
    """Inverse of `pack_bits`: int64 codes, one per entry of `bits`."""
    bits = np.asarray(bits, dtype=np.int64).ravel()
    total = int(bits.sum())
    if len(blob) != math.ceil(total / 8):
        raise ValueError(f"packed data holds {len(blob)} bytes, expected {math.ceil(total / 8)}")
    stream = np.unpackbits(np.frombuffer(blob, dtype=np.uint8), bitorder="little")[:total]
    offsets = np.concatenate([[0], np.cumsum(bits)[:-1]]) if bits.size else bits
    values = np.zeros(bits.size, dtype=np.uint64)
    for j in range(int(bits.max()) if bits.size else 0):
        active = bits > j
        values[active] |= stream[offsets[active] + j].astype(np.uint64) << np.uint64(j)
    return from_unsigned(values, bits, signed)


def pack_base_k(indices: np.ndarray, k: int) -> bytes:
    """Pack indices in [0, k) as base-k digits, `codes_per_word(k)` per byte (k <= 256)."""
    indices = np.asarray(indices, dtype=np.int64).ravel()
    if indices.size and (indices.min() < 0 or indices.max() >= k):
        raise ValueError(f"indices must lie in [0, {k})")
    per = codes_per_word(k)
    padded = np.zeros(math.ceil(indices.size / per) * per, dtype=np.int64)
    padded[: indices.size] = indices
    digits = padded.reshape(-1, per)
    weights = k ** np.arange(per, dtype=np.int64)
    return (digits * weights).sum(axis=1).astype(np.uint8).tobytes()


def unpack_base_k(blob: bytes, k: int, count: int) -> np.ndarray:
    per = codes_per_word(k)
    if len(blob) != math.ceil(count / per):
        raise ValueError(f"base-{k} data holds {len(blob)} bytes, expected {math.ceil(count / per)}")
    words = np.frombuffer(blob, dtype=np.uint8).astype(np.int64)
    digits = (words[:, None] // (k ** np.arange(per, dtype=np.int64))) % k
    return digits.ravel()[:count]
