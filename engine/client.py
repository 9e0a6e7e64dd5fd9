"""The client: reads a .meta, talks to a server through ``protocol.Connection``, streams the file.

Each batch of the file is read with ``readv`` straight into a slot of the ring, every
64 KiB block at the start of its own frame; the ring (``pool.py``) seals each block in
place, and the slot goes to the socket: no block is copied in user space. The client takes
no CRC of its own: the CRC frame carries the .meta's fileCRC, and the server refuses
(BAD_CRC) unless the bytes it received have that CRC, so a file changed since ``m2y meta``
is caught there, without a pass over the file here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from . import envelope, meta
from .blocks import BLOCK_SIZE, BlockCipher, batch_plain_size, block_count
from .defaults import (
    DEFAULT_BATCH,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_RETRIES,
    DEFAULT_RETRY_WAIT,
    DEFAULT_TIMEOUT,
    MAX_RETRY_WAIT,
)
from .errors import (
    CannotConnect,
    ConfigError,
    ConnectionLost,
    M2YError,
    MalformedMeta,
    ProtocolError,
    RefuseCode,
    Refused,
    RemoteProtocolError,
    one_line,
)
from .keys import load_private, load_public
from .pool import ENCRYPT, Ring, WorkerPool, advance, make_ring
from .protocol import (
    NEED_DATA,
    Ack,
    Blocks,
    Connection,
    Envelope,
    Event,
    FileCRC,
    Header,
    Reply,
    Role,
    frames_size,
)
from .protocol import Refused as RefusedEvent
from .users import private_key_path, public_key_path, user_hash


@dataclass
class Prepared:
    """Everything checked locally before connecting."""

    meta_path: Path
    fields: dict[str, Any]
    data_path: Path
    private_key: rsa.RSAPrivateKey
    recipient_key: rsa.RSAPublicKey
    own_public_key: Path  # what the recipient needs in its pubKey/ to know us (said if it does not)


@dataclass
class Sent:
    """What the server acknowledged: ``nbytes`` durable there; ``already`` if it held them before this send."""

    nbytes: int
    already: bool = False
    resumed_at: int = 0  # bytes the server had kept from an interrupted send of this file


@dataclass
class Result:
    meta_path: Path
    ok: bool
    message: str
    renamed_to: Path | None = None
    nbytes: int = 0
    seconds: float = 0.0
    already: bool = False  # the server held the file before this send (an earlier ACK was lost)
    resumed_at: int = 0  # bytes the server had kept from an interrupted send: this one sent the rest
    retries: int = 0  # tries after the first
    resumable: bool = False  # failed for the connection or a busy server: sending the .failed later goes on
    earlier: bool = False  # not sent now: the .meta is already the .done of an earlier send
    note: str = ""  # said after the file's line (its .meta was replaced while it was sent)


def prepare(meta_path: Path, root: Path) -> Prepared:
    """Read and check a .meta, its keys and its data file; ConfigError with one line if anything is off."""
    fields = meta.read_meta_file(meta_path)
    sender, recipient = fields["from"], fields["to"]
    private_key = load_private(private_key_path(root, sender))
    recipient_key = load_public(public_key_path(root, sender, recipient))
    data_path = meta_path.parent / fields["filename"]
    try:
        size = data_path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"data file {data_path} not found (named by {meta_path.name}, which must sit beside "
                          "its file)") from None
    if not data_path.is_file():
        raise ConfigError(f"{data_path} is not a regular file")
    if size != fields["filesize"]:
        raise ConfigError(
            f"{data_path.name} changed since its .meta was written: size {size}, .meta says {fields['filesize']}; "
            f"run 'm2y meta' on it again"
        )
    return Prepared(meta_path, fields, data_path, private_key, recipient_key, public_key_path(root, sender, sender))


class _Channel:
    """One connected socket and its protocol state."""

    def __init__(self, sock: socket.socket, conn: Connection, timeout: float) -> None:
        self.sock = sock
        self.conn = conn
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()

    async def send(self, event: Event) -> None:
        """Send an event; a server that takes no byte for ``timeout`` seconds is given up on.

        The clock measures progress, not the event: a 1 MiB batch to a slow but reading server
        never times out, a server that stops reading does.
        """
        for chunk in self.conn.send(event):
            view = memoryview(chunk).cast("B")
            while view:
                try:
                    n = self.sock.send(view)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    raise ConnectionLost(f"connection lost: {exc.strerror or exc}") from None
                if n:
                    view = view[n:]
                else:
                    await self._writable()

    async def _writable(self) -> None:
        """Wait for room in the socket's send buffer; give up after ``timeout`` s without progress.

        Progress is the kernel's send queue shrinking (the server reading and acknowledging), not
        writability: epoll reports a full TCP socket writable only once half its queue has gone,
        which on a slow link takes longer than the server needs to show it is alive.
        """
        ready: asyncio.Future[None] = self.loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self.loop.add_writer(self.sock, wake)
        try:
            queued, still = _unsent(self.sock), 0.0
            step = min(self.timeout, 0.1)
            while not ready.done():
                await asyncio.wait({ready}, timeout=step)
                now = _unsent(self.sock)
                if now is not None and queued is not None and now < queued:
                    queued, still = now, 0.0
                else:
                    still += step
                if not ready.done() and still >= self.timeout:
                    raise ConnectionLost(f"server took no data for {self.timeout:g} s")
        finally:
            self.loop.remove_writer(self.sock)
            if not ready.done():
                ready.cancel()

    async def next(self, timeout: float | None = None) -> Event:
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError:
                if conn.peer_closed:  # closed mid-conversation, without a REFUSED: no reason given
                    raise ConnectionLost("the server closed the connection before the end") from None
                raise
            if event is not NEED_DATA:
                assert isinstance(event, Event)
                return event
            try:
                n = await asyncio.wait_for(
                    self.loop.sock_recv_into(self.sock, conn.get_buffer()), timeout or self.timeout
                )
            except TimeoutError:
                raise ConnectionLost(f"server sent nothing for {timeout or self.timeout:g} s") from None
            except OSError as exc:
                raise ConnectionLost(f"connection lost: {exc.strerror or exc}") from None
            conn.buffer_updated(n)


def _unsent(sock: socket.socket) -> int | None:
    """Bytes in the socket's send queue not yet acknowledged by the peer (Linux SIOCOUTQ), or None."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, AttributeError):  # not Linux: the timeout then runs from writability alone
        return None
    return int(struct.unpack("i", raw)[0])


