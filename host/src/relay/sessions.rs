//! Relay sessions: one actor per agent DID, like a Cloudflare Durable Object. A session
//! keeps what its agent must be told, delivery receipts (spec section 3) and deliveries
//! (spec section 5), in SQLite until the agent's connector acknowledges it.
//!
//! Receipts and deliveries share one mechanism, the `outbound` table: one row per
//! (agent, kind, key) holding the frame to send, fixed when it is recorded (its id and
//! `ts` do not change when it is sent again). Only recording differs by kind:
//!
//! - a receipt's key is its `requestId`; a receipt for another recipient is
//!   [`Delivery::Ignored`], one with the stored status and reason is
//!   [`Delivery::Unchanged`], a changed one replaces the row and is sent again;
//! - a delivery's key is its dedup key; a repeated key while the row exists (acked or
//!   not) is [`Delivery::Unchanged`].
//!
//! Then the same rules apply to every row: a new row is pushed to the agent's connection
//! at once if it is connected; every unacked row is pushed when it connects
//! ([`Ask::Connected`]); and the rows whose retry is due are pushed again while it stays
//! connected ([`Ask::Due`], [`Retry`]: 1 s doubling to 30 s, jitter 0.2, at most 25
//! pushes). An ack marks a row done for good (the row stays until its TTL, for dedup). A
//! row is dropped when the agent holds more than [`SessionLimits::max_per_agent`] of its
//! kind (oldest first), when it expires unacked, when it was pushed
//! [`Retry::max_attempts`] times without an ack, or when the connector refuses it
//! (`deliver_ack` with `accepted: false`); every drop is logged (warn, with agent, kind,
//! key and reason) and counted ([`RelaySessions::dropped`],
//! `clawq_relay_frames_dropped_total{kind, reason}`).
//!
//! No statement of a turn scans the agent's rows: each is an index search, and the cap
//! is checked against a count of the agent's rows kept by triggers (`outbound_counts`),
//! so only the rows past it are read and deleted. A turn costs O(log rows) whatever the
//! cap; a connect push reads every unacked row, which it sends.
//!
//! # The session model: a real actor per agent
//!
//! Each session is an actor: a mailbox and a tokio task that takes its calls (record a
//! receipt or a delivery, push on connect or when a retry is due, settle an ack, sweep)
//! one turn at a time. A turn takes every call waiting in the mailbox (at most
//! [`MAX_CALLS_PER_TURN`]), runs them in order as one write job on the database's writer
//! thread ([`Database::write_later`]), each call in a savepoint of its own, and once that
//! write has committed hands the frames of the turn to the agent's connection
//! ([`ConnectionHub::push`]), then answers the callers. The calls that come while a
//! turn's write waits for its commit make the next turn, whose write is queued at once
//! behind it (a few turns at most), rather than once the first has committed: the writer
//! runs an actor's turns in the order they were queued (often in one commit), and the
//! actor answers them in that order. So:
//!
//! - **Frames are ordered.** Pushes are made inside the turns and turns are written,
//!   committed and finished in the order they were queued, so a session's frames reach its connection in the order the session recorded them,
//!   whichever batches called concurrently; the connection task only sends its backlog
//!   in order. (A retry of an unacked frame comes after the frames pushed since, as it
//!   must.) Having the connection read the session instead would add a second round
//!   trip to the writer per frame; locking around a shared connection, as before, left
//!   the push outside the lock and ran SQLite on the async threads.
//! - **A row is committed before its frame is pushed and before the call returns**: a
//!   handler's `relay-sessions` call returns after the commit, so the ack of its message
//!   commits after the row (ordered durability, see [`crate::store`]). No SQLite runs on
//!   the async threads.
//! - **Nothing is half done.** A call whose statements fail is rolled back to its
//!   savepoint, pushes nothing and answers [`SessionError::Unavailable`] (the handler's
//!   message is retried); the other calls of the turn are unaffected. A failed commit
//!   fails every call of the turn (and of the turns it was committed with), and pushes
//!   nothing.
//! - **One writer round trip per turn, not per call**: under load a busy agent's calls
//!   (records, acks) share a turn, so an actor keeps up with its agent's rate; the next
//!   turn's write is queued while the one before it commits, not after it is answered.
//! - **Idle actors unload.** An actor whose mailbox is empty after its last queued turn
//!   removes itself (under the lock callers send under, so no call is lost) before it
//!   answers; its state is all in SQLite, so 10,000 idle agents cost nothing resident.
//!   A periodic sweep ([`RelaySessions::sweep_every`]) gives a turn to the agents that
//!   hold expired rows, since every turn starts by dropping its agent's expired rows.
//! - **Connections**: a connection becomes live with its connect push; a row recorded
//!   before that is carried by the connect push, after it (or in a turn queued after
//!   the connect push's) by the push of its own turn.
//!   Retries are timed by the connection (the session tells it its next due time with
//!   every push), so an actor holds no timer and can unload. A revocation closes the
//!   connection through the hub; the rows stay in the session.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clawq_protocol::did::validate_agent_did;
use clawq_protocol::receipt::check_receipt;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::hub::ConnectionHub;
use crate::clock::now_ms;
use crate::frame::{Deliver, Frame, FrameBody, MAX_FRAME_BYTES, ReceiptStatus};
use crate::store::{Database, StoreError, execute_cached};

/// Largest dedup key and optional string field of a delivery, in bytes.
pub const MAX_DELIVERY_FIELD_BYTES: usize = 1024;

/// A receipt handed to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptIn {
    /// The relayed message's id.
    pub request_id: String,
    /// The sender: the session that keeps the receipt.
    pub sender_agent_did: String,
    /// The recipient.
    pub recipient_agent_did: String,
    /// The final status.
    pub status: ReceiptStatus,
    /// Why, when given.
    pub reason: Option<String>,
}

/// A delivery handed to a session (spec section 5): kept until the agent's connector
/// acks its `deliver` frame. [`RelaySessions::deliver`] checks every field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryIn {
    /// Identifies the delivery: one row per key and agent.
    pub dedup_key: String,
    /// The agent it is from (a valid agent DID).
    pub from_agent_did: String,
    /// The agent whose session keeps it (a valid agent DID).
    pub to_agent_did: String,
    /// The payload as JSON text (any JSON value).
    pub payload: String,
    /// Where it comes from, e.g. `proxy.events.queue.pair_accepted`.
    pub delivery_source: Option<String>,
    /// The payload's content type.
    pub content_type: Option<String>,
    /// The group it concerns.
    pub group_id: Option<String>,
    /// The conversation it belongs to.
    pub conversation_id: Option<String>,
    /// What it answers.
    pub reply_to: Option<String>,
}

/// What a session did with a receipt or a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Recorded, and pushed to the agent's live connection (this many: 0 or 1).
    Pushed(u32),
    /// Recorded for the next connect (or for the connect push under way).
    Stored,
    /// Already held (same receipt status and reason, or same delivery dedup key):
    /// nothing done.
    Unchanged,
    /// The request id is stored for another recipient: ignored.
    Ignored,
}

/// Why a session refused a call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// The receipt or delivery is malformed; it will be refused again.
    #[error("invalid {0}")]
    Invalid(String),
    /// The session's storage failed; a later attempt may succeed.
    #[error("session storage unavailable: {0}")]
    Unavailable(String),
}

impl From<rusqlite::Error> for SessionError {
    fn from(err: rusqlite::Error) -> Self {
        SessionError::Unavailable(err.to_string())
    }
}

impl From<StoreError> for SessionError {
    fn from(err: StoreError) -> Self {
        SessionError::Unavailable(err.to_string())
    }
}

/// What a session row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A delivery receipt, sent as a `receipt` frame, acked by `receipt_ack`.
    Receipt,
    /// A delivery, sent as a `deliver` frame, acked by `deliver_ack`.
    Deliver,
}

impl Kind {
    /// Both kinds.
    pub const ALL: [Kind; 2] = [Kind::Receipt, Kind::Deliver];

    /// The name in storage, logs and the `kind` label of the drop counter.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Receipt => "receipt",
            Kind::Deliver => "deliver",
        }
    }

    fn parse(name: &str) -> Kind {
        if name == Kind::Deliver.as_str() {
            Kind::Deliver
        } else {
            Kind::Receipt
        }
    }
}

/// Why a session dropped a row its connector had not acked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The agent held more than [`SessionLimits::max_per_agent`] rows of its kind.
    Cap,
    /// Its TTL passed.
    Expired,
    /// It was pushed [`Retry::max_attempts`] times without an ack.
    Attempts,
    /// The connector refused it (`deliver_ack` with `accepted: false`).
    Rejected,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 4] = [
        DropReason::Cap,
        DropReason::Expired,
        DropReason::Attempts,
        DropReason::Rejected,
    ];

    /// The name in logs and the `reason` label of the drop counter.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Cap => "cap",
            DropReason::Expired => "expired",
            DropReason::Attempts => "attempts",
            DropReason::Rejected => "rejected",
        }
    }
}

/// When an unacked frame is pushed again while its agent stays connected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    /// Delay after the first push.
    pub initial: Duration,
    /// Longest delay: the delay doubles after each push up to this.
    pub max: Duration,
    /// Each delay is multiplied by a random factor in `1 ± jitter`.
    pub jitter: f64,
    /// Most pushes of one frame; unacked after the last one, it is dropped.
    pub max_attempts: u32,
}

impl Retry {
    /// The delay after the `attempt`-th push (1 for the first), jittered.
    pub fn delay(&self, attempt: u32) -> Duration {
        let doubled = 2u32.saturating_pow(attempt.saturating_sub(1));
        let base = self.initial.saturating_mul(doubled).min(self.max);
        base.mul_f64((1.0 + self.jitter * (2.0 * fastrand::f64() - 1.0)).max(0.0))
    }
}

