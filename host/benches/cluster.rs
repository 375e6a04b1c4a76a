//! Cluster benchmark (not a test): messages/s end to end (HTTP publish → queue →
//! CRL-invalidation component → trust store → ack) with 1, 2 and 3 hosts sharing one
//! NATS JetStream server, beside one host on SQLite: the real `clawq` binary and the
//! pinned `nats-server`, started by the end-to-end tests' support. [`PRODUCERS`]
//! producers publish batches of 100 revocation events spread over the hosts while the
//! hosts consume; the clock stops when the queue is drained. Every host runs on this
//! machine, so more hosts add no cores: the figures show what the cluster costs, not how
//! it scales out.
//!
//! Run with `cargo bench -p clawq --bench cluster`. `CLAWQ_BENCH_MESSAGES` sets the
//! message count (default 20000).

// The tests' support, shared: this benchmark uses a part of it.
#[allow(dead_code)]
#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use serde_json::{Value, json};
use support::nats::NatsServer;
use support::{Host, find_sample, wait_for};

const EVENTS: &str = "clawdentity-events";
const BATCH: usize = 100;
const PRODUCERS: usize = 4;

/// The hosts' config: the events queue in batches of 100, two batches at a time.
const CONFIG: &str = "[[queues.consumers]]\nqueue = \"clawdentity-events\"\n\
                      max_batch_size = 100\nmax_batch_timeout = 0.05\nmax_concurrency = 2\n";

/// The revocation event `i`.
fn revocation(i: usize) -> Value {
    let did = format!(
        "did:cdi:registry.clawdentity.com:agent:{}",
        ulid::Ulid::from_parts(i as u64, 7)
    );
    json!({
        "id": format!("evt-{i}"), "type": "agent.auth.revoked", "version": "v1",
        "timestampUtc": "2026-11-24T10:00:00.000Z", "initiatedByAccountId": null,
        "data": {"reason": "agent_revoked", "metadata": {"agentDid": did}}
    })
}

/// Publishes `messages` events over `hosts` and waits until they are all handled;
/// prints msg/s under `label`.
fn run(label: &str, hosts: &[Host], messages: usize) {
    let batches = messages / BATCH;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for producer in 0..PRODUCERS {
            scope.spawn(move || {
                for batch in (producer..batches).step_by(PRODUCERS) {
                    let bodies: Vec<Value> = (batch * BATCH..(batch + 1) * BATCH)
                        .map(revocation)
                        .collect();
                    hosts[batch % hosts.len()].publish_batch(EVENTS, &bodies);
                }
            });
        }
    });
    let published = started.elapsed();
    hosts[0].wait_drained(EVENTS);
    let elapsed = started.elapsed();
    let acked: f64 = hosts
        .iter()
        .map(|host| {
            let labels = [("queue", EVENTS)];
            find_sample(&host.scrape(), "clawq_messages_acked_total", &labels).unwrap_or(0.0)
        })
        .sum();
    assert!(
        acked >= (batches * BATCH) as f64,
        "{label}: only {acked} messages acked"
    );
    println!(
        "{label:<22} {:>7.0} msg/s end to end ({} messages in {:.2} s; published in {:.2} s)",
        (batches * BATCH) as f64 / elapsed.as_secs_f64(),
        batches * BATCH,
        elapsed.as_secs_f64(),
        published.as_secs_f64()
    );
}

fn main() {
    let messages: usize = std::env::var("CLAWQ_BENCH_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    run("1 host, SQLite", &[Host::start(CONFIG)], messages);
    for count in 1..=3 {
        let nats = NatsServer::start();
        let config = nats.backend_config() + CONFIG;
        let hosts: Vec<Host> = (0..count).map(|_| Host::start(&config)).collect();
        // Every host ready to consume before the clock starts.
        for host in &hosts {
            wait_for("the host's consumer", || {
                (!host.log_lines(&["consumer started"]).is_empty()).then_some(())
            });
        }
        run(&format!("{count} host(s), JetStream"), &hosts, messages);
    }
}
