"""Bastion's configuration: strict pydantic models, loaded and checked once at start-up.

An unknown key or a bad value stops start-up with the dotted key path and what was wrong.
`${VAR}` and `${VAR:-default}` in string values are replaced from the environment; a variable
that is unset and has no default is an error naming the key. Relative paths are resolved
against the directory of the config file, so a config works whatever the working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.errors import ConfigError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = None
    """Canonical external URL: RFC 9728 metadata and default token audiences. Default http://host:port."""
    allowed_origins: list[str] = []
    """Browser origins allowed to call Bastion besides its own (DNS-rebinding defence)."""

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")


class IssuerConfig(_Strict):
    issuer: str
    jwks_url: str | None = None
    discovery: bool = False
    jwks_file: Path | None = None
    public_key_file: Path | None = None
    audiences: list[str] | None = None
    """Accepted `aud` values; default: public_url and public_url/mcp/<upstream>."""
    algorithms: list[
        Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
    ] = [
        "RS256",
        "ES256",
    ]
    jwks_ttl_s: float = Field(300, gt=0)

    @model_validator(mode="after")
    def _one_key_source(self) -> IssuerConfig:
        sources = [self.jwks_url is not None, self.discovery, self.jwks_file is not None]
        sources.append(self.public_key_file is not None)
        if sum(sources) != 1:
            raise ValueError("set exactly one of jwks_url, discovery: true, jwks_file, public_key_file")
        return self


class ClaimsConfig(_Strict):
    """Which JWT claims become the Cedar principal's attributes."""

    groups: str = "groups"
    roles: str = "roles"
    tenant: str = "tenant"
    email: str = "email"


class IdentityConfig(_Strict):
    issuers: list[IssuerConfig] = []
    leeway_s: float = Field(30, ge=0, le=300)
    max_token_bytes: int = Field(16384, gt=0)
    claims: ClaimsConfig = ClaimsConfig()


class PolicyConfig(_Strict):
    dir: Path = Path("policies")
    schema_file: Path | None = Field(None, alias="schema")
    """Default: <dir>/schema.cedarschema."""
    watch: bool = False
    timezone: str = "UTC"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def schema_path(self) -> Path:
        return self.schema_file or self.dir / "schema.cedarschema"


class ToolSettings(_Strict):
    risk: Literal["read", "write", "external"] = "read"
    tags: list[str] = []


class UpstreamConfig(_Strict):
    transport: Literal["streamable-http", "stdio", "http"] = "streamable-http"
    url: str | None = None
    protocol: Literal["auto", "legacy", "2026-07-28"] = "auto"
    """Which era to speak to the upstream; auto tries server/discover, then initialize."""
    headers: dict[str, str] = {}
    """Bastion's own credential for this upstream (use ${ENV}); the client's token is never sent."""
    timeout_s: float = Field(30, gt=0)
    connect_timeout_s: float = Field(5, gt=0)
    tools: dict[str, ToolSettings] = {}
    command: str | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    cwd: Path | None = None

    @model_validator(mode="after")
    def _transport_fields(self) -> UpstreamConfig:
        if self.transport == "streamable-http" and not self.url:
            raise ValueError("transport streamable-http needs url")
        if self.transport != "streamable-http":
            raise ValueError(
                f"transport {self.transport!r} is not supported by this version of Bastion; "
                "use streamable-http"
            )
        return self


class AuditConfig(_Strict):
    url: str = "sqlite+aiosqlite:///./bastion-audit.db"
    hmac_key_file: Path | None = None
    """Key for the keyed hash of arguments; default: generated next to the state in .bastion/."""
    instance: str | None = None
    """This replica's name in audit records; default: the host name."""
    batch_max: int = Field(500, gt=0)
    batch_window_ms: float = Field(0, ge=0)
    """Extra wait for more records before a commit; 0 = records that arrive during a commit share the next."""


class StateConfig(_Strict):
    url: str = "sqlite+aiosqlite:///./bastion-state.db"


class SessionsConfig(_Strict):
    secret_file: Path | None = None
    """Key that signs MCP session ids; replicas share it. Default: generated in .bastion/."""
    max_age_s: float = Field(86400, gt=0)


class Config(_Strict):
    listen: ListenConfig = ListenConfig()
    identity: IdentityConfig = IdentityConfig()
    policy: PolicyConfig = PolicyConfig()
    budgets: list[dict[str, Any]] = []
    redaction: dict[str, Any] = {}
    upstreams: dict[Annotated[str, Field(pattern=_NAME)], UpstreamConfig] = {}
    audit: AuditConfig = AuditConfig()
    state: StateConfig = StateConfig()
    sessions: SessionsConfig = SessionsConfig()
    data_dir: Path = Path(".bastion")
    """Where generated keys (dev signing key, session secret, audit HMAC key) are kept."""

    @field_validator("budgets")
    @classmethod
    def _no_budgets_yet(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if v:
            raise ValueError("budgets are not supported by this version of Bastion; remove them")
        return v

    @field_validator("redaction")
    @classmethod
    def _no_redaction_yet(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v:
            raise ValueError("redaction is not supported by this version of Bastion; remove it")
        return v


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, path: str) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1), m.group(2))
            if value is None:
                raise ConfigError(
                    f"{path}: environment variable {m.group(1)} is not set (and has no default)"
                )
            return value

        return _ENV.sub(sub, node)
    return node


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def rel(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    policy = cfg.policy.model_copy(
        update={"dir": rel(cfg.policy.dir), "schema_file": rel(cfg.policy.schema_file)}
    )
    issuers = [
        i.model_copy(update={"jwks_file": rel(i.jwks_file), "public_key_file": rel(i.public_key_file)})
        for i in cfg.identity.issuers
    ]
    return cfg.model_copy(
        update={
            "policy": policy,
            "identity": cfg.identity.model_copy(update={"issuers": issuers}),
            "audit": cfg.audit.model_copy(update={"hmac_key_file": rel(cfg.audit.hmac_key_file)}),
            "sessions": cfg.sessions.model_copy(update={"secret_file": rel(cfg.sessions.secret_file)}),
            "data_dir": rel(cfg.data_dir),
        }
    )


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config.example.yaml)"
        lines.append(f"{key}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def parse(data: Any, base: Path) -> Config:
    """Validate a config mapping; paths in it are relative to `base`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("invalid config: the top level must be a mapping of keys")
    try:
        cfg = Config.model_validate(_interpolate(data, ""))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc
    return _resolve_paths(cfg, base)


def load(path: Path) -> Config:
    """Read and validate a YAML config file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(data, path.resolve().parent)
