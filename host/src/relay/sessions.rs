//! Relay sessions: one actor per agent DID, like a Cloudflare Durable Object. A session
//! keeps its agent's delivery receipts (spec section 3) in SQLite, pushes new or changed
//! ones to the agent's connector and pushes every unacked one again on connect.
//!
//! An actor exists in memory only while a call for it runs: calls for one agent run one
//! at a time, and an idle actor is dropped, so 10,000 agents cost nothing resident.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawq_protocol::receipt::check_receipt;
use rusqlite::{Connection, OptionalExtension, params};

use super::hub::ConnectionHub;
use crate::clock::now_ms;
use crate::db::{self, Durability};
use crate::frame::{Frame, FrameBody, ReceiptStatus};

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

/// What a session did with a receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Recorded and pushed to this many connections.
    Pushed(u32),
    /// Recorded for the next connect.
    Stored,
    /// Same status and reason as the stored row: nothing done.
    Unchanged,
    /// The request id is stored for another recipient: ignored.
    Ignored,
}

/// Why a session refused a call.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The receipt is malformed; it will be refused again.
    #[error("invalid receipt: {0}")]
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

/// Limits of the sessions.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// How long a receipt row lives.
    pub receipt_ttl: Duration,
    /// Most receipt rows kept per agent; the oldest are dropped first.
    pub max_receipts_per_agent: usize,
}

/// Every relay session of the host.
pub struct RelaySessions {
    db: Mutex<Connection>,
    actors: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    hub: Arc<ConnectionHub>,
    limits: SessionLimits,
    dropped: AtomicU64,
}

impl RelaySessions {
    /// Opens (or creates) the sessions' storage at `path`.
    pub fn open(
        path: &Path,
        hub: Arc<ConnectionHub>,
        limits: SessionLimits,
    ) -> Result<Self, SessionError> {
        let conn = db::open(
            path,
            Durability::Process,
            "CREATE TABLE IF NOT EXISTS receipts (
                 agent_did  TEXT NOT NULL,
                 request_id TEXT NOT NULL,
                 recipient  TEXT NOT NULL,
                 status     TEXT NOT NULL,
                 reason     TEXT,
                 frame_id   TEXT NOT NULL,
                 frame_ts   TEXT NOT NULL,
                 updated_ms INTEGER NOT NULL,
                 expires_ms INTEGER NOT NULL,
                 acked      INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (agent_did, request_id)
             );
             CREATE INDEX IF NOT EXISTS receipts_age ON receipts (agent_did, updated_ms);",
        )?;
        Ok(RelaySessions {
            db: Mutex::new(conn),
            actors: Mutex::new(HashMap::new()),
            hub,
            limits,
            dropped: AtomicU64::new(0),
        })
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

    /// Records `receipt` in its sender's session and pushes it if it is new or changed.
    pub async fn deliver(&self, receipt: ReceiptIn) -> Result<Delivery, SessionError> {
        check_receipt(
            &receipt.request_id,
            &receipt.sender_agent_did,
            &receipt.recipient_agent_did,
            receipt.reason.as_deref(),
        )
        .map_err(SessionError::Invalid)?;
        let did = receipt.sender_agent_did.clone();
        let limits = self.limits;
        let recorded = self
            .in_actor(&did, |db| record(db, &receipt, limits))
            .await?;
        let (frame, dropped) = match recorded {
            Recorded::Frame(frame, dropped) => (frame, dropped),
            Recorded::Unchanged => return Ok(Delivery::Unchanged),
            Recorded::Ignored => return Ok(Delivery::Ignored),
        };
        if dropped > 0 {
            self.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::warn!(agent = %did, dropped, limit = limits.max_receipts_per_agent,
                "session full: oldest receipts dropped");
        }
        match self.hub.send(&did, frame.to_json()) {
            0 => Ok(Delivery::Stored),
            n => Ok(Delivery::Pushed(n)),
        }
    }

