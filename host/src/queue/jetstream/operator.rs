//! The operator's work over JetStream: counts from the lane consumers' info, and lists,
//! gets, redrives and purges that read the queue's stream (see the parent module).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use async_trait::async_trait;
use futures_util::StreamExt;

use super::meta::Meta;
use super::{Copy, JetStreamStorage, is_token, locate, storage};
use crate::queue::lane::Lane;
use crate::queue::routes::Routes;
use crate::queue::storage::Operator;
use crate::queue::{
    MessagePage, MessageState, QueueCounts, QueueError, RedriveSummary, RedriveTarget, Selection,
    StoredMessage,
};

/// A message of a queue's stream, with where it stands.
struct Found {
    message: StreamMessage,
    lane: Lane,
    state: MessageState,
}

impl Found {
    /// Its record.
    fn meta(&self, now: u64) -> Meta {
        Meta::read(Some(&self.message.headers)).unwrap_or_else(|| {
            let id = self.message.subject.rsplit('.').next().unwrap_or_default();
            Meta::published(id, crate::queue::ContentType::Bytes, now)
        })
    }

    /// As an operator sees it.
    fn stored(self, now: u64) -> StoredMessage {
        let meta = self.meta(now);
        meta.stored(&self.lane, self.state, self.message.payload.to_vec())
    }
}

/// The subject filters that pick the messages of `selection` in `queue`.
fn filters(queue: &str, selection: &Selection) -> Vec<String> {
    match selection {
        Selection::All => vec![format!("clawq.{queue}.>")],
        Selection::Ids(ids) => ids
            .iter()
            .filter(|id| is_token(id))
            .map(|id| format!("clawq.{queue}.*.*.{id}"))
            .collect(),
        Selection::Consumer(consumer) if is_token(consumer) => {
            vec![format!("clawq.{queue}.*.{consumer}.*")]
        }
        Selection::Consumer(_) => Vec::new(),
    }
}

impl JetStreamStorage {
    /// How far the consumer of each lane got: the stream sequence of its last delivery.
    /// A lane message at or below it is still there only because it is not settled yet.
    async fn delivered(
        &self,
        stream: &stream::Stream<()>,
        lane: &Lane,
        seen: &mut HashMap<Lane, u64>,
    ) -> Result<u64, QueueError> {
        if let Some(&seq) = seen.get(lane) {
            return Ok(seq);
        }
        let seq = match stream.consumer_info(&lane.consumer).await {
            Ok(info) => info.delivered.stream_sequence,
            Err(err)
                if err.kind()
                    == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound =>
            {
                0
            }
            Err(err) => return Err(storage(err)),
        };
        seen.insert(lane.clone(), seq);
        Ok(seq)
    }

    /// Up to `limit` messages of `stream` on `filter` after the sequence `after`, in
    /// stream order, with where each stands.
    async fn walk(
        &self,
        stream: &stream::Stream<()>,
        filter: &str,
        after: u64,
        limit: usize,
        seen: &mut HashMap<Lane, u64>,
    ) -> Result<Vec<Found>, QueueError> {
        let (mut found, mut seq) = (Vec::new(), after + 1);
        while found.len() < limit {
            let message = match stream
                .direct_get_builder()
                .next_by_subject(filter.to_owned())
                .sequence(seq)
                .send()
                .await
            {
                Ok(message) => message,
                Err(err) if err.kind() == DirectGetErrorKind::NotFound => break,
                Err(err) => return Err(storage(err)),
            };
            seq = message.sequence + 1;
            let Some(located) = locate(&message.subject) else {
                continue;
            };
            let state = if located.delayed {
                MessageState::Delayed
            } else if message.sequence <= self.delivered(stream, &located.lane, seen).await? {
                MessageState::InFlight
            } else {
                MessageState::Ready
            };
            found.push(Found {
                message,
                lane: located.lane,
                state,
            });
        }
        Ok(found)
    }

    /// Every message of `queue` that `selection` picks and that is not in flight.
    async fn selected(&self, queue: &str, selection: &Selection) -> Result<Vec<Found>, QueueError> {
        let stream = self.stream(queue).await?;
        let mut seen = HashMap::new();
        let mut found = Vec::new();
        for filter in filters(queue, selection) {
            let all = self
                .walk(&stream, &filter, 0, usize::MAX, &mut seen)
                .await?;
            found.extend(
                all.into_iter()
                    .filter(|f| f.state != MessageState::InFlight),
            );
        }
        Ok(found)
    }

    /// Deletes `found` from the stream of `queue` (a delayed one: its schedule is
    /// cancelled); whether it was still there.
    async fn delete(&self, queue: &str, found: &Found) -> Result<bool, QueueError> {
        let stream = self.stream(queue).await?;
        match stream.delete_message(found.message.sequence).await {
            Ok(deleted) => Ok(deleted),
            Err(err) => {
                // Gone already: acked, fired or expired meanwhile.
                tracing::debug!(queue, seq = found.message.sequence, error = %err, "not deleted");
                Ok(false)
            }
        }
    }
}

