"""Bad input against a real server process: a clear refusal, nothing lost, and the server goes on serving."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from engine import envelope, meta
from engine.blocks import BLOCK_SIZE, TAG_LEN
from engine.crc import crc64
from engine.errors import RefuseCode
from engine.keys import load_private, load_public
from engine.protocol import Envelope, FileCRC, Header, Reply
from engine.users import private_key_path, public_key_path, user_hash

from .helpers import (
    RawClient,
    ServerProcess,
    handshake,
    make_file,
    payload_fields,
    run_send,
    sealed_frames,
    sealed_request,
    start_server,
    target,
    wait_until,
)


def assert_still_serves(root: Path, server: ServerProcess, size: int = 100_000) -> None:
    assert server.alive()
    data, meta_path = make_file(root, size, name=f"ok{time.monotonic_ns()}.bin")
    result = run_send(root, server.port, meta_path)
    assert result.returncode == 0, result.stderr
    fields = meta.read_meta_file(meta_path.with_suffix(".done"))
    assert target(root, fields).read_bytes() == data.read_bytes()


def fields_for(size: int = 1000, **changes: Any) -> dict[str, Any]:
    payload = os.urandom(size)
    fields = meta.make("zhenqiang", "roland-frei", "photo", "x.bin", size, crc64(payload))
    fields.update(changes)
    return meta.with_crc(fields)


def as_request(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` as a client sends them (with a nonce); a broken metaCRC stays broken."""
    valid = fields["metaCRC"] == meta.meta_crc(fields)
    out = meta.request(fields)
    if not valid:
        out["metaCRC"] ^= 1
    return out


def refuse_after_request(root: Path, server: ServerProcess, fields: dict[str, Any]) -> tuple[int, str]:
    fh, th, env = sealed_request(root, as_request(fields))
    with RawClient(server.port) as c:
        c.send_event(Header(len(env), fh, th))
        c.send_event(Envelope(env))
        return c.read_refusal()


def no_files_for(root: Path, fields: dict[str, Any]) -> bool:
    return not any(target(root, fields, s).exists() for s in (".data", ".part", ".meta"))


# -- header and envelope ------------------------------------------------------------------------


def test_unknown_recipient_hash(root: Path, server: ServerProcess) -> None:
    with RawClient(server.port) as c:
        c.sendall(struct.pack(">QQQ", 500, user_hash("zhenqiang"), user_hash("nobody")))
        code, reason = c.read_refusal()
    assert code == RefuseCode.UNKNOWN_RECIPIENT and "no user" in reason
    assert_still_serves(root, server)


def test_unknown_sender_key(root: Path, server: ServerProcess) -> None:
    fields = fields_for()
    fields.update({"from": "mallory"})
    fields = meta.with_crc(fields)
    fh, th, env = sealed_request(root, fields, sender="mallory")
    with RawClient(server.port) as c:
        c.send_event(Header(len(env), fh, th))
        code, reason = c.read_refusal()
    assert code == RefuseCode.UNKNOWN_SENDER and "no public key" in reason
    assert_still_serves(root, server)


def test_wrong_key_envelope(root: Path, server: ServerProcess) -> None:
    """Sealed with a key that is not the recipient's: the server cannot open it."""
    fields = fields_for()
    fh, th = user_hash("zhenqiang"), user_hash("roland-frei")
    wrong = load_public(public_key_path(root, "mallory", "mallory"))
    env = envelope.seal(wrong, meta.to_json(fields), envelope.aad(envelope.REQUEST, fh, th))
    with RawClient(server.port) as c:
        c.send_event(Header(len(env), fh, th))
        c.send_event(Envelope(env))
        code, reason = c.read_refusal()
    assert code == RefuseCode.BAD_ENVELOPE and "cannot decrypt" in reason
    assert no_files_for(root, fields)
    assert_still_serves(root, server)


@pytest.mark.parametrize("length", [0, 64 * 1024 + 1, 2**64 - 1])
def test_metadata_length_out_of_bounds(root: Path, server: ServerProcess, length: int) -> None:
    with RawClient(server.port) as c:
        c.sendall(struct.pack(">QQQ", length, user_hash("zhenqiang"), user_hash("roland-frei")))
        code, reason = c.read_refusal()
    assert code == RefuseCode.BAD_HEADER and "outside 1..65536" in reason
    assert_still_serves(root, server)