async def _connect(host: str, port: int, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
    except ConnectionRefusedError:
        sock.close()
        raise CannotConnect(f"cannot connect to {host}:{port}: connection refused (is 'm2y serve' running?)") from None
    except TimeoutError:
        sock.close()
        raise CannotConnect(f"cannot connect to {host}:{port}: no answer in {timeout:g} s") from None
    except OSError as exc:
        sock.close()
        raise CannotConnect(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _refused(event: Event, p: Prepared) -> Refused:
    """The server's refusal as the user reads it: its reason, and what to do where we know more."""
    if not isinstance(event, RefusedEvent):
        return Refused(f"server sent {type(event).__name__} unexpectedly", 0)
    sender, to = p.fields["from"], p.fields["to"]
    if event.code == RefuseCode.UNKNOWN_SENDER:  # the server names only a hash; we know the names
        return Refused(f"server refused: {to} there has no usable public key of {sender}; copy your "
                       f"{p.own_public_key} into {to}/pubKey/ on the server", event.code)
    hint: dict[int, str] = {
        RefuseCode.TOO_LARGE: " (the server's operator sets that limit: m2y serve --max-file-size)",
        # Sealed to a key the server does not hold: most often a recipient who made new keys.
        RefuseCode.BAD_ENVELOPE: f" (if {to} made new keys, your copy of their public key is stale: "
                                 f"copy their new pubKey/{to}.data into your pubKey/)",
        # Usually the file is not the one its .meta describes; the server's reason says which
        # check failed, and only the user knows whether the change was meant. (Local names are
        # printed through one_line, like every line.)
        RefuseCode.BAD_CRC: f" (if {p.data_path.name} was changed on purpose since its .meta was written, "
                            "run 'm2y meta' again)",
    }
    if event.code == RefuseCode.UNKNOWN_RECIPIENT and "with hash" in event.reason:  # we know the name
        hint[event.code] = (f" (that is {to}: the server has no home with a usable private key for them; on the "
                            f"server, 'm2y keygen {to}' makes one)")
    return Refused(f"server refused: {one_line(event.reason)}{hint.get(event.code, '')}", event.code)


Progress = Callable[[int, int], None]  # (plaintext bytes handed to the socket so far, filesize), per batch


async def send_one(p: Prepared, host: str, port: int, timeout: float = DEFAULT_TIMEOUT, batch: int = DEFAULT_BATCH,
                   pool: WorkerPool | None = None, progress: Progress | None = None) -> Sent:
    """Send one prepared file; returns what the server acknowledged, raises M2YError otherwise.

    A server that already holds this very file (an earlier send's ACK was lost) says so in its
    REPLY; that counts as the ACK, and nothing is sent again."""
    fields = p.fields
    sent = meta.request(fields)
    from_hash, to_hash = user_hash(fields["from"]), user_hash(fields["to"])
    sealed = envelope.seal(p.recipient_key, meta.to_json(sent),
                           envelope.aad(envelope.REQUEST, from_hash, to_hash))
    sock = await _connect(host, port, timeout)
    ch = _Channel(sock, Connection(Role.CLIENT), timeout)
    try:
        try:
            await ch.send(Header(len(sealed), from_hash, to_hash))
            await ch.send(Envelope(sealed))
        except ConnectionLost:
            pass  # the server may have refused at once; its reason is what we read next
        event = await ch.next()
        if not isinstance(event, Reply):
            raise _refused(event, p)
        plain = envelope.open_(p.private_key, event.envelope, envelope.aad(envelope.REPLY, from_hash, to_hash))
        filekey, salt, received, first = meta.check_reply(sent, plain)
        if received == meta.SAME_FILE:  # the server's own word (the reply echoes our nonce): durable there
            return Sent(int(fields["filesize"]), already=True)
        if received == meta.OTHER_FILE:
            raise Refused(f"the server already holds another file under this .meta's name "
                          f"({fields['from']}_{fields['datetime']}.data) and never overwrites one: make a new "
                          f".meta for {p.data_path.name} (m2y meta) to give it a new datetime", RefuseCode.EXISTS)
        cipher = BlockCipher(filekey, salt)
        filesize = fields["filesize"]
        try:
            ch.conn.set_filesize(filesize, first)  # the blocks before ``first`` are on the server already
        except ProtocolError as exc:
            raise RemoteProtocolError(f"the server's reply says {exc.reason}") from None
        crc = fields["fileCRC"]
        try:
            await _stream(ch, p.data_path, make_ring(pool, filekey, salt, batch), filesize, batch, progress, first)
            await ch.send(FileCRC(cipher.seal_crc(crc)))
        except ConnectionLost as lost:
            try:
                event = await ch.next(timeout=5)  # the server may have refused mid-file: say why
            except ConnectionLost:
                raise lost from None
            raise _refused(event, p) from None
        event = await ch.next(timeout=max(timeout * 10, 600))  # ACK follows an fsync of the whole file
        if not isinstance(event, Ack):
            raise _refused(event, p)
        ack_size, ack_crc = cipher.open_ack(event.sealed)
        if (ack_size, ack_crc) != (filesize, crc):
            raise RemoteProtocolError("ACK names another size or CRC than what was sent")
        return Sent(int(filesize), resumed_at=min(first * BLOCK_SIZE, filesize))
    finally:
        sock.close()


async def _stream(ch: _Channel, path: Path, ring: Ring, filesize: int, batch: int,
                  progress: Progress | None = None, first: int = 0) -> None:
    """file -> slot -> (worker) -> frames -> socket, in order, from block ``first`` on; ``progress``
    hears of each batch sent."""
    free = list(range(ring.depth))
    queued: collections.deque[tuple[int, int]] = collections.deque()  # (first block, count) per batch
    total = block_count(filesize)
    index = first
    if progress is not None and index < total:  # where it starts: a resumed send's kept bytes are not its rate
        progress(min(first * BLOCK_SIZE, filesize), filesize)

    async def send_oldest() -> None:
        slot, _, _ = await ring.result()  # sealing takes no CRC: only the slot matters
        first, count = queued.popleft()
        await ch.send(Blocks(first, count, ring.frames(slot)[: frames_size(filesize, first, count)]))
        free.append(slot)
        if progress is not None:
            progress(min((first + count) * BLOCK_SIZE, filesize), filesize)

    try:
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            os.lseek(fd, first * BLOCK_SIZE, os.SEEK_SET)
            while index < total:
                if not free:
                    await send_oldest()
                slot = free.pop()
                count = min(batch, total - index)
                want = batch_plain_size(filesize, index, count)
                todo = ring.plain(slot, want)  # each block straight into its frame
                while todo:
                    n = os.readv(fd, todo)
                    if not n:
                        raise ConfigError(f"{path.name} changed since its .meta was written: it got shorter; "
                                          "run 'm2y meta' on it again")
                    todo = advance(todo, n)
                ring.submit(slot, ENCRYPT, index, want)
                queued.append((index, count))
                index += count
            while queued:
                await send_oldest()
    finally:
        ring.close()


def _lazy(factory: Callable[[Path, int, int], Progress] | None, meta_path: Path) -> Progress | None:
    """A Progress made on its first call, ``factory(meta_path, filesize, done)``, which ``_stream``
    makes before its first batch (``done``: the bytes a resumed send finds kept): a file the server
    already holds, or one refused before its data, never shows a bar."""
    if factory is None:
        return None
    made: list[Progress] = []

    def report(done: int, total: int) -> None:
        if not made:
            made.append(factory(meta_path, total, done))
        made[0](done, total)

    return report


SENDABLE = (".meta", ".failed")  # a .failed sent again (to resume) ends as .done


def not_sendable(meta_path: Path) -> str | None:
    """Why ``meta_path`` is not sent (None: it is). Only a .meta, or the .failed it became, is sent
    and then renamed: any other file given by mistake (a data file, a glob's catch) is left as it is."""
    if meta_path.suffix in SENDABLE:
        return None
    if meta_path.suffix == ".done":
        return (f"{meta_path.name} was sent and ACKed already; to send its file again, "
                "run 'm2y meta' on the file and send the new .meta")
    return (f"not a .meta file: not sent, left as it is (only a .meta that 'm2y meta' wrote, "
            f"or the .failed it became, is sent: {meta_path.with_suffix('.meta').name}?)")


MAX_NUMBERED = 10_000  # X.1.done ... X.9999.done: receipts of a file sent again and again pile up


def settle(meta_path: Path, suffix: str) -> Path:
    """Rename a sent ``X.meta`` (or ``X.failed``) to ``X<suffix>``, never over another file: an older
    ``X.failed`` is the handle that resumes its own transfer, an older ``X.done`` the receipt of
    another send. A name taken gets a number: ``X.1.failed``, ``X.2.failed``... (sent again, it
    ends ``X.1.done``). A .failed that fails again stays as it is."""
    target = meta_path.with_suffix(suffix)
    for n in range(1, MAX_NUMBERED):
        if target == meta_path:
            return meta_path
        try:
            os.link(meta_path, target, follow_symlinks=False)  # fails, never replaces, if target exists
        except FileExistsError:
            target = meta_path.with_name(f"{meta_path.stem}.{n}{suffix}")
            continue
        except OSError:  # no hard links here (FAT, some FUSE or network file systems): check, then rename
            if target.exists() or target.is_symlink():
                target = meta_path.with_name(f"{meta_path.stem}.{n}{suffix}")
                continue
            os.rename(meta_path, target)
            return target
        try:
            os.unlink(meta_path)
        except FileNotFoundError:  # another m2y send of the same .meta renamed it meanwhile: ours stands
            pass
        except OSError:
            with contextlib.suppress(OSError):  # not two names for one file: undo the link, say why
                os.unlink(target)
            raise
        return target
    raise FileExistsError(errno.EEXIST, f"{meta_path.stem}{suffix} and {MAX_NUMBERED - 1} numbered names "
                                        f"are taken; remove old ones")


RETRY_CODES = frozenset({RefuseCode.BUSY, RefuseCode.TIMEOUT})
HOLD_GRACE = DEFAULT_IDLE_TIMEOUT + 30.0  # s after a broken connection that BUSY is waited out
HOLD_WAIT = 5.0  # s between two tries while it is


def retryable(exc: M2YError, attempt: int) -> bool:
    """Worth another try: the connection broke before the ACK (the server keeps what it received,
    so the next try resumes), or the server was busy. Not a server that was not there at the
    first try (attempt 0): a typo or a stopped server is said at once, not after the pauses."""
    if isinstance(exc, CannotConnect):
        return attempt > 0
    if isinstance(exc, ConnectionLost):
        return True
    return isinstance(exc, Refused) and exc.code in RETRY_CODES


def still_held(exc: M2YError, lost_at: float | None, now: float) -> bool:
    """A BUSY soon after this file's connection broke: the server may still hold that connection,
    and so the name, until its idle timeout (60 s by default) shows it the connection is gone.
    Waiting that out is not a retry of its own."""
    return (lost_at is not None and now - lost_at < HOLD_GRACE and isinstance(exc, Refused)
            and exc.code == RefuseCode.BUSY)


def retry_wait(first: float, attempt: int) -> float:
    """Seconds before try ``attempt + 2``: ``first``, doubling, at most MAX_RETRY_WAIT."""
    return float(min(first * 2.0 ** min(attempt, 32), MAX_RETRY_WAIT))


OnRetry = Callable[[Path, str, float, int], None]  # (meta_path, why, seconds to wait, retry number; 0: a hold)


def send_files(metas: list[Path], root: Path, host: str, port: int,
               timeout: float = DEFAULT_TIMEOUT, workers: int = 0, batch: int = DEFAULT_BATCH,
               progress: Callable[[Path, int, int], Progress] | None = None, retries: int = DEFAULT_RETRIES,
               first_wait: float = DEFAULT_RETRY_WAIT, on_retry: OnRetry | None = None,
               on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Send each .meta in turn; rename it .done on ACK, .failed otherwise. ``progress(meta_path,
    filesize, start)``, if given, is called as a file's data begins (``start``: the bytes the server
    kept of an interrupted send) and returns what hears of each batch of it. A file whose try fails
    ``retryable``-ly is tried again, up to ``retries`` more times, after ``retry_wait`` seconds; a BUSY
    while the server ``still_held`` the broken connection is waited out besides; ``on_retry`` hears of
    each. ``on_result`` hears of each file as soon as it is settled (so that an interrupted run has said
    what it finished).
    """

    async def run() -> list[Result]:
        pool = WorkerPool(workers) if workers > 0 else None
        if pool is not None:
            pool.attach(asyncio.get_running_loop())
        try:
            return await _send_all(pool, results)
        finally:
            if pool is not None:
                pool.close()

    def settled(result: Result) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    async def _send_all(pool: WorkerPool | None, results: list[Result]) -> list[Result]:
        seen: set[Path] = set()
        for meta_path in metas:
            if (refused := not_sendable(meta_path)) is not None:
                settled(Result(meta_path, False, refused))
                continue
            # Given twice (the same name in the same folder): it was sent, and renamed, once. Not the
            # resolved file: a symlink's name is renamed, not its target's, so each name counts.
            if (same := meta_path.parent.resolve() / meta_path.name) in seen:
                continue
            seen.add(same)
            if (after := _sent_or_failed_before(meta_path)) is not None:  # the same command run again
                settled(after)
                continue
            held = _hold(meta_path)
            if isinstance(held, Result):
                settled(held)
                continue
            try:
                settled(await _send(meta_path, pool, os.fstat(held) if held is not None else None))
            finally:
                if held is not None:
                    os.close(held)  # releases the lock, after the .meta is renamed
        return results

    async def _send(meta_path: Path, pool: WorkerPool | None, locked: os.stat_result | None) -> Result:
        """One file, tried again as ``retryable`` allows, then renamed .done or .failed: the file
        ``locked`` (by ``_hold``), not what may have taken its name meanwhile."""
        already, resumed_at, attempt, resumable = False, 0, 0, False
        ok, message, nbytes = False, "", 0  # each try sets them
        prepared: Prepared | None = None
        lost_at: float | None = None
        while True:
            started = time.monotonic()  # the rate is of the last try
            try:
                if prepared is None:
                    prepared = prepare(meta_path, root)
                sent = await send_one(prepared, host, port, timeout, batch, pool=pool,
                                      progress=_lazy(progress, meta_path))
                ok, message, nbytes = True, "ACK", sent.nbytes
                already, resumed_at = sent.already, sent.resumed_at
            except M2YError as exc:
                now = time.monotonic()
                if isinstance(exc, ConnectionLost) and not isinstance(exc, CannotConnect):
                    lost_at = now
                if retries > 0 and still_held(exc, lost_at, now):
                    wait = min(retry_wait(first_wait, attempt), HOLD_WAIT)
                    if on_retry is not None:
                        on_retry(meta_path, exc.reason, wait, 0)
                    await asyncio.sleep(wait)
                    continue
                if attempt < retries and retryable(exc, attempt):
                    wait = retry_wait(first_wait, attempt)
                    attempt += 1
                    if on_retry is not None:
                        on_retry(meta_path, exc.reason, wait, attempt)
                    await asyncio.sleep(wait)
                    continue
                ok, message, nbytes = False, exc.reason, 0
                resumable = retryable(exc, attempt)  # not a server that was never there
                if isinstance(exc, MalformedMeta):  # maybe not m2y's at all: not ours to rename
                    reason = exc.reason.removeprefix(f"{meta_path}: ")  # the line starts with the path already
                    return Result(meta_path, False, f"{reason}; not sent, left as it is")
            except OSError as exc:
                ok, message, nbytes = False, f"I/O error: {exc.strerror or exc}", 0
            break
        seconds = time.monotonic() - started
        renamed = None
        if locked is not None and not _still(locked, meta_path):  # m2y meta could not wait for our lock
            return Result(meta_path, ok, message, None, nbytes, seconds, already, resumed_at, attempt,
                          note=f"; {meta_path.name} was replaced while it was sent: the new one is left as it "
                               "is, not sent yet")
        if meta_path.is_file():
            suffix = ".done" if ok else ".failed"
            try:
                renamed = settle(meta_path, suffix)
            except OSError as exc:  # say so for this file and go on with the others
                did = "the server ACKed it" if ok else message
                why = exc.strerror or exc
                ok, message = False, f"{did}, but {meta_path.name} cannot become {meta_path.stem}{suffix}: {why}"
        return Result(meta_path, ok, message, renamed, nbytes, seconds, already, resumed_at, attempt,
                      resumable and renamed is not None)

    import uvloop

    results: list[Result] = []
    uvloop.run(run())
    return results


def _hold(meta_path: Path, tries: int = 3) -> int | Result | None:
    """Lock ``meta_path`` (flock) for the whole of its send, so that a second ``m2y send`` of it at the
    same time (another terminal, a cron job) leaves it alone instead of racing the first: the one
    that failed would rename it .failed under the one that got the ACK. Returns the descriptor that
    holds the lock (``meta.lock_meta``, which ``m2y meta`` takes too); a Result if another send holds
    it, or renamed the .meta meanwhile; None where there is nothing to lock (``prepare`` says why)."""
    try:
        fd = meta.lock_meta(meta_path)
    except BlockingIOError:
        return Result(meta_path, False, f"another m2y send is sending {meta_path.name} right now: left to it "
                                        "(it renames it .done or .failed when it ends)")
    if fd is None or _still(os.fstat(fd), meta_path):
        return fd
    os.close(fd)  # between our open and our lock another send ended and renamed it, or m2y meta replaced it
    if (after := _sent_or_failed_before(meta_path)) is not None:
        return after
    if tries > 1 and meta_path.exists():  # a new .meta under the name: that one is to be sent
        return _hold(meta_path, tries - 1)
    return Result(meta_path, False, f"{meta_path.name} changed as this send started (another m2y command at "
                                    "work on it): not sent; send it again if it is still there")


def _still(locked: os.stat_result, path: Path) -> bool:
    """``path`` is still the file ``locked`` was taken of."""
    try:
        return os.path.samestat(locked, os.stat(path))
    except OSError:
        return False


def _sent_or_failed_before(meta_path: Path) -> Result | None:
    """A .meta that is gone because an earlier send renamed it (the same command run again): say
    what it became instead of 'no such .meta file'. None if it is there, or was never sent."""
    if meta_path.suffix != ".meta" or meta_path.exists() or meta_path.is_symlink():
        return None
    done, failed = meta_path.with_suffix(".done"), meta_path.with_suffix(".failed")
    if failed.is_file():  # the newest send of this name did not finish, whatever older .done there is
        return Result(meta_path, False, f"{meta_path.name} is {failed.name} now (an earlier send did not finish): "
                                        f"send {failed.name} to go on")
    try:  # a .done counts only if it describes the file beside it as it is now
        fields = meta.read_meta_file(done)
        same = (meta_path.parent / fields["filename"]).stat().st_size == fields["filesize"]
    except (ConfigError, OSError):
        same = False
    if same:
        return Result(meta_path, True, f"sent earlier: it is {done.name} now; nothing sent", earlier=True)
    return None


__all__ = ["DEFAULT_TIMEOUT", "ProtocolError", "Result", "Sent", "not_sendable", "prepare", "retry_wait", "retryable",
           "send_files", "send_one", "settle"]
