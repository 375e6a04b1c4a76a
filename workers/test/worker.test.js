// The real Worker in workerd (Miniflare), driven over loopback HTTP and WebSockets.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { ADMIN_TOKEN, PRODUCER_TOKEN, call, connectAgent, eventually, newAgentDid, startWorker } from "./harness.js";

/** @type {Awaited<ReturnType<typeof startWorker>>} */
let worker;

before(async () => {
  worker = await startWorker({ maxRetries: 2 });
});

after(async () => {
  await worker?.stop();
});

/** Registers `did` and returns its connector token. */
async function addAgent(did) {
  const added = await call(worker.base, "/v1/agents", { body: { did } });
  assert.equal(added.status, 200, added.text);
  assert.match(added.json.token, /^cqa_[0-9a-f]{64}$/);
  return added.json.token;
}

/** An `agent.auth.revoked` event for `did`. */
function revocation(did) {
  return {
    id: "evt-1", type: "agent.auth.revoked", version: "v1", timestampUtc: "2026-11-24T10:00:00.000Z",
    initiatedByAccountId: null, data: { reason: "agent_revoked", metadata: { agentDid: did } },
  };
}

test("healthz is open; other routes need a token", async () => {
  assert.deepEqual((await call(worker.base, "/healthz", { token: null })).json, { status: "ok" });
  const refused = await call(worker.base, "/v1/trust/agents/x", { token: null });
  assert.equal(refused.status, 401);
  assert.equal(refused.json.error.code, "unauthorized");
  const wrong = await call(worker.base, "/v1/queues/clawdentity-events/messages", { token: "nope", body: { body: {} } });
  assert.equal(wrong.status, 401);
  assert.equal((await call(worker.base, "/nowhere")).json.error.code, "not_found");
});

test("a revocation event marks the agent revoked and closes its WebSocket 1008", async () => {
  const did = newAgentDid();
  const token = await addAgent(did);
  const connector = connectAgent(worker.base, did, token);
  await eventually("the connector to connect", () => connector.open);

  const published = await call(worker.base, "/v1/queues/clawdentity-events/messages", { token: PRODUCER_TOKEN, body: { body: JSON.stringify(revocation(did)) } });
  assert.equal(published.status, 200, published.text);
  assert.match(published.json.id, /^[0-9A-Z]{26}$/);

  const trust = await eventually("the trust state to say revoked", async () => {
    const t = await call(worker.base, `/v1/trust/agents/${did}`);
    return t.json.revoked ? t : null;
  });
  assert.equal(trust.json.did, did);
  const days = (Date.parse(trust.json.expiresAt) - Date.parse(trust.json.revokedAt)) / 86400000;
  assert.equal(days, 30);
  const closed = await eventually("the connection to close", () => connector.closed);
  assert.deepEqual(closed, { code: 1008, reason: "agent_revoked" });

  const again = connectAgent(worker.base, did, token);
  const refused = await eventually("the revoked agent to be refused", () => again.refused);
  assert.equal(refused.status, 401);
  assert.equal(JSON.parse(refused.text).error.message, "agent is revoked");
});

test("a receipt reaches the sender's connector as a receipt frame, and is pushed until acked", async () => {
  const sender = newAgentDid();
  const recipient = newAgentDid();
  const token = await addAgent(sender);
  const receipt = { type: "delivery_receipt", requestId: " req-1 ", senderAgentDid: sender, recipientAgentDid: recipient, status: "dead_lettered", reason: "recipient hook unreachable" };
  // Recorded before the connector connects: pushed on connect.
  const published = await call(worker.base, "/v1/queues/clawdentity-receipts/messages", { body: { body: receipt } });
  assert.equal(published.status, 200, published.text);
  await eventually("the receipt to be handled", () => worker.output().includes("batch clawdentity-receipts"));

  const connector = connectAgent(worker.base, sender, token);
  const frame = await eventually("a receipt frame", () => connector.frames.find((f) => f.type === "receipt"));
  assert.deepEqual(Object.keys(frame).sort(), ["id", "originalFrameId", "reason", "status", "toAgentDid", "ts", "type", "v"]);
  assert.equal(frame.v, 1);
  assert.equal(frame.originalFrameId, "req-1");
  assert.equal(frame.toAgentDid, recipient);
  assert.equal(frame.status, "dead_lettered");
  assert.equal(frame.reason, "recipient hook unreachable");
  assert.match(frame.ts, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);

  // Not acked: pushed again (1 s later), with the same frame id.
  const again = await eventually("the receipt pushed again", () => connector.frames.filter((f) => f.type === "receipt").length >= 2);
  assert.ok(again);
  assert.equal(connector.frames.filter((f) => f.type === "receipt")[1].id, frame.id);
  connector.ws.send(JSON.stringify({ v: 1, type: "receipt_ack", id: "01HZX4M3Q8V2J7K9T6R5W1N0PA", ts: new Date().toISOString(), ackId: frame.id }));

  // A heartbeat is answered.
  connector.ws.send(JSON.stringify({ v: 1, type: "heartbeat", id: "01HZX4M3Q8V2J7K9T6R5W1N0PB", ts: new Date().toISOString() }));
  const ack = await eventually("a heartbeat_ack", () => connector.frames.find((f) => f.type === "heartbeat_ack"));
  assert.equal(ack.ackId, "01HZX4M3Q8V2J7K9T6R5W1N0PB");

  // A second connection supersedes the first (1000), and an acked receipt is not pushed.
  const second = connectAgent(worker.base, sender, token);
  const closed = await eventually("the first connection to close", () => connector.closed);
  assert.deepEqual(closed, { code: 1000, reason: "superseded_by_new_connection" });
  await eventually("the second to open", () => second.open);
  // Publish the same receipt again: unchanged, nothing pushed; a new one is pushed.
  await call(worker.base, "/v1/queues/clawdentity-receipts/messages", { body: { body: receipt } });
  await call(worker.base, "/v1/queues/clawdentity-receipts/messages", { body: { body: { ...receipt, requestId: "req-2" } } });
  const next = await eventually("the second receipt", () => second.frames.find((f) => f.type === "receipt"));
  assert.equal(next.originalFrameId, "req-2", "the acked req-1 must not be pushed again");
  second.ws.close();
});

