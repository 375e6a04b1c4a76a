//! The queue core: everything about queues that does not depend on where messages are
//! stored. [`Engine`] is the [`QueueBackend`] the rest of the host talks to; it runs over
//! a [`Storage`] backend ([`super::sqlite`] today).
//!
//! **What the core decides** (and a backend must not decide differently):
//! - *fan-out*: which lanes a published, dead-lettered or redriven message is stored in
//!   ([`Routes`], through [`DeadLetterRoute`] for dead letters);
//! - *batching*: a lane's batch is due once `max_size` messages are ready, or
//!   `max_timeout` after the first of them became ready ([`readiness`]); a consumer waits
//!   for it on the lane's waker, woken by every change that makes messages ready
//!   (publish, retry, release, dead letter, redrive) and by a timer for the next delayed
//!   message or lease deadline;
//! - *leases*: a batch is leased until `now + terms.lease`; an outcome is committed only
//!   under the lease it was delivered with;
//! - *retries and dead letters*: [`Fate::of`] turns a handler's [`Settlement`] into a
//!   [`Fate`] under the lane's [`RetryPolicy`]; a retry delayed past the queue's
//!   retention is shortened (see [`Fate::of`]); a ready message already delivered
//!   `1 + max_retries` times without an outcome is given up on with
//!   [`super::no_outcome_reason`] ([`poisoned`]);
//! - *limits* ([`super::check_limits`]), message ids, metrics and the expiry chunking.
//!
//! **What a backend does** ([`super::storage`]): store rows, and run each data-path call
//! ([`DataPath`](super::storage::DataPath)) and operator call
//! ([`Operator`](super::storage::Operator)) as one transaction, applying the core's
//! decisions ([`readiness`], [`poisoned`], [`DeadLetterRoute::lanes`]) inside it. Its
//! counts must cost O(lanes), not a scan of the backlog (`GET /v1/queues/{q}` and
//! `/metrics` read them). A second backend implements those two traits and is wrapped in
//! an [`Engine`]; the unit tests below run the core over an in-memory backend.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::clock::now_ms;
use crate::side_effects::SideEffects;

use super::lane::Lane;
use super::routes::Routes;
use super::storage::{Fate, LeasePlan, Leased, PublishRow, Storage};
use super::{
    BatchTerms, ContentType, Delivery, MessagePage, NewMessage, QueueBackend, QueueCounts,
    QueueError, RedriveSummary, RedriveTarget, RetryPolicy, Selection, SettleSummary, Settlement,
    StoredMessage, check_limits,
};

/// Most messages the retention sweep deletes in one transaction: other work gets the
/// storage between chunks, so a large expiry never holds up publishes and batches long.
pub const EXPIRY_CHUNK: u64 = 1000;

/// How long before it would expire a retried message is ready again at the latest: a
/// retry delayed past the queue's retention is shortened to that.
pub const RETRY_BEFORE_EXPIRY: Duration = Duration::from_secs(60);

/// The queue engine: the core's decisions over a storage backend `S`.
pub struct Engine<S> {
    storage: S,
    wakers: Mutex<HashMap<Lane, Arc<Notify>>>,
    routes: Arc<Routes>,
    retention: HashMap<String, Duration>,
}

impl<S: Storage> Engine<S> {
    /// The engine over `storage`, with no subscriptions (each queue keeps its messages in
    /// its own lane) and no retention known.
    pub fn new(storage: S) -> Self {
        Engine {
            storage,
            wakers: Mutex::new(HashMap::new()),
            routes: Arc::new(Routes::default()),
            retention: HashMap::new(),
        }
    }

    /// Fans the messages published to (or redriven into) a queue out to the lanes of its
    /// subscriptions.
    pub fn with_routes(mut self, routes: Routes) -> Self {
        self.routes = Arc::new(routes);
        self
    }

    /// The retention of each queue (queue name → retention), which a retry's delay is
    /// kept within ([`Fate::of`]); a queue not listed has no such bound.
    pub fn with_retentions(mut self, retentions: BTreeMap<String, Duration>) -> Self {
        self.retention = retentions.into_iter().collect();
        self
    }

