/**
 * The clawq Worker: the same handler components `clawq serve` runs, under Cloudflare
 * Workers. `fetch` serves the HTTP subset (./http.js), `queue` feeds the batches of both
 * queues to the components (./consume.js), and the Durable Objects are the capability
 * providers (./trust.js, ./session.js, ./actor.js).
 */

import { consume } from "./consume.js";
import { serve } from "./http.js";

export { TrustState } from "./trust.js";
export { RelaySession } from "./session.js";
export { ActorStorage } from "./actor.js";

export default {
  /**
   * @param {Request} request
   * @param {any} env
   */
  async fetch(request, env) {
    return serve(request, env);
  },

  /**
   * @param {MessageBatch} batch
   * @param {any} env
   */
  async queue(batch, env) {
    const started = performance.now();
    const { handlerMs } = await consume(batch, env);
    if (env.LOG_BATCH_TIMINGS) {
      console.log(`batch ${batch.queue} of ${batch.messages.length}: handlers ${handlerMs.toFixed(2)} ms, total ${(performance.now() - started).toFixed(2)} ms`);
    }
  },
};
