#!/usr/bin/env python3
"""Each end's bare data path, over a real loopback socket to a trivial peer: where m2y's time goes.

The measured side runs in this process with the engine's own code; its peer is a separate,
minimal Python process on the other core that does as little as it can.

* sender: read the file into a slot, seal it in place (``pool.process_batch`` ENCRYPT: AES-128-GCM;
  the sender takes no CRC, it sends its .meta's), ``sendall`` the frames; the peer ``recv_into``s
  and discards. Raw: read 1 MiB, ``sendall`` (the raw copy's sender).
* receiver: the peer ``sendall``s one sealed batch over and over; this side ``recv_into``s a
  slot, opens it in place (DECRYPT: AES-128-GCM + CRC-64) and ``writev``s the plaintext to a new
  file, fsynced at the end. Raw: the peer sends plain bytes, this side ``recv_into`` 1 MiB + write
  (the raw copy's receiver).

No protocol, event loop or handshake: each side's m2y/raw ratio here is the most an end-to-end run
can reach when that side is the busier one. Rounds alternate; medians are printed.

Usage: perf/datapath.py [--size 1GiB] [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transfer import (
    PY,
    RESULTS,
    BenchError,
    Harness,
    exit_on_sigterm,
    fmt_size,
    machine_info,
    make_file,
    mbps,
    parse_size,
    read_line,
    read_rest,
    write_json,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.blocks import BLOCK_SIZE, BlockCipher
from engine.defaults import DEFAULT_BATCH
from engine.pool import DECRYPT, ENCRYPT, advance, plain_views, process_batch, slot_size

CHUNK = 1 << 20
BATCH_PLAIN = DEFAULT_BATCH * BLOCK_SIZE

SINK_CODE = r"""
import socket, sys, time
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
buf = bytearray(1 << 20)
total = 0
while n := conn.recv_into(buf):
    total += n
print(total, time.monotonic(), flush=True)
"""

FEEDER_CODE = r"""
import socket, sys
chunk = open(sys.argv[1], "rb").read()
count, port = int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
view = memoryview(chunk)
for _ in range(count):
    s.sendall(view)
