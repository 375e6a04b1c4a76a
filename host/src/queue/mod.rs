//! The durable queue engine: what the host asks of queues ([`QueueBackend`], spec
//! section 1), and the publishing limits every backend shares.
//!
//! It is built in two parts, so that every storage reuses everything but the storage
//! itself:
//! - [`core`]: the backend-independent engine ([`core::Engine`], the one
//!   [`QueueBackend`] the host uses): batching readiness and wakers, leases, the retry and
//!   dead-letter policy, poison detection, fan-out to lanes ([`routes`], [`lane`]);
//! - [`storage`]: what a storage backend provides, in two traits: the data path (store,
//!   lease, commit fates) and the operator's work (counts, browse, redrive, purge,
//!   expire). [`sqlite`] is the embedded backend; [`jetstream`] keeps the queues in a
//!   NATS JetStream cluster that several hosts share (`[backend] kind = "nats"`).

pub mod core;
pub mod jetstream;
pub mod lane;
pub mod routes;
pub mod sqlite;
pub mod storage;

use std::time::Duration;

use async_trait::async_trait;

use crate::config::MAX_DELAY_SECONDS;
use crate::side_effects::SideEffects;
use crate::store::StoreError;

use self::lane::Lane;

/// Largest message body, in bytes (Cloudflare Queues: 128 KB).
pub const MAX_BODY_BYTES: usize = 128 * 1024;
/// Most messages in one `send_batch`.
pub const MAX_BATCH_MESSAGES: usize = 100;
/// Largest total body size of one `send_batch`, in bytes (256 KB).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// How the bytes of a message body are to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// UTF-8 JSON text.
    Json,
    /// UTF-8 text.
    Text,
    /// Arbitrary bytes.
    Bytes,
}

impl ContentType {
    /// The name used in the HTTP API and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Json => "json",
            ContentType::Text => "text",
            ContentType::Bytes => "bytes",
        }
    }

    /// Reads a name written by [`ContentType::as_str`].
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "json" => Some(ContentType::Json),
            "text" => Some(ContentType::Text),
            "bytes" => Some(ContentType::Bytes),
            _ => None,
        }
    }
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// How `body` is encoded.
    pub content_type: ContentType,
    /// The body bytes.
    pub body: Vec<u8>,
    /// Seconds before the message may be delivered.
    pub delay_seconds: u32,
}

/// A message handed out to a consumer, leased until it is settled.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The backend's handle on this lease.
    pub lease: i64,
    /// The message id given at publish time.
    pub id: String,
    /// Deliveries so far, this one included (1 on the first delivery).
    pub attempts: u32,
    /// Publish time, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// When it entered its queue (published, dead-lettered or redriven into it), in
    /// milliseconds since the Unix epoch: its retention counts from then.
    pub enqueued_ms: u64,
    /// How `body` is encoded.
    pub content_type: ContentType,
    /// The body bytes.
    pub body: Vec<u8>,
    /// When the lease ends, in milliseconds since the Unix epoch: a message not settled
    /// by then is ready again, and an outcome committed once another lease took it (or
    /// once it was purged) is ignored.
    pub lease_deadline_ms: u64,
}

/// What becomes of a delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Delete it.
    Ack,
    /// Deliver it again after `delay_seconds` (kept within the queue's retention, see
    /// [`core::Fate::of`]); `error` says why it failed this time.
    Retry {
        /// Seconds before the next delivery.
        delay_seconds: u32,
        /// Why this attempt failed.
        error: String,
    },
    /// Move it to the dead-letter queue at once.
    DeadLetter {
        /// Why the handler gave up on it.
        reason: String,
    },
    /// Give it back untouched after `delay_seconds`, without counting the delivery as an
    /// attempt: the host, not the handler, could not handle it.
    Release {
        /// Seconds before the next delivery.
        delay_seconds: u32,
    },
}

/// How failed messages of a queue are treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries before a message is dead-lettered.
    pub max_retries: u32,
    /// Where dead-lettered messages go; `None` deletes them (logged).
    pub dead_letter_queue: Option<String>,
}

