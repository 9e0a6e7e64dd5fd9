"""Where received files go, and the rules that keep them whole.

A transfer writes ROOT/<to>/<folder>/<from>_<datetime>.part; only when every tag and
the CRC hold is it fsynced and hard-linked to .data (a link never replaces an
existing name, so a finished .data is never overwritten), the .part unlinked and the
directory fsynced. Then, and only then, may the server send ACK.

Why it is built this way: the recipient's home may be owned by a local user who plants
symlinks or swaps folders at any moment, so no path below ROOT/<to> is ever resolved. The
folder is walked component by component from a descriptor of the home (O_NOFOLLOW, mkdirat
for missing ones, a symlink or non-directory is refused), and every file operation is
relative to the final folder's descriptor: .part and the .meta temp file are unlinked and
re-created O_EXCL|O_NOFOLLOW, .data is a linkat that does not follow. Each transfer
remembers what it created, so abort() removes exactly that; once .data is linked nothing
of it is removed. commit() runs in a worker thread and never touches Storage's table.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from . import keptpart
from .blocks import BLOCK_SIZE, block_count
from .crc import BytesLike
from .defaults import DEFAULT_KEEP_PARTIAL
from .errors import (
    AlreadyReceived,
    ConfigError,
    LocalProtocolError,
    M2YError,
    RefuseCode,
    RemoteProtocolError,
    one_line,
)
from .meta import KEY_FOLDERS, MAX_FOLDER_LEN, safe_folder
from .pool import advance
from .users import check_user

log = logging.getLogger("m2y.storage")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# mkdir/lstat failures that come from the client's folder name, not from the server.
_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST, errno.ELOOP, errno.EINVAL}


def exists_reason(name: str) -> str:
    """The EXISTS refusal at commit, ``name`` being the .data's base name: another transfer's .data
    (or a file a local user put there) took the name while this one was received."""
    return (f"{name} was already received; a finished file is never overwritten. Make a new .meta for "
            "this file (m2y meta) to give it a new datetime")


MAX_STORED_META = 64 << 10  # real ones are under ~2 KiB (folder <= 1024 bytes, filename <= 255)


def _holds_same(dir_fd: int, data_name: str, meta_name: str, fields: dict[str, Any]) -> bool:
    """Does the finished ``data_name`` hold this very file: a regular file of ``filesize`` bytes whose
    stored .meta is exactly ``fields``? Anything unreadable or odd (a symlink, a FIFO, a .meta a
    local user edited) is "no": the sender is then told to make a new .meta, never told "done".
    Both checks always run, so the time taken does not tell a stranger which one failed."""
    try:
        st = os.lstat(data_name, dir_fd=dir_fd)
        data_ok = stat.S_ISREG(st.st_mode) and st.st_size == fields["filesize"]
    except OSError:
        data_ok = False
    stored = _stored_meta(dir_fd, meta_name)
    return _exact(stored) == _exact(fields) and data_ok


def _exact(value: Any) -> str:
    """JSON text with sorted keys: unlike ``==``, tells 5 from 5.0 and 1 from true."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _stored_meta(dir_fd: int, meta_name: str) -> Any:
    """The JSON of a stored .meta, or None if it is not a small regular file of JSON."""
    raw = _stored_bytes(dir_fd, meta_name)
    try:
        return None if raw is None else json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def _stored_bytes(dir_fd: int, meta_name: str) -> bytes | None:
    """The bytes of a stored .meta, or None if it is not a small regular file (never follows a
    symlink, never blocks on a FIFO)."""
    try:
        fd = os.open(meta_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            mst = os.fstat(fd)
            if not stat.S_ISREG(mst.st_mode) or mst.st_size > MAX_STORED_META:
                return None
            return os.read(fd, MAX_STORED_META + 1)
        finally:
            os.close(fd)
    except OSError:
        return None


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """A file, and no other put in its place (an inode number can be reused at once; its ctime moves)."""
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _reopen_part(name: str, dir_fd: int, partial: Partial) -> int:
    """The kept .part, opened for writing after its ``written`` bytes; -1 if it is not the file that
    was kept (swapped, grown, shrunk, gone)."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return -1
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or _identity(st) != partial.inode or st.st_size != partial.written:
            os.close(fd)
            return -1
        os.lseek(fd, partial.written, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def _create_file(name: str, dir_fd: int) -> int:
    """A new regular file ``name`` in ``dir_fd``: whatever had that name (a planted symlink) goes first."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)
    return os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)


def _write_all(fd: int, data: BytesLike) -> int:
    view = memoryview(data)
    total = 0
    while view:
        n = os.write(fd, view)
        view = view[n:]
        total += n
    return total


