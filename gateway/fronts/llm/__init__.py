"""The LLM API front: tool calls in model traffic, governed like MCP calls (docs/llm.md)."""
