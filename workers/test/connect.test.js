// The Rust connector (`clawq connect`, the binary CLAWQ_BIN names) against the Worker:
// it gets the receipt frame, acknowledges it, and POSTs it to the agent's hook. Skipped
// when CLAWQ_BIN is unset (the Rust end-to-end test always sets it, and checks that
// nothing was skipped).

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { call, eventually, newAgentDid, startWorker } from "./harness.js";

test("clawq connect against the Worker POSTs a dead_lettered receipt and a delivery to the hook", { skip: !process.env.CLAWQ_BIN && "CLAWQ_BIN is not set" }, async (t) => {
  const worker = await startWorker();
  t.after(() => worker.stop());
  const posts = [];
  const hook = createServer((req, res) => {
    let body = "";
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      posts.push({ headers: req.headers, body: JSON.parse(body) });
      res.end("ok");
    });
  });
  await new Promise((r) => hook.listen(0, "127.0.0.1", r));
  t.after(() => hook.close());

  const sender = newAgentDid();
  const recipient = newAgentDid();
  const added = await call(worker.base, "/v1/agents", { body: { did: sender } });
  assert.equal(added.status, 200, added.text);
  const dataDir = mkdtempSync(join(tmpdir(), "clawq-connector-"));
  t.after(() => rmSync(dataDir, { recursive: true, force: true }));
  let log = "";
  const connector = spawn(process.env.CLAWQ_BIN, [
    "connect", "--server", worker.base, "--agent", sender,
    "--hook", `http://127.0.0.1:${hook.address().port}/hooks/message`, "--data-dir", dataDir,
  ], { env: { ...process.env, CLAWQ_AGENT_TOKEN: added.json.token }, stdio: ["ignore", "pipe", "pipe"] });
  connector.stdout.on("data", (d) => (log += d));
  connector.stderr.on("data", (d) => (log += d));
  t.after(() => connector.kill("SIGTERM"));

  const receipt = { type: "delivery_receipt", requestId: "req-connect", senderAgentDid: sender, recipientAgentDid: recipient, status: "dead_lettered", reason: "recipient hook unreachable" };
  assert.equal((await call(worker.base, "/v1/queues/clawdentity-receipts/messages", { body: { body: receipt } })).status, 200);
  const post = await eventually(`the hook POST (connector log: ${log})`, () => posts[0], 20000);
  assert.equal(post.headers["content-type"], "application/vnd.clawdentity.receipt+json");
  assert.equal(post.headers["x-request-id"], "req-connect");
  assert.equal(post.body.type, "clawdentity.receipt.v1");
  assert.equal(post.body.status, "dead_lettered");
  assert.equal(post.body.toAgentDid, recipient);
  assert.equal(post.body.message, `Your message req-connect to ${recipient} could not be delivered: recipient hook unreachable`);

  // A pairing accepted by `recipient`: a deliver frame, POSTed as a delivery.
  const event = {
    type: "pair.accepted", initiatorAgentDid: sender, responderAgentDid: recipient,
    responderProfile: { agentName: "beta", humanName: "Ida", proxyOrigin: "https://proxy.example.com" },
    issuerProxyOrigin: "https://proxy.example.com", eventTimestampUtc: "2026-11-24T10:00:00.000Z",
  };
  assert.equal((await call(worker.base, "/v1/queues/clawdentity-events/messages", { body: { body: event } })).status, 200);
  const delivery = await eventually(`the delivery POST (connector log: ${log})`, () => posts[1], 20000);
  assert.equal(delivery.headers["content-type"], "application/vnd.clawdentity.delivery+json");
  assert.equal(delivery.headers["x-clawdentity-agent-did"], recipient);
  assert.equal(delivery.headers["x-clawdentity-to-agent-did"], sender);
  assert.equal(delivery.body.type, "clawdentity.delivery.v1");
  assert.equal(delivery.body.payload.system.type, "pair.accepted");
  assert.equal(delivery.body.relayMetadata.deliverySource, "proxy.events.queue.pair_accepted");
});
