// Vercel @ai-sdk/mcp (needs Node 22). MODE: discover (its default: server/discover, 2026-07-28
// when offered) or legacy (protocolVersionDiscovery: false, initialize).
import { createMCPClient } from "@ai-sdk/mcp";
import { args, main, text } from "./common.mjs";

const { url, token, rest } = args();
const mode = rest[0] ?? "discover";
main(async () => {
  const client = await createMCPClient({
    transport: { type: "http", url, headers: { Authorization: `Bearer ${token}` } },
    protocolVersionDiscovery: mode !== "legacy",
  });
  try {
    // The way an AI SDK app uses it: tools() hands the model executable tools.
    const tools = await client.tools();
    const opts = { toolCallId: "call-1", messages: [] };
    const allowed = await tools.echo.execute({ text: "hello through bastion" }, opts);
    const denied = await tools.transfer.execute({ amount: 5000, to: "acct-1" }, opts);
    return {
      tools: Object.keys(tools).sort(),
      allowed: { isError: Boolean(allowed.isError), text: text(allowed) },
      denied: { isError: Boolean(denied.isError), text: text(denied), structured: denied.structuredContent ?? null },
      protocolVersion: client.initializeResult?.protocolVersion ?? null,
    };
  } finally {
    await client.close();
  }
});
