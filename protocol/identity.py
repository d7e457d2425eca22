"""Node identity: an Ed25519 key pair and the stable node id derived from its public key.

The node id is a hash of the public key, so it cannot be claimed by another key and needs no
registry to be unique. Private keys are written with mode 0600 and refused when others can read them.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import BadSignature
from protocol.files import atomic_write, check_private_file, make_private_dir

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


def node_id_for(public_key: bytes) -> str:
    """`n` + 26 base32 characters of SHA-256(public key): 130 bits, stable, safe in paths and URLs."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(
            f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}"
        )
    digest = hashlib.sha256(public_key).digest()
    return "n" + base64.b32encode(digest[:20]).decode("ascii").lower()[:26]


def verify(public_key: bytes, signature: bytes, data: bytes) -> None:
    """Raise BadSignature unless `signature` is `public_key`'s signature of `data`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError) as e:
        raise BadSignature("signature does not match the signer's public key") from e


@dataclass(frozen=True)
class NodeIdentity:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def save(self, path: Path) -> None:
        """Write the private key as PKCS#8 PEM, created with mode 0600, atomically; never overwrite."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if not path.parent.exists():  # a new folder for a key is private; an existing one is kept
            make_private_dir(path.parent)
        with atomic_write(path, mode=0o600, exclusive=True) as f:
            f.write(pem)

    @classmethod
    def load(cls, path: Path) -> NodeIdentity:
        check_private_file(path, "private key")  # InsecureFile, a PermissionError
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key)
