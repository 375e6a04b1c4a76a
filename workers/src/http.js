/**
 * The HTTP subset of clawq's API that producers, operators and connectors use, with the
 * same bearer-token auth and JSON error bodies:
 *
 * | route | who |
 * |---|---|
 * | `GET /healthz` | anyone |
 * | `POST /v1/queues/{queue}/messages`, `/messages/batch` | a producer token naming the queue, or the admin token |
 * | `GET /v1/relay/connect?agent=<did>` | that agent's connector token |
 * | `GET /v1/trust/agents/{did}` | admin |
 * | `POST /v1/agents` `{"did"}` | admin: registers an agent, answers its token once |
 *
 * The admin token is the `ADMIN_TOKEN` secret. Producer tokens are the `PRODUCER_TOKENS`
 * var: JSON `{"<sha256 hex of the token>": ["<queue>", ...]}`, so the config holds no
 * secret. Agent tokens live hashed in the agent's relay-session object. Any other route
 * needs the admin token (401 without, 404 with).
 */

import { sessionObject, trustObject } from "./capabilities.js";
import { agentDidError, invalidDid } from "./did.js";
import { apiError, json, unauthorized } from "./errors.js";
import { iso, randomToken, sameSecret, sha256Hex, ulid } from "./ids.js";
import { publish } from "./publish.js";
import { queuesOf } from "./queues.js";

/**
 * The bearer token of `request`, if it has one.
 * @param {Request} request
 * @returns {string | null}
 */
function bearer(request) {
  const value = request.headers.get("authorization");
  if (!value) return null;
  const space = value.indexOf(" ");
  if (space < 0) return null;
  const token = value.slice(space + 1).trim();
  return value.slice(0, space).toLowerCase() === "bearer" && token ? token : null;
}

/**
 * Who the bearer token of `request` is: `admin`, the queues of a producer token, or a
 * refusal.
 * @param {Request} request
 * @param {any} env
 * @returns {Promise<{admin: true} | {queues: string[]} | {refusal: Response}>}
 */
async function principal(request, env) {
  const token = bearer(request);
  if (!token) return { refusal: unauthorized("this route needs `Authorization: Bearer <token>`") };
  const digest = await sha256Hex(token);
  if (env.ADMIN_TOKEN && sameSecret(digest, await sha256Hex(env.ADMIN_TOKEN))) return { admin: true };
  const producers = env.PRODUCER_TOKENS ? JSON.parse(env.PRODUCER_TOKENS) : {};
  const queues = producers[digest];
  return queues ? { queues } : { refusal: unauthorized("unknown token") };
}

/**
 * Answers `request`.
 * @param {Request} request
 * @param {any} env
 * @returns {Promise<Response>}
 */
export async function serve(request, env) {
  const url = new URL(request.url);
  const method = request.method === "HEAD" ? "GET" : request.method;
  const path = url.pathname;
  if (method === "GET" && path === "/healthz") return json({ status: "ok" });
  if (method === "GET" && path === "/v1/relay/connect") return connect(request, env, url);

  const who = await principal(request, env);
  if (who.refusal) return who.refusal;
  const published = path.match(/^\/v1\/queues\/([^/]+)\/messages(\/batch)?$/);
  if (method === "POST" && published) {
    const queue = decodeURIComponent(published[1]);
    if (who.queues && !who.queues.includes(queue)) {
      return apiError(403, "forbidden", `this producer token may not publish to \`${queue}\` (it publishes to ${who.queues.join(", ")})`);
    }
    const config = queuesOf(env)[queue];
    if (!config) return apiError(404, "queue_not_found", `no queue named \`${queue}\``);
    return publish(request, env[config.producer], Boolean(published[2]), ulid);
  }
  if (who.queues) return apiError(403, "forbidden", "this producer token may only publish to its queues; this route needs an admin token");

  const trusted = path.match(/^\/v1\/trust\/agents\/([^/]+)$/);
  if (method === "GET" && trusted) return trust(env, decodeURIComponent(trusted[1]));
  if (method === "POST" && path === "/v1/agents") return addAgent(request, env);
  return apiError(404, "not_found", "no such route");
}

/**
 * `GET /v1/trust/agents/{did}`.
 * @param {any} env
 * @param {string} did
 */
async function trust(env, did) {
  const found = await trustObject(env).lookup(did);
  if (found.invalid) return apiError(400, "invalid_did", found.invalid);
  return json({
    did,
    revoked: found.revokedMs !== null,
    revokedAt: found.revokedMs === null ? null : iso(found.revokedMs),
    expiresAt: found.expiresMs === null ? null : iso(found.expiresMs),
  });
}

/**
 * `POST /v1/agents` `{"did"}`: registers the agent and answers its connector token,
 * shown once and stored hashed.
 * @param {Request} request
 * @param {any} env
 */
async function addAgent(request, env) {
  let body;
  try {
    body = await request.json();
  } catch (err) {
    return apiError(400, "invalid_request", `invalid JSON body: ${err.message}`);
  }
  const did = typeof body?.did === "string" ? body.did : "";
  const why = agentDidError(did);
  if (why) return apiError(400, "invalid_did", invalidDid(did, why));
  const revoked = await trustObject(env).isRevoked(did);
  if (revoked.ok) return apiError(409, "agent_revoked", `agent ${did} is revoked`);
  const token = randomToken("cqa_");
  const added = await sessionObject(env, did).register(did, await sha256Hex(token));
  if (added.err) return apiError(409, "agent_exists", `agent ${did} is already registered`);
  return json({ did, token });
}

/**
 * `GET /v1/relay/connect?agent=<did>`: checks the agent's token and the trust state
 * (401 naming the cause before the upgrade), then hands the upgrade to the agent's
 * relay-session object.
 * @param {Request} request
 * @param {any} env
 * @param {URL} url
 */
async function connect(request, env, url) {
  const did = url.searchParams.get("agent");
  const token = bearer(request);
  if (!did || !token) return unauthorized("an ?agent=<did> and an `Authorization: Bearer <token>` are required");
  const session = sessionObject(env, did);
  if (!(await session.admits(await sha256Hex(token)))) return unauthorized("unknown agent or wrong token");
  const revoked = await trustObject(env).isRevoked(did);
  if (revoked.ok) return unauthorized("agent is revoked");
  if (revoked.err) return unauthorized("unknown agent or wrong token");
  return session.fetch(request);
}
