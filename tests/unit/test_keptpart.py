"""The on-disk record of a kept part: what it accepts, and that it never follows or trusts odd files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from engine import keptpart
from engine.keptpart import Record

STEM = "zhenqiang_30-12-2018_23-59-59"
GOOD = Record(5 * 65536, 0x0123456789ABCDEF, "ab" * 32, 4242)


def test_round_trip_on_disk(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        keptpart.write(fd, STEM, GOOD)
        assert keptpart.read(fd, STEM) == GOOD
        st = (tmp_path / f"{STEM}.resume").stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert not (tmp_path / f".{STEM}.resume.tmp").exists()
        newer = Record(6 * 65536, 1, "cd" * 32, 4242)
        keptpart.write(fd, STEM, newer)  # replaces
        assert keptpart.read(fd, STEM) == newer
        keptpart.remove(fd, STEM)
        assert keptpart.read(fd, STEM) is None and list(tmp_path.iterdir()) == []
    finally:
        os.close(fd)


def _raw(**change: object) -> bytes:
    obj = json.loads(keptpart.encode(GOOD))
    obj.update(change)
    return json.dumps({k: v for k, v in obj.items() if v is not None}).encode()


@pytest.mark.parametrize("raw", [
    b"", b"\xff", b"[]", b"null", b"{}", b"{" * 10000,
    _raw(v=2), _raw(v=True), _raw(written=0), _raw(written=-1), _raw(written=1.0), _raw(written=True),
    _raw(written="5"), _raw(crc="0123456789ABCDEF"), _raw(crc="0123"), _raw(crc=81985529216486895),
    _raw(meta="ab" * 31), _raw(meta="AB" * 32), _raw(ino=-1), _raw(ino="1"), _raw(extra=1), _raw(ino=None),
])
def test_anything_but_a_record_is_none(raw: bytes) -> None:
    assert keptpart.decode(raw) is None


def test_the_encoding_decodes() -> None:
    assert keptpart.decode(keptpart.encode(GOOD)) == GOOD
    assert keptpart.decode(_raw()) == GOOD


def test_odd_files_are_not_read(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        target = tmp_path / "elsewhere"
        target.write_bytes(keptpart.encode(GOOD))
        (tmp_path / f"{STEM}.resume").symlink_to(target)
        assert keptpart.read(fd, STEM) is None  # a symlink is not followed
        (tmp_path / f"{STEM}.resume").unlink()
        os.link(target, tmp_path / f"{STEM}.resume")
        assert keptpart.read(fd, STEM) is None  # a second link: not a file we made
        (tmp_path / f"{STEM}.resume").unlink()
        os.mkfifo(tmp_path / f"{STEM}.resume")
        assert keptpart.read(fd, STEM) is None  # no block on a FIFO
        (tmp_path / f"{STEM}.resume").unlink()
        (tmp_path / f"{STEM}.resume").write_bytes(keptpart.encode(GOOD) + b" " * keptpart.MAX_RECORD)
        assert keptpart.read(fd, STEM) is None  # too large
    finally:
        os.close(fd)
