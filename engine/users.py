"""User names, their wire hashes, and where each user's keys live under a root.

Layout (the seed's): ROOT/<user>/privateKey/<user>.data (PEM, 0600) and
ROOT/<user>/pubKey/<name>.data (PEM public key of <name>, one's own included).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import ConfigError

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}\Z")
DEFAULT_ROOT = "/m2y"


def check_user(name: str) -> str:
    """Return ``name`` if it is a valid user name (1-64 of [A-Za-z0-9._-], no leading '.')."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"invalid user name {name!r}: use 1-64 characters of A-Z a-z 0-9 . _ - , not starting with '.'"
        )
    return name


def user_hash(name: str) -> int:
    """First 8 bytes of SHA-256 of the UTF-8 name, as the unsigned big-endian integer sent on the wire."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def default_root() -> Path:
    return Path(os.environ.get("M2Y_ROOT") or DEFAULT_ROOT)


def private_key_path(root: Path, user: str) -> Path:
    return root / check_user(user) / "privateKey" / f"{user}.data"


def public_key_path(root: Path, owner: str, name: str) -> Path:
    """Where ``owner`` keeps the public key of ``name``."""
    return root / check_user(owner) / "pubKey" / f"{check_user(name)}.data"


def home(root: Path, user: str) -> Path:
    return root / check_user(user)
