"""Key pairs on disk, user names and their wire hashes."""

from __future__ import annotations

import hashlib
import os
import stat
import string
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from Crypto.PublicKey import RSA
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import ConfigError
from engine.keys import keygen, load_private, load_public, share_public
from engine.users import check_user, private_key_path, public_key_path, user_hash

BITS = 2048


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """One keygen for the module, run with umask 0 so that any mode seen comes from keygen itself."""
    root = tmp_path_factory.mktemp("keys")
    old = os.umask(0)
    try:
        priv, pub = keygen(root, "alice", bits=BITS)
    finally:
        os.umask(old)
    yield root, priv, pub


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_paths_and_modes(generated: tuple[Path, Path, Path]) -> None:
    root, priv, pub = generated
    assert priv == root / "alice" / "privateKey" / "alice.data"
    assert pub == root / "alice" / "pubKey" / "alice.data"
    assert mode(priv) == 0o600
    assert mode(priv.parent) == 0o700
    assert mode(pub) == 0o644
    assert sorted(p.name for p in priv.parent.iterdir()) == ["alice.data"]  # no .tmp left behind
    assert sorted(p.name for p in pub.parent.iterdir()) == ["alice.data"]


def test_keygen_writes_a_matching_pair(generated: tuple[Path, Path, Path]) -> None:
    _, priv, pub = generated
    private = RSA.import_key(priv.read_bytes())
    public = RSA.import_key(pub.read_bytes())
    assert private.has_private() and not public.has_private()
    assert private.size_in_bits() == BITS
    assert public.n == private.n and public.e == private.e
    assert b"PRIVATE" not in pub.read_bytes()
    assert load_private(priv).private_numbers().public_numbers.n == private.n
    assert load_public(pub).public_numbers().n == private.n
    assert load_public(pub).public_numbers().e == private.e


def test_load_public_refuses_a_private_key_file(generated: tuple[Path, Path, Path]) -> None:
    """A private key copied into a pubKey/ folder is a leak to point out, not a key to use."""
    _, priv, _ = generated
    with pytest.raises(ConfigError, match="holds a private key"):
        load_public(priv)


def test_keygen_refuses_to_overwrite(generated: tuple[Path, Path, Path]) -> None:
    root, priv, pub = generated
    before = priv.read_bytes(), pub.read_bytes()
    with pytest.raises(ConfigError) as exc:
        keygen(root, "alice", bits=BITS)
    assert "--force" in exc.value.reason
    assert (priv.read_bytes(), pub.read_bytes()) == before


def test_keygen_force_replaces(tmp_path: Path) -> None:
    priv, pub = keygen(tmp_path, "bob", bits=BITS)
    old_n = RSA.import_key(priv.read_bytes()).n
    priv2, pub2 = keygen(tmp_path, "bob", bits=BITS, force=True)
    assert (priv2, pub2) == (priv, pub)
    new = RSA.import_key(priv.read_bytes())
    assert new.n != old_n
    assert RSA.import_key(pub.read_bytes()).n == new.n
    assert mode(priv) == 0o600
    assert sorted(p.name for p in priv.parent.iterdir()) == ["bob.data"]


def test_keygen_rejects_small_keys_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="2048"):
        keygen(tmp_path, "alice", bits=1024)
    with pytest.raises(ConfigError):
        keygen(tmp_path, ".alice", bits=BITS)
    with pytest.raises(ConfigError):
        keygen(tmp_path, "../alice", bits=BITS)
    assert list(tmp_path.iterdir()) == []


def test_share_public(generated: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, _, pub = generated
    dst = share_public(root, "alice", "carol")
    assert dst == root / "carol" / "pubKey" / "alice.data"
    assert dst.read_bytes() == pub.read_bytes()


def test_load_private_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_private(tmp_path / "nobody.data")
    assert "m2y keygen" in exc.value.reason


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"]
)
def test_load_private_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.data"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        load_private(path)


def test_load_private_of_a_public_key(generated: tuple[Path, Path, Path]) -> None:
    _, _, pub = generated
    with pytest.raises(ConfigError, match="public key"):
        load_private(pub)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x00\xff" * 100, b"-----BEGIN PUBLIC KEY-----\n!!\n"])
