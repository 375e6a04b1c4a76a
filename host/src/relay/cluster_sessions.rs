//! Relay sessions kept in the NATS JetStream cluster (`[backend] kind = "nats"`), so that
//! a receipt handled on host A reaches its agent's connector on host C, and a connector
//! that reconnects to any host gets what it has not acked.
//!
//! # Where the rows live
//!
//! One stream, [`STREAM`], file storage, the cluster's replicas. A session's row is a
//! message on the subject `clawq.session.<agent key>.<kind>` ([`subject`]: the agent's
//! DID in hex, which is a valid subject token, and `receipt` or `deliver`); its payload is
//! the frame to send, fixed when it is recorded (its id and `ts` do not change when it is
//! pushed again), as in the SQLite sessions. The stream keeps at most
//! [`SessionLimits::max_per_agent`] messages per subject, dropping the oldest (the
//! SQLite cap: per agent and kind, oldest first), and each for [`SessionLimits::ttl`]
//! (`max_age`). Two durable consumers filtered to each kind's rows and never pulled
//! count them ([`ClusterSessions::pending`]: one request, whatever the number of agents).
//!
//! - **Recording** (any host): the frame is published to the agent's subject and the
//!   JetStream ack is awaited, so the row is in the cluster before the capability
//!   returns (the SQLite session commits before it returns). The publish carries a
//!   `Nats-Msg-Id` derived from what identifies the row (agent, kind, key, and for a
//!   receipt its status and reason), and the stream's duplicate window is the TTL: the
//!   same receipt or delivery key recorded again while its row lives, acked or not, is
//!   [`Delivery::Unchanged`], as in SQLite.
//! - **Pushing**: the host where the agent's connector is connected runs an ordered
//!   consumer on the agent's subjects for as long as the connection lives (its *feed*,
//!   started by the connect push) and hands each row to the connection through the hub
//!   in stream order. Unacked rows are pushed again on the SQLite retry schedule
//!   ([`crate::relay::sessions::Retry`]) while the connection stays, and dropped (deleted
//!   from the stream, counted as `attempts`) after the last attempt.
//! - **Acking**: a `receipt_ack` / `deliver_ack` deletes the row's message by sequence,
//!   cluster-wide; a refusing `deliver_ack` deletes it too and counts it `rejected`.
//! - **Reconnecting** to any host starts a feed from the first remaining row: every
//!   unacked row is pushed again, in order.
//! - **One connection per agent across the cluster**: a connect push announces the
//!   connection on the core subject `clawq.relay.connected.<agent key>`, which every host
//!   subscribes to. NATS hands the announcements of one subject to every subscriber in
//!   the same order, so a host closes its own connection of that agent (1000
//!   `superseded_by_new_connection`, as a newer connection on the same host does) when
//!   another connection's announcement comes after its own.
//!
//! # What differs from the SQLite sessions
//!
//! - Guarantee: every row reaches the connection in stream order (the order the
//!   cluster recorded them), at least once: a row whose ack was lost, or that was pushed
//!   on a connection that then ended, is pushed again on the next connect (as in SQLite);
//!   a connector dedups by frame id. Two hosts recording for one agent at once are
//!   ordered by the stream.
//! - A receipt whose status changed is a new row (a new frame) beside the old one
//!   rather than replacing it; a request id reused for another recipient is not
//!   detected ([`Delivery::Ignored`] is never answered). Dedup lasts the duplicate
//!   window, which is the TTL.
//! - Recording answers [`Delivery::Stored`]: the host that records does not know
//!   whether another host pushes it.
//! - The cap: SQLite keeps an acked row until its TTL (for dedup) and counts it toward
//!   the cap; the stream deletes a row when it is acked (dedup is the message id's), so
//!   its cap counts unacked rows only and keeps more of them. Both drop the oldest.
//! - The retry attempts of a row are counted per connection: a reconnect starts them
//!   again. Rows dropped by the cap or the TTL are dropped by the server and are not
//!   counted; there is no sweep (the server expires rows) and no actor
//!   (`resident_actors` counts the feeds of this host).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::pull::{self, OrderedConfig};
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use clawq_protocol::receipt::check_receipt;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::hub::{ConnectionHub, SUPERSEDED};
use super::sessions::{
    Delivery, DeliveryIn, DropReason, Kind, Push, ReceiptIn, SessionError, SessionLimits,
    delivery_frame,
};
use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::frame::{Frame, FrameBody};

