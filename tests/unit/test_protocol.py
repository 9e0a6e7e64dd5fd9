"""The sans-I/O protocol, with a client and a server Connection joined in memory (no sockets).

Expected wire bytes, frame sizes and region layouts are computed here from the format
(struct, AESGCM, arithmetic), not taken from the engine.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.blocks import BlockCipher
from engine.crc import reference_crc64
from engine.errors import LocalProtocolError, RefuseCode, RemoteProtocolError
from engine.protocol import (
    DEFAULT_MAX_ENVELOPE,
    NEED_DATA,
    Ack,
    Blocks,
    Connection,
    ConnectionClosed,
    Envelope,
    Event,
    FileCRC,
    Header,
    Refused,
    Reply,
    Role,
    State,
    frame_offsets,
    frames_size,
)

BLOCK = 64 * 1024
TAG = 16
FILEKEY = bytes(range(16))
SALT = b"salt"
FROM_HASH = 0x0102030405060708
TO_HASH = 0xF1F2F3F4F5F6F7F8
ENVELOPE = b"\x01request envelope\xff" * 7
REPLY = b"\x02reply envelope\xfe" * 9
SIZES = [0, 1, 65535, 65536, 65537, 3 * 65536 + 5]

Feeder = Callable[[Connection, bytes], None]


# -- feeding bytes ----------------------------------------------------------------------------


def feed_whole(conn: Connection, data: bytes) -> None:
    if data:  # b"" would mean EOF
        conn.receive_data(data)


def feed_bytewise(conn: Connection, data: bytes) -> None:
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])


def feed_random(seed: int) -> Feeder:
    rng = random.Random(seed)

    def feed(conn: Connection, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 2, 15, 16, 17, 23, 24, 25, 4096, BLOCK + TAG, BLOCK + TAG + 1, rng.randint(1, 300_000)])
            conn.receive_data(data[pos : pos + n])
            pos += n

    return feed


def feed_recv_into(seed: int) -> Feeder:
    """The zero-copy way the server reads: short writes into get_buffer(), then buffer_updated(n)."""
    rng = random.Random(seed)

    def feed(conn: Connection, data: bytes) -> None:
        view = memoryview(data)
        while view:
            buf = conn.get_buffer()
            assert len(buf) > 0
            n = min(len(buf), len(view), rng.randint(1, 100_000))
            buf[:n] = view[:n]
            conn.buffer_updated(n)
            view = view[n:]

    return feed


def make_feeder(name: str, seed: int) -> Feeder:
    if name == "whole":
        return feed_whole
    if name == "bytewise":
        return feed_bytewise
    if name == "random":
        return feed_random(seed)
    return feed_recv_into(seed)


# -- the pair -------------------------------------------------------------------------------------


class ConnectionPair:
    """A client and a server Connection; what one's send() returns is fed to the other's receive_data()."""

    def __init__(
        self, *, batch: int = 16, max_envelope: int = DEFAULT_MAX_ENVELOPE, feeder: Feeder = feed_whole
    ) -> None:
        self.regions: list[memoryview] = []
        self.feeder = feeder
        self.client = Connection(Role.CLIENT, max_envelope=max_envelope)
        self.server = Connection(Role.SERVER, max_envelope=max_envelope, batch=batch, allocator=self._allocate)

    def _allocate(self, nbytes: int) -> memoryview:
        region = memoryview(bytearray(nbytes))  # a fresh region each time: events stay valid
        self.regions.append(region)
        return region

    def peer(self, conn: Connection) -> Connection:
        return self.server if conn is self.client else self.client

    def send(self, conn: Connection, *events: Event) -> bytes:
        data = wire(conn, *events)
        self.feeder(self.peer(conn), data)
        return data

    def close(self, conn: Connection) -> None:
        """``conn``'s side closes: its peer sees EOF."""
        self.peer(conn).receive_data(b"")


def wire(conn: Connection, *events: Event) -> bytes:
    return b"".join(bytes(chunk) for event in events for chunk in conn.send(event))


def drain(conn: Connection) -> list[Event]:
    out: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        assert isinstance(event, Event)
        out.append(event)


def file_bytes(filesize: int) -> bytes:
    return random.Random(filesize).randbytes(filesize)


def seal_frames(data: bytes) -> list[bytes]:
    """Block frames built directly with AES-GCM: nonce = salt || index (u64 BE), no AAD."""
    aead = AESGCM(FILEKEY)
    return [
        aead.encrypt(SALT + struct.pack(">Q", i), data[off : off + BLOCK], None)
        for i, off in enumerate(range(0, len(data), BLOCK))
    ]


def blocks_of(events: list[Event]) -> list[Blocks]:
    out = []
    for event in events:
        assert isinstance(event, Blocks)
        out.append(event)
    return out


