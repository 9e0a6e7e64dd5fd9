"""Transfer metadata: the JSON the sender writes (.meta), checks on it, and the server's reply.

metaCRC is the CRC-64/XZ of the canonical JSON of every other field: keys sorted,
separators "," and ":", UTF-8, no escaping of non-ASCII (docs/protocol.md §4). The datetime of a
new .meta comes from the sender's clock file (``issue_datetime``), so that one sender's files
never share a name on the server.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import re
import secrets
import stat
import time
import unicodedata
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from .crc import crc64
from .errors import ConfigError, MalformedMeta, RefuseCode, RemoteProtocolError
from .users import check_user

FIELDS = ("from", "to", "folder", "datetime", "filename", "filesize", "fileCRC", "metaCRC")
DATETIME_FORMAT = "%d-%m-%Y_%H-%M-%S"
_DATETIME = re.compile(r"[0-9]{2}-[0-9]{2}-[0-9]{4}_[0-9]{2}-[0-9]{2}-[0-9]{2}\Z")
U64_MAX = (1 << 64) - 1
MAX_FOLDER_LEN = 1024
MAX_FILENAME_LEN = 255
MAX_META_FILE = 64 * 1024  # bytes: a .meta is a few hundred; anything far larger is not one
KEY_FOLDERS = ("pubkey", "privatekey")  # a sender must not plant keys the recipient then trusts
NONCE_FIELD = "nonce"  # request only: 16 random bytes (hex) the reply must echo
RECEIVED_FIELD = "received"  # reply only: what the server already holds under this name
NEW, SAME_FILE, OTHER_FILE = 0, 1, 2  # its values (one digit each: the reply's length tells nothing)
RESUME_FIELD = "resume"  # reply only: the block to send from, 16 hex digits (a fixed length, like the above)
SALT_LEN = 4
FILEKEY_LEN = 16


def canonical(fields: Mapping[str, Any]) -> bytes:
    """Canonical JSON of every field except metaCRC."""
    body = {k: v for k, v in fields.items() if k != "metaCRC"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def meta_crc(fields: Mapping[str, Any]) -> int:
    return crc64(canonical(fields))


def with_crc(fields: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    out["metaCRC"] = meta_crc(out)
    return out


def to_json(fields: Mapping[str, Any]) -> bytes:
    """The bytes sent in an envelope: the canonical form plus metaCRC, also sorted and compact."""
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def safe_folder(folder: object) -> str:
    """Return ``folder`` if it is a safe relative path; reasons name exactly what is wrong."""
    if not isinstance(folder, str) or not folder:
        raise RemoteProtocolError("folder must be a non-empty string", RefuseCode.UNSAFE_PATH)
    if "\x00" in folder:
        raise RemoteProtocolError("folder contains a NUL byte", RefuseCode.UNSAFE_PATH)
    if len(folder.encode("utf-8", "surrogatepass")) > MAX_FOLDER_LEN:
        raise RemoteProtocolError(f"folder longer than {MAX_FOLDER_LEN} bytes", RefuseCode.UNSAFE_PATH)
    if "\\" in folder or any(unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" for c in folder):
        raise RemoteProtocolError("folder contains a backslash or a control/format character", RefuseCode.UNSAFE_PATH)
    if folder.startswith("/"):
        raise RemoteProtocolError(f"folder {folder!r} is an absolute path", RefuseCode.UNSAFE_PATH)
    parts = PurePosixPath(folder).parts
    if any(p in ("..", ".") for p in folder.split("/")):
        raise RemoteProtocolError(f"folder {folder!r} contains '..' or '.'", RefuseCode.UNSAFE_PATH)
    if not parts or any(p.startswith(".") for p in parts):
        raise RemoteProtocolError(f"folder {folder!r} has a hidden component", RefuseCode.UNSAFE_PATH)
    if long := [p for p in parts if len(p.encode("utf-8", "surrogatepass")) > MAX_FILENAME_LEN]:
        raise RemoteProtocolError(f"folder part {long[0][:40]!r}... is longer than {MAX_FILENAME_LEN} bytes, more "
                                  "than a file system takes for one name", RefuseCode.UNSAFE_PATH)
    if parts[0].lower() in KEY_FOLDERS:
        raise RemoteProtocolError(f"folder {folder!r} would write into the key folder {parts[0]!r}",
                                  RefuseCode.UNSAFE_PATH)
    return "/".join(parts)


def _expect(fields: Mapping[str, Any], name: str, kind: type) -> Any:
    value = fields.get(name)
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U64_MAX:
            raise RemoteProtocolError(f"metadata field {name!r} must be an integer 0..2^64-1",
                                      RefuseCode.BAD_METADATA)
    elif not isinstance(value, kind):
        raise RemoteProtocolError(f"metadata field {name!r} must be a {kind.__name__}",
                                  RefuseCode.BAD_METADATA)
    return value


def _load(data: bytes, what: str) -> Any:
    try:
        fields = json.loads(data.decode("utf-8"))
        canonical(fields if isinstance(fields, dict) else {})  # lone surrogates fail here, not later
    except json.JSONDecodeError as exc:  # where, so that a .meta edited by hand can be mended
        raise RemoteProtocolError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                                  RefuseCode.BAD_METADATA) from None
    except (ValueError, RecursionError):  # not UTF-8, a lone surrogate, nesting too deep
        raise RemoteProtocolError(f"{what} is not UTF-8 JSON", RefuseCode.BAD_METADATA) from None
    return fields


def parse(data: bytes, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Parse and check metadata JSON: exactly FIELDS (+ ``extra``), right types, metaCRC, safe names."""
    fields = _load(data, "metadata")
    if not isinstance(fields, dict):
        raise RemoteProtocolError("metadata is not a JSON object", RefuseCode.BAD_METADATA)
    expected = set(FIELDS) | set(extra)
    if set(fields) != expected:
        missing = sorted(expected - set(fields))
        unknown = sorted(set(fields) - expected)
        raise RemoteProtocolError(f"metadata fields wrong: missing {missing}, unknown {unknown}",
                                  RefuseCode.BAD_METADATA)
    for name in ("from", "to", "folder", "datetime", "filename"):
        _expect(fields, name, str)
    for name in ("filesize", "fileCRC", "metaCRC"):
        _expect(fields, name, int)
    if fields["metaCRC"] != meta_crc(fields):
        raise RemoteProtocolError("metaCRC does not match the metadata", RefuseCode.META_CRC)
    for name in ("from", "to"):
        try:
            check_user(fields[name])
        except ConfigError as exc:
            raise RemoteProtocolError(exc.reason, RefuseCode.BAD_METADATA) from None
    try:
        if not _DATETIME.match(fields["datetime"]):
            raise ValueError
        _dt.datetime.strptime(fields["datetime"], DATETIME_FORMAT)
    except ValueError:
        raise RemoteProtocolError("datetime must be a date dd-mm-yyyy_HH-MM-SS", RefuseCode.BAD_METADATA) from None
    if NONCE_FIELD in extra:
        nonce = fields[NONCE_FIELD]
        if not isinstance(nonce, str) or not re.fullmatch(r"[0-9a-f]{32}", nonce):
            raise RemoteProtocolError("nonce must be 32 lowercase hex digits", RefuseCode.BAD_METADATA)
    name = fields["filename"]
    if not name or "/" in name or "\x00" in name or name in (".", "..") or len(name) > MAX_FILENAME_LEN:
        raise RemoteProtocolError("filename must be a plain base name", RefuseCode.UNSAFE_PATH)
    if safe_folder(fields["folder"]) != fields["folder"]:
        raise RemoteProtocolError(f"folder {fields['folder']!r} is not normalised (no empty parts or trailing /)",
                                  RefuseCode.UNSAFE_PATH)
    return fields


