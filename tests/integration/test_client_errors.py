"""What ``m2y send`` says when something on its side is wrong: one line, a non-zero exit, a .failed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import envelope, meta
from engine.blocks import CRC_FRAME_LEN, BlockCipher, wire_size
from engine.errors import RefuseCode
from engine.keys import load_private, load_public
from engine.protocol import NEED_DATA, SERVER_PREFIX, Connection, Event, Kind, Role, refusal_bytes
from engine.users import private_key_path, public_key_path

from .helpers import M2Y, ServerProcess, make_file, run_send, start_server, target


def _one_line_failure(result: object, meta_path: Path, *words: str) -> str:
    from subprocess import CompletedProcess

    assert isinstance(result, CompletedProcess)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert meta_path.with_suffix(".failed").exists() and not meta_path.exists()
    return str(lines[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused(root: Path) -> None:
    _, meta_path = make_file(root, 10)
    result = run_send(root, _free_port(), meta_path)
    line = _one_line_failure(result, meta_path, "connection refused", "m2y serve")
    assert "again later" not in line  # no server at the first try: a typo as likely as a stopped server


def test_a_sender_the_recipient_does_not_know_is_told_which_key_to_copy(root: Path, server: ServerProcess) -> None:
    _, meta_path = make_file(root, 10)
    (root / "roland-frei" / "pubKey" / "zhenqiang.data").unlink()
    result = run_send(root, server.port, meta_path)
    line = _one_line_failure(result, meta_path, "server refused: roland-frei there has no usable public key of "
                             f"zhenqiang; copy your {root}/zhenqiang/pubKey/zhenqiang.data into roland-frei/pubKey/ "
                             "on the server")
    assert "again later" not in line  # it would fail again: no advice to wait


def test_missing_private_key(root: Path, server: ServerProcess) -> None:
    _, meta_path = make_file(root, 10)
    (root / "zhenqiang" / "privateKey" / "zhenqiang.data").unlink()
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "private key", "not found", "pass the --root that has it", "m2y keygen")


def test_missing_recipient_public_key(root: Path, server: ServerProcess) -> None:
    _, meta_path = make_file(root, 10)
    (root / "zhenqiang" / "pubKey" / "roland-frei.data").unlink()
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "public key", "not found")


def test_wrong_recipient_public_key(root: Path, server: ServerProcess) -> None:
    _data, meta_path = make_file(root, 10)
    shutil.copy(root / "mallory" / "pubKey" / "mallory.data", root / "zhenqiang" / "pubKey" / "roland-frei.data")
    fields = meta.read_meta_file(meta_path)
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "server refused", "cannot decrypt", "(if roland-frei made new keys, your "
                      "copy of their public key is stale: copy their new pubKey/roland-frei.data into your pubKey/)")
    assert not target(root, fields).exists()


def test_missing_data_file(root: Path, server: ServerProcess) -> None:
    data, meta_path = make_file(root, 10)
    data.unlink()
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "data file", "not found", "which must sit beside its file")


def test_a_file_over_the_servers_limit_says_who_sets_it(root: Path) -> None:
    srv = start_server(root, "--max-file-size", "1KB")
    try:
        _, meta_path = make_file(root, 2000)
        result = run_send(root, srv.port, meta_path)
        line = _one_line_failure(result, meta_path, "limit of 1000", "the server's operator sets that limit: "
                                 "m2y serve --max-file-size")
        assert "again later" not in line
    finally:
        srv.stop()


def test_a_file_name_with_a_line_break_still_gives_one_line(root: Path, server: ServerProcess) -> None:
    """A .meta may name any file (a line break or an escape sequence is a valid name): the error
    stays the one line the user reads."""
    _data, meta_path = make_file(root, 10)
    fields = meta.read_meta_file(meta_path)
    meta_path.write_bytes(meta.to_json(meta.with_crc(dict(fields, filename="two\nlines\x1b[31m.jpg"))))
    result = run_send(root, server.port, meta_path)
    line = _one_line_failure(result, meta_path, "data file", "two?lines?[31m.jpg", "not found")
    assert "\x1b" not in line


def test_file_size_changed(root: Path, server: ServerProcess) -> None:
    data, meta_path = make_file(root, 1000)
    data.write_bytes(os.urandom(1001))
    result = run_send(root, server.port, meta_path)
    line = _one_line_failure(result, meta_path, "changed since its .meta was written", "size 1001",
                             "run 'm2y meta' on it again")
    assert "again later" not in line


def test_file_content_changed(root: Path, server: ServerProcess) -> None:
    data, meta_path = make_file(root, 200_000)
    fields = meta.read_meta_file(meta_path)
    data.write_bytes(os.urandom(200_000))
    result = run_send(root, server.port, meta_path)
    line = _one_line_failure(result, meta_path, "server refused", "differs from the metadata's fileCRC")
    assert "changed on purpose since its .meta was written, run 'm2y meta' again" in line
    assert "again later" not in line  # BAD_CRC: sending the same again would fail the same way
    assert not target(root, fields).exists()
    assert not target(root, fields, ".part").exists()


def _left_as_it_is(result: object, meta_path: Path, before: bytes, *words: str) -> None:
    """A .meta that does not parse is refused in one line and never renamed: it may not be m2y's."""
    from subprocess import CompletedProcess

    assert isinstance(result, CompletedProcess) and result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{meta_path}: FAILED: "), result.stderr
    assert lines[0].endswith("; not sent, left as it is") and all(w in lines[0] for w in words), lines[0]
    assert lines[0].count(str(meta_path)) == 1, lines[0]  # the path once, at the start
    assert meta_path.read_bytes() == before and not meta_path.with_suffix(".failed").exists()


