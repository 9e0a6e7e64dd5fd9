"""File blocks on the wire: 64 KiB of plaintext each, AES-128-GCM with a 16-byte tag.

Block i is sealed under the per-transfer filekey with nonce = salt (4 bytes) || i (u64 BE).
Frame sizes follow from filesize alone, so no per-block header is needed and a
truncated, reordered or extended stream fails its tags (docs/protocol.md §6).
The final CRC and the ACK are sealed with the same key under two reserved indices
that no block can reach, so the key/nonce pair is never reused.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .crc import BytesLike
from .crc import crc64_fast as _crc64
from .errors import RefuseCode, RemoteProtocolError

BLOCK_SIZE = 64 * 1024
TAG_LEN = 16
FRAME_MAX = BLOCK_SIZE + TAG_LEN
CRC_INDEX = (1 << 64) - 2
ACK_INDEX = (1 << 64) - 1
CRC_FRAME_LEN = 8 + TAG_LEN
ACK_PLAIN = struct.Struct(">QQ")  # filesize, fileCRC
ACK_BODY_LEN = ACK_PLAIN.size + TAG_LEN
_CRC_AAD = b"m2y/1 crc"
_ACK_AAD = b"m2y/1 ack"


def block_count(filesize: int) -> int:
    return -(-filesize // BLOCK_SIZE)


def plain_size(filesize: int, index: int) -> int:
    """Plaintext bytes in block ``index`` of a file of ``filesize`` bytes."""
    return min(BLOCK_SIZE, filesize - index * BLOCK_SIZE)


def batch_plain_size(filesize: int, first: int, count: int) -> int:
    """Plaintext bytes in ``count`` consecutive blocks from block ``first`` on."""
    return min(filesize, (first + count) * BLOCK_SIZE) - first * BLOCK_SIZE


def wire_size(filesize: int) -> int:
    """Bytes of all block frames together."""
    return filesize + TAG_LEN * block_count(filesize)


def _bad_block(index: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"block {index} failed authentication (tampered or wrong key)", RefuseCode.BAD_BLOCK)


class BlockCipher:
    """AES-128-GCM for one transfer's blocks, CRC frame and ACK."""

    __slots__ = ("_aead", "_salt")

    def __init__(self, filekey: bytes, salt: bytes) -> None:
        if len(filekey) != 16 or len(salt) != 4:
            raise ValueError("filekey must be 16 bytes and salt 4 bytes")
        self._aead = AESGCM(filekey)
        self._salt = salt

    def nonce(self, index: int) -> bytes:
        return self._salt + index.to_bytes(8, "big")

    def encrypt_into(self, index: int, plain: BytesLike, out: memoryview) -> None:
        """Seal ``plain`` as block ``index`` into ``out`` (len(plain) + 16 bytes)."""
        self._aead.encrypt_into(self.nonce(index), plain, None, out)

    def decrypt_into(self, index: int, frame: BytesLike, out: memoryview) -> None:
        """Open block ``index`` into ``out`` (len(frame) - 16 bytes); a bad tag is the peer's fault."""
        try:
            self._aead.decrypt_into(self.nonce(index), frame, None, out)
        except InvalidTag:
            raise _bad_block(index) from None

    def seal_blocks(self, views: list[tuple[memoryview, memoryview]], first: int) -> None:
        """Seal blocks first, first+1, ... in place: each (plaintext, frame) pair shares its start, the
        tag lands after the ciphertext. No CRC: the sender sends its .meta's fileCRC and the server
        checks the bytes against it, so a CRC here would be a pass over the file that decides nothing.
        One loop with local names: this is the engine's innermost loop, and per-block method calls
        cost ~10% of a batch."""
        seal, salt, index = self._aead.encrypt_into, self._salt, first
        for plain, frame in views:
            seal(salt + index.to_bytes(8, "big"), plain, None, frame)
            index += 1

    def open_blocks(self, views: list[tuple[memoryview, memoryview]], first: int, crc: int = 0) -> int:
        """Open blocks first, first+1, ... in place (the reverse of ``seal_blocks``); a bad tag is the
        peer's fault and names the block. Returns the CRC-64 of the plaintexts, continued from ``crc``."""
        open_, salt, index = self._aead.decrypt_into, self._salt, first
        try:
            for plain, frame in views:
                open_(salt + index.to_bytes(8, "big"), frame, None, plain)
                crc = _crc64(plain, crc)
                index += 1
        except InvalidTag:
            raise _bad_block(index) from None
        return crc

    def seal_crc(self, crc: int) -> bytes:
        return self._aead.encrypt(self.nonce(CRC_INDEX), crc.to_bytes(8, "big"), _CRC_AAD)

    def open_crc(self, frame: BytesLike) -> int:
        try:
            plain = self._aead.decrypt(self.nonce(CRC_INDEX), bytes(frame), _CRC_AAD)
        except InvalidTag:
            raise RemoteProtocolError("the file CRC frame failed authentication", RefuseCode.BAD_CRC) from None
        return int.from_bytes(plain, "big")

    def seal_ack(self, filesize: int, crc: int) -> bytes:
        return self._aead.encrypt(self.nonce(ACK_INDEX), ACK_PLAIN.pack(filesize, crc), _ACK_AAD)

    def open_ack(self, body: BytesLike) -> tuple[int, int]:
        try:
            plain = self._aead.decrypt(self.nonce(ACK_INDEX), bytes(body), _ACK_AAD)
        except InvalidTag:
            raise RemoteProtocolError("the ACK failed authentication (forged?)", RefuseCode.BAD_BLOCK) from None
        filesize, crc = ACK_PLAIN.unpack(plain)
        return filesize, crc