def to_data_phase(pair: ConnectionPair, filesize: int) -> None:
    client, server = pair.client, pair.server
    pair.send(client, Header(len(ENVELOPE), FROM_HASH, TO_HASH), Envelope(ENVELOPE))
    assert drain(server) == [Header(len(ENVELOPE), FROM_HASH, TO_HASH), Envelope(ENVELOPE)]
    server.set_filesize(filesize)
    pair.send(server, Reply(REPLY))
    assert drain(client) == [Reply(REPLY)]
    client.set_filesize(filesize)


# -- the whole conversation -----------------------------------------------------------------------


def run_conversation(filesize: int, server_batch: int, client_batch: int, feeder: Feeder) -> None:
    pair = ConnectionPair(batch=server_batch, feeder=feeder)
    client, server = pair.client, pair.server
    cipher = BlockCipher(FILEKEY, SALT)
    data = file_bytes(filesize)
    nblocks = (filesize + BLOCK - 1) // BLOCK
    assert client.state is State.HEADER and server.state is State.HEADER

    sent = pair.send(client, Header(len(ENVELOPE), FROM_HASH, TO_HASH), Envelope(ENVELOPE))
    assert sent == struct.pack(">QQQ", len(ENVELOPE), FROM_HASH, TO_HASH) + ENVELOPE
    assert drain(server) == [Header(len(ENVELOPE), FROM_HASH, TO_HASH), Envelope(ENVELOPE)]
    assert client.state is State.REPLY and server.state is State.REPLY

    server.set_filesize(filesize)
    sent = pair.send(server, Reply(REPLY))
    assert sent == struct.pack(">QQ", 1, len(REPLY)) + REPLY
    assert drain(client) == [Reply(REPLY)]
    client.set_filesize(filesize)
    expected_state = State.DATA if filesize else State.CRC
    assert client.state is expected_state and server.state is expected_state

    # The client's whole data phase as one byte stream; the feeder decides how it arrives.
    frames = seal_frames(data)
    assert len(frames) == nblocks
    stream = bytearray()
    for first in range(0, nblocks, client_batch):
        group = frames[first : first + client_batch]
        region = memoryview(b"".join(group))
        out = client.send(Blocks(first, len(group), region))
        assert len(out) == 1 and out[0] is region  # block bytes pass through, not copied
        stream += region
    assert client.state is State.CRC
    assert client.blocks_remaining() == 0
    crc = reference_crc64(data)
    sealed_crc = cipher.seal_crc(crc)
    stream += wire(client, FileCRC(sealed_crc))
    assert client.state is State.ACK
    assert bytes(stream) == b"".join(frames) + sealed_crc
    feeder(server, bytes(stream))

    events = drain(server)
    assert events[-1] == FileCRC(sealed_crc)
    blocks = blocks_of(events[:-1])
    groups = [(first, min(server_batch, nblocks - first)) for first in range(0, nblocks, server_batch)]
    assert [(b.first, b.count) for b in blocks] == groups
    region_sizes = [sum(len(f) for f in frames[first : first + count]) for first, count in groups]
    assert [len(r) for r in pair.regions] == region_sizes
    assert [frames_size(filesize, first, count) for first, count in groups] == region_sizes
    for event, region in zip(blocks, pair.regions, strict=True):
        assert event.data is region  # delivered in the allocator's region, no copy
    assert b"".join(bytes(b.data) for b in blocks) == b"".join(frames)
    received = bytearray()
    for event in blocks:
        for index, offset, size in frame_offsets(filesize, event.first, event.count):
            plain = bytearray(size - TAG)
            cipher.decrypt_into(index, event.data[offset : offset + size], memoryview(plain))
            received += plain
    assert bytes(received) == data
    assert server.state is State.ACK

    sealed_ack = cipher.seal_ack(filesize, crc)
    sent = pair.send(server, Ack(sealed_ack))
    assert sent == struct.pack(">QQ", 2, 32) + sealed_ack
    assert drain(client) == [Ack(sealed_ack)]
    assert cipher.open_ack(sealed_ack) == (filesize, crc)
    assert client.state is State.DONE and server.state is State.DONE

    pair.close(client)
    assert drain(server) == [ConnectionClosed()]
    pair.close(server)
    assert drain(client) == [ConnectionClosed()]
    assert server.state is State.CLOSED and client.state is State.CLOSED
    assert client.next_event() is NEED_DATA and server.next_event() is NEED_DATA


@pytest.mark.parametrize("feeder_name", ["whole", "random", "recv_into", "bytewise"])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("filesize", SIZES)
def test_full_conversation(filesize: int, batch: int, feeder_name: str) -> None:
    run_conversation(filesize, batch, batch, make_feeder(feeder_name, seed=filesize * 37 + batch))


