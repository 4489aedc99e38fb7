"""The LLM API front, measured: a model call direct to the provider vs. through `/llm/...`.

    python -m bench.llm [-n N] [-c C] [--rounds R] [--no-redaction] [--only KEYS]
                        [--profile FILE] [--work-dir DIR] [--no-write]

Three kinds of process share the machine, as in `python -m bench`: the provider (the tests'
`ProviderDouble` in its own process, `bench.llm_provider`, answering by model name), Bastion
(`bastion serve` on a generated config: the repo's policies plus the tests' model-tool policies,
SQLite audit and state, the dev key's JWKS as issuer, providers `anthropic` and `openai`
reached with a key read from a file) and this process, the load generator (raw httpx, no SDK:
C workers, each with its own client and keep-alive connection, so the client's cost stays small
and the same on every path).

Scenarios (`CASES`): Anthropic Messages without tool calls; with 2 tool calls, one permitted and
one forbidden by policy; the same streamed (text, then the two calls, the provider pausing
`STREAM_DELAY_S` between events: time to first token is when the first `text_delta` arrives);
OpenAI Chat Completions with the same 2 tool calls. Each is sent direct to the provider and through
Bastion, and (unless `--no-redaction`) through a second Bastion that also redacts tool arguments
(the permitted call's `to` holds an e-mail address).

Interleaved: the N calls of every (scenario, path) are split into R rounds; each round runs every
scenario on every path in turn (the paths' order alternating between rounds), so a noisy
neighbour or a drifting machine lands on all of them alike. CPU per call is read from
`/proc/<pid>/stat` around each timed segment (warm-up excluded), per process.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shlex
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import processes
from bench.harness import git_revision, machine
from bench.llm_provider import ALLOWED, DENIED, STREAM_DELAY_S, TEXT
from bench.load import LoadResult
from bench.profile import markdown as profile_markdown
from bench.profile import summarize
from bench.report import replace_section
from gateway.identity.devkeys import DEV_ISSUER, ensure_dev_key
from tests.llm_provider import MODEL_TOOL_POLICIES

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN = "<!-- bench-llm:begin -->"
END = "<!-- bench-llm:end -->"
HEADING = "## LLM API front"
PROVIDER_KEY = "sk-bench-provider-key"
PROFILE_RATE = 500

REDACTION = {**processes.REDACTION, "default": {"arguments": "replace", "results": "replace"}}

TOOLS = [
    {
        "name": "send_email",
        "description": "Send an e-mail.",
        "input_schema": {
            "type": "object",
            "properties": {
                "to": {"type": "string"},
                "subject": {"type": "string"},
                "body": {"type": "string"},
            },
            "required": ["to", "subject", "body"],
        },
    },
    {
        "name": "delete_file",
        "description": "Delete a file.",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    },
]
SYSTEM = "You are a helpful assistant. Use the tools when the user asks for an action."
PROMPT = "What is the weather in Paris? Mail it to Jane, then delete my notes file."


def anthropic_body(model: str, stream: bool = False, tools: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 1024,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    if tools:
        body["tools"] = TOOLS
    if stream:
        body["stream"] = True
    return body


def chat_body(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": t["name"],
                    "description": t["description"],
                    "parameters": t["input_schema"],
                },
            }
            for t in TOOLS
        ],
    }


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    provider: str
    """Bastion's provider name, which is also the API's kind: anthropic or openai."""
    path: str
    body: dict[str, Any]
    stream: bool = False
    tools: bool = True
    """The answer holds tool calls (the redaction path applies)."""


CASES = (
    Case(
        "text",
        "Anthropic Messages, no tool calls",
        "anthropic",
        "/v1/messages",
        anthropic_body("bench-text", tools=False),
        tools=False,
    ),
    Case(
        "tools",
        "Anthropic Messages, 2 tool calls (1 allowed, 1 denied)",
        "anthropic",
        "/v1/messages",
        anthropic_body("bench-tools"),
    ),
    Case(
        "stream",
        "Anthropic Messages streamed, text + 2 tool calls",
        "anthropic",
        "/v1/messages",
        anthropic_body("bench-stream", stream=True),
        stream=True,
    ),
    Case(
        "chat",
        "OpenAI Chat Completions, 2 tool calls (1 allowed, 1 denied)",
        "openai",
        "/v1/chat/completions",
        chat_body("bench-tools"),
    ),
)


@dataclass(frozen=True)
class Arm:
    """One path a call takes: direct to the provider, or through a Bastion."""

    key: str
    title: str
    base: str
    secret: str
    """What the caller authenticates with: the provider's key (direct) or a Bastion token."""
    pid: int | None = None
    """The Bastion process (None: direct)."""

    def url(self, case: Case) -> str:
        if self.pid is None:
            return self.base + case.path
        return f"{self.base}/llm/{case.provider}{case.path}"

    def headers(self, case: Case) -> dict[str, str]:
        hdrs = {"content-type": "application/json"}
        if case.provider == "anthropic":
            hdrs |= {"x-api-key": self.secret, "anthropic-version": "2023-06-01"}
        else:
            hdrs["authorization"] = f"Bearer {self.secret}"
        if case.stream:
            hdrs["accept"] = "text/event-stream"
        return hdrs


