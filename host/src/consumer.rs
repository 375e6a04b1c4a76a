//! A queue consumer: takes batches from the queue engine, runs them through the queue's
//! handler component and commits each message's outcome (spec section 1).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{ConsumerConfig, LEASE_MARGIN, MAX_DELAY_SECONDS};
use crate::handlers::HandlerSlots;
use crate::metrics;
use crate::queue::lane::Lane;
use crate::queue::{self, BatchTerms, Delivery, QueueBackend, Settlement};
use crate::runtime::{
    Capabilities, LoadedHandler, MAX_ROOM_WAIT, Message, Outcome, Unhandled, bounded,
};
use crate::side_effects::SideEffects;

/// How long a consumer waits before asking the queue engine again after it failed.
const STORAGE_BACKOFF: Duration = Duration::from_secs(1);
/// The first wait before committing a batch's outcomes again after it failed; the wait
/// doubles at each failure, up to [`SETTLE_BACKOFF_MAX`], for as long as the process
/// lives (meanwhile the lease may run out: the messages are then delivered again).
const SETTLE_BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between two tries at committing a batch's outcomes.
const SETTLE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a batch the host had no room for waits before it is taken again.
const CAPACITY_BACKOFF_SECONDS: u32 = 1;
/// Longest a batch leased ahead waits for its turn before it is given back. With the
/// wait for room for an instance ([`MAX_ROOM_WAIT`]) it stays well within the part of
/// the lease beyond the batch's wall-clock deadline ([`LEASE_MARGIN`]), leaving time to
/// commit the outcomes.
const MAX_TURN_WAIT: Duration = Duration::from_secs(10);
const _: () =
    assert!(MAX_TURN_WAIT.as_secs() + MAX_ROOM_WAIT.as_secs() + 5 <= LEASE_MARGIN.as_secs());
/// How much handler time a consumer leases ahead: a lease takes the batches its handler
/// should start within this time.
const LEASED_AHEAD_WORK: Duration = Duration::from_millis(10);
/// Most batches one lease takes: enough that a quick handler of small batches (the
/// default 10 messages) waits for a lease only once every few hundred messages.
const MAX_BATCHES_PER_LEASE: usize = 32;
/// Most messages one lease takes, whatever the batch size: bounds the memory the bodies
/// of batches leased ahead hold (1,000 bodies of at most 128 KiB).
const MAX_MESSAGES_PER_LEASE: usize = 1000;

/// One consumer of a queue: its settings, its handler and what they run against. It
/// takes batches from its own lane of the queue, so its outcomes (retries, dead letters)
/// never touch the copies of other consumers of the same queue.
pub struct Consumer {
    config: ConsumerConfig,
    lane: Lane,
    terms: BatchTerms,
    slots: Arc<HandlerSlots>,
    backend: Arc<dyn QueueBackend>,
    caps: Arc<Capabilities>,
    /// How long the last batch's handler call took, in microseconds (0: none ran yet).
    last_batch_micros: AtomicU64,
}

impl Consumer {
    /// A consumer of `config.queue` that runs the current handler of its slot (named
    /// `config.name`) in `slots`.
    pub fn new(
        config: ConsumerConfig,
        slots: Arc<HandlerSlots>,
        backend: Arc<dyn QueueBackend>,
        caps: Arc<Capabilities>,
    ) -> Arc<Self> {
        Arc::new(Consumer {
            lane: config.lane(),
            terms: config.batch_terms(),
            config,
            slots,
            backend,
            caps,
            last_batch_micros: AtomicU64::new(0),
        })
    }