@pytest.mark.parametrize(("client_batch", "server_batch"), [(1, 16), (16, 1), (3, 2), (2, 3), (5, 16)])
def test_client_and_server_batches_differ(client_batch: int, server_batch: int) -> None:
    run_conversation(7 * BLOCK + 1, server_batch, client_batch, feed_random(client_batch * 10 + server_batch))


def test_default_batch_region_is_16_frames() -> None:
    pair = ConnectionPair()
    to_data_phase(pair, 20 * BLOCK)
    assert len(pair.server.get_buffer()) == 16 * (BLOCK + TAG)


@settings(max_examples=40, deadline=None)
@given(
    filesize=st.sampled_from([0, 1, 17, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3]),
    batch=st.integers(min_value=1, max_value=3),
    cuts=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=20),
)
def test_random_split_points(filesize: int, batch: int, cuts: list[float]) -> None:
    def feed(conn: Connection, data: bytes) -> None:
        points = sorted({0, len(data), *(int(c * len(data)) for c in cuts)})
        for start, end in itertools.pairwise(points):
            conn.receive_data(data[start:end])

    run_conversation(filesize, batch, batch, feed)


def test_server_loop_with_default_allocator() -> None:
    """Like the asyncio server: drain events before every read; the reused scratch region is then safe."""
    filesize = 5 * BLOCK + 7
    server = Connection(Role.SERVER, batch=2)
    client = Connection(Role.CLIENT)
    server.receive_data(wire(client, Header(len(ENVELOPE), 1, 2), Envelope(ENVELOPE)))
    assert len(drain(server)) == 2
    server.set_filesize(filesize)
    client.receive_data(wire(server, Reply(REPLY)))
    assert drain(client) == [Reply(REPLY)]
    client.set_filesize(filesize)
    data = file_bytes(filesize)
    frames = seal_frames(data)
    stream = memoryview(wire(client, Blocks(0, len(frames), memoryview(b"".join(frames)))) + b"c" * 24)
    rng = random.Random(5)
    got: list[tuple[int, int, bytes]] = []
    while True:
        event = server.next_event()
        if isinstance(event, FileCRC):
            break
        if isinstance(event, Blocks):
            got.append((event.first, event.count, bytes(event.data)))
            continue
        buf = server.get_buffer()
        n = min(len(buf), len(stream), rng.randint(1, 200_000))
        buf[:n] = stream[:n]
        server.buffer_updated(n)
        stream = stream[n:]
    assert [(first, count) for first, count, _ in got] == [(0, 2), (2, 2), (4, 2)]
    assert b"".join(chunk for _, _, chunk in got) == b"".join(frames)


def test_receive_data_whole_stream_with_default_allocator() -> None:
    filesize = 2 * BLOCK
    server = Connection(Role.SERVER, batch=1)
    client = Connection(Role.CLIENT)
    server.receive_data(wire(client, Header(len(ENVELOPE), 1, 2), Envelope(ENVELOPE)))
    drain(server)
    server.set_filesize(filesize)
    client.receive_data(wire(server, Reply(REPLY)))
    drain(client)
    client.set_filesize(filesize)
    frames = seal_frames(file_bytes(filesize))
    server.receive_data(wire(client, Blocks(0, 2, memoryview(b"".join(frames)))))
    blocks = blocks_of(drain(server))
    assert [bytes(b.data) for b in blocks] == frames


def test_server_sets_filesize_after_reply() -> None:
    for filesize, state in [(0, State.CRC), (1, State.DATA)]:
        server = Connection(Role.SERVER)
        server.receive_data(struct.pack(">QQQ", 3, 1, 2) + b"env")
        drain(server)
        server.send(Reply(b"r"))
        assert server.state is State.DATA
        server.set_filesize(filesize)
        assert server.state is state
        with pytest.raises(LocalProtocolError):
            server.set_filesize(filesize)


# -- golden bytes ---------------------------------------------------------------------------------


def test_golden_header_bytes() -> None:
    header = Header(0x0102030405060708, 0x1112131415161718, 0xF1F2F3F4F5F6F7F8)
    expected = bytes.fromhex("0102030405060708 1112131415161718 f1f2f3f4f5f6f7f8")
    assert wire(Connection(Role.CLIENT), header) == expected
    assert struct.pack(">QQQ", 0x0102030405060708, 0x1112131415161718, 0xF1F2F3F4F5F6F7F8) == expected
    server = Connection(Role.SERVER, max_envelope=2**64 - 1)
    server.receive_data(expected)
    assert drain(server) == [header]


def test_golden_small_header() -> None:
    header = Header(300, 0x2BD806C97F0E00AF, 1)
    expected = bytes.fromhex("000000000000012c 2bd806c97f0e00af 0000000000000001")
    assert wire(Connection(Role.CLIENT), header) == expected


