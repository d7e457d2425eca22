"""Regenerate the golden wire-protocol vectors in tests/vectors/ (run by hand; the tests never run it).

    .venv/bin/python tests/make_vectors.py           # rewrite tests/vectors/*.bin and vectors.json
    .venv/bin/python tests/make_vectors.py --check   # compare with the files on disk, exit 1 on a diff

Every input is fixed: Ed25519 keys from constant 32-byte seeds (Ed25519 signatures are deterministic),
constant changes, HLCs and header values. Valid vectors are sealed with `protocol.envelope.seal`; the
invalid ones are derived from them by editing bytes, or framed and signed here by `frame()`, which
writes the v1 layout of docs/protocol.md independently of the envelope module.

Vectors with codec NONE are byte-exact: any correct implementation that encodes the manifest's
content the way docs/protocol.md says (msgpack shortest forms, the key orders shown) reproduces them
bit for bit. The zstd vector depends on the zstd library and level (12), so only its decoded content
is golden; `--check` may report it as changed after a zstandard upgrade, which is harmless.

Regenerate only for a deliberate wire change (that is a protocol version bump) or a new vector, and
review the diff of vectors.json: tests/test_protocol_vectors.py pins the old bytes for a reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.change import Change, encode_changes
from protocol.envelope import (
    HARD_MAX_RAW_BYTES,
    HEADER_TYPES,
    MAGIC,
    MAX_HEADER_BYTES,
    VERSION,
    Codec,
    Kind,
    packb,
    seal,
)
from protocol.hlc import pack
from protocol.identity import NodeIdentity
from protocol.transport import ack_body

VECTORS = Path(__file__).resolve().parent / "vectors"

# Test keys only: the seeds are public, never use them for anything real.
SEEDS = {
    "agent": bytes(range(0, 32)),  # the field office that seals the CHANGES batches
    "hq": bytes(range(32, 64)),  # HQ: seals the ACK and the FEED page
    "office_b": bytes(range(64, 96)),  # another field office: an origin in the feed
    "stranger": bytes(range(96, 128)),  # not enrolled anywhere: signs the unknown_signer vector
}
ENROLLED = ("agent", "hq")

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z, in ms


def identity(name: str) -> NodeIdentity:
    return NodeIdentity(Ed25519PrivateKey.from_private_bytes(SEEDS[name]))


AGENT, HQ, OFFICE_B, STRANGER = (identity(n) for n in ("agent", "hq", "office_b", "stranger"))


def batch_changes() -> list[Change]:
    """One agent's batch: two collections, a nested value, an explicit null, an absent field, a delete."""
    me = AGENT.node_id
    b1 = pack(T0, 0)
    return [
        Change(
            "beneficiaries",
            "B-0001",
            "upsert",
            {
                "name": "Amina Yusuf",
                "household_size": 6,
                "village": "Dadaab – Ifo 2",
                "tags": ["idp", "priority"],
                "geo": {"lat": 0.0512, "lon": 40.3114},
            },
            b1,
            0,
            me,
            41,
        ),
        Change(
            "beneficiaries",
            "B-0002",
            "upsert",
            {"name": "Jean-Baptiste Ndayishimiye", "household_size": 3, "phone": None},
            pack(T0, 1),
            0,
            me,
            42,
        ),
        Change(
            "beneficiaries",
            "B-0001",
            "upsert",
            {"household_size": 7, "notes": "نازح حديثاً ✓"},
            pack(T0 + 5_000, 0),
            b1,
            me,
            43,
        ),
        Change(
            "distributions",
            "D-2024-0007",
            "upsert",
            {
                "beneficiary": "B-0001",
                "item": "maize",
                "kg": 12.5,
                "voucher": 9_007_199_254_740_993,
                "balance": -3,
                "collected": True,
            },
            pack(T0 + 6_000, 0),
            0,
            me,
            44,
        ),
        Change(
            "distributions",
            "D-2024-0003",
            "delete",
            {},
            pack(T0 + 7_000, 0),
            pack(T0 - 86_400_000, 3),
            me,
            45,
        ),
    ]


def feed_changes() -> list[Change]:
    """A feed page for the agent: two origins (another office and HQ), mixed in one group."""
    b, hq = OFFICE_B.node_id, HQ.node_id
    return [
        Change(
            "beneficiaries",
            "B-0101",
            "upsert",
            {"name": "Fatuma Hassan", "household_size": 4, "phone": None},
            pack(T0 + 10_000, 0),
            0,
            b,
            310,
        ),
        Change(
            "beneficiaries",
            "B-0002",
            "upsert",
            {"status": "verified", "household_size": 4},
            pack(T0 + 10_000, 1),
            pack(T0, 1),
            hq,
            12,
        ),
        Change("beneficiaries", "B-0102", "delete", {}, pack(T0 + 11_000, 0), pack(T0, 7), b, 311),
        Change(
            "sites",
            "S-17",
            "upsert",
            {"name": "Ifo 2", "open": True, "capacity": 1500, "coords": [0.05, 40.31]},
            pack(T0 + 12_000, 0),
            0,
            hq,
            13,
        ),
    ]