/// Limits of the sessions; the defaults are the reference deployment's (spec section 6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionLimits {
    /// How long a row (receipt or delivery) lives, acked or not.
    pub ttl: Duration,
    /// Most rows of each kind kept per agent; the oldest are dropped first.
    pub max_per_agent: usize,
    /// When unacked frames are pushed again.
    pub retry: Retry,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            ttl: Duration::from_secs(3600),
            max_per_agent: 500,
            retry: Retry {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(30),
                jitter: 0.2,
                max_attempts: 25,
            },
        }
    }
}

/// What a connection asks its session for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// It just connected: every unacked frame (its connect push).
    Connected,
    /// Its retry timer fired: the frames due now.
    Due,
}

/// What a session pushed to a connection, and when to ask again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The frames, as JSON text, oldest first.
    pub frames: Vec<String>,
    /// When the next unacked frame is due (ms since the Unix epoch), if any.
    pub next_at_ms: Option<u64>,
}

/// A row dropped unacked.
struct Dropped {
    kind: Kind,
    key: String,
    reason: DropReason,
    why: String,
}

/// The `outbound` table (see the module documentation) and its indexes, one for each
/// question a turn asks, so that no statement of a turn scans the agent's rows: a row
/// by key (the primary key) or by frame id (`outbound_frame`), the oldest rows of a kind
/// (`outbound_age`), the expired rows (`outbound_expiry`), and the unacked rows by due
/// time (`outbound_due`, which holds only unacked rows).
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS outbound (
         agent_did  TEXT NOT NULL,
         kind       TEXT NOT NULL,
         key        TEXT NOT NULL,
         frame_id   TEXT NOT NULL,
         frame      TEXT NOT NULL,
         updated_ms INTEGER NOT NULL,
         expires_ms INTEGER NOT NULL,
         acked      INTEGER NOT NULL DEFAULT 0,
         attempts   INTEGER NOT NULL DEFAULT 0,
         next_ms    INTEGER NOT NULL,
         PRIMARY KEY (agent_did, kind, key)
     );
     CREATE INDEX IF NOT EXISTS outbound_age ON outbound (agent_did, kind, updated_ms);
     CREATE INDEX IF NOT EXISTS outbound_frame ON outbound (agent_did, frame_id);
     CREATE INDEX IF NOT EXISTS outbound_expiry ON outbound (agent_did, expires_ms);
     CREATE INDEX IF NOT EXISTS outbound_due ON outbound (agent_did, next_ms) WHERE acked = 0;";

/// How many rows each agent holds of each kind, kept by triggers on `outbound` in the
/// same transaction as every insert and delete (a row's agent and kind never change),
/// so that the cap is checked without counting the rows; rebuilt from the rows when the
/// sessions are opened.
const COUNTERS: &str = "
CREATE TABLE IF NOT EXISTS outbound_counts (
    agent_did TEXT NOT NULL,
    kind      TEXT NOT NULL,
    held      INTEGER NOT NULL,
    PRIMARY KEY (agent_did, kind)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS outbound_counted_in AFTER INSERT ON outbound BEGIN
    INSERT INTO outbound_counts (agent_did, kind, held) VALUES (NEW.agent_did, NEW.kind, 1)
        ON CONFLICT (agent_did, kind) DO UPDATE SET held = held + 1;
END;
CREATE TRIGGER IF NOT EXISTS outbound_counted_out AFTER DELETE ON outbound BEGIN
    UPDATE outbound_counts SET held = held - 1
        WHERE agent_did = OLD.agent_did AND kind = OLD.kind;
    DELETE FROM outbound_counts
        WHERE agent_did = OLD.agent_did AND kind = OLD.kind AND held <= 0;
END;
";

/// Deletes the expired rows of agent `?1` at `?2` (ms).
const DELETE_EXPIRED: &str =
    "DELETE FROM outbound WHERE agent_did = ?1 AND expires_ms <= ?2 RETURNING kind, key, acked";

/// Deletes the rows of agent `?1` pushed `?2` times, unacked, whose last retry is over
/// at `?3`.
const DELETE_EXHAUSTED: &str = "DELETE FROM outbound WHERE agent_did = ?1 AND acked = 0
     AND next_ms <= ?3 AND attempts >= ?2 RETURNING kind, key";

/// The unacked rows of agent `?1` pushed fewer than `?2` times and due at `?3`, oldest
/// first.
const SELECT_DUE: &str = "SELECT rowid, frame, attempts FROM outbound
     WHERE agent_did = ?1 AND acked = 0 AND next_ms <= ?3 AND attempts < ?2
     ORDER BY updated_ms, rowid";

/// When the next unacked row of agent `?1` is due.
const SELECT_NEXT_DUE: &str =
    "SELECT MIN(next_ms) FROM outbound WHERE agent_did = ?1 AND acked = 0";

/// How many rows of kind `?2` agent `?1` holds.
const SELECT_HELD: &str = "SELECT held FROM outbound_counts WHERE agent_did = ?1 AND kind = ?2";

/// Deletes the `?3` oldest rows of kind `?2` of agent `?1`.
const DELETE_OLDEST: &str = "DELETE FROM outbound WHERE rowid IN (
         SELECT rowid FROM outbound WHERE agent_did = ?1 AND kind = ?2
         ORDER BY updated_ms, rowid LIMIT ?3)
     RETURNING key, acked";

/// Most calls one turn of an actor takes from its mailbox.
pub const MAX_CALLS_PER_TURN: usize = 64;

/// Most turns of one actor whose writes are queued at once.
const MAX_TURNS_QUEUED: usize = 4;

/// What a caller asks of a session.
enum Request {
    Receipt(ReceiptIn),
    Deliver {
        key: String,
        frame: Frame,
    },
    Push(Ask),
    Settle {
        kind: Kind,
        frame_id: String,
        rejected: Option<String>,
    },
    Sweep,
}

/// What a session answers.
enum Answer {
    Delivery(Delivery),
    Push(Push),
    Settled(bool),
    Swept,
}

/// A call in an actor's mailbox.
struct Call {
    request: Request,
    reply: oneshot::Sender<Result<Answer, SessionError>>,
}

/// What one call of a turn did: its answer, and the frames to hand to the connection
/// once the turn has committed.
struct Done {
    answer: Answer,
    handoff: Option<Handoff>,
}

/// Frames for the agent's connection (see [`ConnectionHub::push`]).
struct Handoff {
    frames: Vec<String>,
    next_at_ms: Option<u64>,
    connect: bool,
}

/// What a turn's write returns: each call's outcome, and the rows dropped.
type TurnOutcome = (Vec<Result<Done, SessionError>>, Vec<Dropped>);

/// A turn's write, queued: resolves once it has committed (or failed to).
type TurnWrite = Pin<Box<dyn Future<Output = Result<TurnOutcome, SessionError>> + Send>>;

/// A turn of an actor whose write is queued.
struct QueuedTurn {
    write: TurnWrite,
    /// Where each call of the turn is answered, in order.
    replies: Vec<oneshot::Sender<Result<Answer, SessionError>>>,
    /// How many calls the turn has.
    count: usize,
    /// Whether it pushes on connect (which makes the connection live).
    connects: bool,
}

/// Every relay session of the host.
pub struct RelaySessions {
    inner: Arc<Inner>,
}

/// What the actors share.
struct Inner {
    db: Database,
    /// The mailbox of every actor in memory, by agent DID.
    actors: Mutex<HashMap<String, mpsc::UnboundedSender<Call>>>,
    hub: Arc<ConnectionHub>,
    limits: SessionLimits,
    /// Rows dropped unacked since start, by kind and reason.
    dropped: [[AtomicU64; 4]; 2],
}

