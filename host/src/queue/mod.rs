//! The durable queue engine: what a queue backend must do (spec section 1), and the
//! publishing limits every backend shares. [`sqlite`] is the embedded backend.

pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;

use crate::config::MAX_DELAY_SECONDS;

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
    /// How `body` is encoded.
    pub content_type: ContentType,
    /// The body bytes.
    pub body: Vec<u8>,
}

/// What becomes of a delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Delete it.
    Ack,
    /// Deliver it again after `delay_seconds`; `error` says why it failed this time.
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
}

/// How failed messages of a queue are treated.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries before a message is dead-lettered.
    pub max_retries: u32,
    /// Where dead-lettered messages go; `None` deletes them (logged).
    pub dead_letter_queue: Option<String>,
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

/// Errors of a queue backend.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A producer broke a limit; nothing was stored.
    #[error("{0}")]
    Limit(LimitError),
    /// The storage failed.
    #[error("queue storage failed: {0}")]
    Storage(String),
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
#[async_trait]
pub trait QueueBackend: Send + Sync + 'static {
    /// Stores `messages` in `queue` after checking the limits; returns their ids.
    /// Stores all or nothing.
    async fn publish(
        &self,
        queue: &str,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<String>, QueueError>;

    /// Waits for the next batch of `queue`: returns as soon as `max_size` messages are
    /// ready, or when `max_timeout` has passed since the first of them became ready.
    /// The messages returned are leased until [`QueueBackend::settle`]; a lease dies with
    /// the process, so an unsettled message is delivered again after a restart.
    async fn next_batch(
        &self,
        queue: &str,
        max_size: usize,
        max_timeout: Duration,
    ) -> Result<Vec<Delivery>, QueueError>;

    /// Commits the outcome of each delivered message, all in one transaction.
    async fn settle(
        &self,
        queue: &str,
        policy: &RetryPolicy,
        outcomes: Vec<(Delivery, Settlement)>,
    ) -> Result<SettleSummary, QueueError>;

    /// Message counts of `queue`.
    async fn counts(&self, queue: &str) -> Result<QueueCounts, QueueError>;
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
