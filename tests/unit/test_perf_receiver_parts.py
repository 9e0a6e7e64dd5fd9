"""perf/receiver_parts.py runs (a benchmark, not a timed test): on one batch it reports every part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parents[2] / "perf" / "receiver_parts.py"


def test_receiver_parts_reports_every_part(tmp_path: Path) -> None:
    out = tmp_path / "parts.json"
    run = subprocess.run([sys.executable, str(PERF), "--size", "1MiB", "--rounds", "1", "--dir", str(tmp_path),
                          "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert set(result["medians"]) == {"decrypt", "crc", "writev-new", "close-free", "fallocate", "writev-allocated",
                                      "mmap-decrypt+crc", "memcpy"}
    assert all(v >= 0 for v in result["medians"].values()) and result["config"]["size"] == 2**20
    assert "git" in result["machine"] and not list(tmp_path.glob("m2y-parts-*"))  # its files are gone


def test_receiver_parts_refuses_less_than_a_batch() -> None:
    run = subprocess.run([sys.executable, str(PERF), "--size", "100"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "at least one batch" in run.stderr
