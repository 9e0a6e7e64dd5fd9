"""Metadata JSON: canonical form, metaCRC, parse() checks, path safety, the server's reply."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from engine import meta
from engine.crc import reference_crc64
from engine.errors import ConfigError, RefuseCode, RemoteProtocolError

WHEN = dt.datetime(2024, 3, 9, 14, 5, 7)
WHEN_STRING = "09-03-2024_14-05-07"


def base_fields() -> dict[str, Any]:
    """Valid metadata without metaCRC."""
    return {
        "from": "zhenqiang",
        "to": "roland-frei",
        "folder": "photo",
        "datetime": WHEN_STRING,
        "filename": "myfoto.jpg",
        "filesize": 65537,
        "fileCRC": 0x995DC9BBDF1939FA,
    }


def oracle_canonical(fields: dict[str, Any]) -> bytes:
    body = {k: v for k, v in fields.items() if k != "metaCRC"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode(fields: dict[str, Any], crc: int | None = None) -> bytes:
    """JSON of ``fields`` with a metaCRC computed here (crcmod), unless ``crc`` is given; ordinary json.dumps."""
    out = {k: v for k, v in fields.items() if k != "metaCRC"}
    out["metaCRC"] = reference_crc64(oracle_canonical(out)) if crc is None else crc
    return json.dumps(out).encode()


def refused(data: bytes, code: RefuseCode, extra: tuple[str, ...] = ()) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as exc:
        meta.parse(data, extra)
    assert exc.value.code is code, exc.value.reason
    return exc.value


# -- canonical JSON and metaCRC -------------------------------------------------------------


def test_canonical_known_bytes() -> None:
    fields = base_fields() | {"folder": "фото/été", "filename": "日本.jpg", "metaCRC": 12345}
    expected = (
        '{"datetime":"09-03-2024_14-05-07","fileCRC":11051210869376104954,"filename":"日本.jpg",'
        '"filesize":65537,"folder":"фото/été","from":"zhenqiang","to":"roland-frei"}'
    ).encode()
    assert meta.canonical(fields) == expected
    assert meta.meta_crc(fields) == reference_crc64(expected)


def test_canonical_ignores_key_order_and_metacrc() -> None:
    fields = base_fields()
    reversed_fields = dict(reversed(list(fields.items())))
    assert meta.canonical(reversed_fields) == meta.canonical(fields)
    assert meta.canonical(fields | {"metaCRC": 1}) == meta.canonical(fields | {"metaCRC": 2})


def test_canonical_escapes_only_what_json_must() -> None:
    fields = {"a": 'quote" backslash\\ newline\n é'}
    assert meta.canonical(fields) == '{"a":"quote\\" backslash\\\\ newline\\n é"}'.encode()


def test_make_known_values() -> None:
    fields = meta.make("zhenqiang", "roland-frei", "photo", "myfoto.jpg", 65537, 0x995DC9BBDF1939FA, when=WHEN)
    assert fields["datetime"] == WHEN_STRING
    assert {k: v for k, v in fields.items() if k != "metaCRC"} == base_fields()
    assert fields["metaCRC"] == reference_crc64(oracle_canonical(base_fields()))


def test_to_json_is_sorted_and_compact_with_metacrc() -> None:
    fields = meta.with_crc(base_fields() | {"folder": "фото"})
    data = meta.to_json(fields)
    crc = reference_crc64(oracle_canonical(fields))
    body = oracle_canonical(fields).decode()
    expected_obj = json.loads(body) | {"metaCRC": crc}
    assert data == json.dumps(expected_obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert "фото".encode() in data
    assert b" " not in data


def test_datetime_format() -> None:
    assert meta.now_string(WHEN) == WHEN_STRING
    assert meta.now_string(dt.datetime(1999, 12, 31, 23, 59, 58)) == "31-12-1999_23-59-58"


# -- parse: accepts -------------------------------------------------------------------------


def test_parse_accepts_make_output() -> None:
    fields = meta.make("zhenqiang", "roland-frei", "a/b/c", "x.bin", 0, 0, when=WHEN)
    parsed = meta.parse(meta.to_json(fields))
    assert parsed == fields


def test_parse_accepts_independently_encoded() -> None:
    fields = base_fields() | {"folder": "фото", "filename": "日本 語.jpg"}
    parsed = meta.parse(encode(fields))
    assert parsed["metaCRC"] == reference_crc64(oracle_canonical(fields))
    assert {k: v for k, v in parsed.items() if k != "metaCRC"} == fields


@pytest.mark.parametrize("value", [0, 2**64 - 1])
def test_parse_integer_bounds(value: int) -> None:
    parsed = meta.parse(encode(base_fields() | {"filesize": value, "fileCRC": value}))
    assert parsed["filesize"] == parsed["fileCRC"] == value


def test_parse_with_extra_fields() -> None:
    fields = base_fields() | {"filekey": "00" * 16, "salt": "00" * 4}
    assert meta.parse(encode(fields), extra=("filekey", "salt"))["salt"] == "00000000"
    refused(encode(fields), RefuseCode.BAD_METADATA)


# -- parse: rejects -------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"not json", b"\xff\xfe{}", b"[1, 2]", b'"str"', b"null", b"{"])
def test_parse_rejects_non_object(data: bytes) -> None:
    refused(data, RefuseCode.BAD_METADATA)


@pytest.mark.parametrize("missing", ["from", "to", "folder", "datetime", "filename", "filesize", "fileCRC"])
def test_parse_rejects_missing_field(missing: str) -> None:
    fields = base_fields()
    del fields[missing]
    error = refused(encode(fields), RefuseCode.BAD_METADATA)
    assert missing in error.reason


def test_parse_rejects_missing_metacrc() -> None:
    refused(json.dumps(base_fields()).encode(), RefuseCode.BAD_METADATA)


@pytest.mark.parametrize("unknown", ["extra", "From", "filekey", ""])
def test_parse_rejects_unknown_field(unknown: str) -> None:
    error = refused(encode(base_fields() | {unknown: "x"}), RefuseCode.BAD_METADATA)
    assert repr(unknown) in error.reason


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("from", 5),
        ("to", None),
        ("folder", ["photo"]),
        ("datetime", 20240309),
        ("filename", {"a": 1}),
        ("filesize", "65537"),
        ("filesize", 65537.0),
        ("filesize", -1),
        ("filesize", 2**64),
        ("fileCRC", None),
        ("fileCRC", "0x1"),
        ("fileCRC", -5),
    ],
)
def test_parse_rejects_wrong_type(name: str, value: Any) -> None:
    error = refused(encode(base_fields() | {name: value}), RefuseCode.BAD_METADATA)
    assert repr(name) in error.reason


@pytest.mark.parametrize("name", ["filesize", "fileCRC"])
@pytest.mark.parametrize("value", [True, False])
def test_parse_rejects_bool_for_int(name: str, value: bool) -> None:
    refused(encode(base_fields() | {name: value}), RefuseCode.BAD_METADATA)


@pytest.mark.parametrize("crc", [True, "123", 1.5, -1, 2**64])
def test_parse_rejects_bad_metacrc_type(crc: Any) -> None:
    refused(encode(base_fields(), crc=crc), RefuseCode.BAD_METADATA)


def test_parse_rejects_metacrc_mismatch() -> None:
    good = reference_crc64(oracle_canonical(base_fields()))
    refused(encode(base_fields(), crc=good ^ 1), RefuseCode.META_CRC)
    refused(encode(base_fields(), crc=0), RefuseCode.META_CRC)


def test_parse_rejects_field_changed_after_crc() -> None:
    fields = meta.make("zhenqiang", "roland-frei", "photo", "x.bin", 100, 7, when=WHEN)
    for name, value in [("filesize", 101), ("fileCRC", 8), ("folder", "photos"), ("from", "mallory")]:
        changed = dict(fields) | {name: value}
        refused(json.dumps(changed).encode(), RefuseCode.META_CRC)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "2024-03-09 14:05:07",
        "9-3-2024_14-05-07",
        "09-03-24_14-05-07",
        "09-03-2024_14-05-07\n",
        "09-03-2024_14-05-07x",
        " 09-03-2024_14-05-07",
        "09/03/2024_14-05-07",
        "09-03-2024T14-05-07",
        "aa-bb-cccc_dd-ee-ff",
    ],
)
def test_parse_rejects_bad_datetime(value: str) -> None:
    refused(encode(base_fields() | {"datetime": value}), RefuseCode.BAD_METADATA)


@pytest.mark.parametrize("value", ["٠٩-٠٣-٢٠٢٤_١٤-٠٥-٠٧", "０９-０３-２０２４_１４-０５-０７"])
def test_parse_rejects_non_ascii_digits_in_datetime(value: str) -> None:
    refused(encode(base_fields() | {"datetime": value}), RefuseCode.BAD_METADATA)


@pytest.mark.parametrize("name", ["from", "to"])
@pytest.mark.parametrize("user", ["", ".hidden", "a/b", "a b", "é", "x" * 65, "a\n", "..", "a\x00"])
def test_parse_rejects_bad_user_names(name: str, user: str) -> None:
    refused(encode(base_fields() | {name: user}), RefuseCode.BAD_METADATA)


@pytest.mark.parametrize("filename", ["a/b", "/etc", "dir/", "a\x00b", "", ".", "..", "x" * 256])
def test_parse_rejects_bad_filename(filename: str) -> None:
    refused(encode(base_fields() | {"filename": filename}), RefuseCode.UNSAFE_PATH)


@pytest.mark.parametrize("filename", ["x", ".hidden.jpg", "x" * 255, "日本.jpg", "a..b"])
def test_parse_accepts_plain_filenames(filename: str) -> None:
    assert meta.parse(encode(base_fields() | {"filename": filename}))["filename"] == filename


@pytest.mark.parametrize("folder", ["../etc", "/abs", "a/../b", ".git", "a\\b", "a\x00b"])
def test_parse_rejects_unsafe_folder(folder: str) -> None:
    refused(encode(base_fields() | {"folder": folder}), RefuseCode.UNSAFE_PATH)


# -- safe_folder ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "folder",
    [
        "..",
        "../x",
        "a/..",
        "a/../b",
        "/abs",
        "/",
        "//x",
        "a\x00",
        "a\\b",
        "..\\x",
        ".",
        "./a",
        "a/.",
        "a/./b",
        ".hidden",
        "a/.hidden",
        "a/.hidden/b",
        "",
        "a" * 1025,
        "é" * 513,  # 1026 bytes in UTF-8
        "a" * 256,  # one part longer than a file system's name
        "b/" + "é" * 128,  # a 256-byte part in UTF-8
        "a\nb",
        "a\tb",
        "a\x1fb",
    ],
)
def test_safe_folder_rejects(folder: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        meta.safe_folder(folder)
    assert exc.value.code is RefuseCode.UNSAFE_PATH


@pytest.mark.parametrize("folder", [None, 5, b"photo", ["photo"]])
def test_safe_folder_rejects_non_strings(folder: object) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        meta.safe_folder(folder)
    assert exc.value.code is RefuseCode.UNSAFE_PATH


@pytest.mark.parametrize(
    "folder", ["photo", "a/b/c", "фото", "a b", "a..b", "a.", "x-y_z", "/".join(["a" * 255] * 4), "é" * 127,
               "/".join(["d"] * 300)]
)
def test_safe_folder_accepts(folder: str) -> None:
    assert meta.safe_folder(folder) == folder


def test_make_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        meta.make("zhenqiang", "roland-frei", "../up", "x", 1, 1)
    with pytest.raises(ConfigError):
        meta.make(".bad", "roland-frei", "photo", "x", 1, 1)
    with pytest.raises(ConfigError):
        meta.make("zhenqiang", "bad name", "photo", "x", 1, 1)


@pytest.mark.parametrize("folder", ["photo/", "a//b"])
def test_parse_output_is_self_consistent(folder: str) -> None:
    fields = meta.make("zhenqiang", "roland-frei", folder, "x.bin", 1, 2, when=WHEN)
    parsed = meta.parse(meta.to_json(fields))  # what the client reads from the .meta
    assert parsed["metaCRC"] == reference_crc64(oracle_canonical(parsed))
    meta.parse(meta.to_json(parsed))  # what the server parses from the envelope


# -- .meta files ----------------------------------------------------------------------------


def test_read_meta_file(tmp_path: Path) -> None:
    path = tmp_path / "x.meta"
    path.write_bytes(encode(base_fields()))
    assert meta.read_meta_file(path)["filename"] == "myfoto.jpg"


def test_read_meta_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such"):
        meta.read_meta_file(tmp_path / "missing.meta")
    bad = tmp_path / "bad.meta"
    bad.write_bytes(encode(base_fields(), crc=1))
    with pytest.raises(ConfigError) as exc:
        meta.read_meta_file(bad)
    assert "bad.meta" in exc.value.reason and "metaCRC" in exc.value.reason


# -- the server's reply ---------------------------------------------------------------------


def sent_fields() -> dict[str, Any]:
    return meta.parse(encode(base_fields()))


def test_reply_round_trip() -> None:
    sent = sent_fields()
    reply, filekey, salt = meta.add_reply_fields(sent)
    assert len(filekey) == 16 and len(salt) == 4
    assert reply["filekey"] == filekey.hex() and reply["salt"] == salt.hex()
    assert set(reply) == {*sent, "filekey", "salt", "received", "resume"}
    assert reply["received"] == 0 and reply["resume"] == "0" * 16
    assert {k: reply[k] for k in sent if k != "metaCRC"} == {k: v for k, v in sent.items() if k != "metaCRC"}
    assert reply["metaCRC"] == reference_crc64(oracle_canonical(reply))
    assert meta.check_reply(sent, meta.to_json(reply)) == (filekey, salt, 0, 0)
    assert meta.parse(meta.to_json(reply), extra=("filekey", "salt", "received", "resume")) == reply
    assert sent == sent_fields()  # not modified in place


@pytest.mark.parametrize("received", [meta.NEW, meta.SAME_FILE, meta.OTHER_FILE])
def test_reply_says_what_the_server_holds(received: int) -> None:
    sent = sent_fields()
    reply, filekey, salt = meta.add_reply_fields(sent, received)
    assert meta.check_reply(sent, meta.to_json(reply)) == (filekey, salt, received, 0)


def test_reply_length_does_not_tell_what_the_server_holds() -> None:
    """A stranger who made the request cannot read the reply, but sees its length: it must not
    tell "the same file" from "another file" (or from a new name). The metaCRC's digits vary with
    the random filekey, alike for all three; everything else has one length."""
    sent = sent_fields()
    lengths = set()
    for received, resume in ((0, 0), (1, 0), (2, 0), (0, 1), (0, 2**40 + 3)):
        reply = meta.add_reply_fields(sent, received, resume)[0]
        lengths.add(len(meta.to_json(reply)) - len(str(reply["metaCRC"])))
    assert len(lengths) == 1


def test_reply_keys_are_fresh() -> None:
    sent = sent_fields()
    _, key1, salt1 = meta.add_reply_fields(sent)
    _, key2, salt2 = meta.add_reply_fields(sent)
    assert key1 != key2
    assert (key1, salt1) != (key2, salt2)


def reply_bytes(sent: dict[str, Any], **changes: Any) -> bytes:
    """A reply built here, with ``changes`` applied before the metaCRC is computed; None deletes."""
    reply = {k: v for k, v in sent.items() if k != "metaCRC"} | {"filekey": "ab" * 16, "salt": "cd" * 4,
                                                                  "received": 0, "resume": "0" * 16}
    for name, value in changes.items():
        if value is None:
            del reply[name]
        else:
            reply[name] = value
    return encode(reply)


def check_reply_refused(sent: dict[str, Any], data: bytes, code: RefuseCode) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        meta.check_reply(sent, data)
    assert exc.value.code is code, exc.value.reason


def test_check_reply_accepts_independent_reply() -> None:
    sent = sent_fields()
    assert meta.check_reply(sent, reply_bytes(sent)) == (b"\xab" * 16, b"\xcd" * 4, 0, 0)
    assert meta.check_reply(sent, reply_bytes(sent, received=1)) == (b"\xab" * 16, b"\xcd" * 4, 1, 0)
    assert meta.check_reply(sent, reply_bytes(sent, resume="00000000000000ff"))[3] == 255


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("from", "mallory"),
        ("to", "zhenqiang"),
        ("folder", "other"),
        ("datetime", "10-03-2024_14-05-07"),
        ("filename", "other.jpg"),
        ("filesize", 65538),
        ("fileCRC", 1),
    ],
)
def test_check_reply_rejects_changed_field(name: str, value: Any) -> None:
    sent = sent_fields()
    check_reply_refused(sent, reply_bytes(sent, **{name: value}), RefuseCode.BAD_METADATA)


@pytest.mark.parametrize("changes", [{"extra": "x"}, {"filekey": None}, {"salt": None}, {"folder": None},
                                     {"received": None}])
def test_check_reply_rejects_wrong_field_set(changes: dict[str, Any]) -> None:
    sent = sent_fields()
    check_reply_refused(sent, reply_bytes(sent, **changes), RefuseCode.BAD_METADATA)


def test_check_reply_rejects_bad_metacrc() -> None:
    sent = sent_fields()
    reply = json.loads(reply_bytes(sent))
    reply["metaCRC"] ^= 1
    check_reply_refused(sent, json.dumps(reply).encode(), RefuseCode.META_CRC)
    reply["metaCRC"] ^= 1
    reply["salt"] = "00" * 4  # changed after the CRC was computed
    check_reply_refused(sent, json.dumps(reply).encode(), RefuseCode.META_CRC)


@pytest.mark.parametrize(
    "changes",
    [
        {"filekey": "ab" * 15},
        {"filekey": "ab" * 17},
        {"filekey": ""},
        {"salt": "cd" * 3},
        {"salt": "cd" * 5},
        {"filekey": "zz" * 16},
        {"salt": "c"},
        {"filekey": 5},
        {"salt": ["cd"]},
    ],
)
def test_check_reply_rejects_bad_key_or_salt(changes: dict[str, Any]) -> None:
    sent = sent_fields()
    check_reply_refused(sent, reply_bytes(sent, **changes), RefuseCode.BAD_METADATA)


def test_check_reply_names_an_older_server() -> None:
    sent = sent_fields()
    for older in ({"received": None, "resume": None}, {"resume": None}):
        with pytest.raises(RemoteProtocolError, match="runs an older m2y"):
            meta.check_reply(sent, reply_bytes(sent, **older))


@pytest.mark.parametrize("value", [0, 5, "ff", "0" * 15, "0" * 17, "000000000000000G", "00000000000000FF", None])
def test_check_reply_rejects_bad_resume(value: Any) -> None:
    """16 lowercase hex digits: one length whatever the value (and a missing one is an older server)."""
    sent = sent_fields()
    with pytest.raises(RemoteProtocolError):
        meta.check_reply(sent, reply_bytes(sent, resume=value))


@pytest.mark.parametrize("value", [3, -1, True, False, "1", 1.0, [1], {}])
def test_check_reply_rejects_bad_received(value: Any) -> None:
    """Only 0, 1 and 2: a true (JSON) or 1.0 must not pass for "the server has it"."""
    sent = sent_fields()
    check_reply_refused(sent, reply_bytes(sent, received=value), RefuseCode.BAD_METADATA)


@pytest.mark.parametrize("data", [b"", b"nope", b"\xff", b"[]", b"null"])
def test_check_reply_rejects_non_object(data: bytes) -> None:
    check_reply_refused(sent_fields(), data, RefuseCode.BAD_METADATA)


# -- hardening after review: nonce, key folders, format characters, real dates, hostile JSON --------


def test_request_adds_a_fresh_nonce_and_parse_checks_it() -> None:
    fields = meta.make("zhenqiang", "roland-frei", "photo", "x.bin", 1, 2, when=WHEN)
    a, b = meta.request(fields), meta.request(fields)
    assert a["nonce"] != b["nonce"] and len(bytes.fromhex(a["nonce"])) == 16
    assert meta.parse(meta.to_json(a), ("nonce",)) == a
    assert meta.stored(a) == fields  # the server keeps the sender's .meta as it was
    bad = dict(a, nonce="xyz")
    refused(encode(bad), RefuseCode.BAD_METADATA, ("nonce",))


def test_reply_must_echo_the_nonce() -> None:
    fields = meta.make("zhenqiang", "roland-frei", "photo", "x.bin", 1, 2, when=WHEN)
    sent = meta.request(fields)
    reply, key, salt = meta.add_reply_fields(sent)
    assert meta.check_reply(sent, meta.to_json(reply)) == (key, salt, meta.NEW, 0)
    # A forger who knows every field but the nonce, claiming the file is already there.
    guessed, _, _ = meta.add_reply_fields(fields, meta.SAME_FILE)
    with pytest.raises(RemoteProtocolError):
        meta.check_reply(sent, meta.to_json(guessed))
    other = meta.with_crc(dict(reply, nonce="0" * 32))
    with pytest.raises(RemoteProtocolError):
        meta.check_reply(sent, meta.to_json(other))


@pytest.mark.parametrize("folder", ["pubKey", "PUBKEY/x", "privateKey", "privatekey/a/b"])
def test_key_folders_are_refused(folder: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        meta.safe_folder(folder)
    assert exc.value.code is RefuseCode.UNSAFE_PATH and "key folder" in exc.value.reason


@pytest.mark.parametrize("folder", ["a\x7fb", "a\x9bb", "a\u2028b", "a\u200eb", "a\ufeffb"])
def test_format_and_c1_characters_in_folder_are_refused(folder: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        meta.safe_folder(folder)
    assert exc.value.code is RefuseCode.UNSAFE_PATH


@pytest.mark.parametrize("value", ["99-99-9999_99-99-99", "31-02-2024_10-00-00", "01-01-2024_24-00-00"])
def test_impossible_dates_are_refused(value: str) -> None:
    refused(encode(base_fields() | {"datetime": value}), RefuseCode.BAD_METADATA)


def test_lone_surrogate_is_bad_metadata_not_a_crash() -> None:
    data = b'{"from": "zhenqiang", "to": "roland-frei", "folder": "\\ud800"}'
    refused(data, RefuseCode.BAD_METADATA)
    with pytest.raises(RemoteProtocolError):
        meta.check_reply({"folder": "x"}, data)


def test_deeply_nested_json_is_bad_metadata_not_a_crash() -> None:
    data = b"[" * 100_000 + b"]" * 100_000
    refused(data, RefuseCode.BAD_METADATA)
    with pytest.raises(RemoteProtocolError):
        meta.check_reply({}, data)


def test_write_meta_file_never_takes_over_another_files_meta(tmp_path: Path) -> None:
    first = meta.make("zhenqiang", "roland-frei", "photo", "a.txt", 1, 0)
    second = meta.make("zhenqiang", "roland-frei", "photo", "a.bin", 2, 0)
    out = meta.meta_path_for(tmp_path / "a.txt")
    assert out == meta.meta_path_for(tmp_path / "a.bin") == tmp_path / "a.meta"
    meta.write_meta_file(out, first)
    with pytest.raises(ConfigError, match=r"already exists and is the \.meta of 'a\.txt': the two files share a "
                       r"\.meta name; rename one of them \('a\.bin' or 'a\.txt'\)"):
        meta.write_meta_file(out, second)
    assert meta.read_meta_file(out) == first
    again = dict(first, filesize=5)
    meta.write_meta_file(out, meta.with_crc(again))  # the same file's .meta may be rewritten
    assert meta.read_meta_file(out)["filesize"] == 5
    junk = tmp_path / "b.meta"
    junk.write_text("not json")
    with pytest.raises(ConfigError, match=r"not a \.meta this command wrote"):
        meta.write_meta_file(junk, meta.make("zhenqiang", "roland-frei", "photo", "b.bin", 1, 0))
    assert junk.read_text() == "not json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.meta", "b.meta"]  # no temporary left


def test_write_meta_file_error_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot write .*missing"):
        meta.write_meta_file(tmp_path / "missing" / "a.meta", meta.make("zhenqiang", "roland-frei", "p", "a", 1, 0))


def test_write_meta_file_mode_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        meta.write_meta_file(tmp_path / "a.meta", meta.make("zhenqiang", "roland-frei", "p", "a.txt", 1, 0))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.meta").stat().st_mode) == 0o644


@pytest.mark.parametrize("err", [errno.EPERM, errno.EXDEV])
def test_write_meta_file_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    """FAT and some network file systems refuse link(): the .meta is still written, and still never
    replaces another file's."""
    def no_link(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "a.meta"
    first = meta.make("zhenqiang", "roland-frei", "p", "a.txt", 1, 0)
    meta.write_meta_file(out, first)
    assert meta.read_meta_file(out) == first
    with pytest.raises(ConfigError, match=r"already exists and is the \.meta of 'a\.txt'"):
        meta.write_meta_file(out, meta.make("zhenqiang", "roland-frei", "p", "a.bin", 2, 0))
    assert meta.read_meta_file(out) == first
    assert [p.name for p in tmp_path.iterdir()] == ["a.meta"]


# -- the datetime `m2y meta` gives (issue_datetime) ---------------------------------------------


def test_issue_datetime_keeps_one_senders_datetimes_distinct(tmp_path: Path) -> None:
    now = dt.datetime(2026, 11, 26, 17, 45, 3, 999_000)
    first = meta.issue_datetime(tmp_path, now)
    second = meta.issue_datetime(tmp_path, now)  # the same second: the next one is taken
    third = meta.issue_datetime(tmp_path, now + dt.timedelta(seconds=10))  # the clock moved on: now again
    assert first == dt.datetime(2026, 11, 26, 17, 45, 3)
    assert second == first + dt.timedelta(seconds=1)
    assert third == dt.datetime(2026, 11, 26, 17, 45, 13)
    assert stat.S_IMODE((tmp_path / meta.CLOCK_FILE).stat().st_mode) & 0o077 == 0


def test_issue_datetime_follows_a_clock_ahead_and_restarts_a_damaged_one(tmp_path: Path) -> None:
    """A clock far ahead is still followed (a day's reset could hand out a datetime twice after a
    long bulk run); a damaged one starts again from now."""
    now = dt.datetime(2026, 11, 26, 17, 45, 3)
    ahead = now + dt.timedelta(days=3)
    (tmp_path / meta.CLOCK_FILE).write_text(meta.now_string(ahead) + "\n")
    assert meta.issue_datetime(tmp_path, now) == ahead + dt.timedelta(seconds=1)
    (tmp_path / meta.CLOCK_FILE).write_bytes(b"\xff not a date" * 10)
    assert meta.issue_datetime(tmp_path, now) == now
    assert (tmp_path / meta.CLOCK_FILE).read_bytes() == (meta.now_string(now) + "\n").encode()  # rewritten, trimmed
    assert meta.issue_datetime(tmp_path, now) == now + dt.timedelta(seconds=1)


def test_issue_datetime_gives_up_on_a_lock_held_too_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    monkeypatch.setattr(meta, "CLOCK_LOCK_WAIT", 0.2)
    meta.issue_datetime(tmp_path)
    holder = os.open(tmp_path / meta.CLOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another m2y meta, stopped while it holds the clock
        with pytest.raises(ConfigError) as exc:
            meta.issue_datetime(tmp_path)
        assert "stayed locked for 0.2 s" in exc.value.reason and "\n" not in exc.value.reason
    finally:
        os.close(holder)


def test_issue_datetime_without_a_home_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        meta.issue_datetime(tmp_path / "nobody")
    assert f"m2y keygen nobody --root {tmp_path}" in exc.value.reason and "\n" not in exc.value.reason
    assert not (tmp_path / "nobody").exists()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_issue_datetime_clock_that_is_not_a_regular_file_is_one_line(tmp_path: Path, kind: str) -> None:
    """Never followed, never waited on (a FIFO would block a read forever)."""
    clock = tmp_path / meta.CLOCK_FILE
    if kind == "symlink":
        clock.symlink_to(tmp_path / "elsewhere")
    elif kind == "fifo":
        os.mkfifo(clock)
    else:
        clock.mkdir()
    with pytest.raises(ConfigError) as exc:
        meta.issue_datetime(tmp_path)
    assert meta.CLOCK_FILE in exc.value.reason and "\n" not in exc.value.reason
    assert not (tmp_path / "elsewhere").exists()


def _issue_in_process(home: str) -> str:
    return meta.now_string(meta.issue_datetime(Path(home), dt.datetime(2026, 11, 26, 17, 45, 3)))


def test_issue_datetime_is_distinct_across_processes_at_once(tmp_path: Path) -> None:
    """The lock: 24 processes asking at once for the same second all get different datetimes."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(8) as pool:
        got = pool.map(_issue_in_process, [str(tmp_path)] * 24, chunksize=1)
    assert len(set(got)) == 24


def test_write_meta_file_keeps_an_unsent_meta_of_another_send_or_of_the_same(tmp_path: Path) -> None:
    """A .meta there is not sent yet: one to another recipient or folder is refused (replaced, it was
    silently never sent); one of the same file as it is now, to the same place, is kept (replaced, a
    send of it that was cut off started again from byte 0); one of an older version is replaced."""
    out = tmp_path / "x.meta"
    to_bob = meta.make("zhenqiang", "roland-frei", "t", "x.bin", 10, 7, when=WHEN)
    meta.write_meta_file(out, to_bob)
    for other in (meta.make("zhenqiang", "carol", "t", "x.bin", 10, 7), meta.make("zhenqiang", "roland-frei",
                                                                                  "u", "x.bin", 10, 7)):
        with pytest.raises(ConfigError, match=r"is the \.meta of 'x\.bin' from 'zhenqiang' to 'roland-frei' \(folder "
                           r"'t'\), not sent yet: send it first \(it becomes \.done\), or move it away, then run "
                           r"'m2y meta' again"):
            meta.write_meta_file(out, other)
        assert meta.read_meta_file(out) == to_bob
    later = meta.make("zhenqiang", "roland-frei", "t", "x.bin", 10, 7)  # another datetime, the same file
    assert later["datetime"] != to_bob["datetime"]
    assert meta.write_meta_file(out, later) is False
    assert meta.read_meta_file(out) == to_bob
    changed = meta.make("zhenqiang", "roland-frei", "t", "x.bin", 10, 8)
    assert meta.write_meta_file(out, changed) is True
    assert meta.read_meta_file(out) == changed
    assert [p.name for p in tmp_path.iterdir()] == ["x.meta"]  # no temporary left


def test_write_meta_file_takes_every_name_whose_meta_name_fits(tmp_path: Path) -> None:
    """The temporary's name is short: a 250-byte file name (a 251-byte .meta name) used to fail with
    'File name too long' because the temporary's was 18 bytes longer than the .meta's."""
    name = "a" * 246 + ".bin"
    out = meta.meta_path_for(tmp_path / name)
    assert len(out.name.encode()) == 251
    assert meta.write_meta_file(out, meta.make("zhenqiang", "roland-frei", "p", name, 1, 0)) is True
    assert meta.read_meta_file(out)["filename"] == name


def test_write_meta_file_replaces_a_damaged_meta_of_the_same_file(tmp_path: Path) -> None:
    """A .meta of the file whose metaCRC no longer holds (edited by hand): m2y send refuses it and says
    to run m2y meta again, which must then replace it, not keep it."""
    out = tmp_path / "x.meta"
    fields = meta.make("zhenqiang", "roland-frei", "t", "x.bin", 10, 7, when=WHEN)
    out.write_bytes(meta.to_json(dict(fields, metaCRC=fields["metaCRC"] ^ 1)))
    again = meta.make("zhenqiang", "roland-frei", "t", "x.bin", 10, 7)
    assert meta.write_meta_file(out, again) is True
    assert meta.read_meta_file(out) == again


def test_write_meta_file_waits_for_no_send_it_refuses_under_one(tmp_path: Path) -> None:
    """m2y send holds a lock on the .meta it sends; replaced under it, the new .meta would be renamed
    .done by that send when it ends, and never sent."""
    import fcntl

    out = tmp_path / "x.meta"
    old = meta.make("zhenqiang", "roland-frei", "t", "x.bin", 10, 7, when=WHEN)
    meta.write_meta_file(out, old)
    changed = meta.make("zhenqiang", "roland-frei", "t", "x.bin", 11, 8)
    with open(out, "rb") as sending:
        fcntl.flock(sending, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=r"x\.meta is being sent right now by m2y send; run 'm2y meta' again "
                                              r"when that send has ended"):
            meta.write_meta_file(out, changed)
    assert meta.read_meta_file(out) == old
    assert meta.write_meta_file(out, changed) is True  # once the send let go
    assert meta.read_meta_file(out) == changed
    assert [p.name for p in tmp_path.iterdir()] == ["x.meta"]


def test_a_fifo_named_meta_is_refused_at_once(tmp_path: Path) -> None:
    from engine.errors import MalformedMeta

    fifo = tmp_path / "x.meta"
    os.mkfifo(fifo)
    with pytest.raises(MalformedMeta, match="not a regular file"):
        meta.read_meta_file(fifo)
    big = tmp_path / "big.meta"
    big.write_bytes(b" " * (meta.MAX_META_FILE + 1))
    with pytest.raises(MalformedMeta, match=r"far more than a \.meta"):
        meta.read_meta_file(big)
