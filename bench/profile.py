"""Read py-spy's collapsed stacks and say where Bastion's CPU goes, per call."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")
WATCH = (
    "gateway/fronts/mcp/endpoint.py",
    "gateway/fronts/llm/",
    "gateway/upstreams/llm_provider.py",
    "gateway/pipeline.py",
    "gateway/upstreams/streamable_http.py",
    "gateway/identity/authenticator.py",
    "gateway/policy/engine.py",
    "audit/writer.py",
    "audit/store.py",
    "gateway/logs.py",
    "gateway/metrics.py",
)


@dataclass(frozen=True)
class Hotspot:
    where: str
    samples: int
    share: float
    us_per_call: float


@dataclass(frozen=True)
class Profile:
    samples: int
    seconds: float
    cpu_us_per_call: float
    inclusive: list[Hotspot]
    self_time: list[Hotspot]
    areas: list[Hotspot]


def _frame_key(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return m["func"], path


def _area(path: str) -> str:
    if not path:
        return "(no Python frame: native code)"
    if path.startswith(("gateway/", "audit/")):
        return path
    top = path.split("/", 1)[0]
    return top.removesuffix(".py") or path


def summarize(
    raw: Path, calls: int, rate: int, cpu_us_per_call: float | None = None, top: int = 15
) -> Profile:
    """`calls` is how many tool calls the profiled process served while sampled at `rate` Hz.

    py-spy counts a thread that is runnable but waiting for a core as busy, so on a loaded
    machine samples overstate CPU. With `cpu_us_per_call` (measured from /proc) each share is
    converted to µs of that measured CPU instead.
    """
    incl: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_frame_key(f) for f in stack.split(";")]
        seen: set[str] = set()
        for func, path in frames:
            key = f"{func} ({path})"
            if key not in seen:
                seen.add(key)
                incl[key] += count
        func, path = frames[-1]
        self_[f"{func} ({path})"] += count
        areas[_area(path)] += count

    sampled = total / rate / calls * 1e6 if calls else 0.0
    per_call = cpu_us_per_call or sampled

    def hot(counter: Counter[str], keep: int, only_watched: bool = False) -> list[Hotspot]:
        items = [(k, v) for k, v in counter.most_common() if not only_watched or any(w in k for w in WATCH)]
        return [Hotspot(k, v, v / total if total else 0, v / total * per_call) for k, v in items[:keep]]

    return Profile(
        samples=total,
        seconds=total / rate,
        cpu_us_per_call=per_call,
        inclusive=hot(incl, 25, only_watched=True),
        self_time=hot(self_, top),
        areas=hot(areas, top),
    )


def markdown(p: Profile) -> str:
    def table(title: str, rows: list[Hotspot]) -> list[str]:
        out = [f"**{title}**", "", "| where | share of CPU samples | µs CPU per call |", "|---|---:|---:|"]
        out += [f"| `{h.where}` | {h.share:.1%} | {h.us_per_call:,.0f} |" for h in rows]
        return [*out, ""]

    lines = [
        f"Bastion process: {p.samples} py-spy samples (all threads); "
        f"**{p.cpu_us_per_call:,.0f} µs of CPU per call** measured, split below by share of samples.",
        "",
    ]
    lines += table("By package / file (self time)", p.areas)
    lines += table("Request-path functions (inclusive)", p.inclusive)
    lines += table("Hottest functions (self time)", p.self_time)
    return "\n".join(lines)
