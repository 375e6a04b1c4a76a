/**
 * The capability imports of a handler component, served by Durable Objects. Every call
 * is async (a Durable Object RPC); jco's JSPI mode suspends the component while it runs,
 * so the WIT stays synchronous and the component bytes unchanged.
 *
 * A Durable Object answers `{ok: value}` or `{err: {transient, message}}`; a call that
 * throws (the object unavailable, overloaded, reset) is a transient error, so the
 * handler asks for a retry.
 */

/**
 * The stub of the trust-state object (one per deployment).
 * @param {any} env
 */
export function trustObject(env) {
  return env.TRUST.get(env.TRUST.idFromName("trust"));
}

/**
 * The stub of the relay-session object of agent `did`.
 * @param {any} env
 * @param {string} did
 */
export function sessionObject(env, did) {
  return env.SESSIONS.get(env.SESSIONS.idFromName(did));
}

/**
 * The stub of the actor-storage object of `actor` for `consumer`.
 * @param {any} env
 * @param {string} consumer
 * @param {string} actor
 */
export function actorObject(env, consumer, actor) {
  return env.ACTORS.get(env.ACTORS.idFromName(`${consumer}\u0000${actor}`));
}

/**
 * A Durable Object call as a WIT `result<T, host-error>` for jco: `{tag: 'ok' | 'err'}`.
 * @param {() => Promise<{ok?: unknown, err?: {transient: boolean, message: string}}>} call
 * @returns {Promise<{tag: 'ok' | 'err', val: unknown}>}
 */
async function result(call) {
  try {
    return asResult(await call());
  } catch (err) {
    return unavailable(err);
  }
}

/**
 * A Durable Object call answering a list (one answer per item of `count`) as a WIT
 * `list<result<T, host-error>>`; a call that throws fails every item, transiently.
 * @param {number} count
 * @param {() => Promise<Array<{ok?: unknown, err?: {transient: boolean, message: string}}>>} call
 * @returns {Promise<Array<{tag: 'ok' | 'err', val: unknown}>>}
 */
async function results(count, call) {
  try {
    return (await call()).map(asResult);
  } catch (err) {
    return new Array(count).fill(unavailable(err));
  }
}

/**
 * A Durable Object's answer as a WIT result.
 * @param {{ok?: unknown, err?: {transient: boolean, message: string}}} answer
 */
function asResult(answer) {
  return answer.err ? { tag: "err", val: answer.err } : { tag: "ok", val: answer.ok };
}

/**
 * The transient error of a Durable Object call that threw `err`.
 * @param {any} err
 */
function unavailable(err) {
  return { tag: "err", val: { transient: true, message: `durable object call failed: ${err?.message ?? err}` } };
}

/** Most receipts one `deliver-receipts` call takes (clawq's bound). */
const MAX_RECEIPTS_PER_CALL = 1000;

/**
 * A WIT receipt as a relay-session object takes it: trimmed, its status on the wire.
 * @param {{requestId: string, senderAgentDid: string, recipientAgentDid: string, status: string, reason?: string}} r
 */
function receiptIn(r) {
  return {
    requestId: r.requestId.trim(),
    senderAgentDid: r.senderAgentDid.trim(),
    recipientAgentDid: r.recipientAgentDid.trim(),
    status: RECEIPT_STATUS[r.status],
    reason: trimmed(r.reason),
  };
}

/**
 * `relay-sessions.deliver-receipts`: each sender's receipts go to its session object in
 * one call, in the order given, and the senders' objects take theirs at the same time;
 * the answers come back in the order of `receipts`.
 * @param {any} env
 * @param {Array<any>} receipts WIT receipts
 */
