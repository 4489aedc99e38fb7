// mcp-remote as Claude Desktop runs it: a stdio child process, token in an env var, driven over
// stdin/stdout by an MCP client (here the TS SDK v1's stdio transport). PROTOCOL: legacy or auto.
import { mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { args, main, scenario } from "./common.mjs";

const { url, token, rest } = args();
const protocol = rest[0] ?? "legacy";
const proxy = join(createRequire(import.meta.url).resolve("mcp-remote/package.json"), "..", "dist", "proxy.js");
const configDir = mkdtempSync(join(tmpdir(), "mcp-remote-"));
main(async () => {
  const stderr = [];
  const transport = new StdioClientTransport({
    command: process.execPath,
    args: [proxy, url, "--header", "Authorization:${AUTH}", "--header", "X-Bastion-Client:claude-desktop", "--protocol", protocol],
    env: { ...process.env, AUTH: `Bearer ${token}`, MCP_REMOTE_CONFIG_DIR: configDir },
    stderr: "pipe",
  });
  transport.stderr?.on("data", (chunk) => stderr.push(chunk.toString()));
  const client = new Client({ name: "claude-ai", version: "0.1.0" });
  try {
    await client.connect(transport);
    return await scenario(client, { serverVersion: client.getServerVersion() ?? null, log: stderr.join("").slice(-3000) });
  } catch (err) {
    console.error(stderr.join(""));
    throw err;
  } finally {
    await client.close();
    rmSync(configDir, { recursive: true, force: true });
  }
});