def test_malformed_meta(root: Path, server: ServerProcess) -> None:
    _, meta_path = make_file(root, 10)
    meta_path.write_text('{"from": "zhenqiang", "to": ')
    result = run_send(root, server.port, meta_path)
    _left_as_it_is(result, meta_path, meta_path.read_bytes(), "malformed .meta: metadata is not valid JSON "
                   "(Expecting value at line 1 column 29); mend it, or run 'm2y meta' on its file again")


def test_meta_with_bad_crc(root: Path, server: ServerProcess) -> None:
    _, meta_path = make_file(root, 10)
    fields = meta.read_meta_file(meta_path)
    fields["filesize"] = 11  # edited by hand without a new metaCRC
    meta_path.write_bytes(meta.to_json(fields))
    result = run_send(root, server.port, meta_path)
    _left_as_it_is(result, meta_path, meta_path.read_bytes(), "malformed .meta", "metaCRC")


def test_files_named_meta_that_are_not_m2ys_are_left_as_they_are(root: Path, server: ServerProcess) -> None:
    """``m2y send photo/*.meta`` catches a Unity asset's .meta and a data file named capture.meta
    (whose own .meta is capture.meta.meta): they used to be renamed .failed, the data file too
    after its own .meta had been sent."""
    home = root / "zhenqiang" / "photo"
    home.mkdir(parents=True)
    unity = home / "Player.cs.meta"
    unity.write_text("fileFormatVersion: 2\nguid: 1234\n")
    capture = home / "capture.meta"
    capture.write_bytes(os.urandom(5000))
    made = subprocess.run([*M2Y, "meta", str(capture), "--from", "zhenqiang", "--to", "roland-frei", "--folder",
                           "photo", "--root", str(root)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and "capture.meta.meta" in made.stdout, made
    before = {p: p.read_bytes() for p in (unity, capture)}
    result = run_send(root, server.port, home / "capture.meta.meta", capture, unity)
    assert result.returncode == 1
    assert result.stdout.strip().splitlines()[0].startswith(f"{home / 'capture.meta.meta'}: ACK"), result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.endswith("; not sent, left as it is") for line in lines[:2]), lines
    assert lines[2] == "m2y send: 2 of 3 files failed (each one's line says why); 1 sent"  # the count, last
    assert {p: p.read_bytes() for p in (unity, capture)} == before
    assert sorted(p.name for p in home.iterdir()) == ["Player.cs.meta", "capture.meta", "capture.meta.done"]


def test_missing_meta_file(root: Path, server: ServerProcess) -> None:
    result = run_send(root, server.port, root / "nothing.meta")
    assert result.returncode != 0
    assert "no such .meta file" in result.stderr



def test_a_file_that_is_not_a_meta_is_refused_and_left_as_it_is(root: Path, server: ServerProcess) -> None:
    """Only a .meta (or the .failed it became) is sent and renamed: a data file given by mistake
    (``m2y send photo/*``) used to be renamed .failed. A .done is not sent again either."""
    data, meta_path = make_file(root, 70_000)
    before = data.read_bytes()
    wrong = run_send(root, server.port, data)
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines() == [
        f"{data}: FAILED: not a .meta file: not sent, left as it is (only a .meta that 'm2y meta' "
        f"wrote, or the .failed it became, is sent: {meta_path.name}?)"]
    assert data.read_bytes() == before and not data.with_name(data.name + ".failed").exists()
    assert sorted(p.name for p in data.parent.iterdir()) == sorted([data.name, meta_path.name])
    sent = run_send(root, server.port, meta_path, meta_path, data.parent / ".." / data.parent.name / meta_path.name)
    assert sent.returncode == 0, sent.stderr  # given three times: sent once, not failed twice as missing
    assert len(sent.stdout.strip().splitlines()) == 1 and sent.stderr == ""
    done = meta_path.with_suffix(".done")
    rerun = run_send(root, server.port, meta_path)  # the same command again: the .meta is the .done now
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.strip().splitlines() == [f"{meta_path}: sent earlier: it is {done.name} now; nothing sent"]
    again = run_send(root, server.port, done)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"{done}: FAILED: {done.name} was sent and ACKed already; to send its file again, run 'm2y meta' on "
        "the file and send the new .meta"]
    assert done.exists() and not done.with_name(done.name + ".done").exists()


