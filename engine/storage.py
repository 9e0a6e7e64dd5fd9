"""Where received files go, and the rules that keep them whole.

A transfer writes ROOT/<to>/<folder>/<from>_<datetime>.part; only when every tag and
the CRC hold is it fsynced and hard-linked to .data (a link never replaces an
existing name, so a finished .data is never overwritten), the .part unlinked and the
directory fsynced. Then, and only then, may the server send ACK.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .crc import BytesLike
from .errors import RefuseCode, RemoteProtocolError
from .meta import safe_folder
from .users import check_user


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Incoming:
    """One file being received; ``write`` plaintext in order, then ``commit`` or ``abort``."""

    store: Storage
    key: str
    meta_path: Path
    part_path: Path
    data_path: Path
    filesize: int
    fd: int = -1
    written: int = 0
    done: bool = field(default=False)

    def write(self, data: BytesLike) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n

    def commit(self) -> None:
        """Make the received bytes durable under the .data name. Blocking: run off the event loop."""
        if self.written != self.filesize:
            raise RemoteProtocolError(
                f"received {self.written} bytes, metadata says {self.filesize}", RefuseCode.BAD_CRC
            )
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        try:
            os.link(self.part_path, self.data_path)
        except FileExistsError:
            raise RemoteProtocolError(f"{self.data_path.name} already exists", RefuseCode.EXISTS) from None
        self.part_path.unlink()
        fsync_dir(self.data_path.parent)
        self.done = True
        self.store.release(self)

    def abort(self) -> None:
        """Forget a failed transfer: no .part, no .meta of ours, no .data."""
        if self.done:
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.part_path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)
        self.done = True
        self.store.release(self)


class Storage:
    """The server's files under ROOT, shared by all its connections (one event loop, no locks)."""

    def __init__(self, root: Path, max_file_size: int) -> None:
        self.root = root
        self.max_file_size = max_file_size
        self._active: dict[str, Incoming] = {}

    def reserved(self) -> int:
        return sum(t.filesize - t.written for t in self._active.values())

    def begin(self, fields: dict[str, Any]) -> Incoming:
        """Check limits and names, store the .meta, open the .part. Refusals carry the reason."""
        sender, recipient = check_user(fields["from"]), check_user(fields["to"])
        folder = safe_folder(fields["folder"])
        filesize = fields["filesize"]
        if filesize > self.max_file_size:
            raise RemoteProtocolError(
                f"file of {filesize} bytes is over this server's limit of {self.max_file_size}",
                RefuseCode.TOO_LARGE,
            )
        home = (self.root / recipient).resolve()
        directory = home / folder
        directory.mkdir(parents=True, exist_ok=True)
        real = directory.resolve()
        if not real.is_relative_to(home):
            raise RemoteProtocolError(f"folder {folder!r} leads outside the recipient's home",
                                      RefuseCode.UNSAFE_PATH)
        stem = f"{sender}_{fields['datetime']}"
        key = str(real / stem)
        data_path = real / f"{stem}.data"
        if data_path.exists():
            raise RemoteProtocolError(
                f"{folder}/{stem}.data was already received; a finished file is never overwritten",
                RefuseCode.EXISTS,
            )
        if key in self._active:
            raise RemoteProtocolError(f"{folder}/{stem} is being received right now", RefuseCode.BUSY)
        free = psutil.disk_usage(str(real)).free - self.reserved()
        if filesize > free:
            raise RemoteProtocolError(
                f"file of {filesize} bytes does not fit: {max(free, 0)} bytes free on the server",
                RefuseCode.NO_SPACE,
            )
        incoming = Incoming(self, key, real / f"{stem}.meta", real / f"{stem}.part", data_path, filesize)
        self._active[key] = incoming
        try:
            tmp = real / f".{stem}.meta.tmp"
            tmp.write_text(json.dumps(fields, sort_keys=True, indent=1, ensure_ascii=False) + "\n")
            os.replace(tmp, incoming.meta_path)
            incoming.fd = os.open(incoming.part_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError:
            incoming.abort()
            raise
        return incoming

    def release(self, incoming: Incoming) -> None:
        self._active.pop(incoming.key, None)
