// @modelcontextprotocol/sdk v1 over Streamable HTTP (2025-11-25, session-based).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { args, main, scenario } from "./common.mjs";

const { url, token } = args();
main(async () => {
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
  });
  const client = new Client({ name: "compat-sdk-v1", version: "1.0.0" });
  await client.connect(transport);
  const out = await scenario(client, {
    protocolVersion: transport.protocolVersion ?? null,
    sessionId: transport.sessionId ?? null,
  });
  await transport.terminateSession();
  await client.close();
  return out;
});
