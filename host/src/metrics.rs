//! `GET /metrics`: Prometheus text format. Counters are recorded where things happen
//! (publish, settle, batch); gauges (backlog, oldest ready message, connections,
//! resident actors, current versions) are read at scrape time. Every series a queue, a
//! consumer, the relay or the connector WebSocket can export exists from the start, at
//! 0 ([`register`]): dashboards and alerts need not wait for a first event.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::actor_storage::ActorStorage;
use crate::handlers::HandlerSlots;
use crate::queue::{QueueBackend, SettleSummary};
use crate::relay::hub::ConnectionHub;
use crate::relay::sessions::{DropReason, Kind};
use crate::relay::store::SessionStore;
use crate::runtime::{BatchFailure, UnhandledReason};

/// Why a connector connection closes, as `clawq_websocket_connections_closed_total`
/// labels it: the close reasons the host sends, then why a connection ends without one.
const CLOSE_REASONS: [&str; 12] = [
    "superseded_by_new_connection",
    "agent_revoked",
    "agent_removed",
    "storage_unavailable",
    "heartbeat_ack_timeout",
    "frame_too_large",
    "host_shutting_down",
    "closed_by_connector",
    "send_failed",
    "send_timeout",
    "receive_failed",
    "upgrade_failed",
];

/// The counters of a queue, labelled `queue`.
const QUEUE_COUNTERS: [&str; 8] = [
    "clawq_messages_published_total",
    "clawq_messages_acked_total",
    "clawq_messages_retried_total",
    "clawq_messages_dead_lettered_total",
    "clawq_messages_dropped_total",
    "clawq_messages_expired_total",
    "clawq_messages_unrouted_total",
    "clawq_messages_released_total",
];

/// The counters of a handler version, labelled `consumer` and `version`.
const VERSION_COUNTERS: [&str; 5] = [
    "clawq_handler_batches_total",
    "clawq_handler_traps_total",
    "clawq_handler_errors_total",
    "clawq_handler_limit_hits_total",
    "clawq_handler_capacity_releases_total",
];

/// Buckets of the batch duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0,
];

/// The process-wide recorder, installed on first use.
fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&DURATION_BUCKETS)
                .and_then(PrometheusBuilder::install_recorder)
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()
        })
        .as_ref()
}

/// Installs the recorder (idempotent); metrics recorded before it are lost.
pub fn install() {
    handle();
}

/// The first 12 characters of a version hash, as the `version` label gives it.
fn short(version: &str) -> String {
    version[..12.min(version.len())].to_owned()
}

/// Installs the recorder and creates, at 0, every counter of `queues` and of the
/// consumers of `slots` (for each label value they can take), the batch duration
/// histogram, and the relay's and the connector WebSocket's counters.
pub fn register<'a>(queues: impl IntoIterator<Item = &'a str>, slots: &HandlerSlots) {
    install();
    for queue in queues {
        for name in QUEUE_COUNTERS {
            counter!(name, "queue" => queue.to_owned()).increment(0);
        }
        for reason in [
            UnhandledReason::Malformed,
            UnhandledReason::UnknownType,
            UnhandledReason::InvalidField,
            UnhandledReason::Refused,
        ] {
            unhandled_counter(queue, reason.as_str()).increment(0);
        }
    }
    for (consumer, slot) in slots.all() {
        register_version(consumer, slot.current().version());
        // Registered without a sample: its buckets read 0 until a batch is recorded.
        let _ = histogram!("clawq_handler_batch_duration_seconds", "consumer" => consumer.clone());
        log_lines_dropped(consumer, 0);
    }
    for kind in Kind::ALL {
        for reason in DropReason::ALL {
            relay_frame_dropped_counter(kind.as_str(), reason.as_str()).increment(0);
        }
    }
    for reason in CLOSE_REASONS {
        connection_closed_counter(reason).increment(0);
    }
}

/// Creates, at 0, the counters of `version` of `consumer`'s handler: at start, and when a
/// deploy or a rollback makes it current.
pub fn register_version(consumer: &str, version: &str) {
    for name in VERSION_COUNTERS {
        counter!(name, "consumer" => consumer.to_owned(), "version" => short(version)).increment(0);
    }
}

/// Marks `old` no longer the current version of `consumer`'s handler, and creates the
/// counters of `new`, which replaced it.
pub fn version_switched(consumer: &str, old: &str, new: &str) {
    gauge!("clawq_handler_current_version", "consumer" => consumer.to_owned(), "version" => short(old))
        .set(0.0);
    register_version(consumer, new);
}

/// Counts published messages.
pub fn published(queue: &str, n: usize) {
    counter!("clawq_messages_published_total", "queue" => queue.to_owned()).increment(n as u64);
}

/// Counts `n` published messages that no consumer of their queue subscribes to.
pub fn unrouted(queue: &str, n: u64) {
    counter!("clawq_messages_unrouted_total", "queue" => queue.to_owned()).increment(n);
}

/// Counts a message its handler acknowledged without handling it, by reason.
pub fn unhandled(queue: &str, reason: &'static str) {
    unhandled_counter(queue, reason).increment(1);
}

fn unhandled_counter(queue: &str, reason: &'static str) -> metrics::Counter {
    counter!("clawq_messages_unhandled_total", "queue" => queue.to_owned(), "reason" => reason)
}

/// Counts a frame a relay session dropped unacked (`kind`: `receipt` or `deliver`;
/// `reason`: `cap`, `expired`, `attempts` or `rejected`).
pub fn relay_frame_dropped(kind: &'static str, reason: &'static str) {
    relay_frame_dropped_counter(kind, reason).increment(1);
}

