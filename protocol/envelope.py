"""Sealed messages: the signed, compressed container every batch, feed page and ack travels in.

Layout (all integers big-endian)::

    magic     4 bytes   b"FSYN"
    version   u8        1
    kind      u8        1 = changes (agent -> HQ), 2 = feed (HQ -> agent), 3 = ack (HQ -> agent)
    hlen      u16       length of the header, at most MAX_HEADER_BYTES
    header    hlen      msgpack map (see HEADER_TYPES)
    blen      u32       length of the body
    body      blen      msgpack, compressed as the header's codec says
    signature 64 bytes  Ed25519 by header["node"] over every byte before it

`open_sealed` checks the frame, finds the signer's key, verifies the signature, and only then
decompresses -- never more than the header's `raw` length, itself capped -- so an unauthenticated
peer cannot make the receiver spend memory or CPU on decompression.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack
import zstandard

from protocol.change import ABSENT
from protocol.errors import (
    BadMagic,
    CorruptMessage,
    Oversize,
    UnknownNode,
    UnsupportedVersion,
)
from protocol.identity import SIGNATURE_BYTES, NodeIdentity, verify

MAGIC = b"FSYN"
VERSION = 1
MAX_HEADER_BYTES = 1024
HARD_MAX_RAW_BYTES = 64 * 1024 * 1024
DEFAULT_ZSTD_LEVEL = 12
# Cap zstd's match-finder tables at 2**17 entries: ~1 MB of compressor state instead of ~6 MB at
# level 12, for <1 % more bytes on a 1,000-record batch (measured) -- memory matters on a laptop.
ZSTD_TABLE_LOG = 17
# A zstd frame may ask its decoder for a window this large, or as large as the declared body:
# the decoder's buffer is then bounded like the body itself (8 MiB covers levels 1-19).
MAX_ZSTD_WINDOW_BYTES = 8 * 1024 * 1024
_PREFIX = struct.Struct(">4sBBH")
_BODY_LEN = struct.Struct(">I")


class Kind(IntEnum):
    CHANGES = 1
    FEED = 2
    ACK = 3


class Codec(IntEnum):
    NONE = 0
    ZSTD = 1


# Required header keys and their types; kinds may add more (e.g. "cursor" on a feed page).
HEADER_TYPES: dict[str, type] = {
    "node": str,  # signer's node id
    "seq": int,  # batch sequence, contiguous per node from 1 (0 for feeds and acks)
    "first": int,  # first change sequence in the body (0 if none)
    "last": int,  # last change sequence in the body (0 if none)
    "count": int,  # number of changes in the body
    "codec": int,  # Codec
    "dict": int,  # zstd dictionary id, 0 = none
    "enc": int,  # field encryption scheme, 0 = none
    "raw": int,  # uncompressed body length in bytes
    "time": int,  # signer's HLC when sealing
}


@dataclass(frozen=True, slots=True)
class Opened:
    kind: Kind
    header: dict[str, Any]
    body: Any
    size: int


def _ext_hook(code: int, data: bytes) -> Any:
    if code == ABSENT.code and data == ABSENT.data:
        return ABSENT
    raise CorruptMessage(f"body: unknown msgpack extension type {code}")


def _no_timestamps_in_list(items: list[Any]) -> list[Any]:
    # msgpack decodes its timestamp extension (-1) natively, never calling ext_hook: refuse it here.
    if msgpack.Timestamp in set(map(type, items)):
        raise CorruptMessage("body: msgpack timestamp extension (-1) is not allowed in v1")
    return items


def _strict_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """Every map decoded: string keys only (strict_map_key lets byte strings through too), each
    once (msgpack keeps the last of a repeated key, another decoder may keep the first: the signed
    bytes would mean two things), and no timestamp extension among the values."""
    items = dict(pairs)
    if len(items) != len(pairs):
        raise CorruptMessage("a map holds the same key twice")
    if items and set(map(type, items)) != {str}:
        raise CorruptMessage("map keys must be strings (a byte-string key is not allowed in v1)")
    if msgpack.Timestamp in set(map(type, items.values())):
        raise CorruptMessage("body: msgpack timestamp extension (-1) is not allowed in v1")
    return items


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes, what: str) -> Any:
    """Strict msgpack decoding of untrusted bytes; any malformation is a CorruptMessage."""
    try:
        # unpackb bounds every container and string by len(data) on its own.
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_ext_hook,
            list_hook=_no_timestamps_in_list,
            object_pairs_hook=_strict_map,
        )
    except CorruptMessage:
        raise
    except (ValueError, msgpack.UnpackException) as e:
        raise CorruptMessage(f"{what}: malformed msgpack ({type(e).__name__})") from e
    if isinstance(value, msgpack.Timestamp):
        raise CorruptMessage(f"{what}: msgpack timestamp extension (-1) is not allowed in v1")
    return value


def seal(
    identity: NodeIdentity,
    kind: Kind,
    body: Any,
    *,
    seq: int = 0,
    first: int = 0,
    last: int = 0,
    count: int = 0,
    time: int = 0,
    codec: Codec = Codec.ZSTD,
    level: int = DEFAULT_ZSTD_LEVEL,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """Encode, compress and sign `body` into one sealed message."""
    reserved = HEADER_TYPES.keys() & (extra or {}).keys()
    if reserved:
        raise ValueError(f"header extras may not replace required keys: {sorted(reserved)}")
    raw = packb(body)
    if len(raw) > HARD_MAX_RAW_BYTES:
        raise Oversize(f"body of {len(raw)} bytes exceeds the {HARD_MAX_RAW_BYTES}-byte cap")
    payload = _compress(raw, level) if codec == Codec.ZSTD else raw
    header = {
        "node": identity.node_id,
        "seq": seq,
        "first": first,
        "last": last,
        "count": count,
        "codec": int(codec),
        "dict": 0,
        "enc": 0,
        "raw": len(raw),
        "time": time,
        **(extra or {}),
    }
    header_bytes = packb(header)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise Oversize(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    signed = b"".join(
        (
            _PREFIX.pack(MAGIC, VERSION, int(kind), len(header_bytes)),
            header_bytes,
            _BODY_LEN.pack(len(payload)),
            payload,
        )
    )
    return signed + identity.sign(signed)


def _compress(raw: bytes, level: int) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(level, source_size=len(raw))
    capped = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(raw),
        hash_log=min(params.hash_log, ZSTD_TABLE_LOG),
        chain_log=min(params.chain_log, ZSTD_TABLE_LOG),
    )
    return zstandard.ZstdCompressor(compression_params=capped).compress(raw)


def read_header(data: bytes) -> tuple[Kind, dict[str, Any], int, int]:
    """Parse and type-check the frame and header, without trusting them: no key, no decompression.

    Returns (kind, header, start of body, end of body). Used by relays and by `open_sealed`.
    """
    if len(data) < _PREFIX.size:
        raise CorruptMessage(f"message truncated: {len(data)} bytes")
    magic, version, kind, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise BadMagic(f"not a fieldsync message (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise UnsupportedVersion(f"protocol version {version} is not supported (this is {VERSION})")
    try:
        message_kind = Kind(kind)
    except ValueError as e:
        raise CorruptMessage(f"unknown message kind {kind}") from e
    if hlen > MAX_HEADER_BYTES:
        raise Oversize(f"header of {hlen} bytes exceeds {MAX_HEADER_BYTES}")
    body_at = _PREFIX.size + hlen + _BODY_LEN.size
    if len(data) < body_at:
        raise CorruptMessage("message truncated inside the header")
    header = unpackb(data[_PREFIX.size : _PREFIX.size + hlen], "header")
    if not isinstance(header, dict):
        raise CorruptMessage("header: expected a map")
    for name, expected in HEADER_TYPES.items():
        value = header.get(name)
        if not isinstance(value, expected) or isinstance(value, bool):
            raise CorruptMessage(f"header: {name!r} must be {expected.__name__}")
        if isinstance(value, int) and value < 0:
            raise CorruptMessage(f"header: {name!r} must not be negative")
    (blen,) = _BODY_LEN.unpack_from(data, body_at - _BODY_LEN.size)
    end = body_at + blen
    if len(data) != end + SIGNATURE_BYTES:
        raise CorruptMessage(
            f"message length {len(data)} does not match its frame ({end + SIGNATURE_BYTES})"
        )
    return message_kind, header, body_at, end


def open_sealed(
    data: bytes,
    public_key_of: Callable[[str], bytes | None],
    *,
    max_raw: int = HARD_MAX_RAW_BYTES,
) -> Opened:
    """Verify and decode a sealed message; raises a typed ProtocolError for every kind of bad input."""
    kind, header, body_at, end = read_header(data)
    public_key = public_key_of(header["node"])
    if public_key is None:
        raise UnknownNode(f"node {header['node']} is not enrolled here (or was revoked)")
    verify(public_key, data[end:], data[:end])
    raw_len = header["raw"]
    if raw_len > min(max_raw, HARD_MAX_RAW_BYTES):
        raise Oversize(f"declared body size {raw_len} exceeds {min(max_raw, HARD_MAX_RAW_BYTES)}")
    raw = _decompress(header, data[body_at:end], raw_len)
    return Opened(kind, header, unpackb(raw, "body"), len(data))


def _decompress(header: dict[str, Any], payload: bytes, raw_len: int) -> bytes:
    codec = header["codec"]
    if header["dict"] != 0:
        raise CorruptMessage(f"zstd dictionary {header['dict']} is not known here")
    if header["enc"] != 0:
        raise CorruptMessage(f"field encryption scheme {header['enc']} is not supported")
    if codec == Codec.NONE:
        raw = payload
    elif codec == Codec.ZSTD:
        raw = _bounded_zstd(payload, raw_len)
    else:
        raise CorruptMessage(f"unknown codec {codec}")
    if len(raw) != raw_len:
        raise CorruptMessage(f"body is {len(raw)} bytes once decoded, header says {raw_len}")
    return raw


def _bounded_zstd(payload: bytes, raw_len: int) -> bytes:
    """Decompress at most raw_len + 1 bytes: a bomb is cut off at the declared size, never expanded.

    The frame header is read first: a window over max(MAX_ZSTD_WINDOW_BYTES, raw_len) would make
    the decoder allocate more than the body it declares (Oversize), and a dictionary is not known
    here (CorruptMessage)."""
    try:
        frame = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise CorruptMessage(f"body: not a zstd frame ({e})") from e
    if frame.window_size > max(MAX_ZSTD_WINDOW_BYTES, raw_len):
        raise Oversize(
            f"body: zstd window of {frame.window_size} bytes exceeds "
            f"{max(MAX_ZSTD_WINDOW_BYTES, raw_len)} (the larger of {MAX_ZSTD_WINDOW_BYTES} and "
            "the declared body size)"
        )
    if frame.dict_id != 0:
        raise CorruptMessage(f"body: the zstd frame needs dictionary {frame.dict_id}")
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(payload)) as reader:
            while len(out) <= raw_len:
                chunk = reader.read(raw_len + 1 - len(out))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as e:
        raise CorruptMessage(f"body: corrupt zstd data ({e})") from e
    if len(out) > raw_len:
        raise Oversize(f"body decompresses to more than the declared {raw_len} bytes")
    return bytes(out)
