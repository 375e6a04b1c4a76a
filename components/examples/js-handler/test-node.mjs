// Runs handler batches through the built component in Node (jco transpile), against fake
// capabilities that record every call, and checks the outcomes.
//
//   node test-node.mjs [js_handler.wasm]
//
// This tests the handler's logic without clawq; `clawq run` tests it in the real host.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { transpile } from '@bytecodealliance/jco';

const wasmPath = process.argv[2] ?? 'js_handler.wasm';
const dir = await mkdtemp(join(tmpdir(), 'js-handler-'));
try {
  const { files } = await transpile(await readFile(wasmPath), {
    name: 'handler',
    instantiation: { tag: 'async' },
  });
  for (const [name, bytes] of Object.entries(files)) {
    await mkdir(dirname(join(dir, name)), { recursive: true });
    await writeFile(join(dir, name), bytes);
  }
  await writeFile(join(dir, 'package.json'), '{"type":"module"}');
  const { instantiate } = await import(pathToFileURL(join(dir, 'handler.js')));

  // A fresh instance per batch, as clawq does.
  async function runBatch(bodies, deliverResult = () => ({ tag: 'pushed', val: 1 })) {
    const calls = [];
    const imports = {
      'clawdentity:queues/types': {},
      'clawdentity:queues/log': {
        write: (level, message) => calls.push(['log', level, message]),
      },
      'clawdentity:queues/relay-sessions': {
        deliverReceipt: () => assert.fail('deliver-receipt is not used'),
        deliverReceipts: () => assert.fail('deliver-receipts is not used'),
        deliver: (delivery) => {
          calls.push(['deliver', { ...delivery, payload: JSON.parse(delivery.payload) }]);
          return deliverResult();
        },
      },
      'clawdentity:queues/actor-storage': {
        get: () => assert.fail('unused'),
        put: () => assert.fail('unused'),
        delete: () => assert.fail('unused'),
        listPrefix: () => assert.fail('unused'),
      },
    };
    const instance = await instantiate(
      async (file) => WebAssembly.compile(await readFile(join(dir, file))),
      imports,
    );
    const enc = new TextEncoder();
    const messages = bodies.map((body, i) => ({
      id: `m${i}`,
      attempts: 1,
      timestampMs: 1_700_000_000_000n,
      contentType: 'json',
      body: enc.encode(typeof body === 'string' ? body : JSON.stringify(body)),
    }));
    const outcomes = instance['clawdentity:queues/handler@0.2.0'].handle('q', messages);
    return { calls, outcomes };
  }
  // A host-error as the transpiled bindings expect an import to throw it.
  const hostError = (transient, message) =>
    Object.assign(new Error(message), { payload: { transient, message } });

  const sender = 'did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB';
  const recipient = 'did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC';
  const dead = {
    type: 'delivery_receipt',
    requestId: 'r1',
    senderAgentDid: sender,
    recipientAgentDid: recipient,
    status: 'dead_lettered',
    reason: 'hook down',
  };

  // A dead-lettered receipt: a warning and a delivery from the sender to itself.
  // A delivered receipt and a non-JSON body: ack (the latter with a warning).
  let { calls, outcomes } = await runBatch([
    dead,
    { ...dead, requestId: 'r2', status: 'delivered_to_webhook' },
    'not json {',
  ]);
  assert.deepEqual(outcomes, [{ tag: 'ack' }, { tag: 'ack' }, { tag: 'ack' }]);
  assert.equal(calls[0][0], 'log');
  assert.equal(calls[0][1], 'warn');
  assert.match(calls[0][2], /r1 .* dead-lettered \(hook down\)/);
  assert.equal(calls[1][0], 'deliver');
  const { contentType, groupId, conversationId, replyTo, ...delivery } = calls[1][1];
  assert.deepEqual([contentType, groupId, conversationId, replyTo], [
    undefined,
    undefined,
    undefined,
    undefined,
  ]);
  assert.deepEqual(delivery, {
    dedupKey: 'js-handler:dead-lettered:r1',
    fromAgentDid: sender,
    toAgentDid: sender,
    payload: {
      system: {
        type: 'clawq.js-handler.dead-lettered',
        requestId: 'r1',
        message: `your message r1 to ${recipient} could not be delivered (hook down)`,
      },
    },
    deliverySource: 'clawq.examples.js-handler',
  });
  assert.deepEqual(calls[2], ['log', 'info', `told ${sender} about r1: pushed to 1 connector(s)`]);
  assert.deepEqual(calls[3].slice(0, 2), ['log', 'warn']);
  assert.match(calls[3][2], /m2: body is not JSON/);
  assert.equal(calls.length, 4);

  // Kept for a connector that is not connected: nothing to retry.
  ({ calls, outcomes } = await runBatch([dead], () => ({ tag: 'stored' })));
  assert.deepEqual(outcomes, [{ tag: 'ack' }]);
  assert.deepEqual(calls.at(-1), ['log', 'info', `told ${sender} about r1: stored`]);

  // A transient deliver error: retry (after the consumer's retry_delay); a permanent one:
  // log and ack.
  ({ outcomes } = await runBatch([dead], () => {
    throw hostError(true, 'overloaded');
  }));
  assert.deepEqual(outcomes, [{ tag: 'retry', val: undefined }]);
  ({ calls, outcomes } = await runBatch([dead], () => {
    throw hostError(false, 'invalid did');
  }));
  assert.deepEqual(outcomes, [{ tag: 'ack' }]);
  assert.deepEqual(calls.at(-1), ['log', 'warn', 'deliver refused: invalid did']);

  console.log('ok: 4 batches');
} finally {
  await rm(dir, { recursive: true, force: true });
}
