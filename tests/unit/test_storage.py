"""Received files: .part while receiving, .data only when whole, never an overwrite."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine.crc import crc64
from engine.errors import AlreadyReceived, ProtocolError, RefuseCode, RemoteProtocolError
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
    (path / "roland-frei").mkdir(parents=True)  # the recipient's home exists: the server has their keys there
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
    incoming.finish()
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
    first.finish()
    with pytest.raises(AlreadyReceived) as exc:
        store.begin(fields(6))
    refusal(exc, RefuseCode.EXISTS)
    assert exc.value.same is False  # another size: another file
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


def _received(root: Path, content: bytes = b"first") -> Storage:
    store = Storage(root, max_file_size=MiB)
    first = store.begin(fields(len(content)))
    first.write(content)
    first.commit()
    first.finish()
    return store


def test_begin_tells_the_same_file_from_another(root: Path) -> None:
    """The same request again (its ACK lost) is told apart from another file with the same name:
    the stored .meta must be exactly the request, the .data of its size. Nothing is changed."""
    store = _received(root)
    stored_meta = with_suffix(target(root), ".meta").read_bytes()
    with pytest.raises(AlreadyReceived) as exc:
        store.begin(fields(5))
    assert exc.value.same is True
    assert exc.value.code is RefuseCode.EXISTS
    for other in (dict(fields(5), fileCRC=1), dict(fields(5), filename="other.jpg"), fields(4)):
        with pytest.raises(AlreadyReceived) as exc:
            store.begin(other)
        assert exc.value.same is False, other
    assert with_suffix(target(root), ".data").read_bytes() == b"first"
    assert with_suffix(target(root), ".meta").read_bytes() == stored_meta
    assert not with_suffix(target(root), ".part").exists()
    assert store.reserved() == 0


def test_the_same_file_means_the_same_json_types(root: Path) -> None:
    """5.0 == 5 and True == 1 in Python; in a stored .meta they are an edit, so "another file"."""
    store = _received(root)
    meta_path = with_suffix(target(root), ".meta")
    meta_path.write_text(meta_path.read_text(encoding="utf-8").replace('"filesize": 5', '"filesize": 5.0'),
                         encoding="utf-8")
    assert '"filesize": 5.0' in meta_path.read_text(encoding="utf-8")
    with pytest.raises(AlreadyReceived) as exc:
        store.begin(fields(5))
    assert exc.value.same is False


@pytest.mark.parametrize("change", ["data-size", "meta-edited", "meta-gone", "meta-symlink", "meta-fifo",
                                    "meta-dir", "data-symlink", "meta-not-json"])
def test_begin_says_another_file_when_it_cannot_be_sure(root: Path, change: str) -> None:
    """Anything odd about the finished file or its .meta means "another file" (the sender makes a
    new .meta), never "the same" (the sender would stop sending): and no hang on a FIFO."""
    store = _received(root)
    data, meta_path = with_suffix(target(root), ".data"), with_suffix(target(root), ".meta")
    good_meta = meta_path.read_bytes()
    if change == "data-size":
        data.write_bytes(b"firs")
    elif change == "meta-edited":
        meta_path.write_bytes(good_meta.replace(b'"fileCRC": 0', b'"fileCRC": 7'))
        assert meta_path.read_bytes() != good_meta
    elif change == "meta-gone":
        meta_path.unlink()
    elif change == "meta-symlink":
        elsewhere = root / "copy.meta"
        elsewhere.write_bytes(good_meta)
        meta_path.unlink()
        meta_path.symlink_to(elsewhere)
    elif change == "meta-fifo":
        meta_path.unlink()
        os.mkfifo(meta_path)
    elif change == "meta-dir":
        meta_path.unlink()
        meta_path.mkdir()
    elif change == "data-symlink":
        elsewhere = root / "copy.data"
        elsewhere.write_bytes(b"first")
        data.unlink()
        data.symlink_to(elsewhere)
    elif change == "meta-not-json":
        meta_path.write_bytes(b"\xff" + good_meta)
    with pytest.raises(AlreadyReceived) as exc:
        store.begin(fields(5))
    assert exc.value.same is False


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


# -- hardening: symlinks, durability order, reservations, idempotent abort -------------------------


def home(root: Path) -> Path:
    return root / "roland-frei"


@pytest.mark.parametrize("suffix", [".part", ".meta.tmp"])
@pytest.mark.parametrize("dangling", [False, True])
def test_planted_symlink_on_part_or_tmp_is_not_followed(root: Path, tmp_path: Path, suffix: str,
                                                        dangling: bool) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    if not dangling:
        victim.write_bytes(b"precious")
    (home(root) / "photo").mkdir()
    stem = target(root)
    name = stem.with_name(f".{stem.name}.meta.tmp") if suffix == ".meta.tmp" else with_suffix(stem, suffix)
    name.symlink_to(victim)
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(4))
    incoming.write(b"mine")
    incoming.commit()
    incoming.finish()
    if dangling:
        assert not victim.exists()
    else:
        assert victim.read_bytes() == b"precious"
    data_path = with_suffix(stem, ".data")
    assert not data_path.is_symlink() and stat.S_ISREG(data_path.lstat().st_mode)
    assert data_path.read_bytes() == b"mine"
    assert os.lstat(data_path).st_nlink == 1  # not a second name of a file outside
    meta_path = with_suffix(stem, ".meta")
    assert not meta_path.is_symlink()
    assert json.loads(meta_path.read_bytes().decode("utf-8")) == fields(4)
    assert not name.exists() and not name.is_symlink()
    assert list(outside.iterdir()) == ([] if dangling else [victim])


def test_symlinked_folder_component_is_refused_and_nothing_made_outside(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (home(root) / "lnk").symlink_to(outside)
    store = Storage(root, max_file_size=MiB)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5, folder="lnk/newdir/deeper"))
    assert list(outside.iterdir()) == []
    refusal(exc, RefuseCode.UNSAFE_PATH)
    assert "'lnk'" in exc.value.reason and "\n" not in exc.value.reason
    assert store.reserved() == 0


def test_folder_symlink_deeper_down_is_refused_and_new_folders_removed(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (home(root) / "a").mkdir()
    (home(root) / "a" / "b").symlink_to(outside)
    store = Storage(root, max_file_size=MiB)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5, folder="a/b/c"))
    assert list(outside.iterdir()) == []
    refusal(exc, RefuseCode.UNSAFE_PATH)
    assert "'a/b'" in exc.value.reason
    assert sorted(p.name for p in (home(root) / "a").iterdir()) == ["b"]


def test_folder_component_that_is_a_file_is_refused(root: Path) -> None:
    (home(root) / "photo").write_bytes(b"not a folder")
    store = Storage(root, max_file_size=MiB)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5, folder="photo/sub"))
    refusal(exc, RefuseCode.UNSAFE_PATH)
    assert "'photo'" in exc.value.reason
    assert (home(root) / "photo").read_bytes() == b"not a folder"


def test_folder_component_too_long_is_unsafe_path_not_oserror(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5, folder="ok/" + "x" * 300))
    refusal(exc, RefuseCode.UNSAFE_PATH)
    assert not (home(root) / "ok").exists()  # the folder made on the way is removed again
    assert store.reserved() == 0


def test_home_that_is_a_symlink_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    home(root).rmdir()
    home(root).symlink_to(outside)
    store = Storage(root, max_file_size=MiB)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5))
    refusal(exc, RefuseCode.UNSAFE_PATH)
    assert list(outside.iterdir()) == []


def test_missing_home_is_refused_not_created(root: Path) -> None:
    home(root).rmdir()
    store = Storage(root, max_file_size=MiB)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5))
    refusal(exc, RefuseCode.UNKNOWN_RECIPIENT)
    assert not home(root).exists()


def test_abort_removes_only_the_folders_it_created(root: Path) -> None:
    (home(root) / "a").mkdir()
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(5, folder="a/b/c"))
    (home(root) / "a" / "b" / "keep").write_bytes(b"someone else's")  # b is no longer empty
    incoming.abort()
    assert not (home(root) / "a" / "b" / "c").exists()
    assert (home(root) / "a" / "b" / "keep").exists()
    assert store.begin(fields(5, folder="x/y")).abort() is None
    assert not (home(root) / "x").exists()
    assert (home(root) / "a").is_dir()


def test_begin_fsyncs_meta_and_new_folders(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(5, folder="a/b"))
    stem = target(root, folder="a/b")
    for path in (with_suffix(stem, ".meta"), stem.parent, home(root), home(root) / "a"):
        assert path.stat().st_ino in synced, path
    incoming.abort()


def test_a_name_whose_commit_is_under_way_is_busy(root: Path) -> None:
    """Linked but not yet finished (the folder fsync may still fail and undo the link): a resend of
    the same file must not be told "the same file, already received" (the sender would take it
    as an ACK for bytes that may never be durable). It is BUSY until the commit is done."""
    store = Storage(root, max_file_size=MiB)
    first = store.begin(fields(5))
    first.write(b"first")
    first.commit()  # on the server: in a thread; finish() follows on the loop
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5))
    refusal(exc, RefuseCode.BUSY)
    first.finish()
    with pytest.raises(AlreadyReceived) as exc2:
        store.begin(fields(5))
    assert exc2.value.same is True


def test_commit_link_exists_removes_our_meta(root: Path) -> None:
    """A .data that is not ours took the name: our .meta must go, or a resend of our request would
    be told "the same file" of bytes we never wrote."""
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(5))
    incoming.write(b"ours!")
    stem = target(root)
    with_suffix(stem, ".data").write_bytes(b"THEIR")  # same size, appeared while we were receiving
    with pytest.raises(RemoteProtocolError) as exc:
        incoming.commit()
    refusal(exc, RefuseCode.EXISTS)
    incoming.abort()
    assert with_suffix(stem, ".data").read_bytes() == b"THEIR"
    assert not with_suffix(stem, ".meta").exists()
    with pytest.raises(AlreadyReceived) as exc2:
        store.begin(fields(5))
    assert exc2.value.same is False


def test_commit_link_exists_keeps_existing_data_and_its_meta(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(8))
    incoming.write(b"incoming")
    stem = target(root)
    with_suffix(stem, ".data").write_bytes(b"theirs")  # appeared while we were receiving
    with_suffix(stem, ".meta").write_text('{"theirs": true}\n', encoding="utf-8")
    with pytest.raises(RemoteProtocolError) as exc:
        incoming.commit()
    refusal(exc, RefuseCode.EXISTS)
    incoming.abort()
    assert with_suffix(stem, ".data").read_bytes() == b"theirs"
    assert with_suffix(stem, ".meta").read_text(encoding="utf-8") == '{"theirs": true}\n'
    assert not with_suffix(stem, ".part").exists()
    assert store.reserved() == 0


def _fail_after_link(monkeypatch: pytest.MonkeyPatch, failing: str) -> list[bool]:
    """Make the named step after the commit's link fail with EIO; returns a flag set once linked."""
    linked = [False]
    real_link, real_fsync, real_unlink = os.link, os.fsync, os.unlink

    def link(*args: Any, **kwargs: Any) -> None:
        real_link(*args, **kwargs)
        linked[0] = True

    def fsync(fd: int) -> None:
        if linked[0] and failing in ("dir fsync", "dir fsync and undo"):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if linked[0] and failing == "unlink part" and str(path).endswith(".part"):
            raise OSError(5, "Input/output error")
        if linked[0] and failing == "dir fsync and undo" and str(path).endswith(".data"):
            raise OSError(5, "Input/output error")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "unlink", unlink)
    return linked