# -- reading answers ----------------------------------------------------------------------------


def _read_anthropic(data: bytes) -> tuple[str, list[tuple[str, Any]]]:
    msg = json.loads(data)
    text = "".join(b["text"] for b in msg["content"] if b["type"] == "text")
    return text, [(b["name"], b["input"]) for b in msg["content"] if b["type"] == "tool_use"]


def _read_anthropic_stream(data: bytes) -> tuple[str, list[tuple[str, Any]]]:
    texts: list[str] = []
    tools: dict[int, tuple[str, list[str]]] = {}
    stopped = False
    for line in data.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        kind = event.get("type")
        if kind == "content_block_start" and event["content_block"]["type"] == "tool_use":
            tools[event["index"]] = (event["content_block"]["name"], [])
        elif kind == "content_block_delta":
            delta = event["delta"]
            if delta["type"] == "text_delta":
                texts.append(delta["text"])
            elif delta["type"] == "input_json_delta":
                tools[event["index"]][1].append(delta["partial_json"])
        elif kind == "message_stop":
            stopped = True
    if not stopped:
        raise ValueError("the stream ended without message_stop")
    return "".join(texts), [(name, json.loads("".join(parts) or "{}")) for name, parts in tools.values()]


def _read_chat(data: bytes) -> tuple[str, list[tuple[str, Any]]]:
    message = json.loads(data)["choices"][0]["message"]
    calls = message.get("tool_calls") or []
    return message.get("content") or "", [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ]


def check(case: Case, arm: str, status: int, data: bytes) -> str | None:
    """Why an answer is not the one expected on this path, or None when it is."""
    if status != 200:
        return f"HTTP {status}: {data[:200]!r}"
    try:
        if case.stream:
            text, tools = _read_anthropic_stream(data)
        elif case.provider == "anthropic":
            text, tools = _read_anthropic(data)
        else:
            text, tools = _read_chat(data)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return f"unreadable answer ({type(exc).__name__}: {exc}): {data[:200]!r}"
    if not case.tools:
        return None if (text, tools) == (TEXT, []) else f"unexpected answer: {data[:200]!r}"
    names = [name for name, _ in tools]
    if arm == "direct":
        ok = tools == [(ALLOWED.name, ALLOWED.input), (DENIED.name, DENIED.input)]
    elif arm == "bastion":
        ok = tools == [(ALLOWED.name, ALLOWED.input)] and "no-file-deletion" in text
    else:  # redaction: the e-mail address in the permitted call's arguments is replaced
        to = tools[0][1].get("to") if tools and isinstance(tools[0][1], dict) else None
        ok = names == [ALLOWED.name] and to not in (None, ALLOWED.input["to"]) and "no-file-deletion" in text
    return None if ok else f"unexpected answer on {arm}: {data[:300]!r}"


# -- the load -----------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one (scenario, path) has measured so far, over all its rounds."""

    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)

    def result(self) -> LoadResult:
        n = len(self.latencies_ms)
        cpu = {k: v / n * 1000 for k, v in self.cpu_s.items()} if n else {}
        first = self.errors[0] if self.errors else None
        return LoadResult(n, len(self.errors), self.seconds, self.latencies_ms, first, cpu)

    def ttft(self) -> LoadResult | None:
        if not self.ttft_ms:
            return None
        return LoadResult(len(self.ttft_ms), 0, self.seconds, self.ttft_ms)


