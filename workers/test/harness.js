/**
 * Runs the real Worker (gen/worker.js, built by `npm run build -- --with-test-guests`)
 * in workerd through Miniflare, on a loopback port, with the queues, consumers and
 * Durable Objects of wrangler.jsonc. Test-only additions, each its own queue:
 * `trap-queue` (the trapping `failing-handler`), `scripted-queue` (the `scripted-handler`
 * whose messages script their outcomes), `faulty-events` (crl-invalidation on a
 * second copy of the Worker whose trust-state object always throws), and a recorder
 * Worker consuming every dead-letter queue so a test can read what reached one.
 */

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Miniflare } from "miniflare";
import WebSocket from "ws";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
export const ADMIN_TOKEN = "test-admin-token-0123456789abcdef0123456789";
export const PRODUCER_TOKEN = "test-producer-token-events-0123456789abcdef";
/** Batch timeout used in tests, in seconds (clawq's 5 s would only slow them). */
const TEST_BATCH_TIMEOUT = 0.05;

/** wrangler.jsonc, comments stripped. */
export function wranglerConfig() {
  const text = readFileSync(join(root, "wrangler.jsonc"), "utf8");
  return JSON.parse(text.replace(/^\s*\/\/.*$/gm, ""));
}

/**
 * A Miniflare queue consumer from a wrangler one.
 * @param {any} c
 * @param {number} [maxRetries]
 */
function consumerOf(c, maxRetries = c.max_retries, batchTimeout = TEST_BATCH_TIMEOUT) {
  return { maxBatchSize: c.max_batch_size, maxBatchTimeout: batchTimeout, maxRetries, deadLetterQueue: c.dead_letter_queue, retryDelay: 0 };
}

/** SHA-256 hex, as the Worker stores tokens. */
async function sha256Hex(text) {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

const RECORDER = `
const seen = [];
export default {
  async queue(batch) { for (const m of batch.messages) { seen.push({ queue: batch.queue, body: m.body }); m.ack(); } },
  async fetch() { return Response.json(seen); },
};`;

const FAULT = `
import { DurableObject } from "cloudflare:workers";
export class ThrowingTrust extends DurableObject {
  revoke() { throw new Error("trust state unavailable (test fault)"); }
  isRevoked() { throw new Error("trust state unavailable (test fault)"); }
  lookup() { throw new Error("trust state unavailable (test fault)"); }
}
export default { fetch() { return new Response("fault"); } };`;

/**
 * Starts the Worker. Returns its URL, helpers, the captured workerd output, and `stop`.
 * @param {{maxRetries?: number, batchTimeout?: number, vars?: Record<string, string>}} [options]
 *   `vars`: extra vars of the Worker (e.g. short heartbeat timings) `batchTimeout` in
 *   seconds (wrangler.jsonc's for clawq's 5 s; tests use 0.05 s)
 */
export async function startWorker(options = {}) {
  const config = wranglerConfig();
  const queues = JSON.parse(JSON.stringify((await import("../src/queues.js")).DEFAULT_QUEUES));
  queues["trap-queue"] = { producer: "TRAP", consumers: [{ name: "failing", handler: "failing-handler" }] };
  queues["scripted-queue"] = { producer: "SCRIPTED", deadLetter: "SCRIPTED_DLQ", consumers: [{ name: "scripted", handler: "scripted-handler" }] };
  const producers = Object.fromEntries(config.queues.producers.map((p) => [p.binding, p.queue]));
  const consumers = Object.fromEntries(config.queues.consumers.map((c) => [c.queue, consumerOf(c, options.maxRetries, options.batchTimeout)]));
  const durableObjects = Object.fromEntries(config.durable_objects.bindings.map((b) => [b.name, { className: b.class_name, useSQLite: true }]));
  const bindings = {
    ADMIN_TOKEN,
    PRODUCER_TOKENS: JSON.stringify({ [await sha256Hex(PRODUCER_TOKEN)]: ["clawdentity-events"] }),
    QUEUES: JSON.stringify(queues),
    LOG_BATCH_TIMINGS: "1",
    ...options.vars,
  };
  let output = "";
  const wasmRules = [{ type: "CompiledWasm", include: ["**/*.wasm"] }];
  const mf = new Miniflare({
    host: "127.0.0.1",
    port: 0,
    handleRuntimeStdio(stdout, stderr) {
      stdout.on("data", (d) => (output += d));
      stderr.on("data", (d) => (output += d));
    },
    workers: [
      {
        name: "clawq",
        compatibilityDate: config.compatibility_date,
        modules: true,
        scriptPath: join(root, config.main),
        modulesRules: wasmRules,
        durableObjects,
        queueProducers: { ...producers, TRAP: "trap-queue", SCRIPTED: "scripted-queue", SCRIPTED_DLQ: "scripted-dlq" },
        queueConsumers: {
          ...consumers,
          "trap-queue": { maxBatchSize: 10, maxBatchTimeout: TEST_BATCH_TIMEOUT, maxRetries: options.maxRetries ?? 3, deadLetterQueue: "trap-dlq", retryDelay: 0 },
          "scripted-queue": { maxBatchSize: 10, maxBatchTimeout: TEST_BATCH_TIMEOUT, maxRetries: options.maxRetries ?? 3, deadLetterQueue: "scripted-dlq", retryDelay: 0 },
        },
        bindings,
      },
      {
        name: "clawq-faulty",
        compatibilityDate: config.compatibility_date,
        modules: true,
        scriptPath: join(root, config.main),
        modulesRules: wasmRules,
        durableObjects: { ...durableObjects, TRUST: { className: "ThrowingTrust", scriptName: "fault", useSQLite: true } },
        queueProducers: { ...producers, FAULTY: "faulty-events" },
        queueConsumers: { "faulty-events": { maxBatchSize: 10, maxBatchTimeout: TEST_BATCH_TIMEOUT, maxRetries: options.maxRetries ?? 3, deadLetterQueue: "faulty-dlq", retryDelay: 0 } },
        bindings: { ...bindings, QUEUES: JSON.stringify({ "faulty-events": { producer: "FAULTY", consumers: [{ name: "crl-invalidation", handler: "crl-invalidation" }] } }) },
      },
      { name: "fault", compatibilityDate: config.compatibility_date, modules: [{ type: "ESModule", path: "fault.js", contents: FAULT }], durableObjects: { FAULT: { className: "ThrowingTrust", useSQLite: true } } },
      {
        name: "recorder",
        compatibilityDate: config.compatibility_date,
        modules: [{ type: "ESModule", path: "recorder.js", contents: RECORDER }],
        queueConsumers: Object.fromEntries(
          ["clawdentity-events-dlq", "clawdentity-receipts-dlq", "trap-dlq", "scripted-dlq", "faulty-dlq"].map((q) => [q, { maxBatchTimeout: TEST_BATCH_TIMEOUT }]),
        ),
      },
    ],
  });
  const url = await mf.ready;
  const base = url.href.replace(/\/$/, "");
  return {
    mf,
    base,
    output: () => output,
    /** Messages that reached a dead-letter queue so far. */
    async deadLettered() {
      const recorder = await mf.getWorker("recorder");
      return (await recorder.fetch("http://recorder/")).json();
    },
    /** Sends `body` straight to a test queue (no HTTP route publishes to it). */
    async sendTo(binding, body, worker = "clawq") {
      const q = await mf.getQueueProducer(binding, worker);
      await q.send(body, { contentType: "json" });
    },
    stop: () => mf.dispose(),
  };
}

/**
 * A `fetch` of the Worker with the admin token (unless `token` is given).
 * @param {string} base
 * @param {string} path
 * @param {RequestInit & {token?: string | null, body?: any}} [init]
 */
export async function call(base, path, init = {}) {
  const headers = { "content-type": "application/json" };
  const token = init.token === undefined ? ADMIN_TOKEN : init.token;
  if (token) headers.authorization = `Bearer ${token}`;
  const body = init.body === undefined || typeof init.body === "string" ? init.body : JSON.stringify(init.body);
  const response = await fetch(base + path, { method: init.method ?? (body ? "POST" : "GET"), headers, body });
  const text = await response.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: response.status, json, text };
}

