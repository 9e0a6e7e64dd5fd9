"""Per-block AES-128-GCM: frame layout, nonces, sizes, and that every tamper is caught."""

from __future__ import annotations

import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.blocks import (
    ACK_BODY_LEN,
    BLOCK_SIZE,
    CRC_FRAME_LEN,
    BlockCipher,
    block_count,
    plain_size,
    wire_size,
)
from engine.errors import RefuseCode, RemoteProtocolError

KEY = bytes(range(16))
SALT = b"\xde\xad\xbe\xef"
OTHER_KEY = bytes(range(1, 17))


def make_plain(size: int, seed: int = 0) -> bytes:
    return random.Random(seed + size).randbytes(size)


def seal_block(index: int, plain: bytes, key: bytes = KEY, salt: bytes = SALT) -> bytes:
    out = bytearray(len(plain) + 16)
    BlockCipher(key, salt).encrypt_into(index, plain, memoryview(out))
    return bytes(out)


def open_block(index: int, frame: bytes, key: bytes = KEY, salt: bytes = SALT) -> bytes:
    out = bytearray(len(frame) - 16)
    BlockCipher(key, salt).decrypt_into(index, frame, memoryview(out))
    return bytes(out)


# -- sizes ----------------------------------------------------------------------------------


def test_constants() -> None:
    assert BLOCK_SIZE == 65536
    assert CRC_FRAME_LEN == 8 + 16
    assert ACK_BODY_LEN == 16 + 16


@pytest.mark.parametrize(
    ("filesize", "count", "wire"),
    [
        (0, 0, 0),
        (1, 1, 1 + 16),
        (65535, 1, 65535 + 16),
        (65536, 1, 65536 + 16),
        (65537, 2, 65537 + 32),
        (3 * 65536 + 5, 4, 3 * 65536 + 5 + 64),
        (20 * 10**9, 305176, 20 * 10**9 + 16 * 305176),
    ],
)
def test_block_count_and_wire_size(filesize: int, count: int, wire: int) -> None:
    assert block_count(filesize) == count
    assert wire_size(filesize) == wire


@pytest.mark.parametrize(
    ("filesize", "sizes"),
    [
        (1, [1]),
        (65535, [65535]),
        (65536, [65536]),
        (65537, [65536, 1]),
        (3 * 65536 + 5, [65536, 65536, 65536, 5]),
    ],
)
def test_plain_size(filesize: int, sizes: list[int]) -> None:
    assert [plain_size(filesize, i) for i in range(len(sizes))] == sizes
    assert sum(sizes) == filesize


# -- nonces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 255, 256, 65537, 2**32, 2**64 - 2, 2**64 - 1])
def test_nonce_is_salt_then_big_endian_index(index: int) -> None:
    nonce = BlockCipher(KEY, SALT).nonce(index)
    assert len(nonce) == 12
    assert nonce == SALT + struct.pack(">Q", index)


def test_nonce_known_bytes() -> None:
    assert BlockCipher(KEY, b"\x01\x02\x03\x04").nonce(0x0A0B) == bytes.fromhex("01020304" "0000000000000a0b")


@pytest.mark.parametrize(
    ("key", "salt"), [(KEY[:15], SALT), (KEY + b"\x00", SALT), (KEY, SALT[:3]), (KEY, SALT + b"\x00")]
)
def test_bad_key_or_salt_length(key: bytes, salt: bytes) -> None:
    with pytest.raises(ValueError):
        BlockCipher(key, salt)


# -- blocks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 16, 65535, 65536])
@pytest.mark.parametrize("index", [0, 1, 7, 2**40])
def test_block_round_trip(size: int, index: int) -> None:
    plain = make_plain(size, index % 1000)
    frame = seal_block(index, plain)
    assert len(frame) == size + 16
    assert open_block(index, frame) == plain


@pytest.mark.parametrize("index", [0, 3])
def test_block_frame_is_plain_aes_gcm(index: int) -> None:
    # The frame is exactly AES-128-GCM(filekey, salt || index BE, no AAD): ciphertext then 16-byte tag.
    plain = make_plain(1000, index)
    nonce = SALT + index.to_bytes(8, "big")
    assert seal_block(index, plain) == AESGCM(KEY).encrypt(nonce, plain, None)
    assert open_block(index, AESGCM(KEY).encrypt(nonce, plain, None)) == plain


