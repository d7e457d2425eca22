"""Typed protocol errors.

Every way a sealed message can be refused has its own class, so HQ can answer with a precise 4xx and
the agent can tell a permanent refusal from a transient failure::

    ProtocolError                 (400) anything wrong with bytes received from a peer
    ├── BadMagic                  (400) not a fieldsync message at all
    ├── UnsupportedVersion        (400) a version this build does not speak
    ├── CorruptMessage            (400) truncated, trailing bytes, malformed header or body
    ├── Oversize                  (413) header, body or decompressed size over a bound
    ├── UnknownNode               (403) signer not enrolled (or revoked)
    ├── BadSignature              (401) signature does not match the signer's key
    └── ClockDrift                (400) a timestamp too far ahead of the receiver's clock
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: the peer sent something this side must refuse."""

    code = "protocol_error"
    http_status = 400


class BadMagic(ProtocolError):
    code = "bad_magic"


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class CorruptMessage(ProtocolError):
    code = "corrupt"


class Oversize(ProtocolError):
    code = "oversize"
    http_status = 413


class UnknownNode(ProtocolError):
    code = "unknown_node"
    http_status = 403


class BadSignature(ProtocolError):
    code = "bad_signature"
    http_status = 401


class ClockDrift(ProtocolError):
    code = "clock_drift"
