"""CRC-64/XZ: the fast implementation (fastcrc) against the defining one (crcmod) and a bitwise one."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.crc import CHECK_VALUE, POLY, crc64, reference_crc64

BLOCK = 64 * 1024
SIZES = [0, 1, 2, 7, 8, 9, 255, 4096, 65535, 65536, 65537, 3 * 65536 + 5, 1 << 20]


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + size).randbytes(size)


def bitwise_crc64_xz(data: bytes) -> int:
    """CRC-64/XZ straight from its definition (reflected ECMA-182 polynomial, init and xorout all ones)."""
    reflected_poly = 0xC96C5795D7870F42
    crc = 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ reflected_poly if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFFFFFFFFFF


def test_check_value() -> None:
    assert CHECK_VALUE == 0x995DC9BBDF1939FA
    assert crc64(b"123456789") == 0x995DC9BBDF1939FA
    assert reference_crc64(b"123456789") == 0x995DC9BBDF1939FA
    assert bitwise_crc64_xz(b"123456789") == 0x995DC9BBDF1939FA


def test_polynomial_is_ecma_182() -> None:
    # x^64 + the ECMA-182 polynomial 0x42F0E1EBA9EA3693; its bit reversal is the reflected form.
    assert POLY == (1 << 64) | 0x42F0E1EBA9EA3693
    assert int(f"{0x42F0E1EBA9EA3693:064b}"[::-1], 2) == 0xC96C5795D7870F42


def test_empty_input() -> None:
    assert crc64(b"") == 0
    assert reference_crc64(b"") == 0
    assert bitwise_crc64_xz(b"") == 0


@pytest.mark.parametrize("size", [0, 1, 2, 3, 8, 15, 16, 17, 100, 1000])
def test_reference_matches_bitwise_definition(size: int) -> None:
    data = random_bytes(size, seed=7)
    assert reference_crc64(data) == bitwise_crc64_xz(data)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("seed", [1, 2])
def test_fast_equals_reference(size: int, seed: int) -> None:
    data = random_bytes(size, seed)
    assert crc64(data) == reference_crc64(data)


@pytest.mark.parametrize("fill", [0x00, 0xFF])
@pytest.mark.parametrize("size", [1, 65535, 65536, 65537])
def test_fast_equals_reference_constant_data(size: int, fill: int) -> None:
    data = bytes([fill]) * size
    assert crc64(data) == reference_crc64(data)


@pytest.mark.parametrize("size", [0, 1, 65537])
def test_accepts_bytearray_and_memoryview(size: int) -> None:
    data = random_bytes(size, seed=3)
    expected = reference_crc64(data)
    assert crc64(bytearray(data)) == expected
    assert crc64(memoryview(data)) == expected
    # A slice of a larger buffer, the way the server CRCs part of its batch buffer.
    big = bytearray(b"\xaa" * 5 + data + b"\x55" * 5)
    assert crc64(memoryview(big)[5 : 5 + size]) == expected


def test_empty_continuation_keeps_value() -> None:
    value = reference_crc64(b"some prefix")
    assert crc64(b"", value) == value
    assert crc64(memoryview(b""), value) == value


@pytest.mark.parametrize("size", [1, 65535, 65536, 65537, 3 * 65536 + 5, 16 * 65536 + 1])
def test_incremental_at_block_boundaries(size: int) -> None:
    data = random_bytes(size, seed=4)
    view = memoryview(data)
    value = 0
    for start in range(0, size, BLOCK):
        value = crc64(view[start : start + BLOCK], value)
    assert value == reference_crc64(data)
    assert value == crc64(data)


def test_incremental_byte_by_byte() -> None:
    data = random_bytes(600, seed=5)
    value = 0
    for i in range(len(data)):
        value = crc64(data[i : i + 1], value)
    assert value == reference_crc64(data)


def test_incremental_differs_from_restart() -> None:
    # Continuing must actually use the previous value: CRC(a||b) is not CRC(b).
    a, b = random_bytes(100, seed=6), random_bytes(100, seed=8)
    assert crc64(b, crc64(a)) == reference_crc64(a + b)
    assert crc64(b, crc64(a)) != crc64(b)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=4 * BLOCK + 17),
    seed=st.integers(min_value=0, max_value=2**32),
    cuts=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=12),
)
def test_incremental_random_splits(size: int, seed: int, cuts: list[float]) -> None:
    data = random_bytes(size, seed)
    points = sorted({0, size, *(int(c * size) for c in cuts)})
    value = 0
    for start, end in itertools.pairwise(points):
        value = crc64(data[start:end], value)
    assert value == reference_crc64(data)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=2048))
def test_fast_equals_reference_small_inputs(data: bytes) -> None:
    assert crc64(data) == reference_crc64(data)
