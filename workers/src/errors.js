/** JSON answers, shaped like clawq's: every error is `{"error": {"code", "message"}}`. */

/**
 * A JSON response.
 * @param {unknown} value the body
 * @param {number} [status] the HTTP status (200)
 * @param {Record<string, string>} [headers] extra headers
 * @returns {Response}
 */
export function json(value, status = 200, headers = {}) {
  return new Response(JSON.stringify(value), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

/**
 * An error answer with this status, machine-readable code and message.
 * @param {number} status
 * @param {string} code e.g. `invalid_request`
 * @param {string} message
 * @param {Record<string, string>} [headers]
 * @returns {Response}
 */
export function apiError(status, code, message, headers = {}) {
  return json({ error: { code, message } }, status, headers);
}

/**
 * A 401 `unauthorized` answer with `WWW-Authenticate: Bearer`.
 * @param {string} message
 * @returns {Response}
 */
export function unauthorized(message) {
  return apiError(401, "unauthorized", message, { "www-authenticate": "Bearer" });
}
