// The connector WebSocket's liveness rules with short heartbeat timings: the Worker
// sends heartbeats, closes a silent connection 1011, and closes one that sends a frame
// over 1 MiB with 1009.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { call, connectAgent, eventually, newAgentDid, startWorker } from "./harness.js";

/** @type {Awaited<ReturnType<typeof startWorker>>} */
let worker;

before(async () => {
  worker = await startWorker({ vars: { RELAY_HEARTBEAT_INTERVAL_MS: "200", RELAY_HEARTBEAT_TIMEOUT_MS: "1000" } });
});

after(async () => {
  await worker?.stop();
});

/** A registered agent's connected connector. */
async function connected() {
  const did = newAgentDid();
  const added = await call(worker.base, "/v1/agents", { body: { did } });
  assert.equal(added.status, 200, added.text);
  const connector = connectAgent(worker.base, did, added.json.token);
  await eventually("the connector to connect", () => connector.open);
  return connector;
}

test("heartbeats come while connected; a connector that stays silent is closed 1011", async () => {
  const connector = await connected();
  const beat = await eventually("a heartbeat", () => connector.frames.find((f) => f.type === "heartbeat"));
  assert.deepEqual(Object.keys(beat).sort(), ["id", "ts", "type", "v"]);
  const closed = await eventually("the silent connection to close", () => connector.closed, 10000);
  assert.deepEqual(closed, { code: 1011, reason: "heartbeat_ack_timeout" });
});

test("a connector that answers heartbeats stays connected past the timeout", async () => {
  const connector = await connected();
  const answered = new Set();
  const started = Date.now();
  await eventually("2 s connected while answering", () => {
    for (const f of connector.frames.filter((f) => f.type === "heartbeat" && !answered.has(f.id))) {
      answered.add(f.id);
      connector.ws.send(JSON.stringify({ v: 1, type: "heartbeat_ack", id: "01HZX4M3Q8V2J7K9T6R5W1N0PA", ts: new Date().toISOString(), ackId: f.id }));
    }
    assert.equal(connector.closed, null, "closed while answering heartbeats");
    return Date.now() - started > 2000;
  }, 5000);
  connector.ws.close();
});

test("a frame over 1 MiB closes the connection 1009", async () => {
  const connector = await connected();
  connector.ws.send(JSON.stringify({ v: 1, type: "heartbeat", id: "x", ts: "y", pad: "x".repeat(1 << 20) }));
  const closed = await eventually("the connection to close", () => connector.closed);
  assert.equal(closed.code, 1009);
});
