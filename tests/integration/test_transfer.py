"""Good transfers between real ``m2y serve`` and ``m2y send`` processes on loopback."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import meta
from engine.blocks import BLOCK_SIZE
from engine.crc import crc64
from engine.errors import RefuseCode
from engine.protocol import Ack, FileCRC
from engine.users import user_hash

from .helpers import (
    M2Y,
    RawClient,
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


def _check_received(root: Path, data: Path, meta_path: Path) -> None:
    fields = meta.read_meta_file(meta_path.with_suffix(".done"))
    got = target(root, fields)
    assert got.read_bytes() == data.read_bytes()
    assert not target(root, fields, ".part").exists()
    assert not meta_path.exists()


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536 + 7])
def test_sizes(root: Path, server: ServerProcess, size: int) -> None:
    data, meta_path = make_file(root, size)
    result = run_send(root, server.port, meta_path)
    assert result.returncode == 0, result.stderr
    assert "ACK" in result.stdout
    _check_received(root, data, meta_path)


def test_50_mb(root: Path, server: ServerProcess) -> None:
    data, meta_path = make_file(root, 50_000_000)
    result = run_send(root, server.port, meta_path)
    assert result.returncode == 0, result.stderr
    _check_received(root, data, meta_path)
    line = [x for x in server.log().splitlines() if "ACK" in x][-1]
    assert "zhenqiang -> roland-frei" in line and "50000000 B" in line and "MB/s" in line


def test_meta_command_then_send(root: Path, server: ServerProcess) -> None:
    src = root / "zhenqiang" / "photo"
    src.mkdir(parents=True)
    data = src / "myfoto.jpg"
    data.write_bytes(os.urandom(200_000))
    made = subprocess.run([*M2Y, "meta", str(data), "--from", "zhenqiang", "--to", "roland-frei",
                           "--folder", "photo/2018", "--root", str(root)], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0 and made.stderr == "", made.stderr
    meta_path = src / "myfoto.meta"
    fields = meta.read_meta_file(meta_path)
    assert fields["filename"] == "myfoto.jpg" and fields["filesize"] == 200_000
    assert set(fields) == set(meta.FIELDS)
    result = run_send(root, server.port, meta_path)
    assert result.returncode == 0, result.stderr
    assert target(root, fields).read_bytes() == data.read_bytes()
    stored = target(root, fields, ".meta")
    assert meta.parse(meta.to_json(__import__("json").loads(stored.read_text()))) == fields


def test_meta_for_a_recipient_whose_key_the_sender_lacks_notes_it(root: Path) -> None:
    """The .meta is written (the key may be copied before the send), with one line saying what the
    send will need: the error would otherwise come only at send time."""
    data, to_roland = make_file(root, 10)
    to_roland.unlink()  # else kept as an unsent .meta to another recipient: refused (its own test)
    made = subprocess.run([*M2Y, "meta", str(data), "--from", "zhenqiang", "--to", "mallory", "--folder", "x",
                           "--root", str(root)], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0 and data.with_suffix(".meta").exists()
    key = root / "zhenqiang" / "pubKey" / "mallory.data"
    assert made.stderr.strip().splitlines() == [
        f"m2y meta: note: {key} is not there yet; 'm2y send' needs it (copy mallory's pubKey/mallory.data there)"]


def test_meta_beside_an_unfinished_send_of_the_same_file_notes_it(root: Path) -> None:
    """A new .meta beside the .failed of the same file: sending both would store it twice."""
    data, meta_path = make_file(root, 10)
    failed = meta_path.with_suffix(".failed")
    meta_path.rename(failed)
    made = subprocess.run([*M2Y, "meta", str(data), "--from", "zhenqiang", "--to", "roland-frei", "--folder", "photo",
                           "--root", str(root)], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0 and meta_path.exists() and failed.exists()
    assert made.stderr.strip().splitlines() == [
        f"m2y meta: note: {failed} is an earlier send of {data.name} that did not finish; send it (it goes on where "
        f"it stopped) and remove {meta_path.name}, or send {meta_path.name} and remove it"]
    meta_path.unlink()
    to_mallory = subprocess.run([*M2Y, "meta", str(data), "--from", "zhenqiang", "--to", "mallory", "--folder", "photo",
                                 "--root", str(root)], capture_output=True, text=True, timeout=30)
    assert to_mallory.returncode == 0 and meta_path.exists(), to_mallory  # another send: both are to be sent
    assert "is an earlier send" not in to_mallory.stderr, to_mallory.stderr


def test_metas_made_within_a_second_get_distinct_names(root: Path, server: ServerProcess) -> None:
    """The server names a file <from>_<datetime>: `m2y meta` must not give one sender the same
    datetime twice. The sender's clock is set an hour ahead, so both datetimes can only come from
    it (however the two commands fall across a second boundary, and however slow they are)."""
    src = root / "zhenqiang" / "photo"
    src.mkdir(parents=True)
    ahead = dt.datetime.now().replace(microsecond=0) + dt.timedelta(hours=1)
    (root / "zhenqiang" / meta.CLOCK_FILE).write_text(meta.now_string(ahead) + "\n")
    metas = []
    for name in ("a.jpg", "b.jpg"):
        (src / name).write_bytes(os.urandom(50_000))
        made = subprocess.run([*M2Y, "meta", str(src / name), "--from", "zhenqiang", "--to", "roland-frei",
                               "--folder", "photo", "--root", str(root)], capture_output=True, text=True, timeout=30)
        assert made.returncode == 0, made.stderr
        metas.append(src / name.replace(".jpg", ".meta"))
    got = [meta.read_meta_file(m)["datetime"] for m in metas]
    assert got == [meta.now_string(ahead + dt.timedelta(seconds=s)) for s in (1, 2)]
    result = run_send(root, server.port, *metas)
    assert result.returncode == 0, result.stderr
    for m in metas:
        fields = meta.read_meta_file(m.with_suffix(".done"))
        assert target(root, fields).read_bytes() == (src / fields["filename"]).read_bytes()


def test_several_metas_in_one_send(root: Path, server: ServerProcess) -> None:
    files = [make_file(root, 1000 * (i + 1), name=f"f{i}.bin") for i in range(3)]
    result = run_send(root, server.port, *(m for _, m in files))
    assert result.returncode == 0, result.stderr
    for data, meta_path in files:
        _check_received(root, data, meta_path)


def test_eight_clients_at_once(root: Path, server: ServerProcess) -> None:
    files = [make_file(root, 3_000_000 + i, name=f"c{i}.bin") for i in range(8)]
    procs = [
        subprocess.Popen([*M2Y, "send", str(m), "--root", str(root), "--port", str(server.port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _, m in files
    ]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for data, meta_path in files:
        _check_received(root, data, meta_path)


def test_a_fast_sender_does_not_starve_other_connections(root: Path, server: ServerProcess) -> None:
    """The server reads a busy sender's bytes without going through the loop each time; it must
    still answer another connection while that file is streaming, not after it."""
    size = 256 * 2**20
    data, meta_path = make_file(root, size, name="big.bin")
    part = target(root, meta.read_meta_file(meta_path), ".part")
    big = subprocess.Popen([*M2Y, "send", str(meta_path), "--root", str(root), "--port", str(server.port)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: part.exists() and part.stat().st_size > 16 * 2**20, timeout=60, interval=0.002)
        t0 = time.monotonic()
        with RawClient(server.port) as c:
            c.sendall(struct.pack(">QQQ", 0, user_hash("zhenqiang"), user_hash("roland-frei")))
            code, _reason = c.read_refusal()
        answered = time.monotonic() - t0
        streamed = part.stat().st_size if part.exists() else size
    finally:
        _out, err = big.communicate(timeout=120)
    assert code == RefuseCode.BAD_HEADER
    assert streamed < size, f"the other connection was answered only after the file ({answered:.3f} s)"
    assert big.returncode == 0, err
    _check_received(root, data, meta_path)


def test_console_scripts(root: Path) -> None:
    bindir = Path(sys.executable).parent
    server_script, client_script = bindir / "m2y-server", bindir / "m2y-client"
    if not server_script.exists() or not client_script.exists():
        pytest.skip("console scripts are installed by `make install`")
    proc = subprocess.Popen([str(server_script), "--root", str(root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line.split("127.0.0.1:", 1)[1].split()[0])
        data, meta_path = make_file(root, 70_000)
        result = subprocess.run([str(client_script), str(meta_path), "--root", str(root), "--port", str(port)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        _check_received(root, data, meta_path)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_server_stops_cleanly(root: Path, sig: signal.Signals) -> None:
    srv = start_server(root)
    srv.proc.send_signal(sig)
    assert srv.proc.wait(10) == 0
    assert srv.proc.stdout is not None
    assert "stopped" in srv.proc.stdout.read()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_tells_the_transfers_it_cuts_short_why(root: Path, sig: signal.Signals) -> None:
    """A client mid-file when the server stops (SIGTERM, an upgrade) read only a reset; it now reads a
    REFUSED BUSY that says what was kept, and tries again as for any BUSY. SIGHUP (the terminal or
    ssh session of the server closing) stops it alike: it was a crash, which kept nothing."""
    srv = start_server(root)
    try:
        data, meta_path = make_file(root, 6 * 2**20)
        fields = meta.read_meta_file(meta_path)
        hs = handshake(root, srv.port, fields)
        hs.client.sendall(sealed_frames(hs.cipher, data.read_bytes())[: 5 * 16 * (BLOCK_SIZE + 16)])  # 5 of 6
        part = target(root, fields, ".part")
        assert wait_until(lambda: part.exists() and part.stat().st_size >= 2**20)
        srv.proc.send_signal(sig)  # the batches that arrived whole are written first
        code, reason = hs.client.read_refusal()
        hs.client.close()
        assert srv.proc.wait(20) == 0
    finally:
        srv.stop()
    assert code == RefuseCode.BUSY
    kept = 5 * 2**20
    assert reason == f"server stopping: the {kept} bytes it received are kept for a resend; try again once it is back"
    assert f"CANCELLED (server stopping); kept {kept} B for a resend" in srv.log()


def test_root_from_environment(root: Path, server: ServerProcess) -> None:
    data, meta_path = make_file(root, 12345)
    env = dict(os.environ, M2Y_ROOT=str(root))
    result = subprocess.run([*M2Y, "send", str(meta_path), "--port", str(server.port)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    _check_received(root, data, meta_path)


def test_keygen_command(tmp_path: Path) -> None:
    root = tmp_path / "r"
    made = subprocess.run([*M2Y, "keygen", "alice", "--root", str(root), "--bits", "2048"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = root / "alice" / "privateKey" / "alice.data"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (root / "alice" / "pubKey" / "alice.data").exists()
    before = key.read_bytes()
    again = subprocess.run([*M2Y, "keygen", "alice", "--root", str(root), "--bits", "2048"],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "--force" in again.stderr
    assert key.read_bytes() == before
    shutil.rmtree(root)


def test_one_server_per_root(root: Path, server: ServerProcess) -> None:
    """A second server on the same root would replace the first's .part files (the names being
    received live in one process's memory): it is refused at start, in one line naming the first."""
    second = subprocess.run([*M2Y, "serve", "--root", str(root), "--host", "127.0.0.1", "--port", "0"],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode != 0
    assert second.stderr.strip().splitlines() == [
        f"m2y serve: another m2y serve (pid {server.proc.pid}) is serving {root}; one server per root"
    ]
    data, meta_path = make_file(root, 100_000)
    assert run_send(root, server.port, meta_path).returncode == 0  # the first one serves on
    assert target(root, meta.read_meta_file(meta_path.with_suffix(".done"))).read_bytes() == data.read_bytes()
    server.stop()
    again = start_server(root)  # the lock goes with the process that held it
    try:
        assert (root / ".m2y-serve.lock").read_text().strip() == str(again.proc.pid)
        assert stat.S_IMODE((root / ".m2y-serve.lock").stat().st_mode) == 0o644
    finally:
        again.stop()



@pytest.mark.parametrize(("option", "value", "line"), [
    ("--stop-wait", "nan", "--stop-wait nan is out of range 1..3600 seconds"),
    ("--stop-wait", "0.5", "--stop-wait 0.5 is out of range 1..3600 seconds"),
    ("--checkpoint", "86401", "--checkpoint 86401 is out of range 0..86400 seconds"),
    ("--port", "99999", "--port 99999 is out of range 0..65535"),  # was a traceback (OverflowError)
    ("--max-clients", "0", "--max-clients 0 is out of range 1..10000"),  # was a traceback (ValueError)
    ("--max-meta", "1", "--max-meta 1 is out of range 4096..16777216"),  # every send was refused
    ("--idle-timeout", "-5", "--idle-timeout -5 is out of range 0.1..86400 seconds"),
    ("--keep-partial", "nan", "--keep-partial nan is out of range 0..2592000 seconds"),
])
def test_serve_refuses_an_out_of_range_option_in_one_line(root: Path, option: str, value: str, line: str) -> None:
    served = subprocess.run([*M2Y, "serve", "--root", str(root), "--host", "127.0.0.1", "--port", "0", option, value],
                            capture_output=True, text=True, timeout=30)
    assert served.returncode == 2, served.stderr
    assert served.stderr.strip().splitlines() == [f"m2y serve: {line}"]


@pytest.mark.parametrize(("value", "why"), [("1.5", "not a whole number of bytes"), ("0.1KiB", "not a whole number"),
                                            ("10X", "not a size"), ("9" * 40, "not a size")])
def test_sizes_are_exact_whole_bytes(root: Path, value: str, why: str) -> None:
    served = subprocess.run([*M2Y, "serve", "--root", str(root), "--port", "0", "--max-file-size", value],
                            capture_output=True, text=True, timeout=30)
    assert served.returncode == 2 and why in served.stderr, served.stderr


def test_serve_on_a_root_that_is_a_file_or_missing_says_which(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for root, why in ((afile, f"root {afile} is a file, not a folder; give --root the folder that holds the "
                              "users' homes"),
                      (tmp_path / "none", f"root {tmp_path / 'none'} does not exist; create users with 'm2y keygen "
                                          f"USER --root {tmp_path / 'none'}'")):
        served = subprocess.run([*M2Y, "serve", "--root", str(root), "--port", "0"], capture_output=True, text=True,
                                timeout=30)
        assert served.returncode == 2 and served.stderr.strip() == f"m2y serve: {why}", served.stderr


def test_a_replaced_recipient_key_is_used_without_a_restart(root: Path, server: ServerProcess) -> None:
    """``m2y keygen --force`` gives the recipient a new key pair while the server runs: the next send,
    sealed to the new public key, goes through (the server used to keep the old private key until
    it was restarted, and refused such sends as envelopes it cannot decrypt). A private key made
    readable by others is no longer used, as at start."""
    from engine.keys import keygen, share_public
    from engine.users import private_key_path

    from ..conftest import TEST_BITS

    _, first = make_file(root, 1000, name="a.jpg")
    assert run_send(root, server.port, first).returncode == 0
    keygen(root, "roland-frei", TEST_BITS, force=True)
    share_public(root, "roland-frei", "zhenqiang")
    data, second = make_file(root, 70_000, name="b.jpg")
    result = run_send(root, server.port, second)
    assert result.returncode == 0, result.stderr + server.log()
    assert target(root, meta.read_meta_file(second.with_suffix(".done"))).read_bytes() == data.read_bytes()
    private_key_path(root, "roland-frei").chmod(0o644)
    _, third = make_file(root, 10, name="c.jpg")
    refused = run_send(root, server.port, third)
    assert refused.returncode == 1, refused.stderr
    assert "the private key of roland-frei on this server cannot be used; the server's log says why" in refused.stderr
    assert "skipping key" in server.log() and "roland-frei.data" in server.log()

def test_a_home_that_is_a_symlink_is_said_at_start_and_not_served(root: Path) -> None:
    """A recipient's home moved to another disk and symlinked back: the server used to list that user
    at start and then refuse every send to them (storage does not write through a symlink). It now
    says so at start, once, in its log, where it starts and stops too."""
    moved = root.parent / "otherdisk"
    moved.mkdir()
    home = root / "roland-frei"
    home.rename(moved / "roland-frei")
    home.symlink_to(moved / "roland-frei")
    srv = start_server(root)
    try:
        _, meta_path = make_file(root, 10)
        refused = run_send(root, srv.port, meta_path)
        assert refused.returncode == 1 and "no user with hash" in refused.stderr, refused.stderr
        assert ("(that is roland-frei: the server has no home with a usable private key for them; on the server, "
                "'m2y keygen roland-frei' makes one)") in refused.stderr
    finally:
        assert srv.stop() == 0
    log = srv.log()
    listening = re.search(rf"listening on 127\.0\.0\.1:{srv.port} \(users: ([^;]*); workers: \d+\)", log)
    assert listening and "zhenqiang" in listening[1].split(", ") and "roland-frei" not in listening[1], log
    assert log.count(f"skipping user roland-frei: its home {home} is a symbolic link") == 1, log
    assert log.rstrip().endswith("stopped"), log


def test_progress_bar(root: Path, server: ServerProcess) -> None:
    """--progress draws one bar per file on stderr, ending at 100% of the file's size; without it (and
    stderr not a terminal, as here) stderr stays empty; a file the server already holds gets no bar."""
    size = 5 * 1024 * 1024 + 3
    data, meta_path = make_file(root, size)
    shown = run_send(root, server.port, meta_path, extra=("--progress",))
    assert target(root, meta.read_meta_file(meta_path.with_suffix(".done"))).read_bytes() == data.read_bytes()
    assert shown.returncode == 0, shown.stderr
    frames = [f.strip() for f in shown.stderr.replace("\r", "\n").splitlines() if f.strip()]
    assert frames and frames[-1].startswith("myfoto.meta: 100%"), shown.stderr
    assert f"{size / 1e6:.2f}M/{size / 1e6:.2f}M" in frames[-1]
    assert shown.stdout.startswith(f"{meta_path}: ACK, {size} bytes")
    meta_path.with_suffix(".done").rename(meta_path)
    again = run_send(root, server.port, meta_path, extra=("--progress",))
    assert again.returncode == 0 and again.stderr == "", again.stderr  # nothing sent: no bar
    data2, meta2 = make_file(root, 70_000, name="other.bin")
    quiet = run_send(root, server.port, meta2)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert target(root, meta.read_meta_file(meta2.with_suffix(".done"))).read_bytes() == data2.read_bytes()


def test_a_resumed_sends_bar_starts_at_the_kept_bytes(root: Path, server: ServerProcess) -> None:
    """The bar of a send that resumes starts where the server's kept part ends, and the kept bytes
    do not count in its rate (it started at 0 and jumped, with a rate of GB/s)."""
    size = 5 * 2**20
    data, meta_path = make_file(root, size)
    fields = meta.read_meta_file(meta_path)
    hs = handshake(root, server.port, fields)
    hs.client.sendall(sealed_frames(hs.cipher, data.read_bytes())[: 3 * 16 * (BLOCK_SIZE + 16)])
    part = target(root, fields, ".part")
    assert wait_until(lambda: part.exists() and part.stat().st_size >= 3 * 2**20)
    hs.client.close()
    assert wait_until(lambda: "for a resend" in server.log())
    shown = run_send(root, server.port, meta_path, extra=("--progress",))
    assert shown.returncode == 0 and f"resumed at {3 * 2**20}" in shown.stdout, shown
    frames = [f.strip() for f in shown.stderr.replace("\r", "\n").splitlines() if f.strip()]
    assert frames[0].startswith("myfoto.meta:  60%"), frames
    assert f"{3 * 2**20 / 1e6:.2f}M/{size / 1e6:.2f}M" in frames[0], frames
    assert "?B/s" in frames[0], frames  # no rate before its own bytes
    assert frames[-1].startswith("myfoto.meta: 100%"), frames
    assert target(root, fields).read_bytes() == data.read_bytes()


def test_server_start_removes_what_a_crash_left(root: Path) -> None:
    """A server killed mid-file leaves its .part and .meta; the next start removes them (and says
    so), and the same file then goes through."""
    payload, fields = payload_fields(8 * BLOCK_SIZE)
    server = start_server(root)
    try:
        hs = handshake(root, server.port, fields)
        hs.client.sendall(sealed_frames(hs.cipher, payload)[: 5 * (BLOCK_SIZE + 16)])  # 5 blocks of 8
        part = target(root, fields, ".part")  # made with the .meta before the REPLY
        assert part.exists()
        server.proc.kill()  # a crash: nothing is cleaned up
        server.proc.wait(10)
        hs.client.close()
    finally:
        server.stop()
    assert part.exists() and target(root, fields, ".meta").exists()
    again = start_server(root)
    try:
        assert not part.exists() and not target(root, fields, ".meta").exists()
        assert f"removed {part} (" in again.log()
        hs = handshake(root, again.port, fields)
        assert hs.received == meta.NEW
        hs.send_frames(sealed_frames(hs.cipher, payload))
        hs.client.send_event(FileCRC(hs.cipher.seal_crc(crc64(payload))))
        assert isinstance(hs.client.next_event(), Ack)
        hs.client.close()
        assert target(root, fields).read_bytes() == payload
    finally:
        again.stop()


def test_a_broken_stderr_never_fails_a_transfer(root: Path, server: ServerProcess) -> None:
    """The bar writes to stderr; if that pipe is closed (`2> >(head -c1)`), the file still goes."""
    data, meta_path = make_file(root, 20 * 1024 * 1024)
    proc = subprocess.Popen([*M2Y, "send", str(meta_path), "--root", str(root), "--port", str(server.port),
                             "--progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    proc.stderr.close()  # nobody reads the bar
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert target(root, meta.read_meta_file(meta_path.with_suffix(".done"))).read_bytes() == data.read_bytes()


def test_meta_of_several_files_at_once(root: Path, server: ServerProcess) -> None:
    """`m2y meta a b c`: one .meta each, distinct datetimes, one process; a file that cannot be read
    gets its own line and the others are still written; then one `m2y send` takes them all."""
    src = root / "zhenqiang" / "photo"
    src.mkdir(parents=True)
    names = ["a.jpg", "b.jpg", "c.jpg"]
    for name in names:
        (src / name).write_bytes(os.urandom(40_000))
    made = subprocess.run([*M2Y, "meta", *(str(src / n) for n in (names[0], "missing.jpg", *names[1:])),
                           "--from", "zhenqiang", "--to", "roland-frei", "--folder", "photo", "--root", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 2
    missing = src / "missing.jpg"
    assert made.stderr.strip().splitlines() == [f"m2y meta: cannot read {missing}: No such file or directory"]
    metas = [src / n.replace(".jpg", ".meta") for n in names]
    assert made.stdout.splitlines() == [f"wrote {m}" for m in metas]
    fields = [meta.read_meta_file(m) for m in metas]
    assert len({f["datetime"] for f in fields}) == 3
    sent = run_send(root, server.port, *metas)
    assert sent.returncode == 0, sent.stderr
    for name, f in zip(names, fields, strict=True):
        assert target(root, f).read_bytes() == (src / name).read_bytes()


def test_meta_again_keeps_an_unsent_meta_and_refuses_another_recipient(root: Path, server: ServerProcess) -> None:
    """`m2y meta` of a file whose .meta is not sent yet: to another recipient it is refused (replacing
    it, the first recipient silently got nothing); the same again keeps the .meta, so that the send
    it started goes on where it stopped (it started from byte 0)."""
    data, meta_path = make_file(root, 3 * 2**20)
    fields = meta.read_meta_file(meta_path)
    hs = handshake(root, server.port, fields)
    hs.client.sendall(sealed_frames(hs.cipher, data.read_bytes())[: 2 * 16 * (BLOCK_SIZE + 16)])
    assert wait_until(lambda: target(root, fields, ".part").exists())
    hs.client.close()  # cut off: the server keeps what came
    assert wait_until(lambda: "for a resend" in server.log())
    base = ["--from", "zhenqiang", "--folder", "photo", "--root", str(root)]
    other = subprocess.run([*M2Y, "meta", str(data), "--to", "mallory", *base], capture_output=True, text=True,
                           timeout=60)
    assert other.returncode == 2 and other.stdout == "", other
    assert other.stderr.strip().splitlines()[-1] == (
        f"m2y meta: {meta_path} is the .meta of 'myfoto.jpg' from 'zhenqiang' to 'roland-frei' (folder 'photo'), not "
        "sent yet: send it first (it becomes .done), or move it away, then run 'm2y meta' again")
    same = subprocess.run([*M2Y, "meta", str(data), "--to", "roland-frei", *base], capture_output=True, text=True,
                          timeout=60)
    assert same.returncode == 0 and same.stdout.startswith(f"kept {meta_path}: it is the .meta of this file"), same
    assert meta.read_meta_file(meta_path) == fields
    sent = run_send(root, server.port, meta_path)
    assert sent.returncode == 0 and f"resumed at {2 * 2**20}" in sent.stdout, sent
    assert target(root, fields).read_bytes() == data.read_bytes()


def test_meta_of_odd_files_fails_each_on_its_own_line(root: Path) -> None:
    """A name that is not UTF-8 is one line (not a traceback), a file named twice gets one .meta,
    a failed file takes no datetime; a missing home is said once, before any file is read."""
    src = root / "zhenqiang" / "photo"
    src.mkdir(parents=True)
    (src / "a.jpg").write_bytes(b"a")
    bad = os.fsencode(str(src)) + b"/bad\xff.jpg"
    with open(bad, "wb") as f:
        f.write(b"b")
    base = ["--from", "zhenqiang", "--to", "roland-frei", "--folder", "photo", "--root", str(root)]
    made = subprocess.run([*M2Y, "meta", str(src / "a.jpg"), os.fsdecode(bad), str(src / "a.jpg"), *base],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 2, made.stderr
    assert made.stdout.splitlines() == [f"wrote {src / 'a.meta'}"]
    assert len(made.stderr.strip().splitlines()) == 1 and "is not valid UTF-8; rename the file" in made.stderr
    nohome = subprocess.run([*M2Y, "meta", str(src / "a.jpg"), str(src / "a.jpg"), *base[:-1], str(root / "none")],
                            capture_output=True, text=True, timeout=60)
    assert nohome.returncode == 2 and len(nohome.stderr.strip().splitlines()) == 1, nohome.stderr
    assert "no home" in nohome.stderr


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_interrupted_send_resumes_where_it_broke_off(root: Path, workers: str) -> None:
    """A sender that goes away after 5 of 6 batches leaves all 5 on the server (those still in its
    ring when the connection closed are written too); `m2y send` of the same .meta then sends only
    the rest, and the file arrives whole, its CRC checked over all of it (inline, and with a worker,
    whose CRCs are joined)."""
    server = start_server(root, "--workers", workers)
    try:
        _interrupt_and_resume(root, server)
    finally:
        server.stop()


def test_another_meta_under_a_kept_name_fails_at_once_and_says_what_to_do(root: Path,
                                                                        server: ServerProcess) -> None:
    """Another .meta under the name of a kept part (one sender's two machines gave the same
    datetime): refused KEPT, which no retry clears before the part expires (it was BUSY, tried 3
    times over 7 s, and the file then told to 'send the .failed again later')."""
    data, meta_path = make_file(root, 5 * 2**20)
    fields = meta.read_meta_file(meta_path)
    hs = handshake(root, server.port, fields)
    hs.client.sendall(sealed_frames(hs.cipher, data.read_bytes())[: 2 * 16 * (BLOCK_SIZE + 16)])
    part = target(root, fields, ".part")
    assert wait_until(lambda: part.exists() and part.stat().st_size >= 2**20)
    hs.client.close()
    assert wait_until(lambda: "for a resend" in server.log())
    other = data.with_name("other.bin")  # the same sender and datetime, another file
    other.write_bytes(os.urandom(1000))
    other_meta = other.with_suffix(".meta")
    meta.write_meta_file(other_meta, meta.with_crc(dict(fields, filename="other.bin", filesize=1000,
                                                         fileCRC=crc64(other.read_bytes()))))
    started = time.monotonic()
    sent = run_send(root, server.port, other_meta)
    assert sent.returncode == 1 and time.monotonic() - started < 5, sent  # not retried
    assert sent.stderr.strip().splitlines() == [
        f"{other_meta}: FAILED: server refused: photo/zhenqiang_{fields['datetime']}: the part of an interrupted send "
        "is kept for a resend of the same .meta; another .meta under this name is refused until it expires (a new "
        ".meta, from m2y meta, gives the file another name) -> other.failed"], sent.stderr
    assert wait_until(lambda: "REFUSED KEPT" in server.log()), server.log()
    again = run_send(root, server.port, meta_path)  # the kept part's own .meta still resumes
    assert again.returncode == 0 and "resumed at 2097152" in again.stdout, again
    assert target(root, fields).read_bytes() == data.read_bytes()


def _interrupt_and_resume(root: Path, server: ServerProcess) -> None:
    size = 5 * 2**20 + 5
    data, meta_path = make_file(root, size)
    fields = meta.read_meta_file(meta_path)
    hs = handshake(root, server.port, fields)
    assert hs.first == 0
    frames = sealed_frames(hs.cipher, data.read_bytes())
    hs.client.sendall(frames[: 5 * 16 * (BLOCK_SIZE + 16)])  # five whole batches of 16 blocks, of six
    part = target(root, fields, ".part")
    assert wait_until(lambda: part.exists() and part.stat().st_size >= 2**20)
    hs.client.close()  # the network goes down
    assert wait_until(lambda: "for a resend" in server.log())
    kept = int(re.search(r"kept (\d+) B for a resend", server.log()).group(1))  # type: ignore[union-attr]
    assert kept == 5 * 2**20 and part.stat().st_size == kept
    failed = meta_path.rename(meta_path.with_suffix(".failed"))  # what a client that lost its link made of it
    again = run_send(root, server.port, failed)
    assert again.returncode == 0, again.stderr
    assert f"ACK, {size} bytes, resumed at {kept}: {size - kept} sent" in again.stdout
    assert meta_path.with_suffix(".done").exists() and not failed.exists()
    assert target(root, fields).read_bytes() == data.read_bytes()
    assert not part.exists()
    assert wait_until(lambda: f"ACK (resumed at {kept} B)" in server.log())
    line = [x for x in server.log().splitlines() if "ACK (resumed" in x][-1]
    assert f" {size - kept} B " in line  # the log counts what this connection received
