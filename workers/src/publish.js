/**
 * Publishing, as clawq's HTTP API does it: `{"body", "content_type"?, "delay_seconds"?}`
 * per message, no other field; a body of at most 128 KiB, a batch of at most 100
 * messages and 256 KiB, delays of at most 12 h. A request over a limit stores nothing.
 */

import { apiError } from "./errors.js";

export const MAX_BODY_BYTES = 128 * 1024;
export const MAX_BATCH_MESSAGES = 100;
export const MAX_BATCH_BYTES = 256 * 1024;
export const MAX_DELAY_SECONDS = 12 * 60 * 60;
/** Largest request body read, in bytes (a full batch with base64 and escapes). */
const MAX_REQUEST_BYTES = 4 << 20;

/** A refusal: the response to send. */
class Refusal extends Error {
  /** @param {Response} response */
  constructor(response) {
    super("refused");
    this.response = response;
  }
}

const badRequest = (message) => new Refusal(apiError(400, "invalid_request", message));

/**
 * Reads the JSON body of `request`.
 * @param {Request} request
 */
async function readJson(request) {
  const text = await request.text();
  if (text.length > MAX_REQUEST_BYTES) throw new Refusal(apiError(413, "request_too_large", "request body too large"));
  try {
    return JSON.parse(text);
  } catch (err) {
    throw badRequest(`invalid JSON body: ${err.message}`);
  }
}

/**
 * Checks that `value` is an object with only `allowed` fields and has `required` ones.
 * @param {unknown} value
 * @param {string[]} allowed
 * @param {string[]} required
 * @param {string} what for the message
 */
function shape(value, allowed, required, what) {
  if (!value || typeof value !== "object" || Array.isArray(value)) throw badRequest(`invalid JSON body: ${what} must be an object`);
  for (const k of Object.keys(value)) {
    if (!allowed.includes(k)) throw badRequest(`invalid JSON body: unknown field \`${k}\`, expected one of ${allowed.map((a) => `\`${a}\``).join(", ")}`);
  }
  for (const k of required) if (!(k in value)) throw badRequest(`invalid JSON body: missing field \`${k}\``);
}

/**
 * One request message as what `Queue.send` takes, checked like clawq does.
 * @param {any} m
 * @param {number} index
 * @returns {{body: unknown, contentType: 'json' | 'text' | 'bytes', delaySeconds: number, size: number}}
 */
function toMessage(m, index) {
  shape(m, ["body", "content_type", "delay_seconds"], ["body"], "a message");
  const name = m.content_type ?? "json";
  const delay = m.delay_seconds ?? 0;
  if (!Number.isInteger(delay) || delay < 0 || delay > 0xffffffff) throw badRequest("invalid JSON body: delay_seconds must be a u32");
  let body;
  let size;
  if (name === "json") {
    body = m.body;
    size = new TextEncoder().encode(JSON.stringify(m.body)).length;
  } else if (name === "text" || name === "bytes") {
    if (typeof m.body !== "string") throw badRequest(`message ${index}: a ${name} body must be a JSON string`);
    if (name === "text") {
      body = m.body;
      size = new TextEncoder().encode(body).length;
    } else {
      try {
        body = Uint8Array.from(atob(m.body), (c) => c.charCodeAt(0));
      } catch (err) {
        throw badRequest(`message ${index}: body is not valid base64: ${err.message}`);
      }
      size = body.length;
    }
  } else {
    throw badRequest(`message ${index}: content_type \`${name}\` is not one of json, text, bytes`);
  }
  return { body, contentType: name, delaySeconds: delay, size };
}

/**
 * The first limit `messages` break, as clawq answers it, or null.
 * @param {{size: number, delaySeconds: number}[]} messages
 * @returns {Response | null}
 */
function checkLimits(messages) {
  if (messages.length === 0) return apiError(400, "empty_batch", "batch has no messages");
  if (messages.length > MAX_BATCH_MESSAGES) return apiError(400, "too_many_messages", `batch has ${messages.length} messages, the limit is ${MAX_BATCH_MESSAGES}`);
  for (const [index, m] of messages.entries()) {
    if (m.size > MAX_BODY_BYTES) return apiError(413, "body_too_large", `message ${index}: body is ${m.size} bytes, the limit is ${MAX_BODY_BYTES}`);
    if (m.delaySeconds > MAX_DELAY_SECONDS) return apiError(400, "delay_too_long", `message ${index}: delay_seconds is ${m.delaySeconds}, the limit is ${MAX_DELAY_SECONDS}`);
  }
  const total = messages.reduce((sum, m) => sum + m.size, 0);
  if (total > MAX_BATCH_BYTES) return apiError(413, "batch_too_large", `batch is ${total} bytes, the limit is ${MAX_BATCH_BYTES}`);
  return null;
}

/**
 * `POST /v1/queues/{queue}/messages` (`batch` false) or `/messages/batch` to the producer
 * binding `producer`. Answers `{"id"}` or `{"ids"}`: ids this Worker gives (Cloudflare
 * Queues assigns its own message ids, which the consumer sees).
 * @param {Request} request
 * @param {Queue} producer
 * @param {boolean} batch
 * @param {() => string} newId
 * @returns {Promise<Response>}
 */
export async function publish(request, producer, batch, newId) {
  try {
    const value = await readJson(request);
    let requests;
    if (batch) {
      shape(value, ["messages"], ["messages"], "the batch");
      if (!Array.isArray(value.messages)) throw badRequest("invalid JSON body: `messages` must be an array");
      requests = value.messages;
    } else {
      requests = [value];
    }
    const messages = requests.map(toMessage);
    const over = checkLimits(messages);
    if (over) return over;
    const ids = messages.map(() => newId());
    if (messages.length === 1 && !batch) {
      const [m] = messages;
      await producer.send(m.body, { contentType: m.contentType, delaySeconds: m.delaySeconds });
    } else {
      await producer.sendBatch(messages.map((m) => ({ body: m.body, contentType: m.contentType, delaySeconds: m.delaySeconds })));
    }
    return new Response(JSON.stringify(batch ? { ids } : { id: ids[0] }), { headers: { "content-type": "application/json" } });
  } catch (err) {
    if (err instanceof Refusal) return err.response;
    return apiError(503, "storage_unavailable", `queue send failed: ${err.message}`);
  }
}
