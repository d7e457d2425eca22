"""The HTTP contract: signed requests, the replay window, acks, and the constants both sides share."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_strategies import AGENT, HQ, examples

from protocol import transport
from protocol.errors import BadSignature, ClockDrift, CorruptMessage
from protocol.transport import (
    HEADER_NODE,
    HEADER_SIGNATURE,
    HEADER_TIME,
    REQUEST_WINDOW_MS,
    Ack,
    SignedRequest,
    ack_body,
    b64,
    parse_ack,
    parse_signed_request,
    sign_request,
    unb64,
    verify_request,
)

NOW = 1_700_000_000_000
methods = st.sampled_from(["GET", "get", "POST", "DELETE"])
paths = st.text(min_size=1, max_size=60)
times = st.integers(0, 2**53)


def test_constants() -> None:
    assert (transport.BATCHES_PATH, transport.CHANGES_PATH, transport.ENROLL_PATH) == (
        "/v1/batches",
        "/v1/changes",
        "/v1/enroll",
    )
    assert transport.SEALED_CONTENT_TYPE == "application/x-fieldsync-sealed"
    assert (HEADER_NODE, HEADER_TIME, HEADER_SIGNATURE) == (
        "X-Fieldsync-Node",
        "X-Fieldsync-Time",
        "X-Fieldsync-Signature",
    )
    assert REQUEST_WINDOW_MS == 15 * 60 * 1000


def test_signed_string_is_exactly_the_documented_one() -> None:
    headers = sign_request(AGENT, "get", "/v1/changes?cursor=5&limit=100", NOW)
    assert headers[HEADER_NODE] == AGENT.node_id
    assert headers[HEADER_TIME] == str(NOW)
    signature = unb64(headers[HEADER_SIGNATURE], HEADER_SIGNATURE)
    Ed25519PublicKey.from_public_bytes(AGENT.public_key).verify(
        signature, b"fieldsync-request-v1\nGET\n/v1/changes?cursor=5&limit=100\n1700000000000"
    )


@examples(100)
@given(
    method=methods,
    path=paths,
    sent=times,
    skew=st.integers(-REQUEST_WINDOW_MS, REQUEST_WINDOW_MS),
)
def test_round_trip(method: str, path: str, sent: int, skew: int) -> None:
    request = parse_signed_request(sign_request(AGENT, method, path, sent))
    assert request == SignedRequest(AGENT.node_id, sent, request.signature)
    verify_request(request, AGENT.public_key, method.lower(), path, sent + skew)


@examples(100)
@given(
    method=methods,
    path=paths,
    other_path=paths,
    sent=times,
    delta=st.integers(-REQUEST_WINDOW_MS, REQUEST_WINDOW_MS).filter(bool),
)
def test_tampering_is_bad_signature(
    method: str, path: str, other_path: str, sent: int, delta: int
) -> None:
    request = parse_signed_request(sign_request(AGENT, method, path, sent))
    if other_path != path:
        with pytest.raises(BadSignature):
            verify_request(request, AGENT.public_key, method, other_path, sent)
    with pytest.raises(BadSignature):  # time header changed, still inside the window
        verify_request(
            SignedRequest(request.node_id, sent + delta, request.signature),
            AGENT.public_key,
            method,
            path,
            sent,
        )
    with pytest.raises(BadSignature):
        verify_request(request, AGENT.public_key, "PUT", path, sent)
    with pytest.raises(BadSignature):
        verify_request(request, HQ.public_key, method, path, sent)


@examples(100)
@given(sent=times, late=st.integers(REQUEST_WINDOW_MS + 1, 10**12), sign=st.sampled_from([1, -1]))
def test_stale_or_future_time_is_clock_drift(sent: int, late: int, sign: int) -> None:
    """Checked before the signature: a replayed request is refused however valid its signature."""
    request = parse_signed_request(sign_request(AGENT, "GET", "/v1/changes", sent))
    with pytest.raises(ClockDrift):
        verify_request(request, AGENT.public_key, "GET", "/v1/changes", sent + sign * late)
    with pytest.raises(ClockDrift):  # also with a bad signature: drift is checked first
        verify_request(request, HQ.public_key, "GET", "/v1/changes", sent + sign * late)


def test_window_bound_is_inclusive() -> None:
    request = parse_signed_request(sign_request(AGENT, "GET", "/", NOW))
    verify_request(request, AGENT.public_key, "GET", "/", NOW + REQUEST_WINDOW_MS)
    verify_request(request, AGENT.public_key, "GET", "/", NOW - REQUEST_WINDOW_MS)
    with pytest.raises(ClockDrift):
        verify_request(request, AGENT.public_key, "GET", "/", NOW + REQUEST_WINDOW_MS + 1)


GOOD = sign_request(AGENT, "GET", "/v1/changes", NOW)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {k: v for k, v in GOOD.items() if k != HEADER_NODE},
        {k: v for k, v in GOOD.items() if k != HEADER_TIME},
        {k: v for k, v in GOOD.items() if k != HEADER_SIGNATURE},
    ],
    ids=["none", "no node", "no time", "no signature"],
)
def test_missing_headers_are_bad_signature(headers: dict[str, str]) -> None:
    with pytest.raises(BadSignature):
        parse_signed_request(headers)


@pytest.mark.parametrize(
    "time", ["soon", "", "0123", "+123", " 123", "1_000", "²", "١٢٣", "1" * 20, "-5"]
)
def test_non_canonical_time_is_a_malformed_request(time: str) -> None:
    with pytest.raises(CorruptMessage):
        parse_signed_request({**GOOD, HEADER_TIME: time})


@pytest.mark.parametrize("signature", ["not base64!", "é", "YQ", b64(bytes(63)), b64(bytes(65))])
def test_signature_not_base64_of_64_bytes_is_a_malformed_request(signature: str) -> None:
    with pytest.raises(CorruptMessage):
        parse_signed_request({**GOOD, HEADER_SIGNATURE: signature})


@examples(100)
@given(data=st.binary(max_size=80))
def test_b64_round_trip(data: bytes) -> None:
    assert unb64(b64(data), "x") == data


@pytest.mark.parametrize("text", ["a", "ab=c", "!!!!", "é", "YWJj\n"])
def test_unb64_refuses_non_base64(text: str) -> None:
    with pytest.raises(CorruptMessage, match="base64"):
        unb64(text, "thing")


@examples(100)
@given(node=st.text(max_size=30), through=st.integers(0, 2**63 - 1), hq_time=times)
def test_ack_round_trip(node: str, through: int, hq_time: int) -> None:
    body = ack_body(node, through, hq_time)
    assert body == {"node": node, "acked_through": through, "hq_time": hq_time}
    assert parse_ack(body) == Ack(node, through, hq_time)


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "ack",
        {},
        {"node": "n", "acked_through": 1},
        {"node": "n", "hq_time": 1},
        {"acked_through": 1, "hq_time": 1},
        {"node": 5, "acked_through": 1, "hq_time": 1},
        {"node": "n", "acked_through": "1", "hq_time": 1},
        {"node": "n", "acked_through": 1.0, "hq_time": 1},
        {"node": "n", "acked_through": None, "hq_time": 1},
        {"node": "n", "acked_through": 1, "hq_time": "now"},
        {"node": b"n", "acked_through": 1, "hq_time": 1},
    ],
    ids=repr,
)
def test_parse_ack_refuses_malformed(body: Any) -> None:
    with pytest.raises(CorruptMessage, match="ack"):
        parse_ack(body)


@pytest.mark.parametrize(
    "body",
    [
        {"node": "n", "acked_through": True, "hq_time": 1},
        {"node": "n", "acked_through": 1, "hq_time": False},
        {"node": "n", "acked_through": -1, "hq_time": 1},
    ],
    ids=["acked_through true", "hq_time false", "negative acked_through"],
)
def test_parse_ack_refuses_booleans_and_negatives(body: dict[str, Any]) -> None:
    with pytest.raises(CorruptMessage):
        parse_ack(body)
