/**
 * Actor storage: one SQLite-backed Durable Object per (consumer, actor), holding that
 * actor's keys. Bounds as clawq's (actor name 256 B, key 1 KiB, value 128 KiB, a page
 * at most 1000 entries and 1 MiB after its first entry).
 */

import { DurableObject } from "cloudflare:workers";

const MAX_ACTOR_BYTES = 256;
const MAX_KEY_BYTES = 1024;
const MAX_VALUE_BYTES = 128 * 1024;
const MAX_LIST_PAGE = 1000;
const MAX_LIST_PAGE_BYTES = 1 << 20;

/**
 * A permanent error naming the bound `what` broke, or null.
 * @param {string} what
 * @param {number} len
 * @param {number} limit
 */
function bound(what, len, limit) {
  return len > limit ? { err: { transient: false, message: `${what} is ${len} bytes, the limit is ${limit}` } } : null;
}

const utf8 = (s) => new TextEncoder().encode(s).length;

/** The actor-storage Durable Object. */
export class ActorStorage extends DurableObject {
  /**
   * @param {DurableObjectState} ctx
   * @param {any} env
   */
  constructor(ctx, env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL)");
  }

  /** @param {string} actor @param {string} key */
  check(actor, key) {
    return bound("actor name", utf8(actor), MAX_ACTOR_BYTES) ?? bound("key", utf8(key), MAX_KEY_BYTES);
  }

  /**
   * The value under `key`.
   * @param {string} actor
   * @param {string} key
   */
  get(actor, key) {
    const refused = this.check(actor, key);
    if (refused) return refused;
    const row = this.sql.exec("SELECT value FROM kv WHERE key = ?", new TextEncoder().encode(key)).toArray()[0];
    return { ok: row ? new Uint8Array(row.value) : undefined };
  }

  /**
   * Stores `value` under `key`.
   * @param {string} actor
   * @param {string} key
   * @param {Uint8Array} value
   */
  put(actor, key, value) {
    const refused = this.check(actor, key) ?? bound("value", value.byteLength, MAX_VALUE_BYTES);
    if (refused) return refused;
    this.sql.exec("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", new TextEncoder().encode(key), value);
    return { ok: null };
  }

  /**
   * Deletes `key`.
   * @param {string} actor
   * @param {string} key
   */
  delete(actor, key) {
    const refused = this.check(actor, key);
    if (refused) return refused;
    this.sql.exec("DELETE FROM kv WHERE key = ?", new TextEncoder().encode(key));
    return { ok: null };
  }

  /**
   * One page of the keys starting with `prefix`, after `startAfter`, in UTF-8 byte order
   * (keys are stored as UTF-8 blobs, which SQLite compares bytewise).
   * @param {string} actor
   * @param {string} prefix
   * @param {string | null} startAfter
   * @param {number} limit
   */
  listPrefix(actor, prefix, startAfter, limit) {
    const refused = this.check(actor, prefix) ?? (startAfter !== null ? bound("key", utf8(startAfter), MAX_KEY_BYTES) : null);
    if (refused) return refused;
    const enc = new TextEncoder();
    const dec = new TextDecoder();
    const page = [];
    let bytes = 0;
    const after = enc.encode(startAfter ?? "");
    const rows = this.sql.exec(
      "SELECT key, value FROM kv WHERE substr(key, 1, ?) = ? AND (? = 0 OR key > ?) ORDER BY key LIMIT ?",
      enc.encode(prefix).length, enc.encode(prefix), startAfter === null ? 0 : 1, after, Math.min(limit, MAX_LIST_PAGE),
    );
    for (const row of rows) {
      const size = row.key.byteLength + row.value.byteLength;
      if (page.length > 0 && bytes + size > MAX_LIST_PAGE_BYTES) break;
      bytes += size;
      page.push([dec.decode(row.key), new Uint8Array(row.value)]);
    }
    return { ok: page };
  }
}
