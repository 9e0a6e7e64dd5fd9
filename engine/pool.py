"""Block crypto off the network process: a pool of worker processes over shared memory.

Strategy: each transfer owns a ring of slots in one ``multiprocessing.shared_memory``
segment. A slot holds one batch laid out as on the wire: each block's plaintext sits at the
start of its frame and is sealed (or opened) in place. The network process fills a slot
(file -> plaintext, or socket -> frames), sends the slot *number* and a few integers to a
worker over a pipe, and gets back the batch's CRC-64 of the plaintext when opening (or an error
line). Block bytes never cross a pipe.
Results are consumed in submission order, so the file and the socket see the blocks
in order however the workers finish; a transfer has at most ``depth`` batches in
flight, which is the back-pressure that keeps memory flat whatever the file size.

The receiver takes each block's CRC right after opening it (the bytes are still in cache).
Workers return per-batch CRCs that the network process joins with ``crc.crc64_combine``;
``InlineRing`` simply lets the CRC run on. No extra pass over the data. The sender takes no
CRC at all: it sends its .meta's fileCRC, which the server checks the received bytes against.

``InlineRing`` does the same work in the calling process (``--workers 0``) and is
what the pool is tested against.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .blocks import BLOCK_SIZE, TAG_LEN, BlockCipher
from .defaults import default_workers
from .errors import M2YError, RefuseCode, RemoteProtocolError

if TYPE_CHECKING:  # multiprocessing is imported where a pool starts: inline runs never pay for it
    from multiprocessing.connection import Connection as Pipe
    from multiprocessing.shared_memory import SharedMemory

ENCRYPT = 1
DECRYPT = 2
DEFAULT_DEPTH = 4


class WorkerDied(M2YError):
    """A worker process ended while it held a batch: the transfer fails, the server goes on."""


FRAME = BLOCK_SIZE + TAG_LEN


def slot_size(batch: int) -> int:
    """Bytes of one slot: ``batch`` frames, laid out exactly as on the wire."""
    return batch * FRAME


def plain_views(frames: memoryview, plain_len: int) -> list[memoryview]:
    """Where each block's plaintext sits in a slot: the start of its frame (sealed in place)."""
    return [plain for plain, _frame in block_views(frames, plain_len)]


