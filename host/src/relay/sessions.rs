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
//! Then the same rules apply to every row: a new row wakes the agent's connection
//! ([`ConnectionHub::wake`]), which asks [`RelaySessions::to_push`] for what to send:
//! every unacked row on connect, then the rows whose retry is due while it stays
//! connected ([`Retry`]: 1 s doubling to 30 s, jitter 0.2, at most 25 pushes). An ack
//! marks a row done for good (the row stays until its TTL, for dedup). A row is dropped
//! when the agent holds more than [`SessionLimits::max_per_agent`] of its kind (oldest
//! first), when it expires unacked, when it was pushed [`Retry::max_attempts`] times
//! without an ack, or when the connector refuses it (`deliver_ack` with `accepted:
//! false`); every drop is logged (warn, with agent, kind, key and reason) and counted
//! ([`RelaySessions::dropped`], `clawq_relay_frames_dropped_total{kind, reason}`).
//!
//! An actor exists in memory only while a call for it runs: calls for one agent run one
//! at a time, and an idle actor is dropped, so 10,000 agents cost nothing resident. Each
//! call is one transaction, which starts by dropping the agent's expired rows; a periodic
//! sweep ([`RelaySessions::sweep_every`]) does it for the agents nobody calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawq_protocol::did::validate_agent_did;
use clawq_protocol::receipt::check_receipt;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::hub::ConnectionHub;
use crate::clock::now_ms;
use crate::frame::{Deliver, Frame, FrameBody, MAX_FRAME_BYTES, ReceiptStatus};
use crate::store::Database;

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
    /// Recorded, and the agent's connection (this many: 0 or 1) was woken to push it.
    Pushed(u32),
    /// Recorded for the next connect.
    Stored,
    /// Already held (same receipt status and reason, or same delivery dedup key):
    /// nothing done.
    Unchanged,
    /// The request id is stored for another recipient: ignored.
    Ignored,
}

/// Why a session refused a call.
#[derive(Debug, thiserror::Error)]
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
    /// It just connected: every unacked frame.
    Connected,
    /// Its retry timer fired or it was woken: the frames due now.
    Due,
}

/// What a connection must send now, and when to ask again.
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

/// The `outbound` table (see the module documentation).
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
     CREATE INDEX IF NOT EXISTS outbound_frame ON outbound (agent_did, frame_id);";