def test_encrypt_into_writes_only_its_slice() -> None:
    cipher = BlockCipher(KEY, SALT)
    plain = make_plain(100)
    region = bytearray(b"\x55" * 300)
    cipher.encrypt_into(0, memoryview(plain), memoryview(region)[50:166])
    assert region[:50] == b"\x55" * 50
    assert region[166:] == b"\x55" * 134
    assert bytes(region[50:166]) == AESGCM(KEY).encrypt(SALT + bytes(8), plain, None)


def test_different_indices_give_different_frames() -> None:
    plain = make_plain(64)
    assert seal_block(0, plain) != seal_block(1, plain)


def assert_bad_block(exc: pytest.ExceptionInfo[RemoteProtocolError]) -> None:
    assert exc.value.code is RefuseCode.BAD_BLOCK


@pytest.mark.parametrize("position", [0, 1, 500, 999, 1000, 1015])
def test_tampered_frame(position: int) -> None:
    frame = bytearray(seal_block(5, make_plain(1000)))
    frame[position] ^= 0x01
    with pytest.raises(RemoteProtocolError) as exc:
        open_block(5, bytes(frame))
    assert_bad_block(exc)


def test_truncated_and_extended_frames() -> None:
    frame = seal_block(0, make_plain(1000))
    with pytest.raises(RemoteProtocolError) as exc:
        open_block(0, frame[:-1])
    assert_bad_block(exc)
    with pytest.raises(RemoteProtocolError) as exc:
        open_block(0, frame + b"\x00")
    assert_bad_block(exc)


@pytest.mark.parametrize(("sealed_as", "opened_as"), [(0, 1), (1, 0), (3, 2**64 - 2), (3, 2**64 - 1)])
def test_wrong_index(sealed_as: int, opened_as: int) -> None:
    frame = seal_block(sealed_as, make_plain(100))
    with pytest.raises(RemoteProtocolError) as exc:
        open_block(opened_as, frame)
    assert_bad_block(exc)
    assert str(opened_as) in exc.value.reason


def test_wrong_key() -> None:
    frame = seal_block(0, make_plain(100))
    with pytest.raises(RemoteProtocolError) as exc:
        open_block(0, frame, key=OTHER_KEY)
    assert_bad_block(exc)


def test_wrong_salt() -> None:
    frame = seal_block(0, make_plain(100))
    with pytest.raises(RemoteProtocolError) as exc:
        open_block(0, frame, salt=b"\x00\x00\x00\x00")
    assert_bad_block(exc)


# -- CRC frame ------------------------------------------------------------------------------


@pytest.mark.parametrize("crc", [0, 1, 0x995DC9BBDF1939FA, 2**64 - 1])
def test_crc_round_trip(crc: int) -> None:
    cipher = BlockCipher(KEY, SALT)
    sealed = cipher.seal_crc(crc)
    assert len(sealed) == 24
    assert cipher.open_crc(sealed) == crc
    assert cipher.open_crc(memoryview(sealed)) == crc


def test_crc_frame_layout() -> None:
    crc = 0x0123456789ABCDEF
    expected = AESGCM(KEY).encrypt(SALT + b"\xff" * 7 + b"\xfe", bytes.fromhex("0123456789abcdef"), b"m2y/1 crc")
    assert BlockCipher(KEY, SALT).seal_crc(crc) == expected


@pytest.mark.parametrize("position", range(24))
def test_crc_tamper(position: int) -> None:
    cipher = BlockCipher(KEY, SALT)
    sealed = bytearray(cipher.seal_crc(12345))
    sealed[position] ^= 0x80
    with pytest.raises(RemoteProtocolError) as exc:
        cipher.open_crc(bytes(sealed))
    assert exc.value.code is RefuseCode.BAD_CRC


def test_crc_wrong_key_and_truncated() -> None:
    sealed = BlockCipher(KEY, SALT).seal_crc(1)
    for cipher, frame in [(BlockCipher(OTHER_KEY, SALT), sealed), (BlockCipher(KEY, SALT), sealed[:-1])]:
        with pytest.raises(RemoteProtocolError) as exc:
            cipher.open_crc(frame)
        assert exc.value.code is RefuseCode.BAD_CRC


def test_block_at_crc_index_is_not_a_crc_frame() -> None:
    # Same key and nonce but no AAD: a crafted "block" at the reserved index must not pass as the CRC frame.
    frame = seal_block(2**64 - 2, (42).to_bytes(8, "big"))
    with pytest.raises(RemoteProtocolError):
        BlockCipher(KEY, SALT).open_crc(frame)


