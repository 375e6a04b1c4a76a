//! The connector's durable outbox: the receipts and deliveries taken from the host and not
//! yet handed to the agent's hook, in SQLite (`<data_dir>/outbox.db`, WAL).
//!
//! A `receipt` or `deliver` frame is stored before it is acknowledged to the host, and its
//! row is only deleted once the hook answered 2xx (or the row expired), so it survives any
//! restart of the connector. The frame ids seen are remembered for a week in a second
//! table: the host re-pushes every unacknowledged frame on each connect, and a frame
//! pushed again after it was delivered must not reach the hook twice.
//!
//! Writes are grouped: the frames that arrived together are stored in one transaction
//! ([`Outbox::store`]), and the outcomes of the hook requests that ended together are
//! recorded in one ([`Outbox::settle`]), so one fsync covers many receipts.
//!
//! A row is due ([`Outbox::due`]) when its next attempt time has come and no row stored
//! before it is about the same request (the `x-request-id` the hook gets: a receipt's
//! `originalFrameId`, a delivery's frame id): the frames of one request reach the hook
//! one at a time, in the order they were stored, even when one of them has to be
//! retried.
//!
//! Connectors before the `deliver` frame also stored clawq's `notification` frames
//! (`status = 'notification'`, the text in `reason`, no recipient). That frame type is
//! gone; [`Outbox::open`] turns each such row, logging it, into a delivery from the agent
//! to itself with the payload `{"system": {"type": "clawq.notification", "requestId",
//! "message"}}` and `deliverySource` [`LEGACY_NOTIFICATION_SOURCE`], which the hook then
//! gets like any delivery.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, Transaction, params};
use serde_json::json;

use crate::frame::{Deliver, Frame, FrameBody, ReceiptStatus};

/// The file name of the outbox database inside the data directory.
pub(crate) const OUTBOX_FILE: &str = "outbox.db";

/// The `deliverySource` of a delivery made from a notification row of an older connector.
pub(crate) const LEGACY_NOTIFICATION_SOURCE: &str = "clawq.notification";

/// How long a frame id is remembered for deduplication.
const SEEN_FOR_MS: i64 = 7 * 24 * 60 * 60 * 1000;

/// The `status` of a delivery row (a receipt row holds the receipt's status).
const DELIVER_STATUS: &str = "deliver";

/// The `status` of a notification row stored by an older connector.
const LEGACY_NOTIFICATION_STATUS: &str = "notification";

/// The tables as the first connector made them; [`DELIVERY_COLUMNS`] are added to
/// `outbox` at open when missing.
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
CREATE INDEX IF NOT EXISTS outbox_request ON outbox (original_frame_id, seq);
";

/// The nullable text columns of a delivery row (NULL in receipt rows): `payload` holds
/// the payload's JSON text, the others the `deliver` frame's fields of the same names.
const DELIVERY_COLUMNS: [&str; 7] = [
    "from_agent_did",
    "payload",
    "delivery_source",
    "content_type",
    "group_id",
    "conversation_id",
    "reply_to",
];

/// Every column a stored frame fills, in the order of [`Columns`].
const FRAME_COLUMNS: &str = "frame_id, frame_ts, original_frame_id, to_agent_did, status, reason, \
     from_agent_did, payload, delivery_source, content_type, group_id, conversation_id, reply_to";

/// One stored receipt or delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    /// Storage order.
    pub(crate) seq: i64,
    /// The frame as the host sent it (a `receipt` or a `deliver`).
    pub(crate) frame: Frame,
    /// When the connector stored it, ms since the Unix epoch.
    pub(crate) stored_ms: i64,
    /// Failed hook deliveries so far.
    pub(crate) attempts: u32,
    /// Not to be tried before this time, ms since the Unix epoch.
    pub(crate) next_attempt_ms: i64,
}

/// The rows the delivery task may post now, and when to look again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Due {
    /// Due rows in storage order (at most the limit asked for).
    pub(crate) rows: Vec<Row>,
    /// The earliest later attempt time of a row in backoff (ms since the Unix epoch), if
    /// any.
    pub(crate) later_ms: Option<i64>,
}