fn relay_frame_dropped_counter(kind: &'static str, reason: &'static str) -> metrics::Counter {
    counter!("clawq_relay_frames_dropped_total", "kind" => kind, "reason" => reason)
}

/// Counts a connector connection that closed, by why (the close reason sent, or
/// `closed_by_connector`, `send_failed`, `send_timeout`, `receive_failed`).
pub fn connection_closed(reason: &'static str) {
    connection_closed_counter(reason).increment(1);
}

fn connection_closed_counter(reason: &'static str) -> metrics::Counter {
    counter!("clawq_websocket_connections_closed_total", "reason" => reason)
}

/// Counts `n` guest log lines of `consumer`'s handler dropped over its log rate.
pub fn log_lines_dropped(consumer: &str, n: u64) {
    counter!("clawq_handler_log_lines_dropped_total", "consumer" => consumer.to_owned())
        .increment(n);
}

/// Counts what a settlement did.
pub fn settled(queue: &str, summary: &SettleSummary) {
    let q = queue.to_owned();
    counter!("clawq_messages_acked_total", "queue" => q.clone()).increment(summary.acked as u64);
    counter!("clawq_messages_retried_total", "queue" => q.clone())
        .increment(summary.retried as u64);
    counter!("clawq_messages_dead_lettered_total", "queue" => q.clone())
        .increment(summary.dead_lettered as u64);
    counter!("clawq_messages_dropped_total", "queue" => q.clone())
        .increment(summary.dropped as u64);
    counter!("clawq_messages_released_total", "queue" => q).increment(summary.released as u64);
}

/// Counts a handler batch, its duration and its failure; a batch the host had no room
/// for counts only as a capacity release.
pub fn batch(consumer: &str, version: &str, seconds: f64, failure: Option<&BatchFailure>) {
    let (c, v) = (consumer.to_owned(), short(version));
    let kind = match failure {
        None => None,
        Some(BatchFailure::Trap(_)) => Some("clawq_handler_traps_total"),
        Some(BatchFailure::Error(_)) => Some("clawq_handler_errors_total"),
        Some(BatchFailure::Limit(_)) => Some("clawq_handler_limit_hits_total"),
        Some(BatchFailure::Capacity(_)) => {
            // Not run: no batch to count, only the host's shortfall.
            counter!("clawq_handler_capacity_releases_total", "consumer" => c, "version" => v)
                .increment(1);
            return;
        }
    };
    counter!("clawq_handler_batches_total", "consumer" => c.clone(), "version" => v.clone())
        .increment(1);
    histogram!("clawq_handler_batch_duration_seconds", "consumer" => c.clone()).record(seconds);
    if let Some(kind) = kind {
        counter!(kind, "consumer" => c, "version" => v).increment(1);
    }
}

/// What a scrape reads the gauges from.
#[derive(Clone)]
pub struct MetricsState {
    /// The queue engine.
    pub backend: Arc<dyn QueueBackend>,
    /// Every queue served.
    pub queues: Arc<Vec<String>>,
    /// The handler slots.
    pub slots: Arc<HandlerSlots>,
    /// The open connector connections.
    pub hub: Arc<ConnectionHub>,
    /// The relay sessions.
    pub sessions: Arc<SessionStore>,
    /// The actor storage, for each consumer's usage.
    pub storage: Arc<ActorStorage>,
}

/// The `/metrics` route.
pub fn router(state: MetricsState) -> Router {
    install();
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(state)
}

async fn scrape(State(state): State<MetricsState>) -> Response {
    let Some(handle) = handle() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable",
        )
            .into_response();
    };
    for queue in state.queues.iter() {
        match state.backend.counts(queue).await {
            Ok(counts) => {
                gauge!("clawq_queue_backlog", "queue" => queue.clone()).set(counts.backlog as f64);
                gauge!("clawq_queue_in_flight", "queue" => queue.clone())
                    .set(counts.in_flight as f64);
                gauge!("clawq_queue_delayed", "queue" => queue.clone()).set(counts.delayed as f64);
                let age = counts.oldest_ready_ms.map_or(0.0, |ms| {
                    crate::clock::now_ms().saturating_sub(ms) as f64 / 1000.0
                });
                gauge!("clawq_queue_oldest_age_seconds", "queue" => queue.clone()).set(age);
            }
            Err(err) => {
                tracing::warn!(queue, error = %err, "reading queue counts for metrics failed")
            }
        }
    }
    for (consumer, slot) in state.slots.all() {
        let version = short(slot.current().version());
        gauge!("clawq_handler_current_version", "consumer" => consumer.clone(), "version" => version).set(1.0);
    }
    match state.storage.usage().await {
        Ok(usage) => {
            // A consumer that never stored anything has no usage row: it uses nothing.
            let unused = state
                .slots
                .all()
                .filter(|(consumer, _)| !usage.iter().any(|(c, _)| c == *consumer))
                .map(|(consumer, _)| (consumer.clone(), Default::default()))
                .collect::<Vec<_>>();
            for (consumer, usage) in usage.into_iter().chain(unused) {
                gauge!("clawq_actor_storage_keys", "consumer" => consumer.clone())
                    .set(usage.keys as f64);
                gauge!("clawq_actor_storage_bytes", "consumer" => consumer).set(usage.bytes as f64);
            }
        }
        Err(err) => tracing::warn!(error = %err, "reading actor storage usage for metrics failed"),
    }
    gauge!("clawq_websocket_connections").set(state.hub.len() as f64);
    gauge!("clawq_relay_resident_actors").set(state.sessions.resident_actors() as f64);
    counter!("clawq_relay_receipts_dropped_total")
        .absolute(state.sessions.dropped_total(Kind::Receipt));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
