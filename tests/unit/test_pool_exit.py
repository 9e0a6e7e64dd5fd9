"""Workers ignore SIGINT/SIGTERM (a stop signalled to the whole process group must not kill them
mid-batch); a process that exits without closing its pool must still exit, and take them along."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]

SCRIPT = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from engine.pool import WorkerPool
if __name__ == "__main__":
    import time
    pool = WorkerPool(1)
    pid = pool.pids()[0]
    ignored = 0
    for _ in range(200):  # until the worker has set its handlers (it starts as a fresh interpreter)
        with open(f"/proc/{{pid}}/status") as f:
            ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
        if ignored & (1 << (signal.SIGTERM - 1)) and ignored & (1 << (signal.SIGINT - 1)):
            break
        time.sleep(0.05)
    else:
        sys.exit(3)  # the worker does not ignore them
    os.kill(pid, signal.SIGTERM)  # ignored: it lives on
    os.kill(pid, signal.SIGINT)
    time.sleep(0.3)
    with open(f"/proc/{{pid}}/status") as f:
        state = next(line for line in f if line.startswith("State:")).split()[1]
    if state == "Z":
        sys.exit(4)  # it died of them
    print(pid, flush=True)
    # no pool.close(): multiprocessing's exit handler would wait for it without limit
"""


def test_a_process_that_never_closes_its_pool_still_exits(tmp_path: Path) -> None:
    script = tmp_path / "exits.py"
    script.write_text(SCRIPT)
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and time.monotonic() - started < 15, run
    worker = int(run.stdout.split()[0])
    assert "Traceback" not in run.stderr, run.stderr  # the signals were ignored, not raised
    deadline = time.monotonic() + 10
    while psutil.pid_exists(worker) and time.monotonic() < deadline:
        try:
            if psutil.Process(worker).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        assert not psutil.pid_exists(worker), "the worker outlived its owner"
