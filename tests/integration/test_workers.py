"""The worker pool (``--workers N``) between real processes: same bytes, same refusals, and a dead
worker fails only its transfer."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from engine import meta
from engine.blocks import BLOCK_SIZE, TAG_LEN
from engine.errors import RefuseCode

from .helpers import (
    ServerProcess,
    handshake,
    make_file,
    payload_fields,
    run_send,
    sealed_frames,
    start_server,
    target,
    wait_until,
)


@pytest.mark.parametrize("size", [0, 65537, 5_000_000])
def test_transfer_with_workers_on_both_sides(root: Path, size: int) -> None:
    srv = start_server(root, "--workers", "2")
    try:
        data, meta_path = make_file(root, size)
        result = run_send(root, srv.port, meta_path, extra=("--workers", "1"))
        assert result.returncode == 0, result.stderr
        fields = meta.read_meta_file(meta_path.with_suffix(".done"))
        assert target(root, fields).read_bytes() == data.read_bytes()
    finally:
        assert srv.stop() == 0
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"m2y-{srv.proc.pid}-")]


def test_tampered_block_with_workers(root: Path) -> None:
    srv = start_server(root, "--workers", "1")
    try:
        payload, fields = payload_fields(40 * BLOCK_SIZE)
        hs = handshake(root, srv.port, fields)
        frames = bytearray(sealed_frames(hs.cipher, payload))
        frames[33 * (BLOCK_SIZE + TAG_LEN) + 1] ^= 0x80
        with hs.client as c:
            hs.send_frames(bytes(frames))
            code, reason = c.read_refusal()
        assert code == RefuseCode.BAD_BLOCK and "block 33" in reason
        assert wait_until(lambda: not target(root, fields, ".part").exists())
        assert not target(root, fields).exists()
    finally:
        assert srv.stop() == 0


def _workers_of(pid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone or a zombie between the two calls
            continue
    return found


def test_dead_worker_fails_the_transfer_and_the_server_goes_on(root: Path) -> None:
    srv = start_server(root, "--workers", "1")
    try:
        assert wait_until(lambda: len(_workers_of(srv.proc.pid)) == 1)
        (worker,) = _workers_of(srv.proc.pid)
        payload, fields = payload_fields(64 * BLOCK_SIZE)
        hs = handshake(root, srv.port, fields)
        frames = sealed_frames(hs.cipher, payload)
        worker.send_signal(signal.SIGSTOP)  # batches now queue up at the worker ...
        try:
            hs.client.sendall(frames[: 40 * (BLOCK_SIZE + TAG_LEN)])
            time.sleep(0.5)
        finally:
            worker.send_signal(signal.SIGKILL)  # ... and it dies holding them
        code, reason = hs.client.read_refusal()
        hs.client.close()
        assert code == RefuseCode.INTERNAL and "worker" in reason
        assert wait_until(lambda: not target(root, fields, ".part").exists())
        assert not target(root, fields).exists()
        # A new worker took its place, and the next transfer goes through.
        assert wait_until(lambda: len(_workers_of(srv.proc.pid)) == 1 and worker.pid not in
                          [p.pid for p in _workers_of(srv.proc.pid)])
        _data, meta_path = make_file(root, 3 * BLOCK_SIZE + 1)
        result = run_send(root, srv.port, meta_path)
        assert result.returncode == 0, result.stderr
    finally:
        assert srv.stop() == 0


@contextlib.contextmanager
def _one_worker(srv: ServerProcess) -> Iterator[psutil.Process]:
    """The server's only worker process, left running (SIGCONT) whatever the test did to it."""
    kids = [p for p in psutil.Process(srv.proc.pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(kids) == 1
    try:
        yield kids[0]
    finally:
        with contextlib.suppress(psutil.Error):
            kids[0].send_signal(signal.SIGCONT)


def test_a_timeout_while_a_worker_stalls_keeps_the_batches_in_order(root: Path) -> None:
    """The idle timeout fires while the server waits on a stalled worker (SIGSTOP): the batch it
    waits for must stay first in line, not be skipped, so what is kept is the file's first bytes
    in order; the drain gives the worker DRAIN_WAIT s and then keeps what was written, without
    hanging; and the resend completes. (A cancel used to drop the awaited batch: the next one was
    written at its offset, and the resend failed BAD_CRC.)"""
    srv = start_server(root, "--workers", "1", "--idle-timeout", "2")
    batch = 16 * (BLOCK_SIZE + TAG_LEN)
    try:
        size = 10 * 2**20
        data, meta_path = make_file(root, size)
        fields = meta.read_meta_file(meta_path)
        hs = handshake(root, srv.port, fields)
        frames = sealed_frames(hs.cipher, data.read_bytes())
        part = target(root, fields, ".part")
        with _one_worker(srv) as worker:
            hs.client.sendall(frames[: 4 * batch])
            time.sleep(0.5)  # the worker verifies batches 0-3 (some are written only when their slot is needed)
            worker.send_signal(signal.SIGSTOP)
            hs.client.sendall(frames[4 * batch : 8 * batch])  # 0-3 are written, 4-7 wait on the stopped worker
            assert wait_until(lambda: "for a resend" in srv.log() or "REFUSED" in srv.log(), timeout=15), srv.log()
            kept = int(re.search(r"kept (\d+) B for a resend", srv.log()).group(1))  # type: ignore[union-attr]
            assert kept == 4 * 2**20
            assert part.read_bytes() == data.read_bytes()[:kept]  # in order: the file's first bytes
            worker.send_signal(signal.SIGCONT)
            hs.client.close()
            again = run_send(root, srv.port, meta_path, extra=("--retries", "0"))
            assert again.returncode == 0, again.stderr + srv.log()
            assert f"resumed at {kept}" in again.stdout
            assert target(root, fields).read_bytes() == data.read_bytes()
    finally:
        srv.stop()


def test_a_bad_batch_found_while_draining_keeps_nothing(root: Path) -> None:
    """The client goes away while its last batches wait at a stalled worker, one of them tampered:
    the drain writes the good ones in order, then finds the bad one, and then nothing may be kept
    (a part is kept only for a sender whose bytes all held), although 4 MiB were written before."""
    srv = start_server(root, "--workers", "1")
    batch = 16 * (BLOCK_SIZE + TAG_LEN)
    try:
        data, meta_path = make_file(root, 10 * 2**20)
        fields = meta.read_meta_file(meta_path)
        hs = handshake(root, srv.port, fields)
        frames = bytearray(sealed_frames(hs.cipher, data.read_bytes()))
        frames[6 * batch + 2 * (BLOCK_SIZE + TAG_LEN) + 5] ^= 0x01  # block 98, in the 7th batch
        with _one_worker(srv) as worker:
            hs.client.sendall(frames[: 4 * batch])
            time.sleep(0.5)  # batches 0-3 verified (and written as their slots are needed)
            worker.send_signal(signal.SIGSTOP)
            hs.client.sendall(frames[4 * batch : 7 * batch])  # 4, 5 and the bad 6 wait on the stopped worker
            hs.client.close()
            time.sleep(0.2)  # the server sees the close first: the drain then waits for the worker (DRAIN_WAIT 1 s)
            worker.send_signal(signal.SIGCONT)
            assert wait_until(lambda: "REFUSED" in srv.log() or "for a resend" in srv.log(), timeout=15), srv.log()
            assert "REFUSED BAD_BLOCK: block 98 failed authentication" in srv.log(), srv.log()
            assert "for a resend" not in srv.log()
            assert wait_until(lambda: not target(root, fields, ".part").exists())
            assert not target(root, fields, ".resume").exists() and not target(root, fields, ".meta").exists()
            again = run_send(root, srv.port, meta_path, extra=("--retries", "0"))
            assert again.returncode == 0, again.stderr + srv.log()
            assert "resumed" not in again.stdout
            assert target(root, fields).read_bytes() == data.read_bytes()
    finally:
        srv.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signalled_to_the_whole_group_keeps_what_arrived(root: Path, sig: signal.Signals) -> None:
    """Ctrl-C reaches the whole foreground process group, a service manager's stop the whole cgroup:
    the workers got the signal too and died, so every transfer under way failed (a worker died) and
    lost what it had received. They ignore it now; the server stops as if signalled alone."""
    import subprocess

    from .helpers import _LISTENING, M2Y

    log = root.parent / "serve-group.log"
    with open(log, "w") as err:
        srv = subprocess.Popen([*M2Y, "serve", "--root", str(root), "--port", "0", "--workers", "1"],
                               stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    send = None
    try:
        assert srv.stdout is not None
        m = _LISTENING.search(srv.stdout.readline())
        assert m, log.read_text()
        _, meta_path = make_file(root, 256 * 2**20)
        fields = meta.read_meta_file(meta_path)
        send = subprocess.Popen([*M2Y, "send", str(meta_path), "--root", str(root), "--port", m.group(1),
                                 "--retries", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        part = target(root, fields, ".part")
        assert wait_until(lambda: part.exists() and part.stat().st_size >= 8 * 2**20, timeout=30)
        workers = psutil.Process(srv.pid).children()
        assert workers
        os.killpg(srv.pid, sig)  # the server and its worker alike, mid-file
        assert srv.wait(20) == 0, log.read_text()
        _out, err_text = send.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(srv.pid, signal.SIGKILL)
        srv.wait(10)
        if send is not None:
            send.kill()
            send.wait(10)
    text = log.read_text()
    kept = re.search(r"CANCELLED \(server stopping\); kept (\d+) B for a resend", text)
    assert kept and 8 * 2**20 <= int(kept.group(1)) < 256 * 2**20, text
    assert "worker process died" not in text and "Traceback" not in text, text
    assert f"server refused: server stopping: the {kept.group(1)} bytes it received are kept" in err_text, err_text
    assert wait_until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers))