impl RelaySessions {
    /// Opens (or creates) the sessions' storage in `db`, moving the receipts of an older
    /// clawq's `receipts` table into it.
    pub fn open(
        db: &Database,
        hub: Arc<ConnectionHub>,
        limits: SessionLimits,
    ) -> Result<Self, SessionError> {
        // At start, before anything is served: the schema and the one-off migration.
        let mut conn = db.connection(SCHEMA)?;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             {COUNTERS}
             DELETE FROM outbound_counts;
             INSERT INTO outbound_counts (agent_did, kind, held)
                 SELECT agent_did, kind, COUNT(*) FROM outbound GROUP BY agent_did, kind;
             COMMIT;"
        ))?;
        let migrated = migrate_receipts_table(&mut conn)?;
        if migrated > 0 {
            tracing::info!(
                receipts = migrated,
                "moved the receipts of an older sessions.db"
            );
        }
        Ok(RelaySessions {
            inner: Arc::new(Inner {
                db: db.clone(),
                actors: Mutex::new(HashMap::new()),
                hub,
                limits,
                dropped: Default::default(),
            }),
        })
    }

    /// The limits the sessions keep to.
    pub fn limits(&self) -> SessionLimits {
        self.inner.limits
    }

    /// Puts `request` in the mailbox of the actor of `did` (loading the actor if it is
    /// not in memory) at once; the future answers once the actor's turn committed.
    fn call(
        &self,
        did: &str,
        request: Request,
    ) -> impl Future<Output = Result<Answer, SessionError>> + Send + use<> {
        let (reply, answer) = oneshot::channel();
        let mut call = Call { request, reply };
        {
            let mut actors = self.inner.lock_actors();
            if let Some(mailbox) = actors.get(did) {
                match mailbox.send(call) {
                    Ok(()) => return answered(answer),
                    // Its task is gone (it panicked): a new one takes over.
                    Err(mpsc::error::SendError(back)) => call = back,
                }
            }
            let (mailbox, calls) = mpsc::unbounded_channel();
            let _ = mailbox.send(call);
            actors.insert(did.to_owned(), mailbox);
            tokio::spawn(run_actor(self.inner.clone(), did.to_owned(), calls));
        }
        answered(answer)
    }

    /// Records `receipt` in its sender's session (spec section 3), pushing it to the
    /// sender's live connection if it is new or changed; returns once it is committed.
    pub async fn deliver_receipt(&self, receipt: ReceiptIn) -> Result<Delivery, SessionError> {
        self.receipt_call(receipt).await
    }

    /// Records each of `receipts` as [`Self::deliver_receipt`] does; answers in the same
    /// order once all are committed. Every receipt is in its sender's mailbox before
    /// any is answered, so one sender's receipts are recorded in the order given and
    /// share its turns, and different senders' actors take theirs at the same time.
    pub async fn deliver_receipts(
        &self,
        receipts: Vec<ReceiptIn>,
    ) -> Vec<Result<Delivery, SessionError>> {
        let answers: Vec<_> = receipts
            .into_iter()
            .map(|receipt| self.receipt_call(receipt))
            .collect();
        futures_util::future::join_all(answers).await
    }

    /// Checks `receipt` and puts it in its sender's mailbox at once; the future answers
    /// once its turn committed.
    fn receipt_call(
        &self,
        receipt: ReceiptIn,
    ) -> impl Future<Output = Result<Delivery, SessionError>> + Send + use<> {
        let checked = check_receipt(
            &receipt.request_id,
            &receipt.sender_agent_did,
            &receipt.recipient_agent_did,
        )
        .map_err(|why| SessionError::Invalid(format!("receipt: {why}")));
        let call = checked.map(|()| {
            let did = receipt.sender_agent_did.clone();
            self.call(&did, Request::Receipt(receipt))
        });
        async move {
            match call?.await? {
                Answer::Delivery(delivery) => Ok(delivery),
                _ => unreachable!("a receipt is answered with a delivery"),
            }
        }
    }

    /// Records `delivery` in the session of its `to_agent_did` (spec section 5) and
    /// pushes it to that agent's live connection, unless the session holds its dedup
    /// key already; returns once it is committed.
    ///
    /// Refused as [`SessionError::Invalid`], naming the field: a blank or over-1-KiB
    /// dedup key, an invalid DID, a payload that is not JSON, an optional field over
    /// 1 KiB, a frame over 1 MiB. The fields are taken as they are (trim them first);
    /// a blank optional field is left out of the frame.
    pub async fn deliver(&self, delivery: DeliveryIn) -> Result<Delivery, SessionError> {
        let frame = delivery_frame(&delivery)?;
        let request = Request::Deliver {
            key: delivery.dedup_key,
            frame,
        };
        match self.call(&delivery.to_agent_did, request).await? {
            Answer::Delivery(delivery) => Ok(delivery),
            _ => unreachable!("a delivery is answered with a delivery"),
        }
    }

    /// Pushes to the connection of `did` what it must send now (every unacked frame on
    /// connect, which makes the connection live; the due ones after), counted as
    /// pushed; frames pushed their last time and still unacked are dropped. Returns
    /// what it pushed and when to ask again.
    pub async fn push(&self, did: &str, ask: Ask) -> Result<Push, SessionError> {
        match self.call(did, Request::Push(ask)).await? {
            Answer::Push(push) => Ok(push),
            _ => unreachable!("a push is answered with a push"),
        }
    }

    /// Marks the `kind` frame `frame_id` of `did` acked: never pushed again. False when
    /// the session holds no such frame. The ack is in the actor's mailbox when this
    /// returns; the future answers once it is committed.
    pub fn ack(
        &self,
        did: &str,
        kind: Kind,
        frame_id: &str,
    ) -> impl Future<Output = Result<bool, SessionError>> + Send + use<> {
        self.settle(did, kind, frame_id, None)
    }

    /// Marks the `kind` frame `frame_id` of `did` refused by the connector, for `reason`:
    /// never pushed again, and dropped (logged and counted as `rejected`) unless it was
    /// acked before. False when the session holds no such frame. Like [`Self::ack`], in
    /// the mailbox when this returns.
    pub fn reject(
        &self,
        did: &str,
        kind: Kind,
        frame_id: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<bool, SessionError>> + Send + use<> {
        let why = format!(
            "the connector refused it: {}",
            reason.unwrap_or("no reason given")
        );
        self.settle(did, kind, frame_id, Some(why))
    }

    /// Marks a frame done; with `rejected`, counts it dropped (if it was not done yet).
    fn settle(
        &self,
        did: &str,
        kind: Kind,
        frame_id: &str,
        rejected: Option<String>,
    ) -> impl Future<Output = Result<bool, SessionError>> + Send + use<> {
        let request = Request::Settle {
            kind,
            frame_id: frame_id.to_owned(),
            rejected,
        };
        let answer = self.call(did, request);
        async move {
            match answer.await? {
                Answer::Settled(known) => Ok(known),
                _ => unreachable!("a settle is answered with whether the frame is known"),
            }
        }
    }

    /// Drops the expired rows of every session (logging and counting the unacked ones),
    /// so that an agent that never calls again still has its expiries accounted for.
    /// Returns how many sessions had some.
    pub async fn sweep_expired(&self) -> Result<usize, SessionError> {
        let now = now_ms();
        let agents: Vec<String> = self
            .inner
            .db
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT DISTINCT agent_did FROM outbound WHERE expires_ms <= ?1",
                )?
                .query_map(params![now], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()
                .map_err(SessionError::from)
            })
            .await?;
        for did in &agents {
            self.call(did, Request::Sweep).await?;
        }
        Ok(agents.len())
    }

    /// Runs [`RelaySessions::sweep_expired`] every `every` until `stop` is cancelled.
    pub async fn sweep_every(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {
                    if let Err(err) = self.sweep_expired().await {
                        tracing::error!(error = %err, "sweeping expired relay session rows failed");
                    }
                }
            }
        }
    }

    /// Actors in memory right now.
    pub fn resident_actors(&self) -> usize {
        self.inner.lock_actors().len()
    }

    /// Rows of `kind` dropped unacked for `reason` since start.
    pub fn dropped(&self, kind: Kind, reason: DropReason) -> u64 {
        self.inner.dropped[kind as usize][reason as usize].load(Ordering::Relaxed)
    }

    /// Rows of `kind` dropped unacked since start, for any reason.
    pub fn dropped_total(&self, kind: Kind) -> u64 {
        DropReason::ALL.iter().map(|r| self.dropped(kind, *r)).sum()
    }

    /// Unacked, unexpired rows of `kind` across every session.
    pub async fn pending(&self, kind: Kind) -> Result<u64, SessionError> {
        let now = now_ms();
        self.inner
            .db
            .read(move |conn| {
                conn.prepare_cached(
                    "SELECT COUNT(*) FROM outbound WHERE kind = ?1 AND acked = 0 AND expires_ms > ?2",
                )?
                .query_row(params![kind.as_str(), now], |r| r.get(0))
                .map_err(SessionError::from)
            })
            .await
    }
}

/// The answer to a call, once its actor sends it.
async fn answered(
    answer: oneshot::Receiver<Result<Answer, SessionError>>,
) -> Result<Answer, SessionError> {
    answer.await.unwrap_or_else(|_| {
        Err(SessionError::Unavailable(
            "the relay session stopped before it answered".into(),
        ))
    })
}