async function deliverReceipts(env, receipts) {
  if (receipts.length > MAX_RECEIPTS_PER_CALL) {
    const message = `relay-sessions.deliver-receipts takes at most ${MAX_RECEIPTS_PER_CALL} receipts, not ${receipts.length}`;
    return receipts.map(() => ({ tag: "err", val: { transient: false, message } }));
  }
  /** @type {Map<string, number[]>} the places in `receipts` of each sender's receipts */
  const bySender = new Map();
  receipts.forEach((r, at) => {
    const did = r.senderAgentDid.trim();
    const places = bySender.get(did) ?? [];
    places.push(at);
    bySender.set(did, places);
  });
  const answers = new Array(receipts.length);
  await Promise.all(
    [...bySender].map(async ([did, places]) => {
      const theirs = places.map((at) => receiptIn(receipts[at]));
      const answered = await results(places.length, () => sessionObject(env, did).deliverReceipts(theirs));
      places.forEach((at, i) => (answers[at] = answered[i]));
    }),
  );
  return answers;
}

/** WIT `receipt-status` → wire status. */
const RECEIPT_STATUS = { "delivered-to-webhook": "delivered_to_webhook", "dead-lettered": "dead_lettered" };

/**
 * A trimmed optional string; `undefined` when absent or blank (as the Rust host does).
 * @param {string | undefined | null} value
 */
function trimmed(value) {
  const t = value == null ? "" : String(value).trim();
  return t === "" ? undefined : t;
}

/** WIT log levels → console methods. */
const CONSOLE = { trace: "debug", debug: "debug", info: "info", warn: "warn", error: "error" };
/** Longest log line kept, in bytes (clawq's bound). */
const MAX_LOG_LINE_BYTES = 4096;

/**
 * The capability imports for the handler of consumer `consumer`, keyed as jco's
 * generated code looks them up (unversioned interface names).
 * @param {any} env the Worker's bindings
 * @param {string} consumer the consumer (handler slot) name, for logs and actor storage
 * @returns {Record<string, Record<string, Function>>}
 */
export function capabilityImports(env, consumer) {
  return {
    "clawdentity:queues/types": {},
    "clawdentity:queues/log": {
      write(level, message) {
        let line = String(message);
        const bytes = new TextEncoder().encode(line);
        if (bytes.length > MAX_LOG_LINE_BYTES) {
          line = new TextDecoder().decode(bytes.slice(0, MAX_LOG_LINE_BYTES)).replace(/\uFFFD$/, "") + ` … (${bytes.length} bytes)`;
        }
        console[CONSOLE[level] ?? "log"](`[${consumer}] ${line}`);
      },
    },
    "clawdentity:queues/trust-store": {
      revokeAgent: (did) =>
        result(async () => {
          const answer = await trustObject(env).revoke(did);
          if (answer.ok !== undefined) {
            // The revoked agent's open connection is closed (1008 agent_revoked).
            await sessionObject(env, did).closeAll(1008, "agent_revoked");
          }
          return answer;
        }),
      isRevoked: (did) => result(() => trustObject(env).isRevoked(did)),
    },
    "clawdentity:queues/relay-sessions": {
      deliverReceipt: (r) => result(() => sessionObject(env, r.senderAgentDid.trim()).deliverReceipt(receiptIn(r))),
      deliverReceipts: (receipts) => deliverReceipts(env, receipts),
      deliver: (d) =>
        result(() =>
          sessionObject(env, d.toAgentDid.trim()).deliver({
            dedupKey: d.dedupKey.trim(),
            fromAgentDid: d.fromAgentDid.trim(),
            toAgentDid: d.toAgentDid.trim(),
            payload: d.payload.trim(),
            deliverySource: trimmed(d.deliverySource),
            contentType: trimmed(d.contentType),
            groupId: trimmed(d.groupId),
            conversationId: trimmed(d.conversationId),
            replyTo: trimmed(d.replyTo),
          }),
        ),
    },
    "clawdentity:queues/actor-storage": {
      get: (actor, key) => result(() => actorObject(env, consumer, actor).get(actor, key)),
      put: (actor, key, value) => result(() => actorObject(env, consumer, actor).put(actor, key, value)),
      delete: (actor, key) => result(() => actorObject(env, consumer, actor).delete(actor, key)),
      listPrefix: (actor, prefix, startAfter, limit) =>
        result(() => actorObject(env, consumer, actor).listPrefix(actor, prefix, startAfter ?? null, limit)),
    },
  };
}
