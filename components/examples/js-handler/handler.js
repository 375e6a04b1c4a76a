// A clawq handler in JavaScript, for world `receipt-handler` of wit/queues.wit
// (clawdentity:queues@0.2.0).
//
// Built with `jco componentize` (StarlingMonkey). How jco maps the WIT types:
// - the exported interface `handler` is the ES export `handler`, an object whose `handle`
//   method is the WIT function;
// - records are objects with camelCase fields (`timestampMs` is a BigInt: it is a u64);
//   `list<u8>` is a Uint8Array; enums are their case names as strings ('json', 'warn');
// - variants are `{ tag, val }` with the kebab-case case name:
//   `{ tag: 'ack' }`, `{ tag: 'retry', val: 30 }` (or `val: undefined` for none),
//   `{ tag: 'dead-letter', val: 'why' }`;
// - a `result<T, E>` return value: return T for `ok`; throw the E value itself for `err`
//   (here a string: `throw 'why'`). Throwing an Error object (or any uncaught exception)
//   traps instead, with no message under `--disable all`: clawq retries the whole batch
//   either way, but only the thrown string reaches the host's log;
// - an imported function returning `result<T, host-error>` returns T, or throws an Error
//   whose `payload` is the `host-error` record `{ transient, message }`.
import { write } from 'clawdentity:queues/log@0.2.0';
import { deliver } from 'clawdentity:queues/relay-sessions@0.2.0';

// Where this handler's deliveries come from (`deliverySource` of the `deliver` frame).
const DELIVERY_SOURCE = 'clawq.examples.js-handler';

// StarlingMonkey has TextDecoder; QuickJS (`--backend qjs`) does not: fall back to
// `decodeURIComponent(escape(latin1))`, which throws on invalid UTF-8.
const utf8 =
  typeof TextDecoder === 'function'
    ? new TextDecoder('utf-8')
    : {
        decode(bytes) {
          let latin1 = '';
          for (let i = 0; i < bytes.length; i += 8192) {
            latin1 += String.fromCharCode.apply(null, bytes.subarray(i, i + 8192));
          }
          return decodeURIComponent(escape(latin1));
        },
      };

function handleOne(message) {
  let receipt;
  try {
    receipt = JSON.parse(utf8.decode(message.body));
  } catch (e) {
    write('warn', `message ${message.id}: body is not JSON: ${e}`);
    return { tag: 'ack' };
  }
  if (
    receipt === null ||
    typeof receipt !== 'object' ||
    receipt.type !== 'delivery_receipt' ||
    receipt.status !== 'dead_lettered'
  ) {
    return { tag: 'ack' };
  }
  const reason = typeof receipt.reason === 'string' ? ` (${receipt.reason})` : '';
  write(
    'warn',
    `request ${receipt.requestId} to ${receipt.recipientAgentDid} was dead-lettered${reason}`,
  );
  if (typeof receipt.senderAgentDid !== 'string') {
    write('warn', `message ${message.id}: receipt without senderAgentDid`);
    return { tag: 'ack' };
  }
  // A system message from the sender to itself. The session keeps it until the sender's
  // connector acknowledges it, so there is nothing to retry when no connector is
  // connected; the dedup key makes a receipt handled again hand over nothing new.
  const delivery = {
    dedupKey: `js-handler:dead-lettered:${receipt.requestId}`,
    fromAgentDid: receipt.senderAgentDid,
    toAgentDid: receipt.senderAgentDid,
    payload: JSON.stringify({
      system: {
        type: 'clawq.js-handler.dead-lettered',
        requestId: receipt.requestId,
        message: `your message ${receipt.requestId} to ${receipt.recipientAgentDid} could not be delivered${reason}`,
      },
    }),
    deliverySource: DELIVERY_SOURCE,
  };
  try {
    const result = deliver(delivery);
    const what = result.tag === 'pushed' ? `pushed to ${result.val} connector(s)` : result.tag;
    write('info', `told ${receipt.senderAgentDid} about ${receipt.requestId}: ${what}`);
  } catch (e) {
    const err = e && e.payload;
    if (err && err.transient) {
      // The session is unavailable: deliver this message again after the consumer's
      // retry_delay.
      return { tag: 'retry', val: undefined };
    }
    write('warn', `deliver refused: ${err ? err.message : e}`);
  }
  return { tag: 'ack' };
}

export const handler = {
  handle(queue, messages) {
    return messages.map(handleOne);
  },
};
