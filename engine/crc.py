"""CRC-64/XZ, the checksum of files and metadata.

crcmod defines it (and is the oracle in tests) but runs at ~0.4 GB/s, which would
cap the engine; fastcrc computes the same values at ~9 GB/s (perf/primitives.py)
and can continue from a previous value, so the CRC is built block by block.
"""

from __future__ import annotations

import fastcrc

BytesLike = bytes | bytearray | memoryview

CHECK_VALUE = 0x995DC9BBDF1939FA  # CRC-64/XZ of b"123456789"
POLY = 0x142F0E1EBA9EA3693


def crc64(data: BytesLike, value: int = 0) -> int:
    """CRC-64/XZ of ``data``, continuing from ``value`` (the CRC of what came before; 0 for nothing)."""
    return int(fastcrc.crc64.xz(data, value))


def reference_crc64(data: bytes) -> int:
    """The slow, defining implementation (crcmod); used by tests as an oracle."""
    import crcmod

    fn = crcmod.mkCrcFun(POLY, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
    return int(fn(data))