def test_garbage_envelope(root: Path, server: ServerProcess) -> None:
    junk = os.urandom(700)
    with RawClient(server.port) as c:
        c.sendall(struct.pack(">QQQ", len(junk), user_hash("zhenqiang"), user_hash("roland-frei")) + junk)
        code, _reason = c.read_refusal()
    assert code == RefuseCode.BAD_ENVELOPE
    assert_still_serves(root, server)


def test_meta_crc_mismatch(root: Path, server: ServerProcess) -> None:
    fields = fields_for()
    fields["metaCRC"] ^= 1
    code, reason = refuse_after_request(root, server, fields)
    assert code == RefuseCode.META_CRC and "metaCRC" in reason
    assert no_files_for(root, fields)
    assert_still_serves(root, server)


def test_from_does_not_match_header(root: Path, server: ServerProcess) -> None:
    fields = fields_for()
    _fh, th, env = sealed_request(root, fields)
    with RawClient(server.port) as c:  # header claims roland-frei sends, metadata says zhenqiang
        c.send_event(Header(len(env), user_hash("roland-frei"), th))
        c.send_event(Envelope(env))
        code, _ = c.read_refusal()
    assert code == RefuseCode.BAD_ENVELOPE  # the AAD binds the hashes: the envelope does not open
    assert_still_serves(root, server)


@pytest.mark.parametrize("folder", ["../escape", "photo/../../escape", "/etc", "pho\x00to"])
def test_unsafe_folder(root: Path, server: ServerProcess, folder: str) -> None:
    fields = fields_for(folder=folder)
    code, reason = refuse_after_request(root, server, fields)
    assert code == RefuseCode.UNSAFE_PATH and "folder" in reason
    assert not (root / "escape").exists() and not (root.parent / "escape").exists()
    assert_still_serves(root, server)


# -- limits ---------------------------------------------------------------------------------------


def test_filesize_over_limit(root: Path) -> None:
    srv = start_server(root, "--max-file-size", "5KB")  # 5000: sizes take units
    try:
        fields = fields_for(6000)
        code, reason = refuse_after_request(root, srv, fields)
        assert code == RefuseCode.TOO_LARGE and "limit of 5000" in reason
        assert no_files_for(root, fields)
        assert_still_serves(root, srv, size=4000)
    finally:
        assert srv.stop() == 0


def test_filesize_over_free_disk(root: Path) -> None:
    srv = start_server(root, "--max-file-size", str(2**63))
    try:
        fields = fields_for(1000)
        fields["filesize"] = 2**62
        fields = meta.with_crc(fields)
        code, reason = refuse_after_request(root, srv, fields)
        assert code == RefuseCode.NO_SPACE and "free" in reason
        assert no_files_for(root, fields)
        assert_still_serves(root, srv)
    finally:
        assert srv.stop() == 0


# -- the data stream --------------------------------------------------------------------------------


def test_tampered_block(root: Path, server: ServerProcess) -> None:
    payload, fields = payload_fields(3 * BLOCK_SIZE + 100)
    hs = handshake(root, server.port, fields)
    frames = bytearray(sealed_frames(hs.cipher, payload))
    frames[BLOCK_SIZE + TAG_LEN + 5] ^= 0x01  # one bit of block 1
    with hs.client as c:
        hs.send_frames(bytes(frames))
        code, reason = c.read_refusal()
    assert code == RefuseCode.BAD_BLOCK and "block 1" in reason
    assert wait_until(lambda: no_files_for(root, fields))
    assert_still_serves(root, server)


def test_wrong_final_crc(root: Path, server: ServerProcess) -> None:
    payload, fields = payload_fields(100_000)
    hs = handshake(root, server.port, fields)
    with hs.client as c:
        hs.send_frames(sealed_frames(hs.cipher, payload))
        c.send_event(FileCRC(hs.cipher.seal_crc(crc64(payload) ^ 0xFF)))
        code, reason = c.read_refusal()
    assert code == RefuseCode.BAD_CRC and "the CRC frame says" in reason
    assert wait_until(lambda: no_files_for(root, fields))
    assert_still_serves(root, server)


