#!/usr/bin/env python3
"""The receiving server's work per GiB, part by part, in one process without sockets: what bounds it.

Each part runs alone over ``--size`` bytes of 64 KiB blocks, batches of DEFAULT_BATCH as the
engine has them, and reports CPU seconds per GiB (user+system of this process):

* decrypt: ``AESGCM.decrypt_into`` of each sealed block into a plaintext buffer (the engine opens
  in place; the cost is the same);
* crc: fastcrc CRC-64/XZ of each 64 KiB block, continued from the previous value (as the engine);
* writev-new: ``os.writev`` of each batch's plaintext views to a new file on tmpfs (what the
  server does: the kernel allocates and zeroes every 4 KiB page); the file is unlinked, and the
  ``close`` that frees its pages is timed apart (close-free: paid when the file is removed, which
  a server's received file is not);
* writev-allocated: the same into a file whose pages a ``posix_fallocate`` made first (the
  fallocate's own cost is reported as fallocate);
* mmap-decrypt: decrypt straight into an mmap of the new file (16 MiB windows), CRC of the mapped
  plaintext, no ``writev``: the copy saved, page faults and unmapping paid instead;
* memcpy: one copy of each batch, for scale.

Each round runs every part once, in this order; medians over the rounds are printed. The decrypt
and CRC parts reuse one batch (in cache, as the engine's are right after the recv). The sum of
decrypt + crc + writev-new, plus the ``recv``
copy that perf/datapath.py measures on a real socket, is the least a receiving server spends;
the raw copy's receiver spends only the recv and writev-new.

Usage: perf/receiver_parts.py [--size 1GiB] [--rounds 3] [--dir /dev/shm] [--json PATH]
"""

from __future__ import annotations

import argparse
import mmap
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from transfer import machine_info, parse_size, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.blocks import BLOCK_SIZE, TAG_LEN
from engine.crc import crc64_fast
from engine.defaults import DEFAULT_BATCH

GIB = 1 << 30
FRAME = BLOCK_SIZE + TAG_LEN
WINDOW = 16 << 20


class Parts:
    def __init__(self, size: int, folder: str) -> None:
        self.batches = size // (BLOCK_SIZE * DEFAULT_BATCH)
        self.size = self.batches * BLOCK_SIZE * DEFAULT_BATCH
        self.folder = folder
        self.aead = AESGCM(secrets.token_bytes(16))
        self.frames = memoryview(bytearray(FRAME * DEFAULT_BATCH))
        for i in range(DEFAULT_BATCH):  # one sealed batch, opened over and over (block i of every batch)
            self.aead.encrypt_into(self._nonce(i), os.urandom(BLOCK_SIZE), None, self.frames[i * FRAME:(i + 1) * FRAME])
        self.plain = memoryview(bytearray(BLOCK_SIZE * DEFAULT_BATCH))
        self.views = [self.plain[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] for i in range(DEFAULT_BATCH)]

    @staticmethod
    def _nonce(i: int) -> bytes:
        return b"salt" + i.to_bytes(8, "big")

    def _frame(self, i: int) -> memoryview:
        return self.frames[i * FRAME:(i + 1) * FRAME]

    def decrypt(self) -> None:
        for _ in range(self.batches):
            for i, out in enumerate(self.views):
                self.aead.decrypt_into(self._nonce(i), self._frame(i), None, out)

    def crc(self) -> None:
        crc = 0
        for _ in range(self.batches):
            for view in self.views:
                crc = crc64_fast(view, crc)

    def _new_file(self) -> int:
        fd, path = tempfile.mkstemp(dir=self.folder, prefix="m2y-parts-")
        os.unlink(path)  # freed at close
        return fd

    def writev_new(self) -> dict[str, float]:
        fd = self._new_file()
        try:
            started = time.process_time()
            for _ in range(self.batches):
                os.writev(fd, self.views)
            written = time.process_time()
        finally:
            os.close(fd)  # frees the pages: timed apart
        return {"writev-new": written - started, "close-free": time.process_time() - written}

    def writev_allocated(self) -> dict[str, float]:
        fd = self._new_file()
        try:
            started = time.process_time()
            os.posix_fallocate(fd, 0, self.size)
            allocated = time.process_time()
            for _ in range(self.batches):
                os.writev(fd, self.views)
            return {"fallocate": allocated - started, "writev-allocated": time.process_time() - allocated}
        finally:
            os.close(fd)

    def mmap_decrypt(self) -> dict[str, float]:
        fd = self._new_file()
        try:
            started = time.process_time()
            os.ftruncate(fd, self.size)
            crc, step = 0, BLOCK_SIZE * DEFAULT_BATCH
            for start in range(0, self.size, WINDOW):
                length = min(WINDOW, self.size - start)
                with mmap.mmap(fd, length, offset=start) as mapped:
                    window = memoryview(mapped)
                    for base in range(0, length, step):
                        for i in range(DEFAULT_BATCH):
                            out = window[base + i * BLOCK_SIZE:base + (i + 1) * BLOCK_SIZE]
                            self.aead.decrypt_into(self._nonce(i), self._frame(i), None, out)
                            crc = crc64_fast(out, crc)
                            out.release()
                    window.release()
            return {"mmap-decrypt+crc": time.process_time() - started}  # the close, freeing, not counted
        finally:
            os.close(fd)

    def memcpy(self) -> None:
        copy = bytearray(len(self.plain))
        for _ in range(self.batches):
            copy[:] = self.plain


def timed(run: Callable[[], object]) -> float:
    started = time.process_time()
    run()
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=GIB, help="bytes per part and round (default 1GiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm", help="where the files are written (default /dev/shm: tmpfs)")
    ap.add_argument("--json", type=Path, help="write the per-round figures here")
    args = ap.parse_args(argv)
    if args.size < BLOCK_SIZE * DEFAULT_BATCH or args.rounds < 1:
        ap.error(f"need --rounds >= 1 and --size at least one batch ({BLOCK_SIZE * DEFAULT_BATCH} bytes)")
    info = machine_info()
    parts = Parts(args.size, args.dir)
    per_gib = GIB / parts.size
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        figures = {"decrypt": timed(parts.decrypt), "crc": timed(parts.crc)}
        figures.update(parts.writev_new())
        figures.update(parts.writev_allocated())
        figures.update(parts.mmap_decrypt())
        figures["memcpy"] = timed(parts.memcpy)
        rounds.append({k: v * per_gib for k, v in figures.items()})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in rounds[-1].items()), flush=True)
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"CPU seconds per GiB, medians of {args.rounds} rounds ({args.dir}):")
    for k, v in medians.items():
        print(f"  {k:18s} {v:.3f}")
    floor = medians["decrypt"] + medians["crc"] + medians["writev-new"]
    print(f"  decrypt + crc + writev-new = {floor:.3f} (the raw receiver's part of it: writev-new "
          f"{medians['writev-new']:.3f}); mmap-decrypt+crc against decrypt + crc + writev-new: "
          f"{medians['mmap-decrypt+crc']:.3f} against {floor:.3f}")
    if args.json:
        write_json(args.json, {"machine": info, "config": {"size": parts.size, "dir": args.dir, "batch": DEFAULT_BATCH,
                                                            "unit": "CPU seconds per GiB"},
                               "rounds": rounds, "medians": medians})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