# -- ACK ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("filesize", "crc"), [(0, 0), (1, 2), (65537, 0x995DC9BBDF1939FA), (2**64 - 1, 2**64 - 1)])
def test_ack_round_trip(filesize: int, crc: int) -> None:
    cipher = BlockCipher(KEY, SALT)
    sealed = cipher.seal_ack(filesize, crc)
    assert len(sealed) == 32
    assert cipher.open_ack(sealed) == (filesize, crc)


def test_ack_layout() -> None:
    plain = struct.pack(">QQ", 1000, 0xAABBCCDD)
    expected = AESGCM(KEY).encrypt(SALT + b"\xff" * 8, plain, b"m2y/1 ack")
    assert BlockCipher(KEY, SALT).seal_ack(1000, 0xAABBCCDD) == expected


@pytest.mark.parametrize("position", [0, 7, 8, 15, 16, 31])
def test_ack_tamper(position: int) -> None:
    cipher = BlockCipher(KEY, SALT)
    sealed = bytearray(cipher.seal_ack(100, 200))
    sealed[position] ^= 0x01
    with pytest.raises(RemoteProtocolError) as exc:
        cipher.open_ack(bytes(sealed))
    assert exc.value.code is RefuseCode.BAD_BLOCK


def test_ack_wrong_key() -> None:
    sealed = BlockCipher(KEY, SALT).seal_ack(100, 200)
    with pytest.raises(RemoteProtocolError):
        BlockCipher(OTHER_KEY, SALT).open_ack(sealed)


def test_crc_and_ack_are_not_interchangeable() -> None:
    cipher = BlockCipher(KEY, SALT)
    with pytest.raises(RemoteProtocolError):
        cipher.open_ack(cipher.seal_crc(5) + bytes(8))
    with pytest.raises(RemoteProtocolError):
        cipher.open_crc(cipher.seal_ack(5, 6)[:24])


# -- the batch loop (seal_blocks / open_blocks) --------------------------------------------------


def _batch_region(plain: bytes) -> tuple[memoryview, list[tuple[memoryview, memoryview]]]:
    from engine.pool import block_views

    count = block_count(len(plain))
    region = memoryview(bytearray(len(plain) + 16 * count + 7))  # room to spare: views must stop at each frame
    views = block_views(region, len(plain))
    for i, (p, _frame) in enumerate(views):
        p[:] = plain[i * BLOCK_SIZE : i * BLOCK_SIZE + len(p)]
    return region, views


@pytest.mark.parametrize("size", [1, BLOCK_SIZE, 3 * BLOCK_SIZE - 5])
def test_seal_blocks_equals_aesgcm_per_block_and_open_gives_crc_of_plaintext(size: int) -> None:
    from engine.crc import reference_crc64

    plain = make_plain(size)
    region, views = _batch_region(plain)
    BlockCipher(KEY, SALT).seal_blocks(views, 7)
    aead = AESGCM(KEY)
    for i, (_p, frame) in enumerate(views):
        chunk = plain[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
        assert bytes(frame) == aead.encrypt(SALT + struct.pack(">Q", 7 + i), chunk, None)
    assert bytes(region[-7:]) == bytes(7)
    assert BlockCipher(KEY, SALT).open_blocks(views, 7, 0) == reference_crc64(plain)
    assert b"".join(bytes(p) for p, _f in views) == plain


def test_open_blocks_names_the_tampered_block_and_continues_a_crc() -> None:
    from engine.crc import reference_crc64

    plain = make_plain(3 * BLOCK_SIZE)
    _region, views = _batch_region(plain)
    cipher = BlockCipher(KEY, SALT)
    before = reference_crc64(b"earlier bytes")
    cipher.seal_blocks(views, 100)
    sealed = [bytes(f) for _p, f in views]
    assert cipher.open_blocks(views, 100, before) == reference_crc64(b"earlier bytes" + plain)
    for (_p, frame), original in zip(views, sealed, strict=True):
        frame[:] = original
    views[1][1][5] ^= 0x01
    with pytest.raises(RemoteProtocolError) as exc:
        cipher.open_blocks(views, 100)
    assert exc.value.code is RefuseCode.BAD_BLOCK and "block 101" in exc.value.reason
