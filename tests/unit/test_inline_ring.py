"""InlineRing (``--workers 0``): batches sealed by one ring open with another, in order, with their CRCs."""

from __future__ import annotations

import asyncio
import os

import pytest

from engine.blocks import BLOCK_SIZE, TAG_LEN, BlockCipher, block_count
from engine.crc import crc64, reference_crc64
from engine.errors import RefuseCode, RemoteProtocolError
from engine.pool import DECRYPT, ENCRYPT, InlineRing, default_workers, process_batch


@pytest.mark.parametrize("plain_len", [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 4 * BLOCK_SIZE])
def test_seal_then_open(plain_len: int) -> None:
    key, salt = os.urandom(16), os.urandom(4)
    data = os.urandom(plain_len)
    sender = InlineRing(BlockCipher(key, salt), batch=4)
    receiver = InlineRing(BlockCipher(key, salt), batch=4)

    async def run() -> None:
        sender.plain(0)[:plain_len] = data
        sender.submit(0, ENCRYPT, 7, plain_len)
        slot, crc, n = await sender.result()
        assert (slot, n) == (0, plain_len)
        assert crc == reference_crc64(data)
        wire = plain_len + TAG_LEN * block_count(plain_len)
        receiver.frames(1)[:wire] = sender.frames(0)[:wire]
        receiver.submit(1, DECRYPT, 7, plain_len)
        slot, crc2, _ = await receiver.result()
        assert bytes(receiver.plain(1)[:plain_len]) == data and crc2 == crc

    asyncio.run(run())


def test_wrong_first_index_fails_the_batch() -> None:
    key, salt = os.urandom(16), os.urandom(4)
    ring = InlineRing(BlockCipher(key, salt), batch=2)
    ring.plain(0)[:100] = os.urandom(100)
    ring.submit(0, ENCRYPT, 0, 100)
    other = InlineRing(BlockCipher(key, salt), batch=2)
    other.frames(0)[:116] = ring.frames(0)[:116]
    with pytest.raises(RemoteProtocolError) as info:
        other.submit(0, DECRYPT, 1, 100)  # block 0 presented as block 1: refused at once
    assert info.value.code == RefuseCode.BAD_BLOCK and "block 1" in info.value.reason
    assert other.in_flight() == 0


def test_process_batch_crc_is_of_plaintext() -> None:
    cipher = BlockCipher(os.urandom(16), os.urandom(4))
    plain = memoryview(bytearray(os.urandom(2 * BLOCK_SIZE)))
    frames = memoryview(bytearray(2 * (BLOCK_SIZE + TAG_LEN)))
    assert process_batch(cipher, ENCRYPT, plain, frames, 0, len(plain)) == crc64(plain)
    assert bytes(frames[:BLOCK_SIZE]) != bytes(plain[:BLOCK_SIZE])


def test_default_workers_rule() -> None:
    assert [default_workers(n) for n in (1, 2, 3, 4, 8, 16, 64)] == [0, 0, 1, 2, 6, 8, 8]
