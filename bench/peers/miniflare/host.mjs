// Starts the bench Worker in Miniflare: `node host.mjs PORT PERSIST_DIR BATCH_SIZE
// BATCH_TIMEOUT_SECONDS`. Serves until SIGTERM or SIGINT, then disposes of Miniflare
// (which stops workerd).

import { Log, LogLevel, Miniflare } from "miniflare";
import { fileURLToPath } from "node:url";

const [port, persist, batchSize, batchTimeout] = process.argv.slice(2);
const mf = new Miniflare({
  // Warnings and errors (workerd's too) to stderr, which the driver keeps in server.log.
  log: new Log(LogLevel.WARN),
  // No request.cf: Miniflare would fetch it from Cloudflare, off this machine.
  cf: false,
  modules: true,
  scriptPath: fileURLToPath(new URL("./worker.js", import.meta.url)),
  compatibilityDate: "2026-07-01",
  host: "127.0.0.1",
  port: Number(port),
  // Everything that Miniflare can persist goes here. Its queue broker keeps messages in
  // memory whatever this says (see the README).
  defaultPersistRoot: persist,
  queueProducers: { EVENTS: { queueName: "clawdentity-events" } },
  queueConsumers: {
    "clawdentity-events": { maxBatchSize: Number(batchSize), maxBatchTimeout: Number(batchTimeout), maxRetries: 3 },
  },
});

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  await mf.dispose().catch(() => {});
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

const url = await mf.ready;
console.log(`miniflare ready at ${url}`);
