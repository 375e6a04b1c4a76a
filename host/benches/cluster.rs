//! Cluster benchmark (not a test): messages/s end to end (HTTP publish → queue →
//! CRL-invalidation component → trust store → ack) with 1, 2 and 3 hosts sharing one
//! NATS JetStream server, beside one host on SQLite: the real `clawq` binary and the
//! pinned `nats-server`, started by the end-to-end tests' support. [`PRODUCERS`]
//! producers publish batches of 100 revocation events spread over the hosts while the
//! hosts consume; the clock stops when the queue is drained. Every host runs on this
//! machine, so more hosts add no cores: the figures show what the cluster costs, not how
//! it scales out.
//!
//! Beside them, two more figures from the same run: raw JetStream (the same bodies
//! published in batches of 100 to a file-backed WorkQueue stream and drained by a durable
//! pull consumer with `async_nats`: the engine's own limit on this machine), and the
//! latency from publishing a receipt to its frame on the agent's WebSocket, with the
//! agent connected to another host of a 2-host cluster and then to the same host.
//!
//! Run with `cargo bench -p clawq --bench cluster`. `CLAWQ_BENCH_MESSAGES` sets the
//! message count (default 20000).

// The tests' support, shared: this benchmark uses a part of it.
#[allow(dead_code)]
#[path = "../../tests/support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::nats::NatsServer;
use support::{
    DID_A, DID_B, Host, Socket, find_sample, frame, receipt, send_frame, tungstenite, wait_for,
};

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