def test_golden_server_messages() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(struct.pack(">QQQ", 3, 1, 2) + b"env")
    drain(server)
    assert wire(server, Reply(b"abc")) == bytes.fromhex("0000000000000001 0000000000000003") + b"abc"
    refusal = wire(server, Refused(11, "busy"))
    assert refusal == bytes.fromhex("0000000000000003 000000000000000c 000000000000000b") + b"busy"


def test_envelope_and_crc_are_sent_raw() -> None:
    client = Connection(Role.CLIENT)
    wire(client, Header(5, 1, 2))
    assert wire(client, Envelope(b"12345")) == b"12345"


# -- header checks on the server ------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 101, 2**32, 2**64 - 1])
def test_envelope_length_out_of_range(length: int) -> None:
    server = Connection(Role.SERVER, max_envelope=100)
    with pytest.raises(RemoteProtocolError) as exc:
        server.receive_data(struct.pack(">QQQ", length, 1, 2))
    assert exc.value.code is RefuseCode.BAD_HEADER
    assert str(length) in exc.value.reason
    assert server.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        server.get_buffer()


@pytest.mark.parametrize("length", [1, 100])
def test_envelope_length_bounds_accepted(length: int) -> None:
    server = Connection(Role.SERVER, max_envelope=100)
    server.receive_data(struct.pack(">QQQ", length, 1, 2))
    assert drain(server) == [Header(length, 1, 2)]
    assert len(server.get_buffer()) == length
    server.receive_data(b"e" * length)
    assert drain(server) == [Envelope(b"e" * length)]
    assert server.state is State.REPLY


def test_default_max_envelope() -> None:
    assert DEFAULT_MAX_ENVELOPE == 64 * 1024
    Connection(Role.SERVER).receive_data(struct.pack(">QQQ", 65536, 1, 2))
    with pytest.raises(RemoteProtocolError):
        Connection(Role.SERVER).receive_data(struct.pack(">QQQ", 65537, 1, 2))


def test_client_cannot_send_empty_envelope_header() -> None:
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT).send(Header(0, 1, 2))


# -- server message checks on the client ----------------------------------------------------------


def client_waiting_for_reply(max_envelope: int = 100) -> Connection:
    client = Connection(Role.CLIENT, max_envelope=max_envelope)
    wire(client, Header(5, 1, 2), Envelope(b"12345"))
    assert client.state is State.REPLY
    return client


@pytest.mark.parametrize("kind", [0, 4, 255, 2**64 - 1])
def test_client_rejects_unknown_kind(kind: int) -> None:
    client = client_waiting_for_reply()
    with pytest.raises(RemoteProtocolError) as exc:
        client.receive_data(struct.pack(">QQ", kind, 8))
    assert str(kind) in exc.value.reason
    assert client.state is State.ERROR


@pytest.mark.parametrize(
    ("kind", "length"),
    [
        (1, 0),
        (1, 101),
        (1, 2**64 - 1),
        (2, 0),
        (2, 31),
        (2, 33),
        (2, 2**63),
        (3, 0),
        (3, 7),
        (3, 8 + 1025),
        (3, 2**64 - 1),
    ],
)
def test_client_rejects_bad_length(kind: int, length: int) -> None:
    # Refused on the 16-byte prefix alone: the client never waits for an oversize body.
    client = client_waiting_for_reply()
    with pytest.raises(RemoteProtocolError) as exc:
        client.receive_data(struct.pack(">QQ", kind, length))
    assert str(length) in exc.value.reason
    assert client.state is State.ERROR


@pytest.mark.parametrize("length", [1, 100])
def test_client_reply_length_bounds_accepted(length: int) -> None:
    client = client_waiting_for_reply()
    client.receive_data(struct.pack(">QQ", 1, length))
    assert len(client.get_buffer()) == length
    client.receive_data(b"r" * length)
    assert drain(client) == [Reply(b"r" * length)]
    assert client.state is State.DATA


@pytest.mark.parametrize("reason", ["", "x" * 1024, "é" * 512])
def test_client_refusal_length_bounds_accepted(reason: str) -> None:
    client = client_waiting_for_reply()
    body = struct.pack(">Q", 9) + reason.encode()
    client.receive_data(struct.pack(">QQ", 3, len(body)) + body)
    assert drain(client) == [Refused(9, reason)]
    assert client.state is State.CLOSED


# -- sending checks -------------------------------------------------------------------------------

FILESIZE = 3 * BLOCK + 5


def frames_len(filesize: int, first: int, count: int) -> int:
    total = 0
    for i in range(first, first + count):
        total += max(0, min(BLOCK, filesize - i * BLOCK)) + TAG
    return total


def client_in_data(filesize: int = FILESIZE, first: int = 0) -> Connection:
    client = client_waiting_for_reply()
    client.receive_data(struct.pack(">QQ", 1, 3) + b"rep")
    assert drain(client) == [Reply(b"rep")]
    client.set_filesize(filesize, first)
    assert client.state is (State.DATA if filesize else State.CRC)
    return client


