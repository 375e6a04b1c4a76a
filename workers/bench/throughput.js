#!/usr/bin/env node
// Messages/s through the Worker in workerd (Miniflare: publish over HTTP → queue →
// crl-invalidation → trust-state and relay-session objects → ack) and, when CLAWQ_BIN
// names a clawq binary, through `clawq serve` with the same handler, the same messages
// and the same batching (10 per batch, 5 s timeout). `npm run bench [-- N]`.

import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { call, eventually, newAgentDid, startWorker } from "../test/harness.js";

const count = Number(process.argv[2] ?? 1000);

/** `count` revocation events, each for its own agent. */
function revocations() {
  return Array.from({ length: count }, (_, i) => ({
    body: { id: `evt-${i}`, type: "agent.auth.revoked", version: "v1", timestampUtc: "2026-11-24T10:00:00.000Z",
      initiatedByAccountId: null, data: { reason: "agent_revoked", metadata: { agentDid: newAgentDid() } } },
  }));
}

/**
 * Publishes every message in batches of 100 to `base` with `token`; returns the DIDs.
 * @returns {Promise<string[]>}
 */
async function publishAll(base, token) {
  const messages = revocations();
  for (let i = 0; i < messages.length; i += 100) {
    const answer = await call(base, "/v1/queues/clawdentity-events/messages/batch", { token, body: { messages: messages.slice(i, i + 100) } });
    if (answer.status !== 200) throw new Error(answer.text);
  }
  return messages.map((m) => m.body.data.metadata.agentDid);
}

/** Fails unless the trust store at `base` holds every one of `dids` revoked. */
async function checkRevoked(base, token, dids) {
  for (const did of dids) {
    const t = await call(base, `/v1/trust/agents/${did}`, { token });
    if (!t.json?.revoked) throw new Error(`${did} is not revoked: ${t.text}`);
  }
}

/** Messages/s through the Worker in Miniflare, and its per-batch handler times. */
async function worker() {
  const w = await startWorker({ batchTimeout: 5 });
  try {
    const handled = () => [...w.output().matchAll(/batch clawdentity-events of (\d+): handlers ([\d.]+) ms/g)];
    const started = performance.now();
    const dids = await publishAll(w.base, undefined);
    await eventually(`${count} messages handled`, () => handled().reduce((n, m) => n + Number(m[1]), 0) >= count, 300000);
    const seconds = (performance.now() - started) / 1000;
    await checkRevoked(w.base, undefined, dids);
    const batches = handled();
    const perBatch = batches.map((m) => Number(m[2])).sort((a, b) => a - b);
    return { rate: count / seconds, seconds, batches: batches.length, medianBatchMs: perBatch[Math.floor(perBatch.length / 2)] };
  } finally {
    await w.stop();
  }
}

/** Messages/s through `clawq serve` (the binary CLAWQ_BIN names). */
async function clawq() {
  const dataDir = mkdtempSync(join(tmpdir(), "clawq-bench-"));
  const port = 18000 + Math.floor(Math.random() * 1000);
  const base = `http://127.0.0.1:${port}`;
  const server = spawn(process.env.CLAWQ_BIN, ["serve", "--listen", `127.0.0.1:${port}`, "--data-dir", dataDir], { stdio: "ignore" });
  try {
    await eventually("clawq serve to start", async () => existsSync(join(dataDir, "admin.token")) && (await fetch(`${base}/healthz`).then((r) => r.ok, () => false)), 60000);
    const token = readFileSync(join(dataDir, "admin.token"), "utf8").trim();
    const started = performance.now();
    const dids = await publishAll(base, token);
    await eventually(`${count} messages handled`, async () => {
      const q = (await call(base, "/v1/queues/clawdentity-events", { token })).json;
      return q.backlog === 0 && q.in_flight === 0 && q.delayed === 0;
    }, 300000);
    const seconds = (performance.now() - started) / 1000;
    await checkRevoked(base, token, dids);
    return { rate: count / seconds, seconds };
  } finally {
    server.kill("SIGTERM");
    await new Promise((r) => server.once("exit", r));
    rmSync(dataDir, { recursive: true, force: true });
  }
}

const w = await worker();
console.log(`Worker (Miniflare): ${count} messages in ${w.seconds.toFixed(2)} s = ${w.rate.toFixed(0)} msg/s; ${w.batches} batches, median handler time ${w.medianBatchMs} ms per batch of 10`);
if (process.env.CLAWQ_BIN) {
  const c = await clawq();
  console.log(`clawq serve:        ${count} messages in ${c.seconds.toFixed(2)} s = ${c.rate.toFixed(0)} msg/s`);
}
