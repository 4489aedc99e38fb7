"""A local signing key for the demo and the tests, so Bastion can be tried without an identity provider.

`ensure_dev_key` keeps one EC P-256 key in the data directory and publishes its public half as a
JWKS file, which an issuer entry (`issuer: bastion-dev`, `jwks_file: .../dev-jwks.json`) trusts.
Tokens minted with it are real ES256 JWTs that go through the same checks as any other.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.errors import ConfigError

DEV_ISSUER = "bastion-dev"
KEY_FILE = "dev-signing-key.pem"
JWKS_FILE = "dev-jwks.json"

_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_jwk(private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, alg: str) -> dict[str, Any]:
    """The public JWK with an RFC 7638 thumbprint as `kid`, so the same key always gets the same kid."""
    if isinstance(private, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    members = {k: jwk[k] for k in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    kid = _b64(hashlib.sha256(canonical).digest())
    return {**members, "kid": kid, "alg": alg, "use": "sig"}


@dataclass(frozen=True)
class SigningKey:
    """A private key that mints JWTs, with its public JWK."""

    kid: str
    private_pem: bytes
    alg: str
    public_jwk: Mapping[str, Any]

    @property
    def jwks(self) -> dict[str, Any]:
        """The public JWKS document an issuer's `jwks_file` or `jwks_url` serves."""
        return {"keys": [dict(self.public_jwk)]}

    def public_pem(self) -> bytes:
        private = serialization.load_pem_private_key(self.private_pem, password=None)
        return private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def mint(
        self,
        sub: str,
        *,
        audience: str | list[str],
        groups: Sequence[str] = (),
        ttl_s: int = 86400,
        issuer: str = DEV_ISSUER,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed JWT for `sub`; `extra` claims override the defaults, a negative `ttl_s` is expired."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer,
            "sub": sub,
            "aud": audience,
            "iat": now,
            "exp": now + ttl_s,
            "jti": uuid.uuid4().hex,
        }
        if groups:
            claims["groups"] = list(groups)
        claims.update(extra or {})
        return jwt.encode(
            claims, self.private_pem, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})}
        )


@dataclass(frozen=True)
class DevKey(SigningKey):
    """The demo's persistent key; `jwks_path` is the file an issuer's `jwks_file` points at."""

    jwks_path: Path


def _pem(private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate_key(alg: Literal["ES256", "RS256"] = "ES256", kid: str | None = None) -> SigningKey:
    """A fresh key that lives only in memory (tests, throwaway issuers)."""
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = _public_jwk(private, alg)
    if kid is not None:
        jwk["kid"] = kid
    return SigningKey(kid=jwk["kid"], private_pem=_pem(private), alg=alg, public_jwk=jwk)


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Create `path` exclusively; False if another process created it first."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def ensure_dev_key(data_dir: Path) -> DevKey:
    """Load the dev signing key from `data_dir`, creating it (mode 0600) on first use.

    The JWKS file is rewritten from the key whenever it differs, so the two never disagree.
    """
    data_dir = Path(data_dir)
    key_path = data_dir / KEY_FILE
    jwks_path = data_dir / JWKS_FILE
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not key_path.exists():
            _write_new(key_path, _pem(ec.generate_private_key(ec.SECP256R1())), 0o600)
        pem = key_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"dev signing key {key_path}: {exc.strerror}") from exc
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"dev signing key {key_path} is not an unencrypted PEM private key") from exc
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(private.curve, ec.SECP256R1):
        raise ConfigError(f"dev signing key {key_path} must be an EC P-256 key (ES256)")
    jwk = _public_jwk(private, "ES256")
    document = (json.dumps({"keys": [jwk]}, indent=2) + "\n").encode()
    try:
        if not jwks_path.exists() or jwks_path.read_bytes() != document:
            tmp = jwks_path.with_name(f".{JWKS_FILE}.{os.getpid()}.tmp")
            tmp.write_bytes(document)
            os.replace(tmp, jwks_path)
    except OSError as exc:
        raise ConfigError(f"dev JWKS {jwks_path}: {exc.strerror}") from exc
    return DevKey(kid=jwk["kid"], private_pem=pem, alg="ES256", public_jwk=jwk, jwks_path=jwks_path)
