"""Sealed messages: round trips, and every kind of bad input refused with a typed ProtocolError.

The promise under test: `open_sealed` either returns exactly what was sealed or raises a
`ProtocolError` subclass -- never another exception, never a wrong success -- and it checks the
frame, the signer and the signature before it spends anything on decompression.
"""

from __future__ import annotations

import contextlib
import struct
import time
import tracemalloc
from functools import cache
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import assume, given
from hypothesis import strategies as st
from test_protocol_strategies import (
    AGENT,
    HQ,
    STRANGER,
    U64,
    body_offset,
    canon,
    changes,
    examples,
    frame,
    grouped,
    header_for,
    json_values,
    lookup,
)

from protocol.change import ABSENT, Change, decode_changes, encode_changes
from protocol.envelope import (
    HARD_MAX_RAW_BYTES,
    HEADER_TYPES,
    MAGIC,
    MAX_HEADER_BYTES,
    VERSION,
    Codec,
    Kind,
    open_sealed,
    packb,
    read_header,
    seal,
)
from protocol.errors import (
    BadMagic,
    BadSignature,
    CorruptMessage,
    Oversize,
    ProtocolError,
    UnknownNode,
    UnsupportedVersion,
)

codecs = st.sampled_from(list(Codec))
kinds = st.sampled_from(list(Kind))
extras = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in HEADER_TYPES), json_values, max_size=3
)


@st.composite
def sealed_batches(draw: st.DrawFn) -> bytes:
    """A valid sealed CHANGES/FEED/ACK message from the agent, with arbitrary content."""
    batch = draw(changes(max_size=6))
    return seal(
        AGENT,
        draw(kinds),
        encode_changes(batch),
        seq=draw(st.integers(0, 2**32)),
        count=len(batch),
        codec=draw(codecs),
        level=1,
    )


# -- round trips --------------------------------------------------------------------------------


@examples(100)
@given(
    batch=changes(),
    kind=st.sampled_from([Kind.CHANGES, Kind.FEED]),
    codec=codecs,
    numbers=st.tuples(U64, U64, U64, U64, U64),
    extra=extras,
)
def test_changes_round_trip(
    batch: list[Change],
    kind: Kind,
    codec: Codec,
    numbers: tuple[int, int, int, int, int],
    extra: dict[str, Any],
) -> None:
    seq, first, last, count, hlc = numbers
    data = seal(
        AGENT,
        kind,
        encode_changes(batch),
        seq=seq,
        first=first,
        last=last,
        count=count,
        time=hlc,
        codec=codec,
        extra=extra,
    )
    opened = open_sealed(data, lookup)
    assert opened.kind is kind
    assert opened.size == len(data)
    assert opened.header == {
        "node": AGENT.node_id,
        "seq": seq,
        "first": first,
        "last": last,
        "count": count,
        "codec": int(codec),
        "dict": 0,
        "enc": 0,
        "raw": len(packb(encode_changes(batch))),
        "time": hlc,
        **extra,
    }
    assert canon(decode_changes(opened.body)) == canon(grouped(batch))


@examples(100)
@given(
    body=json_values | st.binary(max_size=64), codec=codecs, level=st.integers(1, 19), kind=kinds
)
def test_any_body_round_trips(body: Any, codec: Codec, level: int, kind: Kind) -> None:
    opened = open_sealed(seal(HQ, kind, body, codec=codec, level=level), lookup)
    assert canon(opened.body) == canon(body)


def test_seal_is_deterministic_with_codec_none() -> None:
    body = {"v": 1, "origins": [], "groups": []}
    assert seal(AGENT, Kind.CHANGES, body, codec=Codec.NONE) == seal(
        AGENT, Kind.CHANGES, body, codec=Codec.NONE
    )


def test_read_header_needs_no_key() -> None:
    """Relays route on read_header() alone: no key lookup, no decompression."""
    data = seal(AGENT, Kind.CHANGES, [1, 2, 3], seq=9, first=4, last=6, count=3)
    kind, header, start, end = read_header(data)
    assert kind is Kind.CHANGES
    assert (header["node"], header["seq"], header["first"], header["last"]) == (
        AGENT.node_id,
        9,
        4,
        6,
    )
    assert end - start == struct.unpack_from(">I", data, start - 4)[0]
    assert len(data) == end + 64


