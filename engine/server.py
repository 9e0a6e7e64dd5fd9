"""The server: an asyncio adapter that drives ``protocol.Connection`` for each client.

Per connection, one coroutine reads exactly what the connection asks for straight into
the buffer it names (block frames land in a reused batch region, no copies), decrypts
and CRCs the blocks, and writes plaintext to the .part file. Reads are tried at once and
go through the loop only when nothing is waiting or after a few in a row (``_next``).
A watchdog closes connections idle longer than ``idle_timeout``. Any failure becomes one
REFUSED frame with a reason, the .part is removed, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from . import envelope, meta
from .blocks import BlockCipher, batch_plain_size
from .crc import crc64_combine
from .defaults import (
    DEFAULT_BATCH,
    DEFAULT_CHECKPOINT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEP_PARTIAL,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_ENVELOPE,
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_PORT,
    DEFAULT_STOP_WAIT,
)
from .errors import (
    AlreadyReceived,
    ConfigError,
    LocalProtocolError,
    M2YError,
    PeerClosed,
    ProtocolError,
    RefuseCode,
    RemoteProtocolError,
    one_line,
)
from .keys import load_private, load_public
from .pool import DECRYPT, Ring, WorkerPool, make_ring
from .protocol import (
    NEED_DATA,
    Blocks,
    Connection,
    Envelope,
    Event,
    FileCRC,
    Header,
    Role,
    refusal_bytes,
)
from .protocol import Ack as AckEvent
from .protocol import Refused as RefusedEvent
from .protocol import Reply as ReplyEvent
from .storage import Incoming, Partial, Storage, lock_root, sweep_leftovers
from .users import check_user, user_hash

log = logging.getLogger("m2y.server")

IMMEDIATE_READS = 8  # reads in a row without yielding to the loop: ~8 MiB, ~10 ms at most here
SLOW_WRITE = 0.1  # s: a batch write that took longer moves this transfer's writes off the loop
DRAIN_WAIT = 1.0  # s the workers get to finish the batches in flight when a sender went away


def as_failure(exc: BaseException) -> M2YError:
    """What went wrong in the server's own work (its disk), as the failure a transfer is refused with."""
    if isinstance(exc, M2YError):
        return exc
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    name = exc.filename if isinstance(exc, OSError) else None
    if isinstance(name, (str, bytes)):  # which file or folder: its last part only, no server paths to the client
        why += f": {one_line(os.path.basename(os.fsdecode(name).rstrip('/')) or os.fsdecode(name))}"
    return LocalProtocolError(f"server I/O error: {why}", RefuseCode.INTERNAL)


@dataclass
class ServerConfig:
    root: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_envelope: int = DEFAULT_MAX_ENVELOPE
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    batch: int = DEFAULT_BATCH
    workers: int = 0
    max_clients: int = DEFAULT_MAX_CLIENTS
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    keep_partial: float = DEFAULT_KEEP_PARTIAL
    checkpoint: float = DEFAULT_CHECKPOINT
    stop_wait: float = DEFAULT_STOP_WAIT


