"""The LLM benchmark's model provider: the tests' `ProviderDouble`, in its own process.

`python -m bench.llm_provider PORT` serves Anthropic Messages, OpenAI Chat Completions and
Responses at http://127.0.0.1:PORT/v1/... (uvicorn with httptools and uvloop, start-up objects
frozen, as `bench.upstream` serves the MCP benchmark's upstream) until terminated.

A separate process cannot be handed scripts one request at a time, so the answer is chosen by
the request's `"model"` (`SCRIPTS`; any other model answers the text "ok"). Requests are not
recorded (the double would keep one per call for the whole run).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from starlette.requests import Request

from bench.upstream import serve
from tests.llm_provider import ProviderDouble, Script, ToolUse

TEXT = "Paris is sunny today, 24 degrees, light wind from the west."
ALLOWED = ToolUse(
    "send_email",
    {"to": "jane.doe@example.com", "subject": "Weather", "body": "Sunny in Paris, 24 degrees."},
)
"""Permitted by the benchmark's policy; its `to` is what a redaction variant replaces."""
DENIED = ToolUse("delete_file", {"path": "/home/jane/notes.txt"})
"""Forbidden by the `no-file-deletion` policy."""
STREAM_DELAY_S = 0.002
"""The pause between two streamed events: a model producing tokens, not a burst."""

SCRIPTS = {
    "bench-text": Script(text=TEXT),
    "bench-tools": Script(text="Let me do both.", tools=[ALLOWED, DENIED]),
    "bench-stream": Script(text=TEXT, tools=[ALLOWED, DENIED], chunk_delay_s=STREAM_DELAY_S),
}


class BenchProvider(ProviderDouble):
    """Answers with `SCRIPTS[model]`, keeping nothing per request."""

    async def _take(self, request: Request) -> tuple[dict[str, Any] | None, Script]:
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return None, Script()
        return body, SCRIPTS.get(str(body.get("model")), Script(text="ok"))


def main(port: int) -> None:
    serve(BenchProvider().app, port)


if __name__ == "__main__":
    main(int(sys.argv[1]))
