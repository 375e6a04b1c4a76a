/**
 * The queues this Worker serves and their consumers: clawq's defaults (README table).
 * Cloudflare binds one consumer Worker per queue, so the consumers of a queue are the
 * handlers this Worker runs over each batch of it, each on the messages its filter takes.
 *
 * An operator (or a test) may replace the table with the `QUEUES` var: the same shape,
 * as JSON.
 */

/**
 * @typedef {{name: string, handler: string, types?: string[]}} Consumer
 *   a handler slot: its name, the component it runs, the message `type`s it takes (all
 *   when absent)
 * @typedef {{producer: string, deadLetter?: string, deadLetterQueue?: string, consumers: Consumer[]}} QueueConfig
 *   the producer binding that publishes to the queue, the binding (and name) of its
 *   dead-letter queue, its consumers
 */

/** @type {Record<string, QueueConfig>} */
export const DEFAULT_QUEUES = {
  "clawdentity-events": {
    producer: "EVENTS",
    deadLetter: "EVENTS_DLQ",
    deadLetterQueue: "clawdentity-events-dlq",
    consumers: [
      { name: "crl-invalidation", handler: "crl-invalidation" },
      { name: "event-router", handler: "event-router", types: ["pair.accepted", "group.member.joined"] },
    ],
  },
  "clawdentity-receipts": {
    producer: "RECEIPTS",
    deadLetter: "RECEIPTS_DLQ",
    deadLetterQueue: "clawdentity-receipts-dlq",
    consumers: [{ name: "receipt-router", handler: "receipt-router" }],
  },
};

/**
 * The queue table of this deployment.
 * @param {Record<string, unknown>} env the Worker's bindings
 * @returns {Record<string, QueueConfig>}
 */
export function queuesOf(env) {
  return typeof env.QUEUES === "string" && env.QUEUES ? JSON.parse(env.QUEUES) : DEFAULT_QUEUES;
}

/**
 * The `type` of a message body in any shape of docs/protocol.md section 2 (a JSON
 * object, or a string holding one), trimmed; `undefined` when it has none.
 * @param {unknown} body the body as the queue gives it
 * @returns {string | undefined}
 */
export function typeOf(body) {
  let value = body;
  if (typeof value === "string") {
    try {
      value = JSON.parse(value);
    } catch {
      return undefined;
    }
  }
  if (typeof value === "string") {
    try {
      value = JSON.parse(value);
    } catch {
      return undefined;
    }
  }
  return value && typeof value === "object" && typeof value.type === "string" ? value.type.trim() : undefined;
}
