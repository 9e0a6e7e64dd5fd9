"""What ``m2y send`` does with the files it is given: which it sends, and how a sent one is renamed."""

from __future__ import annotations

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
