"""`m2y send` tries again when the connection breaks before the ACK, and goes on where the server
stopped: real server and client processes, with a loopback proxy between them that cuts a connection."""

from __future__ import annotations

import re
import selectors
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import meta
from engine.protocol import SERVER_PREFIX

from .helpers import M2Y, ServerProcess, handshake, make_file, run_send, start_server, target, wait_until


class CuttingProxy:
    """Forwards loopback connections to ``port``; connection number k (from 0) in ``cuts`` is cut
    (a reset to the client, a close to the server) once ``cuts[k]`` bytes went from the client to
    the server; those in ``slow``
    forward at most 64 KiB per 5 ms (~13 MB/s)."""

    def __init__(self, port: int, cuts: dict[int, int], slow: frozenset[int] = frozenset(),
                 half: bool = False, eat_ack: frozenset[int] = frozenset()) -> None:
        self.port = port
        self.cuts = cuts
        self.slow = slow
        self.half = half  # a cut resets the client only: the server's side stays open, silent
        self.eat_ack = eat_ack  # these connections pass the server's REPLY, then reset the client instead of its next
        self.acks_eaten = 0
        self._held: list[socket.socket] = []
        self.connections = 0
        self.forwarded: list[int] = []  # client -> server bytes, per connection
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.listen_port = int(self._listener.getsockname()[1])
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(10)
        self._listener.close()
        for s in self._held:
            s.close()

    def down(self) -> None:
        """Stop listening: connecting is refused, as with no server."""
        self._listener.close()

    def up(self) -> None:
        """Listen again on the same port."""
        listener = socket.create_server(("127.0.0.1", self.listen_port))
        listener.settimeout(0.1)
        self._listener = listener

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # down(): wait for up()
                self._stop.wait(0.05)
                continue
            number = self.connections
            self.connections += 1
            self.forwarded.append(0)
            t = threading.Thread(target=self._pump, args=(client, number), daemon=True)
            self._threads.append(t)
            t.start()

    def _pump(self, client: socket.socket, number: int) -> None:
        limit = self.cuts.get(number)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        except OSError:
            client.close()
            return
        peer = {client: upstream, upstream: client}
        from_server = bytearray()  # for eat_ack: the server's bytes, until its REPLY is complete
        sel = selectors.DefaultSelector()
        for s in peer:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.1):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = src.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
                    if not data:
                        return
                    if src is upstream and number in self.eat_ack and len(from_server) + len(data) < SERVER_PREFIX.size:
                        from_server += data  # the REPLY's prefix, not whole yet
                    elif src is upstream and number in self.eat_ack:
                        reply = SERVER_PREFIX.size + SERVER_PREFIX.unpack_from(bytes(from_server + data))[1]
                        passing = max(reply - len(from_server), 0)
                        from_server += data[:passing]
                        if len(data) > passing:  # the next message (the ACK) is eaten
                            if passing:
                                client.sendall(data[:passing])
                            self.acks_eaten += 1
                            return
                    if src is client and number in self.slow:
                        self._stop.wait(0.005)
                    if src is client and limit is not None:
                        data = data[: max(limit - self.forwarded[number], 0)]
                    try:
                        peer[src].setblocking(True)
                        peer[src].sendall(data)
                        peer[src].setblocking(False)
                    except OSError:
                        return
                    if src is client:
                        self.forwarded[number] += len(data)
                        if limit is not None and self.forwarded[number] >= limit:
                            return  # the cut: both sides reset below
        finally:
            sel.close()
            # The client gets a reset; the server a plain close (FIN), after which it still reads
            # all that was forwarded (a reset would drop what waits in its receive buffer, making
            # what it keeps a matter of timing).
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            if self.half and limit is not None and self.forwarded[number] >= limit:
                self._held.append(upstream)
            else:
                upstream.close()


