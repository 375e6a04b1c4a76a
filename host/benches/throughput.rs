//! Throughput benchmark (not a test): prints messages/s through the durable queue into
//! the CRL-invalidation component end to end, the same queue with no handler at all
//! (the engine alone) side by side, the per-batch cost of a fresh instance, the
//! compile/validate time of both bundled components and the time from a deploy to the
//! first batch on the new version, and what a second consumer of the same queue (a
//! subscription that takes every message, or none) costs, and what the queue gauges
//! (`counts`, `lanes`) cost at a 100k backlog.
//!
//! Run with `cargo bench -p clawq --bench throughput`. `CLAWQ_BENCH_MESSAGES` sets the
//! message count (default 50000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clawq::bundled;
use clawq::config::{ConsumerConfig, EVENTS_QUEUE};
use clawq::consumer::Consumer;
use clawq::handlers::HandlerSlots;
use clawq::queue::lane::Lane;
use clawq::queue::routes::{Filter, Routes};
use clawq::queue::sqlite::SqliteQueue;
use clawq::queue::{BatchTerms, ContentType, NewMessage, QueueBackend, RetryPolicy, Settlement};
use clawq::relay::sessions::SessionLimits;
use clawq::runtime::{Capabilities, Limits, Runtime};
use clawq::store::{Database, Durability};
use clawq::world::World;
use tokio_util::sync::CancellationToken;

const PUBLISH_BATCH: usize = 100;

/// The host's database in `dir`.
fn database(dir: &std::path::Path) -> Database {
    Database::open(dir, Durability::Process).unwrap()
}

/// Every capability, backed by stores in `dir`.
fn capabilities(dir: &std::path::Path) -> Arc<Capabilities> {
    clawq::server::open_capabilities(
        &database(dir),
        Duration::from_secs(3600),
        SessionLimits::default(),
        None,
    )
    .unwrap()
}

fn revocation(i: usize) -> NewMessage {
    let did = format!(
        "did:cdi:registry.clawdentity.com:agent:{}",
        ulid::Ulid::from_parts(i as u64, 7)
    );
    let body = serde_json::json!({
        "id": format!("evt-{i}"), "type": "agent.auth.revoked", "version": "v1",
        "timestampUtc": "2026-11-24T10:00:00.000Z", "initiatedByAccountId": null,
        "data": {"reason": "agent_revoked", "metadata": {"agentDid": did}}
    });
    NewMessage {
        content_type: ContentType::Json,
        body: body.to_string().into_bytes(),
        delay_seconds: 0,
    }
}

async fn fill(queue: &SqliteQueue, n: usize) {
    let messages: Vec<NewMessage> = (0..n).map(revocation).collect();
    for chunk in messages.chunks(PUBLISH_BATCH) {
        queue.publish(EVENTS_QUEUE, chunk.to_vec()).await.unwrap();
    }
}