async def _one(
    client: httpx.AsyncClient, case: Case, arm: Arm, url: str, body: bytes
) -> tuple[float, float | None, str | None]:
    """One call: (latency, time to the first text delta (streams), problem)."""
    headers = arm.headers(case)
    t0 = time.perf_counter()
    first: float | None = None
    try:
        if case.stream:
            chunks: list[bytes] = []
            tail = b""
            async with client.stream("POST", url, content=body, headers=headers) as response:
                async for chunk in response.aiter_bytes():
                    if first is None and b'"text_delta"' in tail + chunk:
                        first = time.perf_counter() - t0
                    tail = chunk[-16:]
                    chunks.append(chunk)
                status, data = response.status_code, b"".join(chunks)
        else:
            response = await client.post(url, content=body, headers=headers)
            status, data = response.status_code, response.content
        latency = time.perf_counter() - t0
        problem = check(case, arm.key, status, data)
    except httpx.HTTPError as exc:
        latency, problem = time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
    return latency * 1000, None if first is None else first * 1000, problem


_LIMITS = httpx.Limits(max_connections=1, max_keepalive_connections=1)
_TLS = ssl.create_default_context()
"""Shared by every client (all plain http): a client builds a new one otherwise, at ~10 ms each."""


async def _segment(
    case: Case, arm: Arm, count: int, concurrency: int, tally: Tally | None, provider: int
) -> None:
    """`count` calls, `concurrency` at a time; recorded into `tally` (None: warm-up).

    Each of the `concurrency` workers is one agent with its own client and keep-alive connection
    (see `bench.load.drive`), opened for this segment only: a connection left idle while the
    other paths run would meet the server's 5 s keep-alive timeout, and now and then be closed by
    the server just as a request is sent on it (a ReadError that is nobody's fault but the harness's).
    """
    clients = [httpx.AsyncClient(limits=_LIMITS, timeout=60, verify=_TLS) for _ in range(concurrency)]
    try:
        await _calls(clients, case, arm, count, tally, provider)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


async def _calls(
    clients: list[httpx.AsyncClient], case: Case, arm: Arm, count: int, tally: Tally | None, provider: int
) -> None:
    url, body = arm.url(case), json.dumps(case.body, separators=(",", ":")).encode()
    remaining = count
    latencies: list[float] = []
    ttfts: list[float] = []
    errors: list[str] = []

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latency, first, problem = await _one(client, case, arm, url, body)
            latencies.append(latency)
            if first is not None:
                ttfts.append(first)
            if problem:
                errors.append(problem)

    pids = {"provider": provider, **({"bastion": arm.pid} if arm.pid else {})}
    # as in bench.load: a collection in the load generator would stall every call in flight
    gc.collect()
    gc.disable()
    before = {name: processes.cpu_seconds(pid) for name, pid in pids.items()}
    own, t0 = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        gc.enable()
    seconds, own = time.perf_counter() - t0, time.process_time() - own
    if errors:
        where = "warm-up" if tally is None else "run"
        raise RuntimeError(
            f"{case.key} on {arm.key} ({where}): {len(errors)} of {count} failed; first: {errors[0]}"
        )
    if tally is None:
        return
    tally.latencies_ms += latencies
    tally.ttft_ms += ttfts
    tally.seconds += seconds
    spent = {name: processes.cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    for name, value in {"load generator": own, **spent}.items():
        tally.cpu_s[name] = tally.cpu_s.get(name, 0.0) + value


def arms_for(case: Case, arms: list[Arm]) -> list[Arm]:
    return [a for a in arms if a.key != "redaction" or case.tools]


async def drive(
    cases: list[Case], arms: list[Arm], provider: int, n: int, concurrency: int, rounds: int, warmup: int
) -> dict[tuple[str, str], Tally]:
    """Warm every (scenario, path) up, then run the rounds; `provider` is the provider's pid."""
    tallies = {(c.key, a.key): Tally() for c in cases for a in arms_for(c, arms)}
    # what is alive now lives through the run: frozen, the collection before each segment skips it
    gc.collect()
    gc.freeze()
    try:
        for case in cases:
            for arm in arms_for(case, arms):
                await _segment(case, arm, warmup, concurrency, None, provider)
        for r in range(rounds):
            count = n // rounds + (1 if r < n % rounds else 0)
            for case in cases:
                order = arms_for(case, arms)
                for arm in order if r % 2 == 0 else reversed(order):
                    tally = tallies[(case.key, arm.key)]
                    await _segment(case, arm, count, concurrency, tally, provider)
    finally:
        gc.unfreeze()
    return tallies


# -- the processes ------------------------------------------------------------------------------


def gateway_config(work: Path, provider_url: str, port: int, redaction: bool) -> dict[str, Any]:
    """Bastion's config: the repo's policies plus `MODEL_TOOL_POLICIES`, SQLite audit and state in `work`."""
    key = ensure_dev_key(work)
    policies = work / "policies"
    if not policies.exists():
        shutil.copytree(processes.REPO / "policies", policies)
        (policies / "llm.cedar").write_text(MODEL_TOOL_POLICIES)
    secret = work / "provider-key"
    secret.write_text(PROVIDER_KEY + "\n")
    name = "bastion-redaction" if redaction else "bastion"
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(key.jwks_path)}]},
        "policy": {"dir": str(policies)},
        "audit": {"url": f"sqlite+aiosqlite:///{work / f'{name}-audit.db'}"},
        "state": {"url": f"sqlite+aiosqlite:///{work / f'{name}-state.db'}"},
        "data_dir": str(work),
        "llm": {
            "providers": {
                "anthropic": {
                    "kind": "anthropic",
                    "url": provider_url,
                    "credential": {"header": "x-api-key", "file": str(secret)},
                },
                "openai": {
                    "kind": "openai",
                    "url": provider_url,
                    "credential": {"header": "authorization", "prefix": "Bearer ", "file": str(secret)},
                },
            }
        },
    }
    if redaction:
        cfg["redaction"] = REDACTION
    return cfg