class KeyRing:
    """Users this server serves (those with a private key under root) and the peers they know.

    Keys are parsed once per version of their file (inode, size, mtime, ctime, mode), and looked at
    again (a stat) at each use, so a key replaced (``m2y keygen --force``), removed or made
    readable by others is seen by the next transfer without a restart. The root is rescanned for
    new users at most every RESCAN seconds, so a stream of bogus headers cannot make the server
    re-read keys. A key file that does not load is skipped with a log line (once per version), not fatal.
    """

    RESCAN = 1.0  # s: a user made while the server runs is served from the next second on

    def __init__(self, root: Path) -> None:
        self.root = root
        self.users: dict[int, tuple[str, rsa.RSAPrivateKey]] = {}
        self._cache: dict[Path, tuple[tuple[int, ...], rsa.RSAPrivateKey | rsa.RSAPublicKey | None]] = {}
        self._scanned = -1e9
        self._said: set[Path] = set()  # homes whose being skipped the log has said
        self.scan()

    def _load(self, path: Path, private: bool) -> rsa.RSAPrivateKey | rsa.RSAPublicKey | None:
        try:
            st = path.stat()
        except OSError:
            self._cache.pop(path, None)
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
        hit = self._cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        key: rsa.RSAPrivateKey | rsa.RSAPublicKey | None
        try:
            key = load_private(path) if private else load_public(path)
        except Exception as exc:  # one bad key file must not take the server down: skip it, say why
            log.warning("skipping key %s: %s", path, getattr(exc, "reason", exc))
            key = None
        self._cache[path] = (stamp, key)
        return key

    def scan(self) -> None:
        self._scanned = time.monotonic()
        users: dict[int, tuple[str, rsa.RSAPrivateKey]] = {}
        if self.root.is_dir():
            for home in sorted(self.root.iterdir()):
                try:
                    name = check_user(home.name)
                except M2YError:
                    continue
                if not home.is_symlink():
                    self._said.discard(home)  # a real folder (again): a symlink there later is said again
                else:  # storage refuses to write through it: say so now, not per send
                    if home not in self._said:
                        self._said.add(home)
                        log.warning("skipping user %s: its home %s is a symbolic link, which m2y does not write "
                                    "through; make it a real folder (a bind mount, if it must live on another disk)",
                                    name, home)
                    continue
                path = home / "privateKey" / f"{name}.data"
                key = self._load(path, True) if path.is_file() else None
                if isinstance(key, rsa.RSAPrivateKey):
                    users[user_hash(name)] = (name, key)
        self.users = users

    def recipient(self, to_hash: int) -> tuple[str, rsa.RSAPrivateKey]:
        known = self.users.get(to_hash)
        if known is not None:  # its key file as it is now: replaced, removed or unreadable since?
            path = self.root / known[0] / "privateKey" / f"{known[0]}.data"
            key = self._load(path, True)
            if isinstance(key, rsa.RSAPrivateKey):
                self.users[to_hash] = (known[0], key)
                return known[0], key
            if path.exists():  # there, but refused (mode, size, format): the log said why, once
                raise RemoteProtocolError(f"the private key of {known[0]} on this server cannot be used; "
                                          "the server's log says why", RefuseCode.UNKNOWN_RECIPIENT)
            del self.users[to_hash]
        elif time.monotonic() - self._scanned >= self.RESCAN:
            self.scan()  # a user may have been added since start
            if to_hash in self.users:
                return self.users[to_hash]
        raise RemoteProtocolError(f"no user with hash {to_hash:016x} on this server", RefuseCode.UNKNOWN_RECIPIENT)

    def sender(self, recipient: str, from_hash: int) -> tuple[str, rsa.RSAPublicKey]:
        """The public key ``recipient`` holds for the user whose hash is ``from_hash``."""
        directory = self.root / recipient / "pubKey"
        for path in sorted(directory.glob("*.data")) if directory.is_dir() else []:
            name = path.name[: -len(".data")]
            try:
                check_user(name)
            except M2YError:
                continue
            if user_hash(name) == from_hash and isinstance(key := self._load(path, False), rsa.RSAPublicKey):
                return name, key
        raise RemoteProtocolError(
            f"{recipient} has no public key for sender hash {from_hash:016x}; "
            f"copy the sender's key into {recipient}/pubKey/",
            RefuseCode.UNKNOWN_SENDER,
        )


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.keys = KeyRing(config.root)
        self.storage = Storage(config.root, config.max_file_size, config.keep_partial)
        self._tasks: set[asyncio.Task[None]] = set()
        self.pool = WorkerPool(config.workers) if config.workers > 0 else None
        # Writes of transfers whose disk stalled (_Session._write): their own threads, so that stalled
        # writes never hold the default executor that every begin() and commit() needs.
        self.writers = concurrent.futures.ThreadPoolExecutor(config.max_clients, thread_name_prefix="m2y-write")
        self._listener: socket.socket | None = None
        self.port = 0
        self.stopping = False  # set before the transfers are cancelled: they keep their parts
        self.stop_deadline = math.inf  # the stop waits for the disk until then
        self._busy_refusals, self._busy_logged = 0, -math.inf  # connections refused at --max-clients
        self._busy_peer = "?"
        self._busy_timer: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            where = f"{self.config.host}:{self.config.port}"
            raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        self._listener = sock
        self.port = sock.getsockname()[1]
        return sock

    async def serve_forever(self, stop: asyncio.Event) -> None:
        if self.pool is not None:
            self.pool.attach(asyncio.get_running_loop())
        listener = self._listener or self.listen()
        accept = asyncio.ensure_future(self._accept_loop(listener))
        expiry = asyncio.ensure_future(self._expire_loop() if self.config.keep_partial > 0 else asyncio.sleep(0))
        try:
            await stop.wait()
        finally:
            expiry.cancel()
            accept.cancel()
            listener.close()
            if self._busy_timer is not None:  # what it would have said, said now
                self._busy_timer.cancel()
                self._log_busy()
            self.stopping = True
            self.stop_deadline = deadline = time.monotonic() + self.config.stop_wait
            for task in list(self._tasks):
                task.cancel()
            # A transfer waits out a disk write or commit under way (its descriptor and slot must
            # outlive it); a hung disk must not hold the stop: after stop_wait, go without it.
            await asyncio.gather(accept, return_exceptions=True)
            if self._tasks:
                _, pending = await asyncio.wait(list(self._tasks), timeout=max(deadline - time.monotonic(), 0.0))
                if pending:
                    log.error("%d transfer(s) still wait on the disk after %g s; stopping without them (the next "
                              "start takes each part back as far as its last record, if it has one)",
                              len(pending), self.config.stop_wait)
            if self.pool is not None:
                self.pool.close()
            self.writers.shutdown(wait=False)  # joined, within stop_wait, by serve()
            # Kept .part files stay, with their records: the next start takes them back.
            self.storage.close(max(deadline - time.monotonic(), 0.0))

    async def _expire_loop(self) -> None:
        """Kept .part files wait ``keep_partial`` seconds for a resend, then go."""
        while True:
            await asyncio.sleep(min(60.0, max(self.config.keep_partial / 4, 0.05)))
            await asyncio.get_running_loop().run_in_executor(None, self.storage.expire)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. EMFILE: keep serving the connections we have
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            if len(self._tasks) >= self.config.max_clients:
                n = self.config.max_clients
                with contextlib.suppress(OSError):
                    sock.send(refusal_bytes(RefuseCode.BUSY, f"server busy: {n} transfer{'s' if n > 1 else ''} "
                                                              "in progress; try again later"))
                sock.close()
                self._busy_refusals += 1
                self._busy_peer = _peer_name(addr)
                if loop.time() >= self._busy_logged + BUSY_LOG_EVERY:  # a flood is one line a minute
                    self._log_busy()
                elif self._busy_timer is None:  # the rest of this minute's, said at its end
                    self._busy_timer = loop.call_at(self._busy_logged + BUSY_LOG_EVERY, self._log_busy)
                continue
            task = asyncio.ensure_future(self._handle(sock, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _log_busy(self) -> None:
        if self._busy_timer is not None:  # called directly at a minute's turn: the end-of-minute line is this one
            self._busy_timer.cancel()
            self._busy_timer = None
        if self._busy_refusals:
            log.warning("%s REFUSED BUSY: --max-clients %d reached (%d connection(s) refused since the last "
                        "such line; the address is the last one's)", self._busy_peer, self.config.max_clients,
                        self._busy_refusals)
            self._busy_logged, self._busy_refusals = asyncio.get_running_loop().time(), 0

    # -- one connection ----------------------------------------------------------------------

    async def _handle(self, sock: socket.socket, addr: Any) -> None:
        session = _Session(self, sock, _peer_name(addr))
        try:
            await session.run()
        finally:
            sock.close()


class _Session:
    """The server side of one transfer."""

    def __init__(self, server: Server, sock: socket.socket, peer: str = "?") -> None:
        cfg = server.config
        self.peer = peer  # the client's address, first in every log line of this connection
        self.server = server
        self.sock = sock
        self.conn = Connection(Role.SERVER, max_envelope=cfg.max_envelope, batch=cfg.batch,
                               allocator=self._allocate)
        self.ring: Ring | None = None
        self.slot = 0
        self.loop = asyncio.get_running_loop()
        self.last_rx = self.loop.time()
        self.incoming: Incoming | None = None
        self.label = f"{peer} ?"
        self.started = time.monotonic()
        self.timed_out = False
        self.timeout_reason = ""
        self.failure: M2YError | None = None
        self._immediate = 0  # reads since this session last yielded to the event loop
        self.acked = False
        self.client_gone = False  # the client closed or reset the connection
        self.stop_cancelled = False  # cancelled by the server stopping, for no fault of the transfer
        self.resumed_from = 0  # bytes of the file the server had kept before this connection
        self.written_crc: tuple[int, int] | None = None  # (CRC, length) of the bytes written so far
        self.next_checkpoint = self.loop.time() + server.config.checkpoint  # loop time of the next record
        self.busy_here = False  # the server itself is working (begin, a slow write): no client clock runs
        self.slow_disk = False  # a write stalled: this transfer's writes go to a thread (_write)
        # A deadline no trickle of bytes can push back: the handshake, then the first authenticated
        # batch must arrive in time, so a stranger cannot hold a name, a slot or disk reservation.
        self.deadline: tuple[float, str] | None = (
            self.loop.time() + cfg.handshake_timeout,
            f"header and metadata not received within {cfg.handshake_timeout:g} s",
        )

    async def run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._watchdog = self.loop.call_later(0.05, self._check_idle)
        outcome = "?"
        try:
            outcome = await self._transfer()
        except ProtocolError as exc:
            # A client that closed before the end broke the protocol only by leaving: say so, not
            # that its header was bad (the refusal is still tried: a half-closed one may read it).
            gone = isinstance(exc, PeerClosed)
            outcome = f"CLIENT GONE: {exc.reason}" if gone else f"REFUSED {exc.code.name}: {exc.reason}"
            await self._refuse(exc.code, exc.reason)
        except asyncio.CancelledError:
            if self.failure is not None:
                code = self.failure.code if isinstance(self.failure, ProtocolError) else RefuseCode.INTERNAL
                outcome = f"REFUSED {code.name}: {self.failure.reason}"
                await self._refuse(code, self.failure.reason)
            elif self.timed_out:
                outcome = f"REFUSED TIMEOUT: {self.timeout_reason}"
                await self._refuse(RefuseCode.TIMEOUT, self.timeout_reason)
            else:
                outcome = "ACK (server stopping)" if self.acked else "CANCELLED (server stopping)"
                self.stop_cancelled = True
                raise
        except M2YError as exc:
            outcome = f"REFUSED INTERNAL: {exc.reason}"
            await self._refuse(RefuseCode.INTERNAL, exc.reason)
        except OSError as exc:
            outcome = f"FAILED: {exc.strerror or exc}"
            if isinstance(exc, ConnectionError):  # the client went away (a reset while we sent): not our disk
                self.client_gone = True
                outcome = f"CLIENT GONE: {exc.strerror or exc}"
            code = RefuseCode.NO_SPACE if exc.errno in (errno.ENOSPC, errno.EDQUOT) else RefuseCode.INTERNAL
            await self._refuse(code, f"server I/O error: {exc.strerror or exc}")
        except Exception as exc:  # the server survives any client; log the bug
            log.exception("internal error")
            outcome = f"FAILED: internal error {type(exc).__name__}"
            await self._refuse(RefuseCode.INTERNAL, "internal server error")
        finally:
            self._watchdog.cancel()
            kept = None
            if self.incoming is not None and not self.incoming.done:
                kept = self._keep_or_abort(self.incoming)
                outcome += f"; kept {kept} B for a resend" if kept is not None else ""
            if self.stop_cancelled and not self.acked:  # say why, not a bare reset: BUSY, tried again by every client
                self._say_stopping(kept)
            self._log(outcome)

    def _say_stopping(self, kept: int | None) -> None:
        """A REFUSED BUSY to a transfer that this server's stop cuts short, in one non-blocking send (a
        stop waits for nobody): its sender reads why, and what was ``kept``, and tries again."""
        what = f"the {kept} bytes it received are kept for a resend; " if kept else ""
        with contextlib.suppress(OSError):
            self.sock.send(refusal_bytes(int(RefuseCode.BUSY), f"server stopping: {what}try again once it is back"))

    def _sender_may_resend(self, cancelled: bool) -> bool:
        """The transfer ends for no fault of its bytes: the sender went away (closed, reset, silent),
        or this server stops (``cancelled`` by it: a restart for an upgrade). Its sender may send
        again and go on."""
        stop = cancelled and self.server.stopping
        return (self.client_gone or self.timed_out or stop) and self.failure is None

    def _keep_or_abort(self, incoming: Incoming) -> int | None:
        """A transfer that ended for no fault of its bytes (``_sender_may_resend``) after some batches
        were written keeps what it received (returns how much). Any other failure (a bad block or CRC,
        our disk) removes it."""
        if self._sender_may_resend(self.stop_cancelled) and self.written_crc is not None:
            if incoming.suspend(*self.written_crc):
                # Its record (fsyncs) in a thread; a stop before it is done writes it in Storage.close.
                self.loop.run_in_executor(None, self.server.storage.persist, incoming.key)
                return incoming.written
            return None
        incoming.abort()
        return None

    def _idle(self) -> float:
        return self.server.config.idle_timeout

    def _check_idle(self) -> None:
        now = self.loop.time()
        idle = now - self.last_rx
        if self.deadline is not None and self.ring is not None and self.ring.verified:
            self.deadline = None  # the sender has proved it holds the filekey
        if self.busy_here:
            self._watchdog = self.loop.call_later(max(self._idle(), 0.05), self._check_idle)
            return
        if idle >= self._idle():
            self.timeout_reason = f"idle for {self._idle():g} s"
        elif self.deadline is not None and now >= self.deadline[0]:
            self.timeout_reason = self.deadline[1]
        else:
            wait = self._idle() - idle
            if self.deadline is not None:
                wait = min(wait, self.deadline[0] - now)
            self._watchdog = self.loop.call_later(max(wait, 0.05), self._check_idle)
            return
        self.timed_out = True
        self._task.cancel()

    def _log(self, outcome: str) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        nbytes = self.incoming.written - self.resumed_from if self.incoming else 0  # received on this connection
        log.info("%s %d B %.2f s %.1f MB/s %s", self.label, nbytes, elapsed, nbytes / elapsed / 1e6, outcome)

    async def _refuse(self, code: RefuseCode, reason: str) -> None:
        self._watchdog.cancel()  # a timeout must not cut the refusal itself short
        try:
            data = b"".join(self.conn.send(RefusedEvent(int(code), reason)))
        except ProtocolError:
            # The connection is in ERROR (the client broke the protocol): say why all the same.
            data = refusal_bytes(int(code), reason)
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), 5)

    async def _next(self) -> Event:
        """Receive until the connection yields an event.

        A busy sender has bytes waiting, so a read is tried at once: no reader to register, no
        future, no loop round trip (measured: 6 epoll_ctl calls less per 1 MiB received). The loop
        waits only when nothing is there; and every IMMEDIATE_READS reads this session yields,
        so one fast sender cannot starve the other connections, the timers and accept.
        """
        conn, sock, loop = self.conn, self.sock, self.loop
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Event)
                return event
            if self._immediate >= IMMEDIATE_READS:
                self._immediate = 0
                await asyncio.sleep(0)
            buf = conn.get_buffer()
            try:
                try:
                    n = sock.recv_into(buf)
                    self._immediate += 1
                except BlockingIOError:
                    self._immediate = 0
                    n = await loop.sock_recv_into(sock, buf)
            except ConnectionError:
                self.client_gone = True
                raise
            self.last_rx = loop.time()
            self.client_gone = n == 0
            conn.buffer_updated(n)

    async def _transfer(self) -> str:
        """One transfer from header to ACK; returns what the log line says of it."""
        conn = self.conn
        header = await self._next()
        assert isinstance(header, Header)
        recipient, private_key = self.server.keys.recipient(header.to_hash)
        sender, public_key = self.server.keys.sender(recipient, header.from_hash)
        self.label = f"{self.peer} {sender} -> {recipient}"
        env = await self._next()
        assert isinstance(env, Envelope)
        plain = envelope.open_(private_key, env.data,
                               envelope.aad(envelope.REQUEST, header.from_hash, header.to_hash))
        fields = meta.parse(plain, extra=(meta.NONCE_FIELD,))
        if fields["from"] != sender or fields["to"] != recipient:
            raise RemoteProtocolError("metadata from/to do not match the header's user hashes",
                                      RefuseCode.BAD_METADATA)
        self.label = f"{self.peer} {sender} -> {recipient} {fields['folder']}/{sender}_{fields['datetime']}.data"
        self.deadline = None  # the handshake is in; what follows is the server's own work
        self.busy_here = True
        received = meta.NEW
        try:
            incoming: Incoming | None = await self._off_loop(self.server.storage.begin, meta.stored(fields))
        except AlreadyReceived as exc:
            incoming, received = None, meta.SAME_FILE if exc.same else meta.OTHER_FILE
        finally:
            self.busy_here = False
            self.last_rx = self.loop.time()
        self.incoming = incoming
        first = incoming.resume_block if incoming is not None else 0
        if incoming is not None and incoming.resume_crc is not None:
            self.written_crc = (incoming.resume_crc, incoming.written)  # kept again if this breaks too
        reply, filekey, salt = meta.add_reply_fields(fields, received, first)
        sealed = envelope.seal(public_key, meta.to_json(reply),
                               envelope.aad(envelope.REPLY, header.from_hash, header.to_hash))
        filesize = fields["filesize"]
        conn.set_filesize(filesize, first)
        await self.loop.sock_sendall(self.sock, b"".join(conn.send(ReplyEvent(sealed))))
        if incoming is None:
            # The name holds a finished .data. Whether it is this very file is said only inside the
            # REPLY, which only the sender can read: to anyone else both cases look the same (no
            # oracle for guesses of a stored file's size or CRC). Nothing more is read or sent.
            self.deadline = None
            if received == meta.SAME_FILE:
                return "already received: the same file again (its ACK was lost?), answered in the REPLY"
            return "EXISTS: the name holds another file, told to the sender in the REPLY"
        self.started = time.monotonic()
        self.deadline = (self.loop.time() + self._idle(),
                         f"no authenticated block or CRC frame within {self._idle():g} s of the reply")

        cipher = BlockCipher(filekey, salt)
        resumed = self.resumed_from = incoming.written
        actual = await self._receive_blocks(filekey, salt, filesize, incoming)
        event = await self._next()
        assert isinstance(event, FileCRC)
        claimed = cipher.open_crc(event.sealed)
        self.deadline = None  # an empty file's sender proves itself here
        if claimed != fields["fileCRC"]:
            raise RemoteProtocolError(
                f"the CRC frame says {claimed:016x}, the metadata's fileCRC is {fields['fileCRC']:016x}",
                RefuseCode.BAD_CRC,
            )
        if actual != fields["fileCRC"]:
            raise RemoteProtocolError(
                f"file CRC {actual:016x} differs from the metadata's fileCRC {fields['fileCRC']:016x}",
                RefuseCode.BAD_CRC,
            )
        self._watchdog.cancel()  # fsync of a large file may take longer than the idle timeout
        commit = self.loop.run_in_executor(None, incoming.commit)
        try:
            await asyncio.shield(commit)  # a stopping server waits for a commit under way
        except asyncio.CancelledError:
            await asyncio.wait([commit])
            failed = commit.exception()
            if failed is not None:  # not durable: nothing of it is kept, whatever stops us
                self.failure = as_failure(failed)
            if failed is None:  # durable: release it, and tell the client if we still can
                incoming.finish()
                with contextlib.suppress(OSError):
                    self.sock.send(b"".join(conn.send(AckEvent(cipher.seal_ack(filesize, actual)))))
                    self.acked = True
            raise
        incoming.finish()  # on the loop: releases the name and the disk reservation
        await self.loop.sock_sendall(self.sock, b"".join(conn.send(AckEvent(cipher.seal_ack(filesize, actual)))))
        return f"ACK (resumed at {resumed} B)" if resumed else "ACK"


    async def _receive_blocks(self, filekey: bytes, salt: bytes, filesize: int, incoming: Incoming) -> int:
        """Frames -> slot -> (worker) -> plaintext -> .part, in order; returns the CRC-64 of the plaintext."""
        crc = incoming.resume_crc or 0  # of the bytes written so far: a resumed transfer's kept ones
        ring = make_ring(self.server.pool, filekey, salt, self.server.config.batch, crc)
        ring.on_failure = self._batch_failed
        self.ring = ring
        free = list(range(ring.depth))

        crc_len = incoming.written  # the bytes ``crc`` is of

        async def retire_oldest() -> None:
            nonlocal crc, crc_len
            slot, batch_crc, plain_len = await ring.result()
            self.deadline = None  # this batch authenticated: the sender holds the filekey
            after = batch_crc if ring.chained else crc64_combine(crc, batch_crc, plain_len)
            try:
                await self._write(incoming, ring.plain(slot, plain_len))
            finally:
                # A cancel (a stop) may come while a write in a thread is waited out: if the batch
                # did reach the file, its CRC counts, or the next batch's would be joined to a
                # CRC without it. A write that failed midway leaves the two apart: nothing is kept.
                if incoming.written == crc_len + plain_len:
                    crc, crc_len = after, crc_len + plain_len
                    self.written_crc = (crc, crc_len)  # what a resend would go on from
            free.append(slot)
            if self.loop.time() >= self.next_checkpoint:
                self._checkpoint(incoming)

        try:
            while self.conn.blocks_remaining() > 0:
                if not free:
                    await retire_oldest()
                self.slot = free.pop()
                event = await self._next()  # fills ring.frames(self.slot) through _allocate
                assert isinstance(event, Blocks)
                plain_len = batch_plain_size(filesize, event.first, event.count)
                ring.submit(self.slot, DECRYPT, event.first, plain_len)
            while ring.in_flight():
                await retire_oldest()
        except (Exception, asyncio.CancelledError) as exc:
            if self._sender_may_resend(isinstance(exc, asyncio.CancelledError)):
                await self._drain(ring, retire_oldest)
            raise
        finally:
            ring.on_failure = None
            ring.close()
            self.ring = None
        return crc

    def _checkpoint(self, incoming: Incoming) -> None:
        """Record what is written (``Incoming.checkpoint``, in a thread) so that a crash of the server
        keeps it for a resend; one at a time, every ``--checkpoint`` seconds."""
        config = self.server.config
        if config.checkpoint <= 0 or config.keep_partial <= 0 or self.written_crc is None:
            self.next_checkpoint = math.inf
            return
        self.next_checkpoint = math.inf  # until this one is done
        crc, written = self.written_crc
        fut = self.loop.run_in_executor(self.server.writers, incoming.checkpoint, crc, written)

        def done(fut: asyncio.Future[bool]) -> None:
            self.next_checkpoint = self.loop.time() + config.checkpoint
            failed = None if fut.cancelled() else fut.exception()
            if failed is not None:  # an fsync failed: the transfer cannot be vouched for, end it now
                self._batch_failed(as_failure(failed))

        fut.add_done_callback(done)

    async def _drain(self, ring: Ring, retire_oldest: Callable[[], Awaitable[None]]) -> None:
        """The transfer ends for no fault of its bytes: write, in order, the batches that arrived
        whole, so that a resend sends less. Each is authenticated first (a bad one sets ``failure``:
        nothing is kept). Bounded: workers get DRAIN_WAIT s, then what is not done is dropped.
        A disk error here is logged, and keeps nothing (the part may end in a torn batch)."""
        deadline = self.loop.time() + DRAIN_WAIT
        try:
            while ring.in_flight() and self.failure is None:
                if ring.ready():
                    await retire_oldest()
                elif self.loop.time() < deadline:
                    await asyncio.sleep(0.01)
                else:
                    break
        except (M2YError, OSError) as exc:
            failure = as_failure(exc)
            log.warning("%s: writing what arrived before the break failed: %s; nothing is kept", self.label,
                        failure.reason)
            if self.failure is None:
                self.failure = failure

    async def _write(self, incoming: Incoming, views: list[memoryview]) -> None:
        """Write a batch on the loop (a thread hand-off per batch costs ~15% on a fast disk), until
        one write stalls (a disk that blocks the writer: dirty pages throttled, a slow device); from
        then on this transfer writes in a thread, so that it stalls only itself, not every connection."""
        if not self.slow_disk:
            started = time.perf_counter()
            incoming.writev(views)
            if time.perf_counter() - started > SLOW_WRITE:
                self.slow_disk = True
                self.last_rx = self.loop.time()  # the client waited for our disk, not the reverse
                log.info("%s: a write took over %g s; its writes go to a thread", self.label, SLOW_WRITE)
            return
        fut = self.loop.run_in_executor(self.server.writers, incoming.writev, views)
        self.busy_here = True  # the client is not idle while we wait for our disk
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The slot and the descriptor must outlive the write, however often we are cancelled
            # meanwhile (a stopping server and a failing worker can both cancel): wait it out.
            while not fut.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([fut])
            failed = None if fut.cancelled() else fut.exception()
            if failed is not None and self.failure is None:  # a disk error: nothing may be kept
                self.failure = as_failure(failed)
            raise
        finally:
            self.busy_here = False
            self.last_rx = self.loop.time()

    async def _off_loop(self, begin: Callable[[dict[str, Any]], Incoming], fields: dict[str, Any]) -> Incoming:
        """Run ``Storage.begin`` (mkdir, .meta write and fsyncs) in a thread, so a slow disk stalls
        only this transfer; if we are cancelled meanwhile, wait for it and undo what it made."""
        fut = self.loop.run_in_executor(None, begin, fields)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            if not fut.cancelled() and fut.exception() is None:
                incoming = fut.result()
                # A resend that took a kept part over when the server stops keeps it, as it was.
                if not (self.server.stopping and incoming.resume_crc is not None
                        and incoming.suspend(incoming.resume_crc, incoming.written)):
                    incoming.abort()
            raise

    def _batch_failed(self, exc: M2YError) -> None:
        """A worker found a bad block (or died) while we wait on the socket: stop now, say why."""
        if self.failure is None:
            self.failure = exc
            self._task.cancel()

    def _allocate(self, nbytes: int) -> memoryview:
        """The Connection's block regions are the current slot's frame area."""
        assert self.ring is not None, "blocks arrive only after the reply"
        return self.ring.frames(self.slot)[:nbytes]