def change_json(change: Change) -> dict[str, Any]:
    """The manifest's form of a change: an absent field is a missing key, null is an explicit null."""
    return {
        "collection": change.collection,
        "key": change.key,
        "op": change.op,
        "fields": change.fields,
        "hlc": change.hlc,
        "parent": change.parent,
        "origin": change.origin,
        "seq": change.seq,
    }


def frame(signer: NodeIdentity, kind: int, header: dict[Any, Any], payload: bytes) -> bytes:
    """The v1 layout written out by hand, so invalid-but-signed vectors can carry any header."""
    return frame_bytes(signer, kind, packb(header), payload)


def frame_bytes(signer: NodeIdentity, kind: int, header_bytes: bytes, payload: bytes) -> bytes:
    """`frame` for header bytes no dict produces (a key twice)."""
    signed = (
        struct.pack(">4sBBH", MAGIC, VERSION, kind, len(header_bytes))
        + header_bytes
        + struct.pack(">I", len(payload))
        + payload
    )
    return signed + signer.sign(signed)


def header_of(data: bytes) -> dict[str, Any]:
    (hlen,) = struct.unpack_from(">H", data, 6)
    header: dict[str, Any] = msgpack.unpackb(data[8 : 8 + hlen], raw=False)
    return header


def body_offset(data: bytes) -> int:
    (hlen,) = struct.unpack_from(">H", data, 6)
    return 8 + hlen + 4


