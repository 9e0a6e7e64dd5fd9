"""CRC-64/XZ, the checksum of files and metadata.

crcmod defines it (and is the oracle in tests) but runs at ~0.4 GB/s, which would
cap the engine; fastcrc computes the same values at ~9 GB/s (perf/primitives.py)
and can continue from a previous value, so the CRC is built block by block.
"""

from __future__ import annotations

import functools

import fastcrc

BytesLike = bytes | bytearray | memoryview

CHECK_VALUE = 0x995DC9BBDF1939FA  # CRC-64/XZ of b"123456789"
POLY = 0x142F0E1EBA9EA3693


crc64_fast = fastcrc.crc64.xz  # the same, without a wrapper: for the per-block loop (blocks.py)


def crc64(data: BytesLike, value: int = 0) -> int:
    """CRC-64/XZ of ``data``, continuing from ``value`` (the CRC of what came before; 0 for nothing)."""
    return int(fastcrc.crc64.xz(data, value))


def reference_crc64(data: bytes) -> int:
    """The slow, defining implementation (crcmod); used by tests as an oracle."""
    import crcmod

    fn = crcmod.mkCrcFun(POLY, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
    return int(fn(data))


# -- joining CRCs of consecutive pieces (zlib's crc32_combine, for 64 bits) --------------------------
# CRC-64/XZ is linear over GF(2): crc(A || B) = shift(crc(A), len(B)) ^ crc(B), where shift()
# feeds len(B) zero bytes through the register. shift() is a 64x64 bit matrix; the matrices
# for 2^k zero bytes are built once, and a shift by n bytes applies one per set bit of n
# (a 1 MiB batch is a single matrix-vector product).

_REFLECTED_POLY = 0xC96C5795D7870F42


def _times(matrix: tuple[int, ...], vector: int) -> int:
    out = 0
    i = 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _square(m: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_times(m, col) for col in m)


@functools.cache
def _zero_bytes(k: int) -> tuple[int, ...]:
    """The matrix that feeds 2^k zero bytes through the register."""
    if k == 0:
        m = (_REFLECTED_POLY, *(1 << n for n in range(63)))  # one zero bit
        for _ in range(3):
            m = _square(m)
        return m
    return _square(_zero_bytes(k - 1))


def crc64_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC-64/XZ of A || B from crc(A), crc(B) and len(B)."""
    k = 0
    while len_b:
        if len_b & 1:
            crc_a = _times(_zero_bytes(k), crc_a)
        len_b >>= 1
        k += 1
    return crc_a ^ crc_b