/// Publishes `messages` revocation bodies straight to a file-backed WorkQueue stream on
/// `nats` (batches of 100, each batch's acks awaited) while a durable pull consumer
/// pulls 100 at a time and acks each; prints msg/s.
fn raw_jetstream(nats: &NatsServer, messages: usize) {
    use async_nats::jetstream::{self, consumer::pull, stream};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let batches = messages / BATCH;
    let elapsed = runtime.block_on(async {
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let stream = js
            .create_stream(stream::Config {
                name: "bench_raw".into(),
                subjects: vec!["bench.raw".into()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .unwrap();
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("bench".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let bodies: Vec<Vec<u8>> = (0..batches * BATCH)
            .map(|i| serde_json::to_vec(&revocation(i)).unwrap())
            .collect();
        let started = Instant::now();
        let consuming = tokio::spawn(async move {
            let mut acked = 0;
            while acked < batches * BATCH {
                // A pull of 100 that waits for them (`fetch` would return at once, empty,
                // whenever the consumer is ahead of the publisher).
                let mut fetched = consumer
                    .batch()
                    .max_messages(BATCH)
                    .expires(Duration::from_secs(5))
                    .messages()
                    .await
                    .unwrap();
                while let Some(message) = fetched.next().await {
                    message.unwrap().ack().await.unwrap();
                    acked += 1;
                }
            }
        });
        for batch in bodies.chunks(BATCH) {
            let mut acks = Vec::with_capacity(BATCH);
            for body in batch {
                acks.push(js.publish("bench.raw", body.clone().into()).await.unwrap());
            }
            for ack in acks {
                ack.await.unwrap();
            }
        }
        consuming.await.unwrap();
        started.elapsed()
    });
    println!(
        "{:<22} {:>7.0} msg/s (async_nats: {} messages in {:.2} s, WorkQueue, file storage)",
        "raw JetStream",
        (batches * BATCH) as f64 / elapsed.as_secs_f64(),
        batches * BATCH,
        elapsed.as_secs_f64()
    );
}

/// Receipts per latency run.
const RECEIPT_COUNT: usize = 2_000;
/// The rate at which they are published, one at a time.
const RECEIPTS_PER_SECOND: u32 = 200;
/// The receipts queue.
const RECEIPTS: &str = "clawdentity-receipts";

/// The latency hosts' config: receipts batched within 5 ms, and no re-push of an unacked
/// frame within the run, so that every frame read is a first push.
const RECEIPTS_CONFIG: &str = "[[queues.consumers]]\nqueue = \"clawdentity-receipts\"\n\
                               max_batch_timeout = 0.005\n\n\
                               [relay]\nretry_initial = 60\nretry_max = 60\n";

/// Publishes receipts from `DID_A` with ids `{prefix}-{i}` to `publisher`, one at a time
/// at [`RECEIPTS_PER_SECOND`], while reading and acking their frames on `socket`;
/// prints the publish → frame latency under `label`. `count` 1 is a warm-up.
fn receipt_latency(label: &str, publisher: &Host, socket: &mut Socket, prefix: &str, count: usize) {
    let sent: Mutex<HashMap<String, Instant>> = Mutex::new(HashMap::new());
    let mut latencies = Vec::with_capacity(count);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let interval = Duration::from_secs(1) / RECEIPTS_PER_SECOND;
            let started = Instant::now();
            for i in 0..count {
                let due = started + interval * i as u32;
                // Paced by the clock: a steady rate, not a wait for a condition.
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let id = format!("{prefix}-{i}");
                sent.lock().unwrap().insert(id.clone(), Instant::now());
                publisher.publish(
                    RECEIPTS,
                    receipt(&id, DID_A, DID_B, "delivered_to_webhook", None),
                );
            }
        });
        let deadline = Instant::now()
            + Duration::from_secs(60)
            + Duration::from_secs(count as u64) / RECEIPTS_PER_SECOND;
        let mut seen = HashSet::new();
        while seen.len() < count && Instant::now() < deadline {
            let text = match socket.read() {
                Ok(tungstenite::Message::Text(text)) => text,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => panic!("{label}: socket failed: {e}"),
            };
            let arrived = Instant::now();
            let f: Value = serde_json::from_str(&text).unwrap();
            if f["type"] != "receipt" {
                continue;
            }
            send_frame(socket, &frame("receipt_ack", json!({"ackId": f["id"]})));
            let id = f["originalFrameId"].as_str().unwrap_or_default().to_owned();
            if let Some(at) = sent.lock().unwrap().get(&id)
                && seen.insert(id)
            {
                latencies.push(arrived - *at);
            }
        }
    });
    if count == 1 || latencies.is_empty() {
        if count > 1 {
            println!("{label:<22} no frame arrived");
        }
        return;
    }
    latencies.sort();
    let n = latencies.len();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: usize| latencies[(n * q / 100).min(n.saturating_sub(1))];
    println!(
        "{label:<22} receipt → frame p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({n}/{count} frames, {RECEIPTS_PER_SECOND}/s)",
        ms(at(50)),
        ms(at(99)),
        ms(latencies[n - 1]),
    );
}

/// Receipt latency on a 2-host JetStream cluster: the agent on the other host, then on
/// the publishing host.
fn receipts() {
    let nats = NatsServer::start();
    let config = nats.backend_config() + RECEIPTS_CONFIG;
    let (a, b) = (Host::start(&config), Host::start(&config));
    let token = a.add_agent(DID_A);
    for host in [&a, &b] {
        wait_for("the host's consumer", || {
            (!host.log_lines(&["consumer started"]).is_empty()).then_some(())
        });
    }
    let mut on_b = b.connect(DID_A, Some(&token)).unwrap();
    receipt_latency("", &a, &mut on_b, "warm-b", 1);
    receipt_latency(
        "receipts, cross-host",
        &a,
        &mut on_b,
        "cross",
        RECEIPT_COUNT,
    );
    drop(on_b);
    let mut on_a = a.connect(DID_A, Some(&token)).unwrap();
    receipt_latency("", &a, &mut on_a, "warm-a", 1);
    receipt_latency("receipts, same host", &a, &mut on_a, "same", RECEIPT_COUNT);
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
    raw_jetstream(&NatsServer::start(), messages);
    receipts();
}
