// @modelcontextprotocol/client (TS SDK v2): MODE is legacy, auto or a pinned version (2026-07-28).
import { Client, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";
import { args, main, scenario } from "./common.mjs";

const { url, token, rest } = args();
const modeArg = rest[0] ?? "legacy";
const mode = modeArg === "legacy" || modeArg === "auto" ? modeArg : { pin: modeArg };
main(async () => {
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
  });
  const client = new Client({ name: "compat-sdk-v2", version: "2.0.0" }, { versionNegotiation: { mode } });
  await client.connect(transport);
  const out = await scenario(client, {
    era: client.getProtocolEra() ?? null,
    protocolVersion: client.getNegotiatedProtocolVersion() ?? null,
    sessionId: transport.sessionId ?? null,
  });
  await client.close();
  return out;
});
