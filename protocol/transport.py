"""The HTTP contract between agent and HQ: paths, headers, signed requests, acks and feed pages.

Both sides import this module, so a path or a header name is written once.

- `POST /v1/batches`   body: a sealed CHANGES message. 200 + sealed ACK; 409 + JSON
  {"error": "gap", "expected": N} on a sequence gap; 4xx + JSON {"error": code, "message": ...}.
- `GET /v1/changes?cursor=N&limit=M`  signed request (headers below). 200 + sealed FEED signed by HQ,
  header extras {"cursor": next cursor, "more": bool, "groups": [str]}.
- `POST /v1/enroll`    JSON {"token", "public_key" (base64), "name"} -> JSON {"node_id", "name",
  "hq_node_id", "hq_public_key" (base64), "hq_time" (HQ's wall clock, ms), "groups"}.

docs/protocol.md section 9 is the full contract (answers, error codes, the order of checks).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

from protocol.errors import BadSignature, ClockDrift, CorruptMessage
from protocol.identity import SIGNATURE_BYTES, NodeIdentity, verify

BATCHES_PATH = "/v1/batches"
CHANGES_PATH = "/v1/changes"
ENROLL_PATH = "/v1/enroll"
SEALED_CONTENT_TYPE = "application/x-fieldsync-sealed"
HEADER_NODE = "X-Fieldsync-Node"
HEADER_TIME = "X-Fieldsync-Time"
HEADER_SIGNATURE = "X-Fieldsync-Signature"
REQUEST_WINDOW_MS = 15 * 60 * 1000
# The request time exactly as sign_request writes it: str() of a non-negative int64.
_CANONICAL_TIME = re.compile(r"0|[1-9][0-9]{0,18}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise CorruptMessage(f"{what}: not valid base64") from e


def _request_bytes(method: str, path_qs: str, time_ms: int) -> bytes:
    return f"fieldsync-request-v1\n{method.upper()}\n{path_qs}\n{time_ms}".encode()


def sign_request(identity: NodeIdentity, method: str, path_qs: str, time_ms: int) -> dict[str, str]:
    """Headers that authenticate a body-less request (the sealed body authenticates a POST)."""
    signature = identity.sign(_request_bytes(method, path_qs, time_ms))
    return {
        HEADER_NODE: identity.node_id,
        HEADER_TIME: str(time_ms),
        HEADER_SIGNATURE: b64(signature),
    }


@dataclass(frozen=True)
class SignedRequest:
    node_id: str
    time_ms: int
    signature: bytes


def parse_signed_request(headers: Any) -> SignedRequest:
    """The three signature headers, parsed. A missing one is BadSignature (401: the request is not
    authenticated); one that is present but malformed is CorruptMessage (400: a malformed
    request): a time that is not canonical decimal (ASCII digits, no sign, no leading zero, at
    most 19 digits), a signature that is not base64 of exactly SIGNATURE_BYTES bytes."""
    missing = [h for h in (HEADER_NODE, HEADER_TIME, HEADER_SIGNATURE) if h not in headers]
    if missing:
        raise BadSignature(
            f"request must carry {HEADER_NODE}, {HEADER_TIME} and {HEADER_SIGNATURE} headers "
            f"(missing: {', '.join(missing)})"
        )
    time_text = headers[HEADER_TIME]
    if _CANONICAL_TIME.fullmatch(time_text) is None:
        raise CorruptMessage(
            f"{HEADER_TIME} must be milliseconds since the epoch in canonical decimal "
            "(ASCII digits, no sign, no leading zero, at most 19 digits)"
        )
    signature = unb64(headers[HEADER_SIGNATURE], HEADER_SIGNATURE)
    if len(signature) != SIGNATURE_BYTES:
        raise CorruptMessage(
            f"{HEADER_SIGNATURE} must be base64 of a {SIGNATURE_BYTES}-byte Ed25519 signature, "
            f"got {len(signature)} bytes"
        )
    return SignedRequest(headers[HEADER_NODE], int(time_text), signature)


def verify_request(
    request: SignedRequest, public_key: bytes, method: str, path_qs: str, now_ms: int
) -> None:
    """Check a signed request's signature and that its time is within the replay window."""
    if abs(now_ms - request.time_ms) > REQUEST_WINDOW_MS:
        raise ClockDrift(
            f"request time is {(request.time_ms - now_ms) // 1000} s from HQ's clock "
            f"(limit {REQUEST_WINDOW_MS // 1000} s); fix the node's clock"
        )
    verify(public_key, request.signature, _request_bytes(method, path_qs, request.time_ms))


def ack_body(node_id: str, acked_through: int, hq_time_ms: int) -> dict[str, Any]:
    return {"node": node_id, "acked_through": acked_through, "hq_time": hq_time_ms}


@dataclass(frozen=True)
class Ack:
    node_id: str
    acked_through: int
    hq_time_ms: int


def parse_ack(body: Any) -> Ack:
    if not isinstance(body, dict):
        raise CorruptMessage("ack: expected a map")
    node, through, hq_time = body.get("node"), body.get("acked_through"), body.get("hq_time")
    if (
        not isinstance(node, str)
        or type(through) is not int
        or type(hq_time) is not int
        or through < 0
        or hq_time < 0
    ):
        raise CorruptMessage(
            "ack: needs node (str), acked_through and hq_time (non-negative integers)"
        )
    return Ack(node, through, hq_time)
