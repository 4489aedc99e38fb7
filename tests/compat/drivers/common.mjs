// The scenario every client runs: list tools, call an allowed tool, call a denied one.
// Prints one JSON line on stdout for the Python side to check.

export function args() {
  const [url, token, ...rest] = process.argv.slice(2);
  if (!url || !token) {
    console.error("usage: node DRIVER URL TOKEN [MODE]");
    process.exit(2);
  }
  return { url, token, rest };
}

export function text(result) {
  return (result?.content ?? []).filter((c) => c.type === "text").map((c) => c.text).join("\n");
}

export async function scenario(client, extra = {}) {
  const listed = await client.listTools();
  const allowed = await client.callTool({ name: "echo", arguments: { text: "hello through bastion" } });
  const denied = await client.callTool({ name: "transfer", arguments: { amount: 5000, to: "acct-1" } });
  return {
    tools: listed.tools.map((t) => t.name).sort(),
    allowed: { isError: Boolean(allowed.isError), text: text(allowed) },
    denied: { isError: Boolean(denied.isError), text: text(denied), structured: denied.structuredContent ?? null },
    ...extra,
  };
}

export async function main(run) {
  try {
    const out = await run();
    process.stdout.write(JSON.stringify(out) + "\n");
    process.exit(0);
  } catch (err) {
    console.error(err?.stack ?? String(err));
    process.exit(1);
  }
}
