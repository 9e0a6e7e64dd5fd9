"""Faults on the server's side (a slow or full disk), injected into a server running in this process.

The server is the real ``engine.server.Server`` on its own event loop in a thread, on 127.0.0.1 and a
free port; the clients are real ``m2y send`` processes or the hand-speaking ``RawClient``. Only the
fault (``os.fsync`` or ``os.writev``) is replaced, for the time of one test. A fault that must
outlive a stop (a hung disk) is injected into a real ``m2y serve`` process through a wrapper.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import keptpart, meta
from engine.blocks import BLOCK_SIZE, TAG_LEN
from engine.crc import crc64
from engine.errors import RefuseCode
from engine.protocol import Ack, FileCRC
from engine.server import Server, ServerConfig

from .helpers import handshake, make_file, payload_fields, run_send, sealed_frames, start_server, target, wait_until


class InProcessServer:
    def __init__(self, root: Path, **config: Any) -> None:
        self.server = Server(ServerConfig(root=root, host="127.0.0.1", port=0, **config))
        self.server.listen()
        self.port = self.server.port
        import uvloop  # the loop m2y serve runs on: socket errors surface where they do in production

        self.loop = uvloop.new_event_loop()
        self._stop: asyncio.Event | None = None
        ready = threading.Event()

        async def main() -> None:
            self._stop = asyncio.Event()
            ready.set()
            await self.server.serve_forever(self._stop)

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(20)
        assert not self.thread.is_alive()
        self.loop.close()


@pytest.fixture
def inproc(root: Path) -> Iterator[InProcessServer]:
    srv = InProcessServer(root, handshake_timeout=1.0, idle_timeout=1.0)
    try:
        yield srv
    finally:
        srv.stop()


def _names(fd: int, name: str) -> bool:
    """Is ``fd`` open on a file called ``name`` (for fault injection into one transfer's .part)?"""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(name)
    except OSError:
        return False


def test_a_slow_disk_is_not_blamed_on_the_client(root: Path, inproc: InProcessServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """begin() fsyncs the .meta and its folder; on a disk that takes 0.6 s per fsync that is longer
    than the 1 s handshake deadline and the 1 s idle timeout, which measure the client, not the disk."""
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.6)
        real_fsync(fd)

    data, meta_path = make_file(root, 100_000)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    result = run_send(root, inproc.port, meta_path, timeout=60)
    monkeypatch.undo()
    assert result.returncode == 0, result.stderr + result.stdout
    assert "ACK" in result.stdout
    done = meta_path.with_suffix(".done")
    assert target(root, meta.read_meta_file(done)).read_bytes() == data.read_bytes()


def test_disk_full_mid_file_is_refused_as_no_space(root: Path, inproc: InProcessServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    payload, fields = payload_fields(3 * 2**20 + 5)  # four batches: the second one meets a full disk
    real_writev = os.writev
    calls = [0]

    def full_writev(fd: int, buffers: Any) -> int:
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", full_writev)
    hs = handshake(root, inproc.port, dict(fields))
    with hs.client as c:
        hs.send_frames(sealed_frames(hs.cipher, payload))
        c.send_event(FileCRC(hs.cipher.seal_crc(crc64(payload))))
        code, reason = c.read_refusal()
    monkeypatch.undo()
    assert code == RefuseCode.NO_SPACE and "No space left" in reason
    assert wait_until(lambda: not any(target(root, fields, s).exists() for s in (".part", ".meta", ".data")))
    assert wait_until(lambda: inproc.server.storage.reserved() == 0)


def test_a_stalled_disk_write_stalls_only_its_own_transfer(root: Path, inproc: InProcessServer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Transfer A's disk stalls (its first write takes 0.15 s, the next ones block until released):
    after the first, A's writes go to a thread, and a whole other transfer B goes through meanwhile.
    With every write on the event loop, B would wait for A's disk and fail its 5 s timeout."""
    payload, fields = payload_fields(4 * 2**20 + 5)
    part_name = target(root, fields, ".part").name
    real_writev = os.writev
    release = threading.Event()
    calls = [0]

    def stalling_writev(fd: int, buffers: Any) -> int:
        is_a = _names(fd, part_name)
        if is_a:
            calls[0] += 1
            if calls[0] == 1:
                time.sleep(0.15)
            else:
                release.wait(20)
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", stalling_writev)
    hs = handshake(root, inproc.port, dict(fields))
    sender = threading.Thread(target=hs.send_frames, args=(sealed_frames(hs.cipher, payload),), daemon=True)
    sender.start()
    try:
        assert wait_until(lambda: calls[0] >= 2, timeout=10)  # A is stuck in its second write
        data, meta_path = make_file(root, 100_000)
        other = run_send(root, inproc.port, meta_path, timeout=30, extra=("--timeout", "5"))
        assert not release.is_set()
        assert other.returncode == 0, other.stderr
        assert target(root, meta.read_meta_file(meta_path.with_suffix(".done"))).read_bytes() == data.read_bytes()
    finally:
        release.set()
    sender.join(20)
    with hs.client as c:
        c.send_event(FileCRC(hs.cipher.seal_crc(crc64(payload))))
        assert isinstance(c.next_event(), Ack)
    monkeypatch.undo()
    assert target(root, fields).read_bytes() == payload


def test_a_resend_reset_before_its_reply_keeps_the_kept_part(root: Path, inproc: InProcessServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept part, then a resend whose connection is reset (RST) while the server is still in
    begin(): that must count as the client going away again (the part stays kept), not as a server
    fault (which removes it). Here the reset usually surfaces at the next recv; when it surfaces at
    the REPLY's send instead (a review's experiment on a real server), server.py's ConnectionError
    case does the same."""
    import socket
    import struct

    from engine.protocol import Envelope, Header

    from .helpers import sealed_request

    payload, fields = payload_fields(6 * 2**20)
    hs = handshake(root, inproc.port, dict(fields))
    hs.client.sendall(sealed_frames(hs.cipher, payload)[: 5 * 16 * (65536 + 16)])
    part = target(root, fields, ".part")
    assert wait_until(lambda: part.exists() and part.stat().st_size >= 2**20)
    hs.client.close()
    assert wait_until(lambda: bool(inproc.server.storage._partial))
    kept = part.stat().st_size
    storage = inproc.server.storage
    real_begin = storage.begin

    def slow_begin(f: dict[str, Any]) -> Any:
        time.sleep(0.5)  # the client resets meanwhile
        return real_begin(f)

    monkeypatch.setattr(storage, "begin", slow_begin)
    sent = meta.request(fields)
    fh, th, env = sealed_request(root, sent)
    sock = socket.create_connection(("127.0.0.1", inproc.port), timeout=10)
    from engine.protocol import Connection, Role

    conn = Connection(Role.CLIENT)
    for chunk in conn.send(Header(len(env), fh, th)) + conn.send(Envelope(env)):
        sock.sendall(chunk)
    time.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    assert wait_until(lambda: bool(storage._partial) and not storage._active, timeout=10)
    monkeypatch.undo()
    assert part.stat().st_size == kept
    again = handshake(root, inproc.port, dict(fields))
    assert again.first == kept // 65536
    again.client.close()


@pytest.mark.parametrize("short", [False, True])
def test_a_disk_error_while_writing_what_arrived_before_a_break_keeps_nothing(
        root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, short: bool) -> None:
    """The client goes away with two batches in the server's ring; writing the second fails (EIO,
    or a short write and then ENOSPC): the log says so, and the part is removed, not kept (with a
    torn batch it could not be resumed; protocol.md §5: a failure of the server's disk removes)."""
    batch = 16 * (BLOCK_SIZE + TAG_LEN)
    srv = InProcessServer(root, idle_timeout=5.0)
    try:
        data, meta_path = make_file(root, 4 * 2**20)
        fields = meta.read_meta_file(meta_path)
        hs = handshake(root, srv.port, fields)
        frames = sealed_frames(hs.cipher, data.read_bytes())
        part = target(root, fields, ".part")
        real, calls = os.writev, []

        def faulty(fd: int, views: list[Any]) -> int:
            calls.append(fd)
            if len(calls) == 2:
                if short:
                    return real(fd, views[:3])
                raise OSError(errno.EIO, "Input/output error")
            if len(calls) == 3 and short:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, views)

        monkeypatch.setattr(os, "writev", faulty)
        with caplog.at_level("INFO", logger="m2y.server"):
            hs.client.sendall(frames[: 2 * batch])  # two whole batches: the second waits in the ring
            assert wait_until(lambda: part.exists() and part.stat().st_size >= 2**20)
            hs.client.close()
            assert wait_until(lambda: any(" B/s " in r.getMessage() or "MB/s" in r.getMessage()
                                          for r in caplog.records))
        monkeypatch.undo()
        messages = [r.getMessage() for r in caplog.records]
        assert any("writing what arrived before the break failed" in m and "nothing is kept" in m
                   for m in messages), messages
        assert not any("for a resend" in m for m in messages), messages
        assert wait_until(lambda: not part.exists())
    finally:
        srv.stop()


# A server stopping while transfers are under way (found by a review helper, 2026-11-26).


@pytest.mark.parametrize("fails", [False, True])
@pytest.mark.parametrize("workers", [0, 1])
def test_a_stop_during_a_threaded_write(root: Path, monkeypatch: pytest.MonkeyPatch, workers: int, fails: bool) -> None:
    """The stop comes while a batch's write, in a thread (the disk was slow once), is waited out.
    If the write completes, the record kept is of the bytes on disk, that batch included; if it
    fails with nothing written, nothing is kept (the next batches would land at its offset)."""
    payload, fields = payload_fields(6 * 2**20)
    part_name = target(root, fields, ".part").name
    real_writev = os.writev
    calls = [0]
    in_third = threading.Event()

    def slow_writev(fd: int, buffers: Any) -> int:
        ours = _names(fd, part_name)
        if ours:
            calls[0] += 1
            if calls[0] == 1:
                time.sleep(0.15)  # slow: from now on writes go to a thread
            elif calls[0] == 3:
                in_third.set()
                time.sleep(0.5)  # the stop arrives meanwhile
                if fails:
                    raise OSError(errno.EIO, "Input/output error")  # nothing of this batch written
        return real_writev(fd, buffers)

    srv = InProcessServer(root, idle_timeout=30.0, workers=workers)
    monkeypatch.setattr(os, "writev", slow_writev)
    hs = handshake(root, srv.port, dict(fields))
    hs.client.sendall(sealed_frames(hs.cipher, payload))
    assert in_third.wait(10), calls
    srv.stop()
    monkeypatch.undo()
    hs.client.close()
    part = target(root, fields, ".part")
    if fails:
        assert not target(root, fields, ".resume").exists() and not part.exists()  # a disk error keeps nothing
        return
    dir_fd = os.open(part.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        rec = keptpart.read(dir_fd, part.name.removesuffix(".part"))
    finally:
        os.close(dir_fd)
    assert rec is not None
    on_disk = part.read_bytes()[: rec.written]
    assert on_disk == payload[: rec.written]
    assert rec.crc == crc64(on_disk), f"record CRC {rec.crc:016x} is not the CRC of its {rec.written} bytes"
    assert rec.written >= 3 * 2**20  # the batch whose write the stop waited out counts


def test_a_stop_during_a_commit_whose_fsync_fails_keeps_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload, fields = payload_fields(2 * 2**20)
    part_name = target(root, fields, ".part").name
    real_fsync = os.fsync
    entered = threading.Event()
    stopping_when_failed: list[bool] = []

    def bad_fsync(fd: int) -> None:
        ours = _names(fd, part_name)
        if ours and threading.current_thread() is not threading.main_thread() and not entered.is_set():
            entered.set()
            time.sleep(0.5)
            stopping_when_failed.append(srv.server.stopping)  # the stop came during the commit, not after
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    srv = InProcessServer(root, idle_timeout=30.0)
    monkeypatch.setattr(os, "fsync", bad_fsync)
    hs = handshake(root, srv.port, dict(fields))
    hs.send_frames(sealed_frames(hs.cipher, payload))
    hs.client.send_event(FileCRC(hs.cipher.seal_crc(crc64(payload))))
    assert entered.wait(10)
    srv.stop()
    monkeypatch.undo()
    hs.client.close()
    assert stopping_when_failed == [True]
    assert not target(root, fields, ".resume").exists() and not target(root, fields, ".part").exists()
    assert not target(root, fields).exists()


def test_a_stop_while_a_resend_is_in_begin_keeps_the_kept_part(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from engine.protocol import Connection, Envelope, Header, Role

    from .helpers import sealed_request

    payload, fields = payload_fields(6 * 2**20)
    srv = InProcessServer(root, idle_timeout=30.0)
    hs = handshake(root, srv.port, dict(fields))
    hs.client.sendall(sealed_frames(hs.cipher, payload)[: 5 * 16 * (65536 + 16)])
    part = target(root, fields, ".part")
    assert wait_until(lambda: part.exists() and part.stat().st_size >= 2**20)
    hs.client.close()
    storage = srv.server.storage
    assert wait_until(lambda: bool(storage._partial))
    assert wait_until(lambda: target(root, fields, ".resume").exists())
    real_begin = storage.begin
    entered = threading.Event()

    def slow_begin(f: dict[str, Any]) -> Any:
        entered.set()
        time.sleep(0.5)
        return real_begin(f)

    monkeypatch.setattr(storage, "begin", slow_begin)
    fh, th, env = sealed_request(root, meta.request(fields))
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    conn = Connection(Role.CLIENT)
    for chunk in conn.send(Header(len(env), fh, th)) + conn.send(Envelope(env)):
        sock.sendall(chunk)
    assert entered.wait(10)
    srv.stop()
    sock.close()
    assert part.exists() and part.stat().st_size >= 2**20, "the stop removed the kept part a resend had taken over"
    assert target(root, fields, ".resume").exists()


def test_a_checkpoint_whose_fdatasync_fails_taints_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first checkpoint's fdatasync reports EIO (a lost writeback). On Linux the error is reported
    once per open file description, and the checkpoint's fd is a dup of the transfer's: the commit's
    own fsync would then return 0. So the failure must stick: no later record, no ACK, the transfer
    refused INTERNAL at once, nothing kept."""
    from engine.protocol import Blocks
    from engine.protocol import Refused as RefusedEvent

    payload, fields = payload_fields(6 * 2**20)
    part_name = target(root, fields, ".part").name
    real = os.fdatasync
    failed, records = [0], []

    def bad_fdatasync(fd: int) -> None:
        ours = _names(fd, part_name)
        if ours and not failed[0]:
            failed[0] += 1
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    real_write = keptpart.write

    def spy_write(dir_fd: int, stem: str, record: keptpart.Record) -> None:
        records.append((failed[0], record.written))
        real_write(dir_fd, stem, record)

    monkeypatch.setattr(os, "fdatasync", bad_fdatasync)
    monkeypatch.setattr(keptpart, "write", spy_write)
    srv = InProcessServer(root, idle_timeout=30.0, checkpoint=0.05)
    try:
        hs = handshake(root, srv.port, dict(fields))
        frames = sealed_frames(hs.cipher, payload)
        step = 16 * (65536 + 16)
        try:
            for b, i in enumerate(range(0, len(frames), step)):
                hs.client.send_event(Blocks(16 * b, 16, memoryview(frames[i:i + step])))
                time.sleep(0.15)
            hs.client.send_event(FileCRC(hs.cipher.seal_crc(crc64(payload))))
        except OSError:
            pass  # refused while sending: the refusal is read next
        ev = hs.client.next_event()
    finally:
        srv.stop()
    assert failed[0] == 1
    assert isinstance(ev, RefusedEvent) and ev.code == RefuseCode.INTERNAL and "I/O error" in ev.reason, ev
    assert [n for f, n in records if f] == [], records  # no record after the failure
    assert not target(root, fields, ".resume").exists() and not target(root, fields, ".part").exists()


def test_a_slow_checkpoint_record_does_not_stall_the_event_loop(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """keptpart.write (two fsyncs) must not run under Incoming._lock, which suspend()/abort() take on
    the event loop: a disk slow on those fsyncs would stall every connection, not only this one."""
    from engine.protocol import Blocks

    payload, fields = payload_fields(4 * 2**20)
    real_write = keptpart.write
    in_write = threading.Event()

    def slow_write(dir_fd: int, stem: str, record: keptpart.Record) -> None:
        in_write.set()
        time.sleep(2.0)  # a slow disk: the record's fsyncs
        real_write(dir_fd, stem, record)

    monkeypatch.setattr(keptpart, "write", slow_write)
    srv = InProcessServer(root, idle_timeout=30.0, checkpoint=0.01)
    try:
        hs = handshake(root, srv.port, dict(fields))
        frames = sealed_frames(hs.cipher, payload)
        step = 16 * (65536 + 16)
        hs.client.send_event(Blocks(0, 16, memoryview(frames[:step])))
        hs.client.send_event(Blocks(16, 16, memoryview(frames[step:2 * step])))
        assert in_write.wait(10)
        hs.client.sock.close()  # the sender goes away: suspend() on the loop
        time.sleep(0.2)
        pinged = threading.Event()
        t0 = time.monotonic()
        srv.loop.call_soon_threadsafe(pinged.set)
        assert pinged.wait(10)
        lag = time.monotonic() - t0
    finally:
        srv.stop()
    assert lag < 0.5, f"the event loop was blocked {lag:.2f} s by a checkpoint's record write"


# ``m2y`` whose fsyncs of .part files never return once the file named by argv[1] exists: a hung disk.
_HUNG_DISK = """
import os, sys, threading
trigger, never = sys.argv.pop(1), threading.Event()

def hang_on_parts(real):
    def sync(fd):
        try:
            part = os.readlink(f"/proc/self/fd/{fd}").endswith(".part")
        except OSError:
            part = False
        if part and os.path.exists(trigger):
            never.wait()
        return real(fd)
    return sync

os.fsync, os.fdatasync = hang_on_parts(os.fsync), hang_on_parts(os.fdatasync)
from cli.main import main
sys.exit(main())
"""


@pytest.mark.parametrize("when", ["mid-file", "in the commit"])
def test_a_stop_on_a_hung_disk_ends_within_stop_wait_and_the_part_comes_back(root: Path, when: str) -> None:
    """The disk stops answering (fsyncs of the .part never return) mid-file, or once the whole file
    is there and its commit fsyncs it; then the server is stopped: it exits within --stop-wait
    (status 1, said in its log) instead of waiting for ever; the next server takes the part back at
    its last record (a checkpoint made before the hang: the commit keeps it until its fsync is
    done), and the resend goes on from there with identical bytes."""
    trigger = root.parent / "disk-hangs"
    command = [sys.executable, "-c", _HUNG_DISK, str(trigger)]
    srv = start_server(root, "--checkpoint", "0.1", "--stop-wait", "2", command=command)
    batch = 16 * (BLOCK_SIZE + TAG_LEN)
    data, meta_path = make_file(root, 16 * 2**20)
    fields = meta.read_meta_file(meta_path)
    record, part = target(root, fields, ".resume"), target(root, fields, ".part")
    try:
        hs = handshake(root, srv.port, fields)
        frames = sealed_frames(hs.cipher, data.read_bytes())
        for i in range(6):  # a checkpoint is looked for as batches are written, every 0.1 s here
            hs.client.sendall(frames[i * batch : (i + 1) * batch])
            time.sleep(0.15)
        assert wait_until(lambda: record.exists(), timeout=10), srv.log()
        trigger.touch()  # from now on the disk hangs
        if when == "mid-file":
            hs.client.sendall(frames[6 * batch : 10 * batch])
        else:
            hs.client.sendall(frames[6 * batch :])
            hs.client.sendall(hs.cipher.seal_crc(crc64(data.read_bytes())))  # the CRC frame (§7): the commit
        time.sleep(0.3)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            code = srv.proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the stop hung on the disk: " + srv.log()) from None
        took = time.monotonic() - started
        hs.client.close()
        assert code == 1, srv.log()
        assert took < 10, took  # --stop-wait 2, and the start-up of nothing else
        assert "the disk has not answered" in srv.log(), srv.log()
        if when == "in the commit":  # the transfer itself waited on its commit's fsync
            assert "1 transfer(s) still wait on the disk after 2 s" in srv.log(), srv.log()
    finally:
        srv.stop()
    trigger.unlink()
    again = start_server(root)
    try:
        m = re.search(r"(\d+) B kept by the previous server", again.log())
        assert m, again.log()
        kept = int(m.group(1))
        assert 0 < kept < 6 * 2**20 and part.stat().st_size == kept
        result = run_send(root, again.port, meta_path, extra=("--retries", "0"))
        assert result.returncode == 0, result.stderr + again.log()
        assert f"resumed at {kept}" in result.stdout, result.stdout
        assert target(root, fields).read_bytes() == data.read_bytes()
    finally:
        again.stop()