def test_an_undo_that_fails_leaves_no_meta_to_vouch_for_the_data(root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder fsync after the link fails and so does unlinking the .data: that .data may not be
    durable, so its .meta goes, and a resend is told "another file" (make a new .meta), never
    "the same file" (which the sender would take as an ACK)."""
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(4))
    incoming.write(b"lost")
    _fail_after_link(monkeypatch, "dir fsync and undo")
    with pytest.raises(ProtocolError) as exc:
        incoming.commit()
    monkeypatch.undo()
    assert exc.value.code is RefuseCode.INTERNAL
    incoming.abort()
    stem = target(root)
    assert with_suffix(stem, ".data").exists() and not with_suffix(stem, ".meta").exists()
    with pytest.raises(AlreadyReceived) as again:
        store.begin(fields(4))
    assert again.value.same is False


def test_unlink_part_failing_after_link_still_commits(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The .data name is durable once the folder is fsynced; a .part that will not go is only logged."""
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(4))
    incoming.write(b"kept")
    linked = _fail_after_link(monkeypatch, "unlink part")
    incoming.commit()
    monkeypatch.undo()
    assert linked[0] and incoming.done
    incoming.finish()
    stem = target(root)
    assert with_suffix(stem, ".data").read_bytes() == b"kept"
    assert json.loads(with_suffix(stem, ".meta").read_text(encoding="utf-8")) == fields(4)
    incoming.abort()  # a later abort never touches a committed file
    assert with_suffix(stem, ".data").read_bytes() == b"kept"
    assert store.reserved() == 0


