//! The connector's durable outbox: the receipts (and notifications) taken from the host
//! and not yet handed to the agent's hook, in SQLite (`<data_dir>/outbox.db`, WAL).
//!
//! A receipt frame is stored before it is acknowledged to the host, and its row is only
//! deleted once the hook answered 2xx (or the row expired), so a receipt survives any
//! restart of the connector. The frame ids seen are remembered for a week in a second
//! table: the host re-pushes every unacknowledged frame on each connect, and a frame
//! pushed again after its receipt was delivered must not reach the hook twice.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use rusqlite::{Connection, OptionalExtension, params};

use crate::frame::{Frame, FrameBody, ReceiptStatus};

/// The file name of the outbox database inside the data directory.
pub(crate) const OUTBOX_FILE: &str = "outbox.db";

/// How long a frame id is remembered for deduplication.
const SEEN_FOR_MS: i64 = 7 * 24 * 60 * 60 * 1000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id          TEXT    NOT NULL UNIQUE,
    original_frame_id TEXT    NOT NULL,
    to_agent_did      TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    reason            TEXT,
    frame_ts          TEXT    NOT NULL,
    stored_ms         INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_next_attempt ON outbox (next_attempt_ms);
CREATE TABLE IF NOT EXISTS seen (
    frame_id    TEXT    PRIMARY KEY,
    received_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_received ON seen (received_ms);
";

/// What a row holds (its `status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A delivery receipt with this status.
    Receipt(ReceiptStatus),
    /// A system notification: `reason` holds its text, `to_agent_did` is empty.
    Notification,
}

impl Kind {
    /// The name stored, and logged.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Receipt(status) => status.as_str(),
            Kind::Notification => "notification",
        }
    }

    fn parse(name: &str) -> Option<Kind> {
        match name {
            "notification" => Some(Kind::Notification),
            status => ReceiptStatus::parse(status).map(Kind::Receipt),
        }
    }
}

/// One stored receipt or notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    /// Storage order.
    pub(crate) seq: i64,
    /// The receipt frame's id.
    pub(crate) frame_id: String,
    /// The receipt's `requestId`.
    pub(crate) original_frame_id: String,
    /// The recipient of the original message.
    pub(crate) to_agent_did: String,
    /// A receipt and its status, or a notification.
    pub(crate) kind: Kind,
    /// Why, when given; a notification's text.
    pub(crate) reason: Option<String>,
    /// The frame's `ts`.
    pub(crate) frame_ts: String,
    /// When the connector stored it, ms since the Unix epoch.
    pub(crate) stored_ms: i64,
    /// Failed hook deliveries so far.
    pub(crate) attempts: u32,
    /// Not to be tried before this time, ms since the Unix epoch.
    pub(crate) next_attempt_ms: i64,
}

/// What the delivery task should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Deliver this row now (the first due row in storage order).
    Due(Row),
    /// Nothing is due before this time (ms since the Unix epoch).
    WaitUntil(i64),
    /// The outbox is empty.
    Empty,
}

/// The outbox; cheap to clone (one shared connection).
#[derive(Clone)]
pub(crate) struct Outbox {
    conn: Arc<Mutex<Connection>>,
}

