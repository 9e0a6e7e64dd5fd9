"""``m2y keygen | meta | serve | send`` (and the seed's ``m2y-server`` / ``m2y-client``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.defaults import (
    DEFAULT_BATCH,
    DEFAULT_BITS,
    DEFAULT_CHECKPOINT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_KEEP_PARTIAL,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_ENVELOPE,
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_PORT,
    DEFAULT_RETRIES,
    DEFAULT_RETRY_WAIT,
    DEFAULT_STOP_WAIT,
    DEFAULT_TIMEOUT,
    MAX_BATCH,
    MAX_BITS,
    MAX_RETRIES,
    MAX_RETRY_WAIT,
    MAX_WORKERS,
    MIN_BITS,
    default_workers,
)
from engine.errors import ConfigError, M2YError, one_line
from engine.users import check_user, default_root, public_key_path

if TYPE_CHECKING:
    from engine.client import Result
    from engine.server import Server

SECONDS = " seconds"
DAY = 86400
MAX_MAX_ENVELOPE = 16 * 2**20  # bytes: the envelope is read whole, once per connection
MIN_MAX_ENVELOPE = 4096  # bytes: an envelope under a 16384-bit key is ~2.5 KiB; less refuses every send
MAX_MAX_CLIENTS = 10_000

# Each command imports the engine parts it runs, inside its function: `m2y send` never loads
# the server and its storage, `m2y serve` never loads the client (start-up time per transfer).


def _root(args: argparse.Namespace) -> Path:
    return Path(args.root) if args.root else default_root()


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", help="folder holding one home per user (default: $M2Y_ROOT, else /m2y)")


def _add_serve(p: argparse.ArgumentParser) -> None:
    _add_root(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    p.add_argument("--max-file-size", type=parse_size, default=DEFAULT_MAX_FILE_SIZE,
                   help="largest file accepted: bytes, or with a unit (20GB, 64GiB; default 64GiB)")
    p.add_argument("--max-meta", type=parse_size, default=DEFAULT_MAX_ENVELOPE,
                   help="largest metadata envelope: bytes, or with a unit (default 64KiB)")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
                   help=f"seconds a client may stay silent mid-transfer (default {DEFAULT_IDLE_TIMEOUT:g})")
    p.add_argument("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT,
                   help=f"seconds a client has to send its header and metadata, however it trickles them "
                        f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g})")
    p.add_argument("--keep-partial", type=float, default=DEFAULT_KEEP_PARTIAL,
                   help=f"seconds the received part of an interrupted send waits for a resend (0: never kept; "
                        f"default {DEFAULT_KEEP_PARTIAL:g})")
    p.add_argument("--checkpoint", type=float, default=DEFAULT_CHECKPOINT,
                   help=f"seconds between records of what a transfer under way has written, so that a crash "
                        f"of the server keeps it for a resend (0: never; default {DEFAULT_CHECKPOINT:g})")
    p.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS,
                   help=f"transfers at once; more are refused as busy (default {DEFAULT_MAX_CLIENTS})")
    p.add_argument("--stop-wait", type=float, default=DEFAULT_STOP_WAIT,
                   help=f"seconds a stopping server waits for its disk (writes, fsyncs, records) before it "
                        f"exits without them (status 1), for a hung disk (default {DEFAULT_STOP_WAIT:g})")
    _add_workers(p)
    _add_batch(p)


def _add_send(p: argparse.ArgumentParser) -> None:
    p.add_argument("metas", nargs="+", metavar="META", type=Path, help=".meta files to send")
    _add_root(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"server address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port (default {DEFAULT_PORT})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for the server to answer or take data (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar per file on stderr (default: when stderr is a terminal)")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help=f"more tries of a file whose connection broke before the ACK (each goes on where the "
                        f"server stopped) or whose server was busy (0-{MAX_RETRIES}, default {DEFAULT_RETRIES})")
    p.add_argument("--retry-wait", type=float, default=DEFAULT_RETRY_WAIT,
                   help=f"seconds before the first retry, doubling for each next one up to {MAX_RETRY_WAIT:g} "
                        f"(default {DEFAULT_RETRY_WAIT:g})")
    _add_workers(p)
    _add_batch(p)


def _add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help=f"block-crypto worker processes; 0 = inline (default here: {default_workers()}, "
                        "from the core count: 0 on <= 2 cores, else cores - 2, at most 8)")


def _add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"64 KiB blocks per batch (1-{MAX_BATCH}; tuning, default {DEFAULT_BATCH})")


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3,
               "t": 1024**4, "tib": 1024**4, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


def parse_size(text: str) -> int:
    """A byte count, or one with a unit: 5000, 64KiB, 20GB (KB, MB, GB, TB decimal; K, M, G, T and
    KiB, MiB, GiB, TiB binary); perf/ parses its sizes with it too."""
    m = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,12})?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a byte count, or with a unit: 64KiB, 20GB)")
    size = Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]  # exact: no float rounding
    if size.denominator != 1:
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}")
    return int(size)


def _ranged(args: argparse.Namespace, option: str, lo: float, hi: float, unit: str = "") -> Any:
    """``--option``'s value, or a one-line ConfigError if it is outside lo..hi (nan is: every
    comparison with it is false), before anything starts."""
    value = getattr(args, option.replace("-", "_"))
    if not lo <= value <= hi:
        def show(x: float) -> str:
            return str(x) if isinstance(x, int) else f"{x:g}"

        raise ConfigError(f"--{option} {show(value)} is out of range {show(lo)}..{show(hi)}{unit}")
    return value


def _batch(args: argparse.Namespace) -> int:
    return int(_ranged(args, "batch", 1, MAX_BATCH))


def _retries(args: argparse.Namespace) -> tuple[int, float]:
    return int(_ranged(args, "retries", 0, MAX_RETRIES)), float(_ranged(args, "retry-wait", 0, MAX_RETRY_WAIT, SECONDS))


def _workers(args: argparse.Namespace) -> int:
    if args.workers is None:
        args.workers = default_workers()
    return int(_ranged(args, "workers", 0, MAX_WORKERS))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2y", description="Secure, fast file transfer.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create a user's RSA key pair",
                       description="Writes ROOT/USER/privateKey/USER.data (0600) and ROOT/USER/pubKey/USER.data. "
                                   "To exchange keys, copy each user's pubKey/USER.data into the peer's pubKey/.")
    p.add_argument("user", metavar="USER", help="user name: 1-64 of A-Z a-z 0-9 . _ -, not starting with '.'")
    _add_root(p)
    p.add_argument("--bits", type=int, default=DEFAULT_BITS,
                   help=f"RSA key size, {MIN_BITS} to {MAX_BITS} (default {DEFAULT_BITS})")
    p.add_argument("--force", action="store_true", help="replace an existing private key")

    p = sub.add_parser("meta", help="write each FILE's .meta beside it")
    p.add_argument("files", nargs="+", metavar="FILE", type=Path, help="files to describe (one .meta each)")
    p.add_argument("--from", dest="sender", required=True, help="the sending user (whose keys are under --root)")
    p.add_argument("--to", dest="recipient", required=True,
                   help="the receiving user (the sender's pubKey/ must hold their key to send)")
    p.add_argument("--folder", required=True, help="relative folder on the recipient's side")
    _add_root(p)

    _add_serve(sub.add_parser("serve", help="receive files for every user under --root"))
    _add_send(sub.add_parser("send", help="send .meta files (and the files they name)"))
    return parser


def cmd_keygen(args: argparse.Namespace) -> int:
    from engine.keys import keygen

    priv, pub = keygen(_root(args), args.user, args.bits, args.force)
    print(f"wrote {priv} (0600) and {pub}")
    return 0


def cmd_meta(args: argparse.Namespace) -> int:
    """One .meta per FILE, each with its own datetime; a file that fails gets its own line and the
    others are still written (exit 2 if any failed)."""
    from engine import meta

    home = _root(args) / check_user(args.sender)
    # What every file needs is checked once, before any file is read: the sender's home (it keeps the
    # datetimes), the recipient and the folder.
    meta.check_home(home)
    meta.make(args.sender, args.recipient, args.folder, "-", 0, 0)
    key = public_key_path(_root(args), args.sender, args.recipient)
    if not key.is_file():  # the .meta is still written: the key may come before the send
        print(one_line(f"m2y meta: note: {key} is not there yet; 'm2y send' needs it (copy {args.recipient}'s "
                       f"pubKey/{args.recipient}.data there)"), file=sys.stderr)
    files = list({os.path.abspath(p): p for p in args.files}.values())  # each file once
    failed = False
    for path in files:
        try:
            out, written = _write_meta(args, home, path)
            print(f"wrote {out}" if written else one_line(
                f"kept {out}: it is the .meta of this file as it is now, to the same recipient and folder, not "
                "sent yet (a send of it that was cut off goes on where it stopped); remove it to make a new one"))
        except ConfigError as exc:
            if len(files) == 1:
                raise
            print(one_line(f"m2y meta: {exc.reason}"), file=sys.stderr)
            failed = True
    return 2 if failed else 0


def _write_meta(args: argparse.Namespace, home: Path, path: Path) -> tuple[Path, bool]:
    from engine import meta
    from engine.crc import crc64

    try:
        path.name.encode("utf-8")  # checked again by meta.make; here before a long read
    except UnicodeEncodeError:
        raise ConfigError(f"file name {path.name!r} is not valid UTF-8; rename the file") from None
    crc, size = 0, 0
    try:
        with open(path, "rb", buffering=0) as f:
            buf = memoryview(bytearray(1 << 20))
            while n := f.readinto(buf):
                crc = crc64(buf[:n], crc)
                size += n
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    when = meta.issue_datetime(home)  # after the read: a file that cannot be read takes no datetime
    fields = meta.make(args.sender, args.recipient, args.folder, path.name, size, crc, when)
    out = meta.meta_path_for(path)
    written = meta.write_meta_file(out, fields)
    failed = out.with_suffix(".failed")
    try:
        earlier = meta.read_meta_file(failed) if failed.is_file() else None
        unfinished = earlier is not None and all(earlier[k] == fields[k] for k in ("filename", "filesize", "fileCRC",
                                                                                "from", "to", "folder"))
    except ConfigError:
        unfinished = False
    if unfinished:  # sending both would store the file twice, under two datetimes
        print(one_line(f"m2y meta: note: {failed} is an earlier send of {path.name} that did not finish; send it "
                       f"(it goes on where it stopped) and remove {out.name}, or send {out.name} and remove it"),
              file=sys.stderr)
    return out, written


def cmd_serve(args: argparse.Namespace) -> int:
    from engine.server import ServerConfig, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    root = _root(args)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"root {root} is a file, not a folder; give --root the folder that holds the users' homes")
    if not root.is_dir():
        raise ConfigError(f"root {root} does not exist; create users with 'm2y keygen USER --root {root}'")
    config = ServerConfig(
        root=root, host=args.host, port=int(_ranged(args, "port", 0, 65535)),
        max_envelope=int(_ranged(args, "max-meta", MIN_MAX_ENVELOPE, MAX_MAX_ENVELOPE)),
        max_file_size=int(_ranged(args, "max-file-size", 0, 2**64 - 1)),  # filesize is a u64 on the wire
        idle_timeout=float(_ranged(args, "idle-timeout", 0.1, DAY, SECONDS)),
        handshake_timeout=float(_ranged(args, "handshake-timeout", 0.1, DAY, SECONDS)),
        keep_partial=float(_ranged(args, "keep-partial", 0, 30 * DAY, SECONDS)),
        checkpoint=float(_ranged(args, "checkpoint", 0, DAY, SECONDS)),
        stop_wait=float(_ranged(args, "stop-wait", 1, 3600, SECONDS)),  # 0 would not leave time for the records
        max_clients=int(_ranged(args, "max-clients", 1, MAX_MAX_CLIENTS)),
        workers=_workers(args), batch=_batch(args),
    )

    def listening(server: Server) -> None:
        names = ", ".join(sorted(n for n, _ in server.keys.users.values())) or "none yet"
        line = f"listening on {config.host}:{server.port} (users: {names}; workers: {config.workers})"
        print(f"m2y serve: {line}", flush=True)
        logging.getLogger("m2y.server").info("%s", line)  # the log (stderr) too: where it starts, and its port

    try:
        serve(config, listening)
    except OSError as exc:  # not the port (that is a ConfigError already): say what it was
        raise ConfigError(f"server stopped by an I/O error: {exc.strerror or exc}") from None
    print("m2y serve: stopped", flush=True)
    logging.getLogger("m2y.server").info("stopped")
    return 0


class _Bars:
    """One tqdm bar per file as its blocks go out (bytes handed to the socket), closed when all are
    sent or when the next file starts; ``close`` ends the last one."""

    def __init__(self) -> None:
        from tqdm import tqdm  # only when shown: its import costs ~0.09 s of start-up

        self._tqdm = tqdm
        self._bar: Any = None

    def __call__(self, meta_path: Path, total: int, start: int) -> Callable[[int, int], None]:
        self.close()
        try:  # a resumed send's bar starts at the kept bytes, which its rate leaves out
            bar = self._tqdm(desc=one_line(meta_path.name), total=total, initial=start, unit="B", unit_scale=True,
                             unit_divisor=1000, mininterval=0.25, leave=True, file=sys.stderr, dynamic_ncols=True)
        except OSError:  # stderr gone (a closed pipe): the transfer goes on without a bar
            return lambda done, total: None
        self._bar = bar

        def update(done: int, total: int) -> None:
            if self._bar is not bar:
                return
            try:
                bar.update(done - bar.n)
                if done >= total:
                    self.close()
            except OSError:  # the same: a bar must never fail a transfer
                self._bar = None

        return update

    def close(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            with contextlib.suppress(OSError):
                bar.close()


def cmd_send(args: argparse.Namespace) -> int:
    from engine.client import send_files

    show = (sys.stderr is not None and sys.stderr.isatty()) if args.progress is None else args.progress
    retries, first_wait = _retries(args)
    bars = _Bars() if show else None

    def retrying(meta_path: Path, why: str, wait: float, number: int) -> None:
        if bars is not None:
            bars.close()
        what = (f"retry {number} of {retries} in {wait:g} s" if number else
                f"the server may still hold the broken connection (until its idle timeout); again in {wait:g} s")
        with contextlib.suppress(OSError):  # like the bars: a closed stderr never fails a transfer
            print(one_line(f"{meta_path}: {why}; {what}"), file=sys.stderr, flush=True)

    def settled(r: Result) -> None:
        """Each file's line as soon as it is settled: a run cut short (Ctrl-C) has said what it finished."""
        if bars is not None:
            bars.close()  # the line goes below the finished bar, not into it
        with contextlib.suppress(OSError):  # a closed stdout (| head) must not stop the other files
            _say(r)

    def _say(r: Result) -> None:
        where = (f" -> {r.renamed_to.name}" if r.renamed_to else "") + r.note
        if r.ok and r.earlier:
            print(one_line(f"{r.meta_path}: {r.message}"), flush=True)
        elif r.ok and r.already and r.retries:
            print(one_line(f"{r.meta_path}: ACK, the server holds these {r.nbytes} bytes: they arrived before "
                           f"the connection broke, and only the ACK was lost; nothing sent again{where}"), flush=True)
        elif r.ok and r.already:
            print(one_line(f"{r.meta_path}: ACK, the server already holds these {r.nbytes} bytes from an "
                           f"earlier send (whose ACK did not arrive); nothing sent again{where}"), flush=True)
        elif r.ok and r.resumed_at:
            sent = r.nbytes - r.resumed_at
            rate = sent / max(r.seconds, 1e-9) / 1e6
            print(one_line(f"{r.meta_path}: ACK, {r.nbytes} bytes, resumed at {r.resumed_at}: {sent} sent "
                           f"in {r.seconds:.2f} s ({rate:.1f} MB/s){where}"), flush=True)
        elif r.ok:
            rate = r.nbytes / max(r.seconds, 1e-9) / 1e6
            print(one_line(f"{r.meta_path}: ACK, {r.nbytes} bytes in {r.seconds:.2f} s ({rate:.1f} MB/s){where}"),
                  flush=True)
        else:
            tries = f" after {r.retries} {'retry' if r.retries == 1 else 'retries'}" if r.retries else ""
            later = (f"; send {r.renamed_to.name} again later (it goes on from what the server kept, if anything)"
                     if r.resumable and r.renamed_to else "")
            print(one_line(f"{r.meta_path}: FAILED{tries}: {r.message}{where}{later}"), file=sys.stderr,
                  flush=True)

    try:
        port, timeout = int(_ranged(args, "port", 1, 65535)), float(_ranged(args, "timeout", 0.1, DAY, SECONDS))
        results = send_files(args.metas, _root(args), args.host, port, timeout, _workers(args),
                             _batch(args), progress=bars, retries=retries, first_wait=first_wait,
                             on_retry=retrying, on_result=settled)
    finally:
        if bars is not None:
            bars.close()
    failed = sum(not r.ok for r in results)
    if failed and len(results) > 1:  # many files: the count, so that a failure among hundreds of lines is seen
        with contextlib.suppress(OSError):
            print(f"m2y send: {failed} of {len(results)} files failed (each one's line says why); "
                  f"{len(results) - failed} sent", file=sys.stderr)
    return 0 if results and not failed else 1