def test_second_folder_fsync_failing_still_commits(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first folder fsync after the link made the name durable: a failing second one (after the
    .part is gone) is logged, and the transfer is committed, not refused into a stuck EXISTS."""
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(4))
    incoming.write(b"kept")
    real_fsync, real_unlink = os.fsync, os.unlink
    state = {"part_gone": False}

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        real_unlink(path, *args, **kwargs)
        if str(path).endswith(".part"):
            state["part_gone"] = True

    def fsync(fd: int) -> None:
        if state["part_gone"]:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "fsync", fsync)
    incoming.commit()
    monkeypatch.undo()
    assert incoming.done
    incoming.finish()
    stem = target(root)
    assert with_suffix(stem, ".data").read_bytes() == b"kept"
    assert not with_suffix(stem, ".part").exists()
    assert store.reserved() == 0


def test_folder_fsync_failing_after_link_undoes_the_link(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ACK without a durable name: the commit fails, the .data is unlinked, and a retry is accepted
    (keeping the .data would refuse every retry as EXISTS although the sender never got its ACK)."""
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(4))
    incoming.write(b"lost")
    linked = _fail_after_link(monkeypatch, "dir fsync")
    with pytest.raises(ProtocolError) as exc:
        incoming.commit()
    monkeypatch.undo()
    assert linked[0] and exc.value.code is RefuseCode.INTERNAL and "durable" in exc.value.reason
    incoming.abort()  # what the server does after a failed commit
    stem = target(root)
    for suffix in (".data", ".meta", ".part"):
        assert not with_suffix(stem, suffix).exists(), suffix
    assert store.reserved() == 0
    retry = store.begin(fields(4))
    retry.write(b"good")
    retry.commit()
    retry.finish()
    assert with_suffix(stem, ".data").read_bytes() == b"good"