# -- damaged messages ---------------------------------------------------------------------------


@examples(200)
@given(data=sealed_batches(), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_flipped_byte_is_refused(data: bytes, where: float, mask: int) -> None:
    index = int(where * len(data))
    damaged = bytearray(data)
    damaged[index] ^= mask
    with pytest.raises(ProtocolError) as caught:
        open_sealed(bytes(damaged), lookup)
    body_at = body_offset(data)
    end = len(data) - 64
    if index < 4:
        assert type(caught.value) is BadMagic
    elif index == 4:
        assert type(caught.value) is UnsupportedVersion
    elif index >= end or body_at <= index < end:
        # signature or body bytes: the frame still parses, the signature cannot match
        assert type(caught.value) is BadSignature


@examples(100)
@given(data=sealed_batches(), where=st.floats(0, 1, exclude_max=True))
def test_any_truncation_is_corrupt(data: bytes, where: float) -> None:
    cut = data[: int(where * len(data))]
    with pytest.raises(CorruptMessage):
        open_sealed(cut, lookup)
    with pytest.raises(CorruptMessage):
        read_header(cut)


@examples(50)
@given(data=sealed_batches(), tail=st.binary(min_size=1, max_size=70))
def test_trailing_bytes_are_corrupt(data: bytes, tail: bytes) -> None:
    with pytest.raises(CorruptMessage):
        open_sealed(data + tail, lookup)


@examples(300)
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        open_sealed(data, lookup)


@examples(300)
@given(rest=st.binary(max_size=2048), kind=st.integers(0, 255))
def test_random_bytes_after_magic_and_version_are_refused(rest: bytes, kind: int) -> None:
    with pytest.raises(ProtocolError):
        open_sealed(MAGIC + bytes([VERSION, kind]) + rest, lookup)


header_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=30),
    st.binary(max_size=8),
    st.lists(st.integers(-5, 5), max_size=2),
)


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """Frames that get past the magic: a msgpack header with the required keys of random types."""
    header: dict[str, Any] = {}
    for name, kind in HEADER_TYPES.items():
        if draw(st.integers(0, 9)) == 0:
            continue  # sometimes missing
        if name == "node":
            header[name] = draw(st.sampled_from([AGENT.node_id, STRANGER.node_id]) | header_values)
        elif kind is int and draw(st.booleans()):
            header[name] = draw(st.integers(0, 100))
        else:
            header[name] = draw(header_values)
    payload = draw(st.binary(max_size=300))
    signer = draw(st.sampled_from([AGENT, STRANGER, None]))
    return frame(signer, draw(st.integers(0, 4)), header, payload)


@examples(300)
@given(data=plausible_frames())
def test_plausible_frames_are_refused(data: bytes) -> None:
    """Random header types, random payloads, real or zero signatures: only ProtocolErrors.

    A frame whose header happens to be well-typed and is signed by the agent is a legitimate
    message; then only its payload can be wrong, and the decode must say so in a ProtocolError.
    """
    try:
        opened = open_sealed(data, lookup)
    except ProtocolError:
        return
    with contextlib.suppress(CorruptMessage):
        decode_changes(opened.body)


@examples(300)
@given(
    payload=st.binary(max_size=400),
    codec=st.integers(0, 3),
    raw=st.integers(0, 600),
    dict_id=st.sampled_from([0, 0, 0, 1]),
    enc=st.sampled_from([0, 0, 0, 1]),
)
def test_signed_garbage_is_refused_cleanly(
    payload: bytes, codec: int, raw: int, dict_id: int, enc: int
) -> None:
    """An enrolled but buggy peer: a valid signature over any payload/codec/raw combination."""
    if codec == Codec.ZSTD and raw and payload:
        payload = zstandard.ZstdCompressor(level=1).compress(payload)  # also: real zstd frames
    header = header_for(AGENT, codec=codec, raw=raw, dict=dict_id, enc=enc)
    data = frame(AGENT, Kind.CHANGES, header, payload)
    try:
        opened = open_sealed(data, lookup)
    except ProtocolError:
        return
    assert (dict_id, enc) == (0, 0)
    assert codec in (0, 1)
    with contextlib.suppress(CorruptMessage):
        decode_changes(opened.body)