    /// Takes and handles batches until `shutdown`, at most `max_concurrency` at a time;
    /// then waits for the batches in flight to finish and commit. A batch gives its turn
    /// back once its outcomes are on their way to the queue (see [`Consumer::commit`]).
    ///
    /// Batches are leased ahead: the next lease is taken while the batches in flight run,
    /// so a turn given back finds its batch waiting, and a lease takes several full
    /// batches at once when the handler is quick (see [`Consumer::batches_per_lease`]),
    /// so that one round trip to the queue feeds several batches. A batch leased ahead is
    /// given back untouched (released without counting an attempt), with the rest of its
    /// lease, if shutdown comes first, or if it waited longer than [`MAX_TURN_WAIT`] for
    /// its turn, so that it is never handled near the end of its lease.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let turns = Arc::new(Semaphore::new(self.config.max_concurrency));
        let mut in_flight = JoinSet::new();
        'leases: loop {
            let terms = BatchTerms {
                batches: self.batches_per_lease(),
                ..self.terms.clone()
            };
            let leased = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                leased = self.backend.next_batch(&self.lane, &terms) => leased,
            };
            let mut leased = match leased {
                Ok(deliveries) => deliveries.into_iter(),
                Err(err) => {
                    tracing::error!(lane = %self.lane, error = %err, "taking a batch failed; trying again");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(STORAGE_BACKOFF) => continue,
                    }
                }
            };
            let leased_at = Instant::now();
            while leased.len() > 0 {
                let batch: Vec<Delivery> = leased.by_ref().take(self.terms.max_size).collect();
                let turn = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        self.give_back(batch.into_iter().chain(leased).collect()).await;
                        break 'leases;
                    }
                    turn = turns.clone().acquire_owned() => turn.expect("semaphore is never closed"),
                };
                if leased_at.elapsed() > MAX_TURN_WAIT {
                    tracing::info!(lane = %self.lane, waited = ?leased_at.elapsed(),
                        "a batch leased ahead waited too long for its turn; given back to the queue");
                    self.give_back(batch.into_iter().chain(leased).collect())
                        .await;
                    continue 'leases;
                }
                let consumer = self.clone();
                in_flight.spawn(async move { consumer.handle_guarded(batch, turn).await });
                while in_flight.try_join_next().is_some() {}
            }
        }
        while in_flight.join_next().await.is_some() {}
    }

    /// How many batches the next lease may take: as many as the handler is expected to
    /// start within [`LEASED_AHEAD_WORK`] (by how long its last batch took, its batches
    /// running `max_concurrency` at a time), from 1 to [`MAX_BATCHES_PER_LEASE`] and
    /// [`MAX_MESSAGES_PER_LEASE`]; 1 until a batch has run.
    fn batches_per_lease(&self) -> usize {
        let last = self.last_batch_micros.load(Ordering::Relaxed);
        if last == 0 {
            return 1;
        }
        let ahead = LEASED_AHEAD_WORK.as_micros() as u64 * self.config.max_concurrency as u64;
        let most = (MAX_MESSAGES_PER_LEASE / self.config.max_batch_size)
            .clamp(1, MAX_BATCHES_PER_LEASE) as u64;
        (ahead / last).clamp(1, most) as usize
    }

    /// Gives a batch that was leased but not handled back to the queue: each message is
    /// ready again at once, without counting an attempt.
    async fn give_back(&self, deliveries: Vec<Delivery>) {
        self.commit(
            released(deliveries, 0),
            SideEffects::None,
            Duration::ZERO,
            None,
        )
        .await;
    }

    /// [`Consumer::handle_batch`], catching a panic: it is logged, and every message of
    /// the batch not settled yet is retried (counting an attempt, so that a message that
    /// makes the host panic each time ends in the dead-letter queue).
    async fn handle_guarded(&self, deliveries: Vec<Delivery>, turn: OwnedSemaphorePermit) {
        let leases = deliveries
            .iter()
            .map(|d| Delivery {
                body: Vec::new(),
                ..d.clone()
            })
            .collect();
        self.guarded(leases, self.handle_batch(deliveries, turn))
            .await;
    }

    /// Runs `work`, the handling of the batch leased as `leases`; if it panics, logs it
    /// and retries every message of `leases` not settled yet.
    async fn guarded(&self, leases: Vec<Delivery>, work: impl Future<Output = ()>) {
        let Err(panic) = AssertUnwindSafe(work).catch_unwind().await else {
            return;
        };
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        tracing::error!(queue = %self.config.queue, consumer = %self.config.name, panic = %why,
            "the batch task panicked; its messages will be retried");
        let error = format!("the host failed while handling the batch: {why}");
        let retries = leases
            .into_iter()
            .map(|d| (d, self.retry(self.config.retry_delay, &error)))
            .collect();
        self.commit(retries, SideEffects::None, Duration::ZERO, None)
            .await;
    }

    /// Runs one batch through the slot's current handler version and commits every
    /// message's outcome.
    async fn handle_batch(&self, deliveries: Vec<Delivery>, turn: OwnedSemaphorePermit) {
        let (queue, consumer) = (self.config.queue.as_str(), self.config.name.as_str());
        let Ok(slot) = self.slots.slot(consumer) else {
            tracing::error!(
                queue,
                consumer,
                "no handler slot; the batch will be delivered again once its lease runs out"
            );
            return;
        };
        let handler = slot.current();
        let span = tracing::info_span!(
            "batch",
            queue,
            consumer,
            handler = handler.name(),
            version = &handler.version()[..12],
            size = deliveries.len()
        );
        self.run_batch(&handler, deliveries, turn)
            .instrument(span)
            .await;
    }

    /// Runs `deliveries` through `handler` and commits their outcomes with the batch's
    /// side effects.
    async fn run_batch(
        &self,
        handler: &LoadedHandler,
        mut deliveries: Vec<Delivery>,
        turn: OwnedSemaphorePermit,
    ) {
        let (queue, consumer) = (self.config.queue.as_str(), self.config.name.as_str());
        let messages: Vec<Message> = deliveries.iter_mut().map(to_message).collect();
        let started = Instant::now();
        let result = handler
            .call(self.caps.clone(), queue, &messages, None)
            .await;
        let elapsed = started.elapsed();
        self.last_batch_micros
            .store((elapsed.as_micros() as u64).max(1), Ordering::Relaxed);
        metrics::batch(
            consumer,
            handler.version(),
            elapsed.as_secs_f64(),
            result.as_ref().err(),
        );
        self.slots
            .record(consumer, handler, result.as_ref().map(drop))
            .await;
        let (settlements, side_effects) = match result {
            Ok(handled) => (
                self.settlements(handler, deliveries, handled.outcomes),
                handled.side_effects,
            ),
            Err(failure) if !failure.is_guest_fault() => {
                tracing::warn!(%failure,
                    "batch not run, or its side effects not committed: released without counting an \
                     attempt, tried again shortly");
                (
                    released(deliveries, CAPACITY_BACKOFF_SECONDS),
                    SideEffects::None,
                )
            }
            Err(failure) => {
                tracing::warn!(%failure, "batch failed; every message of it will be retried");
                let error = failure.to_string();
                let retries = deliveries
                    .into_iter()
                    .map(|d| (d, self.retry(self.config.retry_delay, &error)))
                    .collect();
                (retries, SideEffects::None)
            }
        };
        self.commit(settlements, side_effects, elapsed, Some(turn))
            .await;
    }

    /// Commits `settlements` with `side_effects`, trying again with a growing wait for as
    /// long as it fails; if the side effects fail, the batch's messages are released
    /// instead (to be tried again shortly, without counting an attempt). `elapsed` is how
    /// long the batch took, for the log.
    ///
    /// The batch's `turn` is given back as soon as the first try is under way: the next
    /// batch is then taken while this one commits (the queue's writer commits them in
    /// that order, often in one transaction), and its handler still runs after this
    /// one's.
    async fn commit(
        &self,
        mut settlements: Vec<(Delivery, Settlement)>,
        mut side_effects: SideEffects,
        elapsed: Duration,
        mut turn: Option<OwnedSemaphorePermit>,
    ) {
        let queue = self.config.queue.as_str();
        let mut backoff = SETTLE_BACKOFF_FIRST;
        for attempt in 1u64.. {
            let settle = self.backend.settle(
                &self.lane,
                &self.terms.policy,
                settlements.clone(),
                side_effects.clone(),
            );
            let mut settle = std::pin::pin!(settle);
            let settled = match futures_util::future::poll_immediate(settle.as_mut()).await {
                Some(settled) => settled,
                None => {
                    drop(turn.take());
                    settle.await
                }
            };
            match settled {
                Ok(summary) => {
                    metrics::settled(queue, &summary);
                    tracing::debug!(
                        ?elapsed,
                        acked = summary.acked,
                        retried = summary.retried,
                        dead_lettered = summary.dead_lettered,
                        dropped = summary.dropped,
                        released = summary.released,
                        stale = summary.stale,
                        "batch handled"
                    );
                    return;
                }
                Err(err @ queue::QueueError::SideEffects(_)) => {
                    tracing::warn!(queue, consumer = %self.config.name, error = %err,
                        "batch released without counting an attempt, tried again shortly");
                    let deliveries = settlements.into_iter().map(|(d, _)| d).collect();
                    settlements = released(deliveries, CAPACITY_BACKOFF_SECONDS);
                    side_effects = SideEffects::None;
                }
                Err(err) => {
                    tracing::warn!(queue, consumer = %self.config.name, attempt, error = %err,
                        "committing outcomes failed; trying again in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(SETTLE_BACKOFF_MAX);
                }
            }
        }
    }

    /// Pairs each delivery with the outcome the handler gave it; a message without an
    /// outcome is retried.
    fn settlements(
        &self,
        handler: &LoadedHandler,
        deliveries: Vec<Delivery>,
        outcomes: Vec<Outcome>,
    ) -> Vec<(Delivery, Settlement)> {
        let queue = self.config.queue.as_str();
        if outcomes.len() > deliveries.len() {
            tracing::warn!(
                queue,
                handler = handler.name(),
                extra = outcomes.len() - deliveries.len(),
                "handler returned more outcomes than messages; the extra ones are ignored"
            );
        }
        let mut outcomes = outcomes.into_iter();
        deliveries
            .into_iter()
            .map(|delivery| {
                let settlement = match outcomes.next() {
                    Some(Outcome::Ack) => Settlement::Ack,
                    Some(Outcome::Retry(delay)) => self.retry(
                        delay.unwrap_or(self.config.retry_delay),
                        "handler asked for a retry",
                    ),
                    Some(Outcome::DeadLetter(reason)) => Settlement::DeadLetter {
                        reason: bounded(&reason),
                    },
                    Some(Outcome::Unhandled(unhandled)) => {
                        self.unhandled(handler, &delivery.id, &unhandled);
                        Settlement::Ack
                    }
                    None => self.retry(
                        self.config.retry_delay,
                        "handler returned no outcome for it",
                    ),
                };
                (delivery, settlement)
            })
            .collect()
    }

    /// Logs and counts a message the handler acknowledged without handling it.
    fn unhandled(&self, handler: &LoadedHandler, id: &str, unhandled: &Unhandled) {
        let reason = unhandled.reason.as_str();
        let detail = bounded(&unhandled.detail);
        tracing::warn!(queue = %self.config.queue, handler = handler.name(), message = id,
            reason, "message acknowledged unhandled: {detail}");
        metrics::unhandled(&self.config.queue, reason);
    }

    fn retry(&self, delay_seconds: u32, error: &str) -> Settlement {
        if delay_seconds > MAX_DELAY_SECONDS {
            tracing::warn!(queue = %self.config.queue, delay_seconds,
                "retry delay capped at {MAX_DELAY_SECONDS} s");
        }
        Settlement::Retry {
            delay_seconds: delay_seconds.min(MAX_DELAY_SECONDS),
            error: error.to_owned(),
        }
    }
}

