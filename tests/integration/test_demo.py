"""README's quick start is `make demo`, then `make test`: the first must work too. A log line added
on stderr once made the demo's port two lines, and `make demo` failed while every test passed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_demo_runs_end_to_end() -> None:
    run = subprocess.run(["make", "-s", "demo"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("demo: OK — ") and last.endswith("is byte-for-byte the sent file"), run.stdout[-2000:]
    received = Path(last.removeprefix("demo: OK — ").split(" is byte-for-byte")[0])
    assert received.is_file() and received.stat().st_size == 20_000_000
