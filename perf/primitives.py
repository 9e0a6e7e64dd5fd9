#!/usr/bin/env python3
"""MB/s of the primitives m2y is built on: AES-128-GCM and CRC-64/XZ, one thread, at 64 KiB and 1 MiB calls.

AES-128-GCM: pycryptodome (a new cipher object per block, as the seed did), cryptography's
``AESGCM.encrypt`` (allocates its output) and ``AESGCM.encrypt_into`` / ``decrypt_into``
(into a preallocated buffer, as the engine does). CRC-64/XZ: crcmod's C extension,
fastcrc ``crc64.xz`` and anycrc if installed; zlib's CRC-32 as a reference point.
Every implementation is checked against the others before it is timed.

Then, on machines with 2+ cores, whether each hot-path call releases the GIL: the same work in
two threads at once against one thread (64 KiB calls); a speedup near 2 means it does. This
decides whether threads could share block crypto inside one process.

Usage: perf/primitives.py [--mib 256] [--json PATH] [--no-threads]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transfer import RESULTS, machine_info, write_json

KiB, MiB = 1 << 10, 1 << 20
SIZES = (64 * KiB, MiB)
POOL = 8 * MiB  # distinct data cycled through, so that not every call hits the same cached bytes
KEY = bytes(range(16))
SALT = b"salt"
CHECK = b"123456789"
CRC64_XZ_CHECK = 0x995DC9BBDF1939FA

Work = Callable[[memoryview, int], None]  # (data, call number) -> None


def nonce(i: int) -> bytes:
    return SALT + i.to_bytes(8, "big")


def aes_pycryptodome(size: int) -> Work:
    from Crypto.Cipher import AES

    def work(data: memoryview, i: int) -> None:
        AES.new(KEY, AES.MODE_GCM, nonce=nonce(i)).encrypt_and_digest(data)

    return work


def aes_encrypt(size: int) -> Work:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(KEY)

    def work(data: memoryview, i: int) -> None:
        aead.encrypt(nonce(i), data, None)

    return work


def aes_encrypt_into(size: int) -> Work:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(KEY)
    out = bytearray(size + 16)

    def work(data: memoryview, i: int) -> None:
        aead.encrypt_into(nonce(i), data, None, out)

    return work


def aes_decrypt_into(size: int) -> Work:
    """Decrypts one sealed frame over and over (so its tag holds); the data pool is not used."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(KEY)
    frame = aead.encrypt(nonce(0), bytes(size), None)
    out = bytearray(size)

    def work(data: memoryview, i: int) -> None:
        aead.decrypt_into(nonce(0), frame, None, out)

    return work


def crc_crcmod(size: int) -> Work:
    import crcmod

    fn = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
    state = [0]

    def work(data: memoryview, i: int) -> None:
        state[0] = fn(data, state[0])

    return work


def crc_fastcrc(size: int) -> Work:
    import fastcrc

    state = [0]

    def work(data: memoryview, i: int) -> None:
        state[0] = fastcrc.crc64.xz(data, state[0])

    return work


def crc_anycrc(size: int) -> Work:
    import anycrc

    model = anycrc.Model("CRC64-XZ")
    state = [0]

    def work(data: memoryview, i: int) -> None:
        state[0] = model.calc(data, state[0])

    return work


def crc_zlib(size: int) -> Work:
    state = [0]

    def work(data: memoryview, i: int) -> None:
        state[0] = zlib.crc32(data, state[0])

    return work


def crcmod_uses_c() -> bool:
    mod = sys.modules.get("crcmod.crcmod")
    if mod is None:
        import crcmod  # noqa: F401 - loads crcmod.crcmod

        mod = sys.modules["crcmod.crcmod"]
    return bool(getattr(mod, "_usingExtension", False))


def checks() -> dict[str, str | None]:
    """None per implementation that agrees with the others, else why it is skipped or wrong."""
    out: dict[str, str | None] = {}
    from Crypto.Cipher import AES
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data = bytes(range(256)) * 300
    ct, tag = AES.new(KEY, AES.MODE_GCM, nonce=nonce(7)).encrypt_and_digest(data)
    sealed = AESGCM(KEY).encrypt(nonce(7), data, None)
    buf = bytearray(len(data) + 16)
    AESGCM(KEY).encrypt_into(nonce(7), data, None, buf)
    agree = sealed == ct + tag == bytes(buf)
    for name in ("aes-pycryptodome", "aes-encrypt", "aes-encrypt_into", "aes-decrypt_into"):
        out[name] = None if agree else "pycryptodome and cryptography disagree on AES-GCM"

    import crcmod
    import fastcrc

    fn = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
    out["crc-crcmod"] = None if fn(CHECK) == CRC64_XZ_CHECK else "crcmod: wrong check value"
    if out["crc-crcmod"] is None and not crcmod_uses_c():
        out["crc-crcmod"] = "crcmod runs in pure Python here (no C extension): not the figure wanted"
    half = fastcrc.crc64.xz(CHECK[4:], fastcrc.crc64.xz(CHECK[:4]))
    out["crc-fastcrc"] = None if half == CRC64_XZ_CHECK else "fastcrc: wrong check value when continued"
    try:
        import anycrc
    except ImportError:
        out["crc-anycrc"] = "anycrc is not installed (pip install anycrc)"
    else:
        model = anycrc.Model("CRC64-XZ")
        cont = model.calc(CHECK[4:], model.calc(CHECK[:4]))
        out["crc-anycrc"] = None if cont == CRC64_XZ_CHECK else "anycrc: wrong check value when continued"
    out["crc32-zlib"] = None
    return out


