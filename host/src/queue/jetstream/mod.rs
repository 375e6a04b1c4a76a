//! The NATS JetStream queue storage (`[backend] kind = "nats"`): every queue in a stream
//! of the cluster that several clawq hosts share. Storage only, as [`super::sqlite`] is:
//! fan-out, retries, dead letters and poison detection are the [`super::core`]'s
//! ([`Engine`]), applied here.
//!
//! **Layout.** One stream per queue, `clawq_<queue>`, over the subjects
//! `clawq.<queue>.>`: work-queue retention (a message is deleted once acked), file
//! storage, the cluster's replicas, `max_age` = the queue's retention (so the retention
//! sweep has nothing to do: [`Operator::expire`] deletes nothing), message schedules
//! allowed. Queue and consumer names are the config's (lowercase letters, digits and
//! dashes), valid as subject tokens and stream names, so they are used as they are.
//! - A consumer's lane is the subject `clawq.<queue>.lane.<consumer>.<id>` (one subject
//!   per message, so that an operator finds a message by id without a scan), read by one
//!   durable pull consumer named like the consumer, filtered on `clawq.<queue>.lane.<consumer>.*`
//!   and shared by every host: each message goes to one host at a time. Its ack wait is
//!   short ([`ACK_WAIT`]): the host renews it with a progress ack every
//!   [`PROGRESS_EVERY`] for each message it holds, until the message's batch lease
//!   (`wall_timeout` plus a margin) runs out. So the messages of a host that dies go to
//!   another one within [`ACK_WAIT`], and those of a batch that outlives its lease are
//!   delivered again, as with SQLite. A publish stores one copy per lane the core's
//!   fan-out picks, as the SQLite backend stores one row per lane.
//! - A delayed copy (`delay_seconds`, a retry or release with a delay) is a message
//!   schedule on `clawq.<queue>.sched.<consumer>.<id>` (`Nats-Schedule: @at <time>`,
//!   `Nats-Schedule-Target` = its lane subject): the server moves it to its lane when it
//!   is due.
//! - Each message carries the record a SQLite row keeps in its columns, in one header
//!   ([`meta`]): id, content type, times, the attempts before this copy, the failure
//!   and dead-letter records. The attempts of a delivery are the header's plus the
//!   consumer's delivery count, so they survive a crash of the server (which may reset
//!   delivery counts).
//!
//! **Data path.** A publish awaits the JetStream acks of every copy (so a 2xx means the
//! cluster has them), with `Nats-Msg-Id` = id and lane. A lease waits for the first
//! message of the lane (a long poll of [`LONG_POLL`]; none came: the core asks again),
//! then takes up to `max_size - 1` more, waiting at most `max_batch_timeout` for them:
//! the batch is due once full or `max_batch_timeout` after its first message was ready,
//! as [`super::core::readiness`] says. A lease takes one batch, whatever its plan's
//! `batches` (a host that took several would keep them from the other hosts). A
//! message already delivered `1 + max_retries` times is dead-lettered there
//! ([`super::core::poisoned`]). The storage keeps each
//! leased message's handle to settle it: an ack deletes it; a retry or release publishes
//! a copy with the attempts and failure record updated (a schedule, if delayed), then
//! acks the original; a dead letter publishes a copy to each lane of the dead-letter
//! queue with the dead-letter record, then acks. A crash between the copy and the ack
//! delivers the message twice: at least once, as promised. An outcome that comes after
//! the lease ran out is ignored (the message may be on another host by then). Acks are
//! flushed to the server before a settle returns, not confirmed one by one: an ack lost
//! on the way delivers its message again, which at-least-once allows, while confirmed
//! acks (`double_ack`, awaited together per batch) cost a third of the throughput
//! (`cargo bench --bench cluster`, 100,000 messages: 13.2–16.8k msg/s with flushed acks,
//! 9.4–10.4k with confirmed ones).
//!
//! **Not transactional.** JetStream has no multi-message transaction here: a publish of
//! several messages that fails half-way (an outage) may have stored some of them, and the
//! producer, answered 503, publishes them again: duplicates, never a loss.
//!
//! **Operator.** Counts come from each lane consumer's info (`num_pending` = backlog,
//! `num_ack_pending` = in flight) and the count of the queue's schedule subjects
//! (delayed): O(lanes + delayed), no scan of the backlog. Lists, gets, redrives and
//! purges read the stream (direct gets by subject filter and sequence); a lane message at
//! or below its consumer's delivered sequence is in flight, and passed over.
//!
//! **Outage.** While NATS is away, publishes fail (`503 storage_unavailable`) and
//! consumers retry with a backoff ([`crate::consumer`]); the connection comes back by
//! itself ([`crate::cluster`]).

