"""Fuzzing the sans-I/O core: whatever bytes arrive, the only way out is a RemoteProtocolError
(which the server turns into a refusal), and the connection never buffers past what it asked for."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import RemoteProtocolError
from engine.protocol import NEED_DATA, Connection, Role, State

MAX_ENVELOPE = 4096


def _feed(conn: Connection, chunks: list[bytes]) -> list[object]:
    events: list[object] = []
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                buf = conn.get_buffer()
                assert len(buf) > 0
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                view = view[n:]
                conn.buffer_updated(n)
                while (event := conn.next_event()) is not NEED_DATA:
                    events.append(event)
        conn.buffer_updated(0)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if conn.state is State.CLOSED:
                break
    except RemoteProtocolError:
        assert conn.state is State.ERROR
    return events


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_server_survives_any_bytes(chunks: list[bytes]) -> None:
    _feed(Connection(Role.SERVER, max_envelope=MAX_ENVELOPE), chunks)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=200))
def test_server_header_lengths(length: int, rest: bytes) -> None:
    conn = Connection(Role.SERVER, max_envelope=MAX_ENVELOPE)
    events = _feed(conn, [struct.pack(">QQQ", length, 1, 2) + rest])
    if not 1 <= length <= MAX_ENVELOPE:
        assert conn.state is State.ERROR and events == []
    else:
        assert conn.state in (State.ENVELOPE, State.REPLY, State.ERROR)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_client_survives_any_bytes(chunks: list[bytes]) -> None:
    conn = Connection(Role.CLIENT, max_envelope=MAX_ENVELOPE)
    conn.state = State.REPLY  # as after sending header and envelope
    _feed(conn, chunks)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 5), st.integers(0, 2**64 - 1), st.binary(max_size=100))
def test_client_server_message_prefixes(kind: int, length: int, rest: bytes) -> None:
    conn = Connection(Role.CLIENT, max_envelope=MAX_ENVELOPE)
    conn.state = State.REPLY
    _feed(conn, [struct.pack(">QQ", kind, length) + rest])
    limits = {1: (1, MAX_ENVELOPE), 2: (32, 32), 3: (8, 8 + 1024)}
    if kind not in limits or not limits[kind][0] <= length <= limits[kind][1]:
        assert conn.state is State.ERROR