    /// The storage backend.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    fn waker(&self, lane: &Lane) -> Arc<Notify> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        wakers.entry(lane.clone()).or_default().clone()
    }

    /// Wakes the consumers of each of `lanes`, once each.
    fn wake_all(&self, lanes: Vec<Lane>) {
        let lanes: HashSet<Lane> = lanes.into_iter().collect();
        for lane in &lanes {
            self.waker(lane).notify_waiters();
        }
    }

    fn dead_letters(&self, policy: &RetryPolicy) -> DeadLetterRoute {
        DeadLetterRoute {
            queue: policy.dead_letter_queue.clone(),
            routes: self.routes.clone(),
        }
    }

    /// Leases the batch of `lane` if one is due; else says when to look again (`None`:
    /// when woken).
    async fn try_lease(
        &self,
        lane: &Lane,
        terms: &BatchTerms,
    ) -> Result<Result<Vec<Delivery>, Option<u64>>, QueueError> {
        let now = now_ms();
        let plan = LeasePlan {
            max_size: terms.max_size,
            batches: terms.batches.max(1),
            timeout_ms: terms.max_timeout.as_millis() as u64,
            now,
            deadline: now + (terms.lease.as_millis() as u64).max(1),
            policy: terms.policy.clone(),
            dead_letters: self.dead_letters(&terms.policy),
        };
        match self.storage.lease(lane, plan).await? {
            Leased::Wait(at) => Ok(Err(at)),
            Leased::Batch {
                deliveries,
                gave_up,
                woken,
            } => {
                if gave_up != SettleSummary::default() {
                    crate::metrics::settled(&lane.queue, &gave_up);
                }
                self.wake_all(woken);
                if deliveries.is_empty() {
                    // Every due message was given up on: look again at once.
                    return Ok(Err(Some(now)));
                }
                Ok(Ok(deliveries))
            }
        }
    }
}

/// Whether the head of a lane makes a batch due: `first_ready_ms` is when its oldest
/// ready message became ready (`None`: none is), `ready` how many are ready (counted up
/// to `plan.max_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Lease the ready messages now.
    Take,
    /// Not yet: the batch is due at this time at the latest (`None`: once a message is
    /// ready). A backend looks again then, or earlier if a delayed message becomes ready.
    Wait(Option<u64>),
}

/// Decides whether a lane's batch is due (see [`Readiness`]).
pub fn readiness(first_ready_ms: Option<u64>, ready: usize, plan: &LeasePlan) -> Readiness {
    let Some(first) = first_ready_ms else {
        return Readiness::Wait(None);
    };
    let due = first.saturating_add(plan.timeout_ms);
    if ready >= plan.max_size || plan.now >= due {
        Readiness::Take
    } else {
        Readiness::Wait(Some(due))
    }
}

/// How many of the `ready` messages at the head of a lane a due lease takes: whole
/// batches of `plan.max_size`, up to `plan.batches` of them, when a batch is full; else
/// (due at its timeout) every one of them, fewer than `plan.max_size`.
pub fn taken(ready: usize, plan: &LeasePlan) -> usize {
    if ready < plan.max_size {
        return ready;
    }
    (ready / plan.max_size).min(plan.batches) * plan.max_size
}

/// The earlier of two times, either of which may be unknown.
pub fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The reason to give up on a due message delivered `attempts` times already, none of
/// which got an outcome committed, under `policy`; `None` delivers it again.
pub fn poisoned(attempts: u32, policy: &RetryPolicy) -> Option<String> {
    (attempts > policy.max_retries).then(|| super::no_outcome_reason(attempts))
}

/// Where the messages a lane gives up on go: the lanes of its dead-letter queue that take
/// them (as a publish to that queue would fan out), or nowhere (dropped, logged).
#[derive(Clone)]
pub struct DeadLetterRoute {
    queue: Option<String>,
    routes: Arc<Routes>,
}

impl DeadLetterRoute {
    /// The dead-letter queue, if the lane has one.
    pub fn queue(&self) -> Option<&str> {
        self.queue.as_deref()
    }

    /// The lanes a message given up on is moved to; none: it is dropped.
    pub fn lanes(&self, content_type: ContentType, body: &[u8]) -> Vec<Lane> {
        match &self.queue {
            Some(dlq) => self.routes.lanes(dlq, content_type, body),
            None => Vec::new(),
        }
    }

    /// Logs that the message `id` of `lane` was given up on for `reason`: moved to the
    /// dead-letter queue, or `dropped`.
    pub fn log(&self, lane: &Lane, id: &str, reason: &str, dropped: bool) {
        let lane = lane.to_string();
        match (&self.queue, dropped) {
            (Some(dlq), true) => tracing::error!(
                queue = lane,
                dlq,
                id,
                reason,
                "message dropped: it failed for good and no consumer of its dead_letter_queue takes it"
            ),
            (None, _) => tracing::error!(
                queue = lane,
                id,
                reason,
                "message dropped: it failed for good and the queue has no dead_letter_queue"
            ),
            (Some(dlq), false) => {
                tracing::warn!(queue = lane, dlq, id, reason, "message dead-lettered")
            }
        }
    }
}