/**
 * Polls `probe` until it returns a truthy value or `ms` pass; returns that value or
 * throws naming `what`.
 * @template T
 * @param {string} what
 * @param {() => Promise<T> | T} probe
 * @param {number} [ms]
 * @returns {Promise<T>}
 */
export async function eventually(what, probe, ms = 15000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    last = await probe();
    if (last) return last;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
}

/**
 * A connector WebSocket of agent `did`: the frames it got, its close code and reason.
 * @param {string} base
 * @param {string} did
 * @param {string} token
 */
export function connectAgent(base, did, token) {
  const ws = new WebSocket(`${base.replace(/^http/, "ws")}/v1/relay/connect?agent=${encodeURIComponent(did)}`, {
    headers: { authorization: `Bearer ${token}` },
  });
  const state = {
    ws, frames: [], refused: null, open: false, ended: null,
    /**
     * The close frame the Worker sent, once it came. `ws` emits `close` only when the
     * TCP connection ends, and workerd leaves it open after a close handshake its Durable
     * Object started from an alarm (the heartbeat timeout); a connector acts on the
     * close frame, so the test does too.
     */
    get closed() {
      if (this.ended) return this.ended;
      return ws._closeFrameReceived ? { code: ws._closeCode, reason: String(ws._closeMessage) } : null;
    },
  };
  ws.on("open", () => (state.open = true));
  ws.on("message", (data) => state.frames.push(JSON.parse(String(data))));
  ws.on("close", (code, reason) => (state.ended = { code, reason: String(reason) }));
  ws.on("unexpected-response", (_req, res) => {
    let text = "";
    res.on("data", (d) => (text += d));
    res.on("end", () => (state.refused = { status: res.statusCode, text }));
  });
  ws.on("error", () => {});
  return state;
}

/**
 * A fresh agent DID (a random ULID part).
 * @returns {string}
 */
export function newAgentDid() {
  const alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
  const id = Array.from(crypto.getRandomValues(new Uint8Array(26)), (b) => alphabet[b % 32]).join("");
  return `did:cdi:registry.clawdentity.com:agent:${id}`;
}