/// How a consumer takes batches from its lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchTerms {
    /// Most messages in a batch.
    pub max_size: usize,
    /// Longest wait for a batch to fill, from the first ready message.
    pub max_timeout: Duration,
    /// Most batches leased together (at least 1): once more than `max_size` messages are
    /// ready, whole batches of them, up to this many, are leased at once, under one
    /// lease; the consumer hands them to its handler `max_size` at a time. A backend may
    /// lease a single batch instead.
    pub batches: usize,
    /// How long the messages of a batch stay leased: not settled by then, they are ready
    /// again (and their next delivery counts as an attempt).
    pub lease: Duration,
    /// The retry policy of the lane: a message already delivered `1 + max_retries` times
    /// without an outcome (the host died, or the lease ran out, each time) is
    /// dead-lettered instead of delivered again.
    pub policy: RetryPolicy,
}

/// The reason a message is dead-lettered with when it was delivered `attempts` times and
/// none of them got an outcome committed.
pub fn no_outcome_reason(attempts: u32) -> String {
    format!("delivered {attempts} times without an outcome")
}

/// What a settlement did, message by message, summed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SettleSummary {
    /// Deleted after an ack.
    pub acked: usize,
    /// Put back for another attempt.
    pub retried: usize,
    /// Moved to the dead-letter queue.
    pub dead_lettered: usize,
    /// Deleted because they failed for good and the queue has no dead-letter queue.
    pub dropped: usize,
    /// Given back without counting an attempt.
    pub released: usize,
    /// Outcomes ignored: the lease had run out and the message had been taken again,
    /// purged or expired by then.
    pub stale: usize,
}

/// Message counts of one queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounts {
    /// Ready to be delivered.
    pub backlog: u64,
    /// Delivered and not yet settled.
    pub in_flight: u64,
    /// Waiting for their delivery or retry delay to pass.
    pub delayed: u64,
    /// When the oldest ready message became ready, in ms since the epoch.
    #[serde(skip)]
    pub oldest_ready_ms: Option<u64>,
}

impl QueueCounts {
    /// Every message held: ready, in flight or delayed.
    pub fn held(&self) -> u64 {
        self.backlog + self.in_flight + self.delayed
    }

    /// The counts of a whole queue from those of its lanes.
    pub fn total<'a>(lanes: impl IntoIterator<Item = &'a QueueCounts>) -> QueueCounts {
        lanes
            .into_iter()
            .fold(QueueCounts::default(), |sum, lane| QueueCounts {
                backlog: sum.backlog + lane.backlog,
                in_flight: sum.in_flight + lane.in_flight,
                delayed: sum.delayed + lane.delayed,
                oldest_ready_ms: match (sum.oldest_ready_ms, lane.oldest_ready_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
            })
    }
}

/// Where a stored message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageState {
    /// Ready to be delivered.
    Ready,
    /// Delivered and not yet settled.
    InFlight,
    /// Waiting for its delivery or retry delay to pass.
    Delayed,
}

impl MessageState {
    /// The name used in the HTTP API.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Ready => "ready",
            MessageState::InFlight => "in_flight",
            MessageState::Delayed => "delayed",
        }
    }
}

/// A message as it is stored, for operators browsing a queue (a dead-letter queue above
/// all). Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The message id given at publish time.
    pub id: String,
    /// The consumer this copy of the message is for (the queue's own name for its
    /// default consumer, or for a queue that no consumer reads).
    pub consumer: String,
    /// Where it stands.
    pub state: MessageState,
    /// Deliveries from this queue so far (reset when it is dead-lettered or redriven).
    pub attempts: u32,
    /// Publish time.
    pub published_ms: u64,
    /// When an attempt to handle it first failed (retry or dead-letter), if one did.
    pub first_failed_ms: Option<u64>,
    /// When an attempt to handle it last failed, if one did.
    pub last_failed_ms: Option<u64>,
    /// Why the last retried attempt failed.
    pub last_error: Option<String>,
    /// When it was moved to this dead-letter queue.
    pub dead_lettered_ms: Option<u64>,
    /// Why it was dead-lettered: the handler's reason, or the retries exceeded.
    pub dead_reason: Option<String>,
    /// The queue it was dead-lettered from.
    pub source_queue: Option<String>,
    /// The consumer of `source_queue` that gave up on it.
    pub source_consumer: Option<String>,
    /// Its deliveries in `source_queue` before it was dead-lettered.
    pub source_attempts: Option<u32>,
    /// How `body` is encoded.
    pub content_type: ContentType,
    /// The body bytes.
    pub body: Vec<u8>,
}

