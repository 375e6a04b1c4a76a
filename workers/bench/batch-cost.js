#!/usr/bin/env node
// The per-batch cost of calling a transpiled component through jco's JSPI bindings,
// outside workerd (whose clock only advances on I/O): crl-invalidation over batches of
// 10 events, with capabilities that answer at once (async, as a Durable Object call is).
// Needs a Node whose V8 has `WebAssembly.Suspending` (Node ≥ 24; Node 22's JSPI flag has
// the older API): `npm run build && node --experimental-wasm-jspi bench/batch-cost.js`.

import { readFileSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import * as cli from "@bytecodealliance/preview2-shim/cli";
import * as io from "@bytecodealliance/preview2-shim/io";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dir = join(root, "gen/components/crl-invalidation");
const { instantiate } = await import(join(dir, "component.js"));
let calls = 0;
const imports = {
  "clawdentity:queues/types": {},
  "clawdentity:queues/log": { write() {} },
  "clawdentity:queues/trust-store": {
    revokeAgent: async () => (calls++, { tag: "ok", val: undefined }),
    isRevoked: async () => (calls++, { tag: "ok", val: false }),
  },
  "wasi:cli/environment": cli.environment, "wasi:cli/exit": cli.exit, "wasi:cli/stdin": cli.stdin,
  "wasi:cli/stdout": cli.stdout, "wasi:cli/stderr": cli.stderr, "wasi:cli/terminal-input": cli.terminalInput,
  "wasi:cli/terminal-output": cli.terminalOutput, "wasi:cli/terminal-stderr": cli.terminalStderr,
  "wasi:cli/terminal-stdin": cli.terminalStdin, "wasi:cli/terminal-stdout": cli.terminalStdout,
  "wasi:io/error": io.error, "wasi:io/poll": io.poll, "wasi:io/streams": io.streams,
};
const root_ = await instantiate((name) => WebAssembly.compile(readFileSync(join(dir, name))), imports);
const enc = new TextEncoder();
const message = (i, type) => ({
  id: `m${i}`, attempts: 1, timestampMs: 0n, contentType: "json",
  body: enc.encode(JSON.stringify({ type, version: "v1", data: { reason: "agent_revoked", metadata: { agentDid: "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB" } } })),
});
for (const [label, type] of [["revocations (1 async import each)", "agent.auth.revoked"], ["other events (no import)", "agent.auth.issued"]]) {
  const batch = Array.from({ length: 10 }, (_, i) => message(i, type));
  for (let i = 0; i < 200; i++) await root_.handler.handle("clawdentity-events", batch);
  const n = 2000;
  const started = performance.now();
  for (let i = 0; i < n; i++) await root_.handler.handle("clawdentity-events", batch);
  const us = ((performance.now() - started) * 1000) / n;
  console.log(`transpiled crl-invalidation, batch of 10 ${label}: ${us.toFixed(1)} µs per batch`);
}
console.log(`(${calls} capability calls)`);
