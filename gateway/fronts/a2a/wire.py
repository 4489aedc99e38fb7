"""A2A messages read the same way in both protocol versions (1.0 and 0.3).

The versions differ in method names, in how a part says what it holds (1.0: `{"text": ...}`,
`{"data": ...}`, `{"raw"|"url": ...}`; 0.3: `{"kind": "text", "text": ...}`, `{"kind": "file",
"file": {...}}`) and in how a result says what it is (1.0 wraps it: `{"task": {...}}`,
`{"statusUpdate": {...}}`; 0.3 tags it: `{"kind": "task", ...}`). Everything here takes either.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import ProtocolError

Kind = Literal["send", "stream", "task", "subscribe", "push", "unrelayed"]

METHODS: dict[str, Kind] = {
    "SendMessage": "send",
    "message/send": "send",
    "SendStreamingMessage": "stream",
    "message/stream": "stream",
    "GetTask": "task",
    "tasks/get": "task",
    "CancelTask": "task",
    "tasks/cancel": "task",
    "SubscribeToTask": "subscribe",
    "tasks/resubscribe": "subscribe",
    "CreateTaskPushNotificationConfig": "push",
    "GetTaskPushNotificationConfig": "push",
    "ListTaskPushNotificationConfigs": "push",
    "DeleteTaskPushNotificationConfig": "push",
    "tasks/pushNotificationConfig/set": "push",
    "tasks/pushNotificationConfig/get": "push",
    "tasks/pushNotificationConfig/list": "push",
    "tasks/pushNotificationConfig/delete": "push",
    "ListTasks": "unrelayed",
    "GetExtendedAgentCard": "unrelayed",
    "agent/getAuthenticatedExtendedCard": "unrelayed",
}
"""Every method of both versions, by how Bastion treats it; anything else is refused."""
UNRELAYED = {
    "ListTasks": "it would list other callers' tasks; read yours with GetTask",
    "GetExtendedAgentCard": "the extended card is the agent's answer to Bastion's credential, not yours",
    "agent/getAuthenticatedExtendedCard": "the extended card is the agent's answer to Bastion's credential",
}
MAX_PARTS = 256
_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,200}")
_SKILL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
_WRAPPERS = ("task", "message", "statusUpdate", "artifactUpdate")
_READABLE = ("parts", "artifacts", "history", "artifact", "metadata")


@dataclass(frozen=True, slots=True)
class Sent:
    """A message to send, as Cedar and the audit see it."""

    args: dict[str, Any]
    """`context.args`: `text` (the text parts), `data` (the data parts merged), `files` (file
    parts' names, media types and URLs; their bytes are not read) and `metadata`."""
    skill: str | None
    task_id: str | None
    """The task the message continues (it must be the caller's own)."""
    context_id: str | None
    message_id: str | None


def an_id(value: Any, what: str) -> str | None:
    """A task, context or message id: None when absent, else it must be a sane string."""
    if value is None:
        return None
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(f"{what} must be 1-200 characters of letters, digits and ._:@/+=-", -32602)
    return value


def message_of(params: dict[str, Any]) -> tuple[dict[str, Any], Sent]:
    """The message of a SendMessage (either version) and what it says; ProtocolError naming what is wrong."""
    message = params.get("message")
    if not isinstance(message, dict):
        raise ProtocolError("params.message must be an object", -32602)
    parts = message.get("parts")
    if not isinstance(parts, list) or not parts or len(parts) > MAX_PARTS:
        raise ProtocolError(f"params.message.parts must be a list of 1 to {MAX_PARTS} parts", -32602)
    texts: list[str] = []
    data: dict[str, Any] = {}
    files: list[dict[str, str]] = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict):
            raise ProtocolError(f"params.message.parts[{i}] must be an object", -32602)
        kind, value = _part(part)
        if kind == "text":
            texts.append(value)
        elif kind == "data":
            if not isinstance(value, dict):
                raise ProtocolError(f"params.message.parts[{i}]: a data part must hold an object", -32602)
            if clash := sorted(value.keys() & data.keys()):
                raise ProtocolError(
                    f"params.message.parts[{i}]: key {clash[0][:64]!r} is in two data parts; "
                    "policy could not tell which one counts",
                    -32602,
                )
            data.update(value)
        elif kind == "file":
            files.append(value)
        else:
            raise ProtocolError(f"params.message.parts[{i}] is neither text, data nor a file", -32602)
    metadata = message.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ProtocolError("params.message.metadata must be an object", -32602)
    skill = (metadata or {}).get("skill")
    if skill is not None and (not isinstance(skill, str) or not _SKILL.fullmatch(skill)):
        raise ProtocolError("metadata.skill must be a skill id (letters, digits, _.:/-)", -32602)
    args = {"text": texts, "data": data, "files": files, "metadata": metadata or {}}
    sent = Sent(
        args,
        skill,
        an_id(message.get("taskId"), "message.taskId"),
        an_id(message.get("contextId"), "message.contextId"),
        an_id(message.get("messageId"), "message.messageId"),
    )
    return message, sent


