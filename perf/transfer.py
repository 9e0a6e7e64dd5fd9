#!/usr/bin/env python3
"""End-to-end MB/s of ``m2y send`` -> ``m2y serve`` on loopback, against a plain TCP copy and scp.

Every method moves the same file from tmpfs to a new tmpfs file, as separate processes,
alternating round by round:

* m2y: one ``m2y serve`` for the whole run; each round a fresh ``.meta`` (per-round
  folder perf/rN) and one ``m2y send`` process. Recorded: the send process's wall time
  (start to exit), the MB/s it prints (its own timing: reading the .meta to the ACK),
  the server's logged MB/s, client and server CPU seconds (user+system) and peak RSS.
* raw: a receiver process (accept, ``recv_into`` a 1 MiB buffer, write to a new file)
  and a sender process (read 1 MiB, ``sendall``), both new each round, timed from the
  sender's ``connect`` to the receiver's file closed (CLOCK_MONOTONIC is shared).
* gcm: the raw copy plus the least an encrypted copy must do, with m2y's primitives and no
  protocol: the sender seals each 64 KiB block in place with AES-128-GCM, the receiver opens it
  in place and takes the CRC-64 of the plaintext, as m2y's server does. m2y/gcm near 1 means
  m2y's own code costs nothing above its cryptography; gcm/raw is what the cryptography costs.
* scp: ``scp -c aes128-gcm@openssh.com`` to a loopback sshd this script starts with its
  own host key and authorized_keys, where sshd and scp exist; else skipped.

Usage: perf/transfer.py [--size 1GiB] [--rounds 5] [--json PATH] [--gate [FLOOR]]
Exit: 0 ok, 1 perf gate failed, 2 the benchmark itself failed.

The module is also the harness perf/scaling.py builds on (users, server, processes).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import json
import os
import platform
import re
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from cli.main import parse_size as _parse_size  # noqa: E402 - m2y's own size parser, from the repo

RESULTS = REPO / "perf" / "results"
PY = sys.executable
M2Y = [PY, "-m", "cli"]
TIMEOUT = 300.0  # seconds any one subprocess may take before it is killed and the run fails
POLL = 0.05  # RSS sampling interval
SENDER, RECIPIENT = "perf-a", "perf-b"
CHUNK = 1 << 20
DEFAULT_GATE = 0.5
MiB = 1 << 20


class BenchError(Exception):
    """The benchmark could not run (not: it ran and was slow)."""


# -- small helpers -------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'256MiB', '1GiB', '64M', '1000000' -> bytes, as m2y's own options take them (K/M/G alone and
    KiB/MiB/GiB binary, KB/MB/GB decimal); positive."""
    n = _parse_size(text)
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


