"""Node identity: node id derivation, signatures, and private key files."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_protocol_strategies import AGENT, HQ, examples

from protocol.errors import BadSignature
from protocol.identity import NodeIdentity, node_id_for, verify


@examples(200)
@given(public_key=st.binary(min_size=32, max_size=32))
def test_node_id_derivation(public_key: bytes) -> None:
    node_id = node_id_for(public_key)
    assert re.fullmatch(r"n[a-z2-7]{26}", node_id)
    digest = hashlib.sha256(public_key).digest()
    assert node_id == "n" + base64.b32encode(digest).decode().lower()[:26]


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_node_id_needs_a_32_byte_key(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        node_id_for(bytes(size))


@examples(50)
@given(data=st.binary(max_size=200), flip=st.integers(0, 63 * 8))
def test_verify(data: bytes, flip: int) -> None:
    signature = AGENT.sign(data)
    verify(AGENT.public_key, signature, data)
    damaged = bytearray(signature)
    damaged[flip // 8] ^= 1 << (flip % 8)
    for key, sig, message in (
        (HQ.public_key, signature, data),
        (AGENT.public_key, bytes(damaged), data),
        (AGENT.public_key, signature, data + b"x"),
        (AGENT.public_key, signature[:63], data),
        (b"short", signature, data),
    ):
        with pytest.raises(BadSignature):
            verify(key, sig, message)


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.pem"
    identity = NodeIdentity.generate()
    identity.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert NodeIdentity.load(path).public_key == identity.public_key
    assert not path.with_name("node.pem.tmp").exists()


def test_save_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "node.pem"
    AGENT.save(path)
    with pytest.raises(FileExistsError):
        HQ.save(path)
    assert NodeIdentity.load(path).node_id == AGENT.node_id


def test_load_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "node.pem"
    AGENT.save(path)
    os.chmod(path, 0o640)
    with pytest.raises(PermissionError, match="chmod 600"):
        NodeIdentity.load(path)