def now_string(when: _dt.datetime | None = None) -> str:
    return (when or _dt.datetime.now()).strftime(DATETIME_FORMAT)


CLOCK_FILE = ".meta-clock"  # in the sender's home: the last datetime `m2y meta` gave this sender
CLOCK_LOCK_WAIT = 10.0  # seconds to wait for another `m2y meta` of the same sender


def _lock(fd: int, path: Path) -> None:
    """Take the clock's lock; give up with one line if another `m2y meta` holds it too long."""
    wait = CLOCK_LOCK_WAIT
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise ConfigError(f"{path} stayed locked for {wait:g} s: another m2y meta for this sender "
                                  "is stopped or stuck; let it finish or end it") from None
            time.sleep(0.01)


def check_home(home: Path) -> None:
    """The sender's home must exist: it keeps the clock that gives the sender's .meta files distinct datetimes."""
    if not home.is_dir():
        raise ConfigError(f"no home {home} for this sender: m2y meta keeps its datetimes there (create "
                          f"it with 'm2y keygen {home.name} --root {home.parent}', or pass the --root that has it)")


def issue_datetime(home: Path, now: _dt.datetime | None = None) -> _dt.datetime:
    """The datetime for a new .meta of the user whose home this is: now, or one second after the
    last one issued if that is not earlier.

    The server names a file ``<from>_<datetime>``: two files of one sender meta'd within the same
    second would get the same name, and the second would be refused EXISTS. The clock file, locked
    while it is read and written, keeps the datetimes of one home distinct, even when metas come
    faster than one a second (they then run ahead of the wall clock). A clock file that is wrong
    (far ahead) is followed all the same: distinct names matter more; deleting it resets it.
    """
    when = (now or _dt.datetime.now()).replace(microsecond=0)
    path = home / CLOCK_FILE
    check_home(home)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot use {path}: {exc.strerror or exc} (m2y meta keeps the sender's datetimes "
                          "distinct there: it must be a regular file the sender can write)") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path} is not a regular file: remove it (m2y meta keeps the sender's datetimes there)")
        _lock(fd, path)
        try:
            last = _dt.datetime.strptime(os.read(fd, 64).decode("ascii").strip(), DATETIME_FORMAT)
        except (UnicodeDecodeError, ValueError):
            last = None  # empty (new) or damaged: start from now
        if last is not None and when <= last:
            when = last + _dt.timedelta(seconds=1)
        # Written over in place (always 20 bytes), then trimmed and synced: a crash never leaves the
        # clock empty, which would restart it from now under datetimes already handed out.
        record = (now_string(when) + "\n").encode("ascii")
        if os.pwrite(fd, record, 0) != len(record):
            raise OSError(errno.EIO, "short write")
        os.ftruncate(fd, len(record))
        os.fsync(fd)
    except OverflowError:
        raise ConfigError(f"{path} has run to the end of the calendar: delete it") from None
    except OSError as exc:
        raise ConfigError(f"cannot use {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return when


def make(
    sender: str, recipient: str, folder: str, filename: str, filesize: int, file_crc: int,
    when: _dt.datetime | None = None,
) -> dict[str, Any]:
    """Metadata for one file, with metaCRC; checks it the way a server will."""
    check_user(sender)
    check_user(recipient)
    try:
        folder = safe_folder(folder)
    except RemoteProtocolError as exc:
        raise ConfigError(exc.reason) from None
    try:
        filename.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"file name {filename!r} is not valid UTF-8; rename the file") from None
    fields = {
        "from": sender, "to": recipient, "folder": folder, "datetime": now_string(when),
        "filename": filename, "filesize": filesize, "fileCRC": file_crc,
    }
    return with_crc(fields)


def read_meta_file(path: Path) -> dict[str, Any]:
    """Read a .meta file; any problem is one ConfigError naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO named *.meta must not hang us
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such .meta file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MalformedMeta(f"{path}: not a regular file, so not a .meta")
        if st.st_size > MAX_META_FILE:
            raise MalformedMeta(f"{path}: {st.st_size} bytes, far more than a .meta ({MAX_META_FILE} at most)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_META_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return parse(data)
    except RemoteProtocolError as exc:
        raise MalformedMeta(f"{path}: malformed .meta: {exc.reason}; mend it, or run 'm2y meta' on its file "
                          "again") from None


def meta_path_for(data_path: Path) -> Path:
    """Where ``m2y meta`` writes a file's .meta: its sibling ``<stem>.meta``."""
    if data_path.suffix == ".meta":
        return data_path.with_name(data_path.name + ".meta")
    return data_path.with_suffix(".meta")


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def write_meta_file(path: Path, fields: Mapping[str, Any]) -> bool:
    """Write a .meta atomically; never replace one that describes another file or another send.

    ``a.txt`` and ``a.bin`` share the name ``a.meta``: the second would silently take over the
    first's .meta and the first would never be sent. A .meta there is not sent yet (a sent one is
    a .done): one for another recipient or folder is refused (it would silently never be sent);
    one for the same file as it is now, to the same place, is kept (False), so that a send of it
    that was cut off still goes on where it stopped; one of an older version of the file is replaced.
    A new .meta is hard-linked into place, which fails if one appeared meanwhile.
    """
    # Its own short name: runs at once never share it, and a .meta name that fits (255 bytes) never
    # fails for the temporary's being longer.
    tmp = path.with_name(f".m2y-{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(to_json(fields) + b"\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            if not _replaceable(path, fields):
                return False
            _replace_unless_sent(tmp, path)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            if path.exists() and not _replaceable(path, fields):  # FAT, some network file systems: no link
                return False
            _replace_unless_sent(tmp, path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return True


def lock_meta(path: Path, follow: bool = True) -> int | None:
    """The lock ``m2y send`` holds on a .meta for the whole of its send, and ``m2y meta`` takes before it
    replaces one: an exclusive flock, not waited for. Returns the descriptor that holds it (holding
    nothing where the file system has no locks), None if the file cannot be opened; BlockingIOError
    if another holds it. Read-write where we may (an exclusive flock over NFS needs it), and never
    blocking on a FIFO named *.meta."""
    flags = os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, os.O_RDWR | flags)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError:
            return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # no locks on this file system: unguarded, as before
        pass
    return fd


def _replace_unless_sent(tmp: Path, path: Path) -> None:
    """``os.replace(tmp, path)`` under the lock ``m2y send`` holds on a .meta it sends: replaced under
    a send, the new .meta would be renamed .done (or .failed) by it when it ends, and never sent."""
    try:
        fd = lock_meta(path, follow=False)  # a symlink: the name alone is replaced
    except BlockingIOError:
        raise ConfigError(f"{path} is being sent right now by m2y send; run 'm2y meta' again when that "
                          "send has ended") from None
    try:
        os.replace(tmp, path)
    finally:
        if fd is not None:
            os.close(fd)


def _replaceable(path: Path, fields: Mapping[str, Any]) -> bool:
    """May the .meta at ``path`` give way to ``fields``? ConfigError if it must stay and be said."""
    filename = fields["filename"]
    try:
        raw = path.read_bytes()
        old = json.loads(raw)
        named = old.get("filename") if isinstance(old, dict) else None
    except (OSError, ValueError):
        named = None
    if isinstance(named, str) and named != filename:  # a.txt and a.bin both map to a.meta
        raise ConfigError(f"{path} already exists and is the .meta of {named!r}: the two files share a .meta name; "
                          f"rename one of them ({filename!r} or {named!r}) and run 'm2y meta' on it")
    if named != filename:
        raise ConfigError(f"{path} already exists and is not a .meta this command wrote; move it away first")
    try:
        parse(raw)
    except RemoteProtocolError:  # ours, but damaged: no send can use it (m2y send says to make it again)
        return True
    if any(old.get(k) != fields[k] for k in ("from", "to", "folder")):  # the same file, another send
        raise ConfigError(f"{path} is the .meta of {filename!r} from {old.get('from')!r} to {old.get('to')!r} (folder "
                          f"{old.get('folder')!r}), not sent yet: send it first (it becomes .done), or move it away, "
                          "then run 'm2y meta' again")
    return bool(old.get("filesize") != fields["filesize"] or old.get("fileCRC") != fields["fileCRC"])


def add_reply_fields(fields: Mapping[str, Any], received: int = NEW,
                     resume: int = 0) -> tuple[dict[str, Any], bytes, bytes]:
    """The server's reply: a fresh filekey and nonce salt from ``secrets``, what the server already
    holds under this name (``received``), the block the sender sends from (``resume``: the ones
    before it survive from an interrupted send), metaCRC recomputed."""
    filekey = secrets.token_bytes(FILEKEY_LEN)
    salt = secrets.token_bytes(SALT_LEN)
    reply = dict(fields)
    reply["filekey"] = filekey.hex()
    reply["salt"] = salt.hex()
    reply[RECEIVED_FIELD] = received
    reply[RESUME_FIELD] = f"{resume:016x}"
    return with_crc(reply), filekey, salt


def request(fields: Mapping[str, Any]) -> dict[str, Any]:
    """What the client sends: the .meta fields plus a fresh nonce, metaCRC recomputed.

    The nonce is what makes the reply prove the server holds the recipient's private key:
    the other fields could be guessed, the nonce can only be read from the envelope.
    """
    out = dict(fields)
    out[NONCE_FIELD] = secrets.token_hex(16)
    return with_crc(out)


def stored(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The request as the server keeps it (.meta): without the nonce, metaCRC as in the sender's .meta."""
    return with_crc({k: v for k, v in fields.items() if k != NONCE_FIELD})


def check_reply(sent: Mapping[str, Any], data: bytes) -> tuple[bytes, bytes, int, int]:
    """Check the reply echoes exactly what was sent plus filekey, salt, received and resume; return
    (filekey, salt, received, resume block). Only the server that read the request's nonce can echo
    it, so ``received`` is the server's own word, as trustworthy as an ACK."""
    fields = _load(data, "reply")
    if isinstance(fields, dict) and set(sent) | {"filekey", "salt"} <= set(fields) and RESUME_FIELD not in fields:
        raise RemoteProtocolError(f"the server's reply has no {RESUME_FIELD!r} field: it runs an older m2y; "
                                  "update it", RefuseCode.BAD_METADATA)
    if not isinstance(fields, dict) or set(fields) != set(sent) | {"filekey", "salt", RECEIVED_FIELD, RESUME_FIELD}:
        raise RemoteProtocolError("reply does not carry exactly the expected fields", RefuseCode.BAD_METADATA)
    if fields["metaCRC"] != meta_crc(fields):
        raise RemoteProtocolError("reply metaCRC does not match", RefuseCode.META_CRC)
    for name in sent:
        if name != "metaCRC" and fields[name] != sent[name]:
            raise RemoteProtocolError(f"reply changed field {name!r}", RefuseCode.BAD_METADATA)
    try:
        filekey = bytes.fromhex(fields["filekey"])
        salt = bytes.fromhex(fields["salt"])
    except (TypeError, ValueError):
        raise RemoteProtocolError("reply filekey/salt are not hex", RefuseCode.BAD_METADATA) from None
    if len(filekey) != FILEKEY_LEN or len(salt) != SALT_LEN:
        raise RemoteProtocolError("reply filekey/salt have the wrong length", RefuseCode.BAD_METADATA)
    received = fields[RECEIVED_FIELD]
    if type(received) is not int or received not in (NEW, SAME_FILE, OTHER_FILE):
        raise RemoteProtocolError(f"reply field {RECEIVED_FIELD!r} must be 0, 1 or 2", RefuseCode.BAD_METADATA)
    resume = fields[RESUME_FIELD]
    if not isinstance(resume, str) or not re.fullmatch(r"[0-9a-f]{16}", resume):
        raise RemoteProtocolError(f"reply field {RESUME_FIELD!r} must be 16 lowercase hex digits",
                                  RefuseCode.BAD_METADATA)
    return filekey, salt, received, int(resume, 16)
