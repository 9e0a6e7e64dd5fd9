"""`m2y send` starts once per transfer: it must not load the server side (or the reverse).

Each check runs a fresh interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
{imports}
loaded = sorted(m for m in {unwanted!r} if m in sys.modules)
print(",".join(loaded))
"""


def _loaded(imports: str, unwanted: list[str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHECK.format(imports=imports, unwanted=unwanted)],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


@pytest.mark.parametrize(
    ("imports", "unwanted"),
    [
        # the send path: parser + client; no server, storage, psutil, or multiprocessing (workers=0)
        # and no pycryptodome (~0.15 s of import: RSA comes from cryptography), nor tqdm unless a bar is shown
        ("import cli.main; import engine.client",
         ["engine.server", "engine.storage", "psutil", "multiprocessing", "Crypto", "tqdm"]),
        # the serve path: parser + server; no client, no pycryptodome
        ("import cli.main; import engine.server", ["engine.client", "Crypto"]),
        # parsing arguments alone loads no engine part that does work
        ("import cli.main",
         ["engine.client", "engine.server", "engine.keys", "Crypto", "cryptography", "asyncio"]),
    ],
)
def test_commands_import_only_their_side(imports: str, unwanted: list[str]) -> None:
    assert _loaded(imports, unwanted) == []


def test_check_itself_can_fail() -> None:
    """The probe does see a module that is loaded (so an empty answer above means something)."""
    assert _loaded("import cli.main; import engine.server", ["engine.storage", "psutil"]) == [
        "engine.storage", "psutil"]