/// Logs that the outcome of the message `id` of `lane` came after its lease ran out.
pub fn warn_stale(lane: &Lane, id: &str) {
    tracing::warn!(
        queue = %lane,
        id,
        "outcome ignored: the lease ran out and the message was taken again, or is gone"
    );
}

impl Fate {
    /// The fate of `delivery` settled with `settlement` at `now` under `policy`: a retry
    /// over `max_retries` is a dead letter. A retry is ready again after its delay, but
    /// never later than [`RETRY_BEFORE_EXPIRY`] before the message would expire
    /// (`retention` after it entered its queue; at once if less is left): a retry delay
    /// is kept within the queue's retention, as a publish's delay is, so the retry
    /// happens instead of the message expiring unseen.
    pub fn of(
        delivery: &Delivery,
        settlement: Settlement,
        policy: &RetryPolicy,
        now: u64,
        retention: Option<Duration>,
    ) -> Fate {
        let after = |delay_seconds: u32| now + u64::from(delay_seconds) * 1000;
        match settlement {
            Settlement::Ack => Fate::Delete,
            Settlement::Release { delay_seconds } => Fate::Release {
                visible_ms: after(delay_seconds),
            },
            Settlement::DeadLetter { reason } => Fate::DeadLetter {
                reason,
                error: None,
            },
            Settlement::Retry { error, .. } if delivery.attempts > policy.max_retries => {
                Fate::DeadLetter {
                    reason: format!(
                        "max_retries ({}) exceeded after {} attempts; last error: {error}",
                        policy.max_retries, delivery.attempts
                    ),
                    error: Some(error),
                }
            }
            Settlement::Retry {
                delay_seconds,
                error,
            } => {
                let mut visible_ms = after(delay_seconds);
                if let Some(retention) = retention {
                    let expires = delivery
                        .enqueued_ms
                        .saturating_add(retention.as_millis() as u64);
                    let latest = expires
                        .saturating_sub(RETRY_BEFORE_EXPIRY.as_millis() as u64)
                        .max(now);
                    if visible_ms > latest {
                        tracing::warn!(id = %delivery.id, delay_seconds, ?retention,
                            "retry delay shortened: the message would expire before it");
                        visible_ms = latest;
                    }
                }
                Fate::Retry { visible_ms, error }
            }
        }
    }
}

#[async_trait]
impl<S: Storage> QueueBackend for Engine<S> {
    async fn publish(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<String>, QueueError> {
        check_limits(&messages).map_err(QueueError::Limit)?;
        let now = now_ms();
        let (mut rows, mut ids, mut unrouted) = (Vec::with_capacity(messages.len()), vec![], 0);
        for message in messages {
            let id = ulid::Ulid::new().to_string();
            let lanes = self
                .routes
                .lanes(queue, message.content_type, &message.body);
            if lanes.is_empty() {
                tracing::debug!(queue, %id, "no consumer subscribes to the message; acked");
                unrouted += 1;
            } else {
                rows.push(PublishRow {
                    id: id.clone(),
                    message,
                    lanes,
                });
            }
            ids.push(id);
        }
        let woken: Vec<Lane> = rows.iter().flat_map(|r| r.lanes.clone()).collect();
        if !rows.is_empty() {
            self.storage.insert(rows, now).await?;
        }
        if unrouted > 0 {
            crate::metrics::unrouted(queue, unrouted);
        }
        self.wake_all(woken);
        Ok(ids)
    }

    async fn next_batch(
        &self,
        lane: &Lane,
        terms: &BatchTerms,
    ) -> Result<Vec<Delivery>, QueueError> {
        let waker = self.waker(lane);
        loop {
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_lease(lane, terms).await? {
                Ok(batch) => return Ok(batch),
                Err(None) => notified.await,
                Err(Some(at)) => {
                    let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(Instant::now() + wait) => {}
                    }
                }
            }
        }
    }

    async fn settle(
        &self,
        lane: &Lane,
        policy: &RetryPolicy,
        outcomes: Vec<(Delivery, Settlement)>,
        effects: SideEffects,
    ) -> Result<SettleSummary, QueueError> {
        let now = now_ms();
        let retention = self.retention.get(&lane.queue).copied();
        let fates = outcomes
            .into_iter()
            .map(|(delivery, settlement)| {
                let fate = Fate::of(&delivery, settlement, policy, now, retention);
                (delivery, fate)
            })
            .collect();
        let committed = self
            .storage
            .commit(lane, fates, self.dead_letters(policy), now, effects)
            .await?;
        let mut woken = committed.woken;
        if committed.summary.retried + committed.summary.released > 0 {
            woken.push(lane.clone());
        }
        self.wake_all(woken);
        Ok(committed.summary)
    }

