"""Real processes on loopback: start ``m2y serve``, run ``m2y send``, and a raw client for bad input."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import envelope, meta
from engine.blocks import BLOCK_SIZE, TAG_LEN, BlockCipher, block_count
from engine.crc import crc64
from engine.keys import load_private, load_public
from engine.protocol import NEED_DATA, Connection, Event, Role, frames_size
from engine.users import private_key_path, public_key_path, user_hash

M2Y = [sys.executable, "-m", "cli"]
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


@dataclass
class ServerProcess:
    root: Path
    proc: subprocess.Popen[str]
    port: int
    stderr_path: Path
    stopped: bool = field(default=False)

    def log(self) -> str:
        return self.stderr_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.stopped = True
        return self.proc.returncode


def start_server(root: Path, *extra: str, timeout: float = 20, command: list[str] = M2Y) -> ServerProcess:
    """``command``: how to run the CLI (a wrapper that injects a fault, say); ``m2y`` by default."""
    stderr_path = root.parent / f"serve-{time.monotonic_ns()}.log"
    err = open(stderr_path, "w")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [*command, "serve", "--root", str(root), "--host", "127.0.0.1", "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=err, text=True,
    )
    err.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if m := _LISTENING.search(line):
            return ServerProcess(root, proc, int(m.group(1)), stderr_path)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"server did not start: {line!r} {stderr_path.read_text()}")


def run_send(root: Path, port: int, *metas: Path, timeout: float = 120, extra: tuple[str, ...] = ()
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*M2Y, "send", *map(str, metas), "--root", str(root), "--port", str(port), *extra],
        capture_output=True, text=True, timeout=timeout,
    )


_seq = iter(range(10**6))


def make_file(root: Path, size: int, sender: str = "zhenqiang", recipient: str = "roland-frei",
              folder: str = "photo", name: str = "myfoto.jpg", subdir: str = "photo") -> tuple[Path, Path]:
    """Write ``size`` random bytes and their .meta under the sender's home; returns (data, meta)."""
    d = root / sender / subdir
    d.mkdir(parents=True, exist_ok=True)
    data = d / name
    payload = os.urandom(size)
    data.write_bytes(payload)
    # A distinct datetime per file, so files of one test never collide on the server.
    when = dt.datetime(2018, 12, 30, 23, 59, 59) - dt.timedelta(seconds=next(_seq))
    fields = meta.make(sender, recipient, folder, name, size, crc64(payload), when)
    meta_path = data.with_suffix(".meta")
    meta_path.write_bytes(meta.to_json(fields))
    return data, meta_path


def payload_fields(size: int) -> tuple[bytes, dict[str, Any]]:
    """``size`` random bytes and metadata for them, for clients that speak the protocol by hand."""
    payload = os.urandom(size)
    return payload, meta.make("zhenqiang", "roland-frei", "photo", "x.bin", size, crc64(payload))


def received(root: Path, meta_path: Path) -> Path:
    fields = meta.read_meta_file(meta_path) if meta_path.exists() else None
    assert fields is not None
    return root / fields["to"] / fields["folder"] / f"{fields['from']}_{fields['datetime']}.data"


def target(root: Path, fields: dict[str, Any], suffix: str = ".data") -> Path:
    return root / fields["to"] / fields["folder"] / f"{fields['from']}_{fields['datetime']}{suffix}"


class RawClient:
    """Speaks the protocol by hand over a blocking socket, so tests can break it on purpose."""

    def __init__(self, port: int, timeout: float = 20) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.conn = Connection(Role.CLIENT)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sendall(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def send_event(self, event: Event) -> None:
        for chunk in self.conn.send(event):
            self.sock.sendall(chunk)

    def next_event(self) -> Event:
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Event)
                return event
            buf = self.conn.get_buffer()
            n = self.sock.recv_into(buf)
            self.conn.buffer_updated(n)

    def read_refusal(self) -> tuple[int, str]:
        """Read whatever the server sends until it closes; return the REFUSED code and reason."""
        from engine.protocol import Refused

        event = self.next_event()
        assert isinstance(event, Refused), f"expected a refusal, got {event!r}"
        return event.code, event.reason


@dataclass
class Handshake:
    client: RawClient
    fields: dict[str, Any]
    cipher: BlockCipher
    received: int = 0  # the reply's "received": meta.NEW, SAME_FILE or OTHER_FILE
    first: int = 0  # the reply's "resume": the block to send from

    def send_frames(self, frames: bytes) -> None:
        """Send all block frames through the protocol (their content may be tampered with)."""
        from engine.protocol import Blocks

        count = block_count(self.fields["filesize"])
        if count:
            self.client.send_event(Blocks(0, count, memoryview(frames)))


def sealed_request(root: Path, fields: dict[str, Any], sender: str | None = None,
                   recipient_key_owner: str | None = None) -> tuple[int, int, bytes]:
    """(from_hash, to_hash, envelope) for ``fields``, sealed with the recipient's public key as the sender holds it."""
    sender = sender or fields["from"]
    to = fields["to"]
    pub = load_public(public_key_path(root, recipient_key_owner or sender, to))
    fh, th = user_hash(fields["from"]), user_hash(to)
    return fh, th, envelope.seal(pub, meta.to_json(fields), envelope.aad(envelope.REQUEST, fh, th))


def handshake(root: Path, port: int, fields: dict[str, Any]) -> Handshake:
    """Send header and envelope, read the reply, and return the transfer's cipher."""
    from engine.protocol import Envelope, Header, Reply

    sent = meta.request(fields)
    fh, th, env = sealed_request(root, sent)
    client = RawClient(port)
    client.send_event(Header(len(env), fh, th))
    client.send_event(Envelope(env))
    event = client.next_event()
    assert isinstance(event, Reply), f"expected a reply, got {event!r}"
    priv = load_private(private_key_path(root, fields["from"]))
    plain = envelope.open_(priv, event.envelope, envelope.aad(envelope.REPLY, fh, th))
    filekey, salt, received, first = meta.check_reply(sent, plain)
    client.conn.set_filesize(fields["filesize"], first)
    return Handshake(client, fields, BlockCipher(filekey, salt), received, first)


def sealed_frames(cipher: BlockCipher, payload: bytes) -> bytes:
    """All block frames of ``payload`` back to back."""
    out = bytearray(frames_size(len(payload), 0, block_count(len(payload))))
    view = memoryview(out)
    pos = 0
    for i in range(block_count(len(payload))):
        chunk = payload[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
        cipher.encrypt_into(i, chunk, view[pos : pos + len(chunk) + TAG_LEN])
        pos += len(chunk) + TAG_LEN
    return bytes(out)


def wait_until(predicate: Any, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
