"""The metadata envelope: RSA-OAEP(SHA-256) wraps a fresh AES-128 key, AES-128-GCM carries the JSON.

RSA-OAEP alone carries at most ~318 bytes under a 3072-bit key, hence the hybrid.
Layout (docs/protocol.md §3): rsa_ct (modulus bytes) || nonce (12) || gcm_ct || tag (16).
The AAD binds the direction and both user hashes, so an envelope cannot be replayed
in the other direction or for another pair of users.
"""

from __future__ import annotations

import secrets
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError, RefuseCode, RemoteProtocolError

REQUEST = b"m2y/1 request"
REPLY = b"m2y/1 reply"
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 16
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_CANNOT = "cannot decrypt the metadata envelope (wrong key, or not an m2y envelope)"


def aad(direction: bytes, from_hash: int, to_hash: int) -> bytes:
    return direction + struct.pack(">QQ", from_hash, to_hash)


def seal(public_key: rsa.RSAPublicKey, plaintext: bytes, associated: bytes) -> bytes:
    """Encrypt ``plaintext`` so that only the holder of ``public_key``'s private half can read it."""
    key = secrets.token_bytes(KEY_LEN)
    nonce = secrets.token_bytes(NONCE_LEN)
    try:
        wrapped = public_key.encrypt(key, _OAEP)
    except ValueError as exc:  # a key OAEP cannot use (the loaders refuse those: a last guard)
        raise ConfigError(f"cannot encrypt with this RSA key: {exc}") from None
    return wrapped + nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_(private_key: rsa.RSAPrivateKey, envelope: bytes, associated: bytes) -> bytes:
    """Decrypt an envelope; any failure is one RemoteProtocolError (no oracle on which step failed)."""
    envelope = bytes(envelope)  # cryptography takes bytes only; a TypeError must not pass for "wrong key"
    k = (private_key.key_size + 7) // 8
    if len(envelope) < k + NONCE_LEN + TAG_LEN:
        raise RemoteProtocolError(_CANNOT, RefuseCode.BAD_ENVELOPE)
    try:
        key = private_key.decrypt(envelope[:k], _OAEP)
        if len(key) != KEY_LEN:
            raise ValueError("wrapped key has the wrong length")
        nonce = envelope[k : k + NONCE_LEN]
        return AESGCM(key).decrypt(nonce, envelope[k + NONCE_LEN :], associated)
    except (ValueError, InvalidTag):
        raise RemoteProtocolError(_CANNOT, RefuseCode.BAD_ENVELOPE) from None