test("a pair.accepted event becomes a deliver frame for the initiator", async () => {
  const initiator = newAgentDid();
  const responder = newAgentDid();
  const token = await addAgent(initiator);
  const connector = connectAgent(worker.base, initiator, token);
  await eventually("the connector to connect", () => connector.open);
  const event = {
    type: "pair.accepted", initiatorAgentDid: initiator, responderAgentDid: responder,
    responderProfile: { agentName: "beta", humanName: "Ida", proxyOrigin: "https://proxy.example.com" },
    issuerProxyOrigin: "https://proxy.example.com", eventTimestampUtc: "2026-11-24T10:00:00.000Z",
  };
  assert.equal((await call(worker.base, "/v1/queues/clawdentity-events/messages", { body: { body: event } })).status, 200);
  const frame = await eventually("a deliver frame", () => connector.frames.find((f) => f.type === "deliver"));
  assert.equal(frame.fromAgentDid, responder);
  assert.equal(frame.toAgentDid, initiator);
  assert.equal(frame.deliverySource, "proxy.events.queue.pair_accepted");
  assert.equal(frame.payload.system.type, "pair.accepted");
  connector.ws.close();
});

test("a bad publish gets the same 4xx and error body as clawq", async () => {
  const events = "/v1/queues/clawdentity-events/messages";
  const cases = [
    [events, "{not json", 400, "invalid_request"],
    [events, { body: {}, extra: 1 }, 400, "invalid_request"],
    [events, { body: 5, content_type: "yaml" }, 400, "invalid_request"],
    [events, { body: {}, delay_seconds: 43201 }, 400, "delay_too_long"],
    [events, { body: "x".repeat(128 * 1024 + 1), content_type: "text" }, 413, "body_too_large"],
    [events + "/batch", { messages: [] }, 400, "empty_batch"],
    [events + "/batch", { messages: Array.from({ length: 101 }, () => ({ body: {} })) }, 400, "too_many_messages"],
    [events + "/batch", { messages: Array.from({ length: 3 }, () => ({ body: "y".repeat(100 * 1024), content_type: "text" })) }, 413, "batch_too_large"],
    ["/v1/queues/nope/messages", { body: {} }, 404, "queue_not_found"],
  ];
  for (const [path, body, status, code] of cases) {
    const answer = await call(worker.base, path, { body });
    assert.equal(answer.status, status, `${path} ${answer.text}`);
    assert.equal(answer.json.error.code, code, answer.text);
    assert.equal(typeof answer.json.error.message, "string");
  }
  const forbidden = await call(worker.base, "/v1/queues/clawdentity-receipts/messages", { token: PRODUCER_TOKEN, body: { body: {} } });
  assert.equal(forbidden.status, 403);
  assert.equal(forbidden.json.error.code, "forbidden");
  const limit = await call(worker.base, events, { body: { body: "x".repeat(128 * 1024 + 1), content_type: "text" } });
  assert.equal(limit.json.error.message, "message 0: body is 131073 bytes, the limit is 131072");
  assert.equal((await call(worker.base, "/v1/trust/agents/did:cdi:x", { token: ADMIN_TOKEN })).json.error.code, "invalid_did");
});