pub mod meta;
mod operator;

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::side_effects::SideEffects;

use self::meta::{META_HEADER, Meta};
use super::core::{DeadLetterRoute, Engine, poisoned, warn_stale};
use super::lane::Lane;
use super::storage::{Committed, DataPath, Fate, LeasePlan, Leased, PublishRow};
use super::{Delivery, QueueError, SettleSummary};

/// How long a lease waits for the first message of its lane before the core asks again
/// (also the longest a consumer waits on a request lost in an outage, plus 5 s).
pub const LONG_POLL: Duration = Duration::from_secs(2);

/// How long a lane's consumer waits for a delivered message's ack (or progress ack)
/// before it delivers it again: how soon the messages of a host that died go to another.
pub const ACK_WAIT: Duration = Duration::from_secs(10);

/// How often a host renews the ack wait of the messages it holds (see [`ACK_WAIT`]).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// Most messages delivered and not yet settled per lane, over every host: room for many
/// full batches on each.
pub const MAX_ACK_PENDING: i64 = 20_000;

/// The JetStream storage backend.
pub struct JetStreamStorage {
    cluster: Cluster,
    retention: HashMap<String, Duration>,
    streams: tokio::sync::Mutex<HashMap<String, stream::Stream<()>>>,
    consumers: tokio::sync::Mutex<HashMap<Lane, PullConsumer>>,
    leased: Arc<Mutex<HashMap<i64, Held>>>,
    next_lease: AtomicI64,
}

/// The queue engine over JetStream: what a host of a cluster runs.
pub type JetStreamQueue = Engine<JetStreamStorage>;

impl JetStreamQueue {
    /// The queues of `cluster`: each queue's stream keeps messages for its retention
    /// (`retentions`, queue → retention). Streams and consumers are created (or brought
    /// up to date) on first use. Starts renewing the ack wait of the messages it leases,
    /// for as long as it lives (in a task of the current runtime).
    pub fn open(cluster: &Cluster, retentions: BTreeMap<String, Duration>) -> Self {
        let leased = Arc::default();
        tokio::spawn(renew(Arc::downgrade(&leased), cluster.client().clone()));
        Engine::new(JetStreamStorage {
            cluster: cluster.clone(),
            retention: retentions.into_iter().collect(),
            streams: Default::default(),
            consumers: Default::default(),
            leased,
            next_lease: AtomicI64::new(1),
        })
    }
}

/// A leased message: its handle (to ack it), its record, and when its lease runs out.
struct Held {
    message: jetstream::Message,
    meta: Meta,
    deadline: u64,
}

/// Every [`PROGRESS_EVERY`], renews the ack wait of each message of `leased` whose lease
/// still holds, and forgets the others (their outcome would be ignored: the server
/// delivers them again); stops once `leased` is gone.
async fn renew(leased: Weak<Mutex<HashMap<i64, Held>>>, client: async_nats::Client) {
    let mut ticks = tokio::time::interval(PROGRESS_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(leased) = leased.upgrade() else {
            return;
        };
        let now = now_ms();
        let held: Vec<jetstream::Message> = {
            let mut leased = leased.lock().unwrap_or_else(|p| p.into_inner());
            leased.retain(|_, held| held.deadline >= now);
            leased.values().map(|held| held.message.clone()).collect()
        };
        if held.is_empty() {
            continue;
        }
        for message in &held {
            // Lost in an outage: the message goes back to the lane, delivered again.
            let _ = message.ack_with(AckKind::Progress).await;
        }
        let _ = client.flush().await;
    }
}

