/**
 * The trust state: which agents are revoked. One SQLite-backed Durable Object per
 * deployment; a revocation marker lasts 30 days (docs/protocol.md section 3) and
 * marking again refreshes it.
 */

import { DurableObject } from "cloudflare:workers";
import { agentDidError, invalidDid } from "./did.js";

/** How long a revocation marker lasts. */
export const REVOCATION_TTL_MS = 30 * 24 * 3600 * 1000;

/** The trust-state Durable Object. */
export class TrustState extends DurableObject {
  /**
   * @param {DurableObjectState} ctx
   * @param {any} env
   */
  constructor(ctx, env) {
    super(ctx, env);
    this.sql = ctx.storage.sql;
    this.sql.exec(`CREATE TABLE IF NOT EXISTS revocations (
      did TEXT PRIMARY KEY, revoked_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL)`);
  }

  /**
   * Marks `did` revoked from now on; an invalid agent DID is refused for good.
   * @param {string} did
   * @returns {{ok?: null, err?: {transient: boolean, message: string}}}
   */
  revoke(did) {
    const reason = agentDidError(did);
    if (reason) return { err: { transient: false, message: invalidDid(did, reason) } };
    const now = Date.now();
    this.sql.exec(
      `INSERT INTO revocations (did, revoked_ms, expires_ms) VALUES (?, ?, ?)
       ON CONFLICT (did) DO UPDATE SET revoked_ms = excluded.revoked_ms, expires_ms = excluded.expires_ms`,
      did, now, now + REVOCATION_TTL_MS,
    );
    this.sql.exec("DELETE FROM revocations WHERE expires_ms <= ?", now);
    return { ok: null };
  }

  /**
   * The live marker of `did`, if any.
   * @param {string} did
   * @returns {{did: string, revokedMs: number | null, expiresMs: number | null, invalid?: string}}
   */
  lookup(did) {
    const reason = agentDidError(did);
    if (reason) return { did, revokedMs: null, expiresMs: null, invalid: invalidDid(did, reason) };
    const row = this.sql.exec("SELECT revoked_ms, expires_ms FROM revocations WHERE did = ? AND expires_ms > ?", did, Date.now()).toArray()[0];
    return { did, revokedMs: row ? row.revoked_ms : null, expiresMs: row ? row.expires_ms : null };
  }

  /**
   * Whether `did` is currently revoked.
   * @param {string} did
   * @returns {{ok?: boolean, err?: {transient: boolean, message: string}}}
   */
  isRevoked(did) {
    const found = this.lookup(did);
    if (found.invalid) return { err: { transient: false, message: found.invalid } };
    return { ok: found.revokedMs !== null };
  }
}