def build() -> tuple[dict[str, bytes], dict[str, Any]]:
    """All vector files and the manifest, computed from the fixed inputs above."""
    files: dict[str, bytes] = {}
    vectors: list[dict[str, Any]] = []

    def valid(name: str, signer: str, kind: Kind, body: Any, description: str, **kw: Any) -> bytes:
        changes = kw.pop("changes", None)
        data = seal(identity(signer), kind, body, **kw)
        raw = packb(body)
        entry: dict[str, Any] = {
            "name": name,
            "file": f"{name}.bin",
            "description": description,
            "valid": True,
            "signer": signer,
            "kind": int(kind),
            "byte_exact": kw.get("codec") == Codec.NONE,
            "header": header_of(data),
            "raw_body_hex": raw.hex(),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        if kind == Kind.ACK:
            entry["body"] = body
        else:
            entry["changes"] = [change_json(c) for c in changes]
        files[entry["file"]] = data
        vectors.append(entry)
        return data

    batch = batch_changes()
    batch_header = {"seq": 7, "first": 41, "last": 45, "count": 5, "time": pack(T0 + 7_500, 0)}
    changes_none = valid(
        "changes_none",
        "agent",
        Kind.CHANGES,
        encode_changes(batch),
        "CHANGES batch 7 (changes 41..45), codec NONE: byte-exact",
        codec=Codec.NONE,
        changes=batch,
        **batch_header,
    )
    changes_zstd = valid(
        "changes_zstd",
        "agent",
        Kind.CHANGES,
        encode_changes(batch),
        "the same batch with codec ZSTD (level 12, capped tables, as seal() sends it); "
        "its raw body equals changes_none's",
        codec=Codec.ZSTD,
        changes=batch,
        **batch_header,
    )
    valid(
        "ack",
        "hq",
        Kind.ACK,
        ack_body(AGENT.node_id, 7, T0 + 8_000),
        "HQ's ACK of the agent's batches through 7, codec NONE",
        codec=Codec.NONE,
        time=pack(T0 + 8_000, 0),
    )
    feed = feed_changes()
    valid(
        "feed",
        "hq",
        Kind.FEED,
        encode_changes(feed),
        "FEED page signed by HQ: header extras cursor/more/groups as HQ sends them, two "
        "origins, a delete, a null, absent fields, codec NONE",
        codec=Codec.NONE,
        changes=feed,
        count=len(feed),
        time=pack(T0 + 12_500, 0),
        extra={"cursor": 1234, "more": True, "groups": ["group:north"]},
    )

    def invalid(name: str, data: bytes, error: str, description: str, stage: str = "open") -> None:
        files[f"{name}.bin"] = data
        vectors.append(
            {
                "name": name,
                "file": f"{name}.bin",
                "description": description,
                "valid": False,
                "stage": stage,
                "error": error,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )

    def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
        out = bytearray(data)
        out[index] ^= mask
        return bytes(out)

    good = header_of(changes_none)
    raw = bytes.fromhex(vectors[0]["raw_body_hex"])

    invalid("bad_magic", b"FSYX" + changes_none[4:], "BadMagic", "magic is not FSYN")
    invalid("bad_version", flip(changes_none, 4, 0x03), "UnsupportedVersion", "version byte 2")
    invalid("bad_kind", flip(changes_none, 5, 0x0F), "CorruptMessage", "kind byte 14")
    invalid(
        "header_too_long",
        changes_none[:6] + struct.pack(">H", MAX_HEADER_BYTES + 1) + changes_none[8:],
        "Oversize",
        f"header length field {MAX_HEADER_BYTES + 1} > MAX_HEADER_BYTES",
    )
    invalid("truncated", changes_none[:-1], "CorruptMessage", "last byte of the signature cut")
    invalid("truncated_header", changes_none[:20], "CorruptMessage", "cut inside the header")
    invalid("trailing_byte", changes_none + b"\x00", "CorruptMessage", "one byte after the frame")
    invalid(
        "flipped_signature",
        flip(changes_none, len(changes_none) - 1),
        "BadSignature",
        "lowest bit of the signature's last byte flipped",
    )
    invalid(
        "flipped_body",
        flip(changes_zstd, body_offset(changes_zstd) + 5),
        "BadSignature",
        "a byte of the compressed body flipped: caught before decompression",
    )
    invalid(
        "unknown_signer",
        frame(STRANGER, Kind.CHANGES, dict(good, node=STRANGER.node_id), raw),
        "UnknownNode",
        "well-formed and correctly signed by a key nobody enrolled",
    )
    invalid(
        "forged_node",
        frame(STRANGER, Kind.CHANGES, good, raw),
        "BadSignature",
        "claims the agent's node id, signed by another key",
    )
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1 << 20))
    invalid(
        "zstd_bomb",
        frame(AGENT, Kind.CHANGES, dict(good, codec=1, raw=64), bomb),
        "Oversize",
        "signed zstd frame of 1 MiB of zeros under a header declaring raw=64",
    )
    invalid(
        "raw_over_cap",
        frame(AGENT, Kind.CHANGES, dict(good, raw=HARD_MAX_RAW_BYTES + 1), raw),
        "Oversize",
        "header declares a raw length over HARD_MAX_RAW_BYTES: refused before decoding",
    )
    invalid(
        "raw_mismatch",
        frame(AGENT, Kind.CHANGES, dict(good, raw=len(raw) + 1), raw),
        "CorruptMessage",
        "codec NONE body one byte shorter than the header's raw",
    )
    invalid(
        "unknown_codec",
        frame(AGENT, Kind.CHANGES, dict(good, codec=7), raw),
        "CorruptMessage",
        "codec 7",
    )
    invalid(
        "unknown_dictionary",
        frame(AGENT, Kind.CHANGES, dict(good, dict=5), raw),
        "CorruptMessage",
        "zstd dictionary id 5 (v1 knows none)",
    )
    invalid(
        "encrypted",
        frame(AGENT, Kind.CHANGES, dict(good, enc=1), raw),
        "CorruptMessage",
        "field encryption scheme 1 (v1 supports none)",
    )
    missing = {k: v for k, v in good.items() if k != "raw"}
    invalid(
        "header_missing_key",
        frame(AGENT, Kind.CHANGES, missing, raw),
        "CorruptMessage",
        "header without 'raw'",
    )
    # The same header map with one more entry: "seq" again (msgpack's default keeps the last).
    header_bytes = packb(good)
    assert header_bytes[0] == 0x80 | len(good)
    twice = bytes([0x80 | (len(good) + 1)]) + header_bytes[1:] + packb("seq") + packb(8)
    invalid(
        "header_duplicate_key",
        frame_bytes(AGENT, Kind.CHANGES, twice, raw),
        "CorruptMessage",
        "signed; header holds the key 'seq' twice (7, then 8)",
    )
    invalid(
        "header_bytes_key",
        frame(AGENT, Kind.CHANGES, {**good, b"seq": 8}, raw),
        "CorruptMessage",
        "signed; header has an extra whose key is the byte string b'seq'",
    )
    not_columnar = packb({"v": 2, "origins": [], "groups": []})
    invalid(
        "bad_body_version",
        frame(AGENT, Kind.CHANGES, dict(good, raw=len(not_columnar)), not_columnar),
        "CorruptMessage",
        "opens (signature fine) but the columnar body has v=2: refused by decode_changes",
        stage="decode",
    )

    keys = {
        name: {
            "seed_hex": SEEDS[name].hex(),
            "public_key_hex": identity(name).public_key.hex(),
            "node_id": identity(name).node_id,
            "enrolled": name in ENROLLED,
        }
        for name in SEEDS
    }
    manifest = {
        "format": 1,
        "protocol_version": VERSION,
        "generator": "tests/make_vectors.py",
        "limits": {"MAX_HEADER_BYTES": MAX_HEADER_BYTES, "HARD_MAX_RAW_BYTES": HARD_MAX_RAW_BYTES},
        "header_keys": list(HEADER_TYPES),
        "keys": keys,
        "vectors": vectors,
    }
    return files, manifest


def manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    files, manifest = build()
    files["vectors.json"] = manifest_text(manifest).encode("utf-8")
    if args.check:
        stale = [
            name
            for name, data in files.items()
            if not (VECTORS / name).exists() or (VECTORS / name).read_bytes() != data
        ]
        extra = sorted({p.name for p in VECTORS.glob("*")} - set(files))
        for name in stale:
            print(f"differs: {name}")
        for name in extra:
            print(f"not generated: {name}")
        return 1 if stale or extra else 0
    VECTORS.mkdir(exist_ok=True)
    for name, data in files.items():
        (VECTORS / name).write_bytes(data)
    print(f"wrote {len(files)} files to {VECTORS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