async fn wait_drained(queue: &SqliteQueue) {
    loop {
        let c = queue.counts(EVENTS_QUEUE).await.unwrap();
        if c.backlog + c.in_flight + c.delayed == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Messages/s taken and acked by a bare loop over the queue engine, no handler.
async fn engine_alone(n: usize, batch_size: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let queue = SqliteQueue::open(&database(dir.path())).unwrap();
    fill(&queue, n).await;
    let policy = RetryPolicy {
        max_retries: 3,
        dead_letter_queue: None,
    };
    let lane = Lane::of(EVENTS_QUEUE);
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let terms = BatchTerms {
            max_size: batch_size,
            max_timeout: Duration::ZERO,
            lease: Duration::from_secs(60),
            policy: policy.clone(),
        };
        let batch = queue.next_batch(&lane, &terms).await.unwrap();
        done += batch.len();
        let acks = batch.into_iter().map(|d| (d, Settlement::Ack)).collect();
        queue.settle(&lane, &policy, acks).await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Mean time of [`QueueBackend::counts`] and [`QueueBackend::lanes`] of a queue holding
/// `backlog` ready messages (what `GET /v1/queues/{q}` and `/metrics` pay).
async fn gauges_at_backlog(backlog: usize) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let queue = SqliteQueue::open(&database(dir.path())).unwrap();
    fill(&queue, backlog).await;
    let rounds = 50;
    let started = Instant::now();
    for _ in 0..rounds {
        queue.counts(EVENTS_QUEUE).await.unwrap();
    }
    let counts = started.elapsed() / rounds;
    let started = Instant::now();
    for _ in 0..rounds {
        queue.lanes(EVENTS_QUEUE).await.unwrap();
    }
    (counts, started.elapsed() / rounds)
}

/// Messages/s through a real consumer running the CRL-invalidation component.
async fn end_to_end(
    runtime: &Arc<Runtime>,
    n: usize,
    batch_size: usize,
    concurrency: usize,
) -> f64 {
    fanned_out(runtime, n, batch_size, concurrency, None).await
}

/// Messages/s through the CRL-invalidation consumer of the events queue and, with
/// `second`, a second consumer (`audit`, the same component) subscribed with that filter.
async fn fanned_out(
    runtime: &Arc<Runtime>,
    n: usize,
    batch_size: usize,
    concurrency: usize,
    second: Option<Filter>,
) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let primary = ConsumerConfig {
        max_batch_size: batch_size,
        max_batch_timeout: Duration::ZERO,
        max_concurrency: concurrency,
        ..ConsumerConfig::default_for(EVENTS_QUEUE)
    };
    let mut configs = vec![primary.clone()];
    if let Some(filter) = second {
        configs.push(ConsumerConfig {
            name: "audit".into(),
            filter,
            ..primary
        });
    }
    let mut routes = Routes::default();
    for c in &configs {
        routes.add(&c.queue, &c.name, c.filter.clone());
    }
    let queue = Arc::new(
        SqliteQueue::open(&database(dir.path()))
            .unwrap()
            .with_routes(routes),
    );
    let caps = capabilities(dir.path());
    fill(&queue, n).await;
    let slots = Arc::new(
        HandlerSlots::open(
            dir.path(),
            &database(dir.path()),
            runtime.clone(),
            caps.clone(),
            &configs,
        )
        .await
        .unwrap(),
    );
    let backend: Arc<dyn QueueBackend> = queue.clone();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running: Vec<_> = configs
        .into_iter()
        .map(|c| {
            let consumer = Consumer::new(c, slots.clone(), backend.clone(), caps.clone());
            tokio::spawn(consumer.run(stop.clone()))
        })
        .collect();
    wait_drained(&queue).await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    for consumer in running {
        consumer.await.unwrap();
    }
    let last = format!(
        "did:cdi:registry.clawdentity.com:agent:{}",
        ulid::Ulid::from_parts(n as u64 - 1, 7)
    );
    assert!(
        caps.trust.is_revoked(&last).await.unwrap(),
        "the last revocation landed"
    );
    rate
}

/// Mean time of one batch's fresh instance plus an empty `handle` call.
async fn per_batch_instance(runtime: &Runtime, rounds: u32) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let caps = capabilities(dir.path());
    let handler = runtime
        .load(
            "crl-invalidation",
            bundled::CRL_INVALIDATION,
            World::CrlInvalidation,
            Limits::default(),
        )
        .unwrap();
    for _ in 0..100 {
        handler
            .handle(caps.clone(), EVENTS_QUEUE, &[])
            .await
            .unwrap();
    }
    let started = Instant::now();
    for _ in 0..rounds {
        handler
            .handle(caps.clone(), EVENTS_QUEUE, &[])
            .await
            .unwrap();
    }
    started.elapsed() / rounds
}

