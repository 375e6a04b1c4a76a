/**
 * `queue(batch, env, ctx)`: a Cloudflare `MessageBatch` → the WIT `list<message>` of each
 * consumer's handler → one outcome per message, mapped onto the batch:
 *
 * - ack → `msg.ack()`; unhandled → `msg.ack()` and a console warning naming it;
 * - retry(d) → `msg.retry({delaySeconds: d})` (Queues dead-letters it after max_retries);
 * - dead-letter(reason) → sent at once to the queue's dead-letter producer with the
 *   reason and where it came from, then acked (Queues has no per-message dead-letter);
 * - a handler error, trap or failure to start → `batch.retryAll()`.
 *
 * When a queue has several consumers, a message's outcomes combine: a dead-letter wins,
 * then a retry (the longest delay), else it is acked.
 */

import { handle } from "./components.js";
import { queuesOf, typeOf } from "./queues.js";

/** Longest retry delay, in seconds (12 h, as clawq). */
const MAX_DELAY_SECONDS = 43200;

/**
 * The bytes of a body sent as `bytes`, or null when it is not one.
 * @param {unknown} body
 * @returns {Uint8Array | null}
 */
function bytesOf(body) {
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  return null;
}

/**
 * A Queues message as a WIT `message`. A Workers message has no content type: it is
 * inferred from the body (a string → text, bytes → bytes, anything else → JSON).
 * @param {Message} msg
 */
export function toWitMessage(msg) {
  const body = msg.body;
  let contentType = "json";
  let bytes = bytesOf(body);
  if (bytes) {
    contentType = "bytes";
  } else if (typeof body === "string") {
    contentType = "text";
    bytes = new TextEncoder().encode(body);
  } else {
    bytes = new TextEncoder().encode(JSON.stringify(body));
  }
  return { id: msg.id, attempts: msg.attempts, timestampMs: BigInt(msg.timestamp.getTime()), contentType, body: bytes };
}

/**
 * The body to send to a dead-letter queue: the original body and why it is there.
 * @param {Message} msg
 * @param {string} queue the source queue
 * @param {string} consumer the consumer that dead-lettered it
 * @param {string} reason the handler's reason
 */
function deadLetterBody(msg, queue, consumer, reason) {
  const bytes = bytesOf(msg.body);
  let body = msg.body;
  if (bytes) {
    let binary = "";
    for (const b of bytes) binary += String.fromCharCode(b);
    body = { base64: btoa(binary) };
  }
  return { body, deadLetter: { queue, consumer, messageId: msg.id, attempts: msg.attempts, reason, at: new Date().toISOString() } };
}

/**
 * Runs every consumer of `batch.queue` over the batch and settles each message.
 * @param {MessageBatch} batch
 * @param {any} env
 * @returns {Promise<{handlerMs: number}>} how long the handlers took
 */
export async function consume(batch, env) {
  const config = queuesOf(env)[batch.queue];
  if (!config) {
    console.error(`queue ${batch.queue}: no consumer configured; retrying the batch`);
    batch.retryAll();
    return { handlerMs: 0 };
  }
  const messages = batch.messages;
  const wit = messages.map(toWitMessage);
  /** @type {{kind: 'ack' | 'retry' | 'dead-letter', delay?: number, reason?: string, consumer?: string}[]} */
  const settled = messages.map(() => ({ kind: "ack" }));
  const started = performance.now();
  for (const consumer of config.consumers) {
    const picked = messages.map((m, i) => i).filter((i) => !consumer.types || consumer.types.includes(typeOf(messages[i].body)));
    if (picked.length === 0) continue;
    let outcomes;
    try {
      outcomes = await handle(env, consumer.name, consumer.handler, batch.queue, picked.map((i) => wit[i]));
    } catch (err) {
      console.error(`queue ${batch.queue}: ${err.message}; retrying the batch of ${messages.length}`);
      batch.retryAll();
      return { handlerMs: performance.now() - started };
    }
    picked.forEach((index, k) => merge(settled, index, outcomes[k], consumer.name, batch.queue, messages[index]));
  }
  const handlerMs = performance.now() - started;
  const dlq = config.deadLetter ? env[config.deadLetter] : undefined;
  await Promise.all(
    messages.map(async (msg, i) => {
      const s = settled[i];
      if (s.kind === "ack") return msg.ack();
      if (s.kind === "retry") return msg.retry(s.delay === undefined ? undefined : { delaySeconds: s.delay });
      if (!dlq) {
        console.error(`queue ${batch.queue}: message ${msg.id} dead-lettered by ${s.consumer} (${s.reason}) but the queue has no dead-letter queue; dropped`);
        return msg.ack();
      }
      try {
        await dlq.send(deadLetterBody(msg, batch.queue, s.consumer, s.reason), { contentType: "json" });
        console.warn(`queue ${batch.queue}: message ${msg.id} dead-lettered by ${s.consumer}: ${s.reason}`);
        msg.ack();
      } catch (err) {
        console.error(`queue ${batch.queue}: sending message ${msg.id} to its dead-letter queue failed: ${err.message}; retrying it`);
        msg.retry();
      }
    }),
  );
  return { handlerMs };
}

/**
 * Combines consumer `consumer`'s `outcome` for message `index` into `settled`.
 * @param {any[]} settled
 * @param {number} index
 * @param {any} outcome a WIT outcome, or undefined when the handler gave none
 * @param {string} consumer
 * @param {string} queue
 * @param {Message} msg
 */
function merge(settled, index, outcome, consumer, queue, msg) {
  const current = settled[index];
  if (current.kind === "dead-letter") return;
  switch (outcome?.tag) {
    case "ack":
      return;
    case "unhandled":
      console.warn(`queue ${queue}: message ${msg.id} unhandled by ${consumer} (${outcome.val.reason.replaceAll("-", "_")}): ${String(outcome.val.detail).slice(0, 1024)}`);
      return;
    case "dead-letter":
      settled[index] = { kind: "dead-letter", reason: outcome.val, consumer };
      return;
    case "retry": {
      const delay = outcome.val == null ? undefined : Math.min(outcome.val, MAX_DELAY_SECONDS);
      const longest = current.kind === "retry" && current.delay !== undefined && (delay === undefined || current.delay > delay) ? current.delay : delay;
      settled[index] = { kind: "retry", delay: longest };
      return;
    }
    default:
      // No outcome for this message (a shorter list): retried, as clawq does.
      settled[index] = { kind: "retry", delay: current.delay };
  }
}