s.close()
"""


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _connect_sink(h: Harness) -> tuple[Any, socket.socket]:
    sink = h.popen([PY, "-c", SINK_CODE], "sink", stdout=subprocess.PIPE)
    port = int(read_line(sink.popen, 30, "sink"))
    return sink, socket.create_connection(("127.0.0.1", port))


def _finish_sink(sink: Any, size: int, wire: int) -> float:
    """Wait for the sink; return the monotonic time it saw EOF."""
    sink.wait()
    got, t_end = read_rest(sink.popen).split()
    if int(got) != wire:
        raise BenchError(f"sink received {got} bytes, expected {wire}")
    return float(t_end)


def send_raw(h: Harness, src: Path, size: int, tmp: Path) -> dict[str, float]:
    sink, s = _connect_sink(h)
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    c0, t0 = _cpu(), time.monotonic()
    with s, open(src, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            s.sendall(mv[:n])
    cpu = _cpu() - c0
    return {"seconds": _finish_sink(sink, size, size) - t0, "cpu_s": cpu}


def send_m2y(h: Harness, src: Path, size: int, tmp: Path) -> dict[str, float]:
    cipher = BlockCipher(secrets.token_bytes(16), secrets.token_bytes(4))
    slot = memoryview(bytearray(slot_size(DEFAULT_BATCH)))
    sink, s = _connect_sink(h)
    wire = 0
    c0, t0 = _cpu(), time.monotonic()
    fd = os.open(src, os.O_RDONLY)
    try:
        with s:
            index, left = 0, size
            while left:
                want = min(BATCH_PLAIN, left)
                todo = plain_views(slot, want)
                while todo:
                    n = os.readv(fd, todo)
                    if not n:
                        raise BenchError("source file shrank")
                    todo = advance(todo, n)
                process_batch(cipher, ENCRYPT, slot, index, want)
                blocks = -(-want // BLOCK_SIZE)
                frames = slot[: want + 16 * blocks]
                s.sendall(frames)
                wire += len(frames)
                index += DEFAULT_BATCH
                left -= want
    finally:
        os.close(fd)
    cpu = _cpu() - c0
    return {"seconds": _finish_sink(sink, size, wire) - t0, "cpu_s": cpu}


def _feed(h: Harness, chunk: bytes, count: int, tmp: Path) -> tuple[Any, socket.socket, socket.socket]:
    path = tmp / "chunk.bin"
    path.write_bytes(chunk)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    feeder = h.popen([PY, "-c", FEEDER_CODE, path, str(count), str(ls.getsockname()[1])], "feeder")
    conn, _ = ls.accept()
    return feeder, ls, conn


def _recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on a clean EOF before the first byte."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if not n:
            if got == 0:
                return False
            raise BenchError("feeder stopped mid-batch")
        got += n
    return True


def recv_raw(h: Harness, src: Path, size: int, tmp: Path) -> dict[str, float]:
    count = size // CHUNK
    feeder, ls, conn = _feed(h, os.urandom(CHUNK), count, tmp)
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    dst = tmp / "dst.bin"
    total = 0
    c0, t0 = _cpu(), time.monotonic()
    with ls, conn, open(dst, "wb", buffering=0) as f:
        while n := conn.recv_into(buf):
            view = mv[:n]
            while view:
                view = view[f.write(view):]
            total += n
        os.fsync(f.fileno())
    seconds, cpu = time.monotonic() - t0, _cpu() - c0
    feeder.wait()
    dst.unlink()
    if total != count * CHUNK:
        raise BenchError(f"raw receiver got {total} bytes, expected {count * CHUNK}")
    return {"seconds": seconds, "cpu_s": cpu}


def recv_m2y(h: Harness, src: Path, size: int, tmp: Path) -> dict[str, float]:
    cipher = BlockCipher(secrets.token_bytes(16), secrets.token_bytes(4))
    sealed = memoryview(bytearray(slot_size(DEFAULT_BATCH)))
    for view in plain_views(sealed, BATCH_PLAIN):
        view[:] = os.urandom(len(view))
    process_batch(cipher, ENCRYPT, sealed, 0, BATCH_PLAIN)  # one valid batch, sent and opened again and again
    count = size // BATCH_PLAIN
    feeder, ls, conn = _feed(h, bytes(sealed), count, tmp)
    slot = memoryview(bytearray(slot_size(DEFAULT_BATCH)))
    dst = tmp / "dst.bin"
    batches = 0
    c0, t0 = _cpu(), time.monotonic()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with ls, conn:
            while _recv_exactly(conn, slot):
                process_batch(cipher, DECRYPT, slot, 0, BATCH_PLAIN)
                todo = plain_views(slot, BATCH_PLAIN)
                while todo:
                    todo = advance(todo, os.writev(fd, todo))
                batches += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds, cpu = time.monotonic() - t0, _cpu() - c0
    feeder.wait()
    dst.unlink()
    if batches != count:
        raise BenchError(f"m2y receiver opened {batches} batches, expected {count}")
    return {"seconds": seconds, "cpu_s": cpu}


Side = Callable[[Harness, Path, int, Path], dict[str, float]]
SIDES: list[tuple[str, Side, Side]] = [("sender", send_raw, send_m2y), ("receiver", recv_raw, recv_m2y)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="bytes per side and round")
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds")
    ap.add_argument("--json", type=Path, default=RESULTS / "datapath.json", help="where to write the results")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.size < BATCH_PLAIN or args.size % BATCH_PLAIN:
        ap.error(f"need --rounds >= 1 and --size a multiple of {BATCH_PLAIN} bytes")
    exit_on_sigterm()
    info = machine_info()
    results: dict[str, list[dict[str, float]]] = {}
    try:
        with Harness("m2y-perf-datapath-") as h:
            src = h.tmp / "src.bin"
            make_file(src, args.size)
            print(f"datapath: {fmt_size(args.size)} per side x {args.rounds} rounds, files in {h.tmp}; "
                  f"{info['nproc']} CPUs, {info['cpu_model']}", flush=True)
            for r in range(1, args.rounds + 1):
                line = []
                for side, raw, m2y in SIDES:
                    for name, fn in (("raw", raw), ("m2y", m2y)):
                        res = fn(h, src, args.size, h.tmp)
                        res["mb_s"] = mbps(args.size, res["seconds"])
                        results.setdefault(f"{side}/{name}", []).append(res)
                        line.append(f"{side} {name} {res['mb_s']:.0f}")
                print(f"round {r}: " + ", ".join(line) + " MB/s", flush=True)
    except BenchError as exc:
        print(f"datapath: benchmark failed: {exc}", file=sys.stderr)
        return 2
    medians: dict[str, Any] = {}
    print(f"\nmedians over {args.rounds} rounds (MB/s; CPU seconds of the measured side):")
    for side, _, _ in SIDES:
        med: dict[str, float] = {}
        for name in ("raw", "m2y"):
            for k in ("mb_s", "cpu_s"):
                med[f"{name}_{k}"] = statistics.median(x[k] for x in results[f"{side}/{name}"])
        med["ratio"] = med["m2y_mb_s"] / med["raw_mb_s"]
        medians[side] = med
        print(f"  {side:<8}: raw {med['raw_mb_s']:,.0f} ({med['raw_cpu_s']:.2f} s), "
              f"m2y {med['m2y_mb_s']:,.0f} ({med['m2y_cpu_s']:.2f} s), m2y/raw = {med['ratio']:.2f}")
    write_json(args.json, {"machine": info, "config": {"size": args.size, "rounds": args.rounds,
                                                       "batch": DEFAULT_BATCH, "mb": "10^6 bytes"},
                           "rounds": results, "medians": medians})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