/// What becomes of a row once its hook request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Delivered (2xx), expired or undeliverable: the row is deleted.
    Delete,
    /// Failed: `attempts` failed deliveries so far, next try at `next_attempt_ms`.
    Retry {
        /// Failed deliveries so far.
        attempts: u32,
        /// Not to be tried before this time, ms since the Unix epoch.
        next_attempt_ms: i64,
    },
}

/// A `receipt` or `deliver` frame, for log lines: its type, id and what it is about.
pub(crate) fn describe(frame: &Frame) -> String {
    match &frame.body {
        FrameBody::Receipt {
            original_frame_id,
            to_agent_did,
            status,
            ..
        } => format!(
            "receipt {} (request {original_frame_id} to {to_agent_did}, {})",
            frame.id,
            status.as_str()
        ),
        FrameBody::Deliver(deliver) => format!(
            "delivery {} (from {} to {}{})",
            frame.id,
            deliver.from_agent_did,
            deliver.to_agent_did,
            deliver
                .delivery_source
                .as_deref()
                .map(|source| format!(", {source}"))
                .unwrap_or_default()
        ),
        _ => format!("{} frame {}", frame.type_name(), frame.id),
    }
}

/// A frame's values as a row stores them, in the order of [`FRAME_COLUMNS`].
struct Columns {
    frame_id: String,
    frame_ts: String,
    original_frame_id: String,
    to_agent_did: String,
    status: String,
    reason: Option<String>,
    /// [`DELIVERY_COLUMNS`], in their order.
    delivery: [Option<String>; 7],
}

impl Columns {
    /// The columns of a `receipt` or `deliver` frame.
    fn of(frame: &Frame) -> Result<Columns> {
        let (original_frame_id, to_agent_did, status, reason, delivery) = match &frame.body {
            FrameBody::Receipt {
                original_frame_id,
                to_agent_did,
                status,
                reason,
            } => (
                original_frame_id.clone(),
                to_agent_did.clone(),
                status.as_str().to_owned(),
                reason.clone(),
                Default::default(),
            ),
            FrameBody::Deliver(deliver) => (
                String::new(),
                deliver.to_agent_did.clone(),
                DELIVER_STATUS.to_owned(),
                None,
                [
                    Some(deliver.from_agent_did.clone()),
                    Some(deliver.payload.to_string()),
                    deliver.delivery_source.clone(),
                    deliver.content_type.clone(),
                    deliver.group_id.clone(),
                    deliver.conversation_id.clone(),
                    deliver.reply_to.clone(),
                ],
            ),
            _ => bail!(
                "frame {} is a {}, not a receipt or a delivery",
                frame.id,
                frame.type_name()
            ),
        };
        Ok(Columns {
            frame_id: frame.id.clone(),
            frame_ts: frame.ts.clone(),
            original_frame_id,
            to_agent_did,
            status,
            reason,
            delivery,
        })
    }