def test_a_name_committed_between_check_and_claim_is_refused(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Transfer A commits and leaves the table while B's begin checks for its .data: B must be refused
    (BUSY or EXISTS), never write its .meta over A's or remove it when it fails."""
    store = Storage(root, max_file_size=MiB)
    a = store.begin(fields(4, sender="zhenqiang"))
    a.write(b"aaaa")
    stem = target(root)
    a_meta = with_suffix(stem, ".meta").read_bytes()
    real_lstat = os.lstat
    started, done = threading.Event(), threading.Event()

    def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        try:
            return real_lstat(path, *args, **kwargs)
        finally:
            if str(path).endswith(".data") and not started.is_set():
                started.set()

                def finish_a() -> None:
                    try:
                        a.commit()
                        a.finish()  # needs the table: with the check under it, this waits for B
                    finally:
                        done.set()
                threading.Thread(target=finish_a, daemon=True).start()
                done.wait(1.0)

    monkeypatch.setattr(os, "lstat", lstat)
    b_fields = dict(fields(4, sender="zhenqiang"), filename="other.bin")
    with pytest.raises(RemoteProtocolError) as exc:
        b = store.begin(b_fields)
        b.abort()
    monkeypatch.undo()
    if started.is_set():
        assert done.wait(10)
    else:  # B was refused BUSY before it looked for a .data: A is still receiving
        a.commit()
        a.finish()
    assert exc.value.code in (RefuseCode.BUSY, RefuseCode.EXISTS), exc.value.reason
    assert with_suffix(stem, ".meta").read_bytes() == a_meta
    assert with_suffix(stem, ".data").read_bytes() == b"aaaa"
    assert store.reserved() == 0


def test_abort_leaves_new_folders_while_another_begin_runs(root: Path) -> None:
    """An abort on the loop must not rmdir a folder a begin in a thread has walked into."""
    store = Storage(root, max_file_size=MiB)
    a = store.begin(fields(4, folder="new/deep"))
    other_begin_running = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with store._begins:
            other_begin_running.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert other_begin_running.wait(10)
    a.abort()
    assert (root / "roland-frei" / "new" / "deep").is_dir()
    release.set()
    t.join(10)
    b = store.begin(fields(4, folder="new/deep"))
    b.abort()  # nobody else begins now: its (inherited) folders are left as found, the part and meta go
    assert not with_suffix(target(root, "new/deep"), ".part").exists()


def test_commit_leaves_the_table_to_finish(root: Path) -> None:
    # commit() runs in a worker thread; only finish() (on the event loop) touches Storage._active.
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(2))
    incoming.write(b"ok")
    incoming.commit()
    assert incoming.done
    assert incoming in store._active.values()  # still registered until finish()
    incoming.finish()
    assert incoming not in store._active.values()
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(2))
    refusal(exc, RefuseCode.EXISTS)
    incoming.finish()  # twice is harmless
    incoming.abort()
    assert with_suffix(target(root), ".data").read_bytes() == b"ok"


@pytest.mark.parametrize("error", [RuntimeError("bug"), KeyboardInterrupt(), OSError(5, "Input/output error")])
def test_begin_failure_midway_leaves_no_reservation(root: Path, monkeypatch: pytest.MonkeyPatch,
                                                    error: BaseException) -> None:
    real_open = os.open

    def failing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".part"):
            raise error
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    store = Storage(root, max_file_size=MiB)
    with pytest.raises(type(error)):
        store.begin(fields(100, folder="new/dir"))
    monkeypatch.undo()
    assert store.reserved() == 0
    assert not (home(root) / "new").exists()  # meta, part and the folders it made are gone
    again = store.begin(fields(100, folder="new/dir"))  # not BUSY: nothing left registered
    again.abort()


def test_metadata_that_is_not_unicode_is_refused(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    bad = fields(5) | {"filename": "\ud800.jpg"}
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(bad)
    refusal(exc, RefuseCode.BAD_METADATA)
    assert store.reserved() == 0
    assert list(home(root).iterdir()) == []


def test_close_failure_in_commit_never_closes_twice(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(2))
    incoming.write(b"ok")
    part_fd = incoming.fd
    part_ino = os.fstat(part_fd).st_ino
    closes: list[int | str] = []  # the inode each close() released ("EBADF": not open at all)
    real_close = os.close

    def close(fd: int) -> None:
        try:
            closes.append(os.fstat(fd).st_ino)
        except OSError:
            closes.append("EBADF")
        real_close(fd)  # Linux frees the descriptor even when close() reports EIO
        if fd == part_fd:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "close", close)
    with pytest.raises(OSError):
        incoming.commit()
    incoming.abort()
    incoming.abort()
    monkeypatch.undo()
    assert closes.count(part_ino) == 1 and "EBADF" not in closes
    assert incoming.fd == -1
    assert not with_suffix(target(root), ".data").exists()
    assert store.reserved() == 0


def test_abort_twice_after_begin_and_after_refusal(root: Path) -> None:
    store = Storage(root, max_file_size=MiB)
    incoming = store.begin(fields(5))
    incoming.abort()
    incoming.abort()
    assert incoming.done and incoming.fd == -1
    other = store.begin(fields(5))
    with pytest.raises(RemoteProtocolError):
        other.commit()  # 0 of 5 bytes
    other.abort()
    other.abort()
    assert list(home(root).iterdir()) == []  # the folder it made is gone too


def test_concurrent_begins_in_threads_claim_a_name_once(root: Path) -> None:
    """The server runs begin() in executor threads: of 8 racing for one name, exactly one wins."""
    import threading

    store = Storage(root, 10 * MiB)
    barrier = threading.Barrier(8)
    won: list[object] = []
    busy: list[RefuseCode] = []

    def race() -> None:
        barrier.wait(5)
        try:
            won.append(store.begin(fields()))
        except RemoteProtocolError as exc:
            busy.append(exc.code)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(won) == 1 and len(busy) == 7
    assert set(busy) <= {RefuseCode.BUSY}
    assert with_suffix(target(root), ".part").exists()