@pytest.mark.parametrize(("first", "count"), [(1, 1), (3, 1), (0, 0), (0, 5), (1, 4), (-1, 1), (4, 1)])
def test_blocks_out_of_order_on_send(first: int, count: int) -> None:
    client = client_in_data()
    data = memoryview(bytes(frames_len(FILESIZE, max(first, 0), count)))
    with pytest.raises(LocalProtocolError, match="out of order"):
        client.send(Blocks(first, count, data))


def test_blocks_replayed_or_skipped_on_send() -> None:
    client = client_in_data()
    client.send(Blocks(0, 1, memoryview(bytes(BLOCK + TAG))))
    with pytest.raises(LocalProtocolError):
        client.send(Blocks(0, 1, memoryview(bytes(BLOCK + TAG))))
    with pytest.raises(LocalProtocolError):
        client.send(Blocks(2, 1, memoryview(bytes(BLOCK + TAG))))
    client.send(Blocks(1, 3, memoryview(bytes(2 * (BLOCK + TAG) + 5 + TAG))))
    assert client.state is State.CRC
    with pytest.raises(LocalProtocolError):
        client.send(Blocks(4, 1, memoryview(bytes(TAG + 1))))


@pytest.mark.parametrize("delta", [-1, 1, -TAG])
def test_blocks_of_wrong_length_on_send(delta: int) -> None:
    client = client_in_data()
    with pytest.raises(LocalProtocolError):
        client.send(Blocks(0, 2, memoryview(bytes(2 * (BLOCK + TAG) + delta))))


def test_blocks_before_filesize_on_send() -> None:
    client = client_waiting_for_reply()
    client.receive_data(struct.pack(">QQ", 1, 3) + b"rep")
    drain(client)
    with pytest.raises(LocalProtocolError):
        client.send(Blocks(0, 1, memoryview(bytes(BLOCK + TAG))))


def test_blocks_before_reply_on_send() -> None:
    client = client_waiting_for_reply()
    client.set_filesize(10)
    with pytest.raises(LocalProtocolError):
        client.send(Blocks(0, 1, memoryview(bytes(10 + TAG))))


@pytest.mark.parametrize("size", [0, 23, 25])
def test_file_crc_of_wrong_length_on_send(size: int) -> None:
    client = client_in_data(0)
    assert client.state is State.CRC
    with pytest.raises(LocalProtocolError):
        client.send(FileCRC(bytes(size)))


def test_cannot_send_connection_closed() -> None:
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT).send(ConnectionClosed())


def test_batch_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Connection(Role.SERVER, batch=0)


# -- transition misses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "event", "event_name", "state"),
    [
        (Role.CLIENT, Envelope(b"x"), "Envelope", "HEADER"),
        (Role.CLIENT, FileCRC(bytes(24)), "FileCRC", "HEADER"),
        (Role.SERVER, Reply(b"x"), "Reply", "HEADER"),
        (Role.SERVER, Ack(bytes(32)), "Ack", "HEADER"),
    ],
)
def test_transition_miss_names_event_role_and_state(role: Role, event: Event, event_name: str, state: str) -> None:
    conn = Connection(role)
    with pytest.raises(LocalProtocolError) as exc:
        conn.send(event)
    assert event_name in exc.value.reason
    assert f"role={role.value}" in exc.value.reason
    assert f"state={state}" in exc.value.reason
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send(Header(1, 2, 3))


def test_transition_miss_after_progress() -> None:
    client = client_in_data()
    with pytest.raises(LocalProtocolError) as exc:
        client.send(FileCRC(bytes(24)))  # blocks still to send
    assert "FileCRC" in exc.value.reason and "role=client" in exc.value.reason and "state=DATA" in exc.value.reason


def test_transition_miss_on_receive() -> None:
    client = client_waiting_for_reply()
    with pytest.raises(RemoteProtocolError) as exc:
        client.receive_data(struct.pack(">QQ", 2, 32) + bytes(32))  # an ACK instead of the reply
    assert "Ack" in exc.value.reason and "server" in exc.value.reason and "REPLY" in exc.value.reason
    assert exc.value.code is RefuseCode.BAD_HEADER
    assert client.state is State.ERROR


def test_reply_before_header_sent_is_refused() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(RemoteProtocolError, match="HEADER"):
        client.receive_data(struct.pack(">QQ", 1, 1) + b"r")


# -- refusals -------------------------------------------------------------------------------------