    /// Reads the columns of [`FRAME_COLUMNS`] from `row`, starting at index `first`.
    fn read(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Columns> {
        let mut delivery: [Option<String>; 7] = Default::default();
        for (i, value) in delivery.iter_mut().enumerate() {
            *value = row.get(first + 6 + i)?;
        }
        Ok(Columns {
            frame_id: row.get(first)?,
            frame_ts: row.get(first + 1)?,
            original_frame_id: row.get(first + 2)?,
            to_agent_did: row.get(first + 3)?,
            status: row.get(first + 4)?,
            reason: row.get(first + 5)?,
            delivery,
        })
    }

    /// The frame these columns hold.
    fn into_frame(self) -> Result<Frame> {
        let body = if self.status == DELIVER_STATUS {
            let [
                from,
                payload,
                delivery_source,
                content_type,
                group_id,
                conversation_id,
                reply_to,
            ] = self.delivery;
            let (Some(from_agent_did), Some(payload)) = (from, payload) else {
                bail!("delivery {} has no sender or no payload", self.frame_id);
            };
            let payload = serde_json::from_str(&payload).with_context(|| {
                format!("the payload of delivery {} is not JSON", self.frame_id)
            })?;
            FrameBody::Deliver(Box::new(Deliver {
                from_agent_did,
                to_agent_did: self.to_agent_did,
                payload,
                delivery_source,
                content_type,
                group_id,
                conversation_id,
                reply_to,
            }))
        } else {
            let status = ReceiptStatus::parse(&self.status).ok_or_else(|| {
                anyhow!(
                    "frame {} has an unknown status `{}`",
                    self.frame_id,
                    self.status
                )
            })?;
            FrameBody::Receipt {
                original_frame_id: self.original_frame_id,
                to_agent_did: self.to_agent_did,
                status,
                reason: self.reason,
            }
        };
        Ok(Frame {
            id: self.frame_id,
            ts: self.frame_ts,
            body,
        })
    }
}

/// The outbox; cheap to clone (shared connections).
#[derive(Clone)]
pub(crate) struct Outbox {
    /// Every write goes through this connection, one transaction at a time.
    conn: Arc<Mutex<Connection>>,
    /// A second connection for the delivery task's reads, which then never wait for a
    /// write's commit (WAL: a reader sees the last committed state).
    reader: Arc<Mutex<Connection>>,
}

impl Outbox {
    /// Opens (creating or upgrading if needed) `<dir>/outbox.db` for the connector of
    /// `agent_did`, which receives the deliveries made of an older connector's
    /// notification rows (see the module documentation).
    pub(crate) fn open(dir: &Path, agent_did: &str) -> Result<Outbox> {
        let path = dir.join(OUTBOX_FILE);
        let mut conn = Connection::open(&path)
            .with_context(|| format!("opening the outbox {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: an acknowledged frame is gone from the host, so its row must survive an
        // OS crash too. Receipts and deliveries are few; the fsync per commit is
        // affordable.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA)
            .context("creating the outbox schema")?;
        add_delivery_columns(&tx).context("adding the delivery columns to the outbox")?;
        convert_legacy_notifications(&tx, agent_did)
            .context("converting the notifications of an older connector")?;
        tx.commit()?;
        let reader = Connection::open(&path)
            .with_context(|| format!("opening the outbox {} to read", path.display()))?;
        reader.busy_timeout(Duration::from_secs(5))?;
        Ok(Outbox {
            conn: Arc::new(Mutex::new(conn)),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Runs `work` on the writing connection in a blocking thread.
    async fn with<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        Self::on(self.conn.clone(), work).await
    }

    /// Runs `work` on the reading connection in a blocking thread.
    async fn read<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        Self::on(self.reader.clone(), work).await
    }

    /// Runs `work` on `conn` in a blocking thread.
    async fn on<T, F>(conn: Arc<Mutex<Connection>>, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| anyhow!("the outbox lock is poisoned"))?;
            work(&mut conn)
        })
        .await
        .context("the outbox thread failed")?
    }