test("a trapping component gets its batch retried, then dead-lettered after max_retries", async () => {
  const marker = `trap-${Date.now()}`;
  await worker.sendTo("TRAP", { marker });
  const dead = await eventually("the trapped message in trap-dlq", async () => (await worker.deadLettered()).find((m) => m.queue === "trap-dlq" && m.body.marker === marker));
  assert.deepEqual(dead.body, { marker });
  // The component itself trapped (its panic, then the trap), on the first attempt and
  // on each of the 2 retries.
  const traps = worker.output().split("failing-handler traps on every batch").length - 1;
  assert.ok(traps >= 3, `expected the first attempt and 2 retries to trap, saw ${traps}\n${worker.output()}`);
  assert.match(worker.output(), /handler failing failed: wasm trap/);
});

test("a Durable Object call that throws makes the handler retry (not ack), then the DLQ", async () => {
  const did = newAgentDid();
  await worker.sendTo("FAULTY", revocation(did), "clawq-faulty");
  const dead = await eventually("the message in faulty-dlq", async () => (await worker.deadLettered()).find((m) => m.queue === "faulty-dlq" && m.body.data?.metadata?.agentDid === did));
  assert.equal(dead.body.type, "agent.auth.revoked");
  // Retried (the handler's outcome), not acked and not a trap.
  assert.match(worker.output(), /trust state unavailable \(test fault\)/);
  assert.doesNotMatch(worker.output(), /handler crl-invalidation failed/);
});

test("outcomes map onto the batch: dead-letter at once to the DLQ with its reason, retry until acked or max_retries", async () => {
  const tag = `t${Date.now()}`;
  const script = (s) => ({ ...s, tag: `${tag}-${s.tag}` });
  for (const s of [
    { do: "dead-letter", reason: "no use retrying", tag: "dl" },
    { do: "retry", ack_at: 3, tag: "late" },
    { do: "retry", delay: 0, tag: "never" },
  ]) await worker.sendTo("SCRIPTED", script(s));
  const dlq = async () => (await worker.deadLettered()).filter((m) => m.queue === "scripted-dlq" && String(m.body.tag ?? m.body.body?.tag).startsWith(tag));
  const both = await eventually("two messages in scripted-dlq", async () => ((await dlq()).length === 2 ? dlq() : null));
  // The handler's dead-letter: sent at once (attempt 1) with its reason and source.
  const explicit = both.find((m) => m.body.deadLetter);
  assert.deepEqual(explicit.body.body, script({ do: "dead-letter", reason: "no use retrying", tag: "dl" }));
  assert.equal(explicit.body.deadLetter.reason, "no use retrying");
  assert.equal(explicit.body.deadLetter.queue, "scripted-queue");
  assert.equal(explicit.body.deadLetter.consumer, "scripted");
  assert.equal(explicit.body.deadLetter.attempts, 1);
  // Retried until max_retries (2): 3 attempts, then Queues dead-letters the original body.
  const exhausted = both.find((m) => !m.body.deadLetter);
  assert.equal(exhausted.body.tag, `${tag}-never`);
  assert.match(worker.output(), new RegExp(`seen tag=${tag}-never attempts=3`));
  // Retried, then acked at attempt 3: never dead-lettered.
  assert.match(worker.output(), new RegExp(`seen tag=${tag}-late attempts=3`));
  assert.ok(!(await dlq()).some((m) => m.body.tag === `${tag}-late`));
  assert.doesNotMatch(worker.output(), new RegExp(`seen tag=${tag}-dl attempts=2`));
});

test("an unhandled message is acked with a warning naming it and why", async () => {
  const published = await call(worker.base, "/v1/queues/clawdentity-events/messages", { body: { body: "not an object", content_type: "text" } });
  assert.equal(published.status, 200);
  const line = await eventually("the unhandled warning", () => worker.output().match(/message \S+ unhandled by crl-invalidation \(malformed\): .*/)?.[0]);
  assert.ok(line);
  assert.ok(!(await worker.deadLettered()).some((m) => m.queue === "clawdentity-events-dlq"), "an unhandled message is not dead-lettered");
});

test("a bytes body is handed to the component and a dead-letter keeps it (base64)", async () => {
  const script = { do: "dead-letter", reason: "bytes", tag: `b${Date.now()}` };
  const base64 = Buffer.from(JSON.stringify(script)).toString("base64");
  const published = await call(worker.base, "/v1/queues/scripted-queue/messages", { body: { body: base64, content_type: "bytes" } });
  assert.equal(published.status, 200, published.text);
  const dead = await eventually("the bytes message in scripted-dlq", async () => (await worker.deadLettered()).find((m) => m.body.body?.base64 === base64));
  assert.equal(dead.body.deadLetter.reason, "bytes");
});