def test_bytes_differ_from_the_metadata_crc(root: Path, server: ServerProcess) -> None:
    """What a file changed after its .meta gives: the CRC frame carries the .meta's fileCRC (as the
    client sends it), every block authenticates, and only the server's own CRC can tell."""
    payload, fields = payload_fields(100_000)
    other = bytearray(payload)
    other[54_321] ^= 0x10
    hs = handshake(root, server.port, fields)
    with hs.client as c:
        hs.send_frames(sealed_frames(hs.cipher, bytes(other)))
        c.send_event(FileCRC(hs.cipher.seal_crc(fields["fileCRC"])))
        code, reason = c.read_refusal()
    assert code == RefuseCode.BAD_CRC and "differs from the metadata's fileCRC" in reason
    assert wait_until(lambda: no_files_for(root, fields))
    assert_still_serves(root, server)


def test_crc_frame_not_sealed_with_filekey(root: Path, server: ServerProcess) -> None:
    payload, fields = payload_fields(0)
    hs = handshake(root, server.port, fields)
    with hs.client as c:
        c.sendall(struct.pack(">Q", crc64(payload)) + bytes(16))  # a plain CRC, as an attacker would
        code, _ = c.read_refusal()
    assert code == RefuseCode.BAD_CRC
    assert wait_until(lambda: no_files_for(root, fields))
    assert_still_serves(root, server)


