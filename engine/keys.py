"""RSA key pairs on disk (pycryptodome): generate, write PEM, read PEM.

Private keys are created with mode 0600 from the first byte (O_CREAT with the mode,
not chmod afterwards), so there is no window in which another user can read them.
"""

from __future__ import annotations

import os
from pathlib import Path

from Crypto.IO import PEM
from Crypto.PublicKey import RSA
from Crypto.Util.asn1 import DerSequence

from .defaults import DEFAULT_BITS
from .errors import ConfigError
from .users import check_user, private_key_path, public_key_path

MIN_BITS = 2048


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
    if bits < MIN_BITS:
        raise ConfigError(f"--bits {bits} is too small; use at least {MIN_BITS}")
    priv_path = private_key_path(root, user)
    pub_path = public_key_path(root, user, user)
    if priv_path.exists() and not force:
        raise ConfigError(f"{priv_path} already exists; use --force to replace it")
    key = RSA.generate(bits)
    _write_new(priv_path, key.export_key("PEM"), 0o600, force)
    os.chmod(priv_path.parent, 0o700)
    _write_new(pub_path, key.public_key().export_key("PEM"), 0o644, True)
    return priv_path, pub_path


def load_private(path: Path) -> RSA.RsaKey:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        raise ConfigError(f"private key {path} not found; create it with 'm2y keygen'") from None
    except OSError as exc:
        raise ConfigError(f"cannot read private key {path}: {exc.strerror}") from None
    try:
        key = _import_own_private(data)
    except (ValueError, IndexError, TypeError):
        raise ConfigError(f"{path} is not a PEM RSA key") from None
    if not key.has_private():
        raise ConfigError(f"{path} holds a public key, not a private one")
    if mode & 0o077:
        raise ConfigError(f"private key {path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
    return key


def _import_own_private(data: bytes) -> RSA.RsaKey:
    """Import a PKCS#1 PEM private key without pycryptodome's primality checks of p and q.

    Those checks cost ~0.15 s per 3072-bit key, paid by every ``m2y send``; the key is the
    user's own 0600 file, written by ``keygen``. Other formats go through ``RSA.import_key``.
    """
    text = data.decode("ascii", "replace")
    if "-----BEGIN RSA PRIVATE KEY-----" not in text:
        return RSA.import_key(data)
    der, _, encrypted = PEM.decode(text)
    if encrypted:
        return RSA.import_key(data)
    seq = DerSequence().decode(der, nr_elements=9, only_ints_expected=True)
    version, n, e, d, p, q = (int(seq[i]) for i in range(6))
    if version != 0 or p * q != n or not all(1 < x < n for x in (p, q, e, d)):
        raise ValueError("not an RSA private key")
    try:
        key: RSA.RsaKey = RSA.construct((n, e, d, p, q), consistency_check=False)
    except ArithmeticError:
        raise ValueError("not an RSA private key") from None
    return key


def load_public(path: Path) -> RSA.RsaKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"public key {path} not found; copy the peer's pubKey/<name>.data file there"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        key = RSA.import_key(data)
    except (ValueError, IndexError, TypeError):
        raise ConfigError(f"{path} is not a PEM RSA key") from None
    public: RSA.RsaKey = key.public_key()
    return public


def share_public(root: Path, owner: str, peer: str) -> Path:
    """Copy ``owner``'s own public key into ``peer``'s pubKey/ (what a user does by hand)."""
    src = public_key_path(root, owner, owner)
    dst = public_key_path(root, check_user(peer), owner)
    _write_new(dst, src.read_bytes(), 0o644, True)
    return dst
