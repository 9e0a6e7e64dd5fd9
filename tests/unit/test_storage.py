"""Received files: .part while receiving, .data only when whole, never an overwrite."""

from __future__ import annotations

import json
import os
import stat
from collections import namedtuple
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine.errors import RefuseCode, RemoteProtocolError
from engine.storage import Storage

DATETIME = "09-03-2024_14-05-07"
MiB = 1024 * 1024


def fields(size: int = 1000, folder: str = "photo", sender: str = "zhenqiang", when: str = DATETIME) -> dict[str, Any]:
    # Storage only reads these; the metaCRC is irrelevant to it.
    return {
        "from": sender,
        "to": "roland-frei",
        "folder": folder,
        "datetime": when,
        "filename": "myfoto.jpg",
        "filesize": size,
        "fileCRC": 0,
        "metaCRC": 0,
    }


def target(root: Path, folder: str = "photo", sender: str = "zhenqiang", when: str = DATETIME) -> Path:
    """The stem of the received file, computed here from the documented layout."""
    return root / "roland-frei" / folder / f"{sender}_{when}"


def with_suffix(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def refusal(exc: pytest.ExceptionInfo[RemoteProtocolError], code: RefuseCode) -> None:
    assert exc.value.code is code, exc.value.reason


def test_begin_write_commit(root: Path) -> None:
    data = os.urandom(3 * 65536 + 5)
    store = Storage(root, max_file_size=10 * MiB)
    incoming = store.begin(fields(len(data)))
    stem = target(root)
    part, data_path, meta_path = (with_suffix(stem, s) for s in (".part", ".data", ".meta"))
    assert part.exists() and not data_path.exists()
    assert stat.S_IMODE(part.stat().st_mode) == 0o600
    assert json.loads(meta_path.read_text()) == fields(len(data))
    incoming.write(data[:100])
    incoming.write(memoryview(data)[100:70000])
    incoming.write(bytearray(data[70000:]))
    assert incoming.written == len(data)
    incoming.commit()
    assert data_path.read_bytes() == data
    assert not part.exists()
    assert meta_path.exists()
    assert stat.S_IMODE(data_path.stat().st_mode) == 0o600
    assert incoming.done
    assert store.reserved() == 0


def test_empty_file(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(0))
    incoming.commit()
    assert with_suffix(target(root), ".data").read_bytes() == b""


def test_nested_folder(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(3, folder="a/b/c"))
    incoming.write(b"abc")
    incoming.commit()
    assert with_suffix(target(root, folder="a/b/c"), ".data").read_bytes() == b"abc"


def test_begin_refuses_existing_data(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    first = store.begin(fields(5))
    first.write(b"first")
    first.commit()
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(6))
    refusal(exc, RefuseCode.EXISTS)
    assert with_suffix(target(root), ".data").read_bytes() == b"first"
    assert not with_suffix(target(root), ".part").exists()


def test_begin_refuses_same_active_transfer(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    first = store.begin(fields(5))
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5))
    refusal(exc, RefuseCode.BUSY)
    # Another datetime or sender is another transfer.
    store.begin(fields(5, when="09-03-2024_14-05-08")).abort()
    store.begin(fields(5, sender="other")).abort()
    first.write(b"12345")  # the refusal did not disturb the first transfer
    first.commit()
    assert with_suffix(target(root), ".data").read_bytes() == b"12345"


def test_abort_frees_the_name(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    store.begin(fields(5)).abort()
    again = store.begin(fields(5))
    again.write(b"again")
    again.commit()
    assert with_suffix(target(root), ".data").read_bytes() == b"again"


@pytest.mark.parametrize(("size", "ok"), [(1000, True), (1001, False), (2**64 - 1, False)])
def test_max_file_size(root: Path, size: int, ok: bool) -> None:
    store = Storage(root, max_file_size=1000)
    if ok:
        store.begin(fields(size)).abort()
        return
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(size))
    refusal(exc, RefuseCode.TOO_LARGE)
    assert not with_suffix(target(root), ".part").exists()
    assert not with_suffix(target(root), ".meta").exists()


def test_no_space(root: Path) -> None:
    store = Storage(root, max_file_size=2**63)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(2**62))
    refusal(exc, RefuseCode.NO_SPACE)
    assert not with_suffix(target(root), ".part").exists()
    assert not with_suffix(target(root), ".meta").exists()


def test_no_space_counts_reserved_bytes(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free percent")

    def fake_disk_usage(path: str) -> Any:
        return usage(10_000, 9_000, 1_000, 90.0)

    monkeypatch.setattr(psutil, "disk_usage", fake_disk_usage)
    store = Storage(root, max_file_size=MiB)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(1001))
    refusal(exc, RefuseCode.NO_SPACE)
    a = store.begin(fields(600, sender="a"))
    assert store.reserved() == 600
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(401, sender="b"))  # 1000 free - 600 reserved
    refusal(exc, RefuseCode.NO_SPACE)
    a.write(b"x" * 200)
    assert store.reserved() == 400
    b = store.begin(fields(400, sender="b"))
    assert store.reserved() == 800
    a.abort()
    b.abort()
    assert store.reserved() == 0


def test_abort_removes_part_and_meta(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(10))
    incoming.write(b"12345")
    stem = target(root)
    assert with_suffix(stem, ".part").exists() and with_suffix(stem, ".meta").exists()
    incoming.abort()
    assert not with_suffix(stem, ".part").exists()
    assert not with_suffix(stem, ".meta").exists()
    assert not with_suffix(stem, ".data").exists()
    assert incoming.fd == -1
    incoming.abort()  # twice is harmless


def test_abort_after_commit_keeps_everything(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(2))
    incoming.write(b"ok")
    incoming.commit()
    incoming.abort()
    assert with_suffix(target(root), ".data").read_bytes() == b"ok"
    assert with_suffix(target(root), ".meta").exists()


@pytest.mark.parametrize("written", [0, 9, 11])
def test_commit_with_wrong_byte_count(root: Path, written: int) -> None:
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(10))
    incoming.write(b"x" * written)
    with pytest.raises(RemoteProtocolError):
        incoming.commit()
    assert not with_suffix(target(root), ".data").exists()
    incoming.abort()
    assert not with_suffix(target(root), ".part").exists()


def test_commit_never_overwrites_data(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(8))
    incoming.write(b"incoming")
    data_path = with_suffix(target(root), ".data")
    data_path.write_bytes(b"the original, by hand")
    with pytest.raises(RemoteProtocolError) as exc:
        incoming.commit()
    refusal(exc, RefuseCode.EXISTS)
    assert data_path.read_bytes() == b"the original, by hand"
    incoming.abort()
    assert data_path.read_bytes() == b"the original, by hand"
    assert not with_suffix(target(root), ".part").exists()


def test_folder_symlink_leading_outside_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "roland-frei").mkdir()
    (root / "roland-frei" / "photo").symlink_to(outside)
    store = Storage(root, max_file_size=MiB)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5))
    refusal(exc, RefuseCode.UNSAFE_PATH)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("folder", ["../escape", "/abs", "a/../../b"])
def test_unsafe_folder_is_refused(root: Path, folder: str) -> None:
    store = Storage(root, max_file_size=MiB)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5, folder=folder))
    refusal(exc, RefuseCode.UNSAFE_PATH)
    assert not (root.parent / "escape").exists()