def test_load_public_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.data"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        load_public(path)
    assert str(path) in exc.value.reason


def test_load_public_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_public(tmp_path / "nobody.data")


def test_load_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_private(tmp_path)
    with pytest.raises(ConfigError):
        load_public(tmp_path)


# -- user names -----------------------------------------------------------------------------

ALLOWED = set(string.ascii_letters + string.digits + "._-")


def rule(name: str) -> bool:
    """The documented rule, written without a regular expression."""
    return 1 <= len(name) <= 64 and all(c in ALLOWED for c in name) and not name.startswith(".")


@pytest.mark.parametrize(
    "name", ["a", "Z", "0", "_", "-", "-x", "a.b", "a..", "zhenqiang", "roland-frei", "A_b-C.9", "x" * 64]
)
def test_check_user_accepts(name: str) -> None:
    assert rule(name)
    assert check_user(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".a", "x" * 65, "a b", "a/b", "a\\b", "é", "a\n", "a\x00", "\na", "a:b", "a@b", "ä", "١"],
)
def test_check_user_rejects(name: str) -> None:
    assert not rule(name)
    with pytest.raises(ConfigError):
        check_user(name)


@pytest.mark.parametrize("name", [None, 5, b"alice", ["alice"]])
def test_check_user_rejects_non_strings(name: object) -> None:
    with pytest.raises(ConfigError):
        check_user(name)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from([*sorted(ALLOWED), " ", "/", "\n", "é", "\x00", "١"]), max_size=70))
def test_check_user_matches_rule(name: str) -> None:
    if rule(name):
        assert check_user(name) == name
    else:
        with pytest.raises(ConfigError):
            check_user(name)


def test_key_paths_check_names(tmp_path: Path) -> None:
    assert private_key_path(tmp_path, "bob") == tmp_path / "bob" / "privateKey" / "bob.data"
    assert public_key_path(tmp_path, "bob", "alice") == tmp_path / "bob" / "pubKey" / "alice.data"
    for bad in ("../x", ".x", "a/b"):
        with pytest.raises(ConfigError):
            private_key_path(tmp_path, bad)
        with pytest.raises(ConfigError):
            public_key_path(tmp_path, "bob", bad)


# -- user hashes ----------------------------------------------------------------------------


def test_user_hash_known_value() -> None:
    # sha256(b"alice") = 2bd806c97f0e00af 1a1fc332...
    assert user_hash("alice") == 0x2BD806C97F0E00AF


@pytest.mark.parametrize("name", ["alice", "zhenqiang", "roland-frei", "x" * 64, "日本"])
def test_user_hash_is_first_8_bytes_of_sha256_big_endian(name: str) -> None:
    (expected,) = struct.unpack(">Q", hashlib.sha256(name.encode("utf-8")).digest()[:8])
    assert user_hash(name) == expected
    assert 0 <= user_hash(name) < 2**64


def test_user_hashes_differ() -> None:
    assert user_hash("alice") != user_hash("Alice")


def test_load_private_refuses_a_key_others_can_read(generated: tuple[Path, Path, Path]) -> None:
    _, priv, _ = generated
    priv.chmod(0o640)
    try:
        with pytest.raises(ConfigError, match=r"readable by others.*chmod 600"):
            load_private(priv)
    finally:
        priv.chmod(0o600)
    assert load_private(priv).private_numbers().d > 0


def test_fast_private_import_equals_pycryptodome(generated: tuple[Path, Path, Path]) -> None:
    _, priv, _ = generated
    mine = load_private(priv).private_numbers()
    theirs = RSA.import_key(priv.read_bytes())  # pycryptodome reads the same file: the format is PKCS#1 PEM
    assert (mine.public_numbers.n, mine.public_numbers.e, mine.d, {mine.p, mine.q}) == (
        theirs.n, theirs.e, theirs.d, {theirs.p, theirs.q})


