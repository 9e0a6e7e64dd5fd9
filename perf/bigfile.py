"""One big transfer on disk (not tmpfs): MB/s, and both processes' peak RSS, which must stay flat.

    python perf/bigfile.py --size 20GB --dir /var/tmp/m2y-big

Creates two users (2048-bit keys: key size does not matter for throughput), a file of --size
pseudo-random bytes, its .meta, a server on a free loopback port, one `m2y send`; polls both
processes' RSS every 0.2 s; checks the ACK and 64 random 1 MiB windows of the received file;
writes perf/results/bigfile.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
M2Y = [sys.executable, "-m", "cli"]
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", text.strip())
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 20GB, 1GiB, 500MB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def write_file(path: Path, size: int) -> None:
    """Pseudo-random content, fast: SHAKE-256 stream of a random seed, 64 MiB at a time."""
    chunk = 64 * 2**20
    seed = os.urandom(32)
    with open(path, "wb") as f:
        done = 0
        n = 0
        while done < size:
            want = min(chunk, size - done)
            f.write(hashlib.shake_256(seed + n.to_bytes(8, "big")).digest(want))
            done += want
            n += 1


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("20GB"))
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/m2y-big"))
    ap.add_argument("--workers", type=int, default=None, help="passed to serve and send (default: theirs)")
    ap.add_argument("--checkpoint", type=float, default=None, help="passed to serve (default: its own)")
    ap.add_argument("--json", type=Path, default=REPO / "perf" / "results" / "bigfile.json")
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = ap.parse_args()

    free = shutil.disk_usage(args.dir.parent if not args.dir.exists() else args.dir).free
    if free < 2 * args.size + 2**30:
        print(f"bigfile: need {2 * args.size / 1e9:.1f} GB free in {args.dir}, have {free / 1e9:.1f}")
        return 2
    shutil.rmtree(args.dir, ignore_errors=True)
    root = args.dir / "root"
    root.mkdir(parents=True)
    server = None
    try:
        for user in ("zhenqiang", "roland-frei"):
            subprocess.run([*M2Y, "keygen", user, "--root", str(root), "--bits", "2048"], check=True,
                           capture_output=True, timeout=120)
        shutil.copy(root / "zhenqiang/pubKey/zhenqiang.data", root / "roland-frei/pubKey/")
        shutil.copy(root / "roland-frei/pubKey/roland-frei.data", root / "zhenqiang/pubKey/")
        src_dir = root / "zhenqiang" / "big"
        src_dir.mkdir()
        data = src_dir / "big.bin"
        t0 = time.monotonic()
        write_file(data, args.size)
        print(f"bigfile: wrote {args.size} bytes in {time.monotonic() - t0:.1f} s")
        subprocess.run([*M2Y, "meta", str(data), "--from", "zhenqiang", "--to", "roland-frei", "--folder", "big",
                        "--root", str(root)], check=True, capture_output=True, timeout=3600)
        extra = [] if args.workers is None else ["--workers", str(args.workers)]
        checkpoint = [] if args.checkpoint is None else ["--checkpoint", str(args.checkpoint)]
        server = subprocess.Popen([*M2Y, "serve", "--root", str(root), "--port", "0", *extra, *checkpoint],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.stdout is not None
        line = server.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        started = time.monotonic()
        client = subprocess.Popen([*M2Y, "send", str(data.with_suffix(".meta")), "--root", str(root),
                                   "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        procs = {"client": psutil.Process(client.pid), "server": psutil.Process(server.pid)}
        peak = {"client": 0, "server": 0}
        cpu = {"client": 0.0, "server": 0.0}
        while client.poll() is None:
            for name, p in procs.items():
                try:
                    peak[name] = max(peak[name], p.memory_info().rss)
                    t = p.cpu_times()
                    cpu[name] = t.user + t.system
                except psutil.Error:
                    pass
            if time.monotonic() - started > 7200:
                client.kill()
                raise SystemExit("bigfile: gave up after 2 hours")
            time.sleep(0.2)
        seconds = time.monotonic() - started
        out, err = client.communicate()
        if client.returncode != 0:
            print(out, err)
            return 1
        received = next((root / "roland-frei" / "big").glob("zhenqiang_*.data"))
        assert received.stat().st_size == args.size
        rng = random.Random(1)
        with open(data, "rb") as a, open(received, "rb") as b:
            for _ in range(64):
                pos = rng.randrange(max(args.size - 2**20, 1))
                a.seek(pos)
                b.seek(pos)
                assert a.read(2**20) == b.read(2**20), f"received file differs near byte {pos}"
        result = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
            "size_bytes": args.size, "dir": str(args.dir), "seconds": round(seconds, 2),
            "mb_per_s": round(args.size / seconds / 1e6, 1),
            "peak_rss_mb": {k: round(v / 2**20, 1) for k, v in peak.items()},
            "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
            "client_output": out.strip(),
        }
        print(json.dumps(result, indent=1))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