/// A failure of the cluster, as the host reports it (`503` on the API).
fn storage(err: impl std::fmt::Display) -> QueueError {
    QueueError::Storage(format!("NATS JetStream: {err}"))
}

/// The stream of `queue`.
fn stream_name(queue: &str) -> String {
    format!("clawq_{queue}")
}

/// Where the message `id` waits in `lane` once it is ready.
fn lane_subject(lane: &Lane, id: &str) -> String {
    format!("clawq.{}.lane.{}.{id}", lane.queue, lane.consumer)
}

/// Where the message `id` of `lane` waits while it is delayed.
fn schedule_subject(lane: &Lane, id: &str) -> String {
    format!("clawq.{}.sched.{}.{id}", lane.queue, lane.consumer)
}

/// Where a message stands in its stream, read from its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Located {
    lane: Lane,
    delayed: bool,
}

/// Reads a subject written by [`lane_subject`] or [`schedule_subject`].
fn locate(subject: &str) -> Option<Located> {
    let mut tokens = subject.split('.');
    let (Some("clawq"), Some(queue), Some(kind), Some(consumer), Some(_id), None) = (
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
    ) else {
        return None;
    };
    let delayed = match kind {
        "lane" => false,
        "sched" => true,
        _ => return None,
    };
    Some(Located {
        lane: Lane::new(queue, consumer),
        delayed,
    })
}

/// Whether `name` can stand in a subject as one token (an id or a consumer name given by
/// an operator): no wildcard, no separator.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `ms` (since the Unix epoch) as RFC 3339, for a schedule.
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A copy of a message to store: in `lane`, ready at `visible_ms`.
struct Copy {
    lane: Lane,
    meta: Meta,
    body: Bytes,
    visible_ms: u64,
}

impl JetStreamStorage {
    /// The stream of `queue`, created or brought up to date on first use.
    async fn stream(&self, queue: &str) -> Result<stream::Stream<()>, QueueError> {
        let mut streams = self.streams.lock().await;
        if let Some(stream) = streams.get(queue) {
            return Ok(stream.clone());
        }
        let max_age = self.retention.get(queue).copied().unwrap_or_default();
        let mut config = stream::Config {
            name: stream_name(queue),
            subjects: vec![format!("clawq.{queue}.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: self.cluster.replicas(),
            max_age,
            allow_message_schedules: true,
            allow_direct: true,
            ..Default::default()
        };
        if !max_age.is_zero() {
            // The dedupe window may not outlast the messages.
            config.duplicate_window = max_age.min(Duration::from_secs(120));
        }
        let js = self.cluster.jetstream();
        js.create_or_update_stream(config).await.map_err(storage)?;
        let stream = js
            .get_stream_no_info(stream_name(queue))
            .await
            .map_err(storage)?;
        streams.insert(queue.to_owned(), stream.clone());
        Ok(stream)
    }

    /// The durable consumer of `lane`, created or brought up to date on first use.
    async fn consumer(&self, lane: &Lane) -> Result<PullConsumer, QueueError> {
        let mut consumers = self.consumers.lock().await;
        if let Some(consumer) = consumers.get(lane) {
            return Ok(consumer.clone());
        }
        let stream = self.stream(&lane.queue).await?;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(lane.consumer.clone()),
                filter_subject: format!("clawq.{}.lane.{}.*", lane.queue, lane.consumer),
                ack_policy: AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                ..Default::default()
            })
            .await
            .map_err(storage)?;
        consumers.insert(lane.clone(), consumer.clone());
        Ok(consumer)
    }

