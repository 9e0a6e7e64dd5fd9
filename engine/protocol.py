"""The m2y wire protocol as a sans-I/O state machine (docs/protocol.md).

Theory of operation, after h11: a ``Connection`` holds no socket, file or clock.
Bytes come in through ``get_buffer()`` / ``buffer_updated(n)`` (zero-copy, the way
asyncio's BufferedProtocol and ``sock_recv_into`` work) or ``receive_data(data)``
(a convenience that copies); ``next_event()`` returns one event or ``NEED_DATA``;
``send(event)`` returns the bytes to write. Both ends track the same conversation
state, and every transition is one entry of ``TRANSITIONS[role][state][event]``,
where role is the side that *sends* the event. A miss names all three.

Reads are exact: the connection never asks for more bytes than the current message
needs, so no byte of the next message is ever buffered behind the caller's back.
Block frames are received straight into batch regions handed out by an allocator
(the worker pool's shared memory, or one reused bytearray), and come out as one
``Blocks`` event per filled region: no copy of block bytes is made here.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .blocks import ACK_BODY_LEN, CRC_FRAME_LEN, TAG_LEN, batch_plain_size, block_count, plain_size
from .crc import BytesLike
from .defaults import DEFAULT_BATCH, DEFAULT_MAX_ENVELOPE  # batch: frames per received region
from .errors import LocalProtocolError, PeerClosed, RefuseCode, RemoteProtocolError

HEADER = struct.Struct(">QQQ")  # envelope length, from hash, to hash
SERVER_PREFIX = struct.Struct(">QQ")  # kind, body length
REFUSE_CODE = struct.Struct(">Q")
MAX_REASON = 1024


class Kind(enum.IntEnum):
    """Kinds of server -> client messages (docs/protocol.md §2)."""

    REPLY = 1
    ACK = 2
    REFUSED = 3


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    HEADER = "HEADER"  # client's header next
    ENVELOPE = "ENVELOPE"  # client's encrypted metadata next
    REPLY = "REPLY"  # server's reply (or refusal) next
    DATA = "DATA"  # client's block frames next
    CRC = "CRC"  # client's sealed file CRC next
    ACK = "ACK"  # server's ACK (or refusal) next
    DONE = "DONE"  # ACK sent/received: only EOF may follow
    CLOSED = "CLOSED"  # refused or ended; nothing more
    ERROR = "ERROR"  # a protocol error happened; for good


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Sentinel.NEED_DATA


class Event:
    """Base of everything that crosses the wire."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Header(Event):
    """Client header: the envelope's length and the two user hashes."""

    envelope_len: int
    from_hash: int
    to_hash: int


@dataclass(frozen=True, slots=True)
class Envelope(Event):
    """The client's encrypted metadata (envelope.py)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Reply(Event):
    """The server's encrypted metadata, with filekey and salt added."""

    envelope: bytes


@dataclass(frozen=True, slots=True)
class Blocks(Event):
    """``count`` consecutive block frames starting at block ``first``, back to back in ``data``."""

    first: int
    count: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class FileCRC(Event):
    """The file's CRC-64 as its .meta gives it (the server checks the received bytes against it),
    sealed with the filekey (blocks.BlockCipher.seal_crc)."""

    sealed: bytes


@dataclass(frozen=True, slots=True)
class Ack(Event):
    """The server's ACK: filesize and CRC sealed with the filekey (blocks.BlockCipher.seal_ack)."""

    sealed: bytes


@dataclass(frozen=True, slots=True)
class Refused(Event):
    """The server refuses; ``reason`` is one line for the user."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed the connection where that is allowed."""


_C, _S = Role.CLIENT, Role.SERVER
TRANSITIONS: dict[Role, dict[State, dict[type[Event], State]]] = {
    _C: {
        State.HEADER: {Header: State.ENVELOPE},
        State.ENVELOPE: {Envelope: State.REPLY},
        State.DATA: {Blocks: State.DATA},
        State.CRC: {FileCRC: State.ACK},
    },
    _S: {
        State.HEADER: {Refused: State.CLOSED},
        State.ENVELOPE: {Refused: State.CLOSED},
        State.REPLY: {Reply: State.DATA, Refused: State.CLOSED},
        State.DATA: {Refused: State.CLOSED},
        State.CRC: {Refused: State.CLOSED},
        State.ACK: {Ack: State.DONE, Refused: State.CLOSED},
    },
}
# Where the peer may close without it being an error.
CLOSE_ALLOWED = {State.DONE, State.CLOSED}