def advance(views: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``views`` after a readv/writev moved ``n`` bytes (they may be short)."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


def block_views(frames: memoryview, plain_len: int) -> list[tuple[memoryview, memoryview]]:
    """(plaintext, frame) of each block of a batch laid out in ``frames``, as the seal/open loop takes them."""
    return [(frames[off : off + min(BLOCK_SIZE, plain_len - pos)],
             frames[off : off + min(BLOCK_SIZE, plain_len - pos) + TAG_LEN])
            for pos, off in zip(range(0, plain_len, BLOCK_SIZE), range(0, len(frames), FRAME), strict=False)]


def process_batch(
    cipher: BlockCipher, op: int, frames: memoryview, first: int, plain_len: int, crc: int = 0,
    views: list[tuple[memoryview, memoryview]] | None = None,
) -> int:
    """Seal or open one batch in place; opening returns the CRC-64 of the plaintext, continued
    from ``crc``; sealing returns 0 (the sender takes no CRC, see ``seal_blocks``).

    Plaintext block i sits at the start of frame i, so sealing writes ciphertext over it and
    appends the tag, and opening does the reverse: no second buffer and no copy (OpenSSL's
    GCM works in place when input and output start at the same address). The receiver's CRC
    is taken on each block right after opening it, while it is in cache.
    ``views`` are ``block_views(frames, plain_len)`` if the caller keeps them (a slot's full batch).
    """
    if views is None:
        views = block_views(frames, plain_len)
    if op == ENCRYPT:
        cipher.seal_blocks(views, first)
        return 0
    return cipher.open_blocks(views, first, crc)


class Ring(Protocol):
    """What the client and server need from a pool: slots, and ordered batch results."""

    depth: int
    on_failure: Callable[[M2YError], None] | None  # called as soon as a batch fails
    chained: bool  # when opening, result() gives the CRC of everything so far (True) or of the batch alone (False)
    verified: int  # batches whose blocks all authenticated

    def frames(self, slot: int) -> memoryview: ...
    def plain(self, slot: int, plain_len: int) -> list[memoryview]: ...
    def submit(self, slot: int, op: int, first: int, plain_len: int) -> None: ...
    async def result(self) -> tuple[int, int, int]: ...
    def ready(self) -> bool: ...  # the oldest batch's result is there: result() returns without waiting
    def in_flight(self) -> int: ...
    def close(self) -> None: ...


class _SlotMemory:
    def __init__(self, buf: memoryview, batch: int, depth: int) -> None:
        step = slot_size(batch)
        self._frames = [buf[i * step : (i + 1) * step] for i in range(depth)]
        self._full = batch * BLOCK_SIZE
        # Every batch but a file's last is full: its views are made once per slot, not per batch.
        self._views = [block_views(f, self._full) for f in self._frames]
        self._plain = [[plain for plain, _frame in v] for v in self._views]

    def frames(self, slot: int) -> memoryview:
        return self._frames[slot]

    def views(self, slot: int, plain_len: int) -> list[tuple[memoryview, memoryview]]:
        return self._views[slot] if plain_len == self._full else block_views(self._frames[slot], plain_len)

    def plain(self, slot: int, plain_len: int) -> list[memoryview]:
        """The plaintext views alone, for readv/writev (which never change the list they are given)."""
        return self._plain[slot] if plain_len == self._full else plain_views(self._frames[slot], plain_len)

    def release(self) -> None:
        self._views.clear()
        self._plain.clear()
        for view in self._frames:
            with contextlib.suppress(BufferError):
                view.release()
        self._frames.clear()


_lingering: list[SharedMemory] = []


def _close_segment(shm: SharedMemory) -> None:
    """Unmap ``shm`` once no view of it is left (a view may still sit in a finished event)."""
    _lingering.append(shm)
    for seg in list(_lingering):
        try:
            seg.close()
        except BufferError:
            continue
        _lingering.remove(seg)


class InlineRing:
    """``--workers 0``: the batch is processed at submit time, in this process."""

    chained = True  # batches are processed in order here, so the CRC simply runs on

    def __init__(self, cipher: BlockCipher, batch: int, depth: int = 2, crc: int = 0) -> None:
        self.depth = depth
        self._crc = crc  # a resumed transfer's runs on from the kept bytes' CRC
        self._cipher = cipher
        self._mem = _SlotMemory(memoryview(bytearray(slot_size(batch) * depth)), batch, depth)
        self._done: collections.deque[tuple[int, int, int]] = collections.deque()
        self.on_failure: Callable[[M2YError], None] | None = None
        self.verified = 0

    def frames(self, slot: int) -> memoryview:
        return self._mem.frames(slot)

    def plain(self, slot: int, plain_len: int) -> list[memoryview]:
        return self._mem.plain(slot, plain_len)

    def submit(self, slot: int, op: int, first: int, plain_len: int) -> None:
        """Process at once: a bad block raises here, before anything else is received."""
        self._crc = process_batch(self._cipher, op, self.frames(slot), first, plain_len, self._crc,
                                  self._mem.views(slot, plain_len))
        self._done.append((slot, self._crc, plain_len))
        self.verified += 1

    async def result(self) -> tuple[int, int, int]:
        return self._done.popleft()

    def ready(self) -> bool:
        return bool(self._done)

    def in_flight(self) -> int:
        return len(self._done)

    def close(self) -> None:
        self._done.clear()


# -- worker processes -----------------------------------------------------------------------------


def _worker_main(pipe: Pipe) -> None:
    """A worker: attach segments by name, process batches, answer with CRCs. Ends on EOF.

    It ignores SIGINT and SIGTERM: a Ctrl-C reaches the whole foreground process group, and a
    service manager's stop the whole cgroup. Had the workers died there, every transfer under way
    would have failed (a worker died) and lost what it received, where a stop keeps it. The owner
    ends them by closing their pipes (``WorkerPool.close``), and kills what lingers."""
    import signal
    from multiprocessing.shared_memory import SharedMemory

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    segments: dict[str, tuple[SharedMemory, _SlotMemory]] = {}
    ciphers: dict[bytes, BlockCipher] = {}
    while True:
        try:
            msg = pipe.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "forget":
            entry = segments.pop(msg[1], None)
            if entry is not None:
                entry[1].release()
                _close_segment(entry[0])
            ciphers.pop(msg[2], None)
            continue
        _, seq, name, batch, depth, keysalt, slot, op, first, plain_len = msg
        try:
            if name not in segments:
                # Spawned workers share the creator's resource tracker, which the creator's
                # unlink() settles; the worker only maps and unmaps.
                shm = SharedMemory(name=name)
                segments[name] = (shm, _SlotMemory(shm.buf, batch, depth))  # type: ignore[arg-type]
            mem = segments[name][1]
            cipher = ciphers.get(keysalt)
            if cipher is None:
                cipher = ciphers[keysalt] = BlockCipher(keysalt[:16], keysalt[16:])
            crc = process_batch(cipher, op, mem.frames(slot), first, plain_len, 0, mem.views(slot, plain_len))
            reply: tuple[int, int, str | None, int] = (seq, crc, None, 0)
        except RemoteProtocolError as exc:
            reply = (seq, 0, exc.reason, int(exc.code))
        except Exception as exc:  # report, never die with a batch held
            reply = (seq, 0, f"worker error: {type(exc).__name__}: {exc}", int(RefuseCode.INTERNAL))
        try:
            pipe.send(reply)
        except OSError:  # the parent is gone (shutting down): nothing to answer to
            break


@dataclass
class _Worker:
    process: Any
    pipe: Pipe
    busy: int = 0


class WorkerPool:
    """N worker processes shared by every transfer of a server or client."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("a WorkerPool needs at least one worker; use InlineRing for 0")
        import atexit
        import multiprocessing
        import multiprocessing.util  # registers its exit handler now, so that ours (later) runs before it

        self._ctx = multiprocessing.get_context("spawn")  # no inherited sockets, loops or keys of the parent
        # Before multiprocessing's own exit handler (atexit runs the last registered first): that one
        # would wait without limit for workers that ignore its SIGTERM; closed pipes end them.
        atexit.register(self.close)
        self._workers: list[_Worker] = []
        self._pending: dict[int, tuple[asyncio.Future[tuple[int, str | None, int]], _Worker]] = {}
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        for _ in range(workers):
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True, name="m2y-worker")
        proc.start()
        child.close()
        worker = _Worker(proc, parent)
        if self._loop is not None:
            self._loop.add_reader(parent.fileno(), self._on_readable, worker)
        return worker

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for w in self._workers:
            loop.add_reader(w.pipe.fileno(), self._on_readable, w)

    @property
    def size(self) -> int:
        return len(self._workers)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _on_readable(self, worker: _Worker) -> None:
        try:
            while worker.pipe.poll():
                seq, crc, error, code = worker.pipe.recv()
                worker.busy -= 1
                entry = self._pending.pop(seq, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result((crc, error, code))
        except (EOFError, OSError):
            self._replace(worker)

    def _replace(self, dead: _Worker) -> None:
        """A worker died: fail what it held, start another in its place."""
        assert self._loop is not None
        self._loop.remove_reader(dead.pipe.fileno())
        dead.pipe.close()
        dead.process.join(0)  # reap it if it is gone already; never block the loop
        for seq, (fut, w) in list(self._pending.items()):
            if w is dead:
                del self._pending[seq]
                if not fut.done():
                    fut.set_exception(WorkerDied("a worker process died while processing a batch"))
        index = self._workers.index(dead)
        self._workers[index] = self._spawn()

    def submit(self, name: str, batch: int, depth: int, keysalt: bytes, slot: int, op: int, first: int,
               plain_len: int) -> asyncio.Future[tuple[int, str | None, int]]:
        assert self._loop is not None, "attach() the pool to the running loop first"
        worker = min(self._workers, key=lambda w: w.busy)
        self._seq += 1
        fut: asyncio.Future[tuple[int, str | None, int]] = self._loop.create_future()
        self._pending[self._seq] = (fut, worker)
        worker.busy += 1
        try:
            worker.pipe.send(("job", self._seq, name, batch, depth, keysalt, slot, op, first, plain_len))
        except (BrokenPipeError, OSError):
            self._replace(worker)
        return fut

    def forget(self, name: str, keysalt: bytes) -> None:
        for w in self._workers:
            try:
                w.pipe.send(("forget", name, keysalt))
            except (BrokenPipeError, OSError):
                continue

    def close(self) -> None:
        for w in self._workers:
            if self._loop is not None:
                with contextlib.suppress(RuntimeError, ValueError, OSError):  # a loop closed already (at exit)
                    self._loop.remove_reader(w.pipe.fileno())
            w.pipe.close()
        for w in self._workers:
            w.process.join(2)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(2)
        self._workers.clear()

    def ring(self, cipher_key: bytes, salt: bytes, batch: int, depth: int = DEFAULT_DEPTH) -> PoolRing:
        return PoolRing(self, cipher_key + salt, batch, depth)


class PoolRing:
    """One transfer's slots in shared memory, processed by a ``WorkerPool``."""

    chained = False  # workers finish batches in any order: the owner combines batch CRCs

    def __init__(self, pool: WorkerPool, keysalt: bytes, batch: int, depth: int) -> None:
        self.depth = depth
        self._pool = pool
        self._keysalt = keysalt
        self._batch = batch
        from multiprocessing.shared_memory import SharedMemory

        size = slot_size(batch) * depth
        self._shm = SharedMemory(name=f"m2y-{os.getpid()}-{secrets.token_hex(6)}", create=True, size=size)
        try:  # take the pages now: a full /dev/shm must be an error here, not a SIGBUS in a worker
            os.posix_fallocate(self._shm._fd, 0, size)  # type: ignore[attr-defined]
        except OSError as exc:
            self._shm.close()
            self._shm.unlink()
            raise M2YError(f"cannot reserve {size} bytes of shared memory in /dev/shm: {exc.strerror}") from None
        self._mem = _SlotMemory(self._shm.buf, batch, depth)  # type: ignore[arg-type]
        self.on_failure: Callable[[M2YError], None] | None = None
        self.verified = 0
        self._queue: collections.deque[tuple[int, int, asyncio.Future[tuple[int, str | None, int]]]] = (
            collections.deque()
        )

    def frames(self, slot: int) -> memoryview:
        return self._mem.frames(slot)

    def plain(self, slot: int, plain_len: int) -> list[memoryview]:
        return self._mem.plain(slot, plain_len)

    def submit(self, slot: int, op: int, first: int, plain_len: int) -> None:
        fut = self._pool.submit(self._shm.name, self._batch, self.depth, self._keysalt, slot, op, first, plain_len)
        fut.add_done_callback(self._check)
        self._queue.append((slot, plain_len, fut))

    def _check(self, fut: asyncio.Future[tuple[int, str | None, int]]) -> None:
        """Tell the owner at once when a batch fails: it may be blocked on the socket, not on us."""
        if fut.cancelled():
            return
        if fut.exception() is None and fut.result()[1] is None:
            self.verified += 1
        if self.on_failure is None:
            return
        exc = fut.exception()
        if isinstance(exc, M2YError):
            self.on_failure(exc)
        elif exc is None and fut.result()[1] is not None:
            _, error, code = fut.result()
            self.on_failure(RemoteProtocolError(str(error), RefuseCode(code)))

    async def result(self) -> tuple[int, int, int]:
        """The oldest batch's result. A cancel while it waits leaves that batch first in line, its
        worker still on it (awaiting the future itself would cancel it, and the batch after it
        would then be taken, and written, in its place)."""
        slot, plain_len, fut = self._queue[0]
        if not fut.done():
            await asyncio.wait([fut])
        self._queue.popleft()
        crc, error, code = fut.result()
        if error is not None:
            raise RemoteProtocolError(error, RefuseCode(code))
        return slot, crc, plain_len

    def ready(self) -> bool:
        return bool(self._queue) and self._queue[0][2].done()

    def in_flight(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        for _, _, fut in self._queue:
            fut.cancel()
        self._queue.clear()
        self._pool.forget(self._shm.name, self._keysalt)
        self._mem.release()
        self._shm.unlink()
        _close_segment(self._shm)


def make_ring(pool: WorkerPool | None, cipher_key: bytes, salt: bytes, batch: int, crc: int = 0) -> Ring:
    """``crc``: the CRC of the file's bytes before the first batch (a resumed transfer's kept ones),
    from which a chained ring's running CRC goes on; an unchained ring's owner joins batch CRCs to it."""
    if pool is None:
        return InlineRing(BlockCipher(cipher_key, salt), batch, crc=crc)
    return pool.ring(cipher_key, salt, batch)


__all__: list[str] = [
    "DECRYPT",
    "ENCRYPT",
    "InlineRing",
    "PoolRing",
    "Ring",
    "WorkerDied",
    "WorkerPool",
    "block_views",
    "default_workers",
    "make_ring",
    "process_batch",
]
