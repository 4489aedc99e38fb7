"""Bastion's configuration: strict pydantic models, loaded and checked once at start-up.

An unknown key or a bad value stops start-up with the dotted key path and what was wrong.
`${VAR}` and `${VAR:-default}` in string values are replaced from the environment; a variable
that is unset and has no default is an error naming the key. Relative paths are resolved
against the directory of the config file, so a config works whatever the working directory.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.call import Identities
from gateway.errors import ConfigError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_HOST_NAME = r"^\.?[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = None
    """Canonical external URL: RFC 9728 metadata and default token audiences. Default http://host:port."""
    allowed_origins: list[str] = []
    """Browser origins allowed to call Bastion besides its own (DNS-rebinding defence)."""
    allowed_hosts: list[Annotated[str, Field(pattern=_HOST_NAME, max_length=254)]] = []
    """`Host` names accepted on `/metrics`, `/readyz` and `/openapi.json` besides public_url's (and
    `localhost` and IP addresses, which DNS rebinding cannot produce); `.example.com` also accepts
    its subdomains. Any other name is answered 421 (DNS-rebinding defence)."""
    max_body_bytes: int = Field(1_048_576, gt=0, le=64 * 1_048_576)
    """Largest request body accepted; a bigger one is refused with 413."""
    max_json_depth: int = Field(64, ge=2, le=512)
    """Deepest nesting of objects/arrays accepted in a request body; deeper is refused with 400."""
    body_timeout_s: float = Field(10.0, gt=0, le=600)
    """Longest a request body may take to arrive (slowloris); slower is refused with 408."""
    refusals_per_s: float = Field(5.0, gt=0)
    """Refused credentials recorded per second per source address (a token bucket); beyond it
    the caller gets 429 and nothing is written, so a flood of bad tokens cannot fill the trail."""
    refusal_burst: int = Field(50, ge=1)
    """How many refused credentials in a row a source may send before `refusals_per_s` applies."""
    workers: int = Field(1, ge=1, le=64)
    """Gateway processes serving this port (`SO_REUSEPORT`), supervised by `bastion serve`
    (gateway/workers.py). More than one wants PostgreSQL for `state.url` and `audit.url`."""

    @model_validator(mode="after")
    def _workers_need_a_port(self) -> ListenConfig:
        if self.workers > 1 and self.port == 0:
            raise ValueError("workers > 1 needs a fixed port: every worker binds the same one")
        return self

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
    jwks_stale_s: float = Field(3600, ge=0)
    """How long past jwks_ttl_s the last good keys still serve while the issuer cannot be reached."""

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


