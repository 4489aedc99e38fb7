"""Plain HTTP tools: a REST API made into governed MCP tools, each declared in config.

Every tool of a `transport: http` upstream names its method, a path template under the
upstream's `url`, optional query and body templates, and the JSON Schema of its arguments.
Bastion validates the arguments, fills the templates (path values percent-encoded, so an
argument can never change the host or climb out of the path) and makes the request with the
upstream's own credential. The answer becomes a `CallToolResult`: the body as text, and as
`structuredContent` when it is a JSON object; HTTP 4xx is a tool error the model can read;
HTTP 5xx is an upstream failure (retried for idempotent tools, counted by the breaker).

To the MCP front it looks like a legacy upstream without session ids, like the stdio bridge:
`initialize`, `ping`, `tools/list` and `tools/call` are answered here; other methods are not
offered (-32601).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx
from jsonschema import ValidationError
from jsonschema.validators import validator_for

from gateway.config import ToolSettings, UpstreamConfig
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.upstreams.credentials import NoCookies, upstream_auth
from gateway.upstreams.streamable_http import LEGACY_VERSION, Reply, SharedSession

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHOLE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
MAX_TEXT = 1_048_576
ANY_OBJECT: dict[str, Any] = {"type": "object"}


class ArgumentError(ValueError):
    """The arguments do not fit the tool's declaration: answered as a tool error, nothing is sent."""


def _reply(
    msg_id: Any, *, result: Any = None, error: dict[str, Any] | None = None, status: int = 200
) -> Reply:
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id}
    if error is not None:
        body["error"] = error
    else:
        body["result"] = result
    content = json.dumps(body, separators=(",", ":")).encode()
    return Reply(httpx.Response(status, headers={"content-type": "application/json"}, content=content))


def _text_result(text: str, is_error: bool = False, structured: Any = None) -> dict[str, Any]:
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    if is_error:
        result["isError"] = True
    if isinstance(structured, dict):
        result["structuredContent"] = structured
    return result


def _fill(template: str, args: Mapping[str, Any], used: set[str], encode: bool) -> str:
    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in args or args[name] is None:
            raise ArgumentError(f"missing argument {name!r}")
        value = args[name]
        if isinstance(value, dict | list):
            raise ArgumentError(f"argument {name!r} must be a string or a number to go into the URL")
        text = json.dumps(value) if isinstance(value, bool) else str(value)
        if encode and text in (".", ".."):
            raise ArgumentError(f"argument {name!r} may not be {text!r}")
        used.add(name)
        return quote(text, safe="") if encode else text

    return _PLACEHOLDER.sub(one, template)


def _fill_body(template: Any, args: Mapping[str, Any], used: set[str]) -> Any:
    if isinstance(template, str):
        whole = _WHOLE.match(template)
        if whole:
            used.add(whole.group(1))
            return args.get(whole.group(1))
        return _fill(template, args, used, encode=False)
    if isinstance(template, dict):
        return {k: _fill_body(v, args, used) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill_body(v, args, used) for v in template]
    return template