def run_until(pair: ConnectionPair, stage: str, filesize: int = 2 * BLOCK + 1) -> None:
    """Drive the conversation through ``stage`` (inclusive), draining both sides after each step."""
    client, server = pair.client, pair.server
    cipher = BlockCipher(FILEKEY, SALT)
    frames = seal_frames(file_bytes(filesize))

    def reply() -> None:
        server.set_filesize(filesize)
        pair.send(server, Reply(REPLY))
        client.set_filesize(filesize)

    steps: list[tuple[str, Callable[[], object]]] = [
        ("header", lambda: pair.send(client, Header(len(ENVELOPE), FROM_HASH, TO_HASH))),
        ("envelope", lambda: pair.send(client, Envelope(ENVELOPE))),
        ("reply", reply),
        ("block0", lambda: pair.send(client, Blocks(0, 1, memoryview(frames[0])))),
        ("blocks", lambda: pair.send(client, Blocks(1, len(frames) - 1, memoryview(b"".join(frames[1:]))))),
        ("crc", lambda: pair.send(client, FileCRC(cipher.seal_crc(0)))),
        ("ack", lambda: pair.send(server, Ack(cipher.seal_ack(filesize, 0)))),
    ]
    assert stage in [name for name, _ in steps]
    for name, step in steps:
        step()
        drain(client)
        drain(server)
        if name == stage:
            return


SERVER_STATE_AFTER = {
    "header": State.ENVELOPE,
    "envelope": State.REPLY,
    "reply": State.DATA,
    "block0": State.DATA,
    "blocks": State.CRC,
    "crc": State.ACK,
    "ack": State.DONE,
}


@pytest.mark.parametrize("stage", ["header", "envelope", "reply", "block0", "blocks", "crc"])
def test_server_refuses(stage: str) -> None:
    pair = ConnectionPair(batch=1)
    run_until(pair, stage)
    assert pair.server.state is SERVER_STATE_AFTER[stage]
    reason = "block 1 failed authentication"
    sent = pair.send(pair.server, Refused(int(RefuseCode.BAD_BLOCK), reason))
    assert sent == struct.pack(">QQQ", 3, 8 + len(reason), 12) + reason.encode()
    assert pair.server.state is State.CLOSED
    assert drain(pair.client) == [Refused(12, reason)]
    assert pair.client.state is State.CLOSED
    pair.close(pair.server)
    assert drain(pair.client) == [ConnectionClosed()]
    pair.close(pair.client)
    assert drain(pair.server) == [ConnectionClosed()]


def test_refused_in_data_stops_the_client() -> None:
    pair = ConnectionPair(batch=1)
    run_until(pair, "block0")
    assert pair.client.state is State.DATA and pair.server.state is State.DATA
    pair.send(pair.server, Refused(int(RefuseCode.NO_SPACE), "disk full"))
    events = drain(pair.client)
    assert events == [Refused(9, "disk full")]
    with pytest.raises(LocalProtocolError):
        pair.client.send(Blocks(1, 1, memoryview(bytes(BLOCK + TAG))))


def test_server_cannot_refuse_after_ack() -> None:
    pair = ConnectionPair()
    run_until(pair, "ack")
    with pytest.raises(LocalProtocolError):
        pair.server.send(Refused(1, "too late"))


def test_refusal_reason_is_cut_to_1024_bytes() -> None:
    pair = ConnectionPair()
    run_until(pair, "envelope")
    reason = "x" + "é" * 600  # 1201 bytes; the cut falls inside a character
    sent = pair.send(pair.server, Refused(5, reason))
    (kind, length, code) = struct.unpack(">QQQ", sent[:24])
    assert (kind, length, code) == (3, 8 + 1023, 5)  # the cut moves back to a character boundary
    assert sent[24:] == ("x" + "é" * 511).encode()
    [event] = drain(pair.client)
    assert event == Refused(5, "x" + "é" * 511)
    assert reason.startswith(event.reason)


# -- bytes where none may come --------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["envelope", "crc", "ack"])
def test_server_rejects_bytes_when_it_is_its_turn(stage: str) -> None:
    pair = ConnectionPair()
    run_until(pair, stage)
    state = SERVER_STATE_AFTER[stage]
    assert pair.server.state is state
    with pytest.raises(RemoteProtocolError) as exc:
        pair.server.receive_data(b"\x00")
    assert state.value in exc.value.reason
    assert exc.value.code is RefuseCode.BAD_HEADER
    assert pair.server.state is State.ERROR


def test_server_in_reply_state_still_offers_a_buffer() -> None:
    # A zero-length buffer would make sock_recv_into return 0, which reads as EOF.
    pair = ConnectionPair()
    run_until(pair, "envelope")
    assert len(pair.server.get_buffer()) >= 1


