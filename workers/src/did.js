/** Agent DIDs: `did:cdi:<authority>:agent:<ULID>` (docs/protocol.md section 2). */

/**
 * Why `did` is not a valid agent DID, or `null` when it is one.
 * @param {string} did
 * @returns {string | null}
 */
export function agentDidError(did) {
  const parts = String(did).split(":");
  if (parts.length !== 5) return "expected did:cdi:<authority>:agent:<ULID>";
  const [scheme, method, authority, kind, id] = parts;
  if (scheme !== "did" || method !== "cdi") return "DID method is not did:cdi";
  const labels = authority.split(".");
  const labelOk = (l) => l.length > 0 && l.length <= 63 && !l.startsWith("-") && !l.endsWith("-") && /^[a-z0-9-]+$/.test(l);
  if (authority.length > 253 || labels.length < 2 || !labels.every(labelOk)) return "authority is not a valid DNS name";
  if (kind !== "agent") return "DID is not an agent DID";
  if (!/^[0-9A-HJKMNP-TV-Z]{26}$/.test(id)) return "agent id is not a 26-character ULID";
  return null;
}

/**
 * The message clawq gives for an invalid agent DID.
 * @param {string} did
 * @param {string} reason
 * @returns {string}
 */
export function invalidDid(did, reason) {
  return `invalid agent DID \`${did}\`: ${reason}`;
}