def _send(root: Path, port: int, meta_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_send(root, port, meta_path, extra=extra, timeout=120)


def test_a_cut_connection_is_tried_again_and_goes_on_where_it_broke_off(root: Path, server: ServerProcess) -> None:
    """The proxy resets the first connection after 5 MiB of a 12 MiB file; `m2y send` says so, tries
    again after --retry-wait, and the server, which kept what it had written, takes only the rest."""
    size = 12 * 2**20 + 77
    data, meta_path = make_file(root, size)
    with CuttingProxy(server.port, {0: 5 * 2**20}) as proxy:
        result = _send(root, proxy.listen_port, meta_path, "--retries", "3", "--retry-wait", "0.2")
    assert result.returncode == 0, result.stderr
    assert re.search(r"myfoto\.meta: (connection lost|the server closed).*; retry 1 of 3 in 0\.2 s", result.stderr), \
        result.stderr
    m = re.search(rf"ACK, {size} bytes, resumed at (\d+): (\d+) sent", result.stdout)
    assert m, result.stdout
    resumed_at = int(m.group(1))
    assert 0 < resumed_at <= 5 * 2**20 and resumed_at % 2**16 == 0  # whole blocks the server had written
    assert int(m.group(2)) == size - resumed_at
    assert proxy.connections >= 2 and proxy.forwarded[0] == 5 * 2**20
    assert received(root, meta_path.with_suffix(".done")).read_bytes() == data.read_bytes()
    assert meta_path.with_suffix(".done").exists() and not meta_path.exists()
    assert wait_until(lambda: f"ACK (resumed at {resumed_at} B)" in server.log())


def received(root: Path, done: Path) -> Path:
    return target(root, meta.read_meta_file(done))


def test_no_retries_leaves_a_failed_meta_whose_resend_resumes(root: Path, server: ServerProcess) -> None:
    """--retries 0: the cut ends the send with one line and a .failed; sending the .failed later
    goes on from what the server kept."""
    size = 8 * 2**20
    data, meta_path = make_file(root, size)
    with CuttingProxy(server.port, {0: 3 * 2**20}) as proxy:
        result = _send(root, proxy.listen_port, meta_path, "--retries", "0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search("FAILED: (connection lost|the server closed)", lines[0]), result.stderr
    assert lines[0].endswith("-> myfoto.failed; send myfoto.failed again later (it goes on from what the server "
                             "kept, if anything)")
    failed = meta_path.with_suffix(".failed")
    assert failed.exists() and proxy.connections == 1
    assert wait_until(lambda: "for a resend" in server.log()), server.log()
    again = _send(root, server.port, failed)
    assert again.returncode == 0, again.stderr
    assert re.search(rf"ACK, {size} bytes, resumed at [1-9]\d*: ", again.stdout), again.stdout
    assert received(root, meta_path.with_suffix(".done")).read_bytes() == data.read_bytes()


def test_a_busy_name_is_tried_again(root: Path, server: ServerProcess) -> None:
    """Another connection holds the file's name (here a client that said hello and sends nothing):
    the server refuses BUSY, and `m2y send` tries again until that connection is gone."""
    size = 300_000
    data, meta_path = make_file(root, size)
    hs = handshake(root, server.port, meta.read_meta_file(meta_path))

    def release_after_busy() -> None:
        wait_until(lambda: "REFUSED BUSY" in server.log(), timeout=30)
        hs.client.close()

    releaser = threading.Thread(target=release_after_busy, daemon=True)
    releaser.start()
    try:
        result = _send(root, server.port, meta_path, "--retries", "5", "--retry-wait", "0.3")
    finally:
        hs.client.close()
        releaser.join(35)
    assert result.returncode == 0, result.stderr
    assert "is being received right now; retry 1 of 5 in 0.3 s" in result.stderr, result.stderr
    assert f"ACK, {size} bytes in " in result.stdout  # nothing was kept: the holder sent no block
    assert received(root, meta_path.with_suffix(".done")).read_bytes() == data.read_bytes()


def _send_through_a_restart(root: Path, srv: ServerProcess, meta_path: Path, part_at_least: int,
                            restart: Callable[[ServerProcess, CuttingProxy], ServerProcess],
                            ) -> tuple[subprocess.CompletedProcess[str], ServerProcess]:
    """`m2y send` (8 retries) through a slow proxy; once the .part holds ``part_at_least`` bytes,
    ``restart(srv)`` ends the server its way and returns the new one, on the same port."""
    part = target(root, meta.read_meta_file(meta_path), ".part")
    with CuttingProxy(srv.port, {}, slow=frozenset({0})) as proxy:
        send = subprocess.Popen([*M2Y, "send", str(meta_path), "--root", str(root), "--port", str(proxy.listen_port),
                                 "--retries", "8", "--retry-wait", "0.3"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_until(lambda: part.exists() and part.stat().st_size >= part_at_least, timeout=30)
            srv = restart(srv, proxy)
            out, err = send.communicate(timeout=120)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait(5)
    return subprocess.CompletedProcess(send.args, send.returncode, out, err), srv


def test_a_server_that_comes_back_is_reached(root: Path) -> None:
    """The server dies mid-file and starts again on the same port: the tries that find no server
    are tried again too (only the first try's "connection refused" is final), and the file arrives
    whole (from its start: a crashed server's next start removes what it had of a new file)."""
    srv = start_server(root, "--idle-timeout", "5")
    size = 16 * 2**20
    data, meta_path = make_file(root, size)
    fields = meta.read_meta_file(meta_path)

    def crash(old: ServerProcess, proxy: CuttingProxy) -> ServerProcess:
        proxy.down()  # while the server is away, connecting is refused: tries meet "cannot connect"
        _kill(old)
        new = start_server(root, "--port", str(old.port), "--idle-timeout", "5")
        time.sleep(1.0)
        proxy.up()
        return new

    try:
        result, srv = _send_through_a_restart(root, srv, meta_path, 1, crash)
    finally:
        srv.stop()
    assert result.returncode == 0, result.stderr
    assert "retry 1 of 8" in result.stderr
    assert re.search(r"cannot connect to 127\.0\.0\.1:\d+: connection refused .*; retry [2-8] of 8", result.stderr), \
        result.stderr
    assert f"ACK, {size} bytes in " in result.stdout, result.stdout
    assert target(root, fields).read_bytes() == data.read_bytes()


def test_send_arguments_out_of_range_are_refused_before_anything_is_sent(root: Path) -> None:
    _, meta_path = make_file(root, 10)
    for extra, line in ((("--retries", "-1"), "--retries -1 is out of range 0..100"),
                        (("--retries", "101"), "--retries 101 is out of range 0..100"),
                        (("--retry-wait", "nan"), "--retry-wait nan is out of range 0..30 seconds"),
                        (("--retry-wait", "-0.5"), "--retry-wait -0.5 is out of range 0..30 seconds"),
                        (("--timeout", "-1"), "--timeout -1 is out of range 0.1..86400 seconds"),
                        (("--port", "99999"), "--port 99999 is out of range 1..65535")):
        result = _send(root, 9, meta_path, *extra)  # port 9: nothing is ever sent there
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"m2y send: {line}"], result.stderr
        assert meta_path.exists()  # untouched: not renamed .failed


def _kill(srv: ServerProcess) -> None:
    srv.proc.kill()
    srv.proc.wait(10)
    srv.stopped = True


def test_a_kept_part_outlives_a_server_crash(root: Path) -> None:
    """A send breaks off; the server keeps its part and records it (keptpart.py); the server is then
    killed (no clean stop) and started again: it takes the part back, and the resend of the .failed
    sends only the rest. The bytes the .part had past the record are cut off."""
    srv = start_server(root)
    size = 12 * 2**20 + 5
    data, meta_path = make_file(root, size)
    fields = meta.read_meta_file(meta_path)
    part, record = target(root, fields, ".part"), target(root, fields, ".resume")
    try:
        with CuttingProxy(srv.port, {0: 6 * 2**20}) as proxy:
            cut = _send(root, proxy.listen_port, meta_path, "--retries", "0")
        assert cut.returncode == 1, cut.stderr
        assert wait_until(lambda: "recorded on disk" in srv.log())
        kept = int(re.search(r"its (\d+) B kept for a resend, recorded on disk", srv.log()).group(1))  # type: ignore[union-attr]
        assert 2**20 <= kept <= 6 * 2**20 and record.exists() and part.stat().st_size == kept
        with part.open("ab") as f:  # bytes after the record (a write the crash cut): not vouched for
            f.write(b"x" * 1000)
        _kill(srv)
        srv = start_server(root)
        assert f"{kept} B kept by the previous server" in srv.log()
        assert part.stat().st_size == kept
        again = _send(root, srv.port, meta_path.with_suffix(".failed"))
        assert again.returncode == 0, again.stderr
        assert f"ACK, {size} bytes, resumed at {kept}: {size - kept} sent" in again.stdout
        assert target(root, fields).read_bytes() == data.read_bytes()
        assert not part.exists() and not record.exists()
    finally:
        srv.stop()


def test_a_record_that_does_not_hold_is_removed_with_its_part(root: Path) -> None:
    """A record whose .meta changed since (here: one byte of it) is not believed: the start removes
    the .part, the .meta and the record, and the resend starts afresh."""
    srv = start_server(root)
    size = 4 * 2**20
    data, meta_path = make_file(root, size)
    fields = meta.read_meta_file(meta_path)
    part, record, stored = (target(root, fields, s) for s in (".part", ".resume", ".meta"))
    try:
        with CuttingProxy(srv.port, {0: 3 * 2**20}) as proxy:
            assert _send(root, proxy.listen_port, meta_path, "--retries", "0").returncode == 1
        assert wait_until(lambda: "recorded on disk" in srv.log()) and record.exists()
        _kill(srv)
        stored.write_bytes(stored.read_bytes().replace(b'"photo"', b'"Photo"'))
        srv = start_server(root)
        assert not part.exists() and not record.exists() and not stored.exists()
        assert "kept by the previous server" not in srv.log()
        again = _send(root, srv.port, meta_path.with_suffix(".failed"))
        assert again.returncode == 0, again.stderr
        assert f"ACK, {size} bytes in " in again.stdout
        assert target(root, fields).read_bytes() == data.read_bytes()
    finally:
        srv.stop()


def test_a_connection_broken_on_the_client_side_only_is_waited_out(root: Path, server: ServerProcess) -> None:
    """Only the client's side breaks (a middlebox resets it): the server holds the old connection,
    and the name, until its idle timeout (3 s here). The tries meet BUSY meanwhile; that wait is
    not counted against --retries (1 here), and the send goes on from what was kept."""
    size = 8 * 2**20
    data, meta_path = make_file(root, size)
    with CuttingProxy(server.port, {0: 5 * 2**20}, half=True) as proxy:
        result = _send(root, proxy.listen_port, meta_path, "--retries", "1", "--retry-wait", "0.2")
    assert result.returncode == 0, result.stderr + server.log()
    assert "is being received right now; the server may still hold the broken connection" in result.stderr
    assert "retry 1 of 1 in 0.2 s" in result.stderr
    assert re.search(rf"ACK, {size} bytes, resumed at [1-9]\d*: ", result.stdout), result.stdout
    assert received(root, meta_path.with_suffix(".done")).read_bytes() == data.read_bytes()


def test_a_lost_ack_then_a_retry_ends_done(root: Path, server: ServerProcess) -> None:
    """The server's ACK never arrives (the proxy resets the client in its place): the file is durable
    there, and the retry is told so in the REPLY; it ends .done and sends nothing again."""
    size = 3 * 2**20 + 1
    data, meta_path = make_file(root, size)
    with CuttingProxy(server.port, {}, eat_ack=frozenset({0})) as proxy:
        result = _send(root, proxy.listen_port, meta_path, "--retry-wait", "0.2")
    assert proxy.acks_eaten == 1
    assert result.returncode == 0, result.stderr
    assert "retry 1 of 3 in 0.2 s" in result.stderr
    assert (f"ACK, the server holds these {size} bytes: they arrived before the connection broke, and only the "
            "ACK was lost; nothing sent again") in result.stdout, result.stdout
    assert received(root, meta_path.with_suffix(".done")).read_bytes() == data.read_bytes()


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_a_server_restarted_mid_file_lets_the_retry_go_on(root: Path, how: str) -> None:
    """The server goes away while a file comes in, and starts again on its port; `m2y send`'s retries
    reach the new server and send only the rest, and no record is left after the ACK.
    - stop (SIGTERM, as for an upgrade): it keeps what it had written, with its record;
    - crash (SIGKILL: no stop, no suspend): its checkpoints (every 0.2 s here) recorded what was
      written, and the next start takes the part back, cut to the last record."""
    srv = start_server(root, "--checkpoint", "0.2")
    size = 16 * 2**20
    data, meta_path = make_file(root, size)
    fields = meta.read_meta_file(meta_path)
    record, part = target(root, fields, ".resume"), target(root, fields, ".part")
    kept: list[int] = []

    def restart(old: ServerProcess, _proxy: CuttingProxy) -> ServerProcess:
        if how == "stop":
            assert old.stop() == 0
            m = re.search(r"CANCELLED \(server stopping\); kept (\d+) B for a resend", old.log())
            assert m, old.log()
            assert record.exists() and part.stat().st_size == int(m.group(1))
            assert old.log().count("recorded on disk") == 1, old.log()  # the suspend's and the stop's: one record
        else:
            assert wait_until(lambda: keptpart_written(record) >= 2**20, timeout=30)
            _kill(old)
        new = start_server(root, "--port", str(old.port), "--checkpoint", "0.2")
        m = re.search(r"(\d+) B kept by the previous server", new.log())
        assert m, new.log()
        kept.append(int(m.group(1)))
        return new

    try:
        result, srv = _send_through_a_restart(root, srv, meta_path, 2**20, restart)
    finally:
        srv.stop()
    assert result.returncode == 0, result.stderr
    assert f"ACK, {size} bytes, resumed at {kept[0]}: {size - kept[0]} sent" in result.stdout, result.stdout
    assert target(root, fields).read_bytes() == data.read_bytes()
    assert not record.exists() and not part.exists()


def keptpart_written(record: Path) -> int:
    from engine import keptpart

    try:
        decoded = keptpart.decode(record.read_bytes())
    except FileNotFoundError:  # not written yet, or removed at the commit
        return 0
    return decoded.written if decoded is not None else 0


def test_checkpoints_leave_no_record_after_the_ack(root: Path) -> None:
    """Records come and go during a transfer (seen here while it runs), and none is left after it."""
    srv = start_server(root, "--checkpoint", "0.01")
    size = 24 * 2**20
    data, meta_path = make_file(root, size)
    fields = meta.read_meta_file(meta_path)
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if (n := keptpart_written(target(root, fields, ".resume"))) and n not in seen:
                seen.append(n)
            done.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with CuttingProxy(srv.port, {}, slow=frozenset({0})) as proxy:
            result = _send(root, proxy.listen_port, meta_path)
    finally:
        done.set()
        watcher.join(10)
        srv.stop()
    assert result.returncode == 0, result.stderr
    assert len(seen) >= 2 and seen == sorted(seen) and all(n % 2**16 == 0 for n in seen), seen
    assert target(root, fields).read_bytes() == data.read_bytes()
    assert not target(root, fields, ".resume").exists()
    assert "no checkpoint" not in srv.log()