/// Compile/validate time of both bundled components, and the time from a deploy
/// returning to the first batch handled by the new version.
async fn swap(runtime: &Arc<Runtime>) {
    for (name, wasm, world) in [
        (
            "crl-invalidation",
            bundled::CRL_INVALIDATION,
            World::CrlInvalidation,
        ),
        (
            "receipt-router",
            bundled::RECEIPT_ROUTER,
            World::ReceiptRouter,
        ),
    ] {
        let rounds = 5;
        let started = Instant::now();
        for _ in 0..rounds {
            runtime.load(name, wasm, world, Limits::default()).unwrap();
        }
        println!(
            "compile + validate {name}: {:?}",
            started.elapsed() / rounds
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(SqliteQueue::open(&database(dir.path())).unwrap());
    let caps = capabilities(dir.path());
    let config = ConsumerConfig {
        max_batch_timeout: Duration::ZERO,
        ..ConsumerConfig::default_for(EVENTS_QUEUE)
    };
    let slots = Arc::new(
        HandlerSlots::open(
            dir.path(),
            &database(dir.path()),
            runtime.clone(),
            caps.clone(),
            [&config],
        )
        .await
        .unwrap(),
    );
    let backend: Arc<dyn QueueBackend> = queue.clone();
    let stop = CancellationToken::new();
    let running =
        tokio::spawn(Consumer::new(config, slots.clone(), backend, caps.clone()).run(stop.clone()));
    for round in 0..5u64 {
        // The same component under a new hash: a custom section at the end.
        let mut v2 = bundled::CRL_INVALIDATION.to_vec();
        v2.extend_from_slice(&[0, 3, 2, b'v', b'0' + round as u8]);
        let called = Instant::now();
        slots
            .deploy(EVENTS_QUEUE, Some("crl-v2"), v2, "bench")
            .await
            .unwrap();
        let returned = Instant::now();
        let message = revocation(1_000_000 + round as usize);
        queue.publish(EVENTS_QUEUE, vec![message]).await.unwrap();
        let did = format!(
            "did:cdi:registry.clawdentity.com:agent:{}",
            ulid::Ulid::from_parts(1_000_000 + round, 7)
        );
        while !caps.trust.is_revoked(&did).await.unwrap() {
            tokio::task::yield_now().await;
        }
        println!(
            "deploy call {:?}; first batch on the new version done {:?} after the call returned",
            returned - called,
            returned.elapsed()
        );
    }
    stop.cancel();
    running.await.unwrap();
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("CLAWQ_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let runtime = Arc::new(Runtime::new().unwrap());

    let (counts, lanes) = gauges_at_backlog(100_000).await;
    println!("queue gauges at a 100k backlog: counts {counts:?}, lanes {lanes:?}");

    println!(
        "per-batch fresh instance + empty handle call: {:?}",
        per_batch_instance(&runtime, 20_000).await
    );

    swap(&runtime).await;

    for (batch_size, concurrency) in [(10, 1), (10, 2), (100, 1)] {
        let alone = engine_alone(n, batch_size).await;
        let wasm = end_to_end(&runtime, n, batch_size, concurrency).await;
        println!(
            "batch {batch_size:>3}, concurrency {concurrency}: engine alone {alone:>8.0} msg/s | \
             queue → CRL component → trust store {wasm:>8.0} msg/s | ratio {:.2}",
            wasm / alone
        );
    }

    let every: Filter = serde_json::from_value(serde_json::json!({})).unwrap();
    let none: Filter =
        serde_json::from_value(serde_json::json!({"type": "pair.accepted"})).unwrap();
    let one = fanned_out(&runtime, n, 10, 1, None).await;
    let filtered = fanned_out(&runtime, n, 10, 1, Some(none)).await;
    let both = fanned_out(&runtime, n, 10, 1, Some(every)).await;
    println!(
        "events queue, batch 10: CRL alone {one:>8.0} msg/s | + a subscriber its filter keeps \
         out {filtered:>8.0} msg/s (ratio {:.2}) | + a subscriber of every message {both:>8.0} \
         msg/s (ratio {:.2}, each message handled twice)",
        filtered / one,
        both / one
    );
}
