"""The record that lets a kept part outlive the server: ``<from>_<datetime>.resume`` beside it.

A part kept for a resend (docs/protocol.md §5) is known by the bytes written and their CRC-64;
in memory only, a restart (an upgrade, a crash) would throw away what a 20 GB send had sent. So
once a part is kept, its first ``written`` bytes are fsynced and this record is written beside it
(through a temp file, fsynced, renamed, folder fsynced). The next start takes the part back if
the record holds: its own user's regular file, the ``.part``'s inode, the SHA-256 of the ``.meta``
that is there. The record vouches only for bytes already fsynced, and the server's CRC check of
the whole file still decides: a record that lies costs a resend, never a wrong ``.data``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass

SUFFIX = ".resume"
MAX_RECORD = 1024  # bytes; a record is ~150
VERSION = 1
_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_KEYS = {"v", "written", "crc", "meta", "ino"}
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class Record:
    written: int  # bytes of the .part it vouches for (fsynced before it was written)
    crc: int  # their CRC-64/XZ
    meta_sha256: str  # of the .meta beside it, as stored
    ino: int  # the .part's inode number


def meta_digest(meta_bytes: bytes) -> str:
    return hashlib.sha256(meta_bytes).hexdigest()


def encode(record: Record) -> bytes:
    return (json.dumps({"v": VERSION, "written": record.written, "crc": f"{record.crc:016x}",
                        "meta": record.meta_sha256, "ino": record.ino}, sort_keys=True) + "\n").encode()


def decode(raw: bytes) -> Record | None:
    """The record in ``raw``, or None for anything else (never raises)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) != _KEYS or type(obj["v"]) is not int or obj["v"] != VERSION:
        return None
    written, crc, digest, ino = obj["written"], obj["crc"], obj["meta"], obj["ino"]
    if type(written) is not int or written < 1 or type(ino) is not int or ino < 0:
        return None
    if not isinstance(crc, str) or not _HEX16.match(crc) or not isinstance(digest, str) or not _HEX64.match(digest):
        return None
    return Record(written, int(crc, 16), digest, ino)


def write(dir_fd: int, stem: str, record: Record) -> None:
    """Store ``record`` as ``stem.resume`` in ``dir_fd``, durably, replacing an older one. Blocking."""
    tmp, name = f".{stem}{SUFFIX}.tmp", f"{stem}{SUFFIX}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(tmp, _NEW, 0o600, dir_fd=dir_fd)
    try:
        data = encode(record)
        if os.write(fd, data) != len(data):
            raise OSError("short write of a resume record")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def read(dir_fd: int, stem: str) -> Record | None:
    """``stem.resume`` if it is a record this process's user wrote: a small regular file of ours,
    with one link (never follows a symlink, never blocks on a FIFO); else None."""
    try:
        fd = os.open(f"{stem}{SUFFIX}", _READ, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1
                or st.st_size > MAX_RECORD):
            return None
        return decode(os.read(fd, MAX_RECORD + 1))
    except OSError:
        return None
    finally:
        os.close(fd)


def remove(dir_fd: int, stem: str) -> bool:
    """Best effort (a record left behind with no .part is removed by the next start); True if a
    record was there and is gone."""
    gone = False
    for name in (f"{stem}{SUFFIX}", f".{stem}{SUFFIX}.tmp"):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
            gone = gone or name.endswith(SUFFIX)
    return gone