    async fn counts(&self, queue: &str) -> Result<QueueCounts, QueueError> {
        let lanes = self.lanes(queue).await?;
        Ok(QueueCounts::total(lanes.iter().map(|(_, counts)| counts)))
    }

    async fn lanes(&self, queue: &str) -> Result<Vec<(Lane, QueueCounts)>, QueueError> {
        self.storage.lanes(queue, now_ms()).await
    }

    async fn list(
        &self,
        queue: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<MessagePage, QueueError> {
        self.storage.list(queue, after, limit, now_ms()).await
    }

    async fn get(&self, queue: &str, id: &str) -> Result<Option<StoredMessage>, QueueError> {
        self.storage.get(queue, id, now_ms()).await
    }

    async fn redrive(
        &self,
        queue: &str,
        selection: &Selection,
        target: &RedriveTarget,
    ) -> Result<RedriveSummary, QueueError> {
        let (summary, woken) = self
            .storage
            .redrive(queue, selection, target, self.routes.clone(), now_ms())
            .await?;
        self.wake_all(woken);
        Ok(summary)
    }

    async fn purge(&self, queue: &str, selection: &Selection) -> Result<u64, QueueError> {
        self.storage.purge(queue, selection, now_ms()).await
    }

    async fn purge_expired(&self, queue: &str, cutoff_ms: u64) -> Result<u64, QueueError> {
        let mut deleted = 0;
        loop {
            let chunk = self
                .storage
                .expire(queue, cutoff_ms, now_ms(), EXPIRY_CHUNK)
                .await?;
            deleted += chunk;
            if chunk < EXPIRY_CHUNK {
                return Ok(deleted);
            }
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(attempts: u32, enqueued_ms: u64) -> Delivery {
        Delivery {
            lease: 1,
            id: "m".into(),
            attempts,
            timestamp_ms: enqueued_ms,
            enqueued_ms,
            content_type: ContentType::Text,
            body: Vec::new(),
            lease_deadline_ms: u64::MAX,
        }
    }

    fn policy(max_retries: u32) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            dead_letter_queue: Some("dlq".into()),
        }
    }

    fn retry(delay_seconds: u32) -> Settlement {
        Settlement::Retry {
            delay_seconds,
            error: "boom".into(),
        }
    }

    fn plan(max_size: usize, timeout_ms: u64, now: u64) -> LeasePlan {
        LeasePlan {
            max_size,
            batches: 1,
            timeout_ms,
            now,
            deadline: now + 1000,
            policy: policy(3),
            dead_letters: DeadLetterRoute {
                queue: None,
                routes: Arc::default(),
            },
        }
    }

    #[test]
    fn a_batch_is_due_full_or_at_its_timeout() {
        assert_eq!(
            readiness(None, 0, &plan(10, 500, 1000)),
            Readiness::Wait(None)
        );
        assert_eq!(
            readiness(Some(900), 10, &plan(10, 500, 1000)),
            Readiness::Take
        );
        assert_eq!(
            readiness(Some(900), 3, &plan(10, 500, 1000)),
            Readiness::Wait(Some(1400))
        );
        assert_eq!(
            readiness(Some(500), 3, &plan(10, 500, 1000)),
            Readiness::Take
        );
        assert_eq!(earliest(Some(3), Some(2)), Some(2));
        assert_eq!(earliest(None, Some(2)), Some(2));
        assert_eq!(earliest(None, None), None);
    }

    #[test]
    fn a_lease_takes_whole_batches_up_to_its_count_or_a_partial_one_at_its_timeout() {
        let wide = LeasePlan {
            batches: 3,
            ..plan(10, 500, 1000)
        };
        assert_eq!(
            taken(3, &wide),
            3,
            "due at its timeout: every ready message"
        );
        assert_eq!(taken(10, &wide), 10);
        assert_eq!(taken(25, &wide), 20, "whole batches only");
        assert_eq!(taken(30, &wide), 30);
        assert_eq!(taken(31, &wide), 30, "no more than `batches` of them");
        assert_eq!(taken(25, &plan(10, 500, 1000)), 10, "one batch by default");
    }

    #[test]
    fn a_message_delivered_one_plus_max_retries_times_is_poisoned() {
        assert_eq!(poisoned(3, &policy(3)), None);
        assert_eq!(
            poisoned(4, &policy(3)).as_deref(),
            Some("delivered 4 times without an outcome")
        );
    }

    #[test]
    fn settlements_become_fates_under_the_retry_policy() {
        let now = 10_000;
        let fate = |attempts, settlement| {
            Fate::of(&delivery(attempts, 0), settlement, &policy(2), now, None)
        };
        assert_eq!(fate(1, Settlement::Ack), Fate::Delete);
        assert_eq!(
            fate(1, Settlement::Release { delay_seconds: 1 }),
            Fate::Release { visible_ms: 11_000 }
        );
        assert_eq!(
            fate(2, retry(5)),
            Fate::Retry {
                visible_ms: 15_000,
                error: "boom".into()
            }
        );
        assert_eq!(
            fate(3, retry(5)),
            Fate::DeadLetter {
                reason: "max_retries (2) exceeded after 3 attempts; last error: boom".into(),
                error: Some("boom".into())
            }
        );
    }

    #[test]
    fn a_retry_is_kept_within_the_retention() {
        let hour = Duration::from_secs(3600);
        let margin = RETRY_BEFORE_EXPIRY.as_millis() as u64;
        let now = 10_000_000;
        let enqueued = now - 600_000;
        let fate = |delay| {
            Fate::of(
                &delivery(1, enqueued),
                retry(delay),
                &policy(3),
                now,
                Some(hour),
            )
        };
        // Well within: untouched.
        assert_eq!(
            fate(60),
            Fate::Retry {
                visible_ms: now + 60_000,
                error: "boom".into()
            }
        );
        // Past the expiry (enqueued + 1 h): a minute before it.
        assert_eq!(
            fate(43_200),
            Fate::Retry {
                visible_ms: enqueued + 3_600_000 - margin,
                error: "boom".into()
            }
        );
        // Less than a minute left: at once.
        let late = Fate::of(
            &delivery(1, now - 3_590_000),
            retry(600),
            &policy(3),
            now,
            Some(hour),
        );
        assert_eq!(
            late,
            Fate::Retry {
                visible_ms: now,
                error: "boom".into()
            }
        );
    }

    /// A message row of [`Memory`].
    #[derive(Clone)]
    struct Row {
        seq: i64,
        id: String,
        lane: Lane,
        content_type: ContentType,
        body: Vec<u8>,
        published_ms: u64,
        enqueued_ms: u64,
        visible_ms: u64,
        attempts: u32,
        leased: bool,
        dead_reason: Option<String>,
        source: Option<Lane>,
    }

    /// An in-memory storage backend: just enough of a second backend to show the core
    /// runs over any [`Storage`].
    #[derive(Default)]
    struct Memory {
        rows: Mutex<Vec<Row>>,
        seq: std::sync::atomic::AtomicI64,
    }

    impl Memory {
        fn rows(&self) -> std::sync::MutexGuard<'_, Vec<Row>> {
            self.rows.lock().unwrap()
        }

        fn next_seq(&self) -> i64 {
            self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
        }

        /// Gives up on the row at `at`: to the dead-letter lanes, or dropped.
        fn give_up(
            &self,
            rows: &mut Vec<Row>,
            at: usize,
            reason: &str,
            route: &DeadLetterRoute,
            now: u64,
        ) -> GaveUpTo {
            let lanes = route.lanes(rows[at].content_type, &rows[at].body);
            let Some(first) = lanes.first() else {
                rows.remove(at);
                return GaveUpTo::Dropped;
            };
            let row = &mut rows[at];
            row.source = Some(row.lane.clone());
            row.lane = first.clone();
            (row.attempts, row.leased, row.visible_ms, row.enqueued_ms) = (0, false, now, now);
            row.dead_reason = Some(reason.to_owned());
            let copy = row.clone();
            for lane in &lanes[1..] {
                rows.push(Row {
                    seq: self.next_seq(),
                    lane: lane.clone(),
                    ..copy.clone()
                });
            }
            GaveUpTo::Lanes(lanes)
        }
    }