def fmt_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B" if n < MiB else f"{n / MiB:.1f} MiB"


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / max(seconds, 1e-9) / 1e6


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def machine_info() -> dict[str, Any]:
    model, flags = "?", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "?":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    versions = {}
    for dist in ("cryptography", "pycryptodome", "fastcrc", "crcmod", "anycrc", "uvloop", "psutil"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    commit = "?"
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = (commit + "+dirty" if dirty else commit) if commit else "?"
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "cpu_flags": sorted(flags & {"aes", "vaes", "pclmulqdq", "vpclmulqdq", "sha_ni", "avx2", "avx512f"}),
        "mem_total_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git": commit,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


def make_file(path: Path, size: int) -> None:
    """Incompressible bytes, fast: an AES-CTR keystream (os.urandom is several times slower)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(os.urandom(16))).encryptor()
    zeros = bytes(4 * MiB)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb", buffering=0) as f:
        left = size
        while left:
            n = min(left, len(zeros))
            f.write(enc.update(zeros[:n]))
            left -= n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ------------------------------------------------------------------------------------


def vm_hwm(pid: int) -> int:
    """Peak RSS in bytes of a live process since its exec (VmHWM), 0 if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split among their users), 0 if unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/smaps_rollup", "rb") as f:
        for line in f:
            if line.startswith(b"Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Polls watched pids every POLL seconds: the peak of their RSS, and their VmHWM.

    VmHWM (the kernel's high-water mark since exec) catches peaks between two polls; only
    the last POLL seconds before a process exits can escape. Not wait4's ru_maxrss: on
    Linux that includes the parent's RSS at fork time. For a process watched as a tree
    (a server with worker processes, scp with its ssh) the figure is the sum over the tree
    of PSS, so that shared memory is counted once.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self._lock = threading.Lock()
        self._procs: dict[int, psutil.Process] = {}
        self._peak: dict[int, int] = {}
        self._hwm: dict[int, int] = {}
        self._trees: set[int] = set()
        self._stop_event = threading.Event()

    def watch(self, pid: int, tree: bool = False) -> None:
        """Sample ``pid``; with ``tree``, the sum of its and its descendants' PSS."""
        with contextlib.suppress(psutil.Error), self._lock:
            self._procs[pid] = psutil.Process(pid)
            self._peak[pid] = self._hwm[pid] = 0
            if tree:
                self._trees.add(pid)
        self._sample_one(pid)

    def reset(self, pid: int) -> None:
        """Start a new polled peak (VmHWM cannot be reset)."""
        with self._lock:
            self._peak[pid] = 0

    def peak(self, pid: int) -> int:
        """Polled peak RSS since watch() or reset(), bytes."""
        self._sample_one(pid)
        with self._lock:
            return self._peak.get(pid, 0)

    def hwm(self, pid: int) -> int:
        """Peak RSS since the process started (the last VmHWM read), bytes."""
        self._sample_one(pid)
        with self._lock:
            return max(self._hwm.get(pid, 0), self._peak.get(pid, 0))

    def forget(self, pid: int) -> None:
        with self._lock:
            self._procs.pop(pid, None)

    def _sample_one(self, pid: int) -> None:
        with self._lock:
            proc = self._procs.get(pid)
            tree = pid in self._trees
        if proc is None:
            return
        hwm = 0 if tree else vm_hwm(pid)
        try:
            if tree:
                rss = sum(pss(p.pid) or p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
            else:
                rss = proc.memory_info().rss
        except psutil.Error:
            rss = 0
        with self._lock:
            self._peak[pid] = max(self._peak.get(pid, 0), rss)
            self._hwm[pid] = max(self._hwm.get(pid, 0), hwm)

    def run(self) -> None:
        while not self._stop_event.wait(POLL):
            with self._lock:
                pids = list(self._procs)
            for pid in pids:
                self._sample_one(pid)

    def stop(self) -> None:
        self._stop_event.set()


@dataclass
class Usage:
    """How one child process ended and what it used (from wait4's rusage, which includes its reaped children)."""

    returncode: int
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    peak_rss_mib: float  # polled VmHWM; 0 if the process lived less than one poll


class Child:
    """A subprocess in its own process group, waited for with wait4 to get its rusage."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str, started: float) -> None:
        self.popen = popen
        self.name = name
        self.pid = popen.pid
        self.started = started
        self.ended = 0.0
        self._expired = False

    def _expire(self) -> None:
        self._expired = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def wait(self, sampler: Sampler | None = None, timeout: float = TIMEOUT) -> Usage:
        timer = threading.Timer(timeout, self._expire)
        timer.daemon = True
        timer.start()
        try:
            _, status, ru = os.wait4(self.pid, 0)
        finally:
            timer.cancel()
        self.ended = time.monotonic()
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        peak = 0
        if sampler is not None:
            peak = sampler.hwm(self.pid)
            sampler.forget(self.pid)
        if self._expired:
            raise BenchError(f"{self.name} did not finish within {timeout:g} s and was killed")
        return Usage(
            returncode=self.popen.returncode,
            wall_s=self.ended - self.started,
            cpu_s=ru.ru_utime + ru.ru_stime,
            user_s=ru.ru_utime,
            sys_s=ru.ru_stime,
            peak_rss_mib=peak / MiB,
        )


def read_line(popen: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """One line from a child's stdout pipe, without blocking past ``timeout``."""
    assert popen.stdout is not None
    fd = popen.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"{what}: no output line within {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise BenchError(f"{what}: exited (code {popen.poll()}) before printing a line; got {buf!r}")
            buf += chunk
    return buf.decode(errors="replace").splitlines()[0]


def read_rest(popen: subprocess.Popen[bytes]) -> str:
    """What is left on an exited child's stdout pipe."""
    assert popen.stdout is not None
    fd, out = popen.stdout.fileno(), b""
    while True:
        ready, _, _ = select.select([fd], [], [], 5)
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            return out.decode(errors="replace")
        out += chunk


class Harness:
    """A tmpfs work dir, every child process, and the RSS sampler; all cleaned up on exit, whatever happens."""

    def __init__(self, prefix: str) -> None:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        if base is None:
            print("warning: /dev/shm not writable; using the default temp dir (maybe not tmpfs)", file=sys.stderr)
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        self.children: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []
        self.sampler = Sampler()
        self.sampler.start()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def open(self, path: Path) -> IO[bytes]:
        f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._files.append(f)
        return f

    def popen(self, cmd: Sequence[str | Path], name: str, **kw: Any) -> Child:
        started = time.monotonic()
        p = subprocess.Popen([str(c) for c in cmd], start_new_session=True, stdin=subprocess.DEVNULL, **kw)
        self.children.append(p)
        return Child(p, name, started)

    def run(self, cmd: Sequence[str | Path], timeout: float = TIMEOUT, **kw: Any) -> str:
        """Run to completion; return stdout; BenchError with stderr on failure or timeout."""
        child = self.popen(cmd, " ".join(str(c) for c in cmd[:4]), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, **kw)
        try:
            out, err = child.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.popen.communicate()
            raise BenchError(f"{child.name} took over {timeout:g} s; killed") from None
        if child.popen.returncode:
            raise BenchError(f"{child.name} exited {child.popen.returncode}: {err.decode(errors='replace').strip()}")
        return out.decode(errors="replace")

    def close(self) -> None:
        self.sampler.stop()
        live = [p for p in self.children if p.returncode is None and p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        # Anything a child left behind in its process group (whose id is the child's pid). A group id
        # is not reused while the group has members, so a group that still has members is ours.
        leftover = {p.pid for p in self.children} & set(group_ids())
        for pgid in leftover:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for p in self.children:
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        for f in self._files:
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def group_ids() -> list[int]:
    """Process group ids of every live (non-zombie) process."""
    out = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(os.getpgid(proc.pid))
    return out


def exit_on_sigterm() -> None:
    """SIGTERM/SIGHUP raise SystemExit, so try/finally cleanup runs."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# -- m2y -----------------------------------------------------------------------------------------

_LOG_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<label>.*) (?P<bytes>\d+) B (?P<secs>[\d.]+) s "
    r"(?P<rate>[\d.]+) MB/s (?P<outcome>.*)$"
)
_SEND_LINE = re.compile(r"ACK, (?P<bytes>\d+) bytes in (?P<secs>[\d.]+) s \((?P<rate>[\d.]+) MB/s\)")


@dataclass
class LogEntry:
    end: float  # epoch seconds, from the log line's timestamp (ms resolution)
    label: str
    nbytes: int
    seconds: float
    mb_s: float
    outcome: str


class M2YServer:
    """One ``m2y serve`` process on a free loopback port."""

    def __init__(self, h: Harness, root: Path, extra: Sequence[str] = ()) -> None:
        self.h = h
        self.log_path = h.tmp / f"serve-{len(h.children)}.log"
        cmd = [*M2Y, "serve", "--root", root, "--host", "127.0.0.1", "--port", "0", *extra]
        self.child = h.popen(cmd, "m2y serve", stdout=subprocess.PIPE, stderr=h.open(self.log_path), cwd=REPO)
        self.pid = self.child.pid
        try:
            line = read_line(self.child.popen, 60, "m2y serve")
        except BenchError as exc:
            raise BenchError(f"{exc}; log: {self.log_path.read_text(errors='replace')[-2000:]}") from None
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if not m:
            raise BenchError(f"m2y serve printed {line!r}, not 'listening on 127.0.0.1:PORT'")
        self.port = int(m.group(1))
        w = re.search(r"workers: (\d+)", line)
        self.workers = int(w.group(1)) if w else None
        self.proc = psutil.Process(self.pid)
        h.sampler.watch(self.pid, tree=True)

    def cpu(self) -> float:
        """CPU seconds of the server and its worker processes (live ones, and reaped ones via children_*)."""
        total = 0.0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    def check_alive(self, context: str) -> None:
        rc = self.child.popen.poll()
        if rc is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise BenchError(f"{context}; m2y serve had exited with code {rc}; its log ends:\n  " + "\n  ".join(tail))

    def vm_hwm_mib(self) -> float:
        """Peak RSS since the server started (the kernel's high-water mark)."""
        return vm_hwm(self.pid) / MiB

    def entries(self) -> list[LogEntry]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = _LOG_LINE.match(line)
            if m:
                end = dt.datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append(LogEntry(end, m["label"], int(m["bytes"]), float(m["secs"]), float(m["rate"]),
                                    m["outcome"]))
        return out

    def wait_entries(self, count: int, timeout: float = 10.0) -> list[LogEntry]:
        deadline = time.monotonic() + timeout
        while True:
            entries = self.entries()
            if len(entries) >= count or time.monotonic() > deadline:
                return entries
            if self.child.popen.poll() is not None:
                raise BenchError(f"m2y serve exited; log: {self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.child.popen.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.child.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.child.popen.wait(timeout=5)
        self.h.sampler.forget(self.pid)


def setup_users(h: Harness, bits: int) -> Path:
    """ROOT with two users whose public keys are exchanged."""
    root = h.tmp / "root"
    root.mkdir()
    for user in (SENDER, RECIPIENT):
        h.run([*M2Y, "keygen", user, "--root", root, "--bits", str(bits)], cwd=REPO)
    shutil.copy(root / SENDER / "pubKey" / f"{SENDER}.data", root / RECIPIENT / "pubKey" / f"{SENDER}.data")
    shutil.copy(root / RECIPIENT / "pubKey" / f"{RECIPIENT}.data", root / SENDER / "pubKey" / f"{RECIPIENT}.data")
    return root


def write_meta(h: Harness, root: Path, data: Path, folder: str) -> Path:
    h.run([*M2Y, "meta", data, "--from", SENDER, "--to", RECIPIENT, "--folder", folder, "--root", root], cwd=REPO)
    meta = data.with_suffix(".meta")
    if not meta.is_file():
        raise BenchError(f"m2y meta did not write {meta}")
    return meta


def start_send(h: Harness, root: Path, meta: Path, port: int, tag: str) -> tuple[Child, Path, Path]:
    out, err = h.tmp / f"send-{tag}.out", h.tmp / f"send-{tag}.err"
    cmd = [*M2Y, "send", meta, "--root", root, "--host", "127.0.0.1", "--port", str(port)]
    child = h.popen(cmd, f"m2y send ({tag})", stdout=h.open(out), stderr=h.open(err), cwd=REPO)
    h.sampler.watch(child.pid)
    return child, out, err


def finish_send(h: Harness, child: Child, out: Path, err: Path, nbytes: int) -> tuple[Usage, float]:
    """Wait for one ``m2y send``; return its usage and the MB/s it printed."""
    usage = child.wait(h.sampler)
    text = out.read_text(errors="replace")
    if usage.returncode != 0:
        raise BenchError(f"{child.name} exited {usage.returncode}: {err.read_text(errors='replace').strip()} "
                         f"{text.strip()}")
    m = _SEND_LINE.search(text)
    if not m or int(m["bytes"]) != nbytes:
        raise BenchError(f"{child.name}: cannot parse its output {text!r}")
    # The printed rate is rounded to 0.1 MB/s from exact seconds; recompute from bytes/rate is no better.
    return usage, float(m["rate"])


def received_file(root: Path, folder: str) -> Path:
    found = sorted((root / RECIPIENT / folder).glob(f"{SENDER}_*.data"))
    if len(found) != 1:
        raise BenchError(f"expected one {SENDER}_*.data in {RECIPIENT}/{folder}, found {[p.name for p in found]}")
    return found[0]


def check_copy(src: Path, dst: Path, what: str, full: bool) -> None:
    size = dst.stat().st_size
    if size != src.stat().st_size:
        raise BenchError(f"{what}: received {size} bytes, sent {src.stat().st_size}")
    if full and not same_file(src, dst):
        raise BenchError(f"{what}: received file differs from the sent one")


# -- the three methods -------------------------------------------------------------------------------

RECEIVER_CODE = r"""
import os, socket, sys, time
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
buf = bytearray(1 << 20)
mv = memoryview(buf)
total = 0
with open(sys.argv[1], "wb", buffering=0) as f:
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        view = mv[:n]
        while view:
            view = view[f.write(view):]
        total += n
    os.fsync(f.fileno())
print(total, time.monotonic(), flush=True)
"""

SENDER_CODE = r"""
import socket, sys, time
buf = bytearray(1 << 20)
mv = memoryview(buf)
sent = 0
with open(sys.argv[1], "rb", buffering=0) as f:
    s = socket.socket()
    t0 = time.monotonic()
    s.connect(("127.0.0.1", int(sys.argv[2])))
    while n := f.readinto(buf):
        s.sendall(mv[:n])
        sent += n
    s.close()
print(sent, t0, flush=True)
"""


# The same copy with the least an encrypted one must add, m2y's primitives without its protocol:
# the sender seals each 64 KiB block in place with AES-128-GCM (cryptography's encrypt_into, a
# 12-byte nonce per block as m2y's), the receiver opens it in place (decrypt_into) and takes the
# CRC-64/XZ of the plaintext (fastcrc), as m2y's server does. No handshake, framing or event loop.
# Where m2y/gcm is near 1, m2y adds nothing above the cost of the cryptography on this machine,
# and gcm/raw is the most an encrypted copy can reach here with one thread per end.
GCM_COMMON = r"""
import os, socket, sys, time
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
B, N, T = 65536, 16, 16
F = B + T
KEY, SALT = bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])
slot = bytearray(N * F)
mv = memoryview(slot)
frames = [mv[i * F:(i + 1) * F] for i in range(N)]
"""

GCM_RECEIVER_CODE = GCM_COMMON + r"""
import fastcrc
crc64 = fastcrc.crc64.xz
open_ = AESGCM(KEY).decrypt_into
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
total = index = crc = 0
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
eof = False
while not eof:
    got = 0
    while got < N * F:
        n = conn.recv_into(mv[got:])
        if not n:
            eof = True
            break
        got += n
    plains = []
    for i in range(-(-got // F)):
        frame = frames[i][: min(F, got - i * F)]
        plain = frame[: len(frame) - T]
        open_(SALT + index.to_bytes(8, "big"), frame, None, plain)
        crc = crc64(plain, crc)
        plains.append(plain)
        index += 1
    want = sum(len(p) for p in plains)
    done = os.writev(fd, plains) if plains else 0
    while done < want:  # a short writev: the rest block by block
        at = done
        for p in plains:
            if at < len(p):
                done += os.write(fd, p[at:])
                break
            at -= len(p)
    total += want
os.fsync(fd)
os.close(fd)
print(total, time.monotonic(), crc, flush=True)
"""

GCM_SENDER_CODE = GCM_COMMON + r"""
seal = AESGCM(KEY).encrypt_into
plains = [f[:B] for f in frames]
fd = os.open(sys.argv[1], os.O_RDONLY)
s = socket.socket()
t0 = time.monotonic()
s.connect(("127.0.0.1", int(sys.argv[2])))
sent = index = 0
while True:
    got = 0
    while got < N * B:
        i, at = divmod(got, B)
        n = os.readv(fd, [plains[i][at:], *plains[i + 1:]])
        if not n:
            break
        got += n
    if not got:
        break
    blocks = -(-got // B)
    for i in range(blocks):
        size = min(B, got - i * B)
        seal(SALT + index.to_bytes(8, "big"), frames[i][:size], None, frames[i][: size + T])
        index += 1
    s.sendall(mv[: got + T * blocks])
    sent += got
s.close()
print(sent, t0, flush=True)
"""


@dataclass
class Bench:
    h: Harness
    root: Path
    src: Path
    size: int
    server: M2YServer
    ssh: Sshd | None = None
    out_dir: Path = field(default_factory=Path)
    src_crc: int | None = None  # CRC-64/XZ of src, for the gcm copy's check


def round_m2y(b: Bench, r: int, verify: bool) -> dict[str, Any]:
    folder = f"perf/r{r}"
    meta = write_meta(b.h, b.root, b.src, folder)
    before = len(b.server.entries())
    cpu0 = b.server.cpu()
    b.h.sampler.reset(b.server.pid)
    b.server.check_alive(f"before round {r}")
    child, out, err = start_send(b.h, b.root, meta, b.server.port, f"r{r}")
    try:
        usage, reported = finish_send(b.h, child, out, err, b.size)
    except BenchError as exc:
        b.server.check_alive(str(exc))
        raise
    entries = b.server.wait_entries(before + 1)
    server_cpu = b.server.cpu() - cpu0
    if len(entries) <= before or entries[-1].outcome != "ACK":
        raise BenchError(f"server did not log an ACK for round {r}: {entries[-1:]}")
    dst = received_file(b.root, folder)
    check_copy(b.src, dst, "m2y", verify)
    dst.unlink()
    meta.with_suffix(".done").unlink(missing_ok=True)
    return {
        "mb_s": mbps(b.size, usage.wall_s),
        "reported_mb_s": reported,
        "server_logged_mb_s": entries[-1].mb_s,
        "wall_s": usage.wall_s,
        "client_cpu_s": usage.cpu_s,
        "client_user_s": usage.user_s,
        "client_sys_s": usage.sys_s,
        "server_cpu_s": server_cpu,
        "client_peak_rss_mib": usage.peak_rss_mib,
        "server_peak_rss_mib": b.h.sampler.peak(b.server.pid) / MiB,  # PSS summed over server + workers
        "server_vmhwm_mib": b.server.vm_hwm_mib(),  # the server process alone, since it started
    }


def _round_copy(b: Bench, r: int, verify: bool, what: str, codes: tuple[str, str],
                extra: Sequence[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """One copy by two fresh Python processes, timed from the sender's connect to the receiver's file closed."""
    recv_code, send_code = codes
    tag = what.split()[0]
    dst = b.out_dir / f"{tag}-r{r}.bin"
    recv_err, send_err = b.h.tmp / f"{tag}-recv-{r}.err", b.h.tmp / f"{tag}-send-{r}.err"
    recv = b.h.popen([PY, "-c", recv_code, dst, "0", *extra], f"{what} receiver", stdout=subprocess.PIPE,
                     stderr=b.h.open(recv_err))
    b.h.sampler.watch(recv.pid)
    port = int(read_line(recv.popen, 30, f"{what} receiver"))
    send = b.h.popen([PY, "-c", send_code, b.src, str(port), *extra], f"{what} sender", stdout=subprocess.PIPE,
                     stderr=b.h.open(send_err))
    b.h.sampler.watch(send.pid)
    su = send.wait(b.h.sampler)
    ru = recv.wait(b.h.sampler)
    if su.returncode or ru.returncode:
        errs = [e.read_text(errors="replace")[-500:] for e in (send_err, recv_err)]
        raise BenchError(f"{what} failed (sender {su.returncode}, receiver {ru.returncode}): {errs}")
    sent, t_connect = read_rest(send.popen).split()
    got, t_closed, *rest = read_rest(recv.popen).split()
    if int(sent) != b.size or int(got) != b.size:
        raise BenchError(f"{what} moved {sent}/{got} bytes, not {b.size}")
    seconds = float(t_closed) - float(t_connect)
    check_copy(b.src, dst, what, verify)
    dst.unlink()
    return {
        "mb_s": mbps(b.size, seconds),
        "seconds": seconds,
        "wall_s": recv.ended - send.started,
        "client_cpu_s": su.cpu_s,
        "server_cpu_s": ru.cpu_s,
        "client_peak_rss_mib": su.peak_rss_mib,
        "server_peak_rss_mib": ru.peak_rss_mib,
    }, rest


def round_raw(b: Bench, r: int, verify: bool) -> dict[str, Any]:
    return _round_copy(b, r, verify, "raw copy", (RECEIVER_CODE, SENDER_CODE))[0]


def round_gcm(b: Bench, r: int, verify: bool) -> dict[str, Any]:
    key, salt = secrets.token_hex(16), secrets.token_hex(4)  # fresh each round: no key/nonce reuse
    res, rest = _round_copy(b, r, verify, "gcm copy", (GCM_RECEIVER_CODE, GCM_SENDER_CODE), (key, salt))
    if b.src_crc is None:
        import fastcrc

        with open(b.src, "rb") as f:
            crc = 0
            while chunk := f.read(CHUNK):
                crc = fastcrc.crc64.xz(chunk, crc)
        b.src_crc = crc
    if rest != [str(b.src_crc)]:
        raise BenchError(f"gcm copy: receiver's CRC-64 {rest} is not the file's {b.src_crc}")
    return res


class Sshd:
    """A throwaway sshd on a free loopback port: own host key, own authorized_keys, key login only."""

    CIPHER = "aes128-gcm@openssh.com"

    def __init__(self, h: Harness, sshd: str, scp: str, keygen: str) -> None:
        self.h, self.scp = h, scp
        d = h.tmp / "ssh"
        d.mkdir(mode=0o700)
        h.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", d / "host_key"])
        h.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", d / "client_key"])
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        os.chmod(d / "authorized_keys", 0o600)
        self.key = d / "client_key"
        self.user = getpass.getuser()
        self.port = free_port()
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
            f"Ciphers {self.CIPHER},aes128-ctr,chacha20-poly1305@openssh.com\n"
            "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir, if missing
        self.log = d / "sshd.log"
        self.child = h.popen([sshd, "-D", "-e", "-f", d / "sshd_config"], "sshd", stdout=h.open(self.log),
                             stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            if self.child.popen.poll() is not None:
                raise BenchError(f"sshd exited {self.child.popen.returncode}: {self.log.read_text()[-1000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise BenchError("sshd did not listen within 15 s")
            time.sleep(0.05)
        self.proc = psutil.Process(self.child.pid)

    def scp_cmd(self, src: Path, dst: Path) -> list[str | Path]:
        return [self.scp, "-q", "-c", self.CIPHER, "-P", str(self.port), "-i", self.key, "-F", "/dev/null",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", src, f"{self.user}@127.0.0.1:{dst}"]

    def cpu(self) -> float:
        """The listener's CPU plus that of the per-connection sshd processes it has reaped."""
        t = self.proc.cpu_times()
        return float(t.user + t.system + t.children_user + t.children_system)

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.proc.children() and time.monotonic() < deadline:
            time.sleep(0.02)


def round_scp(b: Bench, r: int, verify: bool) -> dict[str, Any]:
    assert b.ssh is not None
    dst = b.out_dir / f"scp-r{r}.bin"
    cpu0 = b.ssh.cpu()
    err = b.h.tmp / f"scp-{r}.err"
    child = b.h.popen(b.ssh.scp_cmd(b.src, dst), "scp", stdout=subprocess.DEVNULL, stderr=b.h.open(err))
    b.h.sampler.watch(child.pid, tree=True)
    usage = child.wait(b.h.sampler)
    if usage.returncode:
        raise BenchError(f"scp exited {usage.returncode}: {err.read_text(errors='replace')[-1000:]}")
    b.ssh.wait_idle()
    check_copy(b.src, dst, "scp", verify)
    dst.unlink()
    return {
        "mb_s": mbps(b.size, usage.wall_s),
        "wall_s": usage.wall_s,
        "client_cpu_s": usage.cpu_s,  # scp and the ssh it runs
        "server_cpu_s": b.ssh.cpu() - cpu0,
        "client_peak_rss_mib": usage.peak_rss_mib,  # scp + its ssh, polled
    }


def find_ssh() -> tuple[str, str, str] | str:
    """(sshd, scp, ssh-keygen) or why scp is skipped."""
    sshd = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
                                         if os.access(p, os.X_OK)), None)
    scp, keygen = shutil.which("scp"), shutil.which("ssh-keygen")
    if not sshd:
        return "no sshd"
    if not scp or not keygen:
        return "no scp" if not scp else "no ssh-keygen"
    return sshd, scp, keygen


# -- report ----------------------------------------------------------------------------------------

ROWS = [  # (method, key, label)
    ("m2y", "mb_s", "m2y send, wall (process start to exit)"),
    ("m2y", "reported_mb_s", "m2y send, as printed (.meta read to ACK)"),
    ("m2y", "server_logged_mb_s", "m2y serve, as logged (data phase + fsync)"),
    ("raw", "mb_s", "raw TCP copy (connect to file closed)"),
    ("gcm", "mb_s", "raw copy + AES-GCM and CRC-64 (same timing)"),
    ("scp", "mb_s", "scp -c aes128-gcm, wall"),
]


def summarize(rounds: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for method in methods:
        keys = {k for r in rounds if r.get(method) for k in r[method]}
        out[method] = {k: median([r[method].get(k) for r in rounds if r.get(method)]) for k in sorted(keys)}
    return out


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(med: dict[str, dict[str, float | None]], ratios: dict[str, Any], rounds: int) -> None:
    print(f"\nmedians over {rounds} rounds:")
    print(f"  {'what':<44} {'MB/s':>8} {'wall s':>7} {'cli CPU s':>9} {'srv CPU s':>9} "
          f"{'cli RSS MiB':>11} {'srv RSS MiB':>11}")
    for method, key, label in ROWS:
        m = med.get(method)
        if not m:
            continue
        first = key == "mb_s" or method != "m2y"
        print(f"  {label:<44} {fmt(m.get(key)):>8} "
              + (f"{fmt(m.get('wall_s'), '.2f'):>7} {fmt(m.get('client_cpu_s'), '.2f'):>9} "
                 f"{fmt(m.get('server_cpu_s'), '.2f'):>9} {fmt(m.get('client_peak_rss_mib')):>11} "
                 f"{fmt(m.get('server_peak_rss_mib')):>11}" if first else ""))
    print("ratios (of medians):")
    print(f"  m2y/raw = {fmt(ratios['m2y_raw'], '.2f')} (m2y as printed)   "
          f"{fmt(ratios['m2y_wall_raw'], '.2f')} (m2y wall)")
    per_round = ratios.get("m2y_raw_per_round")
    if isinstance(per_round, list) and per_round:
        print("  m2y/raw round by round (as printed): " + " ".join(fmt(x, ".2f") for x in per_round))
    print(f"  m2y/gcm = {fmt(ratios['m2y_gcm'], '.2f')} (m2y as printed against the raw copy with AES-GCM and CRC: "
          f"what m2y adds above its cryptography)   gcm/raw = {fmt(ratios['gcm_raw'], '.2f')} "
          "(what the cryptography costs here)")
    print("  m2y/gcm round by round: " + " ".join(fmt(x, ".2f") for x in ratios["m2y_gcm_per_round"]))
    print("  gcm/raw round by round: " + " ".join(fmt(x, ".2f") for x in ratios["gcm_raw_per_round"]))
    if ratios.get("m2y_scp") is not None:
        print(f"  m2y/scp = {fmt(ratios['m2y_scp'], '.2f')} (m2y as printed)   "
              f"{fmt(ratios['m2y_wall_scp'], '.2f')} (m2y wall; scp is wall too)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="file size (256MiB, 1GiB, bytes)")
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds (default 5)")
    ap.add_argument("--json", type=Path, default=RESULTS / "transfer.json", help="where to write the results")
    ap.add_argument("--gate", type=float, nargs="?", const=DEFAULT_GATE, default=None, metavar="FLOOR",
                    help=f"exit 1 if median m2y/raw (m2y as printed) < FLOOR (default {DEFAULT_GATE})")
    ap.add_argument("--bits", type=int, default=3072, help="RSA key size for the two users (default 3072)")
    ap.add_argument("--no-scp", action="store_true", help="skip scp even where sshd exists")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed m2y, raw and gcm round before round 1")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    exit_on_sigterm()
    try:
        result = run(args)
    except BenchError as exc:
        print(f"transfer: FAILED: {exc}", file=sys.stderr)
        return 2
    gate = result.get("gate")
    if gate is not None:
        if gate["ok"]:
            print(f"PERF GATE OK: m2y/raw {fmt(gate['ratio'], '.2f')} >= floor {gate['floor']:g}")
        else:
            print(f"PERF GATE: ratio {fmt(gate['ratio'], '.2f')} < floor {gate['floor']:g}")
            return 1
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine_info()
    size: int = args.size
    with Harness("m2y-perf-transfer-") as h:
        print(f"transfer: {fmt_size(size)} x {args.rounds} rounds in {h.tmp}; {info['usable_cpus']} CPUs, "
              f"{info['cpu_model']}, Python {info['python']}", flush=True)
        root = setup_users(h, args.bits)
        src = root / SENDER / "bench" / "payload.bin"
        make_file(src, size)
        out_dir = h.tmp / "out"
        out_dir.mkdir()
        server = M2YServer(h, root)
        b = Bench(h, root, src, size, server, out_dir=out_dir)
        methods = ["m2y", "raw", "gcm"]
        scp_note = "disabled (--no-scp)" if args.no_scp else ""
        found = find_ssh() if not args.no_scp else "disabled"
        if isinstance(found, tuple):
            try:
                b.ssh = Sshd(h, *found)
                methods.append("scp")
                scp_note = f"OpenSSH sshd on 127.0.0.1:{b.ssh.port}"
            except BenchError as exc:
                scp_note = f"sshd would not start: {exc}"
        elif not args.no_scp:
            scp_note = found
        if "scp" not in methods:
            print(f"scp: skipped ({scp_note})")
        runners = {"m2y": round_m2y, "raw": round_raw, "gcm": round_gcm, "scp": round_scp}
        if not args.no_warmup:
            # Untimed: the first fresh GiB a VM's process touches costs far more than later ones.
            round_m2y(b, 0, False)
            round_raw(b, 0, False)
            round_gcm(b, 0, False)
            print("warm-up round (untimed): done", flush=True)
        rounds: list[dict[str, Any]] = []
        for r in range(1, args.rounds + 1):
            order = methods[(r - 1) % len(methods):] + methods[: (r - 1) % len(methods)]
            row: dict[str, Any] = {"round": r, "order": order}
            for method in order:
                row[method] = runners[method](b, r, r == 1)
            rounds.append(row)
            m, raw = row["m2y"], row["raw"]
            print(f"round {r}: m2y {m['mb_s']:.1f} MB/s wall, {m['reported_mb_s']:.1f} printed "
                  f"(client CPU {m['client_cpu_s']:.2f} s, server {m['server_cpu_s']:.2f} s); "
                  f"raw {raw['mb_s']:.1f} MB/s; gcm copy {row['gcm']['mb_s']:.1f} MB/s"
                  + (f"; scp {row['scp']['mb_s']:.1f} MB/s" if "scp" in row else ""),
                  flush=True)
        server.stop()
    med = summarize(rounds, methods)
    raw_med = med["raw"].get("mb_s")
    gcm_med = med["gcm"].get("mb_s")
    scp_med = med.get("scp", {}).get("mb_s")
    ratios: dict[str, Any] = {
        "m2y_raw": ratio(med["m2y"].get("reported_mb_s"), raw_med),
        "m2y_wall_raw": ratio(med["m2y"].get("mb_s"), raw_med),
        "m2y_scp": ratio(med["m2y"].get("reported_mb_s"), scp_med),
        "m2y_wall_scp": ratio(med["m2y"].get("mb_s"), scp_med),
        # Each round's m2y against the raw copy of the same round (run next to it): another view
        # of the noise; the gate and README use the ratio of medians above.
        "m2y_raw_per_round": [ratio(r["m2y"]["reported_mb_s"], r["raw"]["mb_s"]) for r in rounds],
        # The gcm copy is the raw copy plus the cryptography m2y cannot leave out: m2y/gcm is what
        # m2y's own code costs, gcm/raw what AES-GCM and the CRC cost on this machine.
        "m2y_gcm": ratio(med["m2y"].get("reported_mb_s"), gcm_med),
        "gcm_raw": ratio(gcm_med, raw_med),
        "m2y_gcm_per_round": [ratio(r["m2y"]["reported_mb_s"], r["gcm"]["mb_s"]) for r in rounds],
        "gcm_raw_per_round": [ratio(r["gcm"]["mb_s"], r["raw"]["mb_s"]) for r in rounds],
    }
    print_report(med, ratios, args.rounds)
    if server.workers:  # the gcm copy has one thread per end: like for like only where m2y runs inline
        print(f"  note: m2y's server ran {server.workers} worker process(es) (the default on {info['usable_cpus']} "
              "CPUs), the gcm copy one thread per end: m2y/gcm is then not what m2y adds above its cryptography")
    result: dict[str, Any] = {
        "machine": info,
        "config": {"size": size, "size_text": fmt_size(size), "rounds": args.rounds, "rsa_bits": args.bits,
                   "warmup": not args.no_warmup,
                   "tmpfs": "/dev/shm", "mb": "10^6 bytes", "poll_s": POLL},
        "methods": methods,
        "scp": {"measured": "scp" in methods, "note": scp_note},
        "server_workers": server.workers,
        "rounds": rounds,
        "medians": med,
        "ratios": ratios,
        "gate": None,
    }
    if args.gate is not None:
        r = ratios["m2y_raw"]
        result["gate"] = {"floor": args.gate, "ratio": r, "ok": r is not None and r >= args.gate,
                          "on": "m2y_raw (m2y MB/s as printed / raw MB/s)"}
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    sys.exit(main())