/// `deliveries` given back untouched, to be delivered again after `delay_seconds`
/// without counting an attempt: the host did not run them.
fn released(deliveries: Vec<Delivery>, delay_seconds: u32) -> Vec<(Delivery, Settlement)> {
    let release = Settlement::Release { delay_seconds };
    deliveries
        .into_iter()
        .map(|d| (d, release.clone()))
        .collect()
}

/// The WIT view of a delivery; the body moves to the message.
pub fn to_message(delivery: &mut Delivery) -> Message {
    use crate::runtime::ContentType as Wit;
    Message {
        id: delivery.id.clone(),
        attempts: delivery.attempts,
        timestamp_ms: delivery.timestamp_ms,
        content_type: match delivery.content_type {
            queue::ContentType::Json => Wit::Json,
            queue::ContentType::Text => Wit::Text,
            queue::ContentType::Bytes => Wit::Bytes,
        },
        body: std::mem::take(&mut delivery.body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::sqlite::SqliteQueue;
    use crate::queue::{ContentType, MessageState, NewMessage};
    use crate::relay::sessions::SessionLimits;
    use crate::runtime::Runtime;

    /// The capabilities and handler slots of a host in `dir`, with no handler deployed.
    async fn handler_parts(dir: &std::path::Path) -> (Arc<Capabilities>, Arc<HandlerSlots>) {
        let caps = crate::server::open_capabilities(
            &crate::store::test_db(dir),
            Duration::from_secs(60),
            SessionLimits::default(),
        )
        .unwrap();
        let runtime = Arc::new(Runtime::new().unwrap());
        let slots = HandlerSlots::open(dir, &crate::store::test_db(dir), runtime, caps.clone(), [])
            .await
            .unwrap();
        (caps, Arc::new(slots))
    }

    /// A consumer of `jobs` without a handler over `backend`, in `dir`.
    async fn consumer(dir: &std::path::Path, backend: Arc<dyn QueueBackend>) -> Arc<Consumer> {
        let (caps, slots) = handler_parts(dir).await;
        let config = ConsumerConfig {
            max_batch_timeout: Duration::ZERO,
            ..ConsumerConfig::default_for("jobs")
        };
        Consumer::new(config, slots, backend, caps)
    }

    /// A queue `jobs` in `dir` holding one message, and the message's id.
    async fn one_message(dir: &std::path::Path) -> (Arc<SqliteQueue>, String) {
        let backend = Arc::new(SqliteQueue::open(&crate::store::test_db(dir)).unwrap());
        let message = NewMessage {
            content_type: ContentType::Text,
            body: b"boom".to_vec(),
            delay_seconds: 0,
        };
        let ids = backend.publish("jobs", vec![message]).await.unwrap();
        (backend, ids[0].clone())
    }

    /// A consumer of `jobs` in `dir` without a handler, and the batch it leased of the
    /// queue's one message (whose id comes with it).
    async fn one_leased(
        dir: &std::path::Path,
    ) -> (Arc<SqliteQueue>, String, Arc<Consumer>, Vec<Delivery>) {
        let (backend, id) = one_message(dir).await;
        let consumer = consumer(dir, backend.clone()).await;
        let batch = backend
            .next_batch(&consumer.lane, &consumer.terms)
            .await
            .unwrap();
        (backend, id, consumer, batch)
    }

    #[tokio::test]
    async fn a_lease_takes_as_many_batches_as_the_handler_starts_within_10_ms() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _) = one_message(dir.path()).await;
        let consumer = consumer(dir.path(), backend).await;
        assert_eq!(consumer.batches_per_lease(), 1, "no batch has run yet");
        let after = |micros: u64| {
            consumer.last_batch_micros.store(micros, Ordering::Relaxed);
            consumer.batches_per_lease()
        };
        assert_eq!(after(100), MAX_BATCHES_PER_LEASE, "a quick handler");
        assert_eq!(after(5_000), 2);
        assert_eq!(after(9_000), 1);
        assert_eq!(after(30_000_000), 1, "a slow handler");
    }

    #[tokio::test]
    async fn a_lease_of_large_batches_takes_at_most_1000_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, _) = one_message(dir.path()).await;
        let (caps, slots) = handler_parts(dir.path()).await;
        let leased = |max_batch_size: usize| {
            let config = ConsumerConfig {
                max_batch_size,
                ..ConsumerConfig::default_for("jobs")
            };
            let consumer = Consumer::new(config, slots.clone(), backend.clone(), caps.clone());
            consumer.last_batch_micros.store(1, Ordering::Relaxed);
            consumer.batches_per_lease()
        };
        assert_eq!(leased(10), MAX_BATCHES_PER_LEASE);
        assert_eq!(leased(100), 10);
        assert_eq!(leased(MAX_MESSAGES_PER_LEASE), 1);
    }

    #[tokio::test]
    async fn a_panicking_batch_is_caught_and_its_messages_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, id, consumer, batch) = one_leased(dir.path()).await;

        consumer
            .guarded(batch, async { panic!("a bug in the host") })
            .await;
        let stored = backend.get("jobs", &id).await.unwrap().unwrap();
        assert_eq!(stored.state, MessageState::Ready, "no longer leased");
        assert_eq!((stored.attempts, stored.dead_reason), (1, None));
        assert_eq!(
            stored.last_error.as_deref(),
            Some("the host failed while handling the batch: a bug in the host")
        );
    }

    #[tokio::test]
    async fn a_batch_whose_side_effects_fail_is_released_without_counting_an_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, id, consumer, batch) = one_leased(dir.path()).await;
        let failing = SideEffects::Local {
            db: backend.storage().database().clone(),
            statements: Arc::new(|c| c.execute_batch("INSERT INTO no_such_table VALUES (1)")),
        };
        let acks = batch.into_iter().map(|d| (d, Settlement::Ack)).collect();

        consumer.commit(acks, failing, Duration::ZERO, None).await;
        let stored = backend.get("jobs", &id).await.unwrap().expect("not acked");
        assert_eq!(stored.state, MessageState::Delayed, "released for a while");
        assert_eq!(stored.attempts, 0, "the delivery is not counted");
    }

    /// [`SqliteQueue`] whose settle fails `failures` times first, as on a full disk.
    struct FailingSettles {
        queue: Arc<SqliteQueue>,
        failures: std::sync::atomic::AtomicU32,
    }

    #[async_trait::async_trait]
    impl QueueBackend for FailingSettles {
        async fn publish(
            &self,
            queue: &str,
            messages: Vec<NewMessage>,
        ) -> Result<Vec<String>, queue::QueueError> {
            self.queue.publish(queue, messages).await
        }
        async fn next_batch(
            &self,
            lane: &Lane,
            terms: &BatchTerms,
        ) -> Result<Vec<Delivery>, queue::QueueError> {
            self.queue.next_batch(lane, terms).await
        }
        async fn settle(
            &self,
            lane: &Lane,
            policy: &queue::RetryPolicy,
            outcomes: Vec<(Delivery, Settlement)>,
            effects: SideEffects,
        ) -> Result<queue::SettleSummary, queue::QueueError> {
            use std::sync::atomic::Ordering;
            let left = self.failures.load(Ordering::SeqCst);
            if left > 0 {
                self.failures.store(left - 1, Ordering::SeqCst);
                return Err(queue::QueueError::Storage(
                    "database or disk is full".into(),
                ));
            }
            self.queue.settle(lane, policy, outcomes, effects).await
        }
        async fn counts(&self, queue: &str) -> Result<queue::QueueCounts, queue::QueueError> {
            self.queue.counts(queue).await
        }
        async fn lanes(
            &self,
            queue: &str,
        ) -> Result<Vec<(Lane, queue::QueueCounts)>, queue::QueueError> {
            self.queue.lanes(queue).await
        }
        async fn list(
            &self,
            queue: &str,
            after: Option<u64>,
            limit: usize,
        ) -> Result<queue::MessagePage, queue::QueueError> {
            self.queue.list(queue, after, limit).await
        }
        async fn get(
            &self,
            queue: &str,
            id: &str,
        ) -> Result<Option<queue::StoredMessage>, queue::QueueError> {
            self.queue.get(queue, id).await
        }
        async fn redrive(
            &self,
            queue: &str,
            selection: &queue::Selection,
            target: &queue::RedriveTarget,
        ) -> Result<queue::RedriveSummary, queue::QueueError> {
            self.queue.redrive(queue, selection, target).await
        }
        async fn purge(
            &self,
            queue: &str,
            selection: &queue::Selection,
        ) -> Result<u64, queue::QueueError> {
            self.queue.purge(queue, selection).await
        }
        async fn purge_expired(
            &self,
            queue: &str,
            cutoff_ms: u64,
        ) -> Result<u64, queue::QueueError> {
            self.queue.purge_expired(queue, cutoff_ms).await
        }
    }

    #[tokio::test]
    async fn outcomes_are_committed_however_many_times_the_commit_fails_first() {
        let dir = tempfile::tempdir().unwrap();
        let (queue, id) = one_message(dir.path()).await;
        // More failures than the five tries of old, whose waits (50 ms doubling) add up
        // to about 3 s.
        let backend = Arc::new(FailingSettles {
            queue: queue.clone(),
            failures: 6.into(),
        });
        let consumer = consumer(dir.path(), backend.clone()).await;
        let batch = backend
            .next_batch(&consumer.lane, &consumer.terms)
            .await
            .unwrap();
        let acks = batch.into_iter().map(|d| (d, Settlement::Ack)).collect();
        consumer
            .commit(acks, SideEffects::None, Duration::ZERO, None)
            .await;
        assert_eq!(queue.get("jobs", &id).await.unwrap(), None, "acked");
    }
}