def _crafted_key(path: Path, numbers: list[int]) -> Path:
    """A 0600 PKCS#1 PEM private key file of exactly these nine numbers, made with pycryptodome's
    DER and PEM encoders (cryptography refuses to write inconsistent keys)."""
    from Crypto.IO import PEM
    from Crypto.Util.asn1 import DerSequence

    path.write_text(PEM.encode(DerSequence(numbers).encode(), "RSA PRIVATE KEY"))
    path.chmod(0o600)
    return path


def test_fast_private_import_refuses_inconsistent_key(generated: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, priv, _ = generated
    k = RSA.import_key(priv.read_bytes())
    bad = _crafted_key(tmp_path / "bad.data", [0, k.n, k.e, k.d, k.p, k.q + 2, 1, 1, 1])  # q does not divide n
    with pytest.raises(ConfigError, match="not a PEM RSA key"):
        load_private(bad)


def test_fast_private_import_refuses_degenerate_factors(generated: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, priv, _ = generated
    k = RSA.import_key(priv.read_bytes())
    bad = _crafted_key(tmp_path / "degenerate.data", [0, k.n, k.e, k.d, 1, k.n, 1, 1, 1])
    with pytest.raises(ConfigError, match="not a PEM RSA key"):
        load_private(bad)


def test_keys_written_by_pycryptodome_still_load(tmp_path: Path) -> None:
    """Key files made by earlier builds (pycryptodome's PEM) keep working, both halves."""
    from cryptography.hazmat.primitives.asymmetric import padding

    old = RSA.generate(2048)
    priv, pub = tmp_path / "old-priv.data", tmp_path / "old-pub.data"
    priv.write_bytes(old.export_key("PEM"))
    priv.chmod(0o600)
    pub.write_bytes(old.public_key().export_key("PEM"))
    assert load_private(priv).private_numbers().d == old.d
    assert load_public(pub).public_numbers().n == old.n
    assert load_private(priv).decrypt(
        load_public(pub).encrypt(b"k" * 16, padding.PKCS1v15()), padding.PKCS1v15()) == b"k" * 16


def test_passphrase_protected_key_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "locked.data"
    path.write_bytes(RSA.generate(2048).export_key("PEM", passphrase="secret", pkcs=8,
                                                   protection="scryptAndAES128-CBC"))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="protected by a passphrase"):
        load_private(path)


def test_private_key_with_a_wrong_exponent_is_refused(generated: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """n = p*q holds but d is not e's inverse: caught by the cheap check that replaces OpenSSL's."""
    _, priv, _ = generated
    k = RSA.import_key(priv.read_bytes())
    bad = _crafted_key(tmp_path / "bad-d.data",
                       [0, k.n, k.e, k.d + 2, k.p, k.q, k.d % (k.p - 1), k.d % (k.q - 1), pow(k.q, -1, k.p)])
    with pytest.raises(ConfigError, match="not a PEM RSA key"):
        load_private(bad)


def test_keygen_refuses_keys_oaep_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="2048 to 16384"):
        keygen(tmp_path, "alice", bits=20000)


@pytest.mark.parametrize("bits", [1024, 1536])
def test_loaders_refuse_keys_below_2048_bits(tmp_path: Path, bits: int) -> None:
    """A weak key a peer put in pubKey/, or an old own key, is named, not silently used."""
    small = RSA.generate(bits)
    priv, pub = tmp_path / "small-priv.data", tmp_path / "small-pub.data"
    priv.write_bytes(small.export_key("PEM"))
    priv.chmod(0o600)
    pub.write_bytes(small.public_key().export_key("PEM"))
    with pytest.raises(ConfigError, match=f"an RSA key of {bits} bits; m2y uses 2048 to 16384"):
        load_private(priv)
    with pytest.raises(ConfigError, match=f"an RSA key of {bits} bits; m2y uses 2048 to 16384"):
        load_public(pub)


def test_load_public_refuses_an_even_modulus(generated: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, pub = generated
    k = RSA.import_key(pub.read_bytes())
    even = RSA.construct((k.n + 1, k.e), consistency_check=False)
    bad = tmp_path / "even.data"
    bad.write_bytes(even.export_key("PEM"))
    with pytest.raises(ConfigError, match="m2y uses 2048 to 16384"):
        load_public(bad)
