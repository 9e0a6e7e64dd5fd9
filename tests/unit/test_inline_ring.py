"""InlineRing (``--workers 0``): batches sealed in place by one ring open in place with another."""

from __future__ import annotations

import asyncio
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.blocks import BLOCK_SIZE, TAG_LEN, BlockCipher, block_count
from engine.crc import reference_crc64
from engine.errors import RefuseCode, RemoteProtocolError
from engine.pool import DECRYPT, ENCRYPT, InlineRing, advance, default_workers, plain_views, process_batch


def _fill(ring: InlineRing, slot: int, data: bytes) -> None:
    pos = 0
    for view in plain_views(ring.frames(slot), len(data)):
        view[:] = data[pos : pos + len(view)]
        pos += len(view)


@pytest.mark.parametrize("plain_len", [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 4 * BLOCK_SIZE])
def test_seal_then_open_in_place(plain_len: int) -> None:
    key, salt = os.urandom(16), os.urandom(4)
    data = os.urandom(plain_len)
    sender = InlineRing(BlockCipher(key, salt), batch=4)
    receiver = InlineRing(BlockCipher(key, salt), batch=4)

    async def run() -> None:
        _fill(sender, 0, data)
        sender.submit(0, ENCRYPT, 7, plain_len)
        slot, crc, n = await sender.result()
        assert (slot, n, crc) == (0, plain_len, 0)  # the sender takes no CRC
        wire = plain_len + TAG_LEN * block_count(plain_len)
        # The frames are exactly what AESGCM.encrypt gives for each block (in-place sealing is exact).
        aead, pos, expected = AESGCM(key), 0, b""
        for i in range(block_count(plain_len)):
            expected += aead.encrypt(salt + (7 + i).to_bytes(8, "big"), data[pos : pos + BLOCK_SIZE], None)
            pos += BLOCK_SIZE
        assert bytes(sender.frames(0)[:wire]) == expected
        receiver.frames(1)[:wire] = sender.frames(0)[:wire]
        receiver.submit(1, DECRYPT, 7, plain_len)
        slot, crc2, _ = await receiver.result()
        assert b"".join(bytes(v) for v in plain_views(receiver.frames(1), plain_len)) == data
        assert crc2 == reference_crc64(data)

    asyncio.run(run())


def test_wrong_first_index_fails_the_batch() -> None:
    key, salt = os.urandom(16), os.urandom(4)
    ring = InlineRing(BlockCipher(key, salt), batch=2)
    _fill(ring, 0, os.urandom(100))
    ring.submit(0, ENCRYPT, 0, 100)
    other = InlineRing(BlockCipher(key, salt), batch=2)
    other.frames(0)[:116] = ring.frames(0)[:116]
    with pytest.raises(RemoteProtocolError) as info:
        other.submit(0, DECRYPT, 1, 100)  # block 0 presented as block 1: refused at once
    assert info.value.code == RefuseCode.BAD_BLOCK and "block 1" in info.value.reason
    assert other.in_flight() == 0


def test_process_batch_crc_is_of_plaintext_when_opening() -> None:
    cipher = BlockCipher(os.urandom(16), os.urandom(4))
    frames = memoryview(bytearray(2 * (BLOCK_SIZE + TAG_LEN)))
    data = os.urandom(2 * BLOCK_SIZE)
    frames[:BLOCK_SIZE] = data[:BLOCK_SIZE]
    frames[BLOCK_SIZE + TAG_LEN : 2 * BLOCK_SIZE + TAG_LEN] = data[BLOCK_SIZE:]
    process_batch(cipher, ENCRYPT, frames, 0, len(data))
    assert bytes(frames[:BLOCK_SIZE]) != data[:BLOCK_SIZE]
    before = reference_crc64(b"earlier")
    assert process_batch(cipher, DECRYPT, frames, 0, len(data), crc=before) == reference_crc64(b"earlier" + data)
    assert bytes(frames[:BLOCK_SIZE]) == data[:BLOCK_SIZE]


def test_plain_views_and_advance() -> None:
    frames = memoryview(bytearray(3 * (BLOCK_SIZE + TAG_LEN)))
    views = plain_views(frames, 2 * BLOCK_SIZE + 5)
    assert [len(v) for v in views] == [BLOCK_SIZE, BLOCK_SIZE, 5]
    rest = advance(views, BLOCK_SIZE + 3)
    assert [len(v) for v in rest] == [BLOCK_SIZE - 3, 5]
    assert advance(rest, BLOCK_SIZE + 2) == []


def test_default_workers_rule() -> None:
    assert [default_workers(n) for n in (1, 2, 3, 4, 8, 16, 64)] == [0, 0, 1, 2, 6, 8, 8]


def test_inline_ring_crc_runs_on_across_batches() -> None:
    key, salt = os.urandom(16), os.urandom(4)
    sender = InlineRing(BlockCipher(key, salt), batch=2)
    ring = InlineRing(BlockCipher(key, salt), batch=2)
    assert ring.chained
    a, b = os.urandom(2 * BLOCK_SIZE), os.urandom(BLOCK_SIZE + 9)

    async def run() -> None:
        for slot, first, data in ((0, 0, a), (1, 2, b)):
            _fill(sender, slot, data)
            sender.submit(slot, ENCRYPT, first, len(data))
            wire = len(data) + TAG_LEN * block_count(len(data))
            ring.frames(slot)[:wire] = sender.frames(slot)[:wire]
            ring.submit(slot, DECRYPT, first, len(data))
        (_, crc_a, _), (_, crc_ab, _) = await ring.result(), await ring.result()
        assert crc_a == reference_crc64(a) and crc_ab == reference_crc64(a + b)

    asyncio.run(run())
