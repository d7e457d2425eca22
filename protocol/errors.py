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
    ├── ClockDrift                (400) a timestamp too far ahead of the receiver's clock
    └── InvalidChange             (422) a well-formed batch holding a change both sides refuse
                                        (a name, key, size or value; protocol.limits)
"""

from __future__ import annotations

from typing import Any


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


class InvalidChange(ProtocolError):
    """A change of a well-formed, authentic batch breaks a rule of protocol.limits (or a declared
    type of its collection): the batch is refused whole, and nothing of it is stored.

    `batch` (batch sequence), `change` (change sequence), `rule` and `field` say which; `details`
    is the same as a JSON-ready map."""

    code = "invalid_change"
    http_status = 422

    def __init__(
        self, message: str, *, batch: int, change: int, rule: str, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.batch = batch
        self.change = change
        self.rule = rule
        self.field = field

    @property
    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"batch": self.batch, "change": self.change, "rule": self.rule}
        if self.field is not None:
            out["field"] = self.field
        return out