def _part(part: dict[str, Any]) -> tuple[str, Any]:
    kind = part.get("kind")
    if kind == "text" or (kind is None and "text" in part):
        text = part.get("text")
        if not isinstance(text, str):
            raise ProtocolError("a text part's text must be a string", -32602)
        return "text", text
    if kind == "data" or (kind is None and "data" in part):
        return "data", part.get("data")
    if kind == "file" or (kind is None and ("raw" in part or "url" in part)):
        file = part.get("file") if kind == "file" else part
        if not isinstance(file, dict):
            raise ProtocolError("a file part must describe the file", -32602)
        found = {
            "name": file.get("name", file.get("filename")),
            "media_type": file.get("mimeType", file.get("mediaType")),
            "url": file.get("uri", file.get("url")),
        }
        return "file", {k: v for k, v in found.items() if isinstance(v, str)}
    return "other", None


def with_args(message: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """The message with its text and data parts replaced by those of redacted `args`."""
    texts = iter(args.get("text", []))
    data = args.get("data", {})
    parts = []
    for part in message["parts"]:
        kind, value = _part(part)
        if kind == "text":
            part = {**part, "text": next(texts)}
        elif kind == "data":
            part = {**part, "data": {k: data[k] for k in value}}
        parts.append(part)
    changed = {**message, "parts": parts}
    if "metadata" in message:
        changed["metadata"] = args.get("metadata", message["metadata"])
    return changed


def objects(result: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, object) of each task, message or update in a result, in either version."""
    for key in _WRAPPERS:
        inner = result.get(key)
        if isinstance(inner, dict):
            yield key, inner
            return
    kind = result.get("kind")
    tags = {"task": "task", "message": "message", "status-update": "statusUpdate"}
    tags["artifact-update"] = "artifactUpdate"
    if isinstance(kind, str) and kind in tags:
        yield tags[kind], result
    elif "status" in result and "id" in result:  # a 1.0 Task, as GetTask answers it
        yield "task", result


def task_id_of(kind: str, obj: dict[str, Any]) -> Any:
    return obj.get("id") if kind == "task" else obj.get("taskId")


def view(result: dict[str, Any]) -> dict[str, Any]:
    """What a client reads in a result: parts, artifacts, history, status messages, metadata;
    never the ids and states the protocol runs on."""
    found: list[dict[str, Any]] = []
    for _, obj in objects(result):
        readable = {k: obj[k] for k in _READABLE if k in obj}
        status = obj.get("status")
        if isinstance(status, dict) and "message" in status:
            readable["status"] = {"message": status["message"]}
        found.append(readable)
    return {"content": found}


def apply(result: dict[str, Any], redacted: dict[str, Any]) -> dict[str, Any]:
    """`result` with the readable parts of each object replaced by the redacted `view`."""
    out = dict(result)
    replaced = iter(redacted.get("content", []))
    for key in _WRAPPERS:
        if isinstance(out.get(key), dict):
            out[key] = _merged(out[key], next(replaced))
            return out
    if any(True for _ in objects(result)):
        return _merged(out, next(replaced))
    return out


def _merged(obj: dict[str, Any], readable: dict[str, Any]) -> dict[str, Any]:
    out = {**obj, **{k: v for k, v in readable.items() if k != "status"}}
    if "status" in readable and isinstance(obj.get("status"), dict):
        out["status"] = {**obj["status"], "message": readable["status"]["message"]}
    return out


def rewrite_card(card: dict[str, Any], url: str) -> dict[str, Any]:
    """The agent's card as Bastion serves it: reachable only through Bastion (JSON-RPC, at `url`),
    with Bastion's Bearer scheme; signatures are dropped, as the rewritten card is not what was signed."""
    out = {k: v for k, v in card.items() if k != "signatures"}
    interfaces = [
        {**i, "url": url}
        for i in card.get("supportedInterfaces", [])
        if isinstance(i, dict) and i.get("protocolBinding", "JSONRPC") == "JSONRPC"
    ]
    if interfaces or "supportedInterfaces" in card:
        out["supportedInterfaces"] = interfaces
    if "url" in card:  # the 0.3 form
        out["url"] = url
        out["preferredTransport"] = "JSONRPC"
    if "additionalInterfaces" in card:
        out["additionalInterfaces"] = [
            {**i, "url": url}
            for i in card["additionalInterfaces"]
            if isinstance(i, dict) and i.get("transport") == "JSONRPC"
        ]
    bearer = {"scheme": "bearer", "bearerFormat": "JWT", "description": "Bastion: a token or API key"}
    out["securitySchemes"] = {"bastion": {"httpAuthSecurityScheme": bearer, "type": "http", **bearer}}
    out["securityRequirements"] = [{"schemes": {"bastion": {}}}]
    out["security"] = [{"bastion": []}]
    return out
