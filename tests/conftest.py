"""Shared fixtures: a root with users whose keys are made once per session and copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.keys import keygen, share_public

TEST_BITS = 2048  # 3072 is the default; 2048 keeps key generation out of the test budget


@pytest.fixture(scope="session")
def keys_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """zhenqiang and roland-frei know each other; mallory has keys nobody knows."""
    root = tmp_path_factory.mktemp("keys")
    for user in ("zhenqiang", "roland-frei", "mallory"):
        keygen(root, user, TEST_BITS)
    share_public(root, "zhenqiang", "roland-frei")
    share_public(root, "roland-frei", "zhenqiang")
    share_public(root, "roland-frei", "mallory")  # mallory can address roland-frei, who does not know her
    return root


@pytest.fixture
def root(keys_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(keys_root, dst)
    return dst