/// Every relay session of the host.
pub struct RelaySessions {
    db: Mutex<Connection>,
    actors: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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
        let mut conn = db.connection(SCHEMA)?;
        let migrated = migrate_receipts_table(&mut conn)?;
        if migrated > 0 {
            tracing::info!(
                receipts = migrated,
                "moved the receipts of an older sessions.db"
            );
        }
        Ok(RelaySessions {
            db: Mutex::new(conn),
            actors: Mutex::new(HashMap::new()),
            hub,
            limits,
            dropped: Default::default(),
        })
    }

    /// The limits the sessions keep to.
    pub fn limits(&self) -> SessionLimits {
        self.limits
    }

    /// Runs `call` in the actor of `did`: after any earlier call of that actor, and with
    /// the actor dropped from memory afterwards if nobody else waits for it.
    async fn in_actor<T>(&self, did: &str, call: impl FnOnce(&mut Connection) -> T) -> T {
        let actor = {
            let mut actors = self.actors.lock().unwrap_or_else(|p| p.into_inner());
            actors.entry(did.to_owned()).or_default().clone()
        };
        let result = {
            let _turn = actor.lock().await;
            let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            call(&mut db)
        };
        let mut actors = self.actors.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: the map's and ours. Nobody else waits: unload.
        if Arc::strong_count(&actor) == 2 {
            actors.remove(did);
        }
        result
    }

    /// One turn of the session of `did`: a transaction that drops the expired rows, then
    /// runs `call`; the rows dropped are logged and counted once it commits.
    async fn turn<T>(
        &self,
        did: &str,
        call: impl FnOnce(&Transaction<'_>, u64, &mut Vec<Dropped>) -> Result<T, SessionError>,
    ) -> Result<T, SessionError> {
        let (value, dropped) = self
            .in_actor(did, |db| {
                let now = now_ms();
                let mut dropped = Vec::new();
                let tx = db.transaction()?;
                drop_expired(&tx, did, now, &mut dropped)?;
                let value = call(&tx, now, &mut dropped)?;
                tx.commit()?;
                Ok::<_, SessionError>((value, dropped))
            })
            .await?;
        for row in dropped {
            self.count_drop(did, &row);
        }
        Ok(value)
    }

    fn count_drop(&self, did: &str, row: &Dropped) {
        let (kind, reason) = (row.kind.as_str(), row.reason.as_str());
        tracing::warn!(agent = %did, kind, key = %row.key, reason, why = %row.why,
            "relay session dropped an unacked frame");
        self.dropped[row.kind as usize][row.reason as usize].fetch_add(1, Ordering::Relaxed);
        crate::metrics::relay_frame_dropped(kind, reason);
    }

    /// Records `receipt` in its sender's session (spec section 3) and wakes the sender's
    /// connection if it is new or changed.
    pub async fn deliver_receipt(&self, receipt: ReceiptIn) -> Result<Delivery, SessionError> {
        check_receipt(
            &receipt.request_id,
            &receipt.sender_agent_did,
            &receipt.recipient_agent_did,
        )
        .map_err(|why| SessionError::Invalid(format!("receipt: {why}")))?;
        let did = &receipt.sender_agent_did;
        let limits = self.limits;
        let kept = self
            .turn(did, |tx, now, dropped| {
                let stored: Option<String> = tx
                    .prepare_cached(
                        "SELECT frame FROM outbound WHERE agent_did = ?1 AND kind = ?2 AND key = ?3",
                    )?
                    .query_row(params![did, Kind::Receipt.as_str(), receipt.request_id], |r| {
                        r.get(0)
                    })
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
                        return Ok(Some(Delivery::Ignored));
                    }
                    if status == receipt.status && reason == receipt.reason {
                        return Ok(Some(Delivery::Unchanged));
                    }
                }
                let frame = Frame::new(FrameBody::Receipt {
                    original_frame_id: receipt.request_id.clone(),
                    to_agent_did: receipt.recipient_agent_did.clone(),
                    status: receipt.status,
                    reason: receipt.reason.clone(),
                });
                keep(tx, did, Kind::Receipt, &receipt.request_id, &frame, now, limits, dropped)?;
                Ok(None)
            })
            .await?;
        Ok(kept.unwrap_or_else(|| self.wake(did)))
    }

    /// Records `delivery` in the session of its `to_agent_did` (spec section 5) and
    /// wakes that agent's connection, unless the session holds its dedup key already.
    ///
    /// Refused as [`SessionError::Invalid`], naming the field: a blank or over-1-KiB
    /// dedup key, an invalid DID, a payload that is not JSON, an optional field over
    /// 1 KiB, a frame over 1 MiB. The fields are taken as they are (trim them first);
    /// a blank optional field is left out of the frame.
    pub async fn deliver(&self, delivery: DeliveryIn) -> Result<Delivery, SessionError> {
        let frame = delivery_frame(&delivery)?;
        let (did, key) = (&delivery.to_agent_did, &delivery.dedup_key);
        let limits = self.limits;
        let unchanged = self
            .turn(did, |tx, now, dropped| {
                let held = tx
                    .prepare_cached(
                        "SELECT 1 FROM outbound WHERE agent_did = ?1 AND kind = ?2 AND key = ?3",
                    )?
                    .exists(params![did, Kind::Deliver.as_str(), key])?;
                if !held {
                    keep(tx, did, Kind::Deliver, key, &frame, now, limits, dropped)?;
                }
                Ok(held)
            })
            .await?;
        Ok(if unchanged {
            Delivery::Unchanged
        } else {
            self.wake(did)
        })
    }

    /// Wakes the connection of `did` to push what is due.
    fn wake(&self, did: &str) -> Delivery {
        match self.hub.wake(did) {
            0 => Delivery::Stored,
            n => Delivery::Pushed(n),
        }
    }

    /// What the connection of `did` must send now (every unacked frame on connect, the
    /// due ones after), counted as pushed; frames pushed their last time and still
    /// unacked are dropped. Also says when to ask again.
    pub async fn to_push(&self, did: &str, ask: Ask) -> Result<Push, SessionError> {
        let retry = self.limits.retry;
        self.turn(did, |tx, now, dropped| {
            let mut exhausted = tx.prepare_cached(
                "DELETE FROM outbound WHERE agent_did = ?1 AND acked = 0 AND attempts >= ?2
                 AND next_ms <= ?3 RETURNING kind, key",
            )?;
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
            let due: Vec<(i64, String, u32)> = tx
                .prepare_cached(
                    "SELECT rowid, frame, attempts FROM outbound
                     WHERE agent_did = ?1 AND acked = 0 AND attempts < ?2 AND (?3 OR next_ms <= ?4)
                     ORDER BY updated_ms, rowid",
                )?
                .query_map(
                    params![did, retry.max_attempts, ask == Ask::Connected, now],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?
                .collect::<rusqlite::Result<_>>()?;
            let mut pushed = tx.prepare_cached(
                "UPDATE outbound SET attempts = ?2, next_ms = ?3 WHERE rowid = ?1",
            )?;
            let mut frames = Vec::with_capacity(due.len());
            for (rowid, frame, attempts) in due {
                let next = now + retry.delay(attempts + 1).as_millis() as u64;
                pushed.execute(params![rowid, attempts + 1, next])?;
                frames.push(frame);
            }
            let next_at_ms: Option<u64> = tx
                .prepare_cached(
                    "SELECT MIN(next_ms) FROM outbound WHERE agent_did = ?1 AND acked = 0",
                )?
                .query_row(params![did], |r| r.get(0))?;
            Ok(Push { frames, next_at_ms })
        })
        .await
    }

    /// Marks the `kind` frame `frame_id` of `did` acked: never pushed again. False when
    /// the session holds no such frame.
    pub async fn ack(&self, did: &str, kind: Kind, frame_id: &str) -> Result<bool, SessionError> {
        self.settle(did, kind, frame_id, None).await
    }

    /// Marks the `kind` frame `frame_id` of `did` refused by the connector, for `reason`:
    /// never pushed again, and dropped (logged and counted as `rejected`) unless it was
    /// acked before. False when the session holds no such frame.
    pub async fn reject(
        &self,
        did: &str,
        kind: Kind,
        frame_id: &str,
        reason: Option<&str>,
    ) -> Result<bool, SessionError> {
        let why = format!(
            "the connector refused it: {}",
            reason.unwrap_or("no reason given")
        );
        self.settle(did, kind, frame_id, Some(why)).await
    }

    /// Marks a frame done; with `rejected`, counts it dropped (if it was not done yet).
    async fn settle(
        &self,
        did: &str,
        kind: Kind,
        frame_id: &str,
        rejected: Option<String>,
    ) -> Result<bool, SessionError> {
        self.turn(did, |tx, _, dropped| {
            let row: Option<(String, bool)> = tx
                .prepare_cached(
                    "SELECT key, acked FROM outbound WHERE agent_did = ?1 AND kind = ?2
                     AND frame_id = ?3",
                )?
                .query_row(params![did, kind.as_str(), frame_id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            let Some((key, acked)) = &row else {
                return Ok(false);
            };
            if *acked {
                return Ok(true);
            }
            tx.prepare_cached(
                "UPDATE outbound SET acked = 1 WHERE agent_did = ?1 AND kind = ?2 AND key = ?3",
            )?
            .execute(params![did, kind.as_str(), key])?;
            if let Some(why) = rejected {
                dropped.push(Dropped {
                    kind,
                    key: key.clone(),
                    reason: DropReason::Rejected,
                    why,
                });
            }
            Ok(row.is_some())
        })
        .await
    }

    /// Drops the expired rows of every session (logging and counting the unacked ones),
    /// so that an agent that never calls again still has its expiries accounted for.
    /// Returns how many sessions had some.
    pub async fn sweep_expired(&self) -> Result<usize, SessionError> {
        let agents: Vec<String> = {
            let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            db.prepare_cached("SELECT DISTINCT agent_did FROM outbound WHERE expires_ms <= ?1")?
                .query_map(params![now_ms()], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        for did in &agents {
            self.turn(did, |_, _, _| Ok(())).await?;
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
        self.actors.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Rows of `kind` dropped unacked for `reason` since start.
    pub fn dropped(&self, kind: Kind, reason: DropReason) -> u64 {
        self.dropped[kind as usize][reason as usize].load(Ordering::Relaxed)
    }

    /// Rows of `kind` dropped unacked since start, for any reason.
    pub fn dropped_total(&self, kind: Kind) -> u64 {
        DropReason::ALL.iter().map(|r| self.dropped(kind, *r)).sum()
    }

    /// Unacked, unexpired rows of `kind` across every session.
    pub fn pending(&self, kind: Kind) -> Result<u64, SessionError> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let n = db
            .prepare_cached(
                "SELECT COUNT(*) FROM outbound WHERE kind = ?1 AND acked = 0 AND expires_ms > ?2",
            )?
            .query_row(params![kind.as_str(), now_ms()], |r| r.get(0))?;
        Ok(n)
    }
}

/// Deletes the expired rows of `did`, noting the unacked ones in `dropped`.
fn drop_expired(
    tx: &Transaction<'_>,
    did: &str,
    now: u64,
    dropped: &mut Vec<Dropped>,
) -> Result<(), SessionError> {
    let mut stmt = tx.prepare_cached(
        "DELETE FROM outbound WHERE agent_did = ?1 AND expires_ms <= ?2 RETURNING kind, key, acked",
    )?;
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

/// Stores `frame` as the row (`did`, `kind`, `key`), due to be pushed now, then drops
/// the oldest rows of that kind past the cap.
#[allow(clippy::too_many_arguments)]
fn keep(
    tx: &Transaction<'_>,
    did: &str,
    kind: Kind,
    key: &str,
    frame: &Frame,
    now: u64,
    limits: SessionLimits,
    dropped: &mut Vec<Dropped>,
) -> Result<(), SessionError> {
    let expires = now + limits.ttl.as_millis() as u64;
    tx.prepare_cached(
        "INSERT INTO outbound (agent_did, kind, key, frame_id, frame, updated_ms, expires_ms, acked, attempts, next_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, 0, ?6)
         ON CONFLICT (agent_did, kind, key) DO UPDATE SET frame_id = ?4, frame = ?5,
             updated_ms = ?6, expires_ms = ?7, acked = 0, attempts = 0, next_ms = ?6",
    )?
    .execute(params![did, kind.as_str(), key, frame.id, frame.to_json(), now, expires])?;
    let mut over = tx.prepare_cached(
        "DELETE FROM outbound WHERE agent_did = ?1 AND kind = ?2 AND key IN (
             SELECT key FROM outbound WHERE agent_did = ?1 AND kind = ?2
             ORDER BY updated_ms DESC, rowid DESC LIMIT -1 OFFSET ?3)
         RETURNING key, acked",
    )?;
    let rows = over.query_map(
        params![did, kind.as_str(), limits.max_per_agent as i64],
        |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)),
    )?;
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
    Ok(())
}

/// Checks `delivery` and builds its `deliver` frame.
fn delivery_frame(delivery: &DeliveryIn) -> Result<Frame, SessionError> {
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
        let push = sessions.to_push(did, Ask::Connected).await.unwrap();
        push.frames.iter().map(|f| json(f)).collect()
    }

    /// Waits until the session of `did` has frames due, and takes them.
    async fn next_retry(sessions: &RelaySessions, did: &str) -> Push {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let push = sessions.to_push(did, Ask::Due).await.unwrap();
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

        let (_, woken) = hub.register(A);
        let dead = receipt("r1", ReceiptStatus::DeadLettered, Some("gone"));
        let changed = sessions.deliver_receipt(dead).await.unwrap();
        assert_eq!(changed, Delivery::Pushed(1));
        assert_eq!(woken.next().await, Outbound::Wake);
        let pushed = sessions.to_push(A, Ask::Due).await.unwrap().frames;
        assert_eq!(pushed.len(), 1, "the changed row is due at once");
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
        assert_eq!(sessions.pending(Kind::Deliver).unwrap(), 1);
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
        let after = sessions.to_push(A, Ask::Connected).await.unwrap();
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
        let push = sessions.to_push(A, Ask::Connected).await.unwrap();
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
            let push = sessions.to_push(A, Ask::Due).await.unwrap();
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
        let first = sessions.to_push(A, Ask::Due).await.unwrap();
        assert_eq!(first.frames.len(), 1, "due at once");
        let retried = next_retry(&sessions, A).await;
        assert_eq!(retried.frames, first.frames, "pushed again while unacked");
        let id = json(&first.frames[0])["id"].as_str().unwrap().to_owned();
        assert!(sessions.ack(A, Kind::Receipt, &id).await.unwrap());
        let after = sessions.to_push(A, Ask::Due).await.unwrap();
        assert_eq!(
            after,
            Push {
                frames: vec![],
                next_at_ms: None
            },
            "no retry after the ack"
        );
    }

    #[tokio::test]
    async fn the_oldest_rows_of_a_kind_are_dropped_past_the_cap_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sessions) = capped(dir.path(), 3);
        for i in 0..5 {
            let id = format!("r{i}");
            sessions
                .deliver_receipt(receipt(&id, ReceiptStatus::DeliveredToWebhook, None))
                .await
                .unwrap();
            sessions.deliver(delivery(&format!("k{i}"))).await.unwrap();
        }
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
        assert_eq!(sessions.pending(Kind::Deliver).unwrap(), 3);
        assert_eq!(sessions.dropped_total(Kind::Deliver), 2);
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
