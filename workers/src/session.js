/**
 * A relay session: one SQLite-backed Durable Object per agent DID (`idFromName(did)`),
 * docs/protocol.md sections 6 and 7. It keeps the agent's receipts (one row per
 * `requestId`) and deliveries (one row per dedup key) for 1 h, at most 500 of each,
 * holds the agent's connector WebSocket through the Hibernation API, and pushes each
 * unacknowledged row as a `receipt` / `deliver` frame: when recorded, on every connect,
 * and while connected 1 s after the last push doubling to 30 s (±20 %), 25 pushes at
 * most. It sends a heartbeat every 30 s and closes a connection silent for 60 s (1011);
 * the `RELAY_HEARTBEAT_INTERVAL_MS` / `RELAY_HEARTBEAT_TIMEOUT_MS` vars change both.
 * It also holds the agent's connector token, hashed.
 */

import { DurableObject } from "cloudflare:workers";
import { agentDidError, invalidDid } from "./did.js";
import { MAX_FRAME_BYTES, frame, parseFrame } from "./frames.js";
import { ulid } from "./ids.js";

export const ROW_TTL_MS = 3600 * 1000;
export const MAX_ROWS_PER_KIND = 500;
const RETRY_INITIAL_MS = 1000;
const RETRY_MAX_MS = 30000;
const RETRY_MAX_ATTEMPTS = 25;
/** clawq's heartbeat defaults; the `RELAY_HEARTBEAT_INTERVAL_MS` and
 * `RELAY_HEARTBEAT_TIMEOUT_MS` vars change them. */
const HEARTBEAT_INTERVAL_MS = 30000;
const HEARTBEAT_TIMEOUT_MS = 60000;
const MAX_REQUEST_ID_BYTES = 1024;
const MAX_REASON_BYTES = 4096;

const utf8 = (s) => new TextEncoder().encode(s).length;
const refused = (message) => ({ err: { transient: false, message } });

/**
 * The delay before push number `pushes + 1`: 1 s doubling to 30 s, ±20 % jitter.
 * @param {number} pushes pushes made so far (≥ 1)
 */