    /// Publishes `copy` (the first publish of a message with `dedupe`: its id and lane
    /// are its `Nats-Msg-Id`); the future resolves once the cluster has it.
    async fn send(
        &self,
        copy: Copy,
        now: u64,
        dedupe: bool,
    ) -> Result<PublishAckFuture, QueueError> {
        // The lane's consumer counts the lane's messages, consumed here or not.
        self.consumer(&copy.lane).await?;
        let mut headers = HeaderMap::new();
        headers.insert(META_HEADER, copy.meta.header_value().as_str());
        let ready = lane_subject(&copy.lane, &copy.meta.id);
        let subject = if copy.visible_ms > now {
            headers.insert(
                "Nats-Schedule",
                format!("@at {}", rfc3339(copy.visible_ms)).as_str(),
            );
            headers.insert("Nats-Schedule-Target", ready.as_str());
            schedule_subject(&copy.lane, &copy.meta.id)
        } else {
            if dedupe {
                headers.insert(
                    "Nats-Msg-Id",
                    format!("{}.{}", copy.meta.id, copy.lane).as_str(),
                );
            }
            ready
        };
        self.cluster
            .jetstream()
            .publish_with_headers(subject, headers, copy.body)
            .await
            .map_err(storage)
    }

    /// Publishes every copy of `copies`, and returns once the cluster has them all.
    async fn store(&self, copies: Vec<Copy>, now: u64, dedupe: bool) -> Result<(), QueueError> {
        let mut acks = Vec::with_capacity(copies.len());
        for copy in copies {
            acks.push(self.send(copy, now, dedupe).await?.into_future());
        }
        futures_util::future::try_join_all(acks)
            .await
            .map_err(storage)?;
        Ok(())
    }

    /// Takes up to `max` messages of `consumer`: those there now (`wait` = `None`), or
    /// waiting up to `wait` for them to come. A failure after some came keeps those.
    async fn take(
        consumer: &PullConsumer,
        max: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<jetstream::Message>, QueueError> {
        let mut batch = match wait {
            Some(wait) => {
                consumer
                    .batch()
                    .max_messages(max)
                    .expires(wait.max(Duration::from_millis(1)))
                    .messages()
                    .await
            }
            None => consumer.fetch().max_messages(max).messages().await,
        }
        .map_err(storage)?;
        let mut messages = Vec::new();
        while let Some(message) = batch.next().await {
            match message {
                Ok(message) => messages.push(message),
                Err(err) if messages.is_empty() => return Err(storage(err)),
                Err(err) => {
                    tracing::warn!(error = %err, "taking a batch stopped early");
                    break;
                }
            }
        }
        Ok(messages)
    }

    /// The record of `message`; one made up from its subject if it has none (a message
    /// not published by clawq).
    fn meta_of(message: &jetstream::Message, now: u64) -> Meta {
        if let Some(meta) = Meta::read(message.headers.as_ref()) {
            return meta;
        }
        let id = message.subject.rsplit('.').next().unwrap_or_default();
        tracing::warn!(subject = %message.subject, "message without a clawq record: read as bytes");
        Meta::published(id, super::ContentType::Bytes, now)
    }

    /// The copies of a message given up on in `lane` (delivered `attempts` times, the
    /// last one failing with `error` if it said why): one per lane of the dead-letter
    /// queue that takes it, with the dead-letter record; none when it is dropped.
    #[allow(clippy::too_many_arguments)]
    fn dead_letters(
        lane: &Lane,
        meta: Meta,
        body: &Bytes,
        attempts: u32,
        reason: &str,
        error: Option<&str>,
        route: &DeadLetterRoute,
        now: u64,
    ) -> Vec<Copy> {
        let lanes = route.lanes(meta.content_type(), body);
        route.log(lane, &meta.id, reason, lanes.is_empty());
        let meta = Meta {
            attempts: 0,
            enqueued: now,
            dead_at: Some(now),
            dead_reason: Some(reason.to_owned()),
            source: Some(lane.to_string()),
            source_attempts: Some(attempts),
            ..meta.failed(now, error)
        };
        lanes
            .into_iter()
            .map(|lane| Copy {
                lane,
                meta: meta.clone(),
                body: body.clone(),
                visible_ms: now,
            })
            .collect()
    }

    /// Acks every message of `done` (each already stored elsewhere, or meant to be
    /// deleted) and flushes the acks to the server. An ack that cannot be sent is logged:
    /// its message comes back once its ack wait runs out (a duplicate, not a loss).
    async fn ack(&self, done: Vec<jetstream::Message>) {
        if done.is_empty() {
            return;
        }
        for message in &done {
            if let Err(err) = message.ack().await {
                tracing::warn!(subject = %message.subject, error = %err,
                    "ack not sent: the message will be delivered again");
            }
        }
        if let Err(err) = self.cluster.client().flush().await {
            tracing::warn!(error = %err, "acks not flushed: their messages may be delivered again");
        }
    }
}

#[async_trait]
impl DataPath for JetStreamStorage {
    async fn insert(&self, rows: Vec<PublishRow>, now: u64) -> Result<(), QueueError> {
        let mut copies = Vec::new();
        for row in rows {
            let meta = Meta::published(&row.id, row.message.content_type, now);
            let body = Bytes::from(row.message.body);
            let visible_ms = now + u64::from(row.message.delay_seconds) * 1000;
            for lane in row.lanes {
                copies.push(Copy {
                    lane,
                    meta: meta.clone(),
                    body: body.clone(),
                    visible_ms,
                });
            }
        }
        self.store(copies, now, true).await
    }