def test_two_names_of_one_meta_are_both_answered(root: Path, server: ServerProcess) -> None:
    """A symlink and its target are two names: each is answered and renamed (the second finds the
    file on the server already), none is dropped silently as a duplicate."""
    data, meta_path = make_file(root, 5000)
    alias = meta_path.with_name("alias.meta")
    alias.symlink_to(meta_path.name)
    result = run_send(root, server.port, alias, meta_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{alias}: ACK") and "already holds" in lines[1], lines
    assert meta_path.with_suffix(".done").exists() and alias.with_suffix(".done").is_symlink()
    assert target(root, meta.read_meta_file(meta_path.with_suffix(".done"))).read_bytes() == data.read_bytes()


def test_an_interrupted_send_says_how_to_go_on(root: Path) -> None:
    """Ctrl-C (SIGINT) while `m2y send` waits: exit 130 and one line saying what to do (it used to
    end silently); the .meta stays as it was, to be sent again. What was settled before the
    interrupt was said as it was settled (it used to be said only at the end, so never)."""
    _, earlier = make_file(root, 10, name="earlier.jpg")
    earlier.rename(earlier.with_suffix(".done"))  # sent by an earlier run
    _, meta_path = make_file(root, 1000)
    with socket.socket() as listener:  # a server that accepts and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        # As a terminal's Ctrl-C finds it: a shell that starts jobs in the background (CI's may) hands
        # them SIGINT ignored, and Python then never raises KeyboardInterrupt.
        proc = subprocess.Popen([*M2Y, "send", str(earlier), str(meta_path), "--root", str(root), "--port",
                                 str(listener.getsockname()[1])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            conn, _ = listener.accept()  # the client is connected and waits for the reply
            with conn:
                time.sleep(0.3)
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["m2y send: interrupted; a file not ACKed keeps its .meta (or .failed): send it "
                                        "again to go on where it stopped"], err
    assert meta_path.exists() and not meta_path.with_suffix(".failed").exists()
    assert out.strip().splitlines() == [f"{earlier}: sent earlier: it is earlier.done now; nothing sent"], out


def test_a_second_send_of_a_meta_being_sent_leaves_it_to_the_first(root: Path, server: ServerProcess) -> None:
    """Two `m2y send` of one .meta at once: the second leaves it alone, in one line, instead of racing
    the first (the one that gave up first renamed it .failed under the one that got the ACK)."""
    data, meta_path = make_file(root, 1000)
    with socket.socket() as listener:  # the first send's server accepts and never answers: it waits
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        first = subprocess.Popen([*M2Y, "send", str(meta_path), "--root", str(root), "--port",
                                  str(listener.getsockname()[1]), "--retries", "0"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = listener.accept()
            with conn:
                second = run_send(root, server.port, meta_path, timeout=60)
                assert second.returncode == 1 and second.stdout == "", second
                assert second.stderr.strip().splitlines() == [
                    f"{meta_path}: FAILED: another m2y send is sending myfoto.meta right now: left to it (it renames "
                    "it .done or .failed when it ends)"], second.stderr
                assert meta_path.exists() and not meta_path.with_suffix(".failed").exists()
                assert not list((root / "roland-frei").glob("photo/*.data"))  # nothing reached the server
                first.kill()  # while its connection is still open: a closed one would fail it, renamed .failed
                first.wait(10)
        finally:
            first.kill()
            first.wait(10)
    assert meta_path.exists()  # killed: the first renamed nothing; the lock went with it
    again = run_send(root, server.port, meta_path)
    assert again.returncode == 0 and "ACK" in again.stdout, again
    assert target(root, meta.read_meta_file(meta_path.with_suffix(".done"))).read_bytes() == data.read_bytes()


def test_a_meta_replaced_during_its_send_is_not_renamed_for_it(root: Path) -> None:
    """A .meta put in place of one being sent (by hand, or where file locks do not work): the send's
    .done or .failed would be the new .meta's, which was never sent. It is left as it is, and said."""
    _, meta_path = make_file(root, 1000)
    with socket.socket() as listener:  # a server that accepts and never answers: the try times out
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        proc = subprocess.Popen([*M2Y, "send", str(meta_path), "--root", str(root), "--port",
                                 str(listener.getsockname()[1]), "--retries", "0", "--timeout", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = listener.accept()
            with conn:
                new = meta_path.with_name("new.tmp")
                new.write_bytes(meta_path.read_bytes())
                new.replace(meta_path)  # another file under the name now
                _out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [
        f"{meta_path}: FAILED: server sent nothing for 2 s; myfoto.meta was replaced while it "
        "was sent: the new one is left as it is, not sent yet"], err
    assert meta_path.exists() and not meta_path.with_suffix(".failed").exists()


@pytest.mark.parametrize("closed", [0, 1])
def test_a_send_with_stdin_or_stdout_closed_ends_well(root: Path, server: ServerProcess, closed: int) -> None:
    """As a cron job or supervisor may start it: it used to send everything, then abort (exit 134, a
    libuv assertion) when uvloop closed a socket that had taken fd 0 or 1."""
    data, meta_path = make_file(root, 100_000)
    proc = subprocess.run([*M2Y, "send", str(meta_path), "--root", str(root), "--port", str(server.port)],
                          capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.close(closed))
    assert proc.returncode == 0, proc
    assert proc.stderr == "" and ("ACK" in proc.stdout) == (closed != 1), proc
    assert target(root, meta.read_meta_file(meta_path.with_suffix(".done"))).read_bytes() == data.read_bytes()


def test_a_meta_that_became_failed_is_named(root: Path, server: ServerProcess) -> None:
    data, meta_path = make_file(root, 10)
    done = meta_path.with_suffix(".done")
    meta_path.rename(done)
    data.write_bytes(b"changed since")  # a .done of the file as it was: not this file's send
    stale = run_send(root, server.port, meta_path)
    assert stale.returncode == 1 and "no such .meta file" in stale.stderr, stale.stderr
    done.rename(meta_path)
    failed = meta_path.with_suffix(".failed")
    meta_path.rename(failed)
    done.write_bytes(failed.read_bytes())  # an older .done too: the newest send, the .failed, is what counts
    result = run_send(root, server.port, meta_path)
    assert result.returncode == 1 and failed.exists()
    assert result.stderr.strip().splitlines() == [
        f"{meta_path}: FAILED: {meta_path.name} is {failed.name} now (an earlier send did not finish): "
        f"send {failed.name} to go on"]

Answer = Callable[[bytes, bytes], bytes]  # (filekey, salt) -> the fake server's last words


def _test_refusal(_key: bytes, _salt: bytes) -> bytes:
    return refusal_bytes(int(RefuseCode.INTERNAL), "slow reader got everything")


def _stalling_server(root: Path, listener: socket.socket, stop: threading.Event, slow_read: int = 0,
                     answer: Answer = _test_refusal, pause: float = 0.05) -> None:
    """Does a real handshake as roland-frei, sends the REPLY, then never reads again; or, with
    ``slow_read`` bytes expected, reads them 128 KiB per ``pause`` s and sends ``answer``."""
    from engine.protocol import Envelope, Header, Reply

    conn_sock, _ = listener.accept()
    with conn_sock:
        conn = Connection(Role.SERVER)
        events: list[Event] = []
        while len(events) < 2:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.buffer_updated(conn_sock.recv_into(conn.get_buffer()))
            else:
                assert isinstance(event, Event)
                events.append(event)
        header, env = events
        assert isinstance(header, Header) and isinstance(env, Envelope)
        aad = envelope.aad(envelope.REQUEST, header.from_hash, header.to_hash)
        fields = meta.parse(envelope.open_(load_private(private_key_path(root, "roland-frei")), env.data, aad),
                            extra=(meta.NONCE_FIELD,))
        reply, filekey, salt = meta.add_reply_fields(fields)
        sealed = envelope.seal(load_public(public_key_path(root, "roland-frei", "zhenqiang")), meta.to_json(reply),
                               envelope.aad(envelope.REPLY, header.from_hash, header.to_hash))
        conn_sock.sendall(b"".join(conn.send(Reply(sealed))))
        if not slow_read:
            stop.wait(60)  # reads nothing more: the client's sends fill the socket buffers and block
            return
        got = 0
        while got < slow_read and not stop.is_set():
            chunk = conn_sock.recv(128 * 1024)
            if not chunk:
                return
            got += len(chunk)
            time.sleep(pause)
        conn_sock.sendall(answer(filekey, salt))


def _send_to_fake_server(root: Path, meta_path: Path, timeout: str, slow_read: int = 0,
                         answer: Answer = _test_refusal, pause: float = 0.05) -> subprocess.CompletedProcess[str]:
    """``m2y send`` against ``_stalling_server`` on a loopback port, its thread stopped afterwards.
    One try (--retries 0): the fake server answers one connection; tries again are test_retry's."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # inherited by the accepted socket
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()
    fake = threading.Thread(target=_stalling_server, args=(root, listener, stop, slow_read, answer, pause),
                            daemon=True)
    fake.start()
    try:
        return run_send(root, listener.getsockname()[1], meta_path, extra=("--timeout", timeout, "--retries", "0"),
                        timeout=60)
    finally:
        stop.set()
        fake.join(10)
        listener.close()


def test_server_that_stops_reading(root: Path) -> None:
    _, meta_path = make_file(root, 64 * 2**20)  # more than loopback's socket buffers hold
    result = _send_to_fake_server(root, meta_path, "2")
    _one_line_failure(result, meta_path, "server took no data for 2 s")


def test_a_slow_but_reading_server_is_not_given_up_on(root: Path) -> None:
    """--timeout is about progress: at ~2.6 MB/s a 1 MiB batch takes ~0.4 s, longer than the 0.3 s
    timeout, and the client must wait for it (the server's answer here is a test refusal). The
    file is larger than what the socket buffers hold, so sends do block."""
    size = 12 * 2**20
    _, meta_path = make_file(root, size)
    result = _send_to_fake_server(root, meta_path, "0.3", slow_read=wire_size(size) + CRC_FRAME_LEN)
    _one_line_failure(result, meta_path, "slow reader got everything")


def test_an_ack_for_another_crc_is_not_taken(root: Path) -> None:
    """A server that ACKs bytes other than the .meta's (its CRC checks skipped, or a bug) is not
    believed: the client compares the sealed ACK with the .meta's size and fileCRC."""
    size = 300_000
    _, meta_path = make_file(root, size)
    crc = meta.read_meta_file(meta_path)["fileCRC"]

    def wrong_ack(filekey: bytes, salt: bytes) -> bytes:
        sealed = BlockCipher(filekey, salt).seal_ack(size, crc ^ 1)
        return SERVER_PREFIX.pack(Kind.ACK, len(sealed)) + sealed  # as Connection.send frames an Ack

    result = _send_to_fake_server(root, meta_path, "5", slow_read=wire_size(size) + CRC_FRAME_LEN,
                                  answer=wrong_ack, pause=0)
    _one_line_failure(result, meta_path, "ACK names another size or CRC than what was sent")


def test_a_bad_crc_refusal_keeps_the_servers_reason(root: Path) -> None:
    """BAD_CRC does not always mean the file changed (here: the CRC frame did not authenticate):
    the client shows the server's reason, with the .meta advice only as a hint."""
    size = 300_000
    _, meta_path = make_file(root, size)

    def refuse(_key: bytes, _salt: bytes) -> bytes:
        return refusal_bytes(int(RefuseCode.BAD_CRC), "the file CRC frame failed authentication")

    result = _send_to_fake_server(root, meta_path, "5", slow_read=wire_size(size) + CRC_FRAME_LEN,
                                  answer=refuse, pause=0)
    line = _one_line_failure(result, meta_path, "server refused: the file CRC frame failed authentication")
    assert "was changed on purpose since its .meta was written" in line


def test_a_meta_that_cannot_be_renamed_is_reported_and_the_rest_still_sent(root: Path, server: ServerProcess
                                                                           ) -> None:
    data_a, meta_a = make_file(root, 1000, name="a.bin")
    data_b, meta_b = make_file(root, 2000, name="b.bin")
    from engine.client import MAX_NUMBERED

    for n in range(MAX_NUMBERED):  # a.done and every numbered name it could take instead (a.1.done ...)
        blocker = meta_a.with_suffix(".done") if n == 0 else meta_a.with_name(f"a.{n}.done")
        blocker.mkdir()
    (meta_a.with_suffix(".done") / "keep").write_text("a folder where a.done would go")
    result = run_send(root, server.port, meta_a, meta_b)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "a.meta" in lines[0] and "ACKed" in lines[0] and "cannot become a.done" in lines[0]
    assert lines[1] == "m2y send: 1 of 2 files failed (each one's line says why); 1 sent"
    assert f"a.done and {MAX_NUMBERED - 1} numbered names are taken; remove old ones" in lines[0]
    assert meta_a.exists()  # left as it was, beside the blockers
    assert meta_b.with_suffix(".done").exists() and "b.meta: ACK" in result.stdout
    for data, m in ((data_a, meta_a), (data_b, meta_b.with_suffix(".done"))):
        assert target(root, meta.read_meta_file(m)).read_bytes() == data.read_bytes()
