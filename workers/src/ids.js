/** ULIDs, timestamps and token digests. */

const CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/**
 * A new ULID (48-bit millisecond time, 80 random bits, Crockford base32).
 * @returns {string}
 */
export function ulid() {
  let time = Date.now();
  let out = "";
  for (let i = 0; i < 10; i++) {
    out = CROCKFORD[time % 32] + out;
    time = Math.floor(time / 32);
  }
  const random = crypto.getRandomValues(new Uint8Array(16));
  for (let i = 0; i < 16; i++) out += CROCKFORD[random[i] % 32];
  return out;
}

/**
 * `ms` as ISO-8601 UTC with milliseconds.
 * @param {number} ms milliseconds since the epoch
 * @returns {string}
 */
export function iso(ms) {
  return new Date(ms).toISOString();
}

/**
 * The SHA-256 of `text`, lowercase hex (how tokens are stored).
 * @param {string} text
 * @returns {Promise<string>}
 */
export async function sha256Hex(text) {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Whether two strings are equal, in time independent of where they differ.
 * @param {string} a
 * @param {string} b
 * @returns {boolean}
 */
export function sameSecret(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

/**
 * A new secret token with `prefix` (e.g. `cqa_` for an agent's connector).
 * @param {string} prefix
 * @returns {string}
 */
export function randomToken(prefix) {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  return prefix + [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}