impl Outbox {
    /// Opens (creating if needed) `<dir>/outbox.db`.
    pub(crate) fn open(dir: &Path) -> Result<Outbox> {
        let path = dir.join(OUTBOX_FILE);
        let conn = Connection::open(&path)
            .with_context(|| format!("opening the outbox {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: an acknowledged receipt is gone from the host, so its row must survive
        // an OS crash too. Receipts are few; the fsync per commit is affordable.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)
            .context("creating the outbox schema")?;
        Ok(Outbox {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `work` on the connection in a blocking thread.
    async fn with<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| anyhow!("the outbox lock is poisoned"))?;
            work(&mut conn)
        })
        .await
        .context("the outbox thread failed")?
    }

    /// Stores a receipt or notification frame, committed when this returns. Returns
    /// false (and stores nothing) when a frame with this id was seen before.
    pub(crate) async fn store(&self, frame: &Frame, now_ms: i64) -> Result<bool> {
        let (original, to, kind, reason) = match &frame.body {
            FrameBody::Receipt {
                original_frame_id,
                to_agent_did,
                status,
                reason,
            } => (
                original_frame_id.clone(),
                to_agent_did.clone(),
                Kind::Receipt(*status),
                reason.clone(),
            ),
            FrameBody::Notification {
                request_id,
                message,
            } => (
                request_id.clone(),
                String::new(),
                Kind::Notification,
                Some(message.clone()),
            ),
            _ => {
                return Err(anyhow!(
                    "frame {} is a {}, not a receipt or a notification",
                    frame.id,
                    frame.type_name()
                ));
            }
        };
        let (id, ts, status) = (frame.id.clone(), frame.ts.clone(), kind.as_str());
        self.with(move |conn| {
            let tx = conn.transaction()?;
            tx.execute("DELETE FROM seen WHERE received_ms < ?1", params![now_ms - SEEN_FOR_MS])?;
            let new = tx.execute("INSERT OR IGNORE INTO seen (frame_id, received_ms) VALUES (?1, ?2)", params![id, now_ms])?
                == 1;
            if new {
                tx.execute(
                    "INSERT OR IGNORE INTO outbox
                     (frame_id, original_frame_id, to_agent_did, status, reason, frame_ts, stored_ms, next_attempt_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                    params![id, original, to, status, reason, ts, now_ms],
                )?;
            }
            tx.commit()?;
            Ok(new)
        })
        .await
    }

    /// The first row due at `now_ms` in storage order, else when the next one is due.
    pub(crate) async fn next(&self, now_ms: i64) -> Result<Next> {
        self.with(move |conn| {
            let due = conn
                .query_row(
                    "SELECT seq, frame_id, original_frame_id, to_agent_did, status, reason, frame_ts,
                            stored_ms, attempts, next_attempt_ms
                     FROM outbox WHERE next_attempt_ms <= ?1 ORDER BY seq LIMIT 1",
                    params![now_ms],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, Option<String>>(5)?,
                            r.get::<_, String>(6)?,
                            r.get::<_, i64>(7)?,
                            r.get::<_, u32>(8)?,
                            r.get::<_, i64>(9)?,
                        ))
                    },
                )
                .optional()?;
            if let Some((seq, frame_id, original, to, status, reason, ts, stored_ms, attempts, next_ms)) = due {
                let kind = Kind::parse(&status)
                    .ok_or_else(|| anyhow!("outbox row {seq} has an unknown status `{status}`"))?;
                return Ok(Next::Due(Row {
                    seq,
                    frame_id,
                    original_frame_id: original,
                    to_agent_did: to,
                    kind,
                    reason,
                    frame_ts: ts,
                    stored_ms,
                    attempts,
                    next_attempt_ms: next_ms,
                }));
            }
            let earliest: Option<i64> = conn.query_row("SELECT MIN(next_attempt_ms) FROM outbox", [], |r| r.get(0))?;
            Ok(earliest.map_or(Next::Empty, Next::WaitUntil))
        })
        .await
    }

    /// Deletes a row (delivered, expired or undeliverable).
    pub(crate) async fn delete(&self, seq: i64) -> Result<()> {
        self.with(move |conn| {
            conn.execute("DELETE FROM outbox WHERE seq = ?1", params![seq])?;
            Ok(())
        })
        .await
    }

    /// Records a failed delivery: `attempts` so far, next try at `next_attempt_ms`.
    pub(crate) async fn reschedule(
        &self,
        seq: i64,
        attempts: u32,
        next_attempt_ms: i64,
    ) -> Result<()> {
        self.with(move |conn| {
            conn.execute(
                "UPDATE outbox SET attempts = ?2, next_attempt_ms = ?3 WHERE seq = ?1",
                params![seq, attempts, next_attempt_ms],
            )?;
            Ok(())
        })
        .await
    }

    /// How many receipts wait for the hook.
    pub(crate) async fn pending(&self) -> Result<u64> {
        self.with(|conn| Ok(conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(reason: Option<&str>) -> Frame {
        Frame::new(FrameBody::Receipt {
            original_frame_id: "req-1".into(),
            to_agent_did: "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB"
                .into(),
            status: ReceiptStatus::DeadLettered,
            reason: reason.map(Into::into),
        })
    }

    #[tokio::test]
    async fn stores_dedupes_reschedules_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path()).unwrap();
        assert_eq!(outbox.next(0).await.unwrap(), Next::Empty);
        let first = receipt(Some("hook gone"));
        let second = receipt(None);
        assert!(outbox.store(&first, 1_000).await.unwrap());
        assert!(
            !outbox.store(&first, 1_001).await.unwrap(),
            "a duplicate is not stored"
        );
        assert!(outbox.store(&second, 1_002).await.unwrap());
        assert_eq!(outbox.pending().await.unwrap(), 2);

        let Next::Due(row) = outbox.next(5_000).await.unwrap() else {
            panic!("a due row")
        };
        assert_eq!(row.frame_id, first.id);
        assert_eq!(row.reason.as_deref(), Some("hook gone"));
        assert_eq!((row.stored_ms, row.attempts), (1_000, 0));
        outbox.reschedule(row.seq, 1, 9_000).await.unwrap();
        let Next::Due(row2) = outbox.next(5_000).await.unwrap() else {
            panic!("a due row")
        };
        assert_eq!(
            row2.frame_id, second.id,
            "a row in backoff does not block the next one"
        );
        outbox.delete(row2.seq).await.unwrap();
        assert_eq!(outbox.next(5_000).await.unwrap(), Next::WaitUntil(9_000));
        assert!(
            !outbox.store(&second, 6_000).await.unwrap(),
            "a delivered frame pushed again is still a duplicate"
        );
        drop(outbox);

        let reopened = Outbox::open(dir.path()).unwrap();
        let Next::Due(again) = reopened.next(9_000).await.unwrap() else {
            panic!("a due row")
        };
        assert_eq!(
            (again.frame_id.as_str(), again.attempts),
            (first.id.as_str(), 1)
        );
    }
}