def test_sweep_removes_what_a_crash_left_and_nothing_else(root: Path) -> None:
    from engine.storage import sweep_leftovers

    home = root / "roland-frei"
    photo = home / "photo" / "deep"
    photo.mkdir(parents=True)
    (home / "pubKey").mkdir()
    (home / "pubKey" / "zhenqiang.data").write_text("a key")  # the senders this home knows
    (home / "pubKey" / "a.b.data").write_text("a key")
    crashed = photo / f"zhenqiang_{DATETIME}"
    with_suffix(crashed, ".part").write_bytes(b"x" * 1000)
    with_suffix(crashed, ".meta").write_text("{}")  # written by the transfer the crash cut short
    linked = home / "photo" / "zhenqiang_01-01-2020_00-00-00"  # crash after the link, before the unlink
    with_suffix(linked, ".data").write_bytes(b"done")
    os.link(with_suffix(linked, ".data"), with_suffix(linked, ".part"))
    with_suffix(linked, ".meta").write_text("{}")
    moved = home / "photo" / "zhenqiang_02-01-2020_00-00-00"  # the same, and its .data moved away since
    with_suffix(moved, ".data").write_bytes(b"done")
    os.link(with_suffix(moved, ".data"), with_suffix(moved, ".part"))
    with_suffix(moved, ".data").rename(home / "elsewhere.bin")
    with_suffix(moved, ".meta").write_text("{}")  # describes a finished file: stays
    tmp = home / "photo" / f".a.b_{DATETIME}.meta.tmp"
    tmp.write_text("{")
    (home / ".cache").mkdir()
    (home / "PUBKEY").mkdir()
    kept = [
        with_suffix(moved, ".meta"),
        home / "photo" / f"alice_{DATETIME}.meta",  # a .meta alone: the .data may have been moved away
        home / "photo" / f"stranger_{DATETIME}.part",  # no key for "stranger": no transfer made it
        home / "photo" / "notes.part",  # not a name m2y gives
        home / "photo" / f"zhenqiang_{DATETIME}.part.bak",
        home / f"zhenqiang_{DATETIME}.part",  # the home's top level: no transfer writes there
        home / ".cache" / f"zhenqiang_{DATETIME}.part",  # hidden folder: no transfer writes there
        home / "PUBKEY" / f"zhenqiang_{DATETIME}.part",  # a key folder, in any case
        root / f"zhenqiang_{DATETIME}.part",  # not under a user's home
    ]
    for path in kept:
        path.write_text("keep")
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / f"zhenqiang_{DATETIME}.part").write_text("not ours")
    (home / "link").symlink_to(outside)  # never followed
    os.mkfifo(home / "photo" / "fifo")  # never opened (a FIFO would block an open without O_NONBLOCK)
    os.mkfifo(root / "fifo-user")  # a user-like name at the root that is no folder
    (root / "not a user").mkdir()
    (root / "not a user" / f"zhenqiang_{DATETIME}.part").write_text("keep")

    removed = dict(sweep_leftovers(root))

    assert set(removed) == {str(with_suffix(crashed, ".part")), str(with_suffix(crashed, ".meta")),
                            str(with_suffix(linked, ".part")), str(with_suffix(moved, ".part")), str(tmp)}
    assert removed[str(with_suffix(crashed, ".part"))] == 1000
    assert with_suffix(linked, ".data").read_bytes() == b"done" and with_suffix(linked, ".meta").exists()
    assert all(path.read_text() in ("keep", "{}") for path in kept)
    assert (outside / f"zhenqiang_{DATETIME}.part").read_text() == "not ours"
    assert (root / "not a user" / f"zhenqiang_{DATETIME}.part").exists()
    assert sweep_leftovers(root) == []


def test_sweep_survives_what_it_cannot_read(root: Path) -> None:
    """A folder it may not read, or one nested past any folder a transfer can name: logged and
    skipped, the start goes on (a RecursionError or a hang would stop the server from starting)."""
    from engine.storage import _MAX_DEPTH, sweep_leftovers

    home = root / "roland-frei"
    (home / "pubKey").mkdir(parents=True)
    (home / "pubKey" / "zhenqiang.data").write_text("a key")
    try:
        fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(_MAX_DEPTH + 5):  # deeper than a 1024-byte folder can reach (at most 512 parts)
                os.mkdir("d", dir_fd=fd)
                nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            with open(f"zhenqiang_{DATETIME}.part", "w", opener=lambda p, f: os.open(p, f, 0o644, dir_fd=fd)) as f:
                f.write("too deep for any transfer")
        finally:
            os.close(fd)
        (home / "photo").mkdir()
        with_suffix(home / "photo" / f"zhenqiang_{DATETIME}", ".part").write_text("x")
        (home / "locked").mkdir()
        (home / "locked" / f"zhenqiang_{DATETIME}.part").write_text("x")
        (home / "locked").chmod(0)  # unreadable, except to root (which CI runs as)
        try:
            removed = [Path(p) for p, _ in sweep_leftovers(root)]
        finally:
            (home / "locked").chmod(0o755)
        assert with_suffix(home / "photo" / f"zhenqiang_{DATETIME}", ".part") in removed
        assert not any(len(p.relative_to(home).parts) > _MAX_DEPTH for p in removed)
    finally:
        _remove_deep(home / "d")  # pytest's own clean-up of old temp folders recurses


def _remove_deep(path: Path) -> None:
    """rmtree without recursion (a 600-level tree is near Python's limit for a recursive one)."""
    chain = []
    while path.is_dir():
        chain.append(path)
        path = path / "d"
    for folder in reversed(chain):
        for child in folder.iterdir():
            if not child.is_dir():
                child.unlink()
        folder.rmdir()


def test_sweep_then_the_same_file_is_received_again(root: Path) -> None:
    """After a crash the sender's .meta is still there; once swept, its resend is a new transfer."""
    from engine.storage import sweep_leftovers

    (root / "roland-frei" / "pubKey").mkdir()
    (root / "roland-frei" / "pubKey" / "zhenqiang.data").write_text("a key")
    store = Storage(root, max_file_size=MiB)
    cut = store.begin(fields(5))
    cut.write(b"fi")  # the server dies here: nothing is aborted, its descriptors just close
    os.close(cut.fd)
    os.close(cut.dir_fd)
    del store
    assert {p for p, _ in sweep_leftovers(root)} == {str(with_suffix(target(root), s)) for s in (".part", ".meta")}
    again = Storage(root, max_file_size=MiB).begin(fields(5))
    again.write(b"first")
    again.commit()
    assert with_suffix(target(root), ".data").read_bytes() == b"first"