def _peer_name(addr: Any) -> str:
    """``host:port`` of a client (the listener is IPv4), for the log."""
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "?"


def serve(config: ServerConfig, on_listening: Any = None) -> None:
    """Run a server until SIGINT, SIGTERM or SIGHUP; ``on_listening(server)`` is called once bound."""
    import uvloop

    lock_fd = lock_root(config.root)  # held until this process exits
    kept: list[tuple[str, Partial]] | None = [] if config.keep_partial > 0 else None
    try:
        removed = sweep_leftovers(config.root, kept)  # no transfer can be under way: none is listening yet
    except BaseException:
        os.close(lock_fd)
        raise
    why = "" if config.keep_partial > 0 else "; --keep-partial 0 keeps none for a resend"
    for path, size in removed:
        log.info("removed %s (%d B), left by a transfer cut short%s", one_line(path), size,
                 why if path.endswith((".part", ".resume")) else "")
    for key, partial in kept or []:
        log.info("%s.part: %d B kept by the previous server, waiting for a resend", one_line(key), partial.written)

    servers: list[Server] = []

    async def main() -> None:
        server = Server(config)
        servers.append(server)
        server.storage.adopt(kept or [])
        server.listen()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGHUP too: the terminal or ssh session the server runs in closing must not be a crash,
        # which loses what arrived since the last checkpoint.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        if on_listening is not None:
            on_listening(server)
        await server.serve_forever(stop)

    # Not uvloop.run(): its close joins the default executor without a limit, and a hung disk
    # would hold the stop there. Our own executor is left to _exit_if_hung instead.
    loop = uvloop.new_event_loop()
    disk = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="m2y-disk")
    loop.set_default_executor(disk)
    try:
        loop.run_until_complete(main())
    finally:
        disk.shutdown(wait=False)
        stopped = servers[0].stop_deadline if servers else math.inf
        # The root's lock is held until the disk work is done or given up: a next server must
        # not take the root while this one's writes, records or removals may still land.
        try:
            _exit_if_hung(stopped if stopped < math.inf else time.monotonic() + config.stop_wait)
        finally:
            os.close(lock_fd)
    loop.close()


BUSY_LOG_EVERY = 60.0  # s between two log lines about connections refused at --max-clients
HUNG_GRACE = 0.5  # s more for threads that only have to notice their pool's shutdown


def _exit_if_hung(deadline: float) -> None:
    """Wait until ``deadline`` for the disk work still under way (writes, fsyncs, records in
    threads); what is still running then is on a hung disk: exit without it (status 1), since the
    interpreter would join those threads for ever. Nothing is lost that was vouched for: a part is
    taken back at its last record's length, and a record is written only after its fsync."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    for grace in (0.0, HUNG_GRACE):  # idle pool threads end as soon as they look: never blame them
        deadline = max(deadline, time.monotonic() + grace)
        for t in others:
            t.join(max(deadline - time.monotonic(), 0.0))
    hung = [t.name for t in others if t.is_alive()]
    if hung:
        log.error("the disk has not answered %d operation(s) (%s) since the stop; exiting without them",
                  len(hung), ", ".join(sorted(hung)))
        logging.shutdown()
        os._exit(1)
