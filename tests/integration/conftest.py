"""A real ``m2y serve`` process on a free loopback port, torn down after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import ServerProcess, start_server


@pytest.fixture
def server(root: Path) -> Iterator[ServerProcess]:
    srv = start_server(root, "--idle-timeout", "3")
    try:
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, f"server exited with {code}: {srv.log()}"