IMPLS: list[tuple[str, str, Callable[[int], Work]]] = [
    ("aes-pycryptodome", "AES-128-GCM pycryptodome, new cipher per call", aes_pycryptodome),
    ("aes-encrypt", "AES-128-GCM cryptography AESGCM.encrypt", aes_encrypt),
    ("aes-encrypt_into", "AES-128-GCM cryptography AESGCM.encrypt_into", aes_encrypt_into),
    ("aes-decrypt_into", "AES-128-GCM cryptography AESGCM.decrypt_into", aes_decrypt_into),
    ("crc-crcmod", "CRC-64/XZ crcmod (C extension)", crc_crcmod),
    ("crc-fastcrc", "CRC-64/XZ fastcrc crc64.xz", crc_fastcrc),
    ("crc-anycrc", "CRC-64/XZ anycrc Model('CRC64-XZ').calc", crc_anycrc),
    ("crc32-zlib", "CRC-32 zlib (reference)", crc_zlib),
]


def measure(make: Callable[[int], Work], size: int, total: int, pool: memoryview) -> tuple[float, int]:
    """Seconds for ``total`` bytes in calls of ``size`` bytes, and the number of calls."""
    work = make(size)
    views = [pool[o : o + size] for o in range(0, len(pool) - size + 1, size)]
    work(views[0], 0)  # warm up: first-call costs (imports, tables) are not the rate
    calls = max(1, total // size)
    nviews = len(views)
    t0 = time.perf_counter()
    for i in range(calls):
        work(views[i % nviews], i)
    return time.perf_counter() - t0, calls


GIL_KEYS = ("aes-encrypt_into", "aes-decrypt_into", "crc-fastcrc", "crc-crcmod")


def thread_speedup(make: Callable[[int], Work], size: int, total: int, pool: memoryview) -> dict[str, float]:
    """``total`` bytes in one thread, then ``total`` bytes in each of two threads at once."""
    one, _ = measure(make, size, total, pool)
    barrier = threading.Barrier(3)

    def run() -> None:
        work = make(size)  # each thread its own state and output buffer
        views = [pool[o : o + size] for o in range(0, len(pool) - size + 1, size)]
        work(views[0], 0)
        barrier.wait()
        for i in range(max(1, total // size)):
            work(views[i % len(views)], i)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    two = time.perf_counter() - t0
    return {"one_thread_s": one, "two_threads_s": two, "speedup": 2 * one / two}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB through each implementation and call size")
    ap.add_argument("--json", type=Path, default=RESULTS / "primitives.json", help="where to write the results")
    ap.add_argument("--no-threads", action="store_true", help="skip the GIL check (two threads against one)")
    args = ap.parse_args(argv)
    if args.mib < 1:
        ap.error("--mib must be >= 1")
    total = args.mib * MiB

    pool = memoryview(bytearray(os.urandom(POOL)))
    info = machine_info()
    print(f"primitives: {args.mib} MiB per figure, one thread; {info['cpu_model']} "
          f"({', '.join(info['cpu_flags'])}), Python {info['python']}")
    status = checks()
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    print(f"\n  {'what':<50} {'64 KiB calls':>13} {'1 MiB calls':>12}   MB/s")
    for key, label, make in IMPLS:
        why = status.get(key)
        if why is not None:
            skipped[key] = why
            print(f"  {label:<50} skipped: {why}")
            continue
        rates = []
        for size in SIZES:
            seconds, calls = measure(make, size, total, pool)
            rate = calls * size / seconds / 1e6
            rates.append(rate)
            results.append({"key": key, "what": label, "call_bytes": size, "calls": calls,
                            "bytes": calls * size, "seconds": seconds, "mb_s": rate})
        print(f"  {label:<50} {rates[0]:>13,.0f} {rates[1]:>12,.0f}", flush=True)
    by = {(r["key"], r["call_bytes"]): r["mb_s"] for r in results}
    fast = by.get(("aes-encrypt_into", 64 * KiB)), by.get(("crc-fastcrc", 64 * KiB))
    if all(fast):
        assert fast[0] is not None and fast[1] is not None
        both = 1 / (1 / fast[0] + 1 / fast[1])
        print(f"\n  one core, encrypt_into + fastcrc per 64 KiB block: at most {both:,.0f} MB/s before any I/O")
    gil: dict[str, dict[str, float]] = {}
    if not args.no_threads and len(os.sched_getaffinity(0)) >= 2:
        print("\n  two threads at once against one, 64 KiB calls (2.0 = the call releases the GIL):")
        for key, label, make in IMPLS:
            if key in GIL_KEYS and status.get(key) is None:
                gil[key] = thread_speedup(make, 64 * KiB, total, pool)
                print(f"  {label:<50} {gil[key]['speedup']:>5.2f}x", flush=True)
    write_json(args.json, {
        "machine": info,
        "config": {"mib": args.mib, "call_sizes": list(SIZES), "pool_bytes": POOL, "mb": "10^6 bytes",
                   "threads": 1},
        "results": results,
        "skipped": skipped,
        "two_threads": gil,
    })
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
