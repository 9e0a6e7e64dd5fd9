#!/usr/bin/env python3
"""What one ``m2y send`` costs before and after its bytes: process start-up and the per-file handshake.

Sends a 1-byte file N times to one ``m2y serve`` on loopback, each time as a new process, and
alternates with ``python -c pass`` (the interpreter's own floor) so both see the same host.
Per send it records the process's wall and CPU seconds (wait4 rusage) and the time ``m2y send``
prints (reading the .meta to the verified ACK: two RSA-OAEP operations, the server's .meta and
commit fsyncs, three round trips). Start-up and exit = wall minus printed.

Usage: perf/startup.py [--rounds 15] [--json PATH]
Exit: 0 ok, 2 the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from transfer import (
    PY,
    RESULTS,
    BenchError,
    Harness,
    M2YServer,
    exit_on_sigterm,
    finish_send,
    machine_info,
    received_file,
    setup_users,
    start_send,
    write_json,
    write_meta,
)


def ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="sends (and interpreter starts) to time")
    ap.add_argument("--bits", type=int, default=3072, help="RSA key size of the two users")
    ap.add_argument("--json", type=Path, default=RESULTS / "startup.json", help="where to write the results")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    exit_on_sigterm()
    info = machine_info()
    rows: list[dict[str, Any]] = []
    try:
        with Harness("m2y-perf-startup-") as h:
            root = setup_users(h, args.bits)
            src = h.tmp / "one.bin"
            src.write_bytes(b"x")
            server = M2YServer(h, root)
            print(f"startup: {args.rounds} rounds; {info['nproc']} CPUs, {info['cpu_model']}, "
                  f"Python {info['python']}", flush=True)
            for r in range(1, args.rounds + 1):
                floor = h.popen([PY, "-c", "pass"], "python -c pass").wait()
                folder = f"startup/r{r}"
                meta = write_meta(h, root, src, folder)
                child, out, err = start_send(h, root, meta, server.port, f"s{r}")
                usage, _ = finish_send(h, child, out, err, 1)
                printed = float(out.read_text().split(" bytes in ")[1].split(" s ")[0])
                received_file(root, folder).unlink()
                rows.append({"round": r, "python_wall_s": floor.wall_s, "python_cpu_s": floor.cpu_s,
                             "send_wall_s": usage.wall_s, "send_cpu_s": usage.cpu_s,
                             "send_printed_s": printed})
                print(f"round {r}: m2y send {1000 * usage.wall_s:.0f} ms wall, {1000 * usage.cpu_s:.0f} ms CPU "
                      f"(printed {1000 * printed:.0f} ms); python -c pass {1000 * floor.wall_s:.0f} ms", flush=True)
            server.stop()
    except BenchError as exc:
        print(f"startup: benchmark failed: {exc}", file=sys.stderr)
        return 2
    med = {
        "send_wall_ms": ms([r["send_wall_s"] for r in rows]),
        "send_cpu_ms": ms([r["send_cpu_s"] for r in rows]),
        "send_printed_ms": ms([r["send_printed_s"] for r in rows]),
        "startup_and_exit_ms": ms([r["send_wall_s"] - r["send_printed_s"] for r in rows]),
        "python_wall_ms": ms([r["python_wall_s"] for r in rows]),
        "python_cpu_ms": ms([r["python_cpu_s"] for r in rows]),
    }
    print(f"\nmedians over {len(rows)} rounds:")
    print(f"  m2y send of 1 byte: {med['send_wall_ms']:.0f} ms wall, {med['send_cpu_ms']:.0f} ms CPU")
    print(f"    of which .meta read -> ACK (handshake, fsyncs, round trips): {med['send_printed_ms']:.0f} ms")
    print(f"    and process start-up + exit: {med['startup_and_exit_ms']:.0f} ms")
    print(f"  python -c pass: {med['python_wall_ms']:.0f} ms wall, {med['python_cpu_ms']:.0f} ms CPU")
    write_json(args.json, {"machine": info, "config": {"rounds": args.rounds, "rsa_bits": args.bits},
                           "rounds": rows, "medians": med})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