# -- verification order, signer, signature --------------------------------------------------------


def test_unknown_node() -> None:
    data = seal(STRANGER, Kind.CHANGES, encode_changes([]))
    with pytest.raises(UnknownNode):
        open_sealed(data, lookup)


@pytest.mark.parametrize(
    "wrong_key",
    [STRANGER.public_key, HQ.public_key, bytes(32), b"short"],
    ids=["other node", "hq", "zeros", "bad length"],
)
def test_wrong_key_is_bad_signature(wrong_key: bytes) -> None:
    data = seal(AGENT, Kind.CHANGES, encode_changes([]))
    with pytest.raises(BadSignature):
        open_sealed(data, lambda node: wrong_key)


def test_forged_node_claim_is_bad_signature() -> None:
    """A message that names the agent as signer but is signed by someone else."""
    raw = packb(encode_changes([]))
    data = frame(STRANGER, Kind.CHANGES, header_for(AGENT, raw=len(raw)), raw)
    with pytest.raises(BadSignature):
        open_sealed(data, lookup)


def test_kind_is_covered_by_the_signature() -> None:
    data = bytearray(seal(AGENT, Kind.CHANGES, encode_changes([])))
    data[5] = Kind.FEED
    with pytest.raises(BadSignature):
        open_sealed(bytes(data), lookup)


