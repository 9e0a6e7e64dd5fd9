"""What ``m2y send`` does with the files it is given: which it sends, and how a sent one is renamed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from engine.client import not_sendable, settle


@pytest.mark.parametrize("name", ["a.meta", "a.failed", "a.1.failed", "x.y.meta"])
def test_a_meta_or_failed_is_sent(name: str) -> None:
    assert not_sendable(Path("/d") / name) is None


@pytest.mark.parametrize("name", ["a.jpg", "a", "a.done", "a.meta.bak", "a.META"])
def test_anything_else_is_refused_with_a_reason(name: str) -> None:
    reason = not_sendable(Path("/d") / name)
    assert reason is not None and ("ACKed already" in reason if name.endswith(".done") else "not a .meta" in reason)


def test_settle_renames_and_never_replaces(tmp_path: Path) -> None:
    old_failed = tmp_path / "a.failed"
    old_failed.write_text("the earlier send's handle")
    first = tmp_path / "a.meta"
    first.write_text("one")
    assert settle(first, ".failed") == tmp_path / "a.1.failed"
    second = tmp_path / "a.meta"
    second.write_text("two")
    assert settle(second, ".failed") == tmp_path / "a.2.failed"
    assert old_failed.read_text() == "the earlier send's handle"
    assert (tmp_path / "a.1.failed").read_text() == "one" and (tmp_path / "a.2.failed").read_text() == "two"
    assert not first.exists()
    assert settle(tmp_path / "a.1.failed", ".failed") == tmp_path / "a.1.failed"  # failed again: stays
    assert settle(tmp_path / "a.1.failed", ".done") == tmp_path / "a.1.done"
    assert settle(old_failed, ".done") == tmp_path / "a.done" and (tmp_path / "a.done").read_text().startswith("the")
    assert sorted(os.listdir(tmp_path)) == ["a.1.done", "a.2.failed", "a.done"]


def test_settle_does_not_follow_or_replace_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not ours")
    (tmp_path / "a.done").symlink_to(elsewhere)
    meta = tmp_path / "a.meta"
    meta.write_text("m")
    assert settle(meta, ".done") == tmp_path / "a.1.done"
    assert elsewhere.read_text() == "not ours" and (tmp_path / "a.done").is_symlink()


@pytest.mark.parametrize("error", [errno.EPERM, errno.ENOSYS, errno.EXDEV, errno.EACCES])
def test_settle_without_hard_links_checks_then_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       error: int) -> None:
    """A file system that refuses hard links (for whatever reason) still gets its rename, and an
    older name is still not replaced."""
    def no_link(*_args: object, **_kw: object) -> None:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "a.done").write_text("older receipt")
    meta = tmp_path / "a.meta"
    meta.write_text("m")
    assert settle(meta, ".done") == tmp_path / "a.1.done"
    assert (tmp_path / "a.done").read_text() == "older receipt" and (tmp_path / "a.1.done").read_text() == "m"
    assert not meta.exists()


def test_settle_when_another_send_renamed_the_meta_meanwhile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two m2y send of one .meta at once: the one whose unlink finds the name gone keeps its link
    and says the rename happened (it did: under its own name)."""
    meta = tmp_path / "a.meta"
    meta.write_text("m")
    real_unlink = os.unlink

    def raced(path: object, *args: object, **kw: object) -> None:
        real_unlink(path)  # type: ignore[arg-type]
        raise FileNotFoundError(errno.ENOENT, "gone")

    monkeypatch.setattr(os, "unlink", raced)
    assert settle(meta, ".done") == tmp_path / "a.done"
    monkeypatch.undo()
    assert (tmp_path / "a.done").read_text() == "m" and not meta.exists()


def test_settle_undoes_its_link_when_the_old_name_cannot_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta = tmp_path / "a.meta"
    meta.write_text("m")
    real_unlink = os.unlink

    def refuse_meta(path: object, *args: object, **kw: object) -> None:
        if str(path).endswith(".meta"):
            raise PermissionError(errno.EACCES, "Permission denied")
        real_unlink(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", refuse_meta)
    with pytest.raises(PermissionError):
        settle(meta, ".done")
    monkeypatch.undo()
    assert meta.read_text() == "m" and not (tmp_path / "a.done").exists()  # one name, as before


def test_hold_locks_the_meta_until_its_descriptor_closes(tmp_path: Path) -> None:
    import fcntl

    from engine.client import Result, _hold

    meta_path = tmp_path / "a.meta"
    meta_path.write_text("{}")
    fd = _hold(meta_path)
    assert isinstance(fd, int)
    try:
        other = _hold(meta_path)  # a second send (flock is per open file, so this process counts)
        assert isinstance(other, Result) and not other.ok and "right now" in other.message
    finally:
        os.close(fd)
    with open(meta_path) as f:  # released with its descriptor
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert _hold(tmp_path / "gone.meta") is None  # nothing to lock: prepare() says why


@pytest.mark.parametrize("became", [".done", ".failed"])
def test_hold_when_another_send_renamed_the_meta_as_it_opened_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 became: str) -> None:
    import fcntl

    from engine import client, meta

    (tmp_path / "a.jpg").write_bytes(b"x")
    meta_path = tmp_path / "a.meta"
    meta.write_meta_file(meta_path, meta.make("zhenqiang", "roland-frei", "photo", "a.jpg", 1, 0))
    real = fcntl.flock

    def flock_after_the_other_ended(fd: int, op: int) -> None:
        meta_path.rename(meta_path.with_suffix(became))  # the other send ended between our open and our lock
        real(fd, op)

    monkeypatch.setattr(client.fcntl, "flock", flock_after_the_other_ended)
    held = client._hold(meta_path)
    assert isinstance(held, client.Result)
    assert held.ok == (became == ".done"), held
    assert (f"it is a{became} now" if became == ".done" else "is a.failed now") in held.message, held.message


def test_hold_takes_the_new_meta_that_replaced_the_one_it_opened(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """m2y meta replaced the .meta between our open and our lock: the new one is the one to send."""
    import fcntl

    from engine import client

    meta_path = tmp_path / "a.meta"
    meta_path.write_text("old")
    real = fcntl.flock
    replaced: list[bool] = []

    def flock_after_a_replace(fd: int, op: int) -> None:
        if not replaced:
            replaced.append(True)
            (tmp_path / "new").write_text("new")
            (tmp_path / "new").replace(meta_path)
        real(fd, op)

    monkeypatch.setattr(client.fcntl, "flock", flock_after_a_replace)
    held = client._hold(meta_path)
    assert isinstance(held, int)
    try:
        assert os.path.samestat(os.fstat(held), os.stat(meta_path)) and os.read(held, 10) == b"new"
    finally:
        os.close(held)
