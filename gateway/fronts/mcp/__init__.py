"""The MCP front: Streamable HTTP in both eras, on `/mcp/<upstream>` and the aggregate `/mcp`."""
