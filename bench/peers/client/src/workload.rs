//! The workload every system gets: the same revocation events, published in batches of
//! [`BATCH`] and consumed in batches of [`BATCH`], and what one run measures.

use std::time::Duration;

/// Messages per published batch and per consumed batch.
pub const BATCH: usize = 100;

/// How long a consumer waits for a batch to fill before taking what is there (clawq's
/// `max_batch_timeout`, Miniflare's `maxBatchTimeout`, the JetStream pull's `expires`).
pub const BATCH_TIMEOUT: Duration = Duration::from_millis(100);

/// How often the driver reads a server's acked counter (clawq, Miniflare). A run's end
/// is seen up to this late, so a run's time comes in steps of it: at 150 ms, a run of
/// about 1.6 s read as 55,600, 60,600 or 66,700 msg/s and nothing in between.
pub const POLL: Duration = Duration::from_millis(10);

/// The body of message `i`: a clawdentity `agent.auth.revoked` event, shaped like the
/// one of `host/benches/throughput.rs`, each for its own agent.
pub fn revocation(i: usize) -> serde_json::Value {
    let did = format!(
        "did:cdi:registry.clawdentity.com:agent:{}",
        ulid::Ulid::from_parts(i as u64, 7)
    );
    serde_json::json!({
        "id": format!("evt-{i}"), "type": "agent.auth.revoked", "version": "v1",
        "timestampUtc": "2026-11-24T10:00:00.000Z", "initiatedByAccountId": null,
        "data": {"reason": "agent_revoked", "metadata": {"agentDid": did}}
    })
}

/// Every body of a run of `n` messages, serialised.
pub fn bodies(n: usize) -> Vec<String> {
    (0..n).map(|i| revocation(i).to_string()).collect()
}

/// What one run of one system measured.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// Messages acked per second, from the first publish to the last ack seen.
    pub rate: f64,
    /// Messages published per second, from the first publish to the last one answered.
    pub publish_rate: f64,
    /// User + system CPU seconds of the server's processes over the run, per message.
    pub cpu_per_message: f64,
    /// The server's peak resident set (its processes' `VmHWM` summed), in bytes.
    pub peak_rss: u64,
    /// What the system says about the run, read after it (empty when nothing).
    pub detail: String,
}