#[async_trait]
impl Operator for JetStreamStorage {
    async fn lanes(&self, queue: &str, _now: u64) -> Result<Vec<(Lane, QueueCounts)>, QueueError> {
        let stream = self.stream(queue).await?;
        let mut delayed: BTreeMap<String, u64> = BTreeMap::new();
        let mut schedules = stream
            .info_with_subjects(format!("clawq.{queue}.sched.>"))
            .await
            .map_err(storage)?;
        while let Some(subject) = schedules.next().await {
            let (subject, count) = subject.map_err(storage)?;
            if let Some(located) = locate(&subject) {
                *delayed.entry(located.lane.consumer).or_default() += count as u64;
            }
        }
        let mut lanes = Vec::new();
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(storage)?;
            let counts = QueueCounts {
                backlog: info.num_pending,
                in_flight: info.num_ack_pending as u64,
                delayed: delayed.remove(&info.name).unwrap_or(0),
                oldest_ready_ms: None,
            };
            if counts.held() > 0 {
                lanes.push((Lane::new(queue, &info.name), counts));
            }
        }
        for (consumer, delayed) in delayed {
            let counts = QueueCounts {
                delayed,
                ..QueueCounts::default()
            };
            lanes.push((Lane::new(queue, &consumer), counts));
        }
        lanes.sort_by_key(|(lane, _)| lane.to_string());
        Ok(lanes)
    }

    async fn list(
        &self,
        queue: &str,
        after: Option<u64>,
        limit: usize,
        now: u64,
    ) -> Result<MessagePage, QueueError> {
        let stream = self.stream(queue).await?;
        let filter = format!("clawq.{queue}.>");
        let after = after.unwrap_or(0);
        let mut found = self
            .walk(&stream, &filter, after, limit + 1, &mut HashMap::new())
            .await?;
        let next = (found.len() > limit).then(|| {
            found.truncate(limit);
            found.last().map_or(after, |f| f.message.sequence)
        });
        Ok(MessagePage {
            messages: found.into_iter().map(|f| f.stored(now)).collect(),
            next,
        })
    }

    async fn get(
        &self,
        queue: &str,
        id: &str,
        now: u64,
    ) -> Result<Option<StoredMessage>, QueueError> {
        if !is_token(id) {
            return Ok(None);
        }
        let stream = self.stream(queue).await?;
        let filter = format!("clawq.{queue}.*.*.{id}");
        let found = self
            .walk(&stream, &filter, 0, 1, &mut HashMap::new())
            .await?;
        Ok(found.into_iter().next().map(|f| f.stored(now)))
    }

    async fn redrive(
        &self,
        queue: &str,
        selection: &Selection,
        target: &RedriveTarget,
        routes: Arc<Routes>,
        now: u64,
    ) -> Result<(RedriveSummary, Vec<Lane>), QueueError> {
        let (mut summary, mut woken) = (RedriveSummary::default(), Vec::new());
        for found in self.selected(queue, selection).await? {
            let meta = found.meta(now);
            let lanes: Vec<Lane> = match target {
                RedriveTarget::Source { known } => meta
                    .source
                    .as_deref()
                    .and_then(|written| written.parse::<Lane>().ok())
                    .filter(|lane| known.contains(lane))
                    .into_iter()
                    .collect(),
                RedriveTarget::Queue(to) => {
                    routes.lanes(to, meta.content_type(), &found.message.payload)
                }
            };
            if lanes.is_empty() {
                summary.skipped += 1;
                continue;
            }
            // Started over: its publish time kept, every record reset.
            let fresh = Meta {
                published: meta.published,
                ..Meta::published(&meta.id, meta.content_type(), now)
            };
            let copies = lanes
                .iter()
                .map(|lane| Copy {
                    lane: lane.clone(),
                    meta: fresh.clone(),
                    body: found.message.payload.clone(),
                    visible_ms: now,
                })
                .collect();
            // Stored in its new lanes before it leaves this one: a failure in between
            // leaves a duplicate, never a loss.
            self.store(copies, now, false).await?;
            self.delete(queue, &found).await?;
            summary.redriven += 1;
            woken.extend(lanes);
        }
        Ok((summary, woken))
    }

    async fn purge(
        &self,
        queue: &str,
        selection: &Selection,
        _now: u64,
    ) -> Result<u64, QueueError> {
        let mut purged = 0;
        for found in self.selected(queue, selection).await? {
            if self.delete(queue, &found).await? {
                purged += 1;
            }
        }
        Ok(purged)
    }

    async fn expire(
        &self,
        _queue: &str,
        _cutoff_ms: u64,
        _now: u64,
        _limit: u64,
    ) -> Result<u64, QueueError> {
        // The stream's `max_age` is the queue's retention: the server expires messages.
        Ok(0)
    }
}
