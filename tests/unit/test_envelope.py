"""The metadata envelope: RSA-OAEP(SHA-256) key wrap + AES-128-GCM, bound to direction and user hashes."""

from __future__ import annotations

import struct

import pytest
from Crypto.Cipher import PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine import envelope
from engine.errors import RefuseCode, RemoteProtocolError

FROM_HASH = 0x0102030405060708
TO_HASH = 0xF0E0D0C0B0A09080
PLAIN = '{"filename":"фото.jpg","filesize":65537}'.encode()


@pytest.fixture(scope="module")
def keys() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    """Two 2048-bit private keys: the recipient's and somebody else's."""
    return (rsa.generate_private_key(public_exponent=65537, key_size=2048),
            rsa.generate_private_key(public_exponent=65537, key_size=2048))


def oracle(key: rsa.RSAPrivateKey) -> RSA.RsaKey:
    """The same key in pycryptodome, an independent implementation of RSA-OAEP to check ours against."""
    return RSA.import_key(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                            serialization.NoEncryption()))


def request_aad(from_hash: int = FROM_HASH, to_hash: int = TO_HASH) -> bytes:
    return envelope.aad(envelope.REQUEST, from_hash, to_hash)


def assert_bad_envelope(exc: pytest.ExceptionInfo[RemoteProtocolError]) -> None:
    assert exc.value.code is RefuseCode.BAD_ENVELOPE


def test_aad_layout() -> None:
    assert envelope.REQUEST == b"m2y/1 request"
    assert envelope.REPLY == b"m2y/1 reply"
    assert envelope.aad(b"dir", 1, 2) == b"dir" + bytes(7) + b"\x01" + bytes(7) + b"\x02"
    assert request_aad() == b"m2y/1 request" + struct.pack(">QQ", FROM_HASH, TO_HASH)


@pytest.mark.parametrize("plain", [b"", b"x", PLAIN, bytes(range(256)) * 300], ids=["empty", "1", "json", "76800"])
def test_round_trip(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey], plain: bytes) -> None:
    priv, _ = keys
    sealed = envelope.seal(priv.public_key(), plain, request_aad())
    assert len(sealed) == 256 + 12 + len(plain) + 16
    assert envelope.open_(priv, sealed, request_aad()) == plain


