"""crc64_combine joins per-batch CRCs into the file's CRC (what the worker pool relies on)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.crc import crc64, crc64_combine, reference_crc64


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_combine_equals_crc_of_concatenation(a: bytes, b: bytes) -> None:
    assert crc64_combine(crc64(a), crc64(b), len(b)) == reference_crc64(a + b)


def test_combine_many_batches_like_the_pool() -> None:
    data = os.urandom(5 * 65536 * 3 + 12345)
    batch = 3 * 65536
    crc = 0
    for pos in range(0, len(data), batch):
        piece = data[pos : pos + batch]
        crc = crc64_combine(crc, crc64(piece), len(piece))
    assert crc == reference_crc64(data)


def test_combine_with_empty_pieces() -> None:
    data = os.urandom(1000)
    assert crc64_combine(crc64(data), crc64(b""), 0) == reference_crc64(data)
    assert crc64_combine(0, crc64(data), len(data)) == reference_crc64(data)
