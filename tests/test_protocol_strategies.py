"""Shared Hypothesis settings, strategies and helpers for the tests/test_protocol_*.py suites.

No tests of its own. Example counts are moderate so the whole protocol suite runs in well under 30 s;
`FIELDSYNC_HYPOTHESIS_SCALE=20 pytest tests/test_protocol_*.py` runs twenty times as many examples
for a deeper search. Deadlines are off: Ed25519 and zstd make example times uneven.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from protocol.change import OPS, Change
from protocol.envelope import MAGIC, VERSION, packb
from protocol.identity import NodeIdentity

settings.register_profile(
    "fieldsync-protocol",
    max_examples=100,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the work tree; failures print a reproduce blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
BASE = settings.get_profile("fieldsync-protocol")
SCALE = float(os.environ.get("FIELDSYNC_HYPOTHESIS_SCALE", "1"))


def examples(n: int) -> settings:
    """The protocol profile with `n` examples (times FIELDSYNC_HYPOTHESIS_SCALE)."""
    return settings(BASE, max_examples=max(1, int(n * SCALE)))


# Fixed test identities (the same seeds as tests/make_vectors.py).
AGENT = NodeIdentity(Ed25519PrivateKey.from_private_bytes(bytes(range(0, 32))))
HQ = NodeIdentity(Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64))))
STRANGER = NodeIdentity(Ed25519PrivateKey.from_private_bytes(bytes(range(96, 128))))
ENROLLED = {AGENT.node_id: AGENT.public_key, HQ.node_id: HQ.public_key}


def lookup(node_id: str) -> bytes | None:
    return ENROLLED.get(node_id)


INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
U64 = st.integers(min_value=0, max_value=2**64 - 1)
# HLCs below 2**63 (physical ms below 2**47: until the year 6429). The columnar body delta-encodes
# them as msgpack integers, which cannot hold a difference below -2**63: see docs/protocol.md.
HLCS = st.integers(min_value=0, max_value=2**63 - 1)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
# Arbitrary JSON-like values: scalars, nested lists and string-keyed maps.
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
origin_ids = st.one_of(
    st.sampled_from([AGENT.node_id, HQ.node_id, STRANGER.node_id]), st.text(max_size=30)
)


@st.composite
def changes(draw: st.DrawFn, max_size: int = 10) -> list[Change]:
    """Arbitrary changes: several collections and origins, upserts with JSON-like values, deletes."""
    collections = draw(st.lists(st.text(max_size=12), min_size=1, max_size=3, unique=True))
    origins = draw(st.lists(origin_ids, min_size=1, max_size=3, unique=True))
    names = draw(st.lists(st.text(max_size=8), min_size=1, max_size=5, unique=True))
    out = []
    for _ in range(draw(st.integers(0, max_size))):
        op = draw(st.sampled_from(OPS))
        fields = (
            {} if op == "delete" else draw(st.dictionaries(st.sampled_from(names), json_values))
        )
        out.append(
            Change(
                collection=draw(st.sampled_from(collections)),
                key=draw(st.text(max_size=16)),
                op=op,
                fields=fields,
                hlc=draw(HLCS),
                parent=draw(st.one_of(st.just(0), HLCS)),
                origin=draw(st.sampled_from(origins)),
                seq=draw(st.integers(1, 2**63 - 1)),
            )
        )
    return out


def grouped(changes: list[Change]) -> list[Change]:
    """The order decode_changes returns: by collection in order of first appearance, then as sent."""
    first: dict[str, int] = {}
    for change in changes:
        first.setdefault(change.collection, len(first))
    return sorted(changes, key=lambda c: first[c.collection])


def canon(value: Any) -> Any:
    """A type-exact form for comparisons (1 != 1.0 != True, 0.0 != -0.0; list order matters)."""
    if isinstance(value, bool) or value is None:
        return (type(value).__name__, value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", value.hex() if math.isfinite(value) else repr(value))
    if isinstance(value, str | bytes):
        return (type(value).__name__, value)
    if isinstance(value, list | tuple):
        return ("list", [canon(v) for v in value])
    if isinstance(value, dict):  # maps compare without order: the wire keeps no field order
        return ("map", sorted(((canon(k), canon(v)) for k, v in value.items()), key=repr))
    if isinstance(value, Change):
        return ("change", [canon(getattr(value, f)) for f in Change.__dataclass_fields__])
    return (type(value).__name__, repr(value))


def frame(signer: NodeIdentity | None, kind: int, header: Any, payload: bytes) -> bytes:
    """A v1 frame written by hand (any header, any payload), signed by `signer` or zero-signed."""
    header_bytes = header if isinstance(header, bytes) else packb(header)
    signed = (
        struct.pack(">4sBBH", MAGIC, VERSION, kind, len(header_bytes))
        + header_bytes
        + struct.pack(">I", len(payload))
        + payload
    )
    return signed + (signer.sign(signed) if signer else bytes(64))


def header_for(signer: NodeIdentity, **overrides: Any) -> dict[str, Any]:
    """A well-typed header in seal()'s key order, with `overrides` applied."""
    header: dict[str, Any] = {
        "node": signer.node_id,
        "seq": 1,
        "first": 1,
        "last": 1,
        "count": 1,
        "codec": 0,
        "dict": 0,
        "enc": 0,
        "raw": 0,
        "time": 0,
    }
    header.update(overrides)
    return header


def body_offset(data: bytes) -> int:
    (hlen,) = struct.unpack_from(">H", data, 6)
    return 8 + hlen + 4