@contextmanager
def gateway(
    work: Path, provider_url: str, redaction: bool, ready: bool = True
) -> Iterator[tuple[processes.Proc, str, str]]:
    """A Bastion process; yields it, its base URL and a token for a developer meant for it (with
    `ready=False`, before it is ready: see `processes.bastion`)."""
    port = processes.free_port()
    cfg = gateway_config(work, provider_url, port, redaction)
    name = "bastion-redaction" if redaction else "bastion"
    with processes.bastion(work, cfg, name, ready) as (proc, _):
        base = f"http://127.0.0.1:{port}"
        token = ensure_dev_key(work).mint("bench", audience=base, groups=["developers"])
        yield proc, base, token


# -- the run ------------------------------------------------------------------------------------


@dataclass
class LLMRun:
    n: int
    concurrency: int
    rounds: int
    command: str
    machine: str
    started: str
    cases: list[Case]
    arms: list[tuple[str, str]]
    """(key, title) of each path."""
    results: dict[tuple[str, str], LoadResult] = field(default_factory=dict)
    ttft: dict[tuple[str, str], LoadResult] = field(default_factory=dict)
    profile: str = ""


def run(
    n: int,
    concurrency: int,
    command: str,
    *,
    rounds: int = 5,
    redaction: bool = True,
    only: list[str] | None = None,
    profile: Path | None = None,
    work_dir: Path | None = None,
) -> LLMRun:
    cases = [c for c in CASES if not only or c.key in only]
    rounds = max(1, min(rounds, n))
    warmup = min(100, max(n // 10, concurrency))
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="bastion-bench-llm-") as tmp, ExitStack() as stack:
        work = work_dir or Path(tmp)
        # started together, ready together: each spends seconds importing
        provider, provider_url = stack.enter_context(processes.llm_provider(work, ready=False))
        arms = [Arm("direct", "direct to the provider", provider_url, PROVIDER_KEY)]
        proc, base, token = stack.enter_context(gateway(work, provider_url, False, ready=False))
        arms.append(Arm("bastion", "through Bastion", base, token, proc.pid))
        if redaction:
            rproc, rbase, rtoken = stack.enter_context(gateway(work, provider_url, True, ready=False))
            arms.append(Arm("redaction", "through Bastion + redaction", rbase, rtoken, rproc.pid))
        processes.wait_llm_provider(provider, provider_url)
        processes.wait_bastion(proc, base)
        if redaction:
            processes.wait_bastion(rproc, rbase)
        result = LLMRun(
            n, concurrency, rounds, command, machine(), started, cases, [(a.key, a.title) for a in arms]
        )
        out = None
        if profile is not None:
            out = profile
            stack.enter_context(processes.profiled(proc.pid, out, PROFILE_RATE))
        cpu0 = processes.cpu_seconds(proc.pid)
        tallies = asyncio.run(drive(cases, arms, provider.pid, n, concurrency, rounds, warmup))
        served = (n + warmup) * len(cases)
        cpu_us = (processes.cpu_seconds(proc.pid) - cpu0) / served * 1e6
    if out is not None:
        result.profile = profile_markdown(summarize(out, served, PROFILE_RATE, cpu_us))
    for key, tally in tallies.items():
        result.results[key] = tally.result()
        if (ttft := tally.ttft()) is not None:
            result.ttft[key] = ttft
    return result


# -- the report ---------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.2f}"


def render(r: LLMRun) -> str:
    titles = dict(r.arms)
    lines = [
        BEGIN,
        "### Latest run",
        "",
        f"- command: `{r.command}`",
        f"- when: {r.started}; code: {git_revision()}",
        f"- machine: {r.machine}",
        f"- N = {r.n} calls per scenario and path (after a warm-up), concurrency C = {r.concurrency}, "
        f"interleaved in {r.rounds} rounds; load generator: raw httpx, one keep-alive connection per "
        "worker and path",
        f"- provider: the tests' `ProviderDouble` in its own process; streams pause "
        f"{STREAM_DELAY_S * 1000:g} ms between events",
        "",
        "| scenario | path | calls/s | p50 ms | p99 ms | added p50 ms | added p99 ms | calls/s ratio "
        "| Bastion CPU ms/call |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in r.cases:
        direct = r.results[(case.key, "direct")]
        for key, _ in r.arms:
            res = r.results.get((case.key, key))
            if res is None:
                continue
            name = case.title if key == "direct" else ""
            cells = [name, titles[key], f"{res.calls_per_s:,.0f}", _ms(res.p50), _ms(res.p99)]
            if key == "direct":
                cells += ["", "", "", ""]
            else:
                cells += [
                    f"{res.p50 - direct.p50:+.2f}",
                    f"{res.p99 - direct.p99:+.2f}",
                    f"{res.calls_per_s / direct.calls_per_s:.2f}",
                    _ms(res.cpu_ms_per_call.get("bastion", float("nan"))),
                ]
            lines.append(f"| {' | '.join(cells)} |")
    if r.ttft:
        lines += [
            "",
            "Time to first token (the first `text_delta` at the client):",
            "",
            "| scenario | path | p50 ms | p99 ms | added p50 ms | added p99 ms |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for case in r.cases:
            d = r.ttft.get((case.key, "direct"))
            if d is None:
                continue
            for key, _ in r.arms:
                t = r.ttft.get((case.key, key))
                if t is None:
                    continue
                added = ["", ""] if key == "direct" else [f"{t.p50 - d.p50:+.2f}", f"{t.p99 - d.p99:+.2f}"]
                name = case.title if key == "direct" else ""
                lines.append(
                    f"| {name} | {titles[key]} | {_ms(t.p50)} | {_ms(t.p99)} | {' | '.join(added)} |"
                )
    lines += [
        "",
        "CPU time per call, by process (ms; all share the machine's cores):",
        "",
        "| scenario | path | load generator | provider | Bastion |",
        "|---|---|---:|---:|---:|",
    ]
    for case in r.cases:
        for key, _ in r.arms:
            res = r.results.get((case.key, key))
            if res is None:
                continue
            cpu = res.cpu_ms_per_call
            cells = [_ms(cpu[k]) if k in cpu else "" for k in ("load generator", "provider", "bastion")]
            lines.append(f"| {case.key} | {key} | {' | '.join(cells)} |")
    if r.profile:
        lines += ["", "#### Profile of Bastion (all its scenarios, warm-up included)", "", r.profile]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write(path: Path, section: str) -> None:
    """Replace this benchmark's section in `path` (appended under `HEADING` the first time)."""
    replace_section(path, section, BEGIN, END, HEADING)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llm", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=1000, help="calls per scenario and path (default 1000)")
    p.add_argument("-c", "--concurrency", type=int, default=8, help="calls in flight (default 8)")
    p.add_argument("--rounds", type=int, default=5, help="interleaving rounds (default 5)")
    p.add_argument("--no-redaction", action="store_true", help="skip the Bastion + redaction path")
    p.add_argument("--only", help=f"comma-separated scenarios: {','.join(c.key for c in CASES)}")
    p.add_argument("--profile", type=Path, help="sample Bastion (no redaction) with py-spy to FILE")
    p.add_argument("--work-dir", type=Path, help="keep configs, databases and logs here (default: temporary)")
    p.add_argument("--output", type=Path, default=DOC, help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.rounds < 1:
        p.error("-n, -c and --rounds must be at least 1")
    only = args.only.split(",") if args.only else None
    if only and (unknown := set(only) - {c.key for c in CASES}):
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    command = shlex.join(["python", "-m", "bench.llm", *(sys.argv[1:] if argv is None else argv)])
    result = run(
        args.n,
        args.concurrency,
        command,
        rounds=args.rounds,
        redaction=not args.no_redaction,
        only=only,
        profile=args.profile,
        work_dir=args.work_dir,
    )
    section = render(result)
    print(section)
    if not args.no_write:
        write(args.output, section)
        print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
