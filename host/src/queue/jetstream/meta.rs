//! What a JetStream message of a queue carries beside its body: the record a SQLite row
//! keeps in its columns (id, content type, times, attempts, failure and dead-letter
//! records), as one JSON header ([`META_HEADER`]), ASCII only.

use async_nats::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::queue::lane::Lane;
use crate::queue::{ContentType, MessageState, StoredMessage};

/// The header that holds a message's [`Meta`].
pub const META_HEADER: &str = "Clawq-Meta";

/// The record of one copy of a message (see the module doc). Times are milliseconds
/// since the Unix epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The message id given at publish time.
    pub id: String,
    /// How the body is encoded ([`ContentType::as_str`]).
    #[serde(rename = "type")]
    pub content_type: String,
    /// Publish time.
    pub published: u64,
    /// When it entered its queue (published, dead-lettered or redriven into it).
    pub enqueued: u64,
    /// Deliveries of it from this queue before this copy was stored: a retried copy
    /// carries the attempts so far, so they survive a reset of the consumer's delivery
    /// count (a crash of the NATS server).
    pub attempts: u32,
    /// When an attempt first failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failed: Option<u64>,
    /// When an attempt last failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed: Option<u64>,
    /// Why the last retried attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it was moved to this dead-letter queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_at: Option<u64>,
    /// Why it was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_reason: Option<String>,
    /// The lane it was dead-lettered from, written ([`Lane`]'s `Display`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Its deliveries in the source queue before it was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_attempts: Option<u32>,
}

impl Meta {
    /// The record of a message just published at `now`.
    pub fn published(id: &str, content_type: ContentType, now: u64) -> Meta {
        Meta {
            id: id.to_owned(),
            content_type: content_type.as_str().to_owned(),
            published: now,
            enqueued: now,
            ..Meta::default()
        }
    }

    /// The content type, bytes if unknown.
    pub fn content_type(&self) -> ContentType {
        ContentType::parse(&self.content_type).unwrap_or(ContentType::Bytes)
    }

    /// Reads the record from `headers`; `None` if it is missing or malformed.
    pub fn read(headers: Option<&HeaderMap>) -> Option<Meta> {
        let value = headers?.get(META_HEADER)?;
        serde_json::from_str(value.as_str()).ok()
    }

    /// The record as a header value: JSON with every non-ASCII character escaped, so
    /// that any error text fits a NATS header.
    pub fn header_value(&self) -> String {
        let json = serde_json::to_string(self).expect("a record serializes");
        let mut ascii = String::with_capacity(json.len());
        for c in json.chars() {
            if c.is_ascii() {
                ascii.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    ascii.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
        ascii
    }

    /// The same message failed at `now` with `error` (if it said why): the failure
    /// record updated.
    pub fn failed(mut self, now: u64, error: Option<&str>) -> Meta {
        self.first_failed.get_or_insert(now);
        self.last_failed = Some(now);
        if let Some(error) = error {
            self.last_error = Some(error.to_owned());
        }
        self
    }

    /// The message as an operator sees it, held by `lane` in `state`.
    pub fn stored(self, lane: &Lane, state: MessageState, body: Vec<u8>) -> StoredMessage {
        let content_type = self.content_type();
        let source: Option<Lane> = self.source.as_deref().and_then(|s| s.parse().ok());
        StoredMessage {
            id: self.id,
            consumer: lane.consumer.clone(),
            state,
            attempts: self.attempts,
            published_ms: self.published,
            first_failed_ms: self.first_failed,
            last_failed_ms: self.last_failed,
            last_error: self.last_error,
            dead_lettered_ms: self.dead_at,
            dead_reason: self.dead_reason,
            source_queue: source.as_ref().map(|s| s.queue.clone()),
            source_consumer: source.map(|s| s.consumer),
            source_attempts: self.source_attempts,
            content_type,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_its_header() {
        let meta = Meta {
            last_error: Some("no\nway: é 😀 \"quoted\"".into()),
            source: Some("events#notifier".into()),
            source_attempts: Some(3),
            ..Meta::published("01ID", ContentType::Json, 42)
        };
        let value = meta.header_value();
        assert!(value.is_ascii() && !value.contains('\n'), "{value}");
        let mut headers = HeaderMap::new();
        headers.insert(META_HEADER, value.as_str());
        assert_eq!(Meta::read(Some(&headers)), Some(meta));
        assert_eq!(Meta::read(None), None);
    }
}