impl Inner {
    fn lock_actors(&self) -> MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<Call>>> {
        self.actors.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count_drop(&self, did: &str, row: &Dropped) {
        let (kind, reason) = (row.kind.as_str(), row.reason.as_str());
        tracing::warn!(agent = %did, kind, key = %row.key, reason, why = %row.why,
            "relay session dropped an unacked frame");
        self.dropped[row.kind as usize][row.reason as usize].fetch_add(1, Ordering::Relaxed);
        crate::metrics::relay_frame_dropped(kind, reason);
    }

    /// Queues the write of one turn of the actor of `did` over `calls` (after every write
    /// queued before it, so the turns of an actor commit in the order they were queued);
    /// `live` says whether the agent's connection takes pushes at its start. The future
    /// resolves to each call's outcome once the write has committed.
    fn queue_turn(&self, did: &str, calls: Vec<Request>, live: bool) -> TurnWrite {
        let limits = self.limits;
        let owned = did.to_owned();
        let written: Arc<Mutex<Option<TurnOutcome>>> = Arc::default();
        let slot = written.clone();
        let committed = self.db.write_later(move |conn| {
            let outcome = write_turn(conn, &owned, calls, live, limits)?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
            Ok::<(), SessionError>(())
        });
        Box::pin(async move {
            committed.await?;
            let outcome = written.lock().unwrap_or_else(|p| p.into_inner()).take();
            outcome
                .ok_or_else(|| SessionError::Unavailable("a turn's write left no outcome".into()))
        })
    }

    /// Hands the frames of a turn of `count` calls whose write ended so (`written`) to the
    /// connection of `did`, in order (nothing when the write failed); returns each call's
    /// answer.
    fn finish_turn(
        &self,
        did: &str,
        count: usize,
        written: Result<TurnOutcome, SessionError>,
    ) -> Vec<Result<Answer, SessionError>> {
        let (outcomes, dropped) = match written {
            Ok(written) => written,
            Err(err) => return (0..count).map(|_| Err(err.clone())).collect(),
        };
        for row in &dropped {
            self.count_drop(did, row);
        }
        outcomes
            .into_iter()
            .map(|outcome| {
                let Done { answer, handoff } = outcome?;
                let Some(Handoff {
                    frames,
                    next_at_ms,
                    connect,
                }) = handoff
                else {
                    return Ok(answer);
                };
                let taken = self.hub.push(did, frames, next_at_ms, connect);
                Ok(match answer {
                    Answer::Delivery(Delivery::Stored) if taken > 0 => {
                        Answer::Delivery(Delivery::Pushed(taken))
                    }
                    answer => answer,
                })
            })
            .collect()
    }

    /// Removes the actor of `did` from memory if its mailbox is empty; true if it did.
    /// Callers send under the same lock, so a call is either in the mailbox now or will
    /// load a new actor.
    fn unload_if_idle(&self, did: &str, mailbox: &mpsc::UnboundedReceiver<Call>) -> bool {
        let mut actors = self.lock_actors();
        let idle = mailbox.is_empty();
        if idle {
            actors.remove(did);
        }
        idle
    }
}

/// The actor of `did`: turns over the calls in its `mailbox` until it is empty, then
/// unloads. The calls that come while a turn's write is queued make the next turn, queued
/// at once behind it (at most [`MAX_TURNS_QUEUED`] at a time); each turn is answered, and
/// its frames handed to the connection, once its write has committed, in order.
async fn run_actor(inner: Arc<Inner>, did: String, mut mailbox: mpsc::UnboundedReceiver<Call>) {
    let mut queued: VecDeque<QueuedTurn> = VecDeque::new();
    let mut first = None;
    loop {
        if queued.len() < MAX_TURNS_QUEUED {
            let mut requests = Vec::new();
            let mut replies = Vec::new();
            while requests.len() < MAX_CALLS_PER_TURN {
                let Some(call) = first.take().or_else(|| mailbox.try_recv().ok()) else {
                    break;
                };
                requests.push(call.request);
                replies.push(call.reply);
            }
            if !requests.is_empty() {
                let connects = requests
                    .iter()
                    .any(|request| matches!(request, Request::Push(Ask::Connected)));
                // A connect push queued before this turn makes the connection live for it.
                let live = inner.hub.is_live(&did) || queued.iter().any(|turn| turn.connects);
                let count = requests.len();
                queued.push_back(QueuedTurn {
                    write: inner.queue_turn(&did, requests, live),
                    replies,
                    count,
                    connects,
                });
            }
        }
        let room = queued.len() < MAX_TURNS_QUEUED;
        let Some(oldest) = queued.front_mut() else {
            if inner.unload_if_idle(&did, &mailbox) {
                return;
            }
            continue;
        };
        tokio::select! {
            biased;
            written = &mut oldest.write => {
                let turn = queued.pop_front().expect("the oldest turn");
                let answers = inner.finish_turn(&did, turn.count, written);
                // Unloaded before answering: a caller that gets its answer finds the actor
                // gone unless another call came meanwhile.
                let idle = queued.is_empty() && inner.unload_if_idle(&did, &mailbox);
                for (reply, answer) in turn.replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
                if idle {
                    return;
                }
            }
            Some(call) = mailbox.recv(), if room => first = Some(call),
        }
    }
}

/// The write of one turn of the session of `did`, on the writer thread: drops the
/// expired rows, then runs each call in a savepoint of its own, so that a call that
/// fails leaves nothing behind. `live` says whether the agent's connection takes pushes
/// at the start of the turn (a connect push in the turn makes it live for the calls
/// after it).
fn write_turn(
    conn: &Connection,
    did: &str,
    calls: Vec<Request>,
    mut live: bool,
    limits: SessionLimits,
) -> Result<TurnOutcome, SessionError> {
    let now = now_ms();
    let mut dropped = Vec::new();
    drop_expired(conn, did, now, &mut dropped)?;
    let mut outcomes = Vec::with_capacity(calls.len());
    for request in calls {
        let connects = matches!(request, Request::Push(Ask::Connected));
        execute_cached(conn, "SAVEPOINT session_call")?;
        let mut its_drops = Vec::new();
        let outcome = run_call(conn, did, request, now, live, limits, &mut its_drops);
        if outcome.is_ok() {
            execute_cached(conn, "RELEASE session_call")?;
            dropped.append(&mut its_drops);
            live |= connects;
        } else {
            conn.execute_batch("ROLLBACK TO session_call; RELEASE session_call")?;
        }
        outcomes.push(outcome);
    }
    Ok((outcomes, dropped))
}

/// Runs one call of a turn (see [`write_turn`]).
fn run_call(
    conn: &Connection,
    did: &str,
    request: Request,
    now: u64,
    live: bool,
    limits: SessionLimits,
    dropped: &mut Vec<Dropped>,
) -> Result<Done, SessionError> {
    let answer = |answer| {
        Ok(Done {
            answer,
            handoff: None,
        })
    };
    match request {
        Request::Receipt(receipt) => {
            let stored: Option<String> = conn
                .prepare_cached(
                    "SELECT frame FROM outbound WHERE agent_did = ?1 AND kind = ?2 AND key = ?3",
                )?
                .query_row(
                    params![did, Kind::Receipt.as_str(), receipt.request_id],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(Ok(Frame {
                body:
                    FrameBody::Receipt {
                        to_agent_did,
                        status,
                        reason,
                        ..
                    },
                ..
            })) = stored.as_deref().map(Frame::parse)
            {
                if to_agent_did != receipt.recipient_agent_did {
                    return answer(Answer::Delivery(Delivery::Ignored));
                }
                if status == receipt.status && reason == receipt.reason {
                    return answer(Answer::Delivery(Delivery::Unchanged));
                }
            }
            let frame = Frame::new(FrameBody::Receipt {
                original_frame_id: receipt.request_id.clone(),
                to_agent_did: receipt.recipient_agent_did,
                status: receipt.status,
                reason: receipt.reason,
            });
            let row = Row {
                did,
                kind: Kind::Receipt,
                key: &receipt.request_id,
            };
            keep(conn, row, &frame, now, live, limits, dropped)
        }
        Request::Deliver { key, frame } => {
            let held = conn
                .prepare_cached(
                    "SELECT 1 FROM outbound WHERE agent_did = ?1 AND kind = ?2 AND key = ?3",
                )?
                .exists(params![did, Kind::Deliver.as_str(), key])?;
            if held {
                return answer(Answer::Delivery(Delivery::Unchanged));
            }
            let row = Row {
                did,
                kind: Kind::Deliver,
                key: &key,
            };
            keep(conn, row, &frame, now, live, limits, dropped)
        }
        Request::Push(ask) => {
            let push = due_frames(conn, did, ask, now, limits.retry, dropped)?;
            Ok(Done {
                handoff: Some(Handoff {
                    frames: push.frames.clone(),
                    next_at_ms: push.next_at_ms,
                    connect: ask == Ask::Connected,
                }),
                answer: Answer::Push(push),
            })
        }
        Request::Settle {
            kind,
            frame_id,
            rejected,
        } => answer(Answer::Settled(settle(
            conn, did, kind, &frame_id, rejected, dropped,
        )?)),
        Request::Sweep => answer(Answer::Swept),
    }
}

/// The frames of `did` to push for `ask`, counted as pushed; drops the rows pushed
/// their last time and still unacked.
fn due_frames(
    conn: &Connection,
    did: &str,
    ask: Ask,
    now: u64,
    retry: Retry,
    dropped: &mut Vec<Dropped>,
) -> Result<Push, SessionError> {
    let mut exhausted = conn.prepare_cached(DELETE_EXHAUSTED)?;
    let rows = exhausted.query_map(params![did, retry.max_attempts, now], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    for row in rows {
        let (kind, key) = row?;
        dropped.push(Dropped {
            kind: Kind::parse(&kind),
            key,
            reason: DropReason::Attempts,
            why: format!("unacked after {} pushes", retry.max_attempts),
        });
    }
    // On connect every unacked row is due.
    let due_at = match ask {
        Ask::Connected => i64::MAX,
        Ask::Due => now as i64,
    };
    let due: Vec<(i64, String, u32)> = conn
        .prepare_cached(SELECT_DUE)?
        .query_map(params![did, retry.max_attempts, due_at], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut pushed =
        conn.prepare_cached("UPDATE outbound SET attempts = ?2, next_ms = ?3 WHERE rowid = ?1")?;
    let mut frames = Vec::with_capacity(due.len());
    for (rowid, frame, attempts) in due {
        let next = now + retry.delay(attempts + 1).as_millis() as u64;
        pushed.execute(params![rowid, attempts + 1, next])?;
        frames.push(frame);
    }
    let next_at_ms: Option<u64> = conn
        .prepare_cached(SELECT_NEXT_DUE)?
        .query_row(params![did], |r| r.get(0))?;
    Ok(Push { frames, next_at_ms })
}

/// Marks the `kind` frame `frame_id` of `did` done; with `rejected`, notes it dropped
/// (if it was not done yet). False when the session holds no such frame.
fn settle(
    conn: &Connection,
    did: &str,
    kind: Kind,
    frame_id: &str,
    rejected: Option<String>,
    dropped: &mut Vec<Dropped>,
) -> Result<bool, SessionError> {
    let row: Option<(String, bool)> = conn
        .prepare_cached(
            "SELECT key, acked FROM outbound WHERE agent_did = ?1 AND kind = ?2
             AND frame_id = ?3",
        )?
        .query_row(params![did, kind.as_str(), frame_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((key, acked)) = row else {
        return Ok(false);
    };
    if acked {
        return Ok(true);
    }
    conn.prepare_cached(
        "UPDATE outbound SET acked = 1 WHERE agent_did = ?1 AND kind = ?2 AND key = ?3",
    )?
    .execute(params![did, kind.as_str(), key])?;
    if let Some(why) = rejected {
        dropped.push(Dropped {
            kind,
            key,
            reason: DropReason::Rejected,
            why,
        });
    }
    Ok(true)
}

/// Deletes the expired rows of `did`, noting the unacked ones in `dropped`.
fn drop_expired(
    conn: &Connection,
    did: &str,
    now: u64,
    dropped: &mut Vec<Dropped>,
) -> Result<(), SessionError> {
    let mut stmt = conn.prepare_cached(DELETE_EXPIRED)?;
    let rows = stmt.query_map(params![did, now], |r| {
        Ok((r.get::<_, String>(0)?, r.get(1)?, r.get::<_, bool>(2)?))
    })?;
    for row in rows {
        let (kind, key, acked) = row?;
        if !acked {
            dropped.push(Dropped {
                kind: Kind::parse(&kind),
                key,
                reason: DropReason::Expired,
                why: "its time to live passed".into(),
            });
        }
    }
    Ok(())
}

/// Which row of the `outbound` table.
struct Row<'a> {
    did: &'a str,
    kind: Kind,
    key: &'a str,
}

/// Stores `frame` as `row`, then drops the oldest rows of that kind past the cap. With
/// `live` (the agent's connection takes pushes) the frame is pushed by this turn, which
/// counts as its first push; else it is due now, for the connect push.
fn keep(
    conn: &Connection,
    row: Row<'_>,
    frame: &Frame,
    now: u64,
    live: bool,
    limits: SessionLimits,
    dropped: &mut Vec<Dropped>,
) -> Result<Done, SessionError> {
    let Row { did, kind, key } = row;
    let expires = now + limits.ttl.as_millis() as u64;
    let (attempts, next) = if live {
        (1, now + limits.retry.delay(1).as_millis() as u64)
    } else {
        (0, now)
    };
    let json = frame.to_json();
    conn.prepare_cached(
        "INSERT INTO outbound (agent_did, kind, key, frame_id, frame, updated_ms, expires_ms, acked, attempts, next_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9)
         ON CONFLICT (agent_did, kind, key) DO UPDATE SET frame_id = ?4, frame = ?5,
             updated_ms = ?6, expires_ms = ?7, acked = 0, attempts = ?8, next_ms = ?9",
    )?
    .execute(params![did, kind.as_str(), key, frame.id, json, now, expires, attempts, next])?;
    let stored = Done {
        answer: Answer::Delivery(Delivery::Stored),
        handoff: live.then(|| Handoff {
            frames: vec![json],
            next_at_ms: Some(next),
            connect: false,
        }),
    };
    // The rows past the cap, oldest first: the count says how many, the age index which.
    let held: i64 = conn
        .prepare_cached(SELECT_HELD)?
        .query_row(params![did, kind.as_str()], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let excess = held.saturating_sub(limits.max_per_agent as i64);
    if excess <= 0 {
        return Ok(stored);
    }
    let mut oldest = conn.prepare_cached(DELETE_OLDEST)?;
    let rows = oldest.query_map(params![did, kind.as_str(), excess], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?))
    })?;
    for row in rows {
        let (key, acked) = row?;
        if !acked {
            dropped.push(Dropped {
                kind,
                key,
                reason: DropReason::Cap,
                why: format!(
                    "the session holds more than {} {} rows",
                    limits.max_per_agent,
                    kind.as_str()
                ),
            });
        }
    }
    Ok(stored)
}

/// Checks `delivery` and builds its `deliver` frame.
pub(super) fn delivery_frame(delivery: &DeliveryIn) -> Result<Frame, SessionError> {
    let invalid = |why: String| SessionError::Invalid(format!("delivery: {why}"));
    let key = &delivery.dedup_key;
    if key.trim().is_empty() {
        return Err(invalid("`dedup-key` is blank".into()));
    }
    if key.len() > MAX_DELIVERY_FIELD_BYTES {
        return Err(invalid(format!(
            "`dedup-key` is {} bytes, over the {MAX_DELIVERY_FIELD_BYTES}-byte limit",
            key.len()
        )));
    }
    for (name, did) in [
        ("from-agent-did", &delivery.from_agent_did),
        ("to-agent-did", &delivery.to_agent_did),
    ] {
        validate_agent_did(did).map_err(|e| invalid(format!("`{name}` `{did}`: {e}")))?;
    }
    let payload = serde_json::from_str(&delivery.payload)
        .map_err(|e| invalid(format!("`payload` is not JSON: {e}")))?;
    let optional = |name: &str, value: &Option<String>| match value {
        Some(v) if v.len() > MAX_DELIVERY_FIELD_BYTES => Err(invalid(format!(
            "`{name}` is {} bytes, over the {MAX_DELIVERY_FIELD_BYTES}-byte limit",
            v.len()
        ))),
        Some(v) if !v.trim().is_empty() => Ok(Some(v.clone())),
        _ => Ok(None),
    };
    let frame = Frame::new(FrameBody::Deliver(Box::new(Deliver {
        from_agent_did: delivery.from_agent_did.clone(),
        to_agent_did: delivery.to_agent_did.clone(),
        payload,
        delivery_source: optional("delivery-source", &delivery.delivery_source)?,
        content_type: optional("content-type", &delivery.content_type)?,
        group_id: optional("group-id", &delivery.group_id)?,
        conversation_id: optional("conversation-id", &delivery.conversation_id)?,
        reply_to: optional("reply-to", &delivery.reply_to)?,
    })));
    let size = frame.to_json().len();
    if size > MAX_FRAME_BYTES {
        return Err(invalid(format!(
            "its frame is {size} bytes, over the {MAX_FRAME_BYTES}-byte limit"
        )));
    }
    Ok(frame)
}

/// Moves the rows of the `receipts` table of clawq before deliveries (one table per
/// kind) into `outbound`, keeping their frame ids, and drops that table. Returns how
/// many rows moved.
fn migrate_receipts_table(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let exists: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'receipts')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(0);
    }
    let rows: Vec<(String, String, Frame, i64, i64, bool)> = tx
        .prepare(
            "SELECT agent_did, request_id, recipient, status, reason, frame_id, frame_ts,
                    updated_ms, expires_ms, acked FROM receipts",
        )?
        .query_map([], |r| {
            let status: String = r.get(3)?;
            let frame = Frame {
                id: r.get(5)?,
                ts: r.get(6)?,
                body: FrameBody::Receipt {
                    original_frame_id: r.get(1)?,
                    to_agent_did: r.get(2)?,
                    status: ReceiptStatus::parse(&status).unwrap_or(ReceiptStatus::DeadLettered),
                    reason: r.get(4)?,
                },
            };
            Ok((r.get(0)?, r.get(1)?, frame, r.get(7)?, r.get(8)?, r.get(9)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    {
        let mut insert = tx.prepare(
            "INSERT OR IGNORE INTO outbound (agent_did, kind, key, frame_id, frame, updated_ms,
                 expires_ms, acked, attempts, next_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?6)",
        )?;
        for (did, key, frame, updated, expires, acked) in &rows {
            insert.execute(params![
                did,
                Kind::Receipt.as_str(),
                key,
                frame.id,
                frame.to_json(),
                updated,
                expires,
                acked
            ])?;
        }
    }
    tx.execute_batch("DROP TABLE receipts")?;
    tx.commit()?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::hub::Outbound;
    use super::*;
    use serde_json::{Value, json};

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
    const C: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PD";
    /// How long a test waits for a due retry before failing.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// Sessions with the default limits but `retry`.
    fn open_with_retry(dir: &Path, retry: Retry) -> (Arc<ConnectionHub>, RelaySessions) {
        let limits = SessionLimits {
            retry,
            ..SessionLimits::default()
        };
        open(dir, limits)
    }

    fn open(dir: &Path, limits: SessionLimits) -> (Arc<ConnectionHub>, RelaySessions) {
        let hub = Arc::new(ConnectionHub::default());
        let sessions =
            RelaySessions::open(&crate::store::test_db(dir), hub.clone(), limits).unwrap();
        (hub, sessions)
    }

    fn capped(dir: &Path, max: usize) -> (Arc<ConnectionHub>, RelaySessions) {
        let limits = SessionLimits {
            max_per_agent: max,
            ..SessionLimits::default()
        };
        open(dir, limits)
    }

    fn receipt(id: &str, status: ReceiptStatus, reason: Option<&str>) -> ReceiptIn {
        ReceiptIn {
            request_id: id.into(),
            sender_agent_did: A.into(),
            recipient_agent_did: B.into(),
            status,
            reason: reason.map(Into::into),
        }
    }

    fn delivery(key: &str) -> DeliveryIn {
        DeliveryIn {
            dedup_key: key.into(),
            from_agent_did: B.into(),
            to_agent_did: A.into(),
            payload: r#"{"system": {"type": "pair.accepted"}}"#.into(),
            delivery_source: Some("proxy.events.queue.pair_accepted".into()),
            content_type: None,
            group_id: Some("grp_01HZX4M3Q8V2J7K9T6R5W1N0PB".into()),
            conversation_id: Some(" ".into()),
            reply_to: None,
        }
    }

    fn json(frame: &str) -> Value {
        serde_json::from_str(frame).unwrap()
    }

    /// The frames pushed on connect, parsed.
    async fn on_connect(sessions: &RelaySessions, did: &str) -> Vec<Value> {
        let push = sessions.push(did, Ask::Connected).await.unwrap();
        push.frames.iter().map(|f| json(f)).collect()
    }

    /// Waits until the session of `did` has frames due, and takes them.
    async fn next_retry(sessions: &RelaySessions, did: &str) -> Push {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let push = sessions.push(did, Ask::Due).await.unwrap();
            if !push.frames.is_empty() {
                return push;
            }
            let at = push.next_at_ms.expect("a frame is waiting for its retry");
            let wait = Duration::from_millis(at.saturating_sub(now_ms()));
            assert!(
                tokio::time::Instant::now() + wait < deadline,
                "no retry due within {DEADLINE:?}"
            );
            // Waits for the due time the session announced, not for a guess.
            tokio::time::sleep(wait).await;
        }
    }

    #[tokio::test]
    async fn one_receipt_row_per_request_id_pushed_only_when_new_or_changed() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, sessions) = capped(dir.path(), 500);
        let delivered = receipt("r1", ReceiptStatus::DeliveredToWebhook, None);
        let first = sessions.deliver_receipt(delivered.clone()).await.unwrap();
        assert_eq!(first, Delivery::Stored);
        let again = sessions.deliver_receipt(delivered).await.unwrap();
        assert_eq!(again, Delivery::Unchanged);

        let (_, outgoing) = hub.register(A);
        let dead = receipt("r1", ReceiptStatus::DeadLettered, Some("gone"));
        let before_connect = sessions.deliver_receipt(dead.clone()).await.unwrap();
        assert_eq!(before_connect, Delivery::Stored, "not live yet");
        let connect = sessions.push(A, Ask::Connected).await.unwrap().frames;
        assert_eq!(outgoing.next().await, Outbound::Frames(connect.clone()));
        assert_eq!(connect.len(), 1, "the connect push carries it");
        let mut changed = dead;
        changed.reason = Some("gone for good".into());
        let pushed = sessions.deliver_receipt(changed).await.unwrap();
        assert_eq!(pushed, Delivery::Pushed(1), "pushed by its own turn");
        let Outbound::Frames(pushed) = outgoing.next().await else {
            panic!("frames expected")
        };
        assert_eq!(pushed.len(), 1);
        let due = sessions.push(A, Ask::Due).await.unwrap();
        assert!(due.frames.is_empty(), "its first push is counted");
        let frame = json(&pushed[0]);
        assert_eq!(
            (&frame["type"], &frame["status"]),
            (&json!("receipt"), &json!("dead_lettered"))
        );

        let mut conflicting = receipt("r1", ReceiptStatus::DeliveredToWebhook, None);
        conflicting.recipient_agent_did = C.into();
        let ignored = sessions.deliver_receipt(conflicting).await.unwrap();
        assert_eq!(ignored, Delivery::Ignored);

        let pending = on_connect(&sessions, A).await;
        assert_eq!(pending.len(), 1);
        assert_eq!(
            pending[0]["id"], frame["id"],
            "the same frame, pushed again"
        );
        let id = pending[0]["id"].as_str().unwrap();
        assert!(
            !sessions.ack(A, Kind::Deliver, id).await.unwrap(),
            "a receipt is not a delivery"
        );
        assert!(sessions.ack(A, Kind::Receipt, id).await.unwrap());
        assert!(on_connect(&sessions, A).await.is_empty());
        assert_eq!(sessions.resident_actors(), 0, "idle actors are unloaded");
    }

    /// The frames `outgoing` gets until there are `count`, within the deadline.
    async fn frames_pushed(outgoing: &super::super::hub::Outgoing, count: usize) -> Vec<String> {
        let mut frames = Vec::new();
        while frames.len() < count {
            match tokio::time::timeout(DEADLINE, outgoing.next()).await {
                Ok(Outbound::Frames(more)) => frames.extend(more),
                other => panic!("{} of {count} frames, then {other:?}", frames.len()),
            }
        }
        frames
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_sessions_frames_are_pushed_in_the_order_it_recorded_them_under_concurrent_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, sessions) = capped(dir.path(), 500);
        let sessions = Arc::new(sessions);
        let (_, outgoing) = hub.register(A);
        sessions.push(A, Ask::Connected).await.unwrap();
        // Four batches at once, each handing its receipts over one after the other.
        let (batches, per_batch) = (4, 50);
        let calls = (0..batches).map(|b| {
            let sessions = sessions.clone();
            tokio::spawn(async move {
                for i in 0..per_batch {
                    let id = format!("b{b}-{i:02}");
                    let receipt = receipt(&id, ReceiptStatus::DeliveredToWebhook, None);
                    let pushed = sessions.deliver_receipt(receipt).await.unwrap();
                    assert_eq!(pushed, Delivery::Pushed(1));
                }
            })
        });
        for call in futures_util::future::join_all(calls).await {
            call.unwrap();
        }
        let live: Vec<Value> = frames_pushed(&outgoing, batches * per_batch)
            .await
            .iter()
            .map(|f| json(f))
            .collect();
        for b in 0..batches {
            let of_batch: Vec<&str> = live
                .iter()
                .map(|f| f["originalFrameId"].as_str().unwrap())
                .filter(|id| id.starts_with(&format!("b{b}-")))
                .collect();
            let mut sorted = of_batch.clone();
            sorted.sort();
            assert_eq!(of_batch, sorted, "batch {b}: in the order it called");
        }
        // The order the session keeps them in: the order of the next connect.
        let (_, reconnected) = hub.register(A);
        sessions.push(A, Ask::Connected).await.unwrap();
        let kept = frames_pushed(&reconnected, batches * per_batch).await;
        let ids =
            |frames: &[Value]| -> Vec<Value> { frames.iter().map(|f| f["id"].clone()).collect() };
        let kept: Vec<Value> = kept.iter().map(|f| json(f)).collect();
        assert_eq!(ids(&live), ids(&kept), "pushed in the order recorded");
    }