@cache
def bomb() -> bytes:
    """One zstd frame of 256 MiB of zeros: about 8 KiB on the wire."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(1 << 20)
    return b"".join([*(compressor.compress(zeros) for _ in range(256)), compressor.flush()])


@examples(40)
@given(raw=st.integers(0, 4096))
def test_decompression_bomb_stops_at_the_declared_size(raw: int) -> None:
    data = frame(AGENT, Kind.CHANGES, header_for(AGENT, codec=1, raw=raw), bomb())
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises((Oversize, CorruptMessage)):
            open_sealed(data, lookup)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 1 << 20, f"{peak} bytes allocated to refuse a bomb declared as {raw} bytes"


def test_bomb_under_a_large_declared_size_is_still_bounded() -> None:
    """Declared 8 MiB: at most 8 MiB + 1 is inflated before the refusal, never 256 MiB."""
    declared = 8 << 20
    data = frame(AGENT, Kind.CHANGES, header_for(AGENT, codec=1, raw=declared), bomb())
    tracemalloc.start()
    try:
        with pytest.raises(Oversize):
            open_sealed(data, lookup)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * declared


def test_max_raw_argument_lowers_the_cap() -> None:
    data = seal(AGENT, Kind.CHANGES, "x" * 1000)
    assert open_sealed(data, lookup, max_raw=1003).body == "x" * 1000
    with pytest.raises(Oversize):
        open_sealed(data, lookup, max_raw=1002)
    with pytest.raises(Oversize):  # the hard cap wins over a larger max_raw
        open_sealed(
            frame(AGENT, 1, header_for(AGENT, raw=HARD_MAX_RAW_BYTES + 1), b""),
            lookup,
            max_raw=HARD_MAX_RAW_BYTES * 2,
        )


def test_seal_refuses_a_body_over_the_hard_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("protocol.envelope.HARD_MAX_RAW_BYTES", 100)
    with pytest.raises(Oversize):
        seal(AGENT, Kind.CHANGES, "x" * 100)


# Each defect, and the error that the documented order makes it report.
DEFECTS = ["magic", "version", "kind", "hlen", "header", "frame", "node", "signature", "raw"]
ERROR_OF: dict[str, tuple[type[ProtocolError], str]] = {
    "magic": (BadMagic, "magic"),
    "version": (UnsupportedVersion, "version 2"),
    "kind": (CorruptMessage, "kind 99"),
    "hlen": (Oversize, "header of 1025 bytes"),
    "header": (CorruptMessage, "'seq' must not be negative"),
    "frame": (CorruptMessage, "does not match its frame"),
    "node": (UnknownNode, "not enrolled"),
    "signature": (BadSignature, "signature"),
    "raw": (Oversize, "declared body size"),
}


def defective(defects: set[str]) -> bytes:
    header = header_for(AGENT, codec=1, raw=HARD_MAX_RAW_BYTES + 1 if "raw" in defects else 64)
    if "node" in defects:
        header["node"] = STRANGER.node_id
    if "header" in defects:
        header["seq"] = -1
    data = bytearray(frame(AGENT, Kind.CHANGES, header, bomb()))
    if "signature" in defects:
        data[-1] ^= 1
    if "frame" in defects:
        data += b"\x00"
    if "hlen" in defects:
        data[6:8] = struct.pack(">H", MAX_HEADER_BYTES + 1)
    if "kind" in defects:
        data[5] = 99
    if "version" in defects:
        data[4] = 2
    if "magic" in defects:
        data[0:4] = b"XXXX"
    return bytes(data)


@examples(150)
@given(defects=st.sets(st.sampled_from(DEFECTS), min_size=1))
def test_verification_order(defects: set[str]) -> None:
    """prefix -> header -> frame length -> signer -> signature -> size bound: the first defect in
    docs/protocol.md's order is the one reported.

    The payload is the 256 MiB bomb throughout: nothing is decompressed before the signature and
    the raw bound are checked.
    """
    error, message = ERROR_OF[min(defects, key=DEFECTS.index)]
    with pytest.raises(ProtocolError, match=message) as caught:
        open_sealed(defective(defects), lookup)
    assert type(caught.value) is error, caught.value


def test_after_the_signature_raw_must_match() -> None:
    raw = packb("hello")
    for codec, payload in ((0, raw), (1, zstandard.ZstdCompressor().compress(raw))):
        for declared in (len(raw) - 1, len(raw) + 1):
            data = frame(AGENT, 1, header_for(AGENT, codec=codec, raw=declared), payload)
            with pytest.raises((CorruptMessage, Oversize)):
                open_sealed(data, lookup)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"codec": 2}, "unknown codec 2"),
        ({"dict": 1}, "zstd dictionary 1"),
        ({"enc": 1}, "field encryption scheme 1"),
    ],
)
def test_v1_leaves_no_room_for_codecs_dictionaries_or_encryption(
    change: dict[str, int], error: str
) -> None:
    raw = packb("hello")
    data = frame(AGENT, 1, header_for(AGENT, raw=len(raw), **change), raw)
    with pytest.raises(CorruptMessage, match=error):
        open_sealed(data, lookup)


# -- headers -------------------------------------------------------------------------------------


MISSING = object()
BAD_HEADER_VALUES: dict[type, list[Any]] = {
    str: [MISSING, None, True, 7, 1.5, b"n", ["n"]],
    int: [MISSING, None, True, False, -1, 1.5, "7", b"\x07", [1], {"n": 1}],
}


@pytest.mark.parametrize(
    ("name", "value"),
    [(name, v) for name, kind in HEADER_TYPES.items() for v in BAD_HEADER_VALUES[kind]],
    ids=lambda v: "missing" if v is MISSING else repr(v),
)
def test_header_key_types_are_checked(name: str, value: Any) -> None:
    header = header_for(AGENT)
    if value is MISSING:
        del header[name]
    else:
        header[name] = value
    with pytest.raises(CorruptMessage, match=repr(name)):
        read_header(frame(AGENT, 1, header, b""))


@pytest.mark.parametrize("header", [[1, 2], "node", 7, None], ids=repr)
def test_header_must_be_a_map(header: Any) -> None:
    with pytest.raises(CorruptMessage):
        read_header(frame(AGENT, 1, header, b""))


def test_header_bytes_must_be_one_msgpack_map() -> None:
    good = packb(header_for(AGENT))
    for header_bytes in (good + b"\xc0", good[:-1], b"\xc1", b""):
        with pytest.raises(CorruptMessage):
            read_header(frame(AGENT, 1, header_bytes, b""))


def test_header_size_limit_on_both_sides() -> None:
    """A header of exactly MAX_HEADER_BYTES is fine; one byte more is Oversize, sealing or opening."""
    overhead = len(packb(header_for(AGENT, codec=1, raw=len(packb(None)), pad="")))
    pad = "x" * (MAX_HEADER_BYTES - overhead - 2)  # str8 header: two more bytes than a fixstr
    data = seal(AGENT, Kind.FEED, None, first=1, last=1, count=1, seq=1, extra={"pad": pad})
    assert body_offset(data) - 12 == MAX_HEADER_BYTES
    assert open_sealed(data, lookup).header["pad"] == pad
    with pytest.raises(Oversize):
        seal(AGENT, Kind.FEED, None, first=1, last=1, count=1, seq=1, extra={"pad": pad + "x"})
    big = packb(header_for(AGENT, pad=pad + "x"))
    assert len(big) == MAX_HEADER_BYTES + 1
    with pytest.raises(Oversize):
        open_sealed(frame(AGENT, 1, big, b""), lookup)


@examples(50)
@given(hlen=st.integers(MAX_HEADER_BYTES + 1, 0xFFFF), rest=st.binary(max_size=64))
def test_oversize_header_length_is_refused_before_reading_it(hlen: int, rest: bytes) -> None:
    data = MAGIC + bytes([VERSION, Kind.CHANGES]) + struct.pack(">H", hlen) + rest
    with pytest.raises(Oversize):
        open_sealed(data, lookup)


def test_unknown_header_keys_are_kept() -> None:
    data = seal(HQ, Kind.FEED, None, extra={"cursor": 17, "more": False})
    header = open_sealed(data, lookup).header
    assert (header["cursor"], header["more"]) == (17, False)


# -- msgpack extension types ----------------------------------------------------------------------


def test_absent_marker_is_the_only_known_extension() -> None:
    raw = packb([ABSENT])
    assert open_sealed(frame(AGENT, 1, header_for(AGENT, raw=len(raw)), raw), lookup).body == [
        ABSENT
    ]
    for ext in (msgpack.ExtType(1, b"x"), msgpack.ExtType(2, b""), msgpack.ExtType(127, b"")):
        raw = packb([ext])
        data = frame(AGENT, 1, header_for(AGENT, raw=len(raw)), raw)
        with pytest.raises(CorruptMessage, match="extension"):
            open_sealed(data, lookup)


def test_timestamp_extension_is_refused() -> None:
    raw = packb({"v": 1, "when": msgpack.Timestamp(1, 0)})
    data = frame(AGENT, 1, header_for(AGENT, raw=len(raw)), raw)
    with pytest.raises(CorruptMessage):
        open_sealed(data, lookup)


@pytest.mark.parametrize("key", ["node", "raw", "codec"])
def test_seal_refuses_extras_that_shadow_required_keys(key: str) -> None:
    with pytest.raises(ValueError, match=key):
        seal(
            AGENT, Kind.CHANGES, None, extra={key: {"node": HQ.node_id, "raw": 0, "codec": 7}[key]}
        )


@examples(30)
@given(batch=changes(max_size=4), split=st.floats(0, 1))
def test_body_split_in_two_zstd_frames_opens(batch: list[Change], split: float) -> None:
    """Documented leniency: the receiver reads concatenated zstd frames as one stream."""
    raw = packb(encode_changes(batch))
    cut = int(split * len(raw))
    compressor = zstandard.ZstdCompressor(level=1)
    payload = compressor.compress(raw[:cut]) + compressor.compress(raw[cut:])
    data = frame(AGENT, 1, header_for(AGENT, codec=1, raw=len(raw)), payload)
    assume(len(payload) > 0)
    assert canon(decode_changes(open_sealed(data, lookup).body)) == canon(grouped(batch))
