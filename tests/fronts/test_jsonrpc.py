"""`gateway.fronts.jsonrpc.parse`: what one JSON-RPC message may hold before a front acts on it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import ProtocolError
from gateway.fronts import jsonrpc


def request(method: Any = "tools/call", **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


def refusal(body: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as refused:
        jsonrpc.parse(body)
    return refused.value


@pytest.mark.parametrize(
    "method",
    [
        "tools/call",
        "notifications/cancelled",
        "io.modelcontextprotocol/subscriptions",
        "logging/setLevel",
        "a:b_c-d.e",
        "m" * jsonrpc.MAX_METHOD,
    ],
)
def test_mcp_methods_are_accepted(method: str) -> None:
    assert jsonrpc.parse(request(method))["method"] == method


@pytest.mark.parametrize(
    ("method", "why"),
    [
        ("tools/list\r\nContent-Length: 0", "holds the character U+000D at offset 10"),
        ("tools/list\nX: y", "holds the character U+000A at offset 10"),
        ("tools/list\x00", "holds the character U+0000 at offset 10"),
        ("tools/list\t", "holds the character U+0009 at offset 10"),
        ("tools/list\x7f", "holds the character U+007F at offset 10"),
        ("tools/list\x85", "holds the character U+0085 at offset 10"),
        ("tools list", "holds the character U+0020 at offset 5"),
        ("tools/caf\u00e9", "holds the character U+00E9 at offset 9"),
        ("tools/call\u2028", "holds the character U+2028 at offset 10"),
        ("tools?call", "holds the character U+003F at offset 5"),
        ("", "must be 1 to 128 characters long (it has 0)"),
        ("m" * (jsonrpc.MAX_METHOD + 1), "must be 1 to 128 characters long (it has 129)"),
    ],
    ids=[
        "crlf",
        "lf",
        "nul",
        "tab",
        "del",
        "c1",
        "space",
        "non-ascii",
        "line-separator",
        "query",
        "empty",
        "long",
    ],
)
def test_a_method_outside_the_strict_set_is_refused(method: str, why: str) -> None:
    err = refusal(request(method))
    assert err.jsonrpc_code == jsonrpc.INVALID_REQUEST
    assert err.message.startswith(f'"method" {why}')
    assert err.message.isascii() and err.message.isprintable(), "the refusal must not echo what it refuses"


def test_a_response_has_no_method_to_check() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"result":{"text":"a\\r\\nb"}}'
    assert jsonrpc.parse(body)["result"] == {"text": "a\r\nb"}


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"\\ud800"}', "in method"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"a":"x\\ud800"}}', "in params.a"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"a":"\\uDFFF"}}', "in params.a"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"a":"\\udc00\\ud800"}}', "in params.a"),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"\\ud800":1}}', "in a key of params"),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
            b'"params":{"arguments":{"items":[1,{"deep":["ok","\\udbff"]}]}}}',
            "in params.arguments.items[1].deep[1]",
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"we\\u000bird":{"\\ud800k":1}}}',
            "in a key of params['we\\x0bird']",
        ),
        (b'{"jsonrpc":"2.0","id":"\\ud800","method":"ping"}', "in id"),
    ],
    ids=["method", "params", "low-upper-hex", "reversed-pair", "key", "nested", "odd-key", "id"],
)
def test_a_lone_surrogate_is_refused(body: bytes, where: str) -> None:
    err = refusal(body)
    assert err.jsonrpc_code == jsonrpc.PARSE_ERROR
    assert err.message.startswith("a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair) ")
    assert f" {where}: " in err.message
    assert err.message.encode("utf-8"), "the refusal itself must be valid Unicode"


@pytest.mark.parametrize(
    ("escaped", "text"),
    [
        (b"caf\\u00e9", "caf\u00e9"),
        (b"\\ud83d\\ude00", "\U0001f600"),
        (b"\\uD83D\\uDE00", "\U0001f600"),
        (b"\\\\ud800", "\\ud800"),
        (b"\\u00e9\\ud7ff\\ue000", "\u00e9\ud7ff\ue000"),
    ],
    ids=["e-acute", "pair", "pair-upper-hex", "escaped-backslash", "around-the-range"],
)
def test_escapes_that_make_valid_unicode_pass(escaped: bytes, text: str) -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"t":"%s"}}' % escaped
    assert jsonrpc.parse(body)["params"]["t"] == text


def test_a_plain_body_is_not_walked_for_surrogates(monkeypatch: pytest.MonkeyPatch) -> None:
    def walked(value: Any) -> str | None:
        raise AssertionError("walked a body without a surrogate escape")

    monkeypatch.setattr(jsonrpc, "_lone_surrogate", walked)
    raw = "caf\u00e9 \U0001f600 \\u00e9 \\ud7ff".encode()
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"text":"%s"}}' % raw
    assert jsonrpc.parse(body)["params"]["text"] == "caf\u00e9 \U0001f600 \u00e9 \ud7ff"


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"t":"\xed\xa0\x80"}}',
        '{"jsonrpc":"2.0","id":1,"method":"ping"}'.encode("utf-16"),
        b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"t":"\xff"}}',
    ],
    ids=["surrogate-encoded-in-utf8", "utf-16", "invalid-utf8"],
)
def test_a_body_that_is_not_utf8_is_a_parse_error(body: bytes) -> None:
    err = refusal(body)
    assert err.jsonrpc_code == jsonrpc.PARSE_ERROR
    assert err.message == "body is not valid JSON: it is not UTF-8 text"


def test_a_utf8_byte_order_mark_is_still_accepted() -> None:
    assert jsonrpc.parse(b'\xef\xbb\xbf{"jsonrpc":"2.0","id":1,"method":"ping"}')["method"] == "ping"


def test_parse_json_refuses_lone_surrogates_too() -> None:
    """The HTTP tool API parses its bodies with `parse_json`, not `parse`."""
    with pytest.raises(ProtocolError) as refused:
        jsonrpc.parse_json(b'{"tool":"echo","arguments":{"text":"\\ud800"}}')
    assert refused.value.jsonrpc_code == jsonrpc.PARSE_ERROR
    assert "lone UTF-16 surrogate" in refused.value.message
    assert "arguments.text" in refused.value.message
    assert jsonrpc.parse_json(b'{"tool":"echo","arguments":{"text":"\\ud83d\\ude00"}}')["arguments"] == {
        "text": "\U0001f600"
    }