def test_layout_is_oaep_then_nonce_then_gcm(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> None:
    # Open an envelope with the primitives directly: rsa_ct (256 bytes) || nonce (12) || gcm ct || tag.
    priv, _ = keys
    sealed = envelope.seal(priv.public_key(), PLAIN, request_aad())
    key = PKCS1_OAEP.new(oracle(priv), hashAlgo=SHA256).decrypt(sealed[:256])
    assert len(key) == 16
    assert AESGCM(key).decrypt(sealed[256:268], sealed[268:], request_aad()) == PLAIN


def test_opens_an_envelope_built_from_primitives(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> None:
    priv, _ = keys
    key, nonce = bytes(range(16)), bytes(range(12))
    wrapped = PKCS1_OAEP.new(oracle(priv).public_key(), hashAlgo=SHA256).encrypt(key)
    sealed = wrapped + nonce + AESGCM(key).encrypt(nonce, PLAIN, request_aad())
    assert envelope.open_(priv, sealed, request_aad()) == PLAIN


def test_two_seals_differ(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> None:
    priv, _ = keys
    one = envelope.seal(priv.public_key(), PLAIN, request_aad())
    two = envelope.seal(priv.public_key(), PLAIN, request_aad())
    assert one != two
    assert one[:256] != two[:256]  # fresh OAEP randomness / fresh key
    assert one[256:268] != two[256:268]  # fresh nonce
    assert envelope.open_(priv, one, request_aad()) == envelope.open_(priv, two, request_aad()) == PLAIN


def test_wrong_private_key(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> None:
    priv, other = keys
    sealed = envelope.seal(priv.public_key(), PLAIN, request_aad())
    with pytest.raises(RemoteProtocolError) as exc:
        envelope.open_(other, sealed, request_aad())
    assert_bad_envelope(exc)


def test_flipped_byte_anywhere(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> None:
    priv, _ = keys
    plain = b"short metadata"
    sealed = envelope.seal(priv.public_key(), plain, request_aad())
    assert envelope.open_(priv, sealed, request_aad()) == plain
    failures: list[tuple[int, int, object]] = []
    for position in range(len(sealed)):
        flip = 0x80 if position % 2 else 0x01
        tampered = bytearray(sealed)
        tampered[position] ^= flip
        try:
            envelope.open_(priv, bytes(tampered), request_aad())
        except RemoteProtocolError as exc:
            if exc.code is not RefuseCode.BAD_ENVELOPE:
                failures.append((position, flip, exc.code))
        else:
            failures.append((position, flip, "accepted"))
    assert failures == []


@pytest.mark.parametrize(
    "wrong_aad",
    [
        envelope.aad(envelope.REPLY, FROM_HASH, TO_HASH),  # other direction
        envelope.aad(envelope.REQUEST, TO_HASH, FROM_HASH),  # hashes swapped
        envelope.aad(envelope.REQUEST, FROM_HASH + 1, TO_HASH),  # another sender
        envelope.aad(envelope.REQUEST, FROM_HASH, TO_HASH ^ 1 << 63),  # another recipient
        b"",
    ],
)
def test_wrong_aad(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey], wrong_aad: bytes) -> None:
    priv, _ = keys
    sealed = envelope.seal(priv.public_key(), PLAIN, request_aad())
    with pytest.raises(RemoteProtocolError) as exc:
        envelope.open_(priv, sealed, wrong_aad)
    assert_bad_envelope(exc)


def test_reply_cannot_be_replayed_as_request(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> None:
    priv, _ = keys
    sealed = envelope.seal(priv.public_key(), PLAIN, envelope.aad(envelope.REPLY, FROM_HASH, TO_HASH))
    assert envelope.open_(priv, sealed, envelope.aad(envelope.REPLY, FROM_HASH, TO_HASH)) == PLAIN
    with pytest.raises(RemoteProtocolError) as exc:
        envelope.open_(priv, sealed, request_aad())
    assert_bad_envelope(exc)


@pytest.mark.parametrize("keep", [0, 1, 100, 255, 256, 267, 268, 283, -1])
def test_truncated(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey], keep: int) -> None:
    priv, _ = keys
    sealed = envelope.seal(priv.public_key(), PLAIN, request_aad())
    truncated = sealed[:keep]
    assert len(truncated) < len(sealed)
    with pytest.raises(RemoteProtocolError) as exc:
        envelope.open_(priv, truncated, request_aad())
    assert_bad_envelope(exc)


def test_extended(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> None:
    priv, _ = keys
    sealed = envelope.seal(priv.public_key(), PLAIN, request_aad())
    with pytest.raises(RemoteProtocolError) as exc:
        envelope.open_(priv, sealed + b"\x00", request_aad())
    assert_bad_envelope(exc)


@pytest.mark.parametrize("key_len", [0, 15, 17, 24, 32])
def test_wrapped_key_of_wrong_length(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey], key_len: int) -> None:
    # 24 and 32 bytes are valid AES-192/256 keys: the body below would decrypt if the length went unchecked.
    priv, _ = keys
    key = bytes(range(key_len))
    nonce = bytes(12)
    body = AESGCM(key if key_len in (24, 32) else bytes(16)).encrypt(nonce, PLAIN, request_aad())
    sealed = PKCS1_OAEP.new(oracle(priv).public_key(), hashAlgo=SHA256).encrypt(key) + nonce + body
    with pytest.raises(RemoteProtocolError) as exc:
        envelope.open_(priv, sealed, request_aad())
    assert_bad_envelope(exc)


def test_garbage(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> None:
    priv, _ = keys
    for garbage in (b"\x00" * 400, b"\xff" * 400, bytes(range(256)) + bytes(100)):
        with pytest.raises(RemoteProtocolError) as exc:
            envelope.open_(priv, garbage, request_aad())
        assert_bad_envelope(exc)


def test_open_takes_any_bytes_like(keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]) -> None:
    """A bytearray or memoryview envelope opens like bytes (not a "wrong key" refusal)."""
    priv, _ = keys
    sealed = envelope.seal(priv.public_key(), PLAIN, request_aad())
    assert envelope.open_(priv, bytearray(sealed), request_aad()) == PLAIN
    assert envelope.open_(priv, memoryview(sealed), request_aad()) == PLAIN  # type: ignore[arg-type]
