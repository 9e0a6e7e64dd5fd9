"""RSA key pairs on disk (cryptography): generate, write PEM, read PEM.

Private keys are created with mode 0600 from the first byte (O_CREAT with the mode,
not chmod afterwards), so there is no window in which another user can read them.
The files are PKCS#1 PEM (private) and SubjectPublicKeyInfo PEM (public), the formats
pycryptodome writes too (the tests check that each library reads the other's keys).
cryptography rather than pycryptodome: importing pycryptodome's RSA cost every ``m2y send``
~0.15 s of start-up (perf/startup.py), for a handful of RSA operations.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .defaults import DEFAULT_BITS, MAX_BITS, MIN_BITS
from .errors import ConfigError
from .users import check_user, private_key_path, public_key_path


def _write_new(path: Path, data: bytes, mode: int, force: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: never overwrite by accident
    except FileExistsError:
        raise ConfigError(f"{path} already exists; use --force to replace it") from None
    finally:
        tmp.unlink(missing_ok=True)


def keygen(root: Path, user: str, bits: int = DEFAULT_BITS, force: bool = False) -> tuple[Path, Path]:
    """Create ``user``'s key pair; returns (private key path, own public key path)."""
    check_user(user)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"--bits {bits} is out of range; use {MIN_BITS} to {MAX_BITS}")
    priv_path = private_key_path(root, user)
    pub_path = public_key_path(root, user, user)
    if priv_path.exists() and not force:
        raise ConfigError(f"{priv_path} already exists; use --force to replace it")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    _write_new(priv_path, pem, 0o600, force)
    os.chmod(priv_path.parent, 0o700)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(pub_path, pub, 0o644, True)
    return priv_path, pub_path


def load_private(path: Path) -> rsa.RSAPrivateKey:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        raise ConfigError(f"private key {path} not found; pass the --root that has it, "
                          "or create it with 'm2y keygen'") from None
    except OSError as exc:
        raise ConfigError(f"cannot read private key {path}: {exc.strerror}") from None
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise ConfigError(f"{path} holds a public key, not a private one")
    try:
        key = _import_own_private(data)
    except TypeError:
        raise ConfigError(f"{path} is protected by a passphrase; m2y needs an unencrypted key (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        why = str(exc) if str(exc).startswith("an RSA key of") else "not a PEM RSA key"
        raise ConfigError(f"{path} is {why}") from None
    if mode & 0o077:
        raise ConfigError(f"private key {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    return key


def _import_own_private(data: bytes) -> rsa.RSAPrivateKey:
    """Load a PEM RSA private key without OpenSSL's primality checks of p and q, then check what is
    cheap: n = p*q, e*d = 1 mod lcm(p-1, q-1), all in range.

    The full check costs ~0.1 s per 3072-bit key, paid by every ``m2y send``; the key is the user's
    own 0600 file, written by ``keygen``. Raises ValueError (not a usable RSA key) or TypeError
    (passphrase-protected)."""
    key = serialization.load_pem_private_key(data, password=None, unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    nums = key.private_numbers()
    n, e = nums.public_numbers.n, nums.public_numbers.e
    p, q, d = nums.p, nums.q, nums.d
    if p * q != n or not all(1 < x < n for x in (p, q, e, d)) or (e * d - 1) % math.lcm(p - 1, q - 1):
        raise ValueError("not an RSA private key")
    _check_size(key.key_size, n)
    return key


def _check_size(bits: int, n: int) -> None:
    """Keys m2y can use: from MIN_BITS (what keygen makes at least) to MAX_BITS (what OpenSSL's
    OAEP takes), odd modulus. Raises ValueError otherwise."""
    if not MIN_BITS <= bits <= MAX_BITS or n % 2 == 0:
        raise ValueError(f"an RSA key of {bits} bits; m2y uses {MIN_BITS} to {MAX_BITS}")


def load_public(path: Path) -> rsa.RSAPublicKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"public key {path} not found; copy the peer's pubKey/<name>.data file there"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc.strerror}") from None
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(f"{path} holds a private key: copy the peer's pubKey/<name>.data there, never a private key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not a PEM RSA key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError(f"{path} is not a PEM RSA key")
    try:
        _check_size(key.key_size, key.public_numbers().n)
    except ValueError as exc:
        raise ConfigError(f"{path} is {exc}") from None
    return key


def share_public(root: Path, owner: str, peer: str) -> Path:
    """Copy ``owner``'s own public key into ``peer``'s pubKey/ (what a user does by hand)."""
    src = public_key_path(root, owner, owner)
    dst = public_key_path(root, check_user(peer), owner)
    _write_new(dst, src.read_bytes(), 0o644, True)
    return dst
