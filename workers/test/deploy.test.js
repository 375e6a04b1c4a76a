// wrangler itself accepts wrangler.jsonc and the built Worker: a dry-run deploy (no
// network) lists every binding and uploads the components' core modules as CompiledWasm.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "node:test";
import { promisify } from "node:util";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

test("wrangler deploy --dry-run accepts the Worker and its bindings", async (t) => {
  const outdir = mkdtempSync(join(tmpdir(), "clawq-wrangler-"));
  t.after(() => rmSync(outdir, { recursive: true, force: true }));
  const { stdout } = await promisify(execFile)(process.execPath, [join(root, "node_modules/wrangler/bin/wrangler.js"), "deploy", "--dry-run", "--outdir", outdir], {
    cwd: root,
    env: { ...process.env, WRANGLER_SEND_METRICS: "false", CI: "1" },
    timeout: 120000,
  });
  for (const binding of [
    "env.TRUST (TrustState)", "env.SESSIONS (RelaySession)", "env.ACTORS (ActorStorage)",
    "env.EVENTS (clawdentity-events)", "env.RECEIPTS (clawdentity-receipts)",
    "env.EVENTS_DLQ (clawdentity-events-dlq)", "env.RECEIPTS_DLQ (clawdentity-receipts-dlq)",
  ]) {
    assert.ok(stdout.includes(binding), `${binding} missing:\n${stdout}`);
  }
  for (const name of ["crl-invalidation", "event-router", "receipt-router"]) {
    assert.match(stdout, new RegExp(`components/${name}/component\\.core\\.wasm\\s*│ compiled-wasm`), stdout);
  }
});

test("the queue consumers have clawq's defaults", async () => {
  const { wranglerConfig } = await import("./harness.js");
  const consumers = Object.fromEntries(wranglerConfig().queues.consumers.map((c) => [c.queue, c]));
  assert.deepEqual(consumers["clawdentity-events"], { queue: "clawdentity-events", max_batch_size: 10, max_batch_timeout: 5, max_retries: 3, dead_letter_queue: "clawdentity-events-dlq" });
  assert.deepEqual(consumers["clawdentity-receipts"], { queue: "clawdentity-receipts", max_batch_size: 25, max_batch_timeout: 5, max_retries: 3, dead_letter_queue: "clawdentity-receipts-dlq" });
});