def _unsafe(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(reason, RefuseCode.UNSAFE_PATH)


def _open_home(home: Path, recipient: str) -> int:
    try:
        st = os.lstat(home)
    except FileNotFoundError:
        raise RemoteProtocolError(f"recipient {recipient!r} has no home folder on this server",
                                  RefuseCode.UNKNOWN_RECIPIENT) from None
    if stat.S_ISLNK(st.st_mode):
        raise _unsafe(f"the home folder of {recipient!r} is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise _unsafe(f"the home folder of {recipient!r} is not a directory")
    try:
        return os.open(home, _DIR_FLAGS)
    except OSError as exc:  # swapped since the lstat
        if exc.errno in _PATH_ERRNOS:
            raise _unsafe(f"the home folder of {recipient!r} cannot be opened: {exc.strerror}") from None
        raise


def _walk(home_fd: int, parts: list[str], created: list[str]) -> int:
    """Descriptor of home/<parts...>, creating missing folders (appended to ``created``) without following links."""
    fd = os.dup(home_fd)
    try:
        for i, name in enumerate(parts):
            rel = "/".join(parts[: i + 1])
            try:
                st: os.stat_result | None = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                if exc.errno in _PATH_ERRNOS:
                    raise _unsafe(f"folder component {rel!r} is unusable: {exc.strerror}") from None
                raise
            if st is None:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass  # appeared meanwhile: the O_NOFOLLOW open below judges it
                except OSError as exc:
                    if exc.errno in _PATH_ERRNOS:
                        raise _unsafe(f"cannot create folder {rel!r}: {exc.strerror}") from None
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise RemoteProtocolError(f"cannot create folder {rel!r}: {exc.strerror}",
                                                  RefuseCode.NO_SPACE) from None
                    raise
                else:
                    created.append(rel)
                    os.fsync(fd)  # the new folder's name is durable in its parent
            elif stat.S_ISLNK(st.st_mode):
                raise _unsafe(f"folder component {rel!r} is a symbolic link")
            elif not stat.S_ISDIR(st.st_mode):
                raise _unsafe(f"folder component {rel!r} exists and is not a directory")
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:  # ELOOP / ENOTDIR: swapped for a link or a file since the lstat
                if exc.errno in _PATH_ERRNOS:
                    raise _unsafe(f"folder component {rel!r} is not a plain directory: {exc.strerror}") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(eq=False)
class Incoming:
    """One file being received; ``write`` plaintext in order, then ``commit`` or ``abort``.

    Threads: ``write``, ``abort``, ``finish`` and ``Storage.release`` run on the event loop, and so
    does ``writev`` until the disk stalls; then the server runs it in a thread and calls nothing else
    of this transfer until it has returned (``_Session._write`` waits it out even when cancelled);
    ``Storage.begin`` and ``commit`` (blocking fsyncs) run in worker threads, and ``commit`` never
    touches the Storage's table. The server must therefore call ``finish()`` on the loop once ``commit()``
    has returned, to release the reservation; ``abort()`` releases by itself. ``done`` is true
    once the transfer reached its end (commit returned or abort ran); ``abort()`` is then a no-op
    for the files but still releases. ``abort()`` waits for a ``commit()`` still running in a
    thread, so the two never race on the descriptors.
    """

    store: Storage
    key: str
    meta_path: Path
    part_path: Path
    data_path: Path
    filesize: int
    fd: int = -1
    written: int = 0
    done: bool = field(default=False)
    linked: bool = field(default=False)  # the .data exists: committed, keep .data and .meta whatever follows
    home: Path = field(default=Path(), repr=False)
    created: list[str] = field(default_factory=list, repr=False)  # folders made by this transfer, shallow first
    dir_fd: int = field(default=-1, repr=False)
    meta_ours: bool = field(default=False, repr=False)
    meta_bytes: bytes = field(default=b"", repr=False)  # what this transfer wrote as its .meta
    fields_json: str = field(default="", repr=False)  # its metadata, exactly (for a resend to match)
    resume_crc: int | None = field(default=None, repr=False)  # set: resumed, ``written`` bytes were there
    partial: Partial | None = field(default=None, repr=False)  # the kept part this transfer took over
    recorded: bool = field(default=False, repr=False)  # a checkpoint wrote its record (keptpart.py)
    committing: bool = field(default=False, repr=False)  # commit() began: never suspended after
    sync_failed: bool = field(default=False, repr=False)  # an fsync of the .part failed: never ACKed nor kept
    kept: bool = field(default=False, repr=False)  # suspended: its part waits for a resend
    tmp_ours: bool = field(default=False, repr=False)
    part_ours: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def _tmp_name(self) -> str:
        return f".{self.meta_path.name}.tmp"

    def write(self, data: BytesLike) -> None:
        self.written += _write_all(self.fd, data)

    def writev(self, views: list[memoryview]) -> None:
        """Write the blocks of a batch, opened in place in their frames, in one call (or a few)."""
        while views:
            n = os.writev(self.fd, views)
            self.written += n
            views = advance(views, n)

    def commit(self) -> None:
        """Make the received bytes durable under the .data name. Blocking: run off the event loop.

        Order: fsync .part, close, link .part -> .data (never replaces, never follows), fsync the
        folder, unlink .part (best effort), fsync again. Does not release the reservation: call
        ``finish()`` on the event loop afterwards.
        """
        with self._lock:
            if self.done or self.fd < 0 or self.dir_fd < 0:
                raise LocalProtocolError(f"{self.part_path.name} is not open for commit", RefuseCode.INTERNAL)
            if self.written != self.filesize:
                raise RemoteProtocolError(
                    f"received {self.written} bytes, metadata says {self.filesize}", RefuseCode.BAD_CRC
                )
            self.committing = True  # from here it is never kept for a resend: it ends linked or removed
            if self.sync_failed:
                raise LocalProtocolError("an fsync of the received bytes failed earlier: they may not be on "
                                         "the server's disk", RefuseCode.INTERNAL)
            os.fsync(self.fd)  # the slow part of a big file: the last record stays true (and kept) meanwhile,
            # so that a stop that gives up on it (--stop-wait) leaves the part to be taken back from there
            keptpart.remove(self.dir_fd, self.part_path.name.removesuffix(".part"))  # a record never names a .data
            fd, self.fd = self.fd, -1
            os.close(fd)
            try:
                os.link(self.part_path.name, self.data_path.name, src_dir_fd=self.dir_fd,
                        dst_dir_fd=self.dir_fd, follow_symlinks=False)
            except FileExistsError:
                # A .data that is not ours took the name. Our .meta describes our bytes, not those:
                # abort() removes it, so that no later request is told "the same file" of them. A
                # .meta someone wrote with that .data is theirs and stays.
                self.meta_ours = _stored_bytes(self.dir_fd, self.meta_path.name) == self.meta_bytes
                raise RemoteProtocolError(exists_reason(self.data_path.name), RefuseCode.EXISTS) from None
            self.linked = True
            try:
                os.fsync(self.dir_fd)
            except OSError as exc:  # the name may not be durable: no ACK, so no .data either
                self._unlink_data()
                raise LocalProtocolError(
                    f"cannot make {self.data_path.name} durable: {exc.strerror or exc}", RefuseCode.INTERNAL
                ) from None
            # From here the .data is durable under its name: what follows only tidies up, and a
            # failure is logged, not a reason to refuse what is already safely stored.
            try:
                os.unlink(self.part_path.name, dir_fd=self.dir_fd)
                self.part_ours = False
                os.fsync(self.dir_fd)
            except OSError as exc:
                log.warning("%s: cannot tidy up after commit: %s", self.part_path, exc.strerror or exc)
            self.done = True
            self._close_dir()

    def _unlink_data(self) -> None:
        """Undo the link when the commit cannot complete, so that a retry is not refused EXISTS."""
        try:
            os.unlink(self.data_path.name, dir_fd=self.dir_fd)
        except OSError as exc:
            log.warning("%s: cannot undo after a failed commit: %s", self.data_path, exc.strerror or exc)
            # The .data stays, perhaps not durable: without its .meta no request is told it holds
            # "the same file" (the sender makes a new .meta instead).
            try:
                os.unlink(self.meta_path.name, dir_fd=self.dir_fd)
                self.meta_ours = False
            except OSError as exc2:
                log.warning("%s: cannot remove it either: %s", self.meta_path, exc2.strerror or exc2)
            return
        self.linked = False  # abort() now removes the .meta and .part as for any failed transfer
        with contextlib.suppress(OSError):
            os.fsync(self.dir_fd)

    def finish(self) -> None:
        """Release the reservation after ``commit()`` returned; call it on the event loop.

        Called on a transfer that is not done, it aborts it.
        """
        if not self.done:
            self.abort()
            return
        with self._lock:
            self._close_dir()
        self.store.release(self)

    def checkpoint(self, crc: int, written: int) -> bool:
        """Let the first ``written`` bytes (CRC ``crc``) survive a crash of the server: fsync them,
        then write the record (keptpart.py) that the next start takes the part back by. Blocking: in
        a thread, while the loop goes on appending (bytes the record does not vouch for: a start
        cuts them off). Nothing once the transfer is done (committed, aborted, suspended)."""
        with self._lock:
            if (self.done or self.committing or self.sync_failed or self.fd < 0 or self.dir_fd < 0
                    or not self.meta_ours or written <= 0):
                return False
            fd, dir_fd = os.dup(self.fd), os.dup(self.dir_fd)
        stem = self.part_path.name.removesuffix(".part")
        try:
            try:
                os.fdatasync(fd)
            except OSError:
                # Linux reports a lost writeback once per open file: this dup took it from the
                # commit's fsync. The bytes may not be on disk: nothing of this transfer is vouched
                # for or ACKed from now on (commit refuses, suspend aborts); the error goes up.
                with self._lock:
                    self.sync_failed = True
                raise
            ino = os.fstat(fd).st_ino
            # The record is written outside the lock (its fsyncs must not hold up the loop, which
            # takes the lock to abort or suspend); a commit or a failure meanwhile takes it back.
            # Under _records, as Storage.persist writes a kept part's record: a transfer suspended
            # while this one fsynced has its own, newer record, which this older one must not
            # replace. The flags are read, not locked: a suspend sets done before its persist is
            # queued, and _records is taken last, never held while waiting for another lock.
            with self.store._records:
                if self.done or self.committing or self.sync_failed:
                    return False
                keptpart.write(dir_fd, stem, keptpart.Record(written, crc, keptpart.meta_digest(self.meta_bytes),
                                                             ino))
            with self._lock:
                if self.committing or self.sync_failed or (self.done and not self.kept):
                    keptpart.remove(dir_fd, stem)
                    return False
                self.recorded = True
            return True
        except OSError as exc:
            if self.sync_failed:
                log.warning("%s: no checkpoint: %s", self.part_path, exc.strerror or exc)
                raise
            if not (self.committing or self.done):  # else the commit or abort removed what it was writing
                log.warning("%s: no checkpoint: %s", self.part_path, exc.strerror or exc)
            return False
        finally:
            os.close(fd)
            os.close(dir_fd)

    @property
    def resume_block(self) -> int:
        """The block the sender sends from: after the bytes a resumed transfer found, else 0."""
        return block_count(self.written) if self.resume_crc is not None else 0

    def suspend(self, crc: int, crc_len: int) -> bool:
        """The sender went away (disconnected, or silent past the idle timeout) after ``written`` bytes
        were written, whose CRC is ``crc`` over ``crc_len`` bytes: keep the .part and .meta for a
        resend of the same metadata (``Storage.begin`` resumes it). False, after ``abort()``, when
        what is on disk cannot be resumed (no whole blocks, a CRC of other bytes, a file of another
        size). Call it on the event loop, instead of ``abort()``."""
        partial = None
        with self._lock:
            whole = self.written % BLOCK_SIZE == 0 or self.written == self.filesize
            if (not self.done and not self.linked and not self.committing and not self.sync_failed
                    and self.fd >= 0 and self.dir_fd >= 0
                    and self.meta_ours
                    and 0 < self.written == crc_len and whole and self.store.keep_partial > 0):
                try:
                    st = os.fstat(self.fd)
                except OSError:
                    st = None
                if st is not None and st.st_size == self.written:
                    self.done = self.kept = True
                    fd, self.fd = self.fd, -1
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    dir_fd, self.dir_fd = self.dir_fd, -1
                    partial = Partial(self.fields_json, self.written, crc, _identity(st), dir_fd,
                                      self.part_path.name, self.meta_path.name, time.monotonic(),
                                      keptpart.meta_digest(self.meta_bytes))
        if partial is None:
            self.abort()
            return False
        self.store.keep(self, partial)
        return True

    def abort(self) -> None:
        """Forget a failed transfer: remove only what it created. Idempotent; keeps a linked .data and its .meta."""
        with self._lock:  # a commit still running in a thread finishes first
            try:
                if not self.done:
                    self.done = True
                    self._cleanup()
            finally:
                self._close_dir()
                self.store.release(self)

    def _cleanup(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1  # never closed twice, even if close() fails
            with contextlib.suppress(OSError):
                os.close(fd)
        names = [name for name, ours in ((self.part_path.name, self.part_ours), (self._tmp_name, self.tmp_ours),
                                         (self.meta_path.name, self.meta_ours and not self.linked)) if ours]
        record = self.part_ours  # a checkpoint's, or the kept part's it took over
        self.part_ours = self.tmp_ours = False
        if self.dir_fd >= 0 and record:
            keptpart.remove(self.dir_fd, self.part_path.name.removesuffix(".part"))
        if self.dir_fd >= 0:
            for name in names:
                try:
                    os.unlink(name, dir_fd=self.dir_fd)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("%s: cannot remove: %s", self.meta_path.parent / name, exc.strerror or exc)
        if not self.linked:
            self.meta_ours = False
            self._remove_created()

    def _remove_created(self) -> None:
        """rmdir the folders this transfer made, deepest first, while they are empty; never follows links.

        Skipped (the empty folders stay) while another transfer's begin() runs: it may be inside them.
        """
        if not self.store._begins.acquire(blocking=False):
            return
        try:
            self._rmdir_created()
        finally:
            self.store._begins.release()

    def _rmdir_created(self) -> None:
        while self.created:
            *parents, name = self.created[-1].split("/")
            try:
                fd = os.open(self.home, _DIR_FLAGS)
                try:
                    for part in parents:
                        child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                        os.close(fd)
                        fd = child
                    os.rmdir(name, dir_fd=fd)
                finally:
                    os.close(fd)
            except OSError:
                return  # not empty any more, or changed under us: leave it and its parents
            self.created.pop()

    def _close_dir(self) -> None:
        if self.dir_fd >= 0:
            fd, self.dir_fd = self.dir_fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)


LOCK_NAME = ".m2y-serve.lock"


def lock_root(root: Path) -> int:
    """Make this process the only server of ``root`` for as long as it lives; returns the lock's fd.

    The names being received live in one server's memory (``Storage._active``): a second server on
    the same root could replace a .part the first is writing, and the first would then link the
    second's half-written bytes to .data and ACK them. So a second server is refused at start.
    """
    path = root / LOCK_NAME
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, os.O_RDWR | flags, 0o644)
    except PermissionError:  # another user's server made it: a read-only descriptor locks as well
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError as exc:
            raise ConfigError(f"cannot open the server lock {path}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot open the server lock {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise ConfigError(f"{path} is not a plain file (a folder, a device or a hard link); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = one_line(os.pread(fd, 32, 0).decode("ascii", "replace").strip()) or "?"
            raise ConfigError(f"another m2y serve (pid {pid}) is serving {root}; one server per root") from None
        except OSError as exc:
            raise ConfigError(f"cannot lock {path} (one server per root): {exc.strerror or exc}") from None
        with contextlib.suppress(OSError):  # the pid is for the message above; a read-only lock has none
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


_LEFTOVER = re.compile(r"(?P<tmp>\.)?(?P<stem>(?P<sender>[A-Za-z0-9_-][A-Za-z0-9._-]{0,63})"
                       r"_[0-9]{2}-[0-9]{2}-[0-9]{4}_[0-9]{2}-[0-9]{2}-[0-9]{2})"
                       r"(?P<kind>(?(tmp)\.meta\.tmp|\.part)|(?(tmp)\.resume\.tmp|\.resume))\Z")
_SWEEP_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_MAX_DEPTH = MAX_FOLDER_LEN // 2 + 1  # a folder of 1024 bytes has at most 512 parts


def sweep_leftovers(root: Path, kept: list[tuple[str, Partial]] | None = None) -> list[tuple[str, int]]:
    """Remove what transfers cut short by a crash left: ``.part`` files, the ``.meta`` such a transfer
    wrote (only when no ``.data`` of that name exists and the ``.part`` is not linked to one), and
    ``.meta`` temp files. Returns (path, bytes) of each file removed. With ``kept``, a ``.part``
    whose record holds (keptpart.py) is not removed but cut to the bytes the record vouches for and
    appended to ``kept`` as (key, Partial), for ``Storage.adopt``; records without one are removed.

    Run only with the root's lock held and before listening: then no transfer is under way, so
    every ``.part`` is a leftover. Looks only where a transfer can write (below a user's home, no
    hidden or key folder, as ``safe_folder`` allows), only at names of a sender that user knows,
    only at regular files this process's user owns. Never follows a symlink, never blocks on a
    FIFO, never fails the start: what it cannot read it logs and skips.
    """
    removed: list[tuple[str, int]] = []
    try:
        homes = sorted(os.listdir(root))
    except OSError as exc:
        log.warning("cannot look for leftovers under %s: %s", root, exc.strerror or exc)
        return removed
    for home in homes:
        try:
            check_user(home)
            fd = os.open(root / home, _SWEEP_DIR_FLAGS)
        except ConfigError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT):
                log.warning("cannot look for leftovers in %s: %s", one_line(str(root / home)), exc.strerror or exc)
            continue
        try:
            senders = _known_senders(fd)
            stack = [(fd, root / home, 0)]
            while stack:
                dir_fd, path, depth = stack.pop()
                try:
                    _sweep_folder(dir_fd, path, depth, senders, stack, removed, kept)
                finally:
                    if dir_fd != fd:
                        os.close(dir_fd)
        finally:
            os.close(fd)
    return removed


def _known_senders(home_fd: int) -> set[str]:
    """Users this home holds a public key for: the only senders whose names a transfer can make."""
    try:
        key_fd = os.open("pubKey", _SWEEP_DIR_FLAGS, dir_fd=home_fd)
    except OSError:
        return set()
    try:
        return {n[: -len(".data")] for n in os.listdir(key_fd) if n.endswith(".data")}
    except OSError:
        return set()
    finally:
        os.close(key_fd)


def _sweep_folder(dir_fd: int, path: Path, depth: int, senders: set[str],
                  stack: list[tuple[int, Path, int]], removed: list[tuple[str, int]],
                  kept: list[tuple[str, Partial]] | None = None) -> None:
    before = len(removed)
    taken: set[str] = set()  # stems whose .part was taken back: their records stay
    records: list[str] = []
    try:
        entries = list(os.scandir(dir_fd))
    except OSError as exc:
        log.warning("cannot look for leftovers in %s: %s", one_line(str(path)), exc.strerror or exc)
        return
    names = {e.name for e in entries}
    for entry in entries:
        name = entry.name
        if entry.is_dir(follow_symlinks=False):
            if name.startswith(".") or depth >= _MAX_DEPTH or (depth == 0 and name.lower() in KEY_FOLDERS):
                continue
            try:
                stack.append((os.open(name, _SWEEP_DIR_FLAGS, dir_fd=dir_fd), path / name, depth + 1))
            except OSError as exc:
                log.warning("cannot look for leftovers in %s: %s", one_line(str(path / name)), exc.strerror or exc)
            continue
        m = _LEFTOVER.match(name)
        if depth == 0 or m is None or m.group("sender") not in senders:
            continue
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue
        stem = m.group("stem")
        if m.group("kind") == keptpart.SUFFIX:
            records.append(name)  # after the loop: removed unless its .part was taken back
            continue
        if kept is not None and m.group("kind") == ".part" and f"{stem}{keptpart.SUFFIX}" in names:
            partial = _take_back(dir_fd, stem, st, names, path)
            if partial is not None:
                kept.append((str(path / stem), partial))
                taken.add(stem)
                continue
        victims = [name]
        if not m.group("tmp") and st.st_nlink == 1 and f"{stem}.meta" in names and f"{stem}.data" not in names:
            victims.insert(0, f"{stem}.meta")  # first: a crash in between leaves a .part, swept next time
        for victim in victims:
            try:
                vst = st if victim == name else os.lstat(victim, dir_fd=dir_fd)
                if not stat.S_ISREG(vst.st_mode) or vst.st_uid != os.geteuid():
                    continue
                os.unlink(victim, dir_fd=dir_fd)
            except OSError as exc:
                log.warning("cannot remove leftover %s: %s", one_line(str(path / victim)), exc.strerror or exc)
                continue
            removed.append((str(path / victim), vst.st_size))
    for name in records:
        stem = name.removesuffix(keptpart.SUFFIX)
        if stem not in taken:
            try:
                size = os.lstat(name, dir_fd=dir_fd).st_size
            except OSError:
                size = 0
            keptpart.remove(dir_fd, stem)
            removed.append((str(path / name), size))
    if len(removed) > before:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)