function backoff(pushes) {
  const base = Math.min(RETRY_INITIAL_MS * 2 ** (pushes - 1), RETRY_MAX_MS);
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

/** The relay-session Durable Object of one agent. */
export class RelaySession extends DurableObject {
  /**
   * @param {DurableObjectState} ctx
   * @param {any} env
   */
  constructor(ctx, env) {
    super(ctx, env);
    this.heartbeatMs = Number(env.RELAY_HEARTBEAT_INTERVAL_MS) || HEARTBEAT_INTERVAL_MS;
    this.timeoutMs = Number(env.RELAY_HEARTBEAT_TIMEOUT_MS) || HEARTBEAT_TIMEOUT_MS;
    this.sql = ctx.storage.sql;
    this.sql.exec(`CREATE TABLE IF NOT EXISTS agent (
        one INTEGER PRIMARY KEY CHECK (one = 1), did TEXT NOT NULL, token_hash TEXT NOT NULL, added_ms INTEGER NOT NULL);
      CREATE TABLE IF NOT EXISTS rows (
        kind TEXT NOT NULL, key TEXT NOT NULL, frame_id TEXT NOT NULL, fields TEXT NOT NULL,
        acked INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL,
        pushes INTEGER NOT NULL DEFAULT 0, next_ms INTEGER,
        PRIMARY KEY (kind, key));
      CREATE INDEX IF NOT EXISTS rows_frame ON rows (frame_id);`);
  }

  // --- the agent and its token -------------------------------------------------------

  /**
   * Registers agent `did` with the SHA-256 of its connector token.
   * @param {string} did
   * @param {string} tokenHash
   * @returns {{ok?: null, err?: string}} `agent_exists` when it is registered already
   */
  register(did, tokenHash) {
    if (this.sql.exec("SELECT 1 FROM agent").toArray().length) return { err: "agent_exists" };
    this.sql.exec("INSERT INTO agent (one, did, token_hash, added_ms) VALUES (1, ?, ?, ?)", did, tokenHash, Date.now());
    return { ok: null };
  }

  /**
   * Whether `tokenHash` is the hash of this agent's connector token.
   * @param {string} tokenHash
   * @returns {boolean}
   */
  admits(tokenHash) {
    return this.sql.exec("SELECT 1 FROM agent WHERE token_hash = ?", tokenHash).toArray().length === 1;
  }

  // --- receipts and deliveries ----------------------------------------------------

  /**
   * Records a receipt for this (sender) agent and pushes it to its connector.
   * @param {{requestId: string, senderAgentDid: string, recipientAgentDid: string, status: string, reason?: string}} r
   * @returns {{ok?: {tag: string, val?: number}, err?: {transient: boolean, message: string}}}
   */
  deliverReceipt(r) {
    for (const did of [r.senderAgentDid, r.recipientAgentDid]) {
      const why = agentDidError(did);
      if (why) return refused(invalidDid(did, why));
    }
    if (utf8(r.requestId) > MAX_REQUEST_ID_BYTES) return refused(`request id is ${utf8(r.requestId)} bytes, the limit is ${MAX_REQUEST_ID_BYTES}`);
    if (r.reason && utf8(r.reason) > MAX_REASON_BYTES) return refused(`reason is ${utf8(r.reason)} bytes, the limit is ${MAX_REASON_BYTES}`);
    const fields = { toAgentDid: r.recipientAgentDid, status: r.status, reason: r.reason };
    const held = this.row("receipt", r.requestId);
    if (held) {
      const old = JSON.parse(held.fields);
      if (old.toAgentDid !== fields.toAgentDid) return { ok: { tag: "ignored" } };
      if (old.status === fields.status && (old.reason ?? null) === (fields.reason ?? null)) return { ok: { tag: "unchanged" } };
    }
    return { ok: this.record("receipt", r.requestId, fields) };
  }

  /**
   * Records receipts for this (sender) agent, in order, as `deliverReceipt` does each.
   * @param {Array<{requestId: string, senderAgentDid: string, recipientAgentDid: string, status: string, reason?: string}>} receipts
   * @returns {Array<{ok?: {tag: string, val?: number}, err?: {transient: boolean, message: string}}>}
   */
  deliverReceipts(receipts) {
    return receipts.map((r) => this.deliverReceipt(r));
  }

  /**
   * Records a delivery for this agent and pushes it to its connector.
   * @param {{dedupKey: string, fromAgentDid: string, toAgentDid: string, payload: string, deliverySource?: string, contentType?: string, groupId?: string, conversationId?: string, replyTo?: string}} d
   */
  deliver(d) {
    for (const did of [d.fromAgentDid, d.toAgentDid]) {
      const why = agentDidError(did);
      if (why) return refused(invalidDid(did, why));
    }
    if (!d.dedupKey) return refused("the dedup key is blank");
    if (utf8(d.dedupKey) > MAX_REQUEST_ID_BYTES) return refused(`dedup key is ${utf8(d.dedupKey)} bytes, the limit is ${MAX_REQUEST_ID_BYTES}`);
    let payload;
    try {
      payload = JSON.parse(d.payload);
    } catch (err) {
      return refused(`payload is not JSON: ${err.message}`);
    }
    if (this.row("deliver", d.dedupKey)) return { ok: { tag: "unchanged" } };
    const { dedupKey, ...rest } = d;
    return { ok: this.record("deliver", dedupKey, { ...rest, payload }) };
  }

  /** @param {string} kind @param {string} key */
  row(kind, key) {
    this.prune();
    return this.sql.exec("SELECT * FROM rows WHERE kind = ? AND key = ?", kind, key).toArray()[0];
  }

  /**
   * Stores (or replaces) a row as unacknowledged and pushes it to every connection.
   * @param {'receipt' | 'deliver'} kind
   * @param {string} key
   * @param {Record<string, unknown>} fields
   * @returns {{tag: 'pushed', val: number} | {tag: 'stored'}}
   */
  record(kind, key, fields) {
    const now = Date.now();
    this.sql.exec(
      `INSERT OR REPLACE INTO rows (kind, key, frame_id, fields, acked, created_ms, pushes, next_ms) VALUES (?, ?, ?, ?, 0, ?, 0, NULL)`,
      kind, key, ulid(), JSON.stringify(fields), now,
    );
    this.cap(kind);
    const sockets = this.ctx.getWebSockets();
    if (sockets.length === 0) return { tag: "stored" };
    this.push(this.sql.exec("SELECT * FROM rows WHERE kind = ? AND key = ?", kind, key).toArray()[0], sockets);
    this.schedule();
    return { tag: "pushed", val: sockets.length };
  }

  /** Keeps the newest MAX_ROWS_PER_KIND rows of `kind`, logging dropped unacked ones. */
  cap(kind) {
    const over = this.sql.exec(
      "SELECT key, acked FROM rows WHERE kind = ? ORDER BY created_ms DESC LIMIT -1 OFFSET ?", kind, MAX_ROWS_PER_KIND,
    ).toArray();
    for (const row of over) {
      if (!row.acked) console.warn(`relay session: ${kind} ${row.key} dropped unacknowledged (session_full)`);
      this.sql.exec("DELETE FROM rows WHERE kind = ? AND key = ?", kind, row.key);
    }
  }

  /** Deletes rows older than the TTL, logging the unacknowledged ones. */
  prune() {
    const cutoff = Date.now() - ROW_TTL_MS;
    for (const row of this.sql.exec("SELECT kind, key FROM rows WHERE created_ms <= ? AND acked = 0", cutoff)) {
      console.warn(`relay session: ${row.kind} ${row.key} dropped unacknowledged (expired)`);
    }
    this.sql.exec("DELETE FROM rows WHERE created_ms <= ?", cutoff);
  }

  /**
   * Sends row `row`'s frame to `sockets` and books its next push.
   * @param {any} row
   * @param {WebSocket[]} sockets
   */
  push(row, sockets) {
    const fields = JSON.parse(row.fields);
    const text = row.kind === "receipt" ? frame("receipt", { originalFrameId: row.key, ...fields }, row.frame_id) : frame("deliver", fields, row.frame_id);
    for (const ws of sockets) {
      try {
        ws.send(text);
      } catch (err) {
        console.warn(`relay session: sending a ${row.kind} frame failed: ${err.message}`);
      }
    }
    const pushes = row.pushes + 1;
    this.sql.exec("UPDATE rows SET pushes = ?, next_ms = ? WHERE kind = ? AND key = ?", pushes, Date.now() + backoff(pushes), row.kind, row.key);
  }

  /** Pushes every unacknowledged row that is due (all of them when `all`). */
  pushDue(all = false) {
    const sockets = this.ctx.getWebSockets();
    if (sockets.length === 0) return;
    const rows = this.sql.exec("SELECT * FROM rows WHERE acked = 0 AND (? OR next_ms IS NULL OR next_ms <= ?) ORDER BY created_ms", all ? 1 : 0, Date.now()).toArray();
    for (const row of rows) {
      if (row.pushes >= RETRY_MAX_ATTEMPTS) {
        console.warn(`relay session: ${row.kind} ${row.key} dropped unacknowledged (out_of_pushes)`);
        this.sql.exec("UPDATE rows SET acked = 1 WHERE kind = ? AND key = ?", row.kind, row.key);
        continue;
      }
      this.push(row, sockets);
    }
  }

  /** Sets the alarm for the next push or heartbeat while a connector is connected. */
  schedule() {
    if (this.ctx.getWebSockets().length === 0) return;
    const next = this.sql.exec("SELECT MIN(next_ms) AS at FROM rows WHERE acked = 0").toArray()[0]?.at;
    const heartbeat = Date.now() + Math.min(this.heartbeatMs, this.timeoutMs);
    this.ctx.storage.setAlarm(next ? Math.min(next, heartbeat) : heartbeat);
  }

  /** Heartbeats, silent connections, due pushes. */
  async alarm() {
    const now = Date.now();
    for (const ws of this.ctx.getWebSockets()) {
      const seen = ws.deserializeAttachment() ?? { heard: now, beat: now };
      if (now - seen.heard >= this.timeoutMs) {
        this.closeSocket(ws, 1011, "heartbeat_ack_timeout");
      } else if (now - seen.beat >= this.heartbeatMs * 0.9) {
        ws.send(frame("heartbeat"));
        ws.serializeAttachment({ ...seen, beat: now });
      }
    }
    this.prune();
    this.pushDue();
    this.schedule();
  }

  // --- the connector WebSocket ------------------------------------------------------

  /**
   * Accepts the connector WebSocket (the Worker checked the token and the trust state):
   * an older connection is closed 1000 `superseded_by_new_connection`, then every
   * unacknowledged row is pushed.
   * @param {Request} request
   */
  async fetch(request) {
    if (request.headers.get("upgrade")?.toLowerCase() !== "websocket") return new Response("expected a WebSocket upgrade", { status: 426 });
    for (const old of this.ctx.getWebSockets()) this.closeSocket(old, 1000, "superseded_by_new_connection");
    const [client, server] = Object.values(new WebSocketPair());
    this.ctx.acceptWebSocket(server);
    const now = Date.now();
    server.serializeAttachment({ heard: now, beat: now });
    this.prune();
    this.pushDue(true);
    this.schedule();
    return new Response(null, { status: 101, webSocket: client });
  }

  /**
   * A frame from the connector.
   * @param {WebSocket} ws
   * @param {string | ArrayBuffer} message
   */
  async webSocketMessage(ws, message) {
    const size = typeof message === "string" ? utf8(message) : message.byteLength;
    if (size > MAX_FRAME_BYTES) return this.closeSocket(ws, 1009, "frame_too_large");
    const seen = ws.deserializeAttachment() ?? {};
    ws.serializeAttachment({ ...seen, heard: Date.now() });
    const { frame: f, error } = parseFrame(typeof message === "string" ? message : new TextDecoder().decode(message));
    if (error) {
      console.warn(`relay session: frame ignored: ${error}`);
      return;
    }
    switch (f.type) {
      case "heartbeat":
        ws.send(frame("heartbeat_ack", { ackId: f.id }));
        return;
      case "receipt_ack":
        this.sql.exec("UPDATE rows SET acked = 1 WHERE kind = 'receipt' AND frame_id = ?", f.ackId);
        return;
      case "deliver_ack":
        if (f.accepted === false) console.warn(`relay session: deliver ${f.ackId} refused by the connector: ${f.reason ?? "no reason"}`);
        this.sql.exec("UPDATE rows SET acked = 1 WHERE kind = 'deliver' AND frame_id = ?", f.ackId);
        return;
      default:
        return;
    }
  }

  /** The connector closed its side. */
  async webSocketClose(ws, code) {
    try {
      ws.close(code === 1005 || code === 1006 ? 1000 : code, "closed_by_connector");
    } catch {
      // already closed (a close this object started)
    }
  }

  /**
   * Closes `ws` with `code` and `reason`, ignoring one already closed.
   * @param {WebSocket} ws
   * @param {number} code
   * @param {string} reason
   */
  closeSocket(ws, code, reason) {
    try {
      ws.close(code, reason);
    } catch (err) {
      console.warn(`relay session: closing a connection ${code} ${reason} failed: ${err.message}`);
    }
  }

  /**
   * Closes every connection of this agent (a revocation: 1008 `agent_revoked`).
   * @param {number} code
   * @param {string} reason
   * @returns {number} how many were closed
   */
  closeAll(code, reason) {
    const sockets = this.ctx.getWebSockets();
    for (const ws of sockets) this.closeSocket(ws, code, reason);
    return sockets.length;
  }
}