    #[tokio::test]
    async fn an_actor_is_in_memory_only_while_it_has_calls_and_keeps_its_rows_when_unloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sessions) = capped(dir.path(), 500);
        let agents: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "did:cdi:registry.clawdentity.com:agent:{}",
                    ulid::Ulid::from_parts(i, 1)
                )
            })
            .collect();
        let calls = agents.iter().map(|did| {
            let mut receipt = receipt("r1", ReceiptStatus::DeliveredToWebhook, None);
            receipt.sender_agent_did = did.clone();
            sessions.deliver_receipt(receipt)
        });
        for stored in futures_util::future::join_all(calls).await {
            assert_eq!(stored.unwrap(), Delivery::Stored);
        }
        assert_eq!(sessions.resident_actors(), 0, "every actor unloaded");

        // A call is in the actor's mailbox as soon as it is made: the actor is loaded.
        let settling = sessions.ack(&agents[7], Kind::Receipt, "01HZX4M3Q8V2J7K9T6R5W1N0PB");
        assert_eq!(sessions.resident_actors(), 1);
        assert!(!settling.await.unwrap(), "no such frame");
        assert_eq!(sessions.resident_actors(), 0);
        let frames = on_connect(&sessions, &agents[7]).await;
        assert_eq!(frames.len(), 1, "its row outlived its actor");
        assert_eq!(frames[0]["originalFrameId"], "r1");
    }

    #[tokio::test]
    async fn a_call_whose_write_fails_leaves_nothing_behind_and_the_rest_of_its_turn_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, sessions) = capped(dir.path(), 1);
        sessions
            .deliver_receipt(receipt("r0", ReceiptStatus::DeliveredToWebhook, None))
            .await
            .unwrap();
        let (_, outgoing) = hub.register(A);
        let connect = sessions.push(A, Ask::Connected).await.unwrap().frames;
        assert_eq!(frames_pushed(&outgoing, 1).await, connect);
        let r0 = json(&connect[0])["id"].as_str().unwrap().to_owned();
        // Recording r1 stores its row, then fails dropping r0 past the cap of 1.
        let db = Connection::open(dir.path().join(crate::store::DATABASE_FILE)).unwrap();
        db.execute_batch(
            "CREATE TRIGGER refuse BEFORE DELETE ON outbound WHEN old.key = 'r0'
             BEGIN SELECT RAISE(ABORT, 'no deleting today'); END;",
        )
        .unwrap();
        // The ack is in the mailbox first: both calls share one turn.
        let acked = sessions.ack(A, Kind::Receipt, &r0);
        let failed =
            sessions.deliver_receipt(receipt("r1", ReceiptStatus::DeliveredToWebhook, None));
        let (acked, failed) = tokio::join!(acked, failed);
        match failed {
            Err(SessionError::Unavailable(why)) => {
                assert!(why.contains("no deleting today"), "{why}")
            }
            other => panic!("a transient failure expected, got {other:?}"),
        }
        assert!(acked.unwrap(), "the other call of the turn committed");
        let idle = tokio::time::timeout(Duration::from_millis(50), outgoing.next()).await;
        assert!(idle.is_err(), "nothing pushed: {idle:?}");
        assert_eq!(
            sessions.dropped_total(Kind::Receipt),
            0,
            "nothing counted dropped"
        );
        db.execute_batch("DROP TRIGGER refuse").unwrap();
        let keys: Vec<String> = db
            .prepare("SELECT key FROM outbound WHERE agent_did = ?1")
            .unwrap()
            .query_map([A], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(keys, ["r0"], "r1's row was undone with its call");
        assert_eq!(
            sessions
                .deliver_receipt(receipt("r1", ReceiptStatus::DeliveredToWebhook, None))
                .await
                .unwrap(),
            Delivery::Pushed(1),
            "the retry goes through"
        );
    }

    #[tokio::test]
    async fn a_repeated_dedup_key_is_unchanged_acked_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sessions) = capped(dir.path(), 500);
        assert_eq!(
            sessions.deliver(delivery("k1")).await.unwrap(),
            Delivery::Stored
        );
        let mut other_payload = delivery("k1");
        other_payload.payload = "2".into();
        assert_eq!(
            sessions.deliver(other_payload).await.unwrap(),
            Delivery::Unchanged
        );

        let frames = on_connect(&sessions, A).await;
        assert_eq!(frames.len(), 1);
        let id = frames[0]["id"].as_str().unwrap();
        assert!(sessions.ack(A, Kind::Deliver, id).await.unwrap());
        assert_eq!(
            sessions.deliver(delivery("k1")).await.unwrap(),
            Delivery::Unchanged,
            "an acked delivery still dedups"
        );
        assert_eq!(
            sessions.deliver(delivery("k2")).await.unwrap(),
            Delivery::Stored
        );
        assert_eq!(sessions.pending(Kind::Deliver).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn deliveries_are_pushed_on_every_connect_as_the_same_frame_until_acked() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sessions) = capped(dir.path(), 500);
        sessions.deliver(delivery("k1")).await.unwrap();
        let first = on_connect(&sessions, A).await;
        assert_eq!(first.len(), 1);
        let frame = &first[0];
        assert_eq!(frame["type"], "deliver");
        assert_eq!(
            (&frame["fromAgentDid"], &frame["toAgentDid"]),
            (&json!(B), &json!(A))
        );
        assert_eq!(
            frame["payload"],
            json!({"system": {"type": "pair.accepted"}})
        );
        assert_eq!(frame["deliverySource"], "proxy.events.queue.pair_accepted");
        assert_eq!(frame["groupId"], "grp_01HZX4M3Q8V2J7K9T6R5W1N0PB");
        for absent in ["contentType", "conversationId", "replyTo"] {
            assert!(frame.get(absent).is_none(), "{absent} is omitted: {frame}");
        }
        assert!(
            Frame::parse(&frame.to_string()).is_ok(),
            "a valid frame: {frame}"
        );

        let second = on_connect(&sessions, A).await;
        assert_eq!(
            (&second[0]["id"], &second[0]["ts"]),
            (&frame["id"], &frame["ts"])
        );
        let id = frame["id"].as_str().unwrap();
        assert!(sessions.ack(A, Kind::Deliver, id).await.unwrap());
        let after = sessions.push(A, Ask::Connected).await.unwrap();
        assert_eq!(
            after,
            Push {
                frames: vec![],
                next_at_ms: None
            },
            "never pushed again"
        );
        assert!(
            on_connect(&sessions, B).await.is_empty(),
            "only the recipient's session holds it"
        );
    }

    #[tokio::test]
    async fn unacked_frames_are_retried_with_backoff_then_dropped_after_the_last_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let retry = Retry {
            initial: Duration::from_millis(40),
            max: Duration::from_millis(100),
            jitter: 0.0,
            max_attempts: 4,
        };
        let (_, sessions) = open_with_retry(dir.path(), retry);
        sessions.deliver(delivery("k1")).await.unwrap();
        sessions
            .deliver_receipt(receipt("r1", ReceiptStatus::DeliveredToWebhook, None))
            .await
            .unwrap();

        // The delay the session announces after a push, seen right after it.
        let delay = |push: &Push| push.next_at_ms.unwrap().saturating_sub(now_ms());
        let push = sessions.push(A, Ask::Connected).await.unwrap();
        let mut delays = vec![delay(&push)];
        assert_eq!(push.frames.len(), 2, "attempt 1 of both");
        let first_ids: Vec<Value> = push.frames.iter().map(|f| json(f)["id"].clone()).collect();
        for attempt in 2..=4 {
            let push = next_retry(&sessions, A).await;
            delays.push(delay(&push));
            let ids: Vec<Value> = push.frames.iter().map(|f| json(f)["id"].clone()).collect();
            assert_eq!(ids, first_ids, "attempt {attempt}: the same frames");
        }
        // 40, 80, 100 (the max), 100 ms, less the time the check took.
        let want = [40, 80, 100, 100];
        for (got, want) in delays.iter().zip(want) {
            assert!(
                *got <= want && *got + 30 >= want,
                "delays {delays:?}, want {want:?}"
            );
        }

        let deadline = tokio::time::Instant::now() + DEADLINE;
        let last = loop {
            let push = sessions.push(A, Ask::Due).await.unwrap();
            assert!(push.frames.is_empty(), "no fifth attempt");
            match push.next_at_ms {
                None => break push,
                Some(at) => {
                    assert!(tokio::time::Instant::now() < deadline, "never dropped");
                    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await;
                }
            }
        };
        assert_eq!(last.next_at_ms, None, "nothing left to retry");
        assert_eq!(sessions.dropped(Kind::Deliver, DropReason::Attempts), 1);
        assert_eq!(sessions.dropped(Kind::Receipt, DropReason::Attempts), 1);
        assert!(
            on_connect(&sessions, A).await.is_empty(),
            "dropped for good"
        );
    }

    #[tokio::test]
    async fn receipts_are_retried_while_connected_until_receipt_ack() {
        let dir = tempfile::tempdir().unwrap();
        let retry = Retry {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(20),
            jitter: 0.2,
            max_attempts: 25,
        };
        let (_, sessions) = open_with_retry(dir.path(), retry);
        sessions
            .deliver_receipt(receipt("r1", ReceiptStatus::DeadLettered, Some("gone")))
            .await
            .unwrap();
        let first = sessions.push(A, Ask::Due).await.unwrap();
        assert_eq!(first.frames.len(), 1, "due at once");
        let retried = next_retry(&sessions, A).await;
        assert_eq!(retried.frames, first.frames, "pushed again while unacked");
        let id = json(&first.frames[0])["id"].as_str().unwrap().to_owned();
        assert!(sessions.ack(A, Kind::Receipt, &id).await.unwrap());
        let after = sessions.push(A, Ask::Due).await.unwrap();
        assert_eq!(
            after,
            Push {
                frames: vec![],
                next_at_ms: None
            },
            "no retry after the ack"
        );
    }

    /// Records receipts `r0`..`r4` and deliveries `k0`..`k4` for agent `A`, in turn.
    async fn record_five_of_each(sessions: &RelaySessions) {
        for i in 0..5 {
            let id = format!("r{i}");
            sessions
                .deliver_receipt(receipt(&id, ReceiptStatus::DeliveredToWebhook, None))
                .await
                .unwrap();
            sessions.deliver(delivery(&format!("k{i}"))).await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_oldest_rows_of_a_kind_are_dropped_past_the_cap_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sessions) = capped(dir.path(), 3);
        record_five_of_each(&sessions).await;
        let kept: Vec<String> = on_connect(&sessions, A)
            .await
            .iter()
            .map(|f| {
                let key = if f["type"] == "receipt" {
                    &f["originalFrameId"]
                } else {
                    &f["id"]
                };
                key.as_str().unwrap().to_owned()
            })
            .filter(|key| key.starts_with('r'))
            .collect();
        assert_eq!(kept, ["r2", "r3", "r4"]);
        assert_eq!(sessions.dropped(Kind::Receipt, DropReason::Cap), 2);
        assert_eq!(sessions.dropped(Kind::Deliver, DropReason::Cap), 2);
        assert_eq!(sessions.pending(Kind::Deliver).await.unwrap(), 3);
        assert_eq!(sessions.dropped_total(Kind::Deliver), 2);
    }

    /// Rows held: (agent, kind, how many).
    type Held = Vec<(String, String, i64)>;

    /// The rows each agent holds by kind, as `outbound_counts` says and as recounted.
    fn counts(dir: &Path) -> (Held, Held) {
        let db = Connection::open(dir.join(crate::store::DATABASE_FILE)).unwrap();
        let rows = |sql: &str| -> Held {
            db.prepare(sql)
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        (
            rows("SELECT agent_did, kind, held FROM outbound_counts ORDER BY 1, 2"),
            rows(
                "SELECT agent_did, kind, COUNT(*) FROM outbound GROUP BY agent_did, kind
                 ORDER BY 1, 2",
            ),
        )
    }

    #[tokio::test]
    async fn the_row_counts_follow_every_insert_replacement_drop_and_undone_call() {
        let dir = tempfile::tempdir().unwrap();
        let retry = Retry {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            jitter: 0.0,
            max_attempts: 1,
        };
        let limits = SessionLimits {
            max_per_agent: 3,
            retry,
            ..SessionLimits::default()
        };
        let (hub, sessions) = open(dir.path(), limits);
        let agree = |after: &str| {
            let (kept, recounted) = counts(dir.path());
            assert_eq!(kept, recounted, "after {after}");
        };
        record_five_of_each(&sessions).await;
        agree("inserts past the cap");
        assert_eq!(
            counts(dir.path()).0,
            [
                (A.to_owned(), "deliver".to_owned(), 3),
                (A.to_owned(), "receipt".to_owned(), 3)
            ]
        );
        let changed = receipt("r4", ReceiptStatus::DeadLettered, Some("gone"));
        sessions.deliver_receipt(changed).await.unwrap();
        agree("a replaced receipt");
        // Pushed once (the last attempt), then dropped when its retry is over.
        let (_, _outgoing) = hub.register(A);
        assert_eq!(on_connect(&sessions, A).await.len(), 6);
        sessions.push(A, Ask::Due).await.unwrap();
        agree("rows dropped after their last attempt");
        assert_eq!(sessions.dropped_total(Kind::Receipt), 2 + 3);
        assert!(counts(dir.path()).0.is_empty(), "no empty count is kept");

        // A call undone by its savepoint takes its count change with it.
        let db = Connection::open(dir.path().join(crate::store::DATABASE_FILE)).unwrap();
        db.execute_batch(
            "CREATE TRIGGER refuse AFTER INSERT ON outbound WHEN new.key = 'k9'
             BEGIN SELECT RAISE(ABORT, 'no inserting today'); END;",
        )
        .unwrap();
        assert!(sessions.deliver(delivery("k9")).await.is_err());
        agree("an undone call");
        db.execute_batch("DROP TRIGGER refuse").unwrap();

        // Rows of another session, then counts rebuilt from the rows at open.
        let mut other = delivery("k1");
        other.to_agent_did = C.into();
        sessions.deliver(other).await.unwrap();
        db.execute_batch("UPDATE outbound_counts SET held = 7")
            .unwrap();
        drop(sessions);
        let _reopened =
            RelaySessions::open(&crate::store::test_db(dir.path()), Arc::default(), limits)
                .unwrap();
        agree("a reopen");
        assert_eq!(
            counts(dir.path()).0,
            [(C.to_owned(), "deliver".to_owned(), 1)]
        );
    }

    #[test]
    fn no_statement_of_a_turn_scans_the_agents_rows() {
        let db = Connection::open_in_memory().unwrap();
        db.execute_batch(SCHEMA).unwrap();
        db.execute_batch(COUNTERS).unwrap();
        let statements = [
            DELETE_EXPIRED,
            DELETE_EXHAUSTED,
            SELECT_DUE,
            SELECT_NEXT_DUE,
            SELECT_HELD,
            DELETE_OLDEST,
        ];
        for sql in statements {
            let mut explain = db.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let params = (1..=explain.parameter_count()).map(|_| 0);
            let steps: Vec<String> = explain
                .query_map(rusqlite::params_from_iter(params), |r| r.get(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert!(
                steps.iter().all(|step| !step.starts_with("SCAN")),
                "{sql}: {steps:?}"
            );
            // Only the due rows are sorted (they are few, or it is a connect push).
            if sql != SELECT_DUE {
                assert!(
                    steps.iter().all(|step| !step.contains("TEMP B-TREE")),
                    "{sql}: {steps:?}"
                );
            }
            let searched = |index: &str| steps.iter().any(|step| step.contains(index));
            let index = match sql {
                DELETE_EXPIRED => "outbound_expiry (agent_did=? AND expires_ms<?)",
                DELETE_EXHAUSTED | SELECT_DUE => "outbound_due (agent_did=? AND next_ms<?)",
                SELECT_NEXT_DUE => "outbound_due (agent_did=?)",
                SELECT_HELD => "PRIMARY KEY (agent_did=? AND kind=?)",
                _ => "outbound_age (agent_did=? AND kind=?)",
            };
            assert!(searched(index), "{sql}: {steps:?}");
        }
    }

    #[tokio::test]
    async fn expired_rows_are_dropped_and_counted_unless_acked() {
        let dir = tempfile::tempdir().unwrap();
        // A zero TTL: every row expires at the session's next turn.
        let limits = SessionLimits {
            ttl: Duration::ZERO,
            ..SessionLimits::default()
        };
        let (_, sessions) = open(dir.path(), limits);
        sessions.deliver(delivery("k1")).await.unwrap();
        sessions
            .deliver_receipt(receipt("r1", ReceiptStatus::DeliveredToWebhook, None))
            .await
            .unwrap();
        assert!(on_connect(&sessions, A).await.is_empty());
        assert_eq!(sessions.dropped(Kind::Deliver, DropReason::Expired), 1);
        assert_eq!(sessions.dropped(Kind::Receipt, DropReason::Expired), 1);
        assert_eq!(
            sessions.deliver(delivery("k1")).await.unwrap(),
            Delivery::Stored,
            "an expired key no longer dedups"
        );
        // A session nobody calls again: the sweep accounts for its expired row.
        assert_eq!(sessions.sweep_expired().await.unwrap(), 1);
        assert_eq!(sessions.dropped(Kind::Deliver, DropReason::Expired), 2);
        assert_eq!(sessions.sweep_expired().await.unwrap(), 0, "nothing left");
    }

    #[tokio::test]
    async fn a_rejected_delivery_is_counted_and_never_pushed_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sessions) = capped(dir.path(), 500);
        sessions.deliver(delivery("k1")).await.unwrap();
        let frames = on_connect(&sessions, A).await;
        let id = frames[0]["id"].as_str().unwrap();
        assert!(
            sessions
                .reject(A, Kind::Deliver, id, Some("outbox full"))
                .await
                .unwrap()
        );
        assert_eq!(sessions.dropped(Kind::Deliver, DropReason::Rejected), 1);
        assert!(on_connect(&sessions, A).await.is_empty());
        assert!(
            sessions.reject(A, Kind::Deliver, id, None).await.unwrap(),
            "known frame"
        );
        assert_eq!(
            sessions.dropped(Kind::Deliver, DropReason::Rejected),
            1,
            "a second refusal drops nothing more"
        );
        let unknown = ulid::Ulid::new().to_string();
        assert!(
            !sessions
                .reject(A, Kind::Deliver, &unknown, None)
                .await
                .unwrap()
        );
        assert_eq!(sessions.dropped(Kind::Deliver, DropReason::Rejected), 1);
        assert_eq!(
            sessions.deliver(delivery("k1")).await.unwrap(),
            Delivery::Unchanged,
            "a refused delivery still dedups"
        );
    }

    #[tokio::test]
    async fn invalid_receipts_and_deliveries_are_refused_permanently_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sessions) = capped(dir.path(), 3);
        let mut bad = receipt(" ", ReceiptStatus::DeliveredToWebhook, None);
        assert!(matches!(
            sessions.deliver_receipt(bad.clone()).await,
            Err(SessionError::Invalid(_))
        ));
        bad.request_id = "r".into();
        bad.sender_agent_did = "did:cdi:nope".into();
        assert!(matches!(
            sessions.deliver_receipt(bad).await,
            Err(SessionError::Invalid(_))
        ));

        let long = "x".repeat(MAX_DELIVERY_FIELD_BYTES + 1);
        type Spoil<'a> = Box<dyn Fn(&mut DeliveryIn) + 'a>;
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "`dedup-key` is blank",
                Box::new(|d| d.dedup_key = " ".into()),
            ),
            (
                "`dedup-key` is 1025 bytes",
                Box::new(|d| d.dedup_key = long.clone()),
            ),
            (
                "`from-agent-did`",
                Box::new(|d| d.from_agent_did = "did:cdi:x".into()),
            ),
            (
                "`to-agent-did`",
                Box::new(|d| d.to_agent_did = A.replace("agent", "human")),
            ),
            (
                "`payload` is not JSON",
                Box::new(|d| d.payload = "{oops".into()),
            ),
            (
                "`reply-to` is 1025 bytes",
                Box::new(|d| d.reply_to = Some(long.clone())),
            ),
            (
                "its frame is",
                Box::new(|d| d.payload = format!("\"{}\"", "p".repeat(MAX_FRAME_BYTES))),
            ),
        ];
        for (want, spoil) in cases {
            let mut bad = delivery("k");
            spoil(&mut bad);
            match sessions.deliver(bad).await {
                Err(SessionError::Invalid(why)) => assert!(why.contains(want), "{why}"),
                other => panic!("{want}: {other:?}"),
            }
        }
        assert!(on_connect(&sessions, A).await.is_empty(), "nothing stored");
    }

    #[tokio::test]
    async fn the_receipts_of_an_older_sessions_db_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        // As an older clawq left it: its own file, imported at open.
        let old = Connection::open(path.join("sessions.db")).unwrap();
        old.execute_batch(&format!(
            "CREATE TABLE receipts (
                 agent_did TEXT NOT NULL, request_id TEXT NOT NULL, recipient TEXT NOT NULL,
                 status TEXT NOT NULL, reason TEXT, frame_id TEXT NOT NULL,
                 frame_ts TEXT NOT NULL, updated_ms INTEGER NOT NULL,
                 expires_ms INTEGER NOT NULL, acked INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (agent_did, request_id));
             INSERT INTO receipts VALUES ('{A}', 'old-1', '{B}', 'dead_lettered', 'gone',
                 '01HZX4M3Q8V2J7K9T6R5W1N0PB', '2026-11-25T10:00:00.000Z', {now}, {later}, 0);
             INSERT INTO receipts VALUES ('{A}', 'old-2', '{B}', 'dead_lettered', NULL,
                 '01HZX4M3Q8V2J7K9T6R5W1N0PC', '2026-11-25T10:00:00.000Z', {now}, {later}, 1);",
            now = now_ms(),
            later = now_ms() + 3_600_000,
        ))
        .unwrap();
        drop(old);
        let sessions = RelaySessions::open(
            &crate::store::test_db(&path),
            Arc::default(),
            SessionLimits::default(),
        )
        .unwrap();
        let frames = on_connect(&sessions, A).await;
        assert_eq!(frames.len(), 1, "the acked receipt stays acked: {frames:?}");
        let want = json!({"v": 1, "type": "receipt", "id": "01HZX4M3Q8V2J7K9T6R5W1N0PB",
            "ts": "2026-11-25T10:00:00.000Z", "originalFrameId": "old-1", "toAgentDid": B,
            "status": "dead_lettered", "reason": "gone"});
        assert_eq!(frames[0], want);
        let unchanged = receipt("old-1", ReceiptStatus::DeadLettered, Some("gone"));
        assert_eq!(
            sessions.deliver_receipt(unchanged).await.unwrap(),
            Delivery::Unchanged
        );
        drop(sessions);
        let reopened = RelaySessions::open(
            &crate::store::test_db(&path),
            Arc::default(),
            SessionLimits::default(),
        );
        assert_eq!(
            on_connect(&reopened.unwrap(), A).await.len(),
            1,
            "migrated once"
        );
    }
}