COMMANDS = {"keygen": cmd_keygen, "meta": cmd_meta, "serve": cmd_serve, "send": cmd_send}


def _std_fds() -> None:
    """Put /dev/null where stdin, stdout or stderr is closed (a cron job, a supervisor, ``>&-``):
    else the next socket or file opened takes that number, and uvloop aborts the process (a libuv
    assertion, exit 134) when it closes it, after every file was sent."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _run(args: argparse.Namespace) -> int:
    _std_fds()
    try:
        return COMMANDS[args.command](args)
    except M2YError as exc:
        print(one_line(f"m2y {args.command}: {exc.reason}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        after = ("; a file not ACKed keeps its .meta (or .failed): send it again to go on where it stopped"
                 if args.command == "send" else "")
        with contextlib.suppress(OSError):  # a closed stderr: the exit status says it all the same
            print(f"m2y {args.command}: interrupted{after}", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


def server_main() -> int:
    """``m2y-server`` = ``m2y serve``."""
    p = argparse.ArgumentParser(prog="m2y-server", description="= m2y serve")
    _add_serve(p)
    args = p.parse_args()
    args.command = "serve"
    return _run(args)


def client_main() -> int:
    """``m2y-client`` = ``m2y send``."""
    p = argparse.ArgumentParser(prog="m2y-client", description="= m2y send")
    _add_send(p)
    args = p.parse_args()
    args.command = "send"
    return _run(args)
