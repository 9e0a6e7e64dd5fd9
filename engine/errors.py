"""One exception hierarchy, rooted in ``M2YError``.

Every refusal carries a short reason a user can act on. Errors that cross the
wire also carry a ``RefuseCode`` so the peer can tell them apart (docs/protocol.md §5).
"""

from __future__ import annotations

import enum


class RefuseCode(enum.IntEnum):
    """Reason codes of a REFUSED frame (docs/protocol.md §5)."""

    BAD_HEADER = 1
    UNKNOWN_RECIPIENT = 2
    UNKNOWN_SENDER = 3
    BAD_ENVELOPE = 4
    BAD_METADATA = 5
    META_CRC = 6
    UNSAFE_PATH = 7
    TOO_LARGE = 8
    NO_SPACE = 9
    EXISTS = 10
    BUSY = 11
    BAD_BLOCK = 12
    BAD_CRC = 13
    TIMEOUT = 14
    INTERNAL = 15
    KEPT = 16


class M2YError(Exception):
    """Root of every error m2y raises on purpose."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(M2YError):
    """A local problem the user can fix: a missing key, a bad argument, a malformed .meta."""


class MalformedMeta(ConfigError):
    """A .meta that does not parse as m2y metadata: damaged by hand, or not m2y's at all (a Unity
    asset's .meta, a data file named *.meta caught by a glob). Never renamed: it is not ours to."""


class ProtocolError(M2YError):
    """The conversation went wrong; ``code`` is what goes (or came) in a REFUSED frame."""

    def __init__(self, reason: str, code: RefuseCode = RefuseCode.BAD_HEADER) -> None:
        super().__init__(reason)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something wrong; we refuse with ``code`` and ``reason``."""


class PeerClosed(RemoteProtocolError):
    """The peer closed the connection where the protocol does not allow it (mid-message, mid-file):
    it broke the protocol only by leaving, which a log should say as such."""


class AlreadyReceived(RemoteProtocolError):
    """The name is taken by a finished .data. ``same``: its stored .meta is exactly this request,
    so this is the same file again (an earlier ACK lost). The server says which in its REPLY,
    sealed to the sender, not in a REFUSED a stranger could read (docs/protocol.md §4)."""

    def __init__(self, reason: str, same: bool) -> None:
        super().__init__(reason, RefuseCode.EXISTS)
        self.same = same


class ConnectionLost(M2YError):
    """The connection to the server broke before the ACK (reset, closed, silent too long): nothing
    says the file is stored, and sending it again may resume where it stopped."""


class CannotConnect(ConnectionLost):
    """No connection at all (refused, no answer): the server is not running, or not there."""


class Refused(M2YError):
    """The peer refused the transfer and told us why."""

    def __init__(self, reason: str, code: int) -> None:
        super().__init__(reason)
        self.code = code


def one_line(text: str) -> str:
    """Text from a peer or a file name as one safe line: no escape sequence or line break reaches
    the terminal, so every refusal and error stays the one line the user reads."""
    return "".join(c if c.isprintable() else "?" for c in text)