class HTTPToolsUpstream:
    """Serves the tools declared in config by calling a REST API."""

    era = "legacy"

    def __init__(self, name: str, cfg: UpstreamConfig) -> None:
        assert cfg.url is not None
        self.name = name
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        self.server_info: dict[str, Any] = {"name": name, "version": ""}
        self.capabilities: dict[str, Any] = {"tools": {}}
        self.instructions: str | None = None
        self.shared = SharedSession(id=None)
        self.tools = {t: s for t, s in cfg.tools.items() if s.declared}
        self._validators = {
            t: validator_for(s.input_schema or ANY_OBJECT)(s.input_schema or ANY_OBJECT)
            for t, s in self.tools.items()
        }
        headers, auth = upstream_auth(name, cfg)
        self.client = httpx.AsyncClient(
            headers=headers,
            auth=auth,
            cookies=NoCookies(),
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            follow_redirects=False,
        )

    async def detect(self) -> str:
        return self.era

    def modern_headers(self, method: str, name: str | None = None) -> dict[str, str]:
        return {}

    async def reopen_shared(self, stale: str | None) -> None:
        return None

    async def aclose(self) -> None:
        await self.client.aclose()

    async def list_tools(self) -> list[dict[str, Any]]:
        tools = []
        for name, settings in self.tools.items():
            tool: dict[str, Any] = {"name": name, "inputSchema": settings.input_schema or ANY_OBJECT}
            if settings.description:
                tool["description"] = settings.description
            tools.append(tool)
        return tools

    async def list_prompts(self) -> list[dict[str, Any]]:
        return []  # plain HTTP tools offer none

    async def send(
        self,
        http_method: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        long_lived: bool = False,
    ) -> Reply:
        if http_method == "DELETE":
            return Reply(httpx.Response(204))
        if http_method != "POST" or body is None:
            return Reply(httpx.Response(405, json={"error": "plain HTTP tools offer no server stream"}))
        try:
            msg = json.loads(body)
        except ValueError as exc:
            raise UpstreamError("message for the HTTP tools bridge is not JSON") from exc
        method, msg_id = msg.get("method"), msg.get("id")
        if "id" not in msg or method is None:
            return Reply(httpx.Response(202))
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        if method == "initialize":
            result = {
                "protocolVersion": params.get("protocolVersion") or LEGACY_VERSION,
                "capabilities": self.capabilities,
                "serverInfo": self.server_info,
            }
            return _reply(msg_id, result=result)
        if method == "ping":
            return _reply(msg_id, result={})
        if method == "tools/list":
            return _reply(msg_id, result={"tools": await self.list_tools()})
        if method == "tools/call":
            return await self._call(msg_id, params, headers or {})
        return _reply(
            msg_id, error={"code": -32601, "message": f"{method} is not offered by plain HTTP tools"}
        )

    async def _call(self, msg_id: Any, params: dict[str, Any], headers: Mapping[str, str]) -> Reply:
        name, args = params.get("name"), params.get("arguments") or {}
        settings = self.tools.get(name) if isinstance(name, str) else None
        if not isinstance(name, str) or settings is None or not isinstance(args, dict):
            return _reply(msg_id, error={"code": -32602, "message": f"unknown tool {str(name)[:100]!r}"})
        try:
            request = self._request(name, settings, args, headers)
        except ArgumentError as exc:
            return _reply(msg_id, result=_text_result(str(exc), is_error=True))
        try:
            response = await self.client.send(request)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream {self.name} timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {self.name} unreachable: {type(exc).__name__}") from exc
        text = response.text[:MAX_TEXT]
        if response.status_code >= 500 or 300 <= response.status_code < 400:
            why = f"{name}: the API answered HTTP {response.status_code}"
            return _reply(msg_id, error={"code": -32002, "message": why}, status=502)
        if response.status_code >= 400:
            return _reply(msg_id, result=_text_result(f"HTTP {response.status_code}: {text}", is_error=True))
        structured = None
        if "json" in response.headers.get("content-type", ""):
            try:
                structured = response.json()
            except ValueError:
                structured = None
        return _reply(msg_id, result=_text_result(text, structured=structured))

    def _request(
        self, name: str, settings: ToolSettings, args: dict[str, Any], headers: Mapping[str, str]
    ) -> httpx.Request:
        errors = sorted(self._validators[name].iter_errors(args), key=lambda e: list(e.path))
        if errors:
            first: ValidationError = errors[0]
            where = "/".join(str(p) for p in first.path) or "(arguments)"
            raise ArgumentError(
                f"arguments do not match the input schema of {name}: {where}: {first.message}"
            )
        assert settings.method is not None and settings.path is not None
        used: set[str] = set()
        url = self.base + _fill(settings.path, args, used, encode=True)
        query = {}
        for key, template in settings.query.items():
            try:
                query[key] = _fill(template, args, used, encode=False)
            except ArgumentError:
                continue  # an optional parameter whose argument is absent
        content: bytes | None = None
        if settings.body is not None:
            content = json.dumps(_fill_body(settings.body, args, used)).encode()
        elif settings.method in ("POST", "PUT", "PATCH"):
            content = json.dumps({k: v for k, v in args.items() if k not in used}).encode()
        hdrs = {"accept": "application/json"}
        if content is not None:
            hdrs["content-type"] = "application/json"
        if trace := headers.get("traceparent"):
            hdrs["traceparent"] = trace
        return self.client.build_request(settings.method, url, params=query, content=content, headers=hdrs)