    async fn lease(&self, lane: &Lane, plan: LeasePlan) -> Result<Leased, QueueError> {
        let consumer = self.consumer(lane).await?;
        let mut messages = Self::take(&consumer, 1, Some(LONG_POLL)).await?;
        if messages.is_empty() {
            return Ok(Leased::Wait(Some(plan.now)));
        }
        if plan.max_size > 1 {
            let wait = (plan.timeout_ms > 0).then(|| Duration::from_millis(plan.timeout_ms));
            match Self::take(&consumer, plan.max_size - 1, wait).await {
                Ok(more) => messages.extend(more),
                Err(err) => tracing::warn!(lane = %lane, error = %err,
                    "filling a batch failed: it goes out with its first message"),
            }
        }
        let now = now_ms();
        let (mut deliveries, mut gave_up, mut woken) =
            (Vec::new(), SettleSummary::default(), vec![]);
        let (mut doomed, mut done) = (Vec::new(), Vec::new());
        for message in messages {
            let meta = Self::meta_of(&message, now);
            let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
            let before = u32::try_from(delivered.saturating_sub(1))
                .unwrap_or(u32::MAX)
                .saturating_add(meta.attempts);
            if let Some(reason) = poisoned(before, &plan.policy) {
                let body = message.payload.clone();
                let copies = Self::dead_letters(
                    lane,
                    meta,
                    &body,
                    before,
                    &reason,
                    None,
                    &plan.dead_letters,
                    now,
                );
                if copies.is_empty() {
                    gave_up.dropped += 1;
                } else {
                    gave_up.dead_lettered += 1;
                    woken.extend(copies.iter().map(|c| c.lane.clone()));
                }
                doomed.extend(copies);
                done.push(message);
                continue;
            }
            let lease = self.next_lease.fetch_add(1, Ordering::Relaxed);
            deliveries.push(Delivery {
                lease,
                id: meta.id.clone(),
                attempts: before.saturating_add(1),
                timestamp_ms: meta.published,
                enqueued_ms: meta.enqueued,
                content_type: meta.content_type(),
                body: message.payload.to_vec(),
                lease_deadline_ms: plan.deadline,
            });
            let mut leased = self.leased.lock().unwrap_or_else(|p| p.into_inner());
            let deadline = plan.deadline;
            leased.insert(
                lease,
                Held {
                    message,
                    meta,
                    deadline,
                },
            );
        }
        if !done.is_empty() {
            // Dead-lettered before acked: a failure leaves them to be delivered again
            // (and given up on again), and the batch goes out.
            match self.store(doomed, now, false).await {
                Ok(()) => self.ack(done).await,
                Err(err) => {
                    tracing::warn!(lane = %lane, error = %err,
                        "dead-lettering failed: those messages come back after their ack wait");
                    (gave_up, woken) = (SettleSummary::default(), Vec::new());
                }
            }
        }
        Ok(Leased::Batch {
            deliveries,
            gave_up,
            woken,
        })
    }

