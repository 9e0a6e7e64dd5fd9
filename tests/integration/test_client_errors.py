"""What ``m2y send`` says when something on its side is wrong: one line, a non-zero exit, a .failed."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from engine import meta

from .helpers import ServerProcess, make_file, run_send, target


def _one_line_failure(result: object, meta_path: Path, *words: str) -> str:
    from subprocess import CompletedProcess

    assert isinstance(result, CompletedProcess)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert meta_path.with_suffix(".failed").exists() and not meta_path.exists()
    return str(lines[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused(root: Path) -> None:
    _, meta_path = make_file(root, 10)
    result = run_send(root, _free_port(), meta_path)
    _one_line_failure(result, meta_path, "connection refused", "m2y serve")


def test_missing_private_key(root: Path, server: ServerProcess) -> None:
    _, meta_path = make_file(root, 10)
    (root / "zhenqiang" / "privateKey" / "zhenqiang.data").unlink()
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "private key", "not found", "m2y keygen")


def test_missing_recipient_public_key(root: Path, server: ServerProcess) -> None:
    _, meta_path = make_file(root, 10)
    (root / "zhenqiang" / "pubKey" / "roland-frei.data").unlink()
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "public key", "not found")


def test_wrong_recipient_public_key(root: Path, server: ServerProcess) -> None:
    _data, meta_path = make_file(root, 10)
    shutil.copy(root / "mallory" / "pubKey" / "mallory.data", root / "zhenqiang" / "pubKey" / "roland-frei.data")
    fields = meta.read_meta_file(meta_path)
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "server refused", "cannot decrypt")
    assert not target(root, fields).exists()


def test_missing_data_file(root: Path, server: ServerProcess) -> None:
    data, meta_path = make_file(root, 10)
    data.unlink()
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "data file", "not found")


def test_file_size_changed(root: Path, server: ServerProcess) -> None:
    data, meta_path = make_file(root, 1000)
    data.write_bytes(os.urandom(1001))
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "changed since its .meta was written", "size 1001")


def test_file_content_changed(root: Path, server: ServerProcess) -> None:
    data, meta_path = make_file(root, 200_000)
    fields = meta.read_meta_file(meta_path)
    data.write_bytes(os.urandom(200_000))
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "changed since its .meta was written", "CRC")
    assert not target(root, fields).exists()
    assert not target(root, fields, ".part").exists()


def test_malformed_meta(root: Path, server: ServerProcess) -> None:
    _, meta_path = make_file(root, 10)
    meta_path.write_text('{"from": "zhenqiang", "to": ')
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "malformed .meta", "JSON")


def test_meta_with_bad_crc(root: Path, server: ServerProcess) -> None:
    _, meta_path = make_file(root, 10)
    fields = meta.read_meta_file(meta_path)
    fields["filesize"] = 11  # edited by hand without a new metaCRC
    meta_path.write_bytes(meta.to_json(fields))
    result = run_send(root, server.port, meta_path)
    _one_line_failure(result, meta_path, "malformed .meta", "metaCRC")


def test_missing_meta_file(root: Path, server: ServerProcess) -> None:
    result = run_send(root, server.port, root / "nothing.meta")
    assert result.returncode != 0
    assert "no such .meta file" in result.stderr
