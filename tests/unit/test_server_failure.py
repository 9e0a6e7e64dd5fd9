"""How the server words a failure of its own disk, for its log and the client."""

from __future__ import annotations

import errno

from engine.errors import ProtocolError, RefuseCode
from engine.server import as_failure


def test_a_server_io_error_names_the_file_by_its_last_part_only() -> None:
    """It said only 'Permission denied': now which file or folder, without the server's own path."""
    denied = as_failure(OSError(errno.EACCES, "Permission denied", "/srv/m2y/bob/ro/alice_x.meta"))
    assert denied.reason == "server I/O error: Permission denied: alice_x.meta"
    assert isinstance(denied, ProtocolError) and denied.code == RefuseCode.INTERNAL
    assert as_failure(OSError(errno.EFBIG, "File too large")).reason == "server I/O error: File too large"
    assert as_failure(OSError(errno.EIO, "I/O error", b"bad\nname")).reason == "server I/O error: I/O error: bad?name"
    assert as_failure(OSError(errno.EACCES, "Permission denied", "/srv/m2y/bob/ro/")).reason == (
        "server I/O error: Permission denied: ro")