Allocator = Callable[[int], memoryview]


def frames_size(filesize: int, first: int, count: int) -> int:
    """Wire bytes of ``count`` frames from block ``first`` on."""
    return batch_plain_size(filesize, first, count) + TAG_LEN * count


def refusal_bytes(code: int, reason: str) -> bytes:
    """A REFUSED message; the reason is cut to MAX_REASON bytes."""
    text = reason.encode("utf-8", "replace")[:MAX_REASON].decode("utf-8", "ignore")  # whole characters only
    body = REFUSE_CODE.pack(code) + text.encode("utf-8")
    return SERVER_PREFIX.pack(Kind.REFUSED, len(body)) + body


class Connection:
    """One side of one m2y transfer."""

    def __init__(
        self,
        role: Role,
        *,
        max_envelope: int = DEFAULT_MAX_ENVELOPE,
        batch: int = DEFAULT_BATCH,
        allocator: Allocator | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.role = role
        self.peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.state = State.HEADER
        self.max_envelope = max_envelope
        self.batch = batch
        self.filesize: int | None = None
        self._allocator = allocator or self._default_allocator
        # Control message being received: its buffer, bytes filled, and how to parse it.
        self._ctl = bytearray()
        self._ctl_fill = 0
        self._ctl_parse: Callable[[bytes], Event | None] | None = None
        self._pending_kind: int | None = None
        # Block region being received.
        self._region: memoryview | None = None
        self._region_fill = 0
        self._region_first = 0
        self._region_count = 0
        self._next_block = 0  # next block index to receive or send
        self._events: list[Event] = []
        self._envelope_len = 0  # from the header, sent or received
        self._eof = False

    # -- state --------------------------------------------------------------------------

    def _transition(self, sender: Role, event: Event) -> None:
        try:
            self.state = TRANSITIONS[sender][self.state][type(event)]
        except KeyError:
            where, self.state = self.state, State.ERROR
            raise LocalProtocolError(
                f"can't handle event type {type(event).__name__} when role={sender.value} "
                f"and state={where.value}"
            ) from None
        if self.state is State.DATA and self.filesize is not None and self._next_block >= block_count(
            self.filesize
        ):
            self.state = State.CRC  # state-triggered: every block has passed

    def set_filesize(self, filesize: int, first: int = 0) -> None:
        """Tell the connection how long the file is (from the decrypted metadata) and from which block
        its frames go (the REPLY's ``resume``: the blocks before it are on the server already)."""
        if self.filesize is not None:
            raise LocalProtocolError("filesize already set")
        if not 0 <= first <= block_count(filesize):
            raise LocalProtocolError(f"resume block {first} is past the file's {block_count(filesize)} blocks")
        self.filesize = filesize
        self._next_block = first
        if self.state is State.DATA and first >= block_count(filesize):
            self.state = State.CRC

    def blocks_remaining(self) -> int:
        if self.filesize is None:
            return 0
        return block_count(self.filesize) - self._next_block

    # -- sending --------------------------------------------------------------------------

    def send(self, event: Event) -> list[BytesLike]:
        """Bytes that put ``event`` on the wire; block data is passed through, not copied."""
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in ERROR state")
        if type(event) not in TRANSITIONS[self.role].get(self.state, {}):
            self._transition(self.role, event)  # raises, naming event, role and state
        out: list[BytesLike]
        if isinstance(event, Header):
            if not 1 <= event.envelope_len < 1 << 64 or not all(
                0 <= h < 1 << 64 for h in (event.from_hash, event.to_hash)
            ):
                raise LocalProtocolError(f"header out of range: {event}")
            self._envelope_len = event.envelope_len
            out = [HEADER.pack(event.envelope_len, event.from_hash, event.to_hash)]
        elif isinstance(event, Envelope):
            if len(event.data) != self._envelope_len:
                raise LocalProtocolError(f"envelope is {len(event.data)} bytes, header said {self._envelope_len}")
            out = [event.data]
        elif isinstance(event, Blocks):
            self._check_blocks(event)
            out = [event.data]
        elif isinstance(event, FileCRC):
            if len(event.sealed) != CRC_FRAME_LEN:
                raise LocalProtocolError(f"FileCRC must be {CRC_FRAME_LEN} bytes")
            out = [event.sealed]
        elif isinstance(event, Reply):
            out = [SERVER_PREFIX.pack(Kind.REPLY, len(event.envelope)), event.envelope]
        elif isinstance(event, Ack):
            if len(event.sealed) != ACK_BODY_LEN:
                raise LocalProtocolError(f"Ack must be {ACK_BODY_LEN} bytes")
            out = [SERVER_PREFIX.pack(Kind.ACK, len(event.sealed)) + event.sealed]
        elif isinstance(event, Refused):
            out = [refusal_bytes(event.code, event.reason)]
        else:
            raise LocalProtocolError(f"cannot send {type(event).__name__}")
        self._transition(self.role, event)
        if isinstance(event, Blocks):
            self._next_block += event.count
            self._transition_after_blocks()
        return out

    def _check_blocks(self, event: Blocks) -> None:
        if self.filesize is None:
            raise LocalProtocolError("set_filesize() before sending blocks")
        if event.first != self._next_block or event.count < 1 or event.count > self.blocks_remaining():
            raise LocalProtocolError(
                f"blocks {event.first}..{event.first + event.count - 1} out of order "
                f"(next is {self._next_block} of {block_count(self.filesize)})"
            )
        expected = frames_size(self.filesize, event.first, event.count)
        if len(event.data) != expected:
            raise LocalProtocolError(f"{event.count} frames must be {expected} bytes, got {len(event.data)}")

    def _transition_after_blocks(self) -> None:
        if self.state is State.DATA and self.blocks_remaining() == 0:
            self.state = State.CRC

    # -- receiving ------------------------------------------------------------------------

    def _default_allocator(self, nbytes: int) -> memoryview:
        """A fresh region each time, so queued Blocks events keep their bytes; adapters pass their own."""
        return memoryview(bytearray(nbytes))

    def _expect_control(self) -> None:
        """Set up the next control message to receive, by role and state."""
        if self.role is Role.SERVER:
            if self.state is State.HEADER:
                self._arm(HEADER.size, self._parse_header)
            elif self.state is State.ENVELOPE:
                self._arm(self._envelope_len, self._parse_envelope)
            elif self.state is State.CRC:
                self._arm(CRC_FRAME_LEN, self._parse_crc)
            else:
                self._arm(1, self._parse_unexpected)
        else:
            self._arm(SERVER_PREFIX.size, self._parse_prefix)

    def _arm(self, size: int, parse: Callable[[bytes], Event | None]) -> None:
        if len(self._ctl) != size:
            self._ctl = bytearray(size)
        self._ctl_fill = 0
        self._ctl_parse = parse

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go; never longer than what the current message needs."""
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in ERROR state")
        if self._receiving_blocks():
            if self._region is None:
                self._open_region()
            assert self._region is not None
            return self._region[self._region_fill :]
        if self._ctl_parse is None or (self._ctl_parse == self._parse_unexpected and self._ctl_fill == 0):
            self._expect_control()
        return memoryview(self._ctl)[self._ctl_fill :]

    def _receiving_blocks(self) -> bool:
        return (
            self.role is Role.SERVER
            and self.state is State.DATA
            and self.filesize is not None
            and self.blocks_remaining() > 0
        )

    def _open_region(self) -> None:
        assert self.filesize is not None
        count = min(self.batch, self.blocks_remaining())
        nbytes = frames_size(self.filesize, self._next_block, count)
        self._region = self._allocator(nbytes)
        if len(self._region) != nbytes:
            raise LocalProtocolError(f"allocator returned {len(self._region)} bytes, wanted {nbytes}")
        self._region_fill = 0
        self._region_first = self._next_block
        self._region_count = count

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last ``get_buffer()``; 0 means EOF."""
        if nbytes == 0:
            self._eof = True
            return
        if self._region is not None:
            self._region_fill += nbytes
            if self._region_fill == len(self._region):
                event = Blocks(self._region_first, self._region_count, self._region)
                self._region = None
                self._next_block += event.count
                self._events.append(event)
                self._transition_after_blocks()
            return
        self._ctl_fill += nbytes
        if self._ctl_fill == len(self._ctl):
            parse = self._ctl_parse
            assert parse is not None
            self._ctl_parse = None
            try:
                parsed = parse(bytes(self._ctl))
            except RemoteProtocolError:
                self.state = State.ERROR
                raise
            if parsed is not None:
                self._receive_event(parsed)

    def receive_data(self, data: BytesLike) -> None:
        """Feed received bytes by copying them in; ``b""`` means EOF. For tests and simple callers."""
        view = memoryview(data).cast("B")
        if not view:
            self.buffer_updated(0)
            return
        while view:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def _receive_event(self, event: Event) -> None:
        try:
            self._transition(self.peer, event)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"peer sent {exc.reason}", RefuseCode.BAD_HEADER) from None
        self._events.append(event)

    @property
    def peer_closed(self) -> bool:
        """The peer's end of the stream was seen (``buffer_updated(0)``)."""
        return self._eof

    def next_event(self) -> Event | _Sentinel:
        """The next event received, or NEED_DATA."""
        if self._events:
            return self._events.pop(0)
        if self._eof:
            if self.state in CLOSE_ALLOWED:
                self._eof = False
                self.state = State.CLOSED
                return ConnectionClosed()
            if self.state is State.CLOSED:
                return NEED_DATA
            where = self.state.value
            self.state = State.ERROR
            raise PeerClosed(f"peer closed the connection in state {where}", RefuseCode.BAD_HEADER)
        return NEED_DATA

    # -- parsers (one per control message) -------------------------------------------------

    def _parse_header(self, raw: bytes) -> Event:
        length, from_hash, to_hash = HEADER.unpack(raw)
        if not 1 <= length <= self.max_envelope:
            raise RemoteProtocolError(
                f"metadata length {length} is outside 1..{self.max_envelope} (the server's --max-meta)",
                RefuseCode.BAD_HEADER
            )
        self._envelope_len = length
        return Header(length, from_hash, to_hash)

    def _parse_envelope(self, raw: bytes) -> Event:
        return Envelope(raw)

    def _parse_crc(self, raw: bytes) -> Event:
        return FileCRC(raw)

    def _parse_unexpected(self, raw: bytes) -> Event:
        raise RemoteProtocolError(f"client sent data in state {self.state.value}", RefuseCode.BAD_HEADER)

    def _parse_prefix(self, raw: bytes) -> Event | None:
        kind, length = SERVER_PREFIX.unpack(raw)
        limits = {
            Kind.REPLY: (1, self.max_envelope),
            Kind.ACK: (ACK_BODY_LEN, ACK_BODY_LEN),
            Kind.REFUSED: (REFUSE_CODE.size, REFUSE_CODE.size + MAX_REASON),
        }
        if kind not in limits:
            raise RemoteProtocolError(f"server sent unknown message kind {kind}: is this port an m2y server?",
                                      RefuseCode.BAD_HEADER)
        low, high = limits[Kind(kind)]
        if not low <= length <= high:
            raise RemoteProtocolError(
                f"server message kind {kind} has length {length}, outside {low}..{high}: is this port an m2y "
                "server?", RefuseCode.BAD_HEADER
            )
        self._pending_kind = kind
        self._arm(length, self._parse_server_body)
        return None

    def _parse_server_body(self, raw: bytes) -> Event:
        kind = self._pending_kind
        self._pending_kind = None
        if kind == Kind.REPLY:
            return Reply(raw)
        if kind == Kind.ACK:
            return Ack(raw)
        (code,) = REFUSE_CODE.unpack_from(raw)
        return Refused(code, raw[REFUSE_CODE.size :].decode("utf-8", "replace"))


def frame_offsets(filesize: int, first: int, count: int) -> list[tuple[int, int, int]]:
    """(block index, offset in region, frame length) of each frame of a region."""
    out = []
    offset = 0
    for index in range(first, first + count):
        size = plain_size(filesize, index) + TAG_LEN
        out.append((index, offset, size))
        offset += size
    return out