    /// Stores `receipt` and `deliver` frames in one transaction, committed when this
    /// returns; for each frame, whether it is new: a frame whose id was seen before (or
    /// earlier in `frames`) is not stored again.
    pub(crate) async fn store(&self, frames: &[Frame], now_ms: i64) -> Result<Vec<bool>> {
        let columns = frames.iter().map(Columns::of).collect::<Result<Vec<_>>>()?;
        self.with(move |conn| {
            let tx = conn.transaction()?;
            tx.prepare_cached("DELETE FROM seen WHERE received_ms < ?1")?
                .execute(params![now_ms - SEEN_FOR_MS])?;
            let mut new = Vec::with_capacity(columns.len());
            {
                let mut seen = tx.prepare_cached(
                    "INSERT OR IGNORE INTO seen (frame_id, received_ms) VALUES (?1, ?2)",
                )?;
                let mut insert = tx.prepare_cached(&format!(
                    "INSERT OR IGNORE INTO outbox ({FRAME_COLUMNS}, stored_ms, next_attempt_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14)"
                ))?;
                for c in &columns {
                    let is_new = seen.execute(params![c.frame_id, now_ms])? == 1;
                    if is_new {
                        let [
                            from,
                            payload,
                            source,
                            content_type,
                            group,
                            conversation,
                            reply_to,
                        ] = &c.delivery;
                        insert.execute(params![
                            c.frame_id,
                            c.frame_ts,
                            c.original_frame_id,
                            c.to_agent_did,
                            c.status,
                            c.reason,
                            from,
                            payload,
                            source,
                            content_type,
                            group,
                            conversation,
                            reply_to,
                            now_ms
                        ])?;
                    }
                    new.push(is_new);
                }
            }
            tx.commit()?;
            Ok(new)
        })
        .await
    }

    /// Up to `limit` rows due at `now_ms`, in storage order, leaving out the rows
    /// `skip` (posts under way): a row is due when its attempt time has come and no row
    /// stored before it, due or not, is about the same request (see the module
    /// documentation).
    pub(crate) async fn due(&self, now_ms: i64, skip: &[i64], limit: usize) -> Result<Due> {
        let skip: HashSet<i64> = skip.iter().copied().collect();
        self.read(move |conn| {
            // `+next_attempt_ms`: walk the rows in storage order, stopping once `limit`
            // are found, rather than sort every due row of a backlog. One text whatever
            // is skipped, so it is parsed once: a skipped row is passed over by its
            // `seq`, before any other column is read.
            let mut statement = conn.prepare_cached(&format!(
                "SELECT seq, stored_ms, attempts, next_attempt_ms, {FRAME_COLUMNS}
                 FROM outbox AS o
                 WHERE +next_attempt_ms <= ?1
                   AND (status = '{DELIVER_STATUS}' OR NOT EXISTS (
                        SELECT 1 FROM outbox AS e
                        WHERE e.original_frame_id = o.original_frame_id AND e.seq < o.seq))
                 ORDER BY seq"
            ))?;
            let mut found = statement.query(params![now_ms])?;
            let mut rows = Vec::with_capacity(limit.min(64));
            while rows.len() < limit {
                let Some(r) = found.next()? else { break };
                let seq: i64 = r.get(0)?;
                if skip.contains(&seq) {
                    continue;
                }
                let frame = Columns::read(r, 4)?
                    .into_frame()
                    .with_context(|| format!("reading outbox row {seq}"))?;
                rows.push(Row {
                    seq,
                    frame,
                    stored_ms: r.get(1)?,
                    attempts: r.get(2)?,
                    next_attempt_ms: r.get(3)?,
                });
            }
            drop(found);
            let later_ms: Option<i64> = conn
                .prepare_cached(
                    "SELECT MIN(next_attempt_ms) FROM outbox WHERE next_attempt_ms > ?1",
                )?
                .query_row(params![now_ms], |r| r.get(0))?;
            Ok(Due { rows, later_ms })
        })
        .await
    }

    /// Records what became of rows whose hook requests ended, in one transaction.
    pub(crate) async fn settle(&self, settled: Vec<(i64, Settle)>) -> Result<()> {
        self.with(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut delete = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
                let mut retry = tx.prepare_cached(
                    "UPDATE outbox SET attempts = ?2, next_attempt_ms = ?3 WHERE seq = ?1",
                )?;
                for (seq, settle) in settled {
                    match settle {
                        Settle::Delete => delete.execute(params![seq])?,
                        Settle::Retry {
                            attempts,
                            next_attempt_ms,
                        } => retry.execute(params![seq, attempts, next_attempt_ms])?,
                    };
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// How many receipts and deliveries wait for the hook.
    pub(crate) async fn pending(&self) -> Result<u64> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT COUNT(*) FROM outbox")?
                .query_row([], |r| r.get(0))?)
        })
        .await
    }
}