    /// The frames of every unexpired receipt of `did` its connector has not acked yet.
    pub async fn pending(&self, did: &str) -> Result<Vec<Frame>, SessionError> {
        self.in_actor(did, |db| {
            let mut stmt = db.prepare_cached(
                "SELECT frame_id, frame_ts, request_id, recipient, status, reason FROM receipts
                 WHERE agent_did = ?1 AND acked = 0 AND expires_ms > ?2 ORDER BY updated_ms",
            )?;
            let frames = stmt
                .query_map(params![did, now_ms()], |r| {
                    let status: String = r.get(4)?;
                    Ok(Frame {
                        id: r.get(0)?,
                        ts: r.get(1)?,
                        body: FrameBody::Receipt {
                            original_frame_id: r.get(2)?,
                            to_agent_did: r.get(3)?,
                            status: ReceiptStatus::parse(&status)
                                .unwrap_or(ReceiptStatus::DeadLettered),
                            reason: r.get(5)?,
                        },
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(frames)
        })
        .await
    }

    /// Marks the receipt frame `frame_id` of `did` acked by its connector.
    pub async fn ack(&self, did: &str, frame_id: &str) -> Result<bool, SessionError> {
        self.in_actor(did, |db| {
            let n = db
                .prepare_cached(
                    "UPDATE receipts SET acked = 1 WHERE agent_did = ?1 AND frame_id = ?2",
                )?
                .execute(params![did, frame_id])?;
            Ok(n > 0)
        })
        .await
    }

    /// Actors in memory right now.
    pub fn resident_actors(&self) -> usize {
        self.actors.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Receipts dropped because a session was full, since start.
    pub fn dropped_receipts(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What recording a receipt did.
enum Recorded {
    /// A new or changed row, to push; and how many old rows the cap dropped.
    Frame(Frame, usize),
    Unchanged,
    Ignored,
}

fn record(
    db: &mut Connection,
    receipt: &ReceiptIn,
    limits: SessionLimits,
) -> Result<Recorded, SessionError> {
    let did = &receipt.sender_agent_did;
    let now = now_ms();
    let tx = db.transaction()?;
    tx.prepare_cached("DELETE FROM receipts WHERE agent_did = ?1 AND expires_ms <= ?2")?
        .execute(params![did, now])?;
    let stored: Option<(String, String, Option<String>)> = tx
        .prepare_cached("SELECT recipient, status, reason FROM receipts WHERE agent_did = ?1 AND request_id = ?2")?
        .query_row(params![did, receipt.request_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((recipient, status, reason)) = stored {
        if recipient != receipt.recipient_agent_did {
            return Ok(Recorded::Ignored);
        }
        if status == receipt.status.as_str() && reason == receipt.reason {
            return Ok(Recorded::Unchanged);
        }
    }
    let frame = Frame::new(FrameBody::Receipt {
        original_frame_id: receipt.request_id.clone(),
        to_agent_did: receipt.recipient_agent_did.clone(),
        status: receipt.status,
        reason: receipt.reason.clone(),
    });
    let expires = now + limits.receipt_ttl.as_millis() as u64;
    tx.prepare_cached(
        "INSERT INTO receipts (agent_did, request_id, recipient, status, reason, frame_id, frame_ts, updated_ms, expires_ms, acked)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0)
         ON CONFLICT (agent_did, request_id) DO UPDATE SET status = ?4, reason = ?5, frame_id = ?6,
             frame_ts = ?7, updated_ms = ?8, expires_ms = ?9, acked = 0",
    )?
    .execute(params![
        did,
        receipt.request_id,
        receipt.recipient_agent_did,
        receipt.status.as_str(),
        receipt.reason,
        frame.id,
        frame.ts,
        now,
        expires
    ])?;
    let dropped = tx
        .prepare_cached(
            "DELETE FROM receipts WHERE agent_did = ?1 AND request_id IN (
                 SELECT request_id FROM receipts WHERE agent_did = ?1
                 ORDER BY updated_ms DESC, rowid DESC LIMIT -1 OFFSET ?2)",
        )?
        .execute(params![did, limits.max_receipts_per_agent as i64])?;
    tx.commit()?;
    Ok(Recorded::Frame(frame, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
    const C: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PD";

    fn sessions(dir: &Path, max: usize) -> (Arc<ConnectionHub>, RelaySessions) {
        let hub = Arc::new(ConnectionHub::default());
        let limits = SessionLimits {
            receipt_ttl: Duration::from_secs(3600),
            max_receipts_per_agent: max,
        };
        let sessions = RelaySessions::open(&dir.join("s.db"), hub.clone(), limits).unwrap();
        (hub, sessions)
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

    #[tokio::test]
    async fn one_row_per_request_id_pushed_only_when_new_or_changed() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, sessions) = sessions(dir.path(), 500);
        let delivered = receipt("r1", ReceiptStatus::DeliveredToWebhook, None);
        assert_eq!(
            sessions.deliver(delivered.clone()).await.unwrap(),
            Delivery::Stored
        );
        assert_eq!(
            sessions.deliver(delivered).await.unwrap(),
            Delivery::Unchanged
        );

        let (_, mut frames) = hub.register(A);
        let dead = receipt("r1", ReceiptStatus::DeadLettered, Some("gone"));
        assert_eq!(sessions.deliver(dead).await.unwrap(), Delivery::Pushed(1));
        let pushed = frames.try_recv().unwrap();
        assert!(
            matches!(pushed, super::super::hub::Outbound::Text(t) if t.contains("dead_lettered"))
        );

        let mut conflicting = receipt("r1", ReceiptStatus::DeliveredToWebhook, None);
        conflicting.recipient_agent_did = C.into();
        assert_eq!(
            sessions.deliver(conflicting).await.unwrap(),
            Delivery::Ignored
        );

        let pending = sessions.pending(A).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert!(sessions.ack(A, &pending[0].id).await.unwrap());
        assert!(sessions.pending(A).await.unwrap().is_empty());
        assert_eq!(sessions.resident_actors(), 0, "idle actors are unloaded");
    }

    #[tokio::test]
    async fn the_oldest_rows_are_dropped_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sessions) = sessions(dir.path(), 3);
        for i in 0..5 {
            sessions
                .deliver(receipt(
                    &format!("r{i}"),
                    ReceiptStatus::DeliveredToWebhook,
                    None,
                ))
                .await
                .unwrap();
        }
        let kept: Vec<String> = sessions
            .pending(A)
            .await
            .unwrap()
            .into_iter()
            .map(|f| match f.body {
                FrameBody::Receipt {
                    original_frame_id, ..
                } => original_frame_id,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(kept, ["r2", "r3", "r4"]);
        assert_eq!(sessions.dropped_receipts(), 2);
    }

    #[tokio::test]
    async fn invalid_receipts_are_refused_permanently() {
        let dir = tempfile::tempdir().unwrap();
        let (_, sessions) = sessions(dir.path(), 3);
        let mut bad = receipt(" ", ReceiptStatus::DeliveredToWebhook, None);
        assert!(matches!(
            sessions.deliver(bad.clone()).await,
            Err(SessionError::Invalid(_))
        ));
        bad.request_id = "r".into();
        bad.sender_agent_did = "did:cdi:nope".into();
        assert!(matches!(
            sessions.deliver(bad).await,
            Err(SessionError::Invalid(_))
        ));
    }
}
