"""docs/protocol.md against the code: a constant, key, error or vector missing from the spec fails."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from protocol import envelope, errors, hlc, identity, transport
from protocol.change import Change, encode_changes
from protocol.envelope import HEADER_TYPES, packb

ROOT = Path(__file__).parent.parent
SPEC = (ROOT / "docs" / "protocol.md").read_text("utf-8")
MANIFEST = json.loads((ROOT / "tests" / "vectors" / "vectors.json").read_text("utf-8"))


def section(title: str) -> str:
    """The text of the `## N. title...` section."""
    match = re.search(rf"^## \d+\. {re.escape(title)}[^\n]*\n(.*?)(?=^## |\Z)", SPEC, re.M | re.S)
    assert match, f"docs/protocol.md has no section {title!r}"
    return match.group(1)


def rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not set(line) <= set("|-: ")
    ]


# The classes of protocol/errors.py (other packages may subclass ProtocolError for their own use).
ERROR_CLASSES = [
    value
    for value in vars(errors).values()
    if isinstance(value, type)
    and issubclass(value, errors.ProtocolError)
    and value.__module__ == errors.__name__
]


@pytest.mark.parametrize("error", ERROR_CLASSES, ids=lambda e: e.__name__)
def test_every_error_class_is_documented_with_code_and_status(error: type) -> None:
    table = {row[0]: row for row in rows(section("Errors"))}
    row = table[f"`{error.__name__}`"]
    assert row[1] == f"`{error.code}`"  # type: ignore[attr-defined]
    assert row[2] == str(error.http_status)  # type: ignore[attr-defined]


def test_every_header_key_is_documented_with_its_type() -> None:
    table = {row[0]: row for row in rows(section("The sealed message"))}
    for name, kind in HEADER_TYPES.items():
        assert table[f"`{name}`"][1] == kind.__name__


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_HEADER_BYTES", envelope.MAX_HEADER_BYTES),
        ("HARD_MAX_RAW_BYTES", envelope.HARD_MAX_RAW_BYTES),
        ("SIGNATURE_BYTES", identity.SIGNATURE_BYTES),
        ("PUBLIC_KEY_BYTES", identity.PUBLIC_KEY_BYTES),
        ("DEFAULT_ZSTD_LEVEL", envelope.DEFAULT_ZSTD_LEVEL),
        ("ZSTD_TABLE_LOG", envelope.ZSTD_TABLE_LOG),
        ("MAX_ZSTD_WINDOW_BYTES", envelope.MAX_ZSTD_WINDOW_BYTES),
        ("DEFAULT_MAX_DRIFT_MS", hlc.DEFAULT_MAX_DRIFT_MS),
        ("REQUEST_WINDOW_MS", transport.REQUEST_WINDOW_MS),
    ],
)
def test_limits_table_matches_the_code(name: str, value: int) -> None:
    table = {row[0]: row for row in rows(section("Limits"))}
    assert table[f"`{name}`"][1].split()[0] == str(value)


def test_frame_constants_and_kinds() -> None:
    text = section("The sealed message")
    assert envelope.MAGIC.hex(" ").upper() in text
    assert f"`0{envelope.VERSION}`" in text
    for kind in envelope.Kind:
        assert f"`{int(kind)}` {kind.name}" in text
    for codec in envelope.Codec:
        assert f"`{int(codec)}` {codec.name}" in text


def test_transport_names_are_documented() -> None:
    text = section("HTTP transport")
    for name in (
        transport.BATCHES_PATH,
        transport.CHANGES_PATH,
        transport.ENROLL_PATH,
        transport.SEALED_CONTENT_TYPE,
        transport.HEADER_NODE,
        transport.HEADER_TIME,
        transport.HEADER_SIGNATURE,
    ):
        assert name in text, name


def test_signed_string_example_is_what_the_code_signs() -> None:
    example = re.search(r'For example `b"(.*?)"`', section("HTTP transport"))
    assert example
    expected = transport._request_bytes("get", "/v1/changes?cursor=5&limit=100", 1700000000000)
    assert example.group(1).encode().decode("unicode_escape").encode() == expected


def test_columnar_example_bytes_are_what_the_code_encodes() -> None:
    text = section("Changes and the columnar body")
    block = re.search(r"\n((?:[0-9a-f]{2} )+[0-9a-f]{2}\n(?:[0-9a-f ]+\n)*)```", text)
    assert block
    documented = bytes.fromhex(block.group(1).replace("\n", " "))
    batch = [
        Change("people", "a", "upsert", {"x": 1, "y": None}, 1000, 0, "nA", 5),
        Change("people", "b", "upsert", {"y": "two"}, 1010, 900, "nB", 6),
    ]
    assert documented == packb(encode_changes(batch))


def test_node_id_example() -> None:
    text = section("Node ids")
    agent = MANIFEST["keys"]["agent"]
    assert agent["public_key_hex"] in text
    assert agent["node_id"] in text


def test_every_vector_file_is_listed_with_its_error() -> None:
    table = {row[0]: row for row in rows(section("Test vectors"))}
    for vector in MANIFEST["vectors"]:
        row = table[f"`{vector['file']}`"]
        if not vector["valid"]:
            assert row[1] == f"`{vector['error']}`", vector["file"]


def test_every_known_deviation_names_an_existing_xfail_test() -> None:
    names = re.findall(r"`(?:tests/test_protocol_\w+\.py::)?(test_\w+)`", section("Open points"))
    assert names
    sources = "\n".join(p.read_text("utf-8") for p in (ROOT / "tests").glob("test_protocol_*.py"))
    for name in names:
        match = re.search(rf"@pytest\.mark\.xfail\((?:(?!\ndef ).)*?\ndef {name}\(", sources, re.S)
        assert match, f"{name} is not an xfail test in tests/test_protocol_*.py"


def test_values_are_json_values_in_7_1() -> None:
    """The spec once listed byte strings among values, which HQ refuses (issue 9, defect 8)."""
    text = section("Changes and the columnar body")
    assert "Byte strings (`bin`), extension types, NaN and infinities are not values" in text
    assert "byte strings, arrays" not in text
    assert "byte strings are accepted" not in SPEC.lower()


def test_every_enrolment_refusal_code_is_documented() -> None:
    """HQ's store names its enrolment refusals in ENROL_CODES (issue 9, defect 8)."""
    from hq_server import store

    text = section("HTTP transport")
    codes = getattr(
        store, "ENROL_CODES", {"token_invalid": "", "token_used": "", "key_revoked": ""}
    )
    for code in codes:
        assert f"| `{code}`" in text, code