# -- EOF ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "partial"),
    [
        ("header", b""),  # waiting for the envelope
        ("header", b"\x01" * 5),  # inside the envelope
        ("envelope", b""),  # REPLY: the server's turn
        ("reply", b""),  # DATA, before any block
        ("reply", b"\x02" * 1000),  # inside a region
        ("block0", b""),  # between regions
        ("blocks", b"\x03" * 10),  # inside the CRC frame
        ("crc", b""),  # ACK: the server's turn
    ],
)
def test_eof_mid_transfer_on_server(stage: str, partial: bytes) -> None:
    pair = ConnectionPair(batch=1)
    run_until(pair, stage)
    if partial:
        pair.server.receive_data(partial)
        assert drain(pair.server) == []
    pair.close(pair.client)
    with pytest.raises(RemoteProtocolError) as exc:
        pair.server.next_event()
    assert SERVER_STATE_AFTER[stage].value in exc.value.reason
    assert pair.server.state is State.ERROR


@pytest.mark.parametrize(
    ("stage", "partial"),
    [
        ("envelope", b""),  # waiting for the reply
        ("envelope", struct.pack(">QQ", 1, 100)[:9]),  # inside the prefix
        ("envelope", struct.pack(">QQ", 1, 100) + b"r" * 50),  # inside the reply body
        ("block0", b""),  # DATA
        ("crc", b""),  # waiting for the ACK
        ("crc", struct.pack(">QQ", 2, 32) + bytes(31)),  # inside the ACK
    ],
)
def test_eof_mid_transfer_on_client(stage: str, partial: bytes) -> None:
    pair = ConnectionPair(batch=1)
    run_until(pair, stage)
    if partial:
        pair.client.receive_data(partial)
        assert drain(pair.client) == []
    pair.close(pair.server)
    with pytest.raises(RemoteProtocolError):
        pair.client.next_event()
    assert pair.client.state is State.ERROR


def test_events_before_eof_come_first() -> None:
    pair = ConnectionPair(batch=1)
    run_until(pair, "reply")
    frames = seal_frames(file_bytes(2 * BLOCK + 1))
    pair.send(pair.client, Blocks(0, 1, memoryview(frames[0])))
    pair.close(pair.client)
    event = pair.server.next_event()
    assert isinstance(event, Blocks)
    assert (event.first, event.count, bytes(event.data)) == (0, 1, frames[0])
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()


def test_eof_after_done() -> None:
    pair = ConnectionPair()
    run_until(pair, "ack")
    assert pair.client.state is State.DONE and pair.server.state is State.DONE
    pair.close(pair.server)
    assert pair.client.next_event() == ConnectionClosed()
    assert pair.client.next_event() is NEED_DATA
    pair.close(pair.client)
    assert pair.server.next_event() == ConnectionClosed()
    assert pair.server.state is State.CLOSED


# -- reads are exact; the allocator --------------------------------------------------------------


def test_get_buffer_never_asks_for_more_than_the_current_message() -> None:
    filesize = 3 * BLOCK + 5
    server = Connection(Role.SERVER, batch=2)
    assert len(server.get_buffer()) == 24
    server.receive_data(struct.pack(">QQQ", 50, 1, 2))
    assert len(server.get_buffer()) == 50
    server.receive_data(b"e" * 50)
    drain(server)
    server.set_filesize(filesize)
    server.send(Reply(b"r"))
    first_region = 2 * (BLOCK + TAG)
    assert len(server.get_buffer()) == first_region
    buf = server.get_buffer()
    buf[:1000] = b"\x07" * 1000
    server.buffer_updated(1000)
    assert len(server.get_buffer()) == first_region - 1000
    server.receive_data(bytes(first_region - 1000))
    assert len(server.get_buffer()) == (BLOCK + TAG) + (5 + TAG)
    server.receive_data(bytes(BLOCK + TAG + 5 + TAG))
    assert server.state is State.CRC
    assert len(server.get_buffer()) == 24
    events = blocks_of(drain(server))
    assert [(e.first, e.count, len(e.data)) for e in events] == [(0, 2, first_region), (2, 2, BLOCK + 5 + 2 * TAG)]

    client = Connection(Role.CLIENT)
    wire(client, Header(5, 1, 2), Envelope(b"12345"))
    assert len(client.get_buffer()) == 16
    client.receive_data(struct.pack(">QQ", 1, 300))
    assert len(client.get_buffer()) == 300


def test_custom_allocator_regions() -> None:
    filesize = 5 * BLOCK + 100
    sizes: list[int] = []
    buffers: list[memoryview] = []

    def allocator(nbytes: int) -> memoryview:
        sizes.append(nbytes)
        backing = memoryview(bytearray(nbytes + 64))  # like shared memory: a slice of something bigger
        buffers.append(backing[32 : 32 + nbytes])
        return buffers[-1]

    server = Connection(Role.SERVER, batch=2, allocator=allocator)
    server.receive_data(struct.pack(">QQQ", 1, 1, 2) + b"e")
    drain(server)
    server.set_filesize(filesize)
    server.send(Reply(b"r"))
    frames = seal_frames(file_bytes(filesize))
    server.receive_data(b"".join(frames))
    events = blocks_of(drain(server))
    assert len(frames) == 6
    assert sizes == [2 * (BLOCK + TAG), 2 * (BLOCK + TAG), (BLOCK + TAG) + (100 + TAG)]
    assert sizes == [frames_size(filesize, 0, 2), frames_size(filesize, 2, 2), frames_size(filesize, 4, 2)]
    assert [e.data is b for e, b in zip(events, buffers, strict=True)] == [True, True, True]
    assert bytes(buffers[0]) == frames[0] + frames[1]
    assert bytes(buffers[2]) == frames[4] + frames[5]


