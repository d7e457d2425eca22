"""Golden vectors (tests/vectors/, made by tests/make_vectors.py) against the protocol package.

These pin wire protocol v1: a change that makes a vector fail is a wire change, which needs a new
protocol version, not a regenerated vector. The frame-layout test also re-derives everything from
the bytes with nothing but struct, hashlib, base64, msgpack and cryptography, as another
implementation following docs/protocol.md would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from test_protocol_strategies import canon

from protocol import errors
from protocol.change import ABSENT, Change, decode_changes, encode_changes
from protocol.envelope import HEADER_TYPES, Codec, Kind, open_sealed, packb, seal
from protocol.identity import NodeIdentity, node_id_for
from protocol.transport import parse_ack

VECTORS = Path(__file__).parent / "vectors"
MANIFEST: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text("utf-8"))
VALID = [v for v in MANIFEST["vectors"] if v["valid"]]
INVALID = [v for v in MANIFEST["vectors"] if not v["valid"]]
KEYS = MANIFEST["keys"]
ENROLLED = {
    k["node_id"]: bytes.fromhex(k["public_key_hex"]) for k in KEYS.values() if k["enrolled"]
}


def ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


def identity(name: str) -> NodeIdentity:
    seed = bytes.fromhex(KEYS[name]["seed_hex"])
    return NodeIdentity(Ed25519PrivateKey.from_private_bytes(seed))


def change_from_json(item: dict[str, Any]) -> Change:
    return Change(
        collection=item["collection"],
        key=item["key"],
        op=item["op"],
        fields=item["fields"],
        hlc=item["hlc"],
        parent=item["parent"],
        origin=item["origin"],
        seq=item["seq"],
    )


def expected_body(vector: dict[str, Any]) -> Any:
    if "changes" in vector:
        return encode_changes([change_from_json(c) for c in vector["changes"]])
    return vector["body"]


def test_manifest_lists_exactly_the_files() -> None:
    on_disk = {p.name for p in VECTORS.glob("*.bin")}
    listed = [v["file"] for v in MANIFEST["vectors"]]
    assert sorted(listed) == sorted(on_disk)
    assert len(set(listed)) == len(listed)
    for vector in MANIFEST["vectors"]:
        data = (VECTORS / vector["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == vector["sha256"], vector["name"]
    assert {v["kind"] for v in VALID} == {int(k) for k in Kind}
    assert list(HEADER_TYPES) == MANIFEST["header_keys"]


@pytest.mark.parametrize("name", list(KEYS))
def test_fixed_keys_and_node_ids(name: str) -> None:
    """Public key and node id of each fixed seed, recomputed by hand from the documented algorithm."""
    key = KEYS[name]
    public = identity(name).public_key
    assert public.hex() == key["public_key_hex"]
    by_hand = "n" + base64.b32encode(hashlib.sha256(public).digest()[:20]).decode().lower()[:26]
    assert node_id_for(public) == identity(name).node_id == by_hand == key["node_id"]
    assert len(key["node_id"]) == 27


def test_agent_node_id_is_pinned() -> None:
    """bytes(range(32)) as an Ed25519 seed: a constant any implementation can check against."""
    agent = KEYS["agent"]
    assert agent["seed_hex"] == bytes(range(32)).hex()
    assert agent["public_key_hex"] == (
        "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    )
    assert agent["node_id"] == "nkzdvvj2umnduyauf35o36k6kw4"


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_valid_vector_opens_to_manifest_content(vector: dict[str, Any]) -> None:
    data = (VECTORS / vector["file"]).read_bytes()
    opened = open_sealed(data, ENROLLED.get)
    assert opened.kind == Kind(vector["kind"])
    assert opened.header == vector["header"]
    assert list(opened.header)[: len(HEADER_TYPES)] == list(HEADER_TYPES)
    assert opened.header["node"] == KEYS[vector["signer"]]["node_id"]
    assert opened.size == len(data)
    assert packb(opened.body) == bytes.fromhex(vector["raw_body_hex"])
    if "changes" in vector:
        decoded = decode_changes(opened.body)
        expected = [change_from_json(c) for c in vector["changes"]]
        assert canon(decoded) == canon(expected)
        assert opened.header["count"] == len(decoded)
    else:
        ack = parse_ack(opened.body)
        assert (ack.node_id, ack.acked_through, ack.hq_time_ms) == (
            vector["body"]["node"],
            vector["body"]["acked_through"],
            vector["body"]["hq_time"],
        )


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_valid_vector_reseals_from_manifest(vector: dict[str, Any]) -> None:
    """Codec NONE vectors re-seal byte for byte; the zstd one re-seals to the same content."""
    header = vector["header"]
    data = seal(
        identity(vector["signer"]),
        Kind(vector["kind"]),
        expected_body(vector),
        seq=header["seq"],
        first=header["first"],
        last=header["last"],
        count=header["count"],
        time=header["time"],
        codec=Codec(header["codec"]),
        extra={k: v for k, v in header.items() if k not in HEADER_TYPES} or None,
    )
    golden = (VECTORS / vector["file"]).read_bytes()
    if vector["byte_exact"]:
        assert data == golden
    else:
        assert open_sealed(data, ENROLLED.get).header == open_sealed(golden, ENROLLED.get).header
        assert open_sealed(data, ENROLLED.get).body == open_sealed(golden, ENROLLED.get).body


def test_zstd_vector_carries_the_same_raw_body_as_the_none_vector() -> None:
    by_name = {v["name"]: v for v in VALID}
    assert by_name["changes_zstd"]["raw_body_hex"] == by_name["changes_none"]["raw_body_hex"]
    none = (VECTORS / "changes_none.bin").read_bytes()
    zstd = (VECTORS / "changes_zstd.bin").read_bytes()
    assert len(zstd) < len(none)


def test_feed_vector_covers_the_interesting_cases() -> None:
    """Two origins, a delete, an explicit null, an absent field, header extras cursor/more."""
    feed = next(v for v in VALID if v["name"] == "feed")
    assert feed["header"]["cursor"] == 1234
    assert feed["header"]["more"] is True
    changes = feed["changes"]
    assert len({c["origin"] for c in changes}) == 2
    assert any(c["op"] == "delete" for c in changes)
    assert any(v is None for c in changes for v in c["fields"].values())
    body = msgpack.unpackb(
        bytes.fromhex(feed["raw_body_hex"]),
        raw=False,
        ext_hook=lambda code, data: msgpack.ExtType(code, data),
    )
    group = body["groups"][0]
    assert isinstance(group["origin"], list)
    assert group["op"] == [0, 0, 1]
    assert any(ABSENT in column for column in group["cols"])
    assert isinstance(body["groups"][1]["origin"], int)
    assert "op" not in body["groups"][1]


@pytest.mark.parametrize("vector", VALID, ids=ids(VALID))
def test_frame_layout_matches_the_spec(vector: dict[str, Any]) -> None:
    """Parse the frame with struct only, verify with cryptography only: docs/protocol.md suffices."""
    data = (VECTORS / vector["file"]).read_bytes()
    magic, version, kind, hlen = struct.unpack_from(">4sBBH", data, 0)
    assert (magic, version, kind) == (b"FSYN", 1, vector["kind"])
    header = msgpack.unpackb(data[8 : 8 + hlen], raw=False)
    (blen,) = struct.unpack_from(">I", data, 8 + hlen)
    body = data[12 + hlen : 12 + hlen + blen]
    signature = data[12 + hlen + blen :]
    assert len(signature) == 64
    assert header == vector["header"]
    public = bytes.fromhex(KEYS[vector["signer"]]["public_key_hex"])
    Ed25519PublicKey.from_public_bytes(public).verify(signature, data[:-64])
    if header["codec"] == 0:
        assert body.hex() == vector["raw_body_hex"]
    assert header["raw"] == len(vector["raw_body_hex"]) // 2


@pytest.mark.parametrize("vector", INVALID, ids=ids(INVALID))
def test_invalid_vector_raises_exactly_its_error(vector: dict[str, Any]) -> None:
    data = (VECTORS / vector["file"]).read_bytes()
    error = getattr(errors, vector["error"])
    assert issubclass(error, errors.ProtocolError)
    if vector["stage"] == "open":
        with pytest.raises(errors.ProtocolError) as caught:
            open_sealed(data, ENROLLED.get)
    else:
        opened = open_sealed(data, ENROLLED.get)
        with pytest.raises(errors.ProtocolError) as caught:
            decode_changes(opened.body)
    assert type(caught.value) is error, caught.value


def test_unknown_signer_vector_is_otherwise_valid() -> None:
    """Enrolling the stranger makes it open: the vector fails for exactly the one stated reason."""
    data = (VECTORS / "unknown_signer.bin").read_bytes()
    stranger = KEYS["stranger"]
    keys = {**ENROLLED, stranger["node_id"]: bytes.fromhex(stranger["public_key_hex"])}
    assert decode_changes(open_sealed(data, keys.get).body)
