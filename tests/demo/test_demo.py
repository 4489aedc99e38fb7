"""`bastion demo` as a user meets it: started as a real process from an empty directory, driven
with the token it prints, over both MCP eras, with the SDK's own client.

The demo must work wherever it is started: the only thing it may leave in the working directory
is its data dir `.bastion/`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import httpx2
import mcp_types as types
import pytest
from conftest import REPO, free_port
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

MODES = ["legacy", "2026-07-28"]
WELCOME = "Bastion governs every tool call that crosses it."


@dataclass
class Demo:
    url: str
    token: str
    banner: str
    cwd: Path
    base: str


def bastion() -> list[str]:
    """The installed `bastion` console script when it sits beside this Python, else its entry point."""
    script = shutil.which("bastion", path=str(Path(sys.executable).parent))
    if script:
        return [script]
    return [sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())"]


def environment() -> dict[str, str]:
    """This process's environment, with the repository importable and no config of the caller's."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("BASTION_CONFIG", None)
    return env


@pytest.fixture(scope="module")
async def demo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Demo]:
    cwd = tmp_path_factory.mktemp("demo-cwd")
    log_path = tmp_path_factory.mktemp("demo-log") / "bastion-demo.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *bastion(), "demo", "--port", str(port), cwd=cwd, env=environment(), stdout=log, stderr=log
        )
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            for _ in range(600):
                if proc.returncode is not None:
                    break
                try:
                    if (await http.get(f"{base}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        output = log_path.read_text()
        assert proc.returncode is None, f"bastion demo exited with {proc.returncode}:\n{output[-3000:]}"
        token = re.search(r"^export BASTION_TOKEN=(\S+)$", output, re.M)
        url = re.search(r"MCP URL \(point your MCP client here\):\s+(\S+)", output)
        assert token and url, f"no token or URL in the banner:\n{output[-3000:]}"
        yield Demo(url.group(1), token.group(1), output, cwd, base)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise AssertionError(
                    f"bastion demo ignored SIGTERM:\n{log_path.read_text()[-3000:]}"
                ) from None
            assert proc.returncode == 0, f"bastion demo stopped badly:\n{log_path.read_text()[-3000:]}"


@asynccontextmanager
async def client(demo: Demo, mode: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"authorization": f"Bearer {demo.token}"}, timeout=10) as hc,
        Client(streamable_http_client(demo.url, http_client=hc), mode=mode) as c,
    ):
        yield c


def text_of(block: object) -> str:
    assert isinstance(block, types.TextContent | types.TextResourceContents), block
    return block.text


async def test_banner_and_working_directory(demo: Demo) -> None:
    assert demo.url == f"{demo.base}/mcp/demo"
    assert "resources/read" in demo.banner and "prompts/get" in demo.banner
    assert sorted(p.name for p in demo.cwd.iterdir()) == [".bastion"], "only the data dir may land in the cwd"
    assert (demo.cwd / ".bastion" / "audit.db").exists()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_the_printed_curl_call_works(demo: Demo) -> None:
    """The copy-paste call in the banner, pasted into a shell as printed."""
    start = demo.banner.index("export BASTION_TOKEN=")
    script = demo.banner[start : demo.banner.index("\n\n", start)]
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert '"text":"hello"' in out.decode().replace(" ", "")


@pytest.mark.parametrize("mode", MODES)
async def test_tools(demo: Demo, mode: str) -> None:
    async with client(demo, mode) as c:
        names = {t.name for t in (await c.list_tools()).tools}
        assert {"echo", "add", "read_note"} <= names and "delete_note" not in names
        result = await c.call_tool("echo", {"text": "hello"})
    assert result.is_error is False and text_of(result.content[0]) == "hello"


@pytest.mark.parametrize("mode", MODES)
async def test_resources(demo: Demo, mode: str) -> None:
    """A developer token lists and reads the demo's notes as resources."""
    async with client(demo, mode) as c:
        uris = {str(r.uri) for r in (await c.list_resources()).resources}
        assert "notes://welcome" in uris
        templates = {t.uri_template for t in (await c.list_resource_templates()).resource_templates}
        assert "notes://{name}" in templates
        read = await c.read_resource("notes://welcome")
    assert text_of(read.contents[0]) == WELCOME


@pytest.mark.parametrize("mode", MODES)
async def test_prompts(demo: Demo, mode: str) -> None:
    """A developer token lists and gets the demo's prompt."""
    async with client(demo, mode) as c:
        prompts = {p.name for p in (await c.list_prompts()).prompts}
        assert "review_note" in prompts
        got = await c.get_prompt("review_note", {"name": "welcome"})
    text = text_of(got.messages[0].content)
    assert "Review the note 'welcome'" in text and WELCOME in text


async def test_the_printed_audit_command_shows_every_kind(demo: Demo) -> None:
    """Reads and prompts are decided and audited like tool calls; the banner's export shows them."""
    async with client(demo, "2026-07-28") as c:
        await c.call_tool("echo", {"text": "audited"})
        await c.read_resource("notes://welcome")
        await c.get_prompt("review_note", {"name": "welcome"})
    hint = re.search(r"Audit: (bastion audit export [^(]+?)\s+\(", demo.banner)
    assert hint, demo.banner
    args = hint.group(1).split()[1:]
    proc = await asyncio.create_subprocess_exec(
        *bastion(), *args, cwd=demo.cwd, env=environment(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    records = [json.loads(line) for line in out.decode().splitlines()]
    seen = {(r["action"], r["tool"], r["decision"]["effect"]) for r in records}
    assert {
        ("call_tool", "echo", "allow"),
        ("read_resource", "notes://welcome", "allow"),
        ("get_prompt", "review_note", "allow"),
    } <= seen