def test_lock_root_is_exclusive_and_names_the_holder(root: Path) -> None:
    from engine.errors import ConfigError
    from engine.storage import LOCK_NAME, lock_root

    fd = lock_root(root)
    try:
        with pytest.raises(ConfigError, match=rf"another m2y serve \(pid {os.getpid()}\) is serving"):
            lock_root(root)  # flock is per open file: a second open conflicts even in this process
    finally:
        os.close(fd)
    os.close(lock_root(root))  # released with its descriptor
    assert stat.S_IMODE((root / LOCK_NAME).stat().st_mode) == 0o644


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "dir", "fifo"])
def test_lock_root_refuses_an_odd_lock_file(root: Path, kind: str) -> None:
    from engine.errors import ConfigError
    from engine.storage import LOCK_NAME, lock_root

    path, other = root / LOCK_NAME, root.parent / "elsewhere"
    other.write_text("precious\n")
    if kind == "symlink":
        path.symlink_to(other)
    elif kind == "hardlink":
        os.link(other, path)
    elif kind == "dir":
        path.mkdir()
    else:
        os.mkfifo(path)
    with pytest.raises(ConfigError):
        lock_root(root)
    assert other.read_text() == "precious\n"  # never truncated to a pid


def test_lock_root_falls_back_to_a_read_only_lock(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's server made the lock file (0644): it can still be locked, read-only."""
    from engine.storage import lock_root

    os.close(lock_root(root))
    real_open = os.open

    def no_write(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_write)
    fd = lock_root(root)
    monkeypatch.undo()
    try:
        from engine.errors import ConfigError

        with pytest.raises(ConfigError, match="another m2y serve"):
            lock_root(root)
    finally:
        os.close(fd)


# -- resuming a transfer its sender broke off ---------------------------------------------------

B = 65536


def _cut_short(store: Storage, size: int, blocks: int, f: dict[str, Any] | None = None) -> bytes:
    """A transfer of ``size`` bytes that wrote ``blocks`` whole blocks, then its sender went away."""
    from engine.crc import crc64

    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    incoming = store.begin(f or fields(size))
    incoming.write(data[: blocks * B])
    assert incoming.suspend(crc64(data[: blocks * B]), blocks * B)
    return data


def test_a_resend_of_the_same_metadata_resumes_after_the_kept_blocks(root: Path) -> None:
    from engine.crc import crc64

    store = Storage(root, max_file_size=10 * MiB)
    data = _cut_short(store, 5 * B + 9, 3)
    stem = target(root)
    assert with_suffix(stem, ".part").stat().st_size == 3 * B and with_suffix(stem, ".meta").exists()
    assert store.reserved() == 0  # a kept transfer holds no reservation and no name
    again = store.begin(fields(5 * B + 9))
    assert (again.resume_block, again.written, again.resume_crc) == (3, 3 * B, crc64(data[: 3 * B]))
    assert store.reserved() == 2 * B + 9
    again.write(data[3 * B:])
    again.commit()
    again.finish()
    assert with_suffix(stem, ".data").read_bytes() == data


def test_other_metadata_under_a_kept_name_is_busy(root: Path) -> None:
    """Nothing is authenticated before the first block: a request under a kept name but with other
    metadata (a stranger who knows the name) must not replace the kept part. The real resend still
    resumes; once the kept part expires, the name is free again."""
    store = Storage(root, max_file_size=10 * MiB, keep_partial=0.3)
    _cut_short(store, 5 * B, 2)
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(dict(fields(5 * B), fileCRC=1))
    refusal(exc, RefuseCode.KEPT)
    assert "kept for a resend" in exc.value.reason and "a new .meta" in exc.value.reason
    assert with_suffix(target(root), ".part").stat().st_size == 2 * B
    again = store.begin(fields(5 * B))
    assert again.resume_block == 2
    again.abort()
    time.sleep(0.35)
    store.expire()
    other = store.begin(dict(fields(5 * B), fileCRC=1))
    assert other.resume_block == 0
    other.abort()


def test_a_resend_refused_for_space_keeps_the_kept_part(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Storage(root, max_file_size=10 * MiB)
    _cut_short(store, 5 * B, 2)
    real = psutil.disk_usage
    monkeypatch.setattr(psutil, "disk_usage", lambda p: real(p)._replace(free=B))
    with pytest.raises(RemoteProtocolError) as exc:
        store.begin(fields(5 * B))
    refusal(exc, RefuseCode.NO_SPACE)
    assert f"file of {3 * B} bytes does not fit" in exc.value.reason
    monkeypatch.undo()
    assert with_suffix(target(root), ".part").stat().st_size == 2 * B
    again = store.begin(fields(5 * B))
    assert again.resume_block == 2
    again.abort()


@pytest.mark.parametrize("change", ["grown", "swapped", "gone"])
def test_a_kept_part_changed_on_disk_is_not_resumed(root: Path, change: str) -> None:
    store = Storage(root, max_file_size=10 * MiB)
    _cut_short(store, 5 * B, 2)
    part = with_suffix(target(root), ".part")
    if change == "grown":
        with open(part, "ab") as f:
            f.write(b"x")
    elif change == "swapped":  # same size, perhaps the same inode number: its ctime tells it apart
        part.unlink()
        time.sleep(0.02)  # past a coarse clock tick, for kernels without fine-grained ctimes
        part.write_bytes(bytes(2 * B))
    else:
        part.unlink()
    again = store.begin(fields(5 * B))
    assert (again.resume_block, again.written, again.resume_crc) == (0, 0, None)
    assert part.stat().st_size == 0
    again.abort()


def test_kept_parts_expire(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Storage(root, max_file_size=10 * MiB, keep_partial=0.05)
    _cut_short(store, 5 * B, 2)
    time.sleep(0.1)
    with caplog.at_level("INFO", logger="m2y.storage"):
        store.expire()
    said = f"removed with the {2 * B} B kept for a resend: none came within 0.05 s (--keep-partial)"
    assert any(said in r.getMessage() for r in caplog.records), caplog.text
    assert not with_suffix(target(root), ".part").exists() and not with_suffix(target(root), ".meta").exists()
    again = store.begin(fields(5 * B))
    assert again.resume_block == 0
    again.abort()


def test_nothing_to_resume_is_not_kept(root: Path) -> None:
    """No whole block, a CRC of other bytes, or keeping switched off: removed as before."""
    store = Storage(root, max_file_size=10 * MiB)
    for written, crc_len in ((0, 0), (B // 2, B // 2), (B, B - 1)):
        incoming = store.begin(fields(5 * B))
        incoming.write(bytes(written))
        assert not incoming.suspend(0, crc_len)
        assert not with_suffix(target(root), ".part").exists()
    off = Storage(root, max_file_size=10 * MiB, keep_partial=0)
    incoming = off.begin(fields(5 * B))
    incoming.write(bytes(B))
    assert not incoming.suspend(0, B)
    assert not with_suffix(target(root), ".part").exists()


def test_a_begin_failing_before_it_took_the_kept_part_over_puts_it_back(root: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The resend's .meta cannot be written (a full disk): the kept part must not be orphaned, it
    waits for the next resend."""
    import errno as errno_

    store = Storage(root, max_file_size=10 * MiB)
    _cut_short(store, 5 * B, 2)
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno_.ENOSPC, "No space")))
    with pytest.raises(OSError):
        store.begin(fields(5 * B))
    monkeypatch.setattr(os, "fsync", real)
    assert with_suffix(target(root), ".part").stat().st_size == 2 * B
    again = store.begin(fields(5 * B))
    assert again.resume_block == 2
    again.abort()


def test_expiry_removes_a_kept_part_whose_meta_is_gone(root: Path) -> None:
    store = Storage(root, max_file_size=10 * MiB, keep_partial=0.05)
    _cut_short(store, 5 * B, 2)
    with_suffix(target(root), ".meta").unlink()
    time.sleep(0.1)
    store.expire()
    assert not with_suffix(target(root), ".part").exists()


def test_sweep_removes_records_that_vouch_for_nothing(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A record whose .part is gone, or whose .part names another inode, goes (with that .part and
    its .meta); a temp record goes; with ``kept`` absent (--keep-partial 0) even a good one goes."""
    from engine import keptpart
    from engine.storage import Partial, sweep_leftovers

    home = root / "roland-frei"
    photo = home / "photo"
    photo.mkdir(parents=True)
    (home / "pubKey").mkdir()
    (home / "pubKey" / "zhenqiang.data").write_text("a key")
    fd = os.open(photo, os.O_RDONLY | os.O_DIRECTORY)
    try:
        alone = f"zhenqiang_{DATETIME}"
        keptpart.write(fd, alone, keptpart.Record(65536, 1, "00" * 32, 1))  # no .part beside it
        other = "zhenqiang_01-01-2020_00-00-00"
        (photo / f"{other}.part").write_bytes(b"y" * 65536)
        meta_bytes = json.dumps({"from": "zhenqiang", "to": "roland-frei", "folder": "photo",
                                 "datetime": "01-01-2020_00-00-00", "filesize": 10**6}).encode()
        (photo / f"{other}.meta").write_bytes(meta_bytes)
        good = keptpart.Record(65536, 7, keptpart.meta_digest(meta_bytes), (photo / f"{other}.part").stat().st_ino)
        keptpart.write(fd, other, keptpart.Record(65536, 7, good.meta_sha256, good.ino + 1))  # another inode
        (photo / f".{alone}.resume.tmp").write_text("{")
        kept: list[tuple[str, Partial]] = []
        sizes = {name: (photo / name).stat().st_size for name in os.listdir(photo)}
        swept = sweep_leftovers(root, kept)
        removed = {Path(p).name for p, _ in swept}
        assert all(size == sizes[Path(p).name] for p, size in swept), swept  # records too, not 0
        assert kept == [] and list(photo.iterdir()) == []
        assert removed == {f"{alone}.resume", f".{alone}.resume.tmp", f"{other}.part", f"{other}.meta",
                           f"{other}.resume"}
        # The same with a record that holds: taken back when asked, removed when not.
        (photo / f"{other}.part").write_bytes(b"y" * 65536 + b"z" * 10)
        (photo / f"{other}.meta").write_bytes(meta_bytes)
        ino = (photo / f"{other}.part").stat().st_ino
        keptpart.write(fd, other, keptpart.Record(65536, 7, good.meta_sha256, ino))
        with caplog.at_level("INFO", logger="m2y.storage"):
            assert sweep_leftovers(root, kept) == [] and len(kept) == 1
        assert f"{other}.part: cut from 65546 to 65536 B, what its record vouches for" in caplog.text
        key, partial = kept[0]
        assert key == str(photo / other) and (partial.written, partial.crc, partial.persisted) == (65536, 7, True)
        assert (photo / f"{other}.part").stat().st_size == 65536  # cut to what the record vouches for
        partial.forget()
        assert {Path(p).name for p, _ in sweep_leftovers(root)} == {f"{other}.part", f"{other}.meta",
                                                                     f"{other}.resume"}
    finally:
        os.close(fd)


def _kept_with_record(root: Path, payload: bytes, rest: bytes) -> tuple[Storage, dict[str, Any]]:
    """A part of ``payload`` kept for a resend, with its record; the file is ``payload + rest``."""
    (root / "roland-frei" / "pubKey").mkdir(parents=True, exist_ok=True)
    (root / "roland-frei" / "pubKey" / "zhenqiang.data").write_text("a key")  # a sender the sweep knows
    f = fields(size=len(payload) + len(rest))
    f["fileCRC"] = crc64(payload + rest)
    store = Storage(root, 10 * MiB)
    incoming = store.begin(dict(f))
    incoming.write(payload)
    assert incoming.suspend(crc64(payload), len(payload))
    assert store.persist(incoming.key)
    return store, f


def test_a_part_swapped_before_the_take_back_opens_it_is_not_taken(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder's owner swaps the .part between the sweep's look and its open (a new file may get
    the freed inode number): the file opened must be ours, with one link, the one looked at. (It can
    fail only where the file system hands the freed inode number on at once: ext4 does, tmpfs not.)"""
    import engine.storage as storage
    from engine.storage import sweep_leftovers

    if os.geteuid() != 0:
        pytest.skip("making another user's file needs root")
    store, _ = _kept_with_record(root, os.urandom(2 * 65536), os.urandom(1000))
    store.close()
    part = with_suffix(target(root), ".part")
    real, swapped = storage._stored_bytes, []

    def swap_then_read(dir_fd: int, name: str) -> bytes | None:
        if not swapped:
            part.unlink()
            part.write_bytes(b"EVIL" * (2 * 65536 // 4))
            os.chown(part, 65534, 65534)  # another user's file
            swapped.append(True)
        return real(dir_fd, name)

    monkeypatch.setattr(storage, "_stored_bytes", swap_then_read)
    kept: list[tuple[str, Any]] = []
    sweep_leftovers(root, kept)
    assert swapped and kept == []


def test_a_fresh_part_never_sits_beside_an_old_record(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resend that cannot reopen the kept .part (it was moved away and back: its ctime changed)
    starts afresh; the old record goes first, so a crash then cannot let the next start take the
    new bytes back under the old bytes' CRC."""
    from engine.storage import sweep_leftovers

    store, f = _kept_with_record(root, b"X" * 2 * 65536, b"R" * 1000)
    part = with_suffix(target(root), ".part")
    time.sleep(0.01)
    part.rename(part.with_name("elsewhere"))
    part.with_name("elsewhere").rename(part)
    again = store.begin(dict(f))
    assert again.resume_crc is None and again.written == 0
    assert not with_suffix(target(root), ".resume").exists()
    again.write(b"Y" * 2 * 65536)  # then the server crashes
    kept: list[tuple[str, Any]] = []
    sweep_leftovers(root, kept)
    assert kept == [] and not part.exists()


def test_a_stop_waits_for_records_only_so_long(root: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Storage.close(wait) writes the missing records side by side and gives up after ``wait`` s (a
    hung disk must not hang the stop); what it could not record is said in the log."""
    store = Storage(root, 10 * MiB)
    for n in range(3):
        incoming = store.begin(fields(size=2 * 65536, when=f"0{n}-01-2020_00-00-00"))
        incoming.write(b"x" * 65536)
        assert incoming.suspend(crc64(b"x" * 65536), 65536)
    release = threading.Event()
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (release.wait(10), real(fd))[1])
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="m2y.storage"):
        store.close(0.3)
    took = time.monotonic() - started
    release.set()
    assert took < 3, took  # three hung fsyncs, side by side, given up after 0.3 s
    assert any("3 kept part(s) not recorded within 0.3 s" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_under_way_at_suspend_never_replaces_the_kept_parts_newer_record(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint is in its fdatasync when its transfer is suspended and the kept part's record
    (of more bytes) is written: the checkpoint, going on, must not write its older record over it
    (a restart would take back fewer bytes; found by a review)."""
    from engine import keptpart
    from engine.crc import crc64

    store = Storage(root, 10 * MiB)
    data = os.urandom(5 * B)
    incoming = store.begin(fields(5 * B))
    incoming.write(data[:B])
    entered, release = threading.Event(), threading.Event()
    real = os.fdatasync

    def slow_in_the_checkpoint(fd: int) -> None:
        if threading.current_thread().name == "checkpoint":
            entered.set()
            release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_in_the_checkpoint)
    checkpoint = threading.Thread(target=incoming.checkpoint, args=(crc64(data[:B]), B), name="checkpoint")
    checkpoint.start()
    try:
        assert entered.wait(10)
        incoming.write(data[B : 3 * B])
        assert incoming.suspend(crc64(data[: 3 * B]), 3 * B)
        assert store.persist(incoming.key)
    finally:
        release.set()
        checkpoint.join(10)
    record = keptpart.decode(with_suffix(target(root), ".resume").read_bytes())
    assert record is not None and (record.written, record.crc) == (3 * B, crc64(data[: 3 * B]))
    store.close()