/// One page of a queue's messages, in the order they were first published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessagePage {
    /// The messages of this page.
    pub messages: Vec<StoredMessage>,
    /// Where the next page starts (pass it as `after`); `None` on the last page.
    pub next: Option<u64>,
}

/// Which messages of a queue an operator's redrive or purge applies to. Messages in
/// flight are always passed over, until their lease runs out: their lease settles them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every message of the queue.
    All,
    /// The messages with these ids; ids not in the queue are ignored.
    Ids(Vec<String>),
    /// The copies kept for this consumer of the queue (one still configured or not).
    Consumer(String),
}

/// Where redriven messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveTarget {
    /// Each message back to the lane (queue and consumer) it was dead-lettered from,
    /// provided that lane is one of `known`; the others stay where they are.
    Source {
        /// The lanes that may receive messages (the ones the host serves).
        known: Vec<Lane>,
    },
    /// Every message to this queue, to the consumers that subscribe to it there.
    Queue(String),
}

/// What a redrive did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RedriveSummary {
    /// Messages moved, with their attempts and failure records reset.
    pub redriven: u64,
    /// Selected messages left in place: they record no known source queue.
    pub skipped: u64,
}

/// Errors of a queue backend.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A producer broke a limit; nothing was stored.
    #[error("{0}")]
    Limit(LimitError),
    /// The storage failed.
    #[error("queue storage failed: {0}")]
    Storage(String),
    /// The batch's side effects could not be committed, so neither were its outcomes.
    #[error("the batch's side effects were not committed: {0}")]
    SideEffects(String),
}

impl From<StoreError> for QueueError {
    fn from(err: StoreError) -> Self {
        QueueError::Storage(err.to_string())
    }
}

/// A publishing limit that was exceeded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A body is larger than [`MAX_BODY_BYTES`].
    #[error("message {index}: body is {size} bytes, the limit is {MAX_BODY_BYTES}")]
    BodyTooLarge {
        /// Position of the message in the batch.
        index: usize,
        /// Its body size.
        size: usize,
    },
    /// A batch has more than [`MAX_BATCH_MESSAGES`] messages.
    #[error("batch has {0} messages, the limit is {MAX_BATCH_MESSAGES}")]
    TooManyMessages(usize),
    /// A batch has no message.
    #[error("batch has no messages")]
    EmptyBatch,
    /// A batch's bodies add up to more than [`MAX_BATCH_BYTES`].
    #[error("batch is {0} bytes, the limit is {MAX_BATCH_BYTES}")]
    BatchTooLarge(usize),
    /// A delay is longer than 12 hours.
    #[error("message {index}: delay_seconds is {delay}, the limit is {MAX_DELAY_SECONDS}")]
    DelayTooLong {
        /// Position of the message in the batch.
        index: usize,
        /// The delay asked for.
        delay: u32,
    },
}

/// Checks a batch to publish against the limits of spec section 1.
pub fn check_limits(messages: &[NewMessage]) -> Result<(), LimitError> {
    if messages.is_empty() {
        return Err(LimitError::EmptyBatch);
    }
    if messages.len() > MAX_BATCH_MESSAGES {
        return Err(LimitError::TooManyMessages(messages.len()));
    }
    for (index, m) in messages.iter().enumerate() {
        if m.body.len() > MAX_BODY_BYTES {
            return Err(LimitError::BodyTooLarge {
                index,
                size: m.body.len(),
            });
        }
        if m.delay_seconds > MAX_DELAY_SECONDS {
            return Err(LimitError::DelayTooLong {
                index,
                delay: m.delay_seconds,
            });
        }
    }
    let total: usize = messages.iter().map(|m| m.body.len()).sum();
    if total > MAX_BATCH_BYTES {
        return Err(LimitError::BatchTooLarge(total));
    }
    Ok(())
}

