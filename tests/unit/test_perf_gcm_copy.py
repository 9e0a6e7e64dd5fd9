"""perf/transfer.py's gcm copy (the raw copy plus AES-GCM and the CRC) really does that work.

It is the baseline m2y is held against, so it must move the bytes intact, seal and open every
block (a flipped ciphertext byte is refused) and return the file's CRC-64/XZ.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "perf"))
import transfer

from engine.crc import reference_crc64

B, T = 65536, 16


def _receiver(dst: Path, key: str, salt: str) -> tuple[subprocess.Popen[str], int]:
    recv = subprocess.Popen([sys.executable, "-c", transfer.GCM_RECEIVER_CODE, str(dst), "0", key, salt],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert recv.stdout is not None
    return recv, int(recv.stdout.readline())


@pytest.mark.parametrize("size", [0, 1, B, 17 * B + 5, 40 * B])  # empty, short, one block, batches and a tail
def test_gcm_copy_moves_the_bytes_and_their_crc(tmp_path: Path, size: int) -> None:
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(secrets.token_bytes(size))
    key, salt = secrets.token_hex(16), secrets.token_hex(4)
    recv, port = _receiver(dst, key, salt)
    send = subprocess.run([sys.executable, "-c", transfer.GCM_SENDER_CODE, str(src), str(port), key, salt],
                          capture_output=True, text=True, timeout=60)
    out, err = recv.communicate(timeout=60)
    assert send.returncode == 0 and recv.returncode == 0, (send.stderr, err)
    assert int(send.stdout.split()[0]) == size
    got, _t, crc = out.split()
    assert int(got) == size and dst.read_bytes() == src.read_bytes()
    assert int(crc) == reference_crc64(src.read_bytes())


def test_gcm_copy_receiver_refuses_a_changed_block(tmp_path: Path) -> None:
    key, salt = secrets.token_hex(16), secrets.token_hex(4)
    recv, port = _receiver(tmp_path / "dst.bin", key, salt)
    sealed = bytearray(AESGCM(bytes.fromhex(key)).encrypt(bytes.fromhex(salt) + bytes(8), bytes(B), None))
    sealed[100] ^= 1
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(sealed)
    _out, err = recv.communicate(timeout=60)
    assert recv.returncode != 0 and "InvalidTag" in err