/// The stream that holds every relay session's rows.
pub const STREAM: &str = "clawq_sessions";
/// The subjects of the rows: `clawq.session.<agent key>.<kind>`.
const SUBJECT_PREFIX: &str = "clawq.session";
/// The subjects on which hosts announce a new connection of an agent.
const CONNECTED_PREFIX: &str = "clawq.relay.connected";

/// An agent DID as a subject token: its bytes in hex.
fn agent_key(did: &str) -> String {
    did.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The agent DID a subject token names, if it is one.
fn agent_of(key: &str) -> Option<String> {
    let bytes = (0..key.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(key.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// The subject of the `kind` rows of `did`.
pub fn subject(did: &str, kind: Kind) -> String {
    format!("{SUBJECT_PREFIX}.{}.{}", agent_key(did), kind.as_str())
}

/// A row a connection was pushed and has not acked. Its frame is read again from the
/// stream when it is due, so a connection's unacked frames (up to 1 MiB each) are not
/// held in memory.
struct Unacked {
    kind: Kind,
    frame_id: String,
    attempts: u32,
    next_ms: u64,
    expires_ms: u64,
}

/// What the feed of one connection tracks: the rows pushed and not acked, by stream
/// sequence (so in stream order).
#[derive(Default)]
struct FeedState {
    unacked: BTreeMap<u64, Unacked>,
}

impl FeedState {
    /// The stream sequence of the `kind` frame `frame_id`, forgotten.
    fn take(&mut self, kind: Kind, frame_id: &str) -> Option<u64> {
        let seq = self
            .unacked
            .iter()
            .find(|(_, u)| u.kind == kind && u.frame_id == frame_id)
            .map(|(seq, _)| *seq)?;
        self.unacked.remove(&seq);
        Some(seq)
    }

    /// When the next unacked row is due.
    fn next_at_ms(&self) -> Option<u64> {
        self.unacked.values().map(|u| u.next_ms).min()
    }
}

/// The feed of the connection of an agent on this host.
struct Feed {
    /// The hub's id of the connection it feeds.
    connection: u64,
    /// Whether this host has seen the connection's own announcement come back.
    announced: bool,
    state: Arc<Mutex<FeedState>>,
    task: tokio::task::AbortHandle,
}

/// Every relay session, kept in the cluster (see the module documentation).
#[derive(Clone)]
pub struct ClusterSessions {
    inner: Arc<Inner>,
}

struct Inner {
    cluster: Cluster,
    stream: OnceCell<stream::Stream>,
    /// Set once this host listens to the connection announcements.
    listening: OnceCell<()>,
    hub: Arc<ConnectionHub>,
    limits: SessionLimits,
    /// This host, in the connection announcements.
    host: String,
    feeds: Mutex<HashMap<String, Feed>>,
    /// Rows dropped unacked since start, by kind and reason.
    dropped: [[AtomicU64; 4]; 2],
}

fn unavailable(what: &str, err: impl std::fmt::Display) -> SessionError {
    SessionError::Unavailable(format!("{what}: {err}"))
}

impl ClusterSessions {
    /// Sessions in `cluster`, pushing to the connections of `hub`, within `limits`. The
    /// stream is created (or its limits updated) on first use, and the host listens to
    /// the connection announcements from its first connection on.
    pub fn open(cluster: &Cluster, hub: Arc<ConnectionHub>, limits: SessionLimits) -> Self {
        let inner = Arc::new(Inner {
            cluster: cluster.clone(),
            stream: OnceCell::new(),
            listening: OnceCell::new(),
            hub,
            limits,
            host: ulid::Ulid::new().to_string(),
            feeds: Mutex::default(),
            dropped: Default::default(),
        });
        ClusterSessions { inner }
    }

    /// The limits the sessions keep to.
    pub fn limits(&self) -> SessionLimits {
        self.inner.limits
    }

    /// Records `receipt` in its sender's session; returns once the cluster has it.
    pub async fn deliver_receipt(&self, receipt: ReceiptIn) -> Result<Delivery, SessionError> {
        check_receipt(
            &receipt.request_id,
            &receipt.sender_agent_did,
            &receipt.recipient_agent_did,
        )
        .map_err(|why| SessionError::Invalid(format!("receipt: {why}")))?;
        let identity = [
            receipt.sender_agent_did.as_str(),
            Kind::Receipt.as_str(),
            &receipt.request_id,
            &receipt.recipient_agent_did,
            receipt.status.as_str(),
            receipt.reason.as_deref().unwrap_or(""),
        ];
        let frame = Frame::new(FrameBody::Receipt {
            original_frame_id: receipt.request_id.clone(),
            to_agent_did: receipt.recipient_agent_did.clone(),
            status: receipt.status,
            reason: receipt.reason.clone(),
        });
        let subject = subject(&receipt.sender_agent_did, Kind::Receipt);
        self.inner.record(subject, &identity, &frame).await
    }

    /// Records `delivery` in the session of its `to_agent_did`, unless the session holds
    /// its dedup key already; returns once the cluster has it. Refused like
    /// [`crate::relay::sessions::RelaySessions::deliver`].
    pub async fn deliver(&self, delivery: DeliveryIn) -> Result<Delivery, SessionError> {
        let frame = delivery_frame(&delivery)?;
        let identity = [
            delivery.to_agent_did.as_str(),
            Kind::Deliver.as_str(),
            &delivery.dedup_key,
        ];
        let subject = subject(&delivery.to_agent_did, Kind::Deliver);
        self.inner.record(subject, &identity, &frame).await
    }

    /// For the connection of `did`: on connect, starts its feed (every row of the
    /// session, then new ones as they are recorded) and announces it to the other hosts;
    /// when its retry is due, pushes the unacked rows due again. Returns what it pushed
    /// now (the feed pushes the rows themselves) and when to ask again.
    pub async fn push(&self, did: &str, ask: super::sessions::Ask) -> Result<Push, SessionError> {
        match ask {
            super::sessions::Ask::Connected => self.inner.start_feed(did).await,
            super::sessions::Ask::Due => Ok(self.inner.push_due(did).await),
        }
    }

    /// Stops the feed of connection `connection` of `did`, which ended.
    pub fn disconnected(&self, did: &str, connection: u64) {
        self.inner.stop_feed(did, connection);
    }

    /// Deletes the `kind` row `frame_id` of `did` from the cluster (its connector acked
    /// it); with `rejected`, counts it dropped. False when this host's connection of
    /// `did` was not pushed such a frame.
    pub async fn settle(
        &self,
        did: &str,
        kind: Kind,
        frame_id: &str,
        rejected: Option<String>,
    ) -> Result<bool, SessionError> {
        let state = self.inner.lock_feeds().get(did).map(|f| f.state.clone());
        let Some(seq) = state.and_then(|s| lock(&s).take(kind, frame_id)) else {
            return Ok(false);
        };
        self.inner.delete(seq).await?;
        if let Some(why) = rejected {
            self.inner
                .count_drop(did, kind, frame_id, DropReason::Rejected, &why);
        }
        Ok(true)
    }

    /// Feeds (connections served from the cluster) on this host.
    pub fn resident_actors(&self) -> usize {
        self.inner.lock_feeds().len()
    }

    /// Rows of `kind` this host dropped unacked since start, for any reason.
    pub fn dropped_total(&self, kind: Kind) -> u64 {
        self.inner.dropped[kind as usize]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Rows of `kind` in the cluster (acked rows are deleted, so these are unacked): the
    /// pending count of the kind's counting consumer, one request whatever the number of
    /// agents.
    pub async fn pending(&self, kind: Kind) -> Result<u64, SessionError> {
        let info = self
            .inner
            .stream()
            .await?
            .consumer_info(counter_name(kind))
            .await
            .map_err(|e| unavailable("reading the sessions stream", e))?;
        Ok(info.num_pending)
    }
}

/// The durable consumer that counts the rows of `kind`: filtered to them and never
/// pulled, so the server keeps its pending count equal to the rows there (a deleted or
/// expired row leaves it).
fn counter_name(kind: Kind) -> String {
    format!("{STREAM}_{}", kind.as_str())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn lock_feeds(&self) -> MutexGuard<'_, HashMap<String, Feed>> {
        lock(&self.feeds)
    }

    /// The sessions stream, created (or its limits updated) on first use.
    async fn stream(&self) -> Result<&stream::Stream, SessionError> {
        self.stream
            .get_or_try_init(|| async {
                let js = self.cluster.jetstream();
                let config = stream::Config {
                    name: STREAM.into(),
                    subjects: vec![format!("{SUBJECT_PREFIX}.>")],
                    storage: StorageType::File,
                    num_replicas: self.cluster.replicas(),
                    discard: DiscardPolicy::Old,
                    max_messages_per_subject: self.limits.max_per_agent as i64,
                    max_age: self.limits.ttl,
                    duplicate_window: self.limits.ttl,
                    ..Default::default()
                };
                js.create_or_update_stream(config)
                    .await
                    .map_err(|e| unavailable("creating the sessions stream", e))?;
                let stream = js
                    .get_stream(STREAM)
                    .await
                    .map_err(|e| unavailable("opening the sessions stream", e))?;
                for kind in Kind::ALL {
                    let counter = pull::Config {
                        durable_name: Some(counter_name(kind)),
                        description: Some(format!(
                            "counts the {} rows; never pulled",
                            kind.as_str()
                        )),
                        filter_subject: format!("{SUBJECT_PREFIX}.*.{}", kind.as_str()),
                        ..Default::default()
                    };
                    stream
                        .get_or_create_consumer(&counter_name(kind), counter)
                        .await
                        .map_err(|e| unavailable("creating the sessions' counters", e))?;
                }
                Ok(stream)
            })
            .await
    }

    /// Subscribes to the connection announcements of every host, once: before this host
    /// announces its first connection, so that it sees its own announcements come back.
    async fn listen(self: &Arc<Self>) -> Result<(), SessionError> {
        self.listening
            .get_or_try_init(|| async {
                let subject = format!("{CONNECTED_PREFIX}.*");
                let subscription = self
                    .cluster
                    .client()
                    .subscribe(subject)
                    .await
                    .map_err(|e| unavailable("listening to the connection announcements", e))?;
                tokio::spawn(listen_to_announcements(Arc::downgrade(self), subscription));
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Publishes `frame` to `subject` with a message id from `identity`, waiting for the
    /// cluster's ack.
    async fn record(
        &self,
        subject: String,
        identity: &[&str],
        frame: &Frame,
    ) -> Result<Delivery, SessionError> {
        self.stream().await?;
        let mut digest = Sha256::new();
        for part in identity {
            digest.update(part.as_bytes());
            digest.update([0]);
        }
        let id: String = digest
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        let ack = self
            .cluster
            .jetstream()
            .publish_with_headers(subject, headers, frame.to_json().into())
            .await
            .map_err(|e| unavailable("recording in the relay session", e))?
            .await
            .map_err(|e| unavailable("recording in the relay session", e))?;
        Ok(if ack.duplicate {
            Delivery::Unchanged
        } else {
            Delivery::Stored
        })
    }

    /// Deletes the row at `seq`; one already gone (acked elsewhere, expired) is fine.
    async fn delete(&self, seq: u64) -> Result<(), SessionError> {
        match self.stream().await?.delete_message(seq).await {
            Ok(_) => Ok(()),
            Err(err) => match err.kind() {
                stream::DeleteMessageErrorKind::JetStream(e)
                    if e.error_code() == ErrorCode::NO_MESSAGE_FOUND =>
                {
                    Ok(())
                }
                _ => Err(unavailable("deleting an acked relay session row", err)),
            },
        }
    }

    /// Stops the feed of connection `connection` of `did`, if it is the current one.
    fn stop_feed(&self, did: &str, connection: u64) {
        let mut feeds = self.lock_feeds();
        if feeds.get(did).is_some_and(|f| f.connection == connection)
            && let Some(feed) = feeds.remove(did)
        {
            feed.task.abort();
        }
    }

    fn count_drop(&self, did: &str, kind: Kind, key: &str, reason: DropReason, why: &str) {
        let (kind_name, reason_name) = (kind.as_str(), reason.as_str());
        tracing::warn!(agent = %did, kind = kind_name, key, reason = reason_name, why,
            "relay session dropped an unacked frame");
        self.dropped[kind as usize][reason as usize].fetch_add(1, Ordering::Relaxed);
        crate::metrics::relay_frame_dropped(kind_name, reason_name);
    }

    /// Starts the feed of the connection of `did` registered in the hub now (replacing
    /// an older one), and announces the connection.
    async fn start_feed(self: &Arc<Self>, did: &str) -> Result<Push, SessionError> {
        let Some(connection) = self.hub.connection_id(did) else {
            return Ok(Push {
                frames: vec![],
                next_at_ms: None,
            });
        };
        self.listen().await?;
        let stream = self.stream().await?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: format!("{SUBJECT_PREFIX}.{}.*", agent_key(did)),
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable("reading the relay session", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| unavailable("reading the relay session", e))?;
        let state = Arc::new(Mutex::new(FeedState::default()));
        // The feed pushes nothing before the server has the announcement: a frame seen
        // on the connection means that a later connection elsewhere supersedes it.
        let (announced, ready) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run_feed(
            self.clone(),
            did.to_owned(),
            state.clone(),
            messages,
            ready,
        ));
        let feed = Feed {
            connection,
            announced: false,
            state,
            task: task.abort_handle(),
        };
        // In the map before the announcement goes out, so that its echo finds it.
        if let Some(old) = self.lock_feeds().insert(did.to_owned(), feed) {
            old.task.abort();
        }
        let client = self.cluster.client();
        let subject = format!("{CONNECTED_PREFIX}.{}", agent_key(did));
        let announcement = format!("{} {connection}", self.host);
        let sent = match client.publish(subject, announcement.into()).await {
            Ok(()) => client.flush().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(err) = sent {
            self.stop_feed(did, connection);
            return Err(unavailable("announcing the connection", err));
        }
        let _ = announced.send(());
        Ok(Push {
            frames: vec![],
            next_at_ms: None,
        })
    }

    /// Pushes the unacked rows of the connection of `did` whose retry is due; drops
    /// those pushed their last time, and forgets the expired ones.
    async fn push_due(&self, did: &str) -> Push {
        let Some(state) = self.lock_feeds().get(did).map(|f| f.state.clone()) else {
            return Push {
                frames: vec![],
                next_at_ms: None,
            };
        };
        let now = now_ms();
        let retry = self.limits.retry;
        let (due, exhausted, next_at_ms) = {
            let mut state = lock(&state);
            state.unacked.retain(|_, u| u.expires_ms > now);
            let mut exhausted = Vec::new();
            let mut due = Vec::new();
            for (seq, u) in state.unacked.iter_mut() {
                if u.next_ms > now {
                    continue;
                }
                if u.attempts >= retry.max_attempts {
                    exhausted.push((*seq, u.kind, u.frame_id.clone()));
                    continue;
                }
                u.attempts += 1;
                u.next_ms = now + retry.delay(u.attempts).as_millis() as u64;
                due.push(*seq);
            }
            for (seq, ..) in &exhausted {
                state.unacked.remove(seq);
            }
            (due, exhausted, state.next_at_ms())
        };
        let frames = self.frames_at(did, &state, due).await;
        self.hub.push(did, frames.clone(), next_at_ms, true);
        for (seq, kind, frame_id) in exhausted {
            let why = format!("unacked after {} pushes", retry.max_attempts);
            self.count_drop(did, kind, &frame_id, DropReason::Attempts, &why);
            if let Err(err) = self.delete(seq).await {
                tracing::warn!(agent = %did, error = %err, "deleting a dropped relay row failed");
            }
        }
        Push { frames, next_at_ms }
    }

    /// The frames of the rows at `seqs`, read from the stream in order; a row no longer
    /// there (acked on another connection, expired, capped) is forgotten from `state`.
    async fn frames_at(&self, did: &str, state: &Mutex<FeedState>, seqs: Vec<u64>) -> Vec<String> {
        let Ok(stream) = self.stream().await else {
            return vec![];
        };
        let mut frames = Vec::with_capacity(seqs.len());
        for seq in seqs {
            match stream.get_raw_message(seq).await {
                Ok(message) => frames.push(String::from_utf8_lossy(&message.payload).into_owned()),
                Err(err)
                    if matches!(err.kind(), stream::LastRawMessageErrorKind::NoMessageFound) =>
                {
                    lock(state).unacked.remove(&seq);
                }
                Err(err) => {
                    tracing::warn!(agent = %did, seq, error = %err, "reading a relay row to push again failed");
                }
            }
        }
        frames
    }

    /// Handles the announcement of a connection of `did` (`payload`: host and
    /// connection id): its own marks this host's connection announced; another's, once
    /// this host's own came back before it, closes this host's connection.
    fn announced(&self, did: &str, payload: &str) {
        let mut feeds = self.lock_feeds();
        let Some(feed) = feeds.get_mut(did) else {
            return;
        };
        let mine = format!("{} {}", self.host, feed.connection);
        if payload == mine {
            feed.announced = true;
        } else if feed.announced {
            let connection = feed.connection;
            if let Some(feed) = feeds.remove(did) {
                feed.task.abort();
            }
            drop(feeds);
            let (code, reason) = SUPERSEDED;
            tracing::info!(agent = %did, "a newer connection on another host supersedes this one");
            self.hub.close_connection(did, connection, code, reason);
        }
    }
}

/// Once the connection is `announced`, hands every row the ordered consumer yields to
/// the connection of `did`, in stream order, tracking it until it is acked.
async fn run_feed(
    inner: Arc<Inner>,
    did: String,
    state: Arc<Mutex<FeedState>>,
    mut messages: async_nats::jetstream::consumer::pull::Ordered,
    announced: tokio::sync::oneshot::Receiver<()>,
) {
    if announced.await.is_err() {
        return;
    }
    let limits = inner.limits;
    while let Some(message) = messages.next().await {
        let message = match message {
            Ok(message) => message,
            Err(err) => {
                // The ordered consumer recreates itself after a gap or an outage.
                tracing::debug!(agent = %did, error = %err, "relay session feed");
                continue;
            }
        };
        let Ok(info) = message.info() else { continue };
        let seq = info.stream_sequence;
        let kind = if message.subject.ends_with(Kind::Deliver.as_str()) {
            Kind::Deliver
        } else {
            Kind::Receipt
        };
        let frame = String::from_utf8_lossy(&message.payload).into_owned();
        let Ok(parsed) = Frame::parse(&frame) else {
            tracing::warn!(agent = %did, seq, "unreadable relay session row skipped");
            continue;
        };
        let now = now_ms();
        let next_ms = now + limits.retry.delay(1).as_millis() as u64;
        lock(&state).unacked.insert(
            seq,
            Unacked {
                kind,
                frame_id: parsed.id,
                attempts: 1,
                next_ms,
                expires_ms: now + limits.ttl.as_millis() as u64,
            },
        );
        inner.hub.push(&did, vec![frame], Some(next_ms), true);
    }
}

/// Hands every connection announcement of `subscription` to the sessions, until they
/// are gone.
async fn listen_to_announcements(
    inner: std::sync::Weak<Inner>,
    mut subscription: async_nats::Subscriber,
) {
    while let Some(message) = subscription.next().await {
        let Some(inner) = inner.upgrade() else { return };
        let key = message.subject.rsplit('.').next().unwrap_or_default();
        let (Some(did), Ok(payload)) = (agent_of(key), std::str::from_utf8(&message.payload))
        else {
            continue;
        };
        inner.announced(&did, payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_key_is_one_subject_token_and_names_its_did_back() {
        let did = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
        let key = agent_key(did);
        assert!(key.chars().all(|c| c.is_ascii_hexdigit()), "{key}");
        assert_eq!(agent_of(&key).as_deref(), Some(did));
        assert_eq!(agent_of("zz"), None);
        assert_eq!(
            subject(did, Kind::Deliver),
            format!("clawq.session.{key}.deliver")
        );
    }
}