def _take_back(dir_fd: int, stem: str, st: os.stat_result, names: set[str], path: Path) -> Partial | None:
    """The kept part ``stem.part`` (``st``) in the folder ``path`` if its record holds: the record is
    ours and names this inode, the .meta beside it is the one it was kept with and names this stem
    and folder, no .data took the name, and the file opened is the one looked at, ours, with one
    link (a folder's owner may swap it in between: a new file may get the freed inode number). The
    .part is cut to the bytes the record vouches for (fsynced when it was written)."""
    if f"{stem}.data" in names or f"{stem}.meta" not in names or st.st_nlink != 1:
        return None
    record = keptpart.read(dir_fd, stem)
    if record is None or record.ino != st.st_ino or st.st_size < record.written:
        return None
    meta_bytes = _stored_bytes(dir_fd, f"{stem}.meta")
    if meta_bytes is None or keptpart.meta_digest(meta_bytes) != record.meta_sha256:
        return None
    try:
        fields = json.loads(meta_bytes.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if (not isinstance(fields, dict) or f"{fields.get('from')}_{fields.get('datetime')}" != stem
            or type(fields.get("filesize")) is not int or record.written > fields["filesize"]
            or (record.written % BLOCK_SIZE and record.written != fields["filesize"])):
        return None
    try:
        where = (check_user(str(fields.get("to"))), *safe_folder(fields.get("folder")).split("/"))
    except M2YError:
        return None
    if path.parts[-len(where):] != where:  # the recipient and folder it was sent to, not moved since
        return None
    try:
        fd = os.open(f"{stem}.part", os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        fst = os.fstat(fd)
        if (not stat.S_ISREG(fst.st_mode) or fst.st_uid != os.geteuid() or fst.st_nlink != 1
                or (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or fst.st_ino != record.ino):
            return None
        if fst.st_size != record.written:  # bytes written after the record: not vouched for
            os.ftruncate(fd, record.written)
            os.fsync(fd)
            log.info("%s.part: cut from %d to %d B, what its record vouches for (bytes after it are sent again)",
                     one_line(str(path / stem)), fst.st_size, record.written)
            fst = os.fstat(fd)
        own_dir = os.dup(dir_fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    return Partial(_exact(fields), record.written, record.crc, _identity(fst), own_dir, f"{stem}.part",
                   f"{stem}.meta", time.monotonic(), record.meta_sha256, persisted=True)


@dataclass
class Partial:
    """A transfer cut short by its sender: its .part (``written`` bytes, CRC ``crc``) and .meta wait
    for a resend of the same metadata, in the folder ``dir_fd`` (kept open: no path is resolved again)."""

    fields_json: str
    written: int
    crc: int
    inode: tuple[int, int, int]  # (st_dev, st_ino, st_ctime_ns) of the .part: one swapped in since is not resumed
    dir_fd: int
    part_name: str
    meta_name: str
    kept_at: float
    meta_sha256: str = ""  # of the .meta as stored, for its on-disk record (keptpart.py)
    persisted: bool = False  # its record is on disk: it outlives this process
    persisting: bool = False  # a persist() is writing that record (one at a time: a stop's and the suspend's)

    @property
    def stem(self) -> str:
        return self.part_name.removesuffix(".part")

    def remove(self) -> None:
        """Expired or replaced: remove the .part (if it is still ours), its .meta and its record."""
        try:
            st = os.lstat(self.part_name, dir_fd=self.dir_fd)
        except OSError:
            st = None
        try:
            if st is not None and _identity(st) == self.inode:
                keptpart.remove(self.dir_fd, self.stem)  # first: a record never outlives its .part
                for name in (self.meta_name, self.part_name):  # the .meta first, each on its own
                    try:
                        os.unlink(name, dir_fd=self.dir_fd)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        log.warning("cannot remove the kept %s: %s", name, exc.strerror or exc)
        finally:
            self.forget()

    def forget(self) -> None:
        if self.dir_fd >= 0:
            fd, self.dir_fd = self.dir_fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)


MAX_PARTIALS = 64  # kept at once; the oldest goes first
CLOSE_WAIT = 30.0  # s a stop (Storage.close) waits for the records of its kept parts, by default


class Storage:
    """The server's files under ROOT, shared by all its connections.

    ``begin`` runs in executor threads (one at a time, under ``_begins``); the table of names being
    received and their disk reservations is guarded by ``_table``.
    """

    def __init__(self, root: Path, max_file_size: int, keep_partial: float = DEFAULT_KEEP_PARTIAL) -> None:
        self.root = root
        self.max_file_size = max_file_size
        self.keep_partial = keep_partial
        self._active: dict[str, Incoming] = {}
        self._partial: dict[str, Partial] = {}  # cut short, waiting for a resend (in this process only)
        self._removing: list[Partial] = []  # out of the table, for expire() to remove
        self._table = threading.Lock()  # begin() may run in executor threads, several at once
        # ... one at a time: a loser must not rmdir a folder a winner uses (re-entrant: a failing
        # begin cleans up under it; an abort elsewhere leaves new folders if a begin is running)
        self._begins = threading.RLock()
        self._records = threading.Lock()  # around writing a .resume record; taken last, held for nothing else

    def reserved(self) -> int:
        return sum(max(t.filesize - t.written, 0) for t in list(self._active.values()))

    def begin(self, fields: dict[str, Any]) -> Incoming:
        """Check limits and names, store the .meta, open the .part. Refusals carry the reason; a name
        that holds a finished .data raises ``AlreadyReceived``, which says whether it is this very file.

        Creates missing folders (never through a symlink); on any failure removes what it made
        and holds no reservation. Blocking (fsyncs): the server runs it in a thread.
        """
        with self._begins:
            return self._begin(fields)

    def _begin(self, fields: dict[str, Any]) -> Incoming:
        sender, recipient = check_user(fields["from"]), check_user(fields["to"])
        folder = safe_folder(fields["folder"])
        filesize = fields["filesize"]
        if filesize > self.max_file_size:
            raise RemoteProtocolError(
                f"file of {filesize} bytes is over this server's limit of {self.max_file_size}",
                RefuseCode.TOO_LARGE,
            )
        when = fields["datetime"]
        if not isinstance(when, str) or not when or "/" in when or "\x00" in when:
            raise RemoteProtocolError(f"datetime {when!r} cannot be part of a file name", RefuseCode.BAD_METADATA)
        try:
            meta_bytes = (json.dumps(fields, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
        except UnicodeEncodeError:
            raise RemoteProtocolError("metadata holds text that is not valid Unicode",
                                      RefuseCode.BAD_METADATA) from None
        home = self.root / recipient
        directory = home / folder
        stem = f"{sender}_{when}"
        incoming = Incoming(self, str(directory / stem), directory / f"{stem}.meta", directory / f"{stem}.part",
                            directory / f"{stem}.data", filesize, home=home)
        home_fd = _open_home(home, recipient)
        try:
            incoming.dir_fd = _walk(home_fd, folder.split("/"), incoming.created)
        except BaseException:
            incoming.abort()
            raise
        finally:
            os.close(home_fd)
        try:
            incoming.fields_json = _exact(fields)
            self._check_and_open(incoming, folder, meta_bytes, fields)
        except BaseException:
            incoming.abort()  # removes what this transfer made; releases only if it was registered
            raise
        return incoming

    def _check_and_open(self, incoming: Incoming, folder: str, meta_bytes: bytes, fields: dict[str, Any]) -> None:
        dir_fd, stem = incoming.dir_fd, incoming.data_path.name.removesuffix(".data")
        gone: list[Partial] = []
        try:
            self._claim(incoming, folder, stem, fields, gone)
        finally:
            for p in gone:  # expired kept parts, whatever happens to this request (under _begins)
                p.remove()
        partial = incoming.partial
        try:
            tmp = incoming._tmp_name
            fd = _create_file(tmp, dir_fd)
            incoming.tmp_ours = True
            try:
                _write_all(fd, meta_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, incoming.meta_path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            incoming.tmp_ours, incoming.meta_ours, incoming.meta_bytes = False, True, meta_bytes
            os.fsync(dir_fd)
            if partial is not None:
                incoming.fd = _reopen_part(incoming.part_path.name, dir_fd, partial)
                if incoming.fd < 0:  # not the file that was kept: start afresh
                    incoming.written, incoming.resume_crc = 0, None
            if incoming.fd < 0:
                # A fresh .part: a record of an older one must go first (and durably), or a crash
                # could let the next start take the new bytes back under the old record's CRC.
                if keptpart.remove(dir_fd, incoming.part_path.name.removesuffix(".part")):
                    os.fsync(dir_fd)
                incoming.fd = _create_file(incoming.part_path.name, dir_fd)
            incoming.part_ours = True
        except BaseException:
            if partial is not None and incoming.fd < 0:
                # Failed before the kept .part was taken over: it is not this transfer's to remove, so
                # it goes back to the table if its .meta is untouched, else it is removed.
                incoming.written, incoming.resume_crc = 0, None
                if incoming.meta_ours:
                    partial.remove()
                else:
                    with self._table:
                        self._partial.setdefault(incoming.key, partial)
                    partial = None
            raise
        finally:
            if partial is not None:
                partial.forget()  # its folder descriptor: this transfer has its own

    def _claim(self, incoming: Incoming, folder: str, stem: str, fields: dict[str, Any], gone: list[Partial]) -> None:
        """Check and claim the name and the space in one step, under ``_table``; a kept part of this
        name with the same metadata goes to ``incoming.partial``; expired ones to ``gone``."""
        dir_fd = incoming.dir_fd
        with self._table:
            # Under the lock, and BUSY first: a transfer of this name leaves the table only once its
            # commit is durable or undone (finish/abort), so a .data seen here is never one whose
            # link or folder fsync is still under way (that could be vouched for, then undone).
            if incoming.key in self._active:
                raise RemoteProtocolError(f"{folder}/{stem} is being received right now", RefuseCode.BUSY)
            try:
                os.lstat(incoming.data_path.name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            else:
                name = incoming.data_path.name
                same = _holds_same(dir_fd, name, incoming.meta_path.name, fields)
                raise AlreadyReceived(f"{name} was already received ({'the same' if same else 'another'} file)", same)
            gone += self._expired()
            partial = self._partial.get(incoming.key)
            if partial is not None and partial.fields_json != incoming.fields_json:
                # Nothing is authenticated yet: replacing the kept part on an unproven request
                # would let a stranger who knows the name destroy it. m2y meta never reuses a
                # datetime, so the real sender resends exactly the kept metadata.
                raise RemoteProtocolError(
                    f"{folder}/{stem}: the part of an interrupted send is kept for a resend of the same "
                    f".meta; another .meta under this name is refused until it expires (a new .meta, "
                    f"from m2y meta, gives the file another name)", RefuseCode.KEPT)
            if partial is not None:
                incoming.written, incoming.resume_crc = partial.written, partial.crc  # checked on disk below
            free = psutil.disk_usage(str(incoming.data_path.parent)).free - self.reserved()
            need = incoming.filesize - incoming.written
            if need > free:
                incoming.written, incoming.resume_crc = 0, None  # the kept part stays for later
                raise RemoteProtocolError(f"file of {need} bytes does not fit: {max(free, 0)} bytes free "
                                          "on the server", RefuseCode.NO_SPACE)
            if partial is not None:
                del self._partial[incoming.key]  # this transfer takes it over
                incoming.partial = partial
            self._active[incoming.key] = incoming

    def keep(self, incoming: Incoming, partial: Partial) -> None:
        """Register a suspended transfer's files for a resend; releases its name and reservation.
        On the event loop: removes nothing itself (``expire`` does, in a thread, under ``_begins``)."""
        with self._table:
            old = self._partial.pop(incoming.key, None)  # none: a transfer takes its name's entry over
            self._partial[incoming.key] = partial
            if self._active.get(incoming.key) is incoming:
                del self._active[incoming.key]
            if old is not None:
                self._removing.append(old)

    def expire(self) -> None:
        """Remove kept transfers older than ``keep_partial`` (and the oldest beyond MAX_PARTIALS).
        Blocking: under ``_begins``, so no begin is between writing a name's .meta and its .part."""
        with self._begins:
            with self._table:
                gone = self._expired() + self._removing
                self._removing = []
            for p in gone:
                p.remove()

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """At server stop: kept files stay on disk, each with its record (written now if it was not
        yet), for the next start to take back; close their folders. Blocking: the records are
        written side by side, for at most ``wait`` s (a hung disk must not hang the stop); those
        not written by then are left to the next start, which takes their parts back at the length
        of an older record, or else removes them."""
        with self._table:
            pending = {k: p for k, p in self._partial.items() if not p.persisted}
        # One persist per part: where the suspend's (queued in the executor) is already under way,
        # this thread's returns at once, and the wait below is for that one.
        threads = {key: threading.Thread(target=self.persist, args=(key,), name="m2y-persist", daemon=True)
                   for key in pending}
        for t in threads.values():
            t.start()
        deadline = time.monotonic() + wait
        for t in threads.values():
            t.join(max(deadline - time.monotonic(), 0.0))
        while any(p.persisting for p in pending.values()) and time.monotonic() < deadline:  # a record is
            time.sleep(0.01)  # written only while its entry is in the table, which is emptied below
        late = sum(p.persisting or threads[k].is_alive() for k, p in pending.items())
        if late:
            log.warning("%d kept part(s) not recorded within %.1f s (a slow disk?): the next start takes them "
                        "back from an older record, if any, or removes them", late, wait)
        with self._table:
            kept, self._partial = [*self._partial.values(), *self._removing], {}
            self._removing = []
        for p in kept:
            p.forget()

    def persist(self, key: str) -> bool:
        """Let the part kept under ``key`` outlive this process: fsync its bytes, then write its record
        (keptpart.py). False if it is gone, taken over, or cannot be. Blocking: run it in a thread."""
        with self._table:
            partial = self._partial.get(key)
            if partial is None or partial.persisted or partial.persisting or partial.dir_fd < 0:
                return False
            dir_fd = os.dup(partial.dir_fd)  # ours: a removal may close the Partial's meanwhile
            partial.persisting = True
        try:
            fd = os.open(partial.part_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or _identity(st) != partial.inode:
                    return False
                try:
                    os.fdatasync(fd)  # what the record vouches for is durable before the record
                except OSError:
                    self._drop(key, partial)  # its bytes may not be what the CRC says: never resumed
                    raise
            finally:
                os.close(fd)
            with self._begins:  # no begin takes it over, no expiry removes it, while the record is written
                with self._table:
                    if self._partial.get(key) is not partial:
                        return False
                with self._records:  # never interleaved with a checkpoint's older record
                    keptpart.write(dir_fd, partial.stem, keptpart.Record(partial.written, partial.crc,
                                                                         partial.meta_sha256, st.st_ino))
                partial.persisted = True
        except OSError as exc:
            log.warning("%s: cannot record its kept part on disk (it will not outlive a restart): %s", one_line(key),
                        exc.strerror or exc)
            return False
        finally:
            partial.persisting = False
            os.close(dir_fd)
        log.info("%s.part: its %d B kept for a resend, recorded on disk (they outlive a restart)", one_line(key),
                 partial.written)
        return True

    def _drop(self, key: str, partial: Partial) -> None:
        """Out of the table, for ``expire`` to remove."""
        with self._table:
            if self._partial.get(key) is partial:
                del self._partial[key]
                self._removing.append(partial)

    def adopt(self, kept: list[tuple[str, Partial]]) -> None:
        """Parts a previous server kept (``sweep_leftovers``), waiting from now for their resend."""
        with self._table:
            for key, partial in kept:
                partial.kept_at = time.monotonic()
                old = self._partial.pop(key, None)
                self._partial[key] = partial
                if old is not None:
                    self._removing.append(old)

    def _expired(self) -> list[Partial]:
        """Under ``_table``: take the entries to remove out of the table."""
        now = time.monotonic()
        old = [k for k, p in self._partial.items() if now - p.kept_at > self.keep_partial]
        over = [k for k in list(self._partial)[: max(len(self._partial) - len(old) - MAX_PARTIALS, 0)]
                if k not in old]
        for k in old:  # said, or an operator told "waiting for a resend" never learns it went
            log.info("%s.part: removed with the %d B kept for a resend: none came within %g s (--keep-partial)",
                     one_line(k), self._partial[k].written, self.keep_partial)
        for k in over:
            log.info("%s.part: removed with the %d B kept for a resend: the oldest of more than %d kept parts",
                     one_line(k), self._partial[k].written, MAX_PARTIALS)
        return [self._partial.pop(k) for k in old + over]

    def release(self, incoming: Incoming) -> None:
        with self._table:
            if self._active.get(incoming.key) is incoming:
                del self._active[incoming.key]
