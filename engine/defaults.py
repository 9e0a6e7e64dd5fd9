"""The defaults every command starts from, in a module that imports nothing heavy.

``m2y --help`` and the argument parsers need these numbers before they know which
command runs; keeping them here lets ``m2y send`` start without importing the server
(and ``m2y serve`` without the client), which is start-up time on every transfer.
"""

from __future__ import annotations

import os

DEFAULT_PORT = 8642
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_FILE_SIZE = 64 * 1024**3  # 64 GiB: the 20 GB files the project is for, with room
DEFAULT_MAX_ENVELOPE = 64 * 1024  # largest metadata envelope a server reads
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds a client may stay silent mid-transfer
DEFAULT_HANDSHAKE_TIMEOUT = 10.0  # seconds to deliver header and metadata, however trickled
DEFAULT_KEEP_PARTIAL = 3600.0  # seconds the received part of a cut-short send waits for a resend
DEFAULT_CHECKPOINT = 10.0  # seconds between records of a transfer under way (what a server crash keeps)
DEFAULT_MAX_CLIENTS = 64
DEFAULT_STOP_WAIT = 30.0  # seconds a stopping server waits for its disk (a hung one must not hold the stop)
DEFAULT_TIMEOUT = 60.0  # seconds a client waits for the server
DEFAULT_RETRIES = 3  # more tries of a file whose connection broke (each resumes) or whose server was busy
MAX_RETRIES = 100
DEFAULT_RETRY_WAIT = 1.0  # seconds before the first retry; doubles for each next one
MAX_RETRY_WAIT = 30.0  # seconds, the longest pause between two tries
DEFAULT_BATCH = 16  # 64 KiB blocks per batch
MAX_BATCH = 64
DEFAULT_BITS = 3072  # RSA key size
MIN_BITS = 2048
MAX_BITS = 16384  # OpenSSL's RSA-OAEP refuses larger moduli
MAX_WORKERS = 64


def default_workers(cpus: int | None = None) -> int:
    """The rule: inline on 1-2 cores (both ends of a loopback run share them, a pool only adds
    hand-offs), else one worker per core beyond two, at most 8 (perf/scaling.py measures this)."""
    n = cpus if cpus is not None else (os.cpu_count() or 1)
    return 0 if n <= 2 else min(n - 2, 8)
