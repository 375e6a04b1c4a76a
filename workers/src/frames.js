/**
 * Connector WebSocket frames (docs/protocol.md section 7): JSON text of at most 1 MiB,
 * every frame `{"v": 1, "type", "id": <ULID>, "ts": <ISO-8601 ms>}` plus the fields of
 * its type and nothing else; optional fields left out, never `null`.
 */

import { iso, ulid } from "./ids.js";

/** Largest frame accepted, in bytes. */
export const MAX_FRAME_BYTES = 1 << 20;

/** The fields each type has besides the envelope: required, optional. */
const FIELDS = {
  heartbeat: [[], []],
  heartbeat_ack: [["ackId"], []],
  receipt: [["originalFrameId", "toAgentDid", "status"], ["reason"]],
  receipt_ack: [["ackId"], []],
  deliver: [["fromAgentDid", "toAgentDid", "payload"], ["deliverySource", "contentType", "groupId", "conversationId", "replyTo"]],
  deliver_ack: [["ackId", "accepted"], ["reason"]],
};

/**
 * A frame of `type` with `fields`, a fresh id (unless `id` is given) and the current time.
 * @param {string} type
 * @param {Record<string, unknown>} [fields] undefined values are left out
 * @param {string} [id]
 * @returns {string} the frame's JSON text
 */
export function frame(type, fields = {}, id = ulid()) {
  const out = { v: 1, type, id, ts: iso(Date.now()) };
  for (const [k, v] of Object.entries(fields)) if (v !== undefined && v !== null) out[k] = v;
  return JSON.stringify(out);
}

/**
 * Reads a frame a connector sent: the parsed frame, or why it is refused.
 * @param {string} text
 * @returns {{frame?: Record<string, any>, error?: string}}
 */
export function parseFrame(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch {
    return { error: "frame is not a JSON object" };
  }
  if (!value || typeof value !== "object" || Array.isArray(value)) return { error: "frame is not a JSON object" };
  if (value.v !== 1) return { error: "field `v` is missing or invalid" };
  for (const f of ["type", "id", "ts"]) if (typeof value[f] !== "string") return { error: `field \`${f}\` is missing or invalid` };
  const fields = FIELDS[value.type];
  if (!fields) return { error: `unknown frame type \`${value.type}\`` };
  const [required, optional] = fields;
  for (const f of required) if (value[f] === undefined) return { error: `field \`${f}\` is missing or invalid` };
  for (const f of Object.keys(value)) {
    if (!["v", "type", "id", "ts", ...required, ...optional].includes(f)) return { error: `unknown field \`${f}\`` };
  }
  return { frame: value };
}