class ApiKeyConfig(_Strict):
    """An API key for a service agent, kept in config as a hash (see `bastion keys create --config-entry`)."""

    prefix: Annotated[str, Field(pattern=r"^[a-z0-9]{8,32}$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    sub: Annotated[str, Field(min_length=1)]
    groups: list[str] = []
    roles: list[str] = []
    tenant: str | None = None
    email: str | None = None
    scopes: list[str] = []
    expires: datetime | None = None


class IdentityConfig(_Strict):
    issuers: list[IssuerConfig] = []
    leeway_s: float = Field(30, ge=0, le=300)
    max_token_bytes: int = Field(16384, gt=0)
    claims: ClaimsConfig = ClaimsConfig()
    max_delegation_depth: int = Field(4, ge=0, le=32)
    """Most actors allowed in a token's nested `act` chain; deeper tokens are refused."""
    scopes_supported: list[str] = []
    """Scopes listed in the RFC 9728 metadata, besides every upstream's required_scopes."""
    api_keys: list[ApiKeyConfig] = []
    same_identity: list[list[str]] = []
    """Groups of issuers (`bastion:api-key` included) whose equal subjects are one user on purpose:
    the same Cedar id, budgets and admin rights (docs/identity.md)."""

    @model_validator(mode="after")
    def _ids_are_unambiguous(self) -> IdentityConfig:
        issuers = tuple(i.issuer for i in self.issuers)
        try:
            Identities(issuers)
        except ValueError as exc:
            raise ValueError(f"issuers: {exc}") from None
        try:
            Identities(issuers, tuple(map(tuple, self.same_identity)))
        except ValueError as exc:
            raise ValueError(f"same_identity: {exc}") from None
        return self

    def identities(self) -> Identities:
        """The rule naming users by (issuer, subject), for this issuer order and grouping."""
        return Identities(tuple(i.issuer for i in self.issuers), tuple(map(tuple, self.same_identity)))


class ShadowConfig(_Strict):
    """A candidate policy set decided beside the live one on every call, never enforced
    (docs/policy.md, "Shadow mode"). Its schema and entities default to the shadow dir's own
    `schema.cedarschema` / `entities.json` when it has them, else to the live set's."""

    dir: Path
    schema_file: Path | None = Field(None, alias="schema")
    entities: Path | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PolicyConfig(_Strict):
    dir: Path = Path("policies")
    schema_file: Path | None = Field(None, alias="schema")
    """Default: <dir>/schema.cedarschema."""
    watch: bool = False
    """Reload the set when its files change (see docs/policy.md); a bad set keeps the old one."""
    watch_interval_s: float = Field(2.0, gt=0, le=3600)
    timezone: str = "UTC"
    entities: Path | None = None
    """Group/role hierarchy (Cedar entities JSON). Default: <dir>/entities.json when it exists."""
    exclude: list[str] = ["examples", "tests"]
    """Paths under dir (fnmatch patterns) whose *.cedar files are not part of the set."""
    shadow: ShadowConfig | None = None
    """A candidate set evaluated beside this one, never enforced; disagreements are audited."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def shadow_set(self) -> PolicyConfig | None:
        """The shadow set as a policy config of its own (same timezone, exclusions, watching), or
        None when none is configured. Its schema and entities fall back to the live set's."""
        if self.shadow is None:
            return None
        d = self.shadow.dir
        own_schema = d / "schema.cedarschema"
        own_entities = d / "entities.json"
        schema = self.shadow.schema_file or (own_schema if own_schema.is_file() else self.schema_path)
        entities = self.shadow.entities or (own_entities if own_entities.exists() else self.entities_path)
        return self.model_copy(update={"dir": d, "schema_file": schema, "entities": entities, "shadow": None})

    @property
    def schema_path(self) -> Path:
        return self.schema_file or self.dir / "schema.cedarschema"

    @property
    def entities_path(self) -> Path | None:
        if self.entities is not None:
            return self.entities
        default = self.dir / "entities.json"
        return default if default.exists() else None


class ToolSettings(_Strict):
    risk: Literal["read", "write", "external"] = "read"
    tags: list[str] = []
    idempotent: bool = False
    """Safe to run more than once: only such tools are retried, or re-run on a repeated call_id."""
    timeout_s: float | None = Field(None, gt=0)
    """Deadline for this tool's calls (default: the upstream's timeout_s, which it may not exceed)."""
    # A tool of a `transport: http` upstream is declared here in full (docs/upstreams.md):
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    """JSON Schema of the arguments; calls whose arguments do not match are refused."""
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] | None = None
    path: str | None = Field(None, pattern=r"^/")
    """URL template appended to the upstream's url: `/customers/{id}` (values are percent-encoded)."""
    query: dict[str, str] = {}
    """Query parameters: name -> template (`"{limit}"`); left out when their arguments are absent."""
    body: Any = None
    """JSON body template: `"{arg}"` strings become the argument's value. Default for POST/PUT/PATCH:
    the arguments not used by path or query."""

    @property
    def declared(self) -> bool:
        return self.method is not None or self.path is not None or bool(self.query) or self.body is not None


class RetryConfig(_Strict):
    """Retries of failed calls to tools marked `idempotent: true` (never any other tool)."""

    attempts: int = Field(3, ge=1, le=10)
    """Tries in all, the first one included."""
    backoff_s: float = Field(0.2, ge=0, le=60)
    """Wait before the first retry; doubled for each further retry (with jitter)."""
    budget_ratio: float = Field(0.2, gt=0, le=1)
    """Retry budget: retries may add at most this share of calls to the upstream ..."""
    budget_min: int = Field(3, ge=0, le=1000)
    """... plus this many, so that a quiet upstream can still be retried."""


class BreakerConfig(_Strict):
    """Circuit breaker per upstream: open after `failures` consecutive failed calls; after
    `reset_s` one probe call is let through (half-open) and its outcome closes or re-opens it."""

    failures: int = Field(5, ge=1, le=10_000)
    reset_s: float = Field(30, gt=0, le=86_400)


class OAuthClientConfig(_Strict):
    token_url: str
    client_id: str
    client_secret: str | None = None
    """Use ${ENV}; or client_secret_file."""
    client_secret_file: Path | None = None
    scope: str | None = None
    resource: str | None = None
    """RFC 8707 resource indicator sent to the token endpoint."""
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"

    @model_validator(mode="after")
    def _one_secret(self) -> OAuthClientConfig:
        if (self.client_secret is None) == (self.client_secret_file is None):
            raise ValueError("set exactly one of client_secret, client_secret_file")
        return self


class UpstreamConfig(_Strict):
    transport: Literal["streamable-http", "stdio", "http"] = "streamable-http"
    url: str | None = None
    protocol: Literal["auto", "legacy", "2026-07-28"] = "auto"
    """Which era to speak to the upstream; auto tries server/discover, then initialize."""
    headers: dict[str, str] = {}
    """Bastion's own credential for this upstream (use ${ENV}); the client's token is never sent."""
    bearer_token_file: Path | None = None
    """A file holding Bastion's bearer token for this upstream, read at start-up."""
    oauth: OAuthClientConfig | None = None
    """OAuth 2.0 client credentials: Bastion gets (and refreshes) its own token for this upstream."""
    required_scopes: list[str] = []
    """Scopes a caller's token must carry to use this upstream; else 403 insufficient_scope."""
    timeout_s: float = Field(30, gt=0)
    connect_timeout_s: float = Field(5, gt=0)
    max_response_bytes: int = Field(4 * 1_048_576, ge=1024, le=1024 * 1_048_576)
    """Largest answer read from this upstream: a JSON body, a whole SSE answer to a request, or one
    event of a long-lived stream. A bigger one is a failure of the upstream (nothing is relayed)."""
    http_client: Literal["lean", "httpx"] = "lean"
    """streamable-http: `lean` (keep-alive HTTP/1.1 pool for http:// URLs) or httpx's default pool."""
    retries: RetryConfig | None = None
    """Retries for tools marked idempotent (see docs/upstreams.md); none when unset."""
    breaker: BreakerConfig | None = None
    """Circuit breaker for this upstream; none when unset."""
    tools: dict[str, ToolSettings] = {}
    command: str | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    cwd: Path | None = None
    idle_timeout_s: float | None = Field(300, gt=0)
    """stdio: stop the process after this long without calls (started again on the next call)."""

    @model_validator(mode="after")
    def _transport_fields(self) -> UpstreamConfig:
        if self.transport == "streamable-http" and not self.url:
            raise ValueError("transport streamable-http needs url")
        if self.oauth is not None and (self.bearer_token_file is not None or _has_auth_header(self.headers)):
            raise ValueError("oauth excludes a static Authorization (headers, bearer_token_file)")
        if self.bearer_token_file is not None and _has_auth_header(self.headers):
            raise ValueError("bearer_token_file and headers.Authorization exclude each other")
        if self.transport == "stdio" and not self.command:
            raise ValueError("transport stdio needs command")
        if self.transport == "http":
            if not self.url:
                raise ValueError("transport http needs url (the REST API's base URL)")
            if undeclared := [n for n, t in self.tools.items() if not (t.method and t.path)]:
                raise ValueError(f"transport http: tools {', '.join(undeclared)} need method and path")
        elif declared := [n for n, t in self.tools.items() if t.declared or t.input_schema or t.description]:
            raise ValueError(
                f"tools {', '.join(declared)}: method, path, query, body, description and input_schema "
                "are only for transport http"
            )
        for name, tool in self.tools.items():
            if tool.timeout_s is not None and tool.timeout_s > self.timeout_s:
                raise ValueError(
                    f"tools.{name}.timeout_s ({tool.timeout_s:g}) exceeds the upstream's timeout_s "
                    f"({self.timeout_s:g}): raise the upstream's timeout_s"
                )
        return self


def _has_auth_header(headers: dict[str, str]) -> bool:
    return any(k.lower() == "authorization" for k in headers)


class _SinkBase(_Strict):
    """What every audit sink shares: delivery reads the durable trail after the sink's cursor."""

    name: str = Field(pattern=_NAME)
    batch_max: int = Field(500, gt=0, le=10_000)
    """Records per delivery: one HTTP request, one burst of syslog frames, one file append."""
    max_lag_records: int = Field(100_000, gt=0)
    """The backlog alarm: past this many undelivered records, the sink is reported `backlog`
    (log, `/readyz`, `bastion_audit_sink_backlog` 1). Nothing is dropped: the trail is the buffer."""
    backoff_max_s: float = Field(60, gt=0, le=3600)
    """Retries back off exponentially from 0.5 s up to this."""
    lease_s: float = Field(30, gt=0, le=3600)
    """How long a replica's claim on an instance chain lasts without renewal; after that another
    replica takes the chain over (it resumes at the cursor)."""
    timeout_s: float = Field(10, gt=0, le=300)
    """A delivery not confirmed within this fails and is retried."""


class HttpSinkConfig(_SinkBase):
    type: Literal["http"]
    url: str = Field(pattern=r"^https?://[^\s]+$")
    format: Literal["splunk-hec", "ocsf", "cef", "jsonl"] = "ocsf"
    """`splunk-hec`: Splunk HTTP Event Collector events (`event` = the record); the others: one
    event per line (`application/x-ndjson`; `text/plain` for cef)."""
    token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Environment variable holding the token, sent as `Authorization: Splunk <token>` for
    splunk-hec and `Bearer <token>` otherwise. Read at start-up; never logged."""
    ca_file: Path | None = None
    """CA bundle to verify an https receiver (default: the system's)."""


class SyslogSinkConfig(_SinkBase):
    type: Literal["syslog"]
    address: str
    """`tcp://host:port` or `tls://host:port` (RFC 5424 messages, octet-counting framing)."""
    format: Literal["ocsf", "cef", "jsonl"] = "cef"
    facility: int = Field(13, ge=0, le=23)
    """Syslog facility (13: log audit)."""
    settle_s: float = Field(0.2, ge=0, le=10)
    """After the receiver's TCP stack acknowledged a batch, how long the connection must stay open
    before the batch counts as delivered (a receiver that closes with it unread resets the
    connection). Caps delivery at batch_max records per settle_s per chain."""
    ca_file: Path | None = None
    cert_file: Path | None = None
    """Client certificate for receivers that require one (with key_file)."""
    key_file: Path | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        scheme = v.partition("://")[0].lower() if "://" in v else ""
        if scheme == "udp":
            raise ValueError(
                "syslog over UDP is refused for the audit trail: it drops records without telling "
                "anyone; use tcp://host:port or tls://host:port"
            )
        if scheme not in ("tcp", "tls") or not re.fullmatch(
            r"[a-z]+://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}", v
        ):
            raise ValueError(f"expected tcp://host:port or tls://host:port, got {v[:100]!r}")
        return v

    @model_validator(mode="after")
    def _tls_files(self) -> SyslogSinkConfig:
        tls = self.address.lower().startswith("tls://")
        if not tls and (self.ca_file or self.cert_file or self.key_file):
            raise ValueError("ca_file, cert_file and key_file need a tls:// address")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class FileSinkConfig(_SinkBase):
    type: Literal["file"]
    path: Path
    format: Literal["ocsf", "cef", "jsonl"] = "jsonl"
    max_bytes: int = Field(100 * 2**20, ge=4096)
    """Rotate when the file would grow past this: `path` becomes `path.1`, `path.1` `path.2`, ..."""
    backups: int = Field(5, ge=0, le=1000)
    """Rotated files kept; older ones are deleted."""


SinkConfig = Annotated[HttpSinkConfig | SyslogSinkConfig | FileSinkConfig, Field(discriminator="type")]


class AuditConfig(_Strict):
    url: str = "sqlite+aiosqlite:///./bastion-audit.db"
    hmac_key_file: Path | None = None
    """Key for the keyed hash of arguments; default: generated next to the state in .bastion/."""
    instance: str | None = None
    """This replica's name in audit records; default: the host name."""
    batch_max: int = Field(500, gt=0)
    batch_window_ms: float = Field(0, ge=0)
    """Extra wait for more records before a commit; 0 = records that arrive during a commit share the next."""
    durability: Literal["strict", "intent"] = "strict"
    """`strict`: a forwarded call's pending record is durable before it is forwarded and its final
    record before it is answered. `intent`: the pending record as in strict; the final record is
    group-committed without holding the answer (a crash in between leaves it `interrupted`, never
    missing). See docs/audit.md."""
    arguments: Literal["redacted", "shape"] = "redacted"
    """What `args_redacted` keeps of arguments. With `redaction:` configured, its view of the
    arguments it scanned, whatever this says. Otherwise `redacted`: their values, with what
    built-in detectors find (secrets, e-mail, phone, card, national ids) replaced by `<ENTITY>`,
    so a decision on `context.args` can be reviewed and replayed; `shape`: only their types and
    sizes (`<string:12>`), for when a missed value must not be stored. See docs/audit.md."""
    on_unavailable: Literal["deny"] = "deny"
    """When the decision record cannot be written before forwarding, the call is denied (fail closed)."""
    signing_key_file: Path | None = None
    """Ed25519 PEM key that signs chain checkpoints; default: generated (0600) in data_dir."""
    checkpoint_every: int = Field(1000, gt=0)
    """Sign a checkpoint after this many chained records ..."""
    checkpoint_interval_s: float = Field(10, gt=0)
    """... or after this many seconds with new records, whichever comes first."""
    retention_days: int | None = Field(None, gt=0)
    """`bastion audit purge` deletes records older than this; None keeps them all."""
    sinks: list[SinkConfig] = []
    """Where the trail is streamed as it is written (SIEM, syslog, a file); see docs/audit.md."""

    @field_validator("sinks")
    @classmethod
    def _sink_names(cls, v: list[Any]) -> list[Any]:
        names = [s.name for s in v]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"sink names must be unique: {', '.join(dupes)}")
        return v


_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class BudgetMatch(_Strict):
    """Which calls a budget counts: every non-empty list must match (any of its entries)."""

    tools: list[str] = []
    """`<upstream>/<tool>`, `<upstream>/*` or `*`."""
    upstreams: list[str] = []
    users: list[str] = []
    """A bare subject of the first issuer, or `<issuer>#<subject>` (docs/identity.md)."""
    groups: list[str] = []
    tenants: list[str] = []
    agents: list[str] = []


class CostTable(_Strict):
    tools: dict[str, int] = {}
    default: int = Field(1, ge=0)


class BudgetRule(_Strict):
    name: str = Field(pattern=_NAME)
    match: BudgetMatch = BudgetMatch()
    per: list[Literal["user", "tenant", "agent", "tool", "upstream"]] = ["user"]
    limit: int = Field(gt=0, lt=2**62)
    window: str
    """`<n>s|m|h|d`: fixed windows aligned to the Unix epoch (UTC), so `1d` resets at UTC midnight."""
    cost: int | CostTable | str = 1
    """1 per call by default; a per-tool table; or an argument path such as `args.amount`."""
    refund_on_upstream_failure: bool = False

    @field_validator("window")
    @classmethod
    def _window(cls, v: str) -> str:
        if not _WINDOW.match(v):
            raise ValueError("window must look like 30s, 1m, 1h, 1d or 30d")
        return v

    @field_validator("cost")
    @classmethod
    def _cost(cls, v: int | CostTable | str) -> int | CostTable | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("cost must be >= 0")
        if isinstance(v, str) and not re.match(r"^args(\.[A-Za-z0-9_-]+)+$", v):
            raise ValueError('cost must be an integer, {tools: {...}}, or an argument path ("args.amount")')
        return v

    @property
    def window_s(self) -> int:
        m = _WINDOW.match(self.window)
        assert m is not None
        return int(m.group(1)) * _UNIT_S[m.group(2)]


RedactionAction = Literal["none", "replace", "mask", "hash", "deny"]
_ENTITY = r"^[A-Z][A-Z0-9_]{1,63}$"
DEFAULT_REDACTION_ENTITIES = [
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "US_SSN",
    "IBAN_CODE",
    "IP_ADDRESS",
    "SECRET",
]

_ENTITY_OR_ANY = Annotated[str, Field(pattern=r"^(\*|[A-Z][A-Z0-9_]{1,63})$")]
_TOOL_KEY = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/(\*|[^/\s]{1,200})$")]

DirectionRule = RedactionAction | dict[_ENTITY_OR_ANY, RedactionAction]
"""One action for every entity type, or a mapping `ENTITY_TYPE -> action` with `*` for the rest."""


class RedactionRule(_Strict):
    arguments: DirectionRule | None = None
    """Before forwarding; unset in a per-tool rule: the default's."""
    results: DirectionRule | None = None


class RedactionDefault(_Strict):
    arguments: DirectionRule = "none"
    results: DirectionRule = "replace"


class RedactionConfig(_Strict):
    entities: list[Annotated[str, Field(pattern=_ENTITY)]] = DEFAULT_REDACTION_ENTITIES
    default: RedactionDefault = RedactionDefault()
    tools: dict[_TOOL_KEY, RedactionRule] = {}
    """Per `<upstream>/<tool>` or `<upstream>/*`; the exact tool wins over the wildcard."""
    hmac_key_file: Path | None = None
    """Key of the `hash` action's HMAC; default: generated in data_dir (share it between replicas)."""
    scan_limit_bytes: int = Field(1_048_576, gt=0, le=64 * 1_048_576)
    """Most bytes of string values scanned per message and direction."""
    over_limit: Literal["deny", "pass"] = "deny"
    """What happens to the part of a message beyond scan_limit_bytes."""
    ner_model: str | None = None
    """An installed spaCy model (e.g. en_core_web_sm) for PERSON / LOCATION; needed for those entities."""
    phone_regions: list[Annotated[str, Field(pattern=r"^[A-Z]{2}$")]] = ["US"]
    """Regions whose national formats count as phone numbers (+<country> numbers are found anyway);
    each region adds about 100 µs per string with digits."""
    score_threshold: float = Field(0.4, ge=0, le=1)

    @field_validator("entities")
    @classmethod
    def _known_entities(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one entity type (or remove redaction:)")
        return list(dict.fromkeys(v))


class ConsoleConfig(_Strict):
    """The web console at `/console` (docs/console.md): admins only, like the admin API."""

    enabled: bool = True
    session_ttl_s: float = Field(8 * 3600, ge=60, le=7 * 86400)
    """How long a browser session made by `bastion console login` lasts."""
    login_ttl_s: float = Field(300, ge=10, le=3600)
    """How long a login link is good for (once)."""
    key_file: Path | None = None
    """Signs login links, session cookies and form tokens; default: generated in data_dir. Several
    replicas must share one (a link made for one is opened through another)."""


class AdminConfig(_Strict):
    """Who may use the admin API (`/v1/budgets`, approvals): verified principals in these groups
    or these users (a bare subject of the first issuer, or `<issuer>#<subject>`).

    Both empty (the default) disables the admin API: it answers 403 to everyone."""

    groups: list[str] = []
    subjects: list[str] = []


class ApprovalWebhookConfig(_Strict):
    """Where approval events are POSTed, signed with HMAC-SHA256 (`X-Bastion-Signature: sha256=...`)."""

    url: str = Field(pattern=r"^https?://")
    secret_file: Path
    """The HMAC key (read once at start-up; keep it out of the config)."""
    timeout_s: float = Field(5.0, gt=0, le=60)
    retries: int = Field(4, ge=0, le=10)
    """Attempts after the first, on a connection error, a timeout, 408, 429 or 5xx (backoff 1 s, 2 s,
    4 s, ... with jitter); any other answer is final."""


class ApprovalsConfig(_Strict):
    """Human approval of calls that policy marks `@obligation("approval")` (docs/approvals.md)."""

    ttl_s: float = Field(3600, gt=0, le=7 * 86_400)
    """How long a request waits for a decision, and how long an approval can then be used."""
    approvers: str = Field("an admin", min_length=1, max_length=200)
    """Who the agent is told to ask, in "approval required: <id>; ask <approvers>"."""
    webhook: ApprovalWebhookConfig | None = None
    inline: bool = True
    """Ask inside the MCP exchange when the client supports elicitation (legacy `elicitation/create`,
    2026-07-28 `input_required`); off: every client gets the held result and retries."""
    inline_wait_s: float = Field(120, gt=0, le=900)
    """How long a call approved inline waits for the approver's decision before it is answered held."""
    form_key_file: Path | None = None
    """Binds the approval page's form to the approval and the approver; default: generated in
    data_dir. Several replicas must share one (a page from one is posted through another)."""


class StateConfig(_Strict):
    url: str = "sqlite+aiosqlite:///./bastion-state.db"


class IdempotencyConfig(_Strict):
    """Repeated call_ids (docs/http-api.md): a non-idempotent tool never runs twice for one."""

    ttl_s: float = Field(86_400, gt=0, le=30 * 86_400)
    """How long a call_id is remembered."""
    max_result_bytes: int = Field(262_144, ge=0, le=16 * 1_048_576)
    """Largest first response kept to answer repeats with; 0 keeps none (repeats get a reference)."""
    mcp_sessions: bool = True
    """Derive call_ids for legacy MCP sessions (session + request id); each such call then costs two
    state-DB commits. Off: only calls that carry `_meta["bastion/call_id"]` are checked."""


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """`info` logs one line per call; `warning` only problems."""
    format: Literal["json", "text"] = "json"
    """`json`: one JSON object per line (log shippers); `text`: for a terminal."""


class SessionsConfig(_Strict):
    secret_file: Path | None = None
    """Key that signs MCP session ids; replicas share it. Default: generated in .bastion/."""
    max_age_s: float = Field(86400, gt=0)


class PinningConfig(_Strict):
    """Tool pinning (rug-pull defence, docs/security.md)."""

    mode: Literal["tofu", "enforce", "auto_approve", "off"] = "tofu"
    """`tofu`: a tool seen for the first time is approved unless its scan flags it; any later change
    waits for `bastion tools approve`. `enforce`: every new or changed tool waits. `auto_approve`
    (development): unflagged changes are approved too. `off`: nothing is pinned or held back."""
    max_description_chars: int = Field(2048, gt=0)
    """A description (or schema text) longer than this is flagged."""
    refresh_s: float = Field(2.0, gt=0, le=3600)
    """How long a replica trusts its in-memory copy of the pins before re-reading the state DB."""


class McpConfig(_Strict):
    namespace_separator: str = Field("__", pattern=r"^[A-Za-z0-9_.-]{1,8}$")
    """Between upstream and tool name on the aggregated `/mcp` endpoint: `<upstream>__<tool>`."""
    allow_methods: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_./:-]{1,128}$")]] = []
    """Methods outside Bastion's table relayed to upstreams anyway, without a decision or a
    record (vendor extensions). Every other unlisted method is refused and recorded."""


class LLMCredential(_Strict):
    """Bastion's own key for a model provider: the caller's credential never reaches it."""

    header: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")
    """The header the provider reads it from (`x-api-key`, `authorization`)."""
    from_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """The environment variable holding the key, read at start-up."""
    file: Path | None = None
    """Or a file holding it (its first line)."""
    prefix: str = ""
    """Put before the key (`"Bearer "`)."""

    @model_validator(mode="after")
    def _one_source(self) -> LLMCredential:
        if (self.from_env is None) == (self.file is None):
            raise ValueError("set exactly one of from_env, file")
        return self


class LLMProvider(_Strict):
    kind: Literal["anthropic", "openai"]
    """Which API it speaks: `anthropic` /v1/messages; `openai` /v1/chat/completions and /v1/responses."""
    url: str = Field(pattern=r"^https?://[^\s]+$")
    """The provider's base URL, without `/v1` (https://api.anthropic.com, https://api.openai.com)."""
    credential: LLMCredential | None = None
    """None: nothing is added (a local model server that needs no key)."""
    timeout_s: float = Field(300, gt=0)
    """Longest wait for the provider's answer, and between two events of a stream."""
    connect_timeout_s: float = Field(10, gt=0)
    max_response_bytes: int = Field(32 * 1_048_576, ge=1024, le=1024 * 1_048_576)
    """Largest answer read from the provider: a JSON body, or one event of a stream."""


class LLMTools(_Strict):
    namespace: str = Field("llm", pattern=_NAME)
    """A model's tool `<name>` is Cedar's `Tool::"<namespace>/<name>"` unless mapped."""
    map: dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/.{1,200}$")]] = {}
    """Model tool name -> `<upstream>/<tool>`: the same Cedar resource as that MCP tool."""
    hide_denied: bool = True
    """Leave out of the request's `tools` those the caller can never be allowed to call (as
    `tools/list` does on /mcp), so the model is not offered them."""


class LLMConfig(_Strict):
    """The LLM API front (docs/llm.md): tool calls in model traffic, governed like MCP calls."""

    providers: dict[Annotated[str, Field(pattern=_NAME)], LLMProvider] = {}
    tools: LLMTools = LLMTools()
    redact_prompts: bool = False
    """Redact PII and secrets in the conversation's text before the provider sees it (needs `redaction`)."""
    max_body_bytes: int = Field(16 * 1_048_576, gt=0, le=256 * 1_048_576)
    """Largest request body accepted on /llm (conversations are long); bigger is refused with 413."""


class AgentConfig(_Strict):
    """An A2A agent behind `/a2a/<name>` (docs/a2a.md)."""

    url: str = Field(pattern=r"^https?://[^\s]+$")
    """The agent's JSON-RPC endpoint; its card is read from `<url>/.well-known/agent-card.json`."""
    subject: str = Field(min_length=1, max_length=256)
    """The `sub` this agent presents when it calls Bastion itself: a chain that already holds it
    would close a cycle, so a message to this agent from within such a chain is refused."""
    credential: LLMCredential | None = None
    """Bastion's own credential toward the agent (None: nothing is added); never the caller's."""
    timeout_s: float = Field(300, gt=0)
    """Longest wait for an answer, the whole of a stream included."""
    connect_timeout_s: float = Field(5, gt=0)
    max_response_bytes: int = Field(4 * 1_048_576, ge=1024, le=1024 * 1_048_576)
    """Largest answer read from the agent: a JSON body, or one event of a stream."""
    breaker: BreakerConfig | None = None
    data_schema: dict[str, Any] | None = None
    """JSON Schema of the messages' data parts (merged), as an MCP tool's `inputSchema`: it gives
    `context.args.data` its Cedar type, so that policies may read it."""
    push_notifications: bool = False
    """Relay push-notification configs (the agent then posts task updates to a URL of the
    caller's choosing, around Bastion's redaction and audit). Off: they are refused."""


class A2AConfig(_Strict):
    """The A2A front's own settings (docs/a2a.md)."""

    delegation_key_file: Path | None = None
    """The key that signs the delegation tokens handed to agents (default `<data_dir>/delegation.key`);
    replicas must share it, so that an agent may present its token to any of them."""
    delegation_ttl_s: float = Field(300, gt=0, le=86_400)
    """How long a delegation token handed to an agent stays valid."""
    max_body_bytes: int = Field(4 * 1_048_576, gt=0, le=256 * 1_048_576)
    """Largest request body accepted on /a2a; bigger is refused with 413."""


class OpsListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(ge=0, le=65535)


class OpsConfig(_Strict):
    """Who may read `/metrics`, `/readyz` and `/openapi.json`, and where (docs/operations.md).

    They name upstreams, tools and policy versions. `/healthz` says nothing and stays open."""

    auth: Literal["none", "admin"] = "none"
    """`admin`: only an admin (`admin.groups` / `admin.subjects`, as the admin API) may read them.
    `none` suits the default loopback bind, where Prometheus scrapes without a token."""
    listen: OpsListenConfig | None = None
    """Serve them on this listener only, and not on `listen`'s (keep it off the agents' network)."""


class Config(_Strict):
    listen: ListenConfig = ListenConfig()
    identity: IdentityConfig = IdentityConfig()
    policy: PolicyConfig = PolicyConfig()
    budgets: list[BudgetRule] = []
    redaction: RedactionConfig | None = None
    """PII and secrets redaction (see docs/redaction.md); absent: off, and Presidio is never imported."""
    upstreams: dict[Annotated[str, Field(pattern=_NAME)], UpstreamConfig] = {}
    audit: AuditConfig = AuditConfig()
    state: StateConfig = StateConfig()
    idempotency: IdempotencyConfig = IdempotencyConfig()
    admin: AdminConfig = AdminConfig()
    console: ConsoleConfig = ConsoleConfig()
    approvals: ApprovalsConfig = ApprovalsConfig()
    sessions: SessionsConfig = SessionsConfig()
    pinning: PinningConfig = PinningConfig()
    mcp: McpConfig = McpConfig()
    llm: LLMConfig = LLMConfig()
    agents: dict[Annotated[str, Field(pattern=_NAME)], AgentConfig] = {}
    """A2A agents behind `/a2a/<name>` (docs/a2a.md)."""
    a2a: A2AConfig = A2AConfig()
    ops: OpsConfig = OpsConfig()
    logging: LoggingConfig = LoggingConfig()
    data_dir: Path = Path(".bastion")
    """Where generated keys (dev signing key, session secret, audit HMAC key) are kept."""

    @field_validator("budgets")
    @classmethod
    def _unique_budget_names(cls, v: list[BudgetRule]) -> list[BudgetRule]:
        names = [b.name for b in v]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"budget names must be unique: {', '.join(dupes)}")
        return v

    @model_validator(mode="after")
    def _users_are_named_by_known_issuers(self) -> Config:
        ids = self.identity.identities()
        named = [(f"admin.subjects.{i}", s) for i, s in enumerate(self.admin.subjects)]
        for b, rule in enumerate(self.budgets):
            named += [(f"budgets.{b}.match.users.{i}", u) for i, u in enumerate(rule.match.users)]
        for where, entry in named:
            try:
                ids.resolve(entry)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _separator_not_in_upstream_names(self) -> Config:
        """Keep `<upstream><sep><tool>` readable one way only: with `notes_` and `__`, `notes___x`
        could be `notes_` + `_x` or `notes` + `__x`."""
        sep = self.mcp.namespace_separator
        if clash := sorted(n for n in self.upstreams if sep in n):
            raise ValueError(
                f"mcp.namespace_separator {sep!r} appears in upstream name(s) {', '.join(clash)}: "
                "rename them or choose another separator"
            )
        if edge := sorted(n for n in self.upstreams if n[0] in sep or n[-1] in sep):
            keys = ", ".join(f"upstreams.{n}" for n in edge)
            raise ValueError(
                f"{keys}: an upstream name may not begin or end with a character of "
                f"mcp.namespace_separator {sep!r} (tool names on /mcp would read two ways): rename "
                "the upstream, or choose another mcp.namespace_separator"
            )
        return self

    @model_validator(mode="after")
    def _llm_names_its_own_namespace(self) -> Config:
        """A model's unmapped tools must not land among an upstream's tools (and inherit its permits)."""
        namespace = self.llm.tools.namespace
        if self.llm.providers and namespace in self.upstreams:
            raise ValueError(
                f"llm.tools.namespace {namespace!r} is also an upstream's name: choose another "
                "namespace, and map the model's tools to that upstream in llm.tools.map"
            )
        if self.llm.redact_prompts and self.redaction is None:
            raise ValueError("llm.redact_prompts needs redaction: configured (docs/redaction.md)")
        return self

    @model_validator(mode="after")
    def _agents_named_apart(self) -> Config:
        """Budgets' `match.upstreams`, metrics and the audit's `upstream` name agents and upstreams alike."""
        taken = set(self.upstreams) | ({self.llm.tools.namespace} if self.llm.providers else set())
        if clash := sorted(taken & set(self.agents)):
            raise ValueError(
                f"agents.{clash[0]}: an upstream (or llm.tools.namespace) has that name too; budgets, "
                "metrics and the audit would not tell them apart: rename the agent"
            )
        return self

    @model_validator(mode="after")
    def _ops_listener_apart(self) -> Config:
        ops = self.ops.listen
        if ops is not None and ops.port != 0 and ops.port == self.listen.port:
            raise ValueError("ops.listen.port: it is listen.port, the agents' listener: choose another port")
        if ops is not None and ops.port == 0 and self.listen.workers > 1:
            raise ValueError(
                "ops.listen.port: workers > 1 needs a fixed port: every worker binds the same one"
            )
        if self.ops.auth == "admin" and not (self.admin.groups or self.admin.subjects):
            raise ValueError("ops.auth: admin needs admin.groups or admin.subjects (nobody could read them)")
        return self


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
        update={
            "dir": rel(cfg.policy.dir),
            "schema_file": rel(cfg.policy.schema_file),
            "entities": rel(cfg.policy.entities),
            "shadow": cfg.policy.shadow.model_copy(
                update={
                    "dir": rel(cfg.policy.shadow.dir),
                    "schema_file": rel(cfg.policy.shadow.schema_file),
                    "entities": rel(cfg.policy.shadow.entities),
                }
            )
            if cfg.policy.shadow
            else None,
        }
    )
    issuers = [
        i.model_copy(update={"jwks_file": rel(i.jwks_file), "public_key_file": rel(i.public_key_file)})
        for i in cfg.identity.issuers
    ]
    upstreams = {
        name: u.model_copy(
            update={
                "bearer_token_file": rel(u.bearer_token_file),
                "oauth": u.oauth.model_copy(update={"client_secret_file": rel(u.oauth.client_secret_file)})
                if u.oauth
                else None,
            }
        )
        for name, u in cfg.upstreams.items()
    }
    return cfg.model_copy(
        update={
            "policy": policy,
            "identity": cfg.identity.model_copy(update={"issuers": issuers}),
            "upstreams": upstreams,
            "audit": cfg.audit.model_copy(
                update={
                    "hmac_key_file": rel(cfg.audit.hmac_key_file),
                    "signing_key_file": rel(cfg.audit.signing_key_file),
                    "sinks": [_sink_paths(sink, rel) for sink in cfg.audit.sinks],
                }
            ),
            "sessions": cfg.sessions.model_copy(update={"secret_file": rel(cfg.sessions.secret_file)}),
            "console": cfg.console.model_copy(update={"key_file": rel(cfg.console.key_file)}),
            "approvals": cfg.approvals.model_copy(
                update={
                    "form_key_file": rel(cfg.approvals.form_key_file),
                    "webhook": cfg.approvals.webhook.model_copy(
                        update={"secret_file": rel(cfg.approvals.webhook.secret_file)}
                    )
                    if cfg.approvals.webhook
                    else None,
                }
            ),
            "redaction": cfg.redaction.model_copy(update={"hmac_key_file": rel(cfg.redaction.hmac_key_file)})
            if cfg.redaction
            else None,
            "data_dir": rel(cfg.data_dir),
            "llm": cfg.llm.model_copy(
                update={
                    "providers": {
                        name: p.model_copy(update={"credential": _cred(p.credential, rel)})
                        for name, p in cfg.llm.providers.items()
                    }
                }
            ),
            "agents": {
                name: a.model_copy(update={"credential": _cred(a.credential, rel)})
                for name, a in cfg.agents.items()
            },
            "a2a": cfg.a2a.model_copy(update={"delegation_key_file": rel(cfg.a2a.delegation_key_file)}),
        }
    )


def _sink_paths(sink: Any, rel: Any) -> Any:
    fields = ("ca_file", "cert_file", "key_file", "path")
    return sink.model_copy(update={f: rel(getattr(sink, f)) for f in fields if hasattr(sink, f)})


def _cred(cred: LLMCredential | None, rel: Any) -> LLMCredential | None:
    return cred.model_copy(update={"file": rel(cred.file)}) if cred is not None else None


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        if not err["loc"] and err["type"] == "value_error" and "error" in err.get("ctx", {}):
            lines.append(str(err["ctx"]["error"]))  # checks across sections name their keys themselves
            continue
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
