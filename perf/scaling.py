#!/usr/bin/env python3
"""Aggregate MB/s of one ``m2y serve`` against 1, 4, 16 concurrent ``m2y send`` processes (and server workers).

The total is fixed (--size, default 256 MiB) and split evenly among the N clients; each
client is its own ``m2y send`` process with its own file (hard links of one tmpfs file)
and its own folder, all started at once against one server. Two rates per point:

* wall: total bytes / (first client started .. last client exited), process start-up included;
* server: total bytes / (first data block .. last ACK), from the server's per-transfer log
  lines (their end times and durations), i.e. the transfer itself.

The workers axis (--workers 0,1,2,4; 0 = inline) needs ``m2y serve --workers``; a build without it prints
'workers: not yet supported by this build' and measures the server as it is.
Writes a PNG plot (--png) and JSON beside it (--json).

Usage: perf/scaling.py [--size 256MiB] [--clients 1,4,16] [--workers 0,1,2,4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from transfer import (
    M2Y,
    RECIPIENT,
    REPO,
    RESULTS,
    SENDER,
    BenchError,
    Harness,
    M2YServer,
    Usage,
    exit_on_sigterm,
    finish_send,
    fmt_size,
    machine_info,
    mbps,
    median,
    parse_size,
    received_file,
    setup_users,
    start_send,
    write_json,
)
from transfer import make_file as make_data

MiB = 1 << 20


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError("need one or more integers >= 0")
    return values


def serve_has_workers() -> bool:
    out = subprocess.run([*M2Y, "serve", "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
    return "--workers" in out.stdout


def prepare_clients(h: Harness, root: Path, base: Path, n: int, tag: str) -> list[tuple[Path, int, str]]:
    """N (meta, size, folder): hard links of the per-N files, one .meta each, in a folder of their own."""
    out = []
    procs = []
    for k in range(n):
        src = base.parent / f"{base.stem}-n{n}-c{k}.bin"
        data = base.parent / f"{base.stem}-n{n}-c{k}-{tag}.bin"
        os.link(src, data)
        folder = f"perf/scale/{tag}/n{n}/c{k}"
        cmd = [*M2Y, "meta", data, "--from", SENDER, "--to", RECIPIENT, "--folder", folder, "--root", root]
        procs.append((h.popen(cmd, f"m2y meta c{k}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO),
                      data, folder))
    for child, data, folder in procs:
        try:
            _, err = child.popen.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{child.name} took over 300 s") from None
        if child.popen.returncode:
            raise BenchError(f"{child.name} exited {child.popen.returncode}: {err.decode(errors='replace')}")
        out.append((data.with_suffix(".meta"), data.stat().st_size, folder))
    return out


def run_point(h: Harness, root: Path, server: M2YServer, base: Path, n: int, tag: str) -> dict[str, Any]:
    clients = prepare_clients(h, root, base, n, tag)
    total = sum(size for _, size, _ in clients)
    before = len(server.entries())
    cpu0 = server.cpu()
    h.sampler.reset(server.pid)
    t_epoch0, t0 = time.time(), time.monotonic()
    started = [(start_send(h, root, meta, server.port, f"{tag}-n{n}-c{k}"), size)
               for k, (meta, size, _) in enumerate(clients)]
    results: list[tuple[Usage, float] | BaseException] = [BenchError("not waited")] * n

    def wait(k: int) -> None:
        (child, out, err), size = started[k]
        try:
            results[k] = finish_send(h, child, out, err, size)
        except BaseException as exc:  # reported below, in the main thread
            results[k] = exc

    threads = [threading.Thread(target=wait, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_end = max(child.ended for (child, _, _), _ in started)
    for r in results:
        if isinstance(r, BaseException):
            raise r if isinstance(r, BenchError) else BenchError(f"waiting for a client failed: {r!r}")
    entries = server.wait_entries(before + n)[before:]
    server_cpu = server.cpu() - cpu0
    if len(entries) != n or any(e.outcome != "ACK" for e in entries):
        raise BenchError(f"server logged {[(e.label, e.outcome) for e in entries]} for {n} clients")
    first_data = min(e.end - e.seconds for e in entries)
    last_ack = max(e.end for e in entries)
    for _, size, folder in clients:
        data = received_file(root, folder)
        if data.stat().st_size != size:
            raise BenchError(f"{data} has {data.stat().st_size} bytes, not {size}")
        data.unlink()
    for meta, _, _ in clients:
        meta.with_suffix(".done").unlink(missing_ok=True)
        meta.with_suffix(".bin").unlink()
    usages = [r[0] for r in results if not isinstance(r, BaseException)]
    return {
        "clients": n,
        "bytes": total,
        "wall_s": t_end - t0,
        "wall_mb_s": mbps(total, t_end - t0),
        "server_span_s": last_ack - first_data,
        "server_mb_s": mbps(total, last_ack - first_data),
        "start_to_first_data_s": first_data - t_epoch0,
        "client_reported_mb_s": [r[1] for r in results if not isinstance(r, BaseException)],
        "clients_cpu_s": sum(u.cpu_s for u in usages),
        "server_cpu_s": server_cpu,
        "server_cpu_s_per_gib": server_cpu / total * (1 << 30),
        "server_peak_rss_mib": h.sampler.peak(server.pid) / MiB,
        "client_peak_rss_mib_max": max(u.peak_rss_mib for u in usages),
    }


def plot(path: Path, points: dict[str, dict[int, dict[str, float | None]]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, (series, by_n) in enumerate(points.items()):
        ns = sorted(by_n)
        for key, style, label in (("server_mb_s", "o-", "server side"), ("wall_mb_s", "s--", "wall")):
            ys = [by_n[n][key] for n in ns]
            ax.plot(ns, [y if y is not None else float("nan") for y in ys], style, color=f"C{i}",
                    label=f"{series}, {label}")
    ax.set_xscale("log", base=2)
    all_ns = sorted({n for by_n in points.values() for n in by_n})
    ax.set_xticks(all_ns, [str(n) for n in all_ns])
    ax.set_xlabel("concurrent m2y send processes")
    ax.set_ylabel("aggregate MB/s (median)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("256MiB"), help="total bytes, split among clients")
    ap.add_argument("--clients", type=int_list, default=[1, 4, 16], help="client counts (default 1,4,16)")
    ap.add_argument("--workers", type=int_list, default=[0, 1, 2, 4], help="server worker processes (default 0,1,2,4; "
                    "0 = inline), where m2y serve has --workers")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each point is the median (default 3)")
    ap.add_argument("--bits", type=int, default=3072, help="RSA key size for the two users (default 3072)")
    ap.add_argument("--png", type=Path, default=RESULTS / "scaling.png", help="plot to write")
    ap.add_argument("--json", type=Path, default=None, help="results to write (default: the --png path, .json)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if min(args.clients) < 1:
        ap.error("--clients must all be >= 1")
    exit_on_sigterm()
    try:
        run(args)
    except BenchError as exc:
        print(f"scaling: FAILED: {exc}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    info = machine_info()
    size: int = args.size
    json_path: Path = args.json or args.png.with_suffix(".json")
    workers: list[int | None]
    if serve_has_workers():
        workers = list(args.workers)
    else:
        print("workers: not yet supported by this build")
        workers = [None]
    rows: list[dict[str, Any]] = []
    with Harness("m2y-perf-scaling-") as h:
        print(f"scaling: {fmt_size(size)} in total, clients {args.clients}, {args.rounds} rounds, in {h.tmp}; "
              f"{info['usable_cpus']} CPUs, {info['cpu_model']}", flush=True)
        root = setup_users(h, args.bits)
        base = root / SENDER / "bench" / "payload.bin"
        for n in args.clients:
            each = [size // n + (1 if k < size % n else 0) for k in range(n)]
            for k, nbytes in enumerate(each):
                make_data(base.parent / f"{base.stem}-n{n}-c{k}.bin", nbytes)
        for w in workers:
            server = M2YServer(h, root, [] if w is None else ["--workers", str(w)])
            try:
                for r in range(1, args.rounds + 1):
                    order = args.clients if r % 2 else list(reversed(args.clients))
                    for n in order:
                        point = run_point(h, root, server, base, n, f"w{'d' if w is None else w}r{r}")
                        point.update(workers=w, round=r)
                        rows.append(point)
                        print(f"  workers {'default' if w is None else w} round {r}: {n:>3} clients: "
                              f"{point['server_mb_s']:7.1f} MB/s server side, {point['wall_mb_s']:7.1f} wall "
                              f"(server CPU {point['server_cpu_s']:.2f} s, clients {point['clients_cpu_s']:.2f} s, "
                              f"server peak RSS {point['server_peak_rss_mib']:.0f} MiB)", flush=True)
            finally:
                server.stop()
    keys = ("server_mb_s", "wall_mb_s", "server_cpu_s", "server_cpu_s_per_gib", "clients_cpu_s",
            "server_peak_rss_mib", "wall_s", "server_span_s")
    medians: dict[str, dict[int, dict[str, float | None]]] = {}
    print("\nmedians (aggregate MB/s, server side / wall):")
    for w in workers:
        series = "server as built" if w is None else "inline (0 workers)" if w == 0 else f"{w} workers"
        medians[series] = {}
        for n in args.clients:
            pts = [p for p in rows if p["workers"] == w and p["clients"] == n]
            medians[series][n] = {k: median([p[k] for p in pts]) for k in keys}
            m = medians[series][n]
            print(f"  {series:<16} {n:>3} clients: {m['server_mb_s']:7.1f} / {m['wall_mb_s']:7.1f} MB/s, "
                  f"server CPU {m['server_cpu_s']:.2f} s ({m['server_cpu_s_per_gib']:.2f} s/GiB), "
                  f"peak RSS {m['server_peak_rss_mib']:.0f} MiB")
    title = (f"m2y scaling: {fmt_size(size)} total over loopback, median of {args.rounds}\n"
             f"{info['usable_cpus']} CPUs, {info['cpu_model']}, git {info['git']}, {info['date']}")
    plot(args.png, medians, title)
    write_json(json_path, {
        "machine": info,
        "config": {"size": size, "size_text": fmt_size(size), "clients": args.clients, "rounds": args.rounds,
                   "workers_requested": args.workers, "workers_supported": workers != [None],
                   "mb": "10^6 bytes"},
        "points": rows,
        "medians": {s: {str(n): v for n, v in by_n.items()} for s, by_n in medians.items()},
        "png": str(args.png),
    })
    print(f"wrote {args.png} and {json_path}")


if __name__ == "__main__":
    sys.exit(main())
