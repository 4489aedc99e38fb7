"""A2A through the real gateway: the official a2a-sdk client and server, both protocol versions."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
from a2a.types import Message, Part, Role, SendMessageRequest

from tests.a2a_agents import a2a_client, text_of
from tests.fronts.a2a.conftest import A2AEnv


def _request(text: str, data: dict[str, Any] | None = None, **metadata: Any) -> SendMessageRequest:
    from google.protobuf import struct_pb2  # type: ignore[import-untyped]

    parts = [Part(text=text)]
    if data is not None:
        value = struct_pb2.Value()
        value.struct_value.update(data)
        parts.append(Part(data=value))
    message = Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=parts)
    if metadata:
        message.metadata.update(metadata)
    return SendMessageRequest(message=message)


async def _send(env: A2AEnv, agent: str, request: SendMessageRequest, token: str | None = None) -> Any:
    """The last thing the SDK client yields for a non-streaming message (the Task)."""
    async with await a2a_client(env.url(agent), token or env.token(), streaming=False) as client:
        found = [r async for r in client.send_message(request)]
    return found[-1]


def _rpc(method: str, params: dict[str, Any], msg_id: int | str = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}


def _v03_message(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "message": {
            "kind": "message",
            "messageId": uuid.uuid4().hex,
            "role": "user",
            "parts": [{"kind": "text", "text": text}],
            **extra,
        }
    }


async def test_an_allowed_message_reaches_the_agent_with_bastions_credential_and_a_delegation_token(
    env: A2AEnv,
) -> None:
    response = await _send(env, "echo", _request("hello there", {"amount": 5}))
    assert text_of(response) == "echo: hello there"
    seen = [s for s in env.agents["echo"].seen if s.method == "SendMessage"]
    assert len(seen) == 1
    headers = seen[0].headers
    assert headers["authorization"] == "Bearer bastion-own-echo-credential"  # never the caller's
    assert headers["a2a-version"] == "1.0"
    delegation = jwt.decode(headers["x-bastion-delegation"], options={"verify_signature": False})
    assert delegation["sub"] == "alice" and delegation["act"] == {"sub": "echo-bot"}
    assert delegation["aud"] == env.base and delegation["exp"] - time.time() <= 300
    [record] = await env.records(protocol="a2a", upstream="echo", action="send_message")
    assert record.user == "alice" and record.decision["effect"] == "allow"
    assert record.decision["policy_ids"] == ["agents-for-analysts"]
    assert record.outcome["status"] == "completed"
    assert record.args_redacted["data"] == {"amount": 5} and record.args_redacted["text"] == ["hello there"]
    assert record.a2a is not None and record.a2a["method"] == "SendMessage"
    assert record.a2a["task_id"] == response.task.id


async def test_a_denied_message_names_the_policy_and_never_reaches_the_agent(env: A2AEnv) -> None:
    with pytest.raises(
        Exception, match="denied by policy small-amounts-only: agents may not be sent amounts"
    ):
        await _send(env, "echo", _request("pay", {"amount": 500}))
    assert env.agents["echo"].seen == []
    with pytest.raises(Exception, match="no-wire-skill: no agent may be asked to wire money"):
        await _send(env, "echo", _request("send it", skill="wire"))
    assert env.agents["echo"].seen == []
    records = await env.records(protocol="a2a", upstream="echo")
    denied = [r for r in records if r.decision["effect"] == "deny"]
    assert {r.tool for r in denied} >= {"message", "wire"}
    assert all(r.outcome["status"] == "denied" for r in denied)


async def test_the_v03_wire_is_governed_the_same_way(env: A2AEnv, http: httpx.AsyncClient) -> None:
    auth = {"authorization": f"Bearer {env.token()}"}
    sent = await http.post(env.url("echo"), json=_rpc("message/send", _v03_message("old wire")), headers=auth)
    result = sent.json()["result"]
    assert result["kind"] == "task" and text_of(result) == "echo: old wire"
    got = await http.post(env.url("echo"), json=_rpc("tasks/get", {"id": result["id"]}, 2), headers=auth)
    assert got.json()["result"]["id"] == result["id"]
    refused = await http.post(
        env.url("echo"),
        json=_rpc(
            "message/send",
            {
                "message": {
                    **_v03_message("x")["message"],
                    "parts": [{"kind": "text", "text": "x"}, {"kind": "data", "data": {"amount": 1000}}],
                }
            },
        ),
        headers=auth,
    )
    error = refused.json()["error"]
    assert error["code"] == -32050 and error["data"]["decision"] == "deny"
    assert [s.method for s in env.agents["echo"].seen] == ["message/send", "tasks/get"]
    assert "a2a-version" not in env.agents["echo"].seen[0].headers


async def test_the_card_is_served_with_bastions_url_and_security(
    env: A2AEnv, http: httpx.AsyncClient
) -> None:
    url = env.url("echo") + "/.well-known/agent-card.json"
    assert (await http.get(url)).status_code == 401
    card = (await http.get(url, headers={"authorization": f"Bearer {env.token()}"})).json()
    assert card["name"] == "echo"
    assert {i["url"] for i in card["supportedInterfaces"]} == {env.url("echo") + "/"}
    assert {i["protocolVersion"] for i in card["supportedInterfaces"]} == {"1.0", "0.3"}
    assert card["url"] == env.url("echo") + "/"
    assert list(card["securitySchemes"]) == ["bastion"]
    assert env.agents["echo"].url not in str(card)


async def test_a_chain_is_governed_at_every_hop_and_grows_by_one(env: A2AEnv) -> None:
    response = await _send(env, "researcher", _request("ask echo: from afar"))
    assert text_of(response) == "echo: from afar"
    onward = [s for s in env.agents["echo"].seen if s.method == "SendMessage"]
    assert len(onward) == 1
    token = jwt.decode(onward[0].headers["x-bastion-delegation"], options={"verify_signature": False})
    assert token["sub"] == "alice"
    assert token["act"] == {"sub": "echo-bot", "act": {"sub": "researcher-bot"}}
    records = await env.records(protocol="a2a", action="send_message", user="alice")
    hop = next(r for r in records if r.upstream == "echo" and r.delegation_chain == ["researcher-bot"])
    assert hop.agent == "researcher-bot" and hop.decision["effect"] == "allow"


async def test_a_delegate_is_refused_where_its_chain_may_not_go(env: A2AEnv) -> None:
    response = await _send(env, "researcher", _request("ask leaky: anything"))
    answer = text_of(response)
    assert answer.startswith("refused:") and "researcher-stays-clean" in answer
    assert env.agents["leaky"].seen == []


async def test_calling_back_into_the_chain_is_refused_as_a_cycle(env: A2AEnv) -> None:
    response = await _send(env, "planner", _request("ask researcher: ask planner: loop"))
    answer = text_of(response)
    assert "delegation-cycle" in answer and "planner" in answer
    assert [s.method for s in env.agents["planner"].seen] == ["SendMessage"]
    [cycle] = await env.records(
        protocol="a2a", upstream="planner", user="alice", delegation_chain=["researcher-bot", "planner-bot"]
    )
    assert cycle.decision["policy_ids"] == ["delegation-cycle"]


async def test_a_delegate_cannot_spend_past_its_delegator_budget(env: A2AEnv) -> None:
    token = env.token("bob", extra={"azp": "bobs-assistant"})
    for i in range(3):
        assert text_of(await _send(env, "echo", _request(f"spend {i}"), token)) == f"echo: spend {i}"
    with pytest.raises(Exception, match="echo-per-agent"):
        await _send(env, "echo", _request("one too many"), token)
    # the researcher acting for bob through his assistant is charged too: the assistant's budget is spent
    answer = text_of(await _send(env, "researcher", _request("ask echo: via the researcher"), token))
    assert answer.startswith("refused:") and "echo-per-agent" in answer
    assert len([s for s in env.agents["echo"].seen if s.method == "SendMessage"]) == 3


async def test_streaming_passes_events_on_as_they_arrive(env: A2AEnv) -> None:
    arrived: list[tuple[float, str]] = []
    async with await a2a_client(env.url("slow"), env.token(), streaming=True) as client:
        start = time.monotonic()
        async for event in client.send_message(_request("go")):
            arrived.append((time.monotonic() - start, text_of(event)))
    chunks = [(t, text) for t, text in arrived if text.startswith("chunk")]
    assert [text for _, text in chunks] == ["chunk 0", "chunk 1", "chunk 2"]
    assert chunks[1][0] - chunks[0][0] >= 0.3  # relayed as sent, not gathered at the end
    [record] = await env.records(protocol="a2a", upstream="slow")
    assert record.outcome["status"] == "completed" and record.a2a is not None
    assert record.a2a["method"] == "SendStreamingMessage"


async def test_answers_are_redacted_and_scanned_for_injection(env: A2AEnv) -> None:
    response = await _send(env, "leaky", _request("tell me"))
    text = text_of(response)
    assert "bob@example.com" not in text and "536-22-8726" not in text
    assert "<EMAIL_ADDRESS>" in text
    [record] = await env.records(protocol="a2a", upstream="leaky", delegation_chain=[])
    assert record.pii["output"] == {"EMAIL_ADDRESS": 1, "US_SSN": 1}
    assert "prompt-injection" in record.decision["policy_ids"]


async def test_messages_are_redacted_before_the_agent_sees_them(env: A2AEnv) -> None:
    response = await _send(env, "echo", _request("reach me at carol@example.com"))
    assert "carol@example.com" not in text_of(response)
    [seen] = [s for s in env.agents["echo"].seen if s.method == "SendMessage"]
    assert "carol@example.com" not in str(seen.body)
    records = await env.records(protocol="a2a", upstream="echo")
    record = next(r for r in records if r.pii["input"])
    assert record.pii["input"] == {"EMAIL_ADDRESS": 1} and "carol" not in str(record.args_redacted)


async def test_a_task_belongs_to_its_creator(env: A2AEnv, http: httpx.AsyncClient) -> None:
    mine = await _send(env, "echo", _request("my task"))
    task_id = mine.task.id
    for who in ("mallory", "alice"):
        auth = {"authorization": f"Bearer {env.token(who)}", "a2a-version": "1.0"}
        got = await http.post(env.url("echo"), json=_rpc("GetTask", {"id": task_id}), headers=auth)
        if who == "mallory":
            assert got.json()["error"]["code"] == -32001
        else:
            assert got.json()["result"]["id"] == task_id
    intrude = _rpc(
        "SendMessage",
        {
            "message": {
                "messageId": "m-x",
                "role": "ROLE_USER",
                "taskId": task_id,
                "parts": [{"text": "hijack"}],
            }
        },
    )
    auth = {"authorization": f"Bearer {env.token('mallory')}", "a2a-version": "1.0"}
    refused = (await http.post(env.url("echo"), json=intrude, headers=auth)).json()["error"]
    assert "task-owner" in refused["message"]
    assert [s.method for s in env.agents["echo"].seen] == ["SendMessage", "GetTask"]
    records = await env.records(protocol="a2a", user="mallory")
    assert {r.decision["policy_ids"][0] for r in records} == {"task-owner"}


async def test_methods_that_would_leak_or_bypass_are_refused(env: A2AEnv, http: httpx.AsyncClient) -> None:
    auth = {"authorization": f"Bearer {env.token()}", "a2a-version": "1.0"}
    for method in (
        "ListTasks",
        "CreateTaskPushNotificationConfig",
        "tasks/pushNotificationConfig/set",
        "x/y",
    ):
        error = (await http.post(env.url("echo"), json=_rpc(method, {}), headers=auth)).json()["error"]
        assert error["code"] in (-32004, -32601), method
    assert env.agents["echo"].seen == []


@pytest.fixture
async def http() -> Any:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


__all__ = ["asyncio"]


async def test_the_sdks_v03_client_works_through_the_card_bastion_serves(env: A2AEnv) -> None:
    """The SDK picks its 0.3 transport when the card offers only a 0.3 interface."""
    from a2a.client import A2ACardResolver, ClientConfig, ClientFactory

    headers = {"authorization": f"Bearer {env.token('olga')}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as http:
        card = await A2ACardResolver(http, env.url("echo")).get_agent_card()
        legacy = [i for i in card.supported_interfaces if i.protocol_version == "0.3"]
        del card.supported_interfaces[:]
        card.supported_interfaces.extend(legacy)
        client = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(card)
        found = [r async for r in client.send_message(_request("spoken in 0.3"))]
    assert text_of(found[-1]) == "echo: spoken in 0.3"
    [seen] = [s for s in env.agents["echo"].seen if s.method == "message/send"]
    assert seen.headers.get("a2a-version", "0.3") == "0.3"  # passed on as the client sent it
    [record] = await env.records(protocol="a2a", user="olga")
    assert record.a2a is not None and record.a2a["method"] == "message/send"


async def test_the_trail_of_agent_traffic_verifies(env: A2AEnv) -> None:
    from audit.store import AuditStore
    from audit.verify import verify

    await _send(env, "echo", _request("for the record"))
    store = await AuditStore.open(env.gw.cfg.audit.url)
    try:
        result = await verify(store, None)
    finally:
        await store.close()
    assert result.problems == [] and result.pending == 0
    assert any(r.a2a for r in await env.records(protocol="a2a"))
