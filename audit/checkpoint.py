"""Signed checkpoints: an Ed25519 signature over (instance, seq, hash) of a chain's head.

A hash chain shows that records were edited, removed or reordered, but not that its *end* was
cut off: the shortened chain is still a valid chain. A checkpoint signed with a key the attacker
does not hold says "this instance's chain reached seq N with hash H", so a chain that now ends
before N, or holds another hash at N, is caught. Records after the newest checkpoint are covered
by the chain alone until the next one is written.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.record import canonical_json, format_ts

KINDS = ("periodic", "shutdown", "purge")
_DOMAIN = b"bastion-audit-checkpoint-v1\n"


class SigningKeyError(Exception):
    """The checkpoint signing key file is unreadable or not an Ed25519 key."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """The head of one instance's chain, signed. `purge` checkpoints anchor a chain whose start was cut."""

    instance: str
    seq: int
    hash: str
    ts: datetime
    kind: str
    key_id: str
    signature: str

    def payload(self) -> bytes:
        return payload(self.instance, self.seq, self.hash, self.ts, self.kind)


def payload(instance: str, seq: int, chain_hash: str, ts: datetime, kind: str) -> bytes:
    doc = {"instance": instance, "seq": seq, "hash": chain_hash, "ts": format_ts(ts), "kind": kind}
    return _DOMAIN + canonical_json(doc)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class CheckpointSigner:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()
        self.key_id = key_id(self.public_key)

    def sign(self, instance: str, seq: int, chain_hash: str, kind: str) -> Checkpoint:
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind must be one of {', '.join(KINDS)}")
        ts = datetime.now(UTC)
        signature = self._key.sign(payload(instance, seq, chain_hash, ts, kind)).hex()
        return Checkpoint(
            instance=instance,
            seq=seq,
            hash=chain_hash,
            ts=ts,
            kind=kind,
            key_id=self.key_id,
            signature=signature,
        )


def signature_ok(checkpoint: Checkpoint, public: Ed25519PublicKey) -> bool:
    try:
        public.verify(bytes.fromhex(checkpoint.signature), checkpoint.payload())
    except (InvalidSignature, ValueError):
        return False
    return True


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM Ed25519 private key; create one (mode 0600) if the file does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_private_key(path)
    except OSError as exc:
        raise SigningKeyError(f"cannot create signing key {path}: {exc.strerror}") from exc
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The verifying key from a PEM file holding either the private or the public key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read key {path}: {exc.strerror}") from exc
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not a PEM public or private key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