def test_allocator_of_wrong_size() -> None:
    server = Connection(Role.SERVER, allocator=lambda n: memoryview(bytearray(n + 1)))
    server.receive_data(struct.pack(">QQQ", 1, 1, 2) + b"e")
    drain(server)
    server.set_filesize(10)
    server.send(Reply(b"r"))
    with pytest.raises(LocalProtocolError):
        server.get_buffer()


@pytest.mark.parametrize(
    ("filesize", "first", "count", "expected"),
    [
        (1, 0, 1, [(0, 0, 17)]),
        (BLOCK, 0, 1, [(0, 0, BLOCK + TAG)]),
        (BLOCK + 1, 0, 2, [(0, 0, BLOCK + TAG), (1, BLOCK + TAG, 1 + TAG)]),
        (3 * BLOCK + 5, 2, 2, [(2, 0, BLOCK + TAG), (3, BLOCK + TAG, 5 + TAG)]),
    ],
)
def test_frame_offsets_and_frames_size(
    filesize: int, first: int, count: int, expected: list[tuple[int, int, int]]
) -> None:
    assert frame_offsets(filesize, first, count) == expected
    assert frames_size(filesize, first, count) == sum(size for _, _, size in expected)


# -- resuming: the data phase from block k on ---------------------------------------------------


@pytest.mark.parametrize(("filesize", "first"), [(5 * BLOCK + 7, 2), (5 * BLOCK + 7, 5), (4 * BLOCK, 4),
                                                 (4 * BLOCK, 0), (3, 1)])
def test_resumed_data_phase_starts_at_its_block(filesize: int, first: int) -> None:
    """Both sides set the same first block (the REPLY's resume): the client sends frames first..n-1,
    the server delivers exactly those, then the CRC frame; blocks before ``first`` are refused."""
    pair = ConnectionPair(batch=2, feeder=make_feeder("random", first))
    client, server = pair.client, pair.server
    pair.send(client, Header(len(ENVELOPE), FROM_HASH, TO_HASH), Envelope(ENVELOPE))
    drain(server)
    server.set_filesize(filesize, first)
    pair.send(server, Reply(REPLY))
    drain(client)
    client.set_filesize(filesize, first)
    nblocks = (filesize + BLOCK - 1) // BLOCK
    assert client.blocks_remaining() == server.blocks_remaining() == nblocks - first
    frames = seal_frames(file_bytes(filesize))
    if 0 < first < nblocks:  # on a twin: a refused send leaves its connection in ERROR
        with pytest.raises(LocalProtocolError, match="out of order"):
            client_in_data(filesize, first).send(Blocks(first - 1, 1, memoryview(frames[first - 1])))
    stream = bytearray()
    for index in range(first, nblocks):
        stream += b"".join(bytes(x) for x in client.send(Blocks(index, 1, memoryview(frames[index]))))
    sealed_crc = BlockCipher(FILEKEY, SALT).seal_crc(1)
    stream += wire(client, FileCRC(sealed_crc))
    pair.feeder(server, bytes(stream))
    events = drain(server)
    assert events[-1] == FileCRC(sealed_crc)
    got = blocks_of(events[:-1])
    assert [b.first for b in got] == list(range(first, nblocks, 2))
    assert b"".join(bytes(b.data) for b in got) == b"".join(frames[first:])
    assert server.state is State.ACK


def test_resume_block_past_the_file_is_refused() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="past the file"):
        client.set_filesize(3 * BLOCK, 4)
    with pytest.raises(LocalProtocolError, match="past the file"):
        Connection(Role.SERVER).set_filesize(3 * BLOCK, -1)


@pytest.mark.parametrize("answer", [b"HTTP/1.0 400 Bad request\r\n", b"\x00" * 7 + b"\x02" + b"\x7f" * 8])
def test_an_answer_that_is_not_m2ys_asks_whether_the_port_is_an_m2y_server(answer: bytes) -> None:
    """A web server's answer (or a length no m2y server sends) used to be 'unknown message kind
    5206522089439126304', which told the user nothing they could act on."""
    client = Connection(Role.CLIENT)
    wire(client, Header(len(ENVELOPE), 1, 2), Envelope(ENVELOPE))
    with pytest.raises(RemoteProtocolError, match=r"is this port an m2y server\?$"):
        client.receive_data(answer)
        drain(client)