    async fn commit(
        &self,
        lane: &Lane,
        fates: Vec<(Delivery, Fate)>,
        dead_letters: DeadLetterRoute,
        now: u64,
        effects: SideEffects,
    ) -> Result<Committed, QueueError> {
        effects.commit().await.map_err(QueueError::SideEffects)?;
        let taken: Vec<(Delivery, Fate, Option<Held>)> = {
            let mut leased = self.leased.lock().unwrap_or_else(|p| p.into_inner());
            fates
                .into_iter()
                .map(|(delivery, fate)| {
                    let held = leased.remove(&delivery.lease);
                    (delivery, fate, held)
                })
                .collect()
        };
        let mut committed = Committed::default();
        let summary = &mut committed.summary;
        let (mut copies, mut settled) = (Vec::new(), Vec::new());
        for (delivery, fate, held) in taken {
            let Some(held) = held.filter(|_| now <= delivery.lease_deadline_ms) else {
                // The lease ran out: the message may be on another host by now.
                warn_stale(lane, &delivery.id);
                summary.stale += 1;
                continue;
            };
            let body = held.message.payload.clone();
            match fate {
                Fate::Delete => summary.acked += 1,
                Fate::Retry { visible_ms, error } => {
                    summary.retried += 1;
                    let meta = Meta {
                        attempts: delivery.attempts,
                        ..held.meta.clone()
                    };
                    copies.push(Copy {
                        lane: lane.clone(),
                        meta: meta.failed(now, Some(&error)),
                        body,
                        visible_ms,
                    });
                }
                Fate::Release { visible_ms } => {
                    summary.released += 1;
                    copies.push(Copy {
                        lane: lane.clone(),
                        meta: Meta {
                            attempts: delivery.attempts.saturating_sub(1),
                            ..held.meta.clone()
                        },
                        body,
                        visible_ms,
                    });
                }
                Fate::DeadLetter { reason, error } => {
                    let dead = Self::dead_letters(
                        lane,
                        held.meta.clone(),
                        &body,
                        delivery.attempts,
                        &reason,
                        error.as_deref(),
                        &dead_letters,
                        now,
                    );
                    if dead.is_empty() {
                        summary.dropped += 1;
                    } else {
                        summary.dead_lettered += 1;
                        committed.woken.extend(dead.iter().map(|c| c.lane.clone()));
                    }
                    copies.extend(dead);
                }
            }
            settled.push((delivery.lease, held));
        }
        if let Err(err) = self.store(copies, now, false).await {
            // Nothing acked: the same outcomes can be committed again.
            let mut leased = self.leased.lock().unwrap_or_else(|p| p.into_inner());
            leased.extend(settled);
            return Err(err);
        }
        self.ack(settled.into_iter().map(|(_, held)| held.message).collect())
            .await;
        Ok(committed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_say_where_a_message_stands() {
        let lane = Lane::new("events", "notifier");
        assert_eq!(lane_subject(&lane, "01X"), "clawq.events.lane.notifier.01X");
        assert_eq!(
            locate(&lane_subject(&lane, "01X")),
            Some(Located {
                lane: lane.clone(),
                delayed: false
            })
        );
        assert_eq!(
            locate(&schedule_subject(&lane, "01X")),
            Some(Located {
                lane,
                delayed: true
            })
        );
        assert_eq!(locate("clawq.events.other.x.01X"), None);
        assert_eq!(locate("clawq.events.lane.x"), None);
        assert!(is_token("01ARZ3NDEKTSV4RRFFQ69G5FAV") && is_token("notifier"));
        assert!(!is_token("a.b") && !is_token("*") && !is_token(">") && !is_token(""));
        assert_eq!(rfc3339(1_000), "1970-01-01T00:00:01.000Z");
    }
}