def test_disconnect_mid_file(root: Path, server: ServerProcess) -> None:
    payload, fields = payload_fields(20 * BLOCK_SIZE)
    hs = handshake(root, server.port, fields)
    frames = sealed_frames(hs.cipher, payload)
    hs.client.sendall(frames[: len(frames) // 2])
    assert wait_until(lambda: target(root, fields, ".part").exists())
    hs.client.close()
    assert wait_until(lambda: no_files_for(root, fields))
    assert wait_until(lambda: "closed the connection" in server.log())
    assert_still_serves(root, server)


def test_silent_client_before_header(root: Path, server: ServerProcess) -> None:
    started = time.monotonic()
    with RawClient(server.port) as c:
        c.sendall(b"\x00" * 10)  # part of a header, then silence
        code, reason = c.read_refusal()
    assert code == RefuseCode.TIMEOUT and "idle" in reason
    assert 2.5 < time.monotonic() - started < 15
    assert_still_serves(root, server)


def test_silent_client_mid_file(root: Path, server: ServerProcess) -> None:
    payload, fields = payload_fields(10 * BLOCK_SIZE)
    hs = handshake(root, server.port, fields)
    with hs.client as c:
        c.sendall(sealed_frames(hs.cipher, payload)[: 3 * BLOCK_SIZE])
        code, _ = c.read_refusal()
    assert code == RefuseCode.TIMEOUT
    assert wait_until(lambda: no_files_for(root, fields))
    assert_still_serves(root, server)


def test_same_from_datetime_never_overwrites(root: Path, server: ServerProcess) -> None:
    data, meta_path = make_file(root, 70_000)
    first = run_send(root, server.port, meta_path)
    assert first.returncode == 0, first.stderr
    fields = meta.read_meta_file(meta_path.with_suffix(".done"))
    stored = target(root, fields).read_bytes()
    # The same .meta again, now naming different bytes of the same size.
    data.write_bytes(os.urandom(70_000))
    fields2 = dict(fields, fileCRC=crc64(data.read_bytes()))
    meta_path.write_bytes(meta.to_json(meta.with_crc(fields2)))
    second = run_send(root, server.port, meta_path)
    assert second.returncode != 0
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert "the server already holds another file under this .meta's name" in second.stderr
    assert "make a new .meta for myfoto.jpg (m2y meta)" in second.stderr
    assert meta_path.with_suffix(".failed").exists()
    assert target(root, fields).read_bytes() == stored
    assert "EXISTS: the name holds another file" in server.log()
    assert_still_serves(root, server)


def test_the_same_file_again_is_acked_without_sending_it(root: Path, server: ServerProcess) -> None:
    """A sender whose ACK got lost sends again: the server, which holds this very file, says so in
    its REPLY (sealed to the sender, echoing its nonce), and the .meta becomes .done."""
    data, meta_path = make_file(root, 3 * BLOCK_SIZE + 5)
    assert run_send(root, server.port, meta_path).returncode == 0
    fields = meta.read_meta_file(meta_path.with_suffix(".done"))
    meta_path.with_suffix(".done").rename(meta_path)  # as if the ACK had been lost
    again = run_send(root, server.port, meta_path)
    assert again.returncode == 0, again.stderr
    assert f"the server already holds these {3 * BLOCK_SIZE + 5} bytes from an earlier send" in again.stdout
    assert "nothing sent again" in again.stdout
    assert meta_path.with_suffix(".done").exists() and not meta_path.exists()
    assert target(root, fields).read_bytes() == data.read_bytes()
    assert wait_until(lambda: "already received: the same file again" in server.log())
    assert not target(root, fields, ".part").exists()
    assert_still_serves(root, server)


def test_a_stranger_cannot_tell_the_same_file_from_another(root: Path, server: ServerProcess) -> None:
    """Before the first block nothing is authenticated: anyone with the recipient's public key can
    make a request. For a taken name, "the same file" and "another file" must look alike from
    outside: a REPLY of the same length, then the server closes. Only the sender can read which."""
    payload, fields = payload_fields(2 * BLOCK_SIZE)
    hs = handshake(root, server.port, fields)
    hs.send_frames(sealed_frames(hs.cipher, payload))
    hs.client.send_event(FileCRC(hs.cipher.seal_crc(crc64(payload))))
    hs.client.next_event()
    hs.client.close()
    assert target(root, fields).read_bytes() == payload
    seen = {}
    for label, guess in (("same", fields), ("other", dict(fields, fileCRC=fields["fileCRC"] ^ 1)),
                         ("other size", dict(fields, filesize=fields["filesize"] + 1))):
        sent = meta.request(meta.with_crc(guess))
        fh, th, env = sealed_request(root, sent)
        with RawClient(server.port, timeout=10) as client:
            client.send_event(Header(len(env), fh, th))
            client.send_event(Envelope(env))
            event = client.next_event()
            assert isinstance(event, Reply), label
            assert client.sock.recv(1) == b"", label  # the server closes: no refusal to read
        plain = envelope.open_(load_private(private_key_path(root, fields["from"])), event.envelope,
                               envelope.aad(envelope.REPLY, fh, th))
        # The metaCRC's digits vary with the random filekey, alike whatever the answer.
        seen[label] = len(event.envelope) - len(str(json.loads(plain)["metaCRC"]))
        received = meta.check_reply(sent, plain)[2]  # what only the sender can read
        assert received == (meta.SAME_FILE if label == "same" else meta.OTHER_FILE), label
    assert len(set(seen.values())) == 1, seen
    assert target(root, fields).read_bytes() == payload


def test_same_transfer_twice_at_once(root: Path, server: ServerProcess) -> None:
    payload, fields = payload_fields(5 * BLOCK_SIZE)
    hs = handshake(root, server.port, fields)
    try:
        code, reason = refuse_after_request(root, server, fields)
        assert code == RefuseCode.BUSY and "right now" in reason
        hs.send_frames(sealed_frames(hs.cipher, payload))
        hs.client.send_event(FileCRC(hs.cipher.seal_crc(crc64(payload))))
        from engine.protocol import Ack

        event = hs.client.next_event()
        assert isinstance(event, Ack)
        assert hs.cipher.open_ack(event.sealed) == (len(payload), crc64(payload))
    finally:
        hs.client.close()
    assert target(root, fields).read_bytes() == payload


def test_server_survives_a_flood_of_junk_connections(root: Path, server: ServerProcess) -> None:
    for i in range(30):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(os.urandom(i * 7))
    assert_still_serves(root, server)


def test_too_many_clients_are_refused_as_busy(root: Path) -> None:
    srv = start_server(root, "--max-clients", "2")
    try:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(2)]
        time.sleep(0.3)
        with RawClient(srv.port) as c:
            code, reason = c.read_refusal()
        assert code == RefuseCode.BUSY and reason == "server busy: 2 transfers in progress; try again later"
        assert wait_until(lambda: "REFUSED BUSY: --max-clients 2 reached" in srv.log()), srv.log()
        with RawClient(srv.port) as c:  # within the minute: counted, said at its end or at the stop
            assert c.read_refusal()[0] == RefuseCode.BUSY
        for s in held:
            s.close()
        assert wait_until(lambda: srv.alive())
        time.sleep(0.3)
        assert_still_serves(root, srv)
        # The two held connections closed without a word: that is said as such, with where they came from.
        assert wait_until(lambda: srv.log().count("CLIENT GONE: peer closed the connection in state HEADER") == 2)
        assert re.search(r"127\.0\.0\.1:\d+ \? 0 B .* CLIENT GONE", srv.log()), srv.log()
        assert "BAD_HEADER" not in srv.log()
    finally:
        assert srv.stop() == 0
    busy = [line for line in srv.log().splitlines() if "REFUSED BUSY" in line]
    assert len(busy) == 2 and "(1 connection(s) refused since the last such line" in busy[1], busy


def trickle(c: RawClient, pieces: list[bytes]) -> tuple[int, str]:
    """Send one piece every 0.5 s until the server answers (bounded by len(pieces)); return its refusal."""
    for piece in pieces:
        try:
            c.sendall(piece)
        except OSError:
            break
        c.sock.settimeout(0.5)
        try:
            if c.sock.recv(1, socket.MSG_PEEK):
                break
        except TimeoutError:
            continue
    c.sock.settimeout(10)
    return c.read_refusal()


def test_trickled_handshake_hits_the_handshake_deadline(root: Path) -> None:
    """One byte every 0.5 s keeps the idle timer happy but not the handshake deadline."""
    srv = start_server(root, "--idle-timeout", "3", "--handshake-timeout", "2")
    try:
        started = time.monotonic()
        header = struct.pack(">QQQ", 500, user_hash("zhenqiang"), user_hash("roland-frei"))
        with RawClient(srv.port) as c:
            code, reason = trickle(c, [header[i : i + 1] if i < len(header) else b"\x00" for i in range(40)])
        assert code == RefuseCode.TIMEOUT and "within 2 s" in reason
        assert time.monotonic() - started < 6
        assert_still_serves(root, srv)
    finally:
        assert srv.stop() == 0


def test_trickled_blocks_hit_the_first_block_deadline(root: Path) -> None:
    srv = start_server(root, "--idle-timeout", "3")
    try:
        payload, fields = payload_fields(20 * BLOCK_SIZE)
        hs = handshake(root, srv.port, fields)
        started = time.monotonic()
        frames = sealed_frames(hs.cipher, payload)
        with hs.client as c:
            code, reason = trickle(c, [frames[i * 100 : (i + 1) * 100] for i in range(40)])
        assert code == RefuseCode.TIMEOUT and "no authenticated block" in reason
        assert time.monotonic() - started < 8
        assert wait_until(lambda: no_files_for(root, fields))
        assert_still_serves(root, srv)
    finally:
        assert srv.stop() == 0


def test_a_broken_private_key_of_another_user_does_not_stop_the_server(root: Path) -> None:
    from Crypto.IO import PEM
    from Crypto.PublicKey import RSA
    from Crypto.Util.asn1 import DerSequence

    path = root / "mallory" / "privateKey" / "mallory.data"
    k = RSA.import_key(path.read_bytes())
    path.write_text(PEM.encode(DerSequence([0, k.n, k.e, k.d, 1, k.n, 1, 1, 1]).encode(), "RSA PRIVATE KEY"))
    srv = start_server(root)
    try:
        assert "skipping key" in srv.log() and "mallory" in srv.log()
        assert_still_serves(root, srv)
    finally:
        assert srv.stop() == 0
