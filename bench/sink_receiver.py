"""The audit-sink benchmark's HTTP receiver: a SIEM collector that accepts everything, in its own process.

`python -m bench.sink_receiver PORT` serves, at http://127.0.0.1:PORT (uvicorn with httptools and
uvloop, start-up objects frozen, as `bench.upstream` serves the MCP benchmark's upstream):

- `POST` to any path: one batch of an HTTP audit sink (one event per line); answered 200
  `{"text":"Success","code":0}`, as a Splunk HTTP Event Collector answers. The lines are counted,
  and the batch's `X-Bastion-Batch: <instance> <first>-<last>` header tells which records it held,
  so duplicates (at-least-once redelivery) and gaps can be told apart without parsing the events.
- `GET /count`: what arrived so far, as JSON (`Count.to_json`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench.upstream import serve

SUCCESS = b'{"text":"Success","code":0}'


@dataclass
class Count:
    lines: int = 0
    """Events received, duplicates included."""
    batches: int = 0
    size: int = 0
    """Bytes received."""
    seqs: dict[str, set[int]] = field(default_factory=dict)
    """Instance -> the chain positions received (from the batches' headers)."""
    bad_batches: int = 0
    """Batches without a readable header, or whose line count differs from their header's range."""

    def add(self, body: bytes, batch: str | None) -> None:
        lines = body.count(b"\n")
        self.lines += lines
        self.batches += 1
        self.size += len(body)
        instance, _, span = (batch or "").rpartition(" ")
        first, _, last = span.partition("-")
        if not (instance and first.isdigit() and last.isdigit()):
            self.bad_batches += 1
            return
        lo, hi = int(first), int(last)
        if hi - lo + 1 != lines:
            self.bad_batches += 1
        self.seqs.setdefault(instance, set()).update(range(lo, hi + 1))

    def to_json(self) -> dict[str, Any]:
        distinct = sum(len(s) for s in self.seqs.values())
        return {
            "lines": self.lines,
            "batches": self.batches,
            "bytes": self.size,
            "distinct": distinct,
            "duplicates": self.lines - distinct,
            "bad_batches": self.bad_batches,
            "chains": {i: {"min": min(s), "max": max(s), "count": len(s)} for i, s in self.seqs.items() if s},
        }


def app() -> Starlette:
    count = Count()

    async def receive(request: Request) -> Response:
        count.add(await request.body(), request.headers.get("x-bastion-batch"))
        return Response(SUCCESS, media_type="application/json")

    async def report(request: Request) -> Response:
        return JSONResponse(count.to_json())

    return Starlette(
        routes=[
            Route("/count", report, methods=["GET"]),
            Route("/{path:path}", receive, methods=["POST"]),
        ]
    )


def main(port: int) -> None:
    serve(app(), port)


if __name__ == "__main__":
    main(int(sys.argv[1]))