    enum GaveUpTo {
        Lanes(Vec<Lane>),
        Dropped,
    }

    fn in_queue(row: &Row, queue: &str) -> bool {
        row.lane.queue == queue
    }

    fn free(row: &Row, now: u64) -> bool {
        !row.leased || row.visible_ms <= now
    }

    fn chosen(row: &Row, selection: &Selection) -> bool {
        match selection {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&row.id),
            Selection::Consumer(consumer) => &row.lane.consumer == consumer,
        }
    }

    #[async_trait]
    impl super::super::storage::DataPath for Memory {
        async fn insert(&self, rows: Vec<PublishRow>, now: u64) -> Result<(), QueueError> {
            for row in rows {
                for lane in row.lanes {
                    let m = &row.message;
                    let stored = Row {
                        seq: self.next_seq(),
                        id: row.id.clone(),
                        lane,
                        content_type: m.content_type,
                        body: m.body.clone(),
                        published_ms: now,
                        enqueued_ms: now,
                        visible_ms: now + u64::from(m.delay_seconds) * 1000,
                        attempts: 0,
                        leased: false,
                        dead_reason: None,
                        source: None,
                    };
                    self.rows().push(stored);
                }
            }
            Ok(())
        }

        async fn lease(&self, lane: &Lane, plan: LeasePlan) -> Result<Leased, QueueError> {
            let mut rows = self.rows();
            let now = plan.now;
            let mut due: Vec<(u64, i64)> = rows
                .iter()
                .filter(|r| &r.lane == lane && r.visible_ms <= now)
                .map(|r| (r.visible_ms, r.seq))
                .collect();
            due.sort_unstable();
            due.truncate(plan.max_size * plan.batches);
            if let Readiness::Wait(fill_by) = readiness(due.first().map(|d| d.0), due.len(), &plan)
            {
                let next = rows
                    .iter()
                    .filter(|r| &r.lane == lane && r.visible_ms > now)
                    .map(|r| r.visible_ms)
                    .min();
                return Ok(Leased::Wait(earliest(fill_by, next)));
            }
            let (mut deliveries, mut gave_up, mut woken) =
                (vec![], SettleSummary::default(), vec![]);
            due.truncate(taken(due.len(), &plan));
            for (_, seq) in due {
                let at = rows.iter().position(|r| r.seq == seq).unwrap();
                if let Some(reason) = poisoned(rows[at].attempts, &plan.policy) {
                    match self.give_up(&mut rows, at, &reason, &plan.dead_letters, now) {
                        GaveUpTo::Lanes(lanes) => {
                            gave_up.dead_lettered += 1;
                            woken.extend(lanes);
                        }
                        GaveUpTo::Dropped => gave_up.dropped += 1,
                    }
                    continue;
                }
                let row = &mut rows[at];
                (row.leased, row.visible_ms) = (true, plan.deadline);
                row.attempts += 1;
                deliveries.push(Delivery {
                    lease: row.seq,
                    id: row.id.clone(),
                    attempts: row.attempts,
                    timestamp_ms: row.published_ms,
                    enqueued_ms: row.enqueued_ms,
                    content_type: row.content_type,
                    body: row.body.clone(),
                    lease_deadline_ms: plan.deadline,
                });
            }
            Ok(Leased::Batch {
                deliveries,
                gave_up,
                woken,
            })
        }

        async fn commit(
            &self,
            _lane: &Lane,
            fates: Vec<(Delivery, Fate)>,
            dead_letters: DeadLetterRoute,
            now: u64,
            _effects: SideEffects,
        ) -> Result<super::super::storage::Committed, QueueError> {
            let mut rows = self.rows();
            let mut done = super::super::storage::Committed::default();
            for (delivery, fate) in fates {
                let held = rows.iter().position(|r| {
                    r.seq == delivery.lease
                        && r.leased
                        && r.visible_ms == delivery.lease_deadline_ms
                });
                let Some(at) = held else {
                    done.summary.stale += 1;
                    continue;
                };
                match fate {
                    Fate::Delete => {
                        rows.remove(at);
                        done.summary.acked += 1;
                    }
                    Fate::Retry { visible_ms, .. } => {
                        (rows[at].leased, rows[at].visible_ms) = (false, visible_ms);
                        done.summary.retried += 1;
                    }
                    Fate::Release { visible_ms } => {
                        (rows[at].leased, rows[at].visible_ms) = (false, visible_ms);
                        rows[at].attempts -= 1;
                        done.summary.released += 1;
                    }
                    Fate::DeadLetter { reason, .. } => {
                        match self.give_up(&mut rows, at, &reason, &dead_letters, now) {
                            GaveUpTo::Lanes(lanes) => {
                                done.summary.dead_lettered += 1;
                                done.woken.extend(lanes);
                            }
                            GaveUpTo::Dropped => done.summary.dropped += 1,
                        }
                    }
                }
            }
            Ok(done)
        }
    }

    #[async_trait]
    impl super::super::storage::Operator for Memory {
        async fn lanes(
            &self,
            queue: &str,
            now: u64,
        ) -> Result<Vec<(Lane, QueueCounts)>, QueueError> {
            let mut lanes: BTreeMap<String, (Lane, QueueCounts)> = BTreeMap::new();
            for row in self.rows().iter().filter(|r| in_queue(r, queue)) {
                let (_, counts) = lanes
                    .entry(row.lane.to_string())
                    .or_insert_with(|| (row.lane.clone(), QueueCounts::default()));
                match (row.visible_ms <= now, row.leased) {
                    (true, _) => {
                        counts.backlog += 1;
                        counts.oldest_ready_ms =
                            earliest(counts.oldest_ready_ms, Some(row.visible_ms));
                    }
                    (false, true) => counts.in_flight += 1,
                    (false, false) => counts.delayed += 1,
                }
            }
            Ok(lanes.into_values().collect())
        }

        async fn list(
            &self,
            queue: &str,
            after: Option<u64>,
            limit: usize,
            now: u64,
        ) -> Result<MessagePage, QueueError> {
            let rows = self.rows();
            let found: Vec<&Row> = rows
                .iter()
                .filter(|r| in_queue(r, queue) && r.seq as u64 > after.unwrap_or(0))
                .collect();
            let next = (found.len() > limit).then(|| found[limit - 1].seq as u64);
            let messages = found.iter().take(limit).map(|r| stored(r, now)).collect();
            Ok(MessagePage { messages, next })
        }

        async fn get(
            &self,
            queue: &str,
            id: &str,
            now: u64,
        ) -> Result<Option<StoredMessage>, QueueError> {
            Ok(self
                .rows()
                .iter()
                .find(|r| in_queue(r, queue) && r.id == id)
                .map(|r| stored(r, now)))
        }

        async fn redrive(
            &self,
            queue: &str,
            selection: &Selection,
            target: &RedriveTarget,
            routes: Arc<Routes>,
            now: u64,
        ) -> Result<(RedriveSummary, Vec<Lane>), QueueError> {
            let (mut summary, mut woken) = (RedriveSummary::default(), vec![]);
            for row in self.rows().iter_mut() {
                if !(in_queue(row, queue) && free(row, now) && chosen(row, selection)) {
                    continue;
                }
                let to = match target {
                    RedriveTarget::Source { known } => {
                        row.source.clone().filter(|s| known.contains(s))
                    }
                    RedriveTarget::Queue(to) => routes
                        .lanes(to, row.content_type, &row.body)
                        .into_iter()
                        .next(),
                };
                let Some(to) = to else {
                    summary.skipped += 1;
                    continue;
                };
                (row.lane, row.attempts, row.visible_ms, row.enqueued_ms) =
                    (to.clone(), 0, now, now);
                (row.source, row.dead_reason) = (None, None);
                summary.redriven += 1;
                woken.push(to);
            }
            Ok((summary, woken))
        }

        async fn purge(
            &self,
            queue: &str,
            selection: &Selection,
            now: u64,
        ) -> Result<u64, QueueError> {
            let mut rows = self.rows();
            let before = rows.len();
            rows.retain(|r| !(in_queue(r, queue) && free(r, now) && chosen(r, selection)));
            Ok((before - rows.len()) as u64)
        }

        async fn expire(
            &self,
            queue: &str,
            cutoff_ms: u64,
            now: u64,
            limit: u64,
        ) -> Result<u64, QueueError> {
            let mut rows = self.rows();
            let mut left = limit;
            let before = rows.len();
            rows.retain(|r| {
                let expired =
                    in_queue(r, queue) && free(r, now) && r.enqueued_ms < cutoff_ms && left > 0;
                left -= u64::from(expired);
                !expired
            });
            Ok((before - rows.len()) as u64)
        }
    }

    fn stored(row: &Row, now: u64) -> StoredMessage {
        StoredMessage {
            id: row.id.clone(),
            consumer: row.lane.consumer.clone(),
            state: match (row.visible_ms <= now, row.leased) {
                (true, _) => super::super::MessageState::Ready,
                (false, true) => super::super::MessageState::InFlight,
                (false, false) => super::super::MessageState::Delayed,
            },
            attempts: row.attempts,
            published_ms: row.published_ms,
            first_failed_ms: None,
            last_failed_ms: None,
            last_error: None,
            dead_lettered_ms: None,
            dead_reason: row.dead_reason.clone(),
            source_queue: row.source.as_ref().map(|s| s.queue.clone()),
            source_consumer: row.source.as_ref().map(|s| s.consumer.clone()),
            source_attempts: None,
            content_type: row.content_type,
            body: row.body.clone(),
        }
    }

    fn text(body: &str) -> NewMessage {
        NewMessage {
            content_type: ContentType::Text,
            body: body.into(),
            delay_seconds: 0,
        }
    }

    fn terms(max_retries: u32) -> BatchTerms {
        BatchTerms {
            max_size: 10,
            max_timeout: Duration::ZERO,
            batches: 1,
            lease: Duration::from_secs(60),
            policy: policy(max_retries),
        }
    }

    /// The next batch of `lane`, within a deadline.
    async fn next(engine: &Engine<Memory>, lane: &Lane, terms: &BatchTerms) -> Vec<Delivery> {
        tokio::time::timeout(Duration::from_secs(5), engine.next_batch(lane, terms))
            .await
            .expect("a batch within the deadline")
            .unwrap()
    }

    fn audit_lane() -> Lane {
        Lane::new("jobs", "audit")
    }

    #[tokio::test]
    async fn the_core_runs_over_another_storage_backend() {
        let mut routes = Routes::default();
        routes.add("jobs", "jobs", Default::default());
        routes.add("jobs", "audit", Default::default());
        let engine = Arc::new(Engine::new(Memory::default()).with_routes(routes));
        let (jobs, audit) = (Lane::of("jobs"), audit_lane());
        let waiter = tokio::spawn({
            let engine = engine.clone();
            let audit = audit.clone();
            let short = BatchTerms {
                lease: Duration::from_millis(1),
                ..terms(0)
            };
            async move { next(&engine, &audit, &short).await }
        });
        tokio::task::yield_now().await;
        let ids = engine
            .publish("jobs", vec![text("a"), text("b")])
            .await
            .unwrap();
        assert_eq!(
            engine.counts("jobs").await.unwrap().backlog,
            4,
            "a copy per consumer"
        );
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 2, "the waiting consumer was woken");

        // A retry over max_retries (1) is dead-lettered; the other lane is not touched.
        let batch = next(&engine, &jobs, &terms(1)).await;
        let outcomes = batch.into_iter().map(|d| (d, retry(0))).collect();
        let summary = engine
            .settle(&jobs, &policy(1), outcomes, SideEffects::None)
            .await
            .unwrap();
        assert_eq!(summary.retried, 2);
        let again = next(&engine, &jobs, &terms(1)).await;
        assert_eq!(again.iter().map(|d| d.attempts).collect::<Vec<_>>(), [2, 2]);
        let outcomes = again.into_iter().map(|d| (d, retry(0))).collect();
        let summary = engine
            .settle(&jobs, &policy(1), outcomes, SideEffects::None)
            .await
            .unwrap();
        assert_eq!(summary.dead_lettered, 2);
        assert_eq!(engine.counts("dlq").await.unwrap().backlog, 2);
        let dead = engine.get("dlq", &ids[0]).await.unwrap().unwrap();
        assert_eq!(
            dead.dead_reason.as_deref(),
            Some("max_retries (1) exceeded after 2 attempts; last error: boom")
        );
        assert_eq!(dead.source_consumer.as_deref(), Some("jobs"));

        // The audit lane's copies, whose lease ran out unsettled: past max_retries (0)
        // they are given up on instead of delivered again.
        let poisoner = tokio::spawn({
            let engine = engine.clone();
            async move { engine.next_batch(&audit_lane(), &terms(0)).await }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while engine.counts("dlq").await.unwrap().backlog < 4 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("given up on within the deadline");
        assert!(!poisoner.is_finished(), "nothing delivered");
        poisoner.abort();
        let poisoned = engine.list("dlq", None, 10).await.unwrap();
        assert!(
            poisoned
                .messages
                .iter()
                .any(|m| m.dead_reason.as_deref() == Some("delivered 1 times without an outcome"))
        );

        // Redriven back to their source lanes.
        let source = RedriveTarget::Source {
            known: vec![jobs.clone(), audit.clone()],
        };
        let redriven = engine
            .redrive("dlq", &Selection::All, &source)
            .await
            .unwrap();
        assert_eq!(
            redriven,
            RedriveSummary {
                redriven: 4,
                skipped: 0
            }
        );
        assert_eq!(engine.counts("jobs").await.unwrap().backlog, 4);
        assert_eq!(engine.lanes("dlq").await.unwrap(), vec![]);
        assert_eq!(
            engine
                .purge("jobs", &Selection::Consumer("audit".into()))
                .await
                .unwrap(),
            2
        );
        assert_eq!(engine.purge_expired("jobs", u64::MAX).await.unwrap(), 2);
        assert_eq!(engine.counts("jobs").await.unwrap(), QueueCounts::default());
    }
}
