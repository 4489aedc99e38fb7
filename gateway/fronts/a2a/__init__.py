"""The A2A front: agent-to-agent messages, governed like tool calls (docs/a2a.md)."""