/// A durable queue store. Messages are delivered at least once: a message leaves its
/// queue only when it is settled as acked, dead-lettered or dropped.
///
/// A queue with several subscribed consumers keeps a copy of each message for every
/// consumer whose filter takes it, in that consumer's lane ([`routes`]); consumers take
/// batches from and settle in their lane, while every other operation names a queue and
/// covers all of its lanes.
#[async_trait]
pub trait QueueBackend: Send + Sync + 'static {
    /// Stores `messages` in `queue` after checking the limits, in the lanes of the
    /// consumers that subscribe to each (a message no consumer takes is not stored);
    /// returns their ids. Stores all or nothing.
    async fn publish(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<String>, QueueError>;

    /// Waits for the next batch of `lane`: returns as soon as
    /// `terms.max_size` messages are ready, or when `terms.max_timeout` has passed since
    /// the first of them became ready. The messages returned are leased until
    /// [`QueueBackend::settle`], for `terms.lease` at most; a lease also dies with the
    /// process, so an unsettled message is delivered again after a restart. A ready
    /// message already delivered `1 + max_retries` times is dead-lettered instead (with
    /// [`no_outcome_reason`]).
    async fn next_batch(
        &self,
        lane: &Lane,
        terms: &BatchTerms,
    ) -> Result<Vec<Delivery>, QueueError>;

    /// Commits the outcome of each message delivered from `lane`, all in one
    /// transaction. A dead-lettered message records the lane as its source and goes to
    /// the consumers of the dead-letter queue that take it, as a published message does.
    /// The outcome of a message whose lease ran out and that was taken again is ignored.
    /// The batch's `effects` are committed with the outcomes, or before them (see
    /// [`SideEffects`]); if they fail, nothing is committed
    /// ([`QueueError::SideEffects`]).
    async fn settle(
        &self,
        lane: &Lane,
        policy: &RetryPolicy,
        outcomes: Vec<(Delivery, Settlement)>,
        effects: SideEffects,
    ) -> Result<SettleSummary, QueueError>;

    /// Message counts of `queue`, all lanes summed; costs O(lanes), not a scan of the
    /// backlog.
    async fn counts(&self, queue: &str) -> Result<QueueCounts, QueueError>;

    /// The lanes of `queue` that hold messages, each with its counts, in the order of
    /// their written names; costs O(lanes), not a scan of the backlog.
    async fn lanes(&self, queue: &str) -> Result<Vec<(Lane, QueueCounts)>, QueueError>;

    /// Up to `limit` messages of `queue` in publish order, starting after the position
    /// `after` (a [`MessagePage::next`]; `None` for the first page).
    async fn list(
        &self,
        queue: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<MessagePage, QueueError>;

    /// The message `id` of `queue`, if it is there.
    async fn get(&self, queue: &str, id: &str) -> Result<Option<StoredMessage>, QueueError>;

    /// Moves the selected messages of `queue` (none in flight) to `target`, ready at once,
    /// with their attempts and failure records reset, and wakes the target consumers.
    async fn redrive(
        &self,
        queue: &str,
        selection: &Selection,
        target: &RedriveTarget,
    ) -> Result<RedriveSummary, QueueError>;

    /// Deletes the selected messages of `queue` (none in flight); returns how many.
    async fn purge(&self, queue: &str, selection: &Selection) -> Result<u64, QueueError>;

    /// Deletes the messages of `queue` (none in flight) that entered it before
    /// `cutoff_ms` (milliseconds since the Unix epoch): published, or dead-lettered or
    /// redriven into it, before then. Returns how many.
    async fn purge_expired(&self, queue: &str, cutoff_ms: u64) -> Result<u64, QueueError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(size: usize, delay_seconds: u32) -> NewMessage {
        NewMessage {
            content_type: ContentType::Bytes,
            body: vec![0; size],
            delay_seconds,
        }
    }

    #[test]
    fn limits_are_enforced() {
        assert_eq!(
            check_limits(&[msg(MAX_BODY_BYTES, MAX_DELAY_SECONDS)]),
            Ok(())
        );
        assert_eq!(check_limits(&[]), Err(LimitError::EmptyBatch));
        assert_eq!(
            check_limits(&[msg(1, 0), msg(MAX_BODY_BYTES + 1, 0)]),
            Err(LimitError::BodyTooLarge {
                index: 1,
                size: MAX_BODY_BYTES + 1
            })
        );
        assert_eq!(
            check_limits(&vec![msg(1, 0); 101]),
            Err(LimitError::TooManyMessages(101))
        );
        assert_eq!(
            check_limits(&vec![msg(100 * 1024, 0); 3]),
            Err(LimitError::BatchTooLarge(300 * 1024))
        );
        assert_eq!(
            check_limits(&[msg(1, MAX_DELAY_SECONDS + 1)]),
            Err(LimitError::DelayTooLong {
                index: 0,
                delay: MAX_DELAY_SECONDS + 1
            })
        );
    }
}