/// Adds the [`DELIVERY_COLUMNS`] that `outbox` lacks (all of them in an outbox made by a
/// connector before the `deliver` frame, none in one made since).
fn add_delivery_columns(tx: &Transaction<'_>) -> Result<()> {
    let existing: Vec<String> = tx
        .prepare("SELECT name FROM pragma_table_info('outbox')")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for column in DELIVERY_COLUMNS {
        if !existing.iter().any(|name| name == column) {
            tx.execute(&format!("ALTER TABLE outbox ADD COLUMN {column} TEXT"), [])?;
        }
    }
    Ok(())
}

/// Turns each notification row of an older connector into a delivery from `agent_did`
/// to itself, in place (same frame id, storage order and retry state), logging each.
fn convert_legacy_notifications(tx: &Transaction<'_>, agent_did: &str) -> Result<()> {
    let legacy: Vec<(i64, String, String, Option<String>)> = tx
        .prepare(
            "SELECT seq, frame_id, original_frame_id, reason FROM outbox WHERE status = ?1 ORDER BY seq",
        )?
        .query_map(params![LEGACY_NOTIFICATION_STATUS], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (seq, frame_id, request_id, message) in legacy {
        let message = message.unwrap_or_default();
        let payload = json!({"system": {
            "type": LEGACY_NOTIFICATION_SOURCE,
            "requestId": request_id,
            "message": message,
        }});
        tx.execute(
            "UPDATE outbox SET status = ?2, from_agent_did = ?3, to_agent_did = ?3, payload = ?4,
                               delivery_source = ?5, original_frame_id = '', reason = NULL
             WHERE seq = ?1",
            params![
                seq,
                DELIVER_STATUS,
                agent_did,
                payload.to_string(),
                LEGACY_NOTIFICATION_SOURCE
            ],
        )?;
        tracing::warn!(
            "the outbox holds notification {frame_id} (request {request_id:?}: {message:?}) from an older \
             connector; notification frames are gone, so it goes to the hook as a delivery from {agent_did} \
             to itself with deliverySource {LEGACY_NOTIFICATION_SOURCE}"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const OTHER: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";

    fn receipt(request: &str, reason: Option<&str>) -> Frame {
        Frame::new(FrameBody::Receipt {
            original_frame_id: request.into(),
            to_agent_did: OTHER.into(),
            status: ReceiptStatus::DeadLettered,
            reason: reason.map(Into::into),
        })
    }

    /// A delivery from [`OTHER`] to [`AGENT`], with every optional field or none.
    fn delivery(full: bool) -> Frame {
        let some = |value: &str| full.then(|| value.to_owned());
        Frame::new(FrameBody::Deliver(Box::new(Deliver {
            from_agent_did: OTHER.into(),
            to_agent_did: AGENT.into(),
            payload: json!({"system": {"type": "pair.accepted", "n": [1, 2.5, null]}}),
            delivery_source: some("proxy.events.queue.pair_accepted"),
            content_type: some("application/json"),
            group_id: some("grp_01HZX4M3Q8V2J7K9T6R5W1N0PB"),
            conversation_id: some("conv-1"),
            reply_to: some("req-0"),
        })))
    }

    /// The first due row.
    async fn due(outbox: &Outbox, now_ms: i64) -> Row {
        let due = outbox.due(now_ms, &[], 1).await.unwrap();
        due.rows
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("expected a due row, got {:?}", due.later_ms))
    }

    /// Stores one frame; whether it was new.
    async fn store(outbox: &Outbox, frame: &Frame, now_ms: i64) -> bool {
        outbox
            .store(std::slice::from_ref(frame), now_ms)
            .await
            .unwrap()
            == [true]
    }

    async fn delete(outbox: &Outbox, seq: i64) {
        outbox.settle(vec![(seq, Settle::Delete)]).await.unwrap();
    }

    /// No row is due or in backoff.
    fn empty() -> Due {
        Due::default()
    }

    #[tokio::test]
    async fn stores_dedupes_reschedules_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), AGENT).unwrap();
        assert_eq!(outbox.due(0, &[], 10).await.unwrap(), empty());
        let first = receipt("req-1", Some("hook gone"));
        let second = receipt("req-2", None);
        assert!(store(&outbox, &first, 1_000).await);
        assert!(
            !store(&outbox, &first, 1_001).await,
            "a duplicate is not stored"
        );
        assert!(store(&outbox, &second, 1_002).await);
        assert_eq!(outbox.pending().await.unwrap(), 2);

        let row = due(&outbox, 5_000).await;
        assert_eq!(row.frame, first);
        assert_eq!((row.stored_ms, row.attempts), (1_000, 0));
        let retry = Settle::Retry {
            attempts: 1,
            next_attempt_ms: 9_000,
        };
        outbox.settle(vec![(row.seq, retry)]).await.unwrap();
        let row2 = due(&outbox, 5_000).await;
        assert_eq!(
            row2.frame, second,
            "a row in backoff does not block the next one"
        );
        delete(&outbox, row2.seq).await;
        assert_eq!(
            outbox.due(5_000, &[], 10).await.unwrap(),
            Due {
                rows: vec![],
                later_ms: Some(9_000)
            }
        );
        assert!(
            !store(&outbox, &second, 6_000).await,
            "a delivered frame pushed again is still a duplicate"
        );
        drop(outbox);

        let reopened = Outbox::open(dir.path(), AGENT).unwrap();
        let again = due(&reopened, 9_000).await;
        assert_eq!((&again.frame, again.attempts), (&first, 1));
    }

    #[tokio::test]
    async fn deliveries_keep_every_field_and_their_place_among_receipts() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), AGENT).unwrap();
        let frames = [delivery(true), receipt("req-1", None), delivery(false)];
        for (n, frame) in frames.iter().enumerate() {
            assert!(store(&outbox, frame, 1_000 + n as i64).await);
        }
        assert!(
            !store(&outbox, &frames[0], 2_000).await,
            "a delivery pushed again is a duplicate"
        );
        drop(outbox);
        let outbox = Outbox::open(dir.path(), AGENT).unwrap();
        for frame in &frames {
            let row = due(&outbox, 5_000).await;
            assert_eq!(&row.frame, frame, "stored and read back whole, in order");
            delete(&outbox, row.seq).await;
        }
        assert_eq!(outbox.due(5_000, &[], 10).await.unwrap(), empty());
    }

    #[tokio::test]
    async fn only_receipts_and_deliveries_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), AGENT).unwrap();
        let error = outbox
            .store(
                &[receipt("req-1", None), Frame::new(FrameBody::Heartbeat)],
                1_000,
            )
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("is a heartbeat, not a receipt or a delivery"),
            "{error:#}"
        );
        assert_eq!(outbox.pending().await.unwrap(), 0, "nothing of the batch");
    }

    #[tokio::test]
    async fn notifications_of_an_older_connector_become_deliveries_to_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let notification_id = "01HZX4M3Q8V2J7K9T6R5W1N0PD";
        let receipt = receipt("req-1", Some("gone"));
        {
            // The outbox as a connector with notification frames left it.
            let conn = Connection::open(dir.path().join(OUTBOX_FILE)).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO outbox (frame_id, original_frame_id, to_agent_did, status, reason, frame_ts,
                                     stored_ms, attempts, next_attempt_ms)
                 VALUES (?1, 'digest:3', '', 'notification', '3 of your messages failed',
                         '2026-11-24T10:00:00.000Z', 1000, 2, 4000)",
                params![notification_id],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO outbox (frame_id, original_frame_id, to_agent_did, status, reason, frame_ts,
                                     stored_ms, next_attempt_ms)
                 VALUES (?1, 'req-1', ?2, 'dead_lettered', 'gone', ?3, 1001, 1001)",
                params![receipt.id, OTHER, receipt.ts],
            )
            .unwrap();
        }
        let outbox = Outbox::open(dir.path(), AGENT).unwrap();
        let converted = due(&outbox, 5_000).await;
        assert_eq!(
            converted.frame,
            Frame {
                id: notification_id.into(),
                ts: "2026-11-24T10:00:00.000Z".into(),
                body: FrameBody::Deliver(Box::new(Deliver {
                    from_agent_did: AGENT.into(),
                    to_agent_did: AGENT.into(),
                    payload: json!({"system": {"type": "clawq.notification", "requestId": "digest:3",
                                               "message": "3 of your messages failed"}}),
                    delivery_source: Some(LEGACY_NOTIFICATION_SOURCE.into()),
                    content_type: None,
                    group_id: None,
                    conversation_id: None,
                    reply_to: None,
                })),
            }
        );
        assert_eq!(
            (
                converted.stored_ms,
                converted.attempts,
                converted.next_attempt_ms
            ),
            (1_000, 2, 4_000),
            "its place and retry state are kept"
        );
        drop(outbox);

        // Opening again changes nothing; the receipt beside it is untouched.
        let outbox = Outbox::open(dir.path(), AGENT).unwrap();
        assert_eq!(due(&outbox, 5_000).await, converted);
        delete(&outbox, converted.seq).await;
        assert_eq!(due(&outbox, 5_000).await.frame, receipt);
    }

    #[tokio::test]
    async fn frames_stored_together_are_one_batch_in_order_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), AGENT).unwrap();
        let (a, b) = (receipt("req-a", None), delivery(false));
        let new = outbox
            .store(&[a.clone(), b.clone(), a.clone()], 1_000)
            .await
            .unwrap();
        assert_eq!(new, [true, true, false], "the repeat in the batch is seen");
        let due = outbox.due(1_000, &[], 10).await.unwrap();
        let frames: Vec<&Frame> = due.rows.iter().map(|row| &row.frame).collect();
        assert_eq!(frames, [&a, &b]);
        let skipped = outbox.due(1_000, &[due.rows[0].seq], 10).await.unwrap();
        assert_eq!(skipped.rows, due.rows[1..], "a post under way is left out");
        assert_eq!(outbox.due(1_000, &[], 1).await.unwrap().rows, due.rows[..1]);
        outbox
            .settle(vec![
                (due.rows[0].seq, Settle::Delete),
                (due.rows[1].seq, Settle::Delete),
            ])
            .await
            .unwrap();
        assert_eq!(outbox.pending().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_request_waits_behind_an_earlier_frame_of_the_same_request() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), AGENT).unwrap();
        let first = receipt("req-1", Some("first"));
        let other = receipt("req-2", None);
        let second = receipt("req-1", Some("second"));
        outbox
            .store(&[first.clone(), other.clone(), second.clone()], 1_000)
            .await
            .unwrap();
        let due1 = outbox.due(1_000, &[], 10).await.unwrap();
        let frames: Vec<&Frame> = due1.rows.iter().map(|row| &row.frame).collect();
        assert_eq!(frames, [&first, &other], "the second req-1 waits");
        // The first one under way, or in backoff: the second still waits.
        let under_way = outbox.due(1_000, &[due1.rows[0].seq], 10).await.unwrap();
        assert_eq!(under_way.rows, due1.rows[1..]);
        let retry = Settle::Retry {
            attempts: 1,
            next_attempt_ms: 9_000,
        };
        outbox
            .settle(vec![
                (due1.rows[0].seq, retry),
                (due1.rows[1].seq, Settle::Delete),
            ])
            .await
            .unwrap();
        assert_eq!(
            outbox.due(5_000, &[], 10).await.unwrap(),
            Due {
                rows: vec![],
                later_ms: Some(9_000)
            }
        );
        // Once the first is taken, the second is due.
        assert_eq!(due(&outbox, 9_000).await.frame, first);
        delete(&outbox, due1.rows[0].seq).await;
        assert_eq!(due(&outbox, 9_000).await.frame, second);
    }
}
