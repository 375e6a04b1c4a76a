//! The embedded queue storage: every queue in the host's database ([`Database`], one
//! SQLite file in WAL mode). Storage only: what is decided about batches, retries and
//! dead letters is the [`super::core`]'s, applied inside this backend's transactions.
//!
//! **Threads and transactions.** No statement runs on the async runtime's threads: each
//! data-path call (lease, commit) and each operator change (redrive, purge, an expiry
//! chunk) is one [`Database::write`] job in the writer thread's group transaction, so it
//! is kept or undone whole and returns once committed; the publishes made while their
//! job waits to run share that one job ([`Coalesced`]), kept or undone together; counts,
//! lists and gets run on the reader thread ([`Database::read`]).
//!
//! **Rows.** A message row is deleted or moved only in the transaction that commits its
//! outcome, so a crash at any point leaves it to be delivered again. A leased row has
//! the `leased` flag, and its `visible_ms` is the lease deadline: once that passes, the
//! row is ready again like any other whose time has come (a panicking batch, a commit
//! that keeps failing). Leases are also cleared when the storage is opened: whatever was
//! in flight when the previous process died is ready again at once (the host's
//! data-directory lock keeps a second process from doing that to a live one). A queue
//! with several consumers keeps one row per consumer that subscribes to a message, in
//! that consumer's lane; the `queue` column holds the written [`Lane`], and every query
//! about a queue covers all of its lanes.
//!
//! **Counts without a scan.** `lane_counts` holds how many rows each lane holds, kept by
//! every statement that inserts, deletes or moves rows, once per statement and lane, in
//! the same transaction ([`count_rows`]; row triggers cost a third of a publish's
//! insert), and rebuilt from the rows when the storage is opened. A lane's other counts are
//! index range counts that never touch its ready backlog: in flight are the rows of the
//! partial index `messages_leased` whose deadline is ahead; not yet visible (in flight
//! or delayed) is a count over `messages_due` of the rows whose `visible_ms` is ahead,
//! so delayed costs O(delayed rows); ready is what is left. So `GET /v1/queues/{q}` and
//! `/metrics` cost O(lanes + in flight + delayed), whatever the backlog.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use crate::coalesced::Coalesced;
use crate::side_effects::SideEffects;
use crate::store::Database;

use super::core::{
    DeadLetterRoute, Engine, Readiness, earliest, poisoned, readiness, taken, warn_stale,
};
use super::lane::Lane;
use super::routes::Routes;
use super::storage::{Committed, DataPath, Fate, LeasePlan, Leased, Operator, PublishRow};
use super::{
    ContentType, Delivery, MessagePage, MessageState, QueueCounts, QueueError, RedriveSummary,
    RedriveTarget, Selection, SettleSummary, StoredMessage,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY,
    id           TEXT NOT NULL,
    queue        TEXT NOT NULL,
    content_type TEXT NOT NULL,
    body         BLOB NOT NULL,
    published_ms INTEGER NOT NULL,
    visible_ms   INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    leased       INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    source_queue TEXT,
    dead_reason  TEXT,
    dead_ms      INTEGER
);
DROP INDEX IF EXISTS messages_ready;
CREATE INDEX IF NOT EXISTS messages_due ON messages (queue, visible_ms, seq);
";

/// The index the retention sweep finds a queue's expired rows by.
const EXPIRY_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS messages_expiry ON messages (queue, enqueued_ms)";

/// The per-lane row counts and the index of the rows in flight (see the module doc);
/// the row triggers that kept the counts in older versions are dropped.
const COUNTERS: &str = "
CREATE TABLE IF NOT EXISTS lane_counts (
    lane TEXT PRIMARY KEY,
    held INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_leased ON messages (queue, visible_ms) WHERE leased = 1;
DROP TRIGGER IF EXISTS messages_counted_in;
DROP TRIGGER IF EXISTS messages_counted_out;
DROP TRIGGER IF EXISTS messages_counted_moved;
";

/// Adds `delta` rows to the count of the written lane `lane`, and forgets a lane whose
/// count falls to zero.
fn count_rows(conn: &Connection, lane: &str, delta: i64) -> rusqlite::Result<()> {
    if delta == 0 {
        return Ok(());
    }
    conn.prepare_cached(
        "INSERT INTO lane_counts (lane, held) VALUES (?1, ?2)
         ON CONFLICT (lane) DO UPDATE SET held = held + ?2",
    )?
    .execute(params![lane, delta])?;
    if delta < 0 {
        conn.prepare_cached("DELETE FROM lane_counts WHERE lane = ?1 AND held <= 0")?
            .execute([lane])?;
    }
    Ok(())
}

/// Counts `moved` rows out of the written lane `from` and into `to`.
fn count_moved(conn: &Connection, from: &str, to: &str, moved: i64) -> rusqlite::Result<()> {
    count_rows(conn, from, -moved)?;
    count_rows(conn, to, moved)
}

/// Runs `delete`, a `DELETE … RETURNING queue` statement, with `params`, counting the
/// deleted rows out of their lanes; returns how many it deleted.
fn delete_counted(
    conn: &Connection,
    delete: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<u64> {
    let mut deleted: BTreeMap<String, i64> = BTreeMap::new();
    let mut statement = conn.prepare_cached(delete)?;
    let mut rows = statement.query(params)?;
    while let Some(row) = rows.next()? {
        *deleted.entry(row.get(0)?).or_default() += 1;
    }
    drop(rows);
    let mut total = 0;
    for (lane, n) in deleted {
        count_rows(conn, &lane, -n)?;
        total += n as u64;
    }
    Ok(total)
}

/// Columns added to [`SCHEMA`] since its first version, with their definitions; `open`
/// adds each one the database lacks, so that older databases open. `enqueued_ms` (when
/// the message entered its current queue, for retention) is filled in for old rows.
const ADDED_COLUMNS: [(&str, &str); 4] = [
    ("first_failed_ms", "INTEGER"),
    ("last_failed_ms", "INTEGER"),
    ("source_attempts", "INTEGER"),
    ("enqueued_ms", "INTEGER NOT NULL DEFAULT 0"),
];

/// The columns of a [`StoredMessage`], as [`stored_message`] reads them.
const STORED_COLUMNS: &str = "seq, id, leased, visible_ms, attempts, published_ms,
    first_failed_ms, last_failed_ms, last_error, dead_ms, dead_reason, source_queue,
    source_attempts, content_type, body, queue";

/// Keeps the rows of queue `?1`, in all of its lanes (`<queue>#<consumer>`: `$` is the
/// character after `#`), from a table whose lane column is `column`.
macro_rules! in_queue {
    ($column:literal) => {
        concat!(
            "(",
            $column,
            " = ?1 OR (",
            $column,
            " > ?1 || '#' AND ",
            $column,
            " < ?1 || '$'))"
        )
    };
}

/// [`in_queue!`] over `messages`.
const IN_QUEUE: &str = in_queue!("queue");

/// Keeps the selected rows of an [`IN_QUEUE`]: `?2` is `NULL` for every message or a
/// JSON array of ids, `?3` `NULL` for every lane or the one lane to keep; `?4` is the
/// time, before which a lease holds its row.
const SELECTED: &str = "(leased = 0 OR visible_ms <= ?4)
    AND (?2 IS NULL OR id IN (SELECT value FROM json_each(?2)))
    AND (?3 IS NULL OR queue = ?3)";

/// Keeps the row `?1` if it is still under the lease whose deadline is `?2`, or whatever
/// its state when `?2` is `NULL`.
const UNDER_LEASE: &str = "seq = ?1 AND (?2 IS NULL OR (leased = 1 AND visible_ms = ?2))";

/// The SQLite storage backend.
pub struct SqliteStorage {
    db: Database,
    /// The publishes not yet written, each with its time: one write job inserts every
    /// publish made before it runs, however many requests made them.
    publishes: Coalesced<(u64, PublishRow)>,
}

/// The queue engine over the SQLite storage: what the host runs.
pub type SqliteQueue = Engine<SqliteStorage>;

impl SqliteQueue {
    /// Opens (or creates) the queues in `db` and releases every lease left by a previous
    /// process: those messages are ready at once, in the order they entered their queue.
    pub fn open(db: &Database) -> Result<Self, QueueError> {
        Ok(Engine::new(SqliteStorage::open(db)?))
    }
}

impl SqliteStorage {
    /// Opens (or creates) the queue tables in `db`, brings an older schema up to date,
    /// rebuilds the lane counts and releases every lease left by a previous process.
    pub fn open(db: &Database) -> Result<Self, QueueError> {
        // Once, at start: a connection of its own, on the caller's thread.
        let conn = db.connection(SCHEMA).map_err(storage)?;
        add_columns(&conn).map_err(storage)?;
        // The retention sweep reads a queue's oldest rows; `enqueued_ms` may have just
        // been added to an older database.
        conn.execute_batch(EXPIRY_INDEX).map_err(storage)?;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             {COUNTERS}
             DELETE FROM lane_counts;
             INSERT INTO lane_counts (lane, held)
                 SELECT queue, COUNT(*) FROM messages GROUP BY queue;
             UPDATE messages SET leased = 0, visible_ms = enqueued_ms WHERE leased = 1;
             COMMIT;"
        ))
        .map_err(storage)?;
        let publishes = Coalesced::new(db, true, |conn, rows: Vec<(u64, PublishRow)>| {
            Ok(insert(conn, &rows)?)
        });
        Ok(SqliteStorage {
            db: db.clone(),
            publishes,
        })
    }

    /// The database it keeps its tables in.
    pub fn database(&self) -> &Database {
        &self.db
    }
}

/// A ready message at the head of a lane.
struct Due {
    seq: i64,
    id: String,
    /// Its deliveries so far.
    attempts: u32,
}

/// A message given up on, and why.
struct Doomed<'a> {
    seq: i64,
    id: &'a str,
    /// The deadline of the lease it is given up under (`None`: whatever its state).
    lease: Option<u64>,
    reason: &'a str,
    /// The failure of the last attempt, when it was a retry over the limit.
    error: Option<&'a str>,
}

/// What became of a message that failed for good.
enum GaveUp {
    /// Moved to the dead-letter queue, in these lanes of it.
    DeadLettered(Vec<Lane>),
    /// Deleted: no dead-letter queue, or no consumer of it takes the message.
    Dropped,
    /// Nothing: the lease it was given up under had run out, and the message was taken
    /// again (or is gone).
    Stale,
}

impl GaveUp {
    /// Counts this in `summary`, and records the lanes to wake in `woken`.
    fn count(self, summary: &mut SettleSummary, woken: &mut Vec<Lane>) {
        match self {
            GaveUp::DeadLettered(lanes) => {
                woken.extend(lanes);
                summary.dead_lettered += 1;
            }
            GaveUp::Dropped => summary.dropped += 1,
            GaveUp::Stale => summary.stale += 1,
        }
    }
}

/// Gives up on the `doomed` message of `lane`: moves it to the lanes `dead_letters`
/// names for it, or deletes it (logged) when there are none.
fn give_up(
    conn: &Connection,
    lane: &Lane,
    doomed: Doomed<'_>,
    dead_letters: &DeadLetterRoute,
    now: u64,
) -> rusqlite::Result<GaveUp> {
    let Doomed {
        seq,
        id,
        lease,
        reason,
        error,
    } = doomed;
    let Some((content_type, body)) = conn
        .prepare_cached(&format!(
            "SELECT content_type, body FROM messages WHERE {UNDER_LEASE}"
        ))?
        .query_row(params![seq, lease], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .optional()?
    else {
        warn_stale(lane, id);
        return Ok(GaveUp::Stale);
    };
    let content_type = ContentType::parse(&content_type).unwrap_or(ContentType::Bytes);
    let lanes = dead_letters.lanes(content_type, &body);
    let Some((first, copies)) = lanes.split_first() else {
        dead_letters.log(lane, id, reason, true);
        let deleted = conn
            .prepare_cached("DELETE FROM messages WHERE seq = ?1")?
            .execute([seq])?;
        count_rows(conn, &lane.to_string(), -(deleted as i64))?;
        return Ok(GaveUp::Dropped);
    };
    dead_letters.log(lane, id, reason, false);
    let (from, to) = (lane.to_string(), first.to_string());
    let moved = conn
        .prepare_cached(
            "UPDATE messages SET queue = ?2, leased = 0, attempts = 0,
         source_attempts = attempts, visible_ms = ?3, enqueued_ms = ?3,
         source_queue = ?4, dead_reason = ?5, dead_ms = ?3,
         first_failed_ms = COALESCE(first_failed_ms, ?3),
         last_failed_ms = ?3, last_error = COALESCE(?6, last_error)
         WHERE seq = ?1",
        )?
        .execute(params![seq, to, now, from, reason, error])? as i64;
    count_moved(conn, &from, &to, moved)?;
    copy_to_lanes(conn, seq, copies)?;
    Ok(GaveUp::DeadLettered(lanes))
}

/// Stores a copy of the row `seq`, as it stands, in each of `lanes`.
fn copy_to_lanes(conn: &Connection, seq: i64, lanes: &[Lane]) -> rusqlite::Result<()> {
    let mut copy = conn.prepare_cached(
        "INSERT INTO messages
         (id, queue, content_type, body, published_ms, visible_ms, attempts, leased,
          last_error, source_queue, dead_reason, dead_ms, first_failed_ms, last_failed_ms,
          source_attempts, enqueued_ms)
         SELECT id, ?2, content_type, body, published_ms, visible_ms, attempts, leased,
          last_error, source_queue, dead_reason, dead_ms, first_failed_ms, last_failed_ms,
          source_attempts, enqueued_ms
         FROM messages WHERE seq = ?1",
    )?;
    for lane in lanes {
        let lane = lane.to_string();
        let copied = copy.execute(params![seq, lane])?;
        count_rows(conn, &lane, copied as i64)?;
    }
    Ok(())
}

/// Adds the [`ADDED_COLUMNS`] a database made by an older version lacks.
fn add_columns(conn: &Connection) -> rusqlite::Result<()> {
    let present: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('messages')")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for (column, definition) in ADDED_COLUMNS {
        if present.iter().any(|p| p == column) {
            continue;
        }
        conn.execute_batch(&format!(
            "ALTER TABLE messages ADD COLUMN {column} {definition}"
        ))?;
        if column == "enqueued_ms" {
            conn.execute(
                "UPDATE messages SET enqueued_ms = COALESCE(dead_ms, published_ms)",
                [],
            )?;
        }
    }
    Ok(())
}

/// Reads a written lane from the column `index` of `row`.
fn lane_at(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Lane> {
    let written: String = row.get(index)?;
    written.parse().map_err(|err: super::lane::NotALane| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, err.into())
    })
}

/// Reads a row selected with [`STORED_COLUMNS`] at `now`.
fn stored_message(row: &rusqlite::Row<'_>, now: u64) -> rusqlite::Result<StoredMessage> {
    let leased: bool = row.get(2)?;
    let visible_ms: u64 = row.get(3)?;
    let content_type: String = row.get(13)?;
    let source: Option<String> = row.get(11)?;
    let source: Option<Lane> = match source {
        Some(_) => Some(lane_at(row, 11)?),
        None => None,
    };
    Ok(StoredMessage {
        id: row.get(1)?,
        consumer: lane_at(row, 15)?.consumer,
        state: match (visible_ms <= now, leased) {
            // A lease that ran out leaves its message ready.
            (true, _) => MessageState::Ready,
            (false, true) => MessageState::InFlight,
            (false, false) => MessageState::Delayed,
        },
        attempts: row.get(4)?,
        published_ms: row.get(5)?,
        first_failed_ms: row.get(6)?,
        last_failed_ms: row.get(7)?,
        last_error: row.get(8)?,
        dead_lettered_ms: row.get(9)?,
        dead_reason: row.get(10)?,
        source_attempts: row.get(12)?,
        content_type: ContentType::parse(&content_type).unwrap_or(ContentType::Bytes),
        body: row.get(14)?,
        source_queue: source.as_ref().map(|s| s.queue.clone()),
        source_consumer: source.map(|s| s.consumer),
    })
}

/// A [`Selection`] of `queue` as the `?2` and `?3` parameters of [`SELECTED`].
fn selected(queue: &str, selection: &Selection) -> (Option<String>, Option<String>) {
    match selection {
        Selection::All => (None, None),
        Selection::Ids(ids) => (
            Some(serde_json::to_string(ids).expect("strings serialize")),
            None,
        ),
        Selection::Consumer(consumer) => (None, Some(Lane::new(queue, consumer).to_string())),
    }
}

/// The ready messages at the head of `lane` (up to `max_size`), with when the first of
/// them became ready.
fn head(
    conn: &Connection,
    lane: &str,
    max_size: usize,
    now: u64,
) -> rusqlite::Result<(Option<u64>, Vec<Due>)> {
    let mut first = None;
    let due = conn
        .prepare_cached(
            "SELECT seq, visible_ms, id, attempts FROM messages
             WHERE queue = ?1 AND visible_ms <= ?2
             ORDER BY visible_ms, seq LIMIT ?3",
        )?
        .query_map(params![lane, now, max_size as i64], |r| {
            let visible: u64 = r.get(1)?;
            first.get_or_insert(visible);
            Ok(Due {
                seq: r.get(0)?,
                id: r.get(2)?,
                attempts: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((first, due))
}

/// When the earliest delayed message of `lane` becomes ready, or lease runs out.
fn next_visible(conn: &Connection, lane: &str, now: u64) -> rusqlite::Result<Option<u64>> {
    conn.prepare_cached(
        "SELECT MIN(visible_ms) FROM messages WHERE queue = ?1 AND visible_ms > ?2",
    )?
    .query_row(params![lane, now], |r| r.get(0))
}

/// Leases the batch of `lane` if [`readiness`] says one is due (see
/// [`DataPath::lease`]).
fn lease(conn: &Connection, lane: &Lane, plan: &LeasePlan) -> rusqlite::Result<Leased> {
    let written = lane.to_string();
    let now = plan.now;
    let (first_ready, mut due) = head(conn, &written, plan.max_size * plan.batches, now)?;
    if let Readiness::Wait(fill_by) = readiness(first_ready, due.len(), plan) {
        let next = next_visible(conn, &written, now)?;
        return Ok(Leased::Wait(earliest(fill_by, next)));
    }
    due.truncate(taken(due.len(), plan));
    let (mut gave_up, mut woken) = (SettleSummary::default(), Vec::new());
    let mut leasing = Vec::with_capacity(due.len());
    for message in due {
        if let Some(reason) = poisoned(message.attempts, &plan.policy) {
            let doomed = Doomed {
                seq: message.seq,
                id: &message.id,
                lease: None,
                reason: &reason,
                error: None,
            };
            give_up(conn, lane, doomed, &plan.dead_letters, now)?.count(&mut gave_up, &mut woken);
            continue;
        }
        leasing.push(message.seq);
    }
    // The lease's rows, leased in one statement, then read. An `UPDATE … RETURNING`
    // would copy every row, body and all, into a temporary table before returning the
    // first.
    let seqs = seq_list(&leasing);
    conn.prepare_cached(
        "UPDATE messages SET leased = 1, attempts = attempts + 1, visible_ms = ?2
         WHERE seq IN (SELECT value FROM json_each(?1))",
    )?
    .execute(params![seqs, plan.deadline])?;
    let mut deliveries: Vec<(i64, Delivery)> = conn
        .prepare_cached(
            "SELECT leasing.key, m.seq, m.id, m.attempts, m.published_ms, m.content_type,
                    m.body, m.enqueued_ms
             FROM json_each(?1) AS leasing CROSS JOIN messages AS m ON m.seq = leasing.value",
        )?
        .query_map([seqs], |row| {
            let delivery = Delivery {
                lease: row.get(1)?,
                id: row.get(2)?,
                attempts: row.get(3)?,
                timestamp_ms: row.get(4)?,
                enqueued_ms: row.get(7)?,
                content_type: ContentType::parse(row.get_ref(5)?.as_str()?)
                    .unwrap_or(ContentType::Bytes),
                body: row.get(6)?,
                lease_deadline_ms: plan.deadline,
            };
            Ok((row.get(0)?, delivery))
        })?
        .collect::<rusqlite::Result<_>>()?;
    // In the order they became ready: the order `json_each` reads them in. The join
    // keeps it, so the sort finds them in order already, but SQL promises no order and
    // the sort makes it certain.
    deliveries.sort_by_key(|(position, _)| *position);
    let deliveries = deliveries.into_iter().map(|(_, d)| d).collect();
    Ok(Leased::Batch {
        deliveries,
        gave_up,
        woken,
    })
}

/// Commits `fates` of messages delivered from `lane` (see [`DataPath::commit`]).
fn commit(
    conn: &Connection,
    lane: &Lane,
    fates: Vec<(Delivery, Fate)>,
    dead_letters: &DeadLetterRoute,
    now: u64,
) -> rusqlite::Result<Committed> {
    let mut committed = Committed::default();
    let summary = &mut committed.summary;
    // Acks: one statement per lease deadline (a batch has one).
    let mut acks: BTreeMap<u64, Vec<Delivery>> = BTreeMap::new();
    for (delivery, fate) in fates {
        let (seq, lease) = (delivery.lease, Some(delivery.lease_deadline_ms));
        let (count, changed) = match fate {
            Fate::Delete => {
                acks.entry(delivery.lease_deadline_ms)
                    .or_default()
                    .push(delivery);
                continue;
            }
            Fate::Retry { visible_ms, error } => (
                &mut summary.retried,
                conn.prepare_cached(&format!(
                    "UPDATE messages SET leased = 0, visible_ms = ?3, last_error = ?4,
                     first_failed_ms = COALESCE(first_failed_ms, ?5), last_failed_ms = ?5
                     WHERE {UNDER_LEASE}"
                ))?
                .execute(params![seq, lease, visible_ms, error, now])?,
            ),
            Fate::Release { visible_ms } => (
                &mut summary.released,
                conn.prepare_cached(&format!(
                    "UPDATE messages SET leased = 0, visible_ms = ?3,
                     attempts = MAX(attempts - 1, 0) WHERE {UNDER_LEASE}"
                ))?
                .execute(params![seq, lease, visible_ms])?,
            ),
            Fate::DeadLetter { reason, error } => {
                let doomed = Doomed {
                    seq,
                    id: &delivery.id,
                    lease,
                    reason: &reason,
                    error: error.as_deref(),
                };
                give_up(conn, lane, doomed, dead_letters, now)?
                    .count(summary, &mut committed.woken);
                continue;
            }
        };
        if changed == 0 {
            warn_stale(lane, &delivery.id);
            summary.stale += 1;
        } else {
            *count += 1;
        }
    }
    for (deadline, acked) in acks {
        let seqs: Vec<i64> = acked.iter().map(|d| d.lease).collect();
        let deleted: HashSet<i64> = conn
            .prepare_cached(
                "DELETE FROM messages WHERE seq IN (SELECT value FROM json_each(?1))
                 AND leased = 1 AND visible_ms = ?2 RETURNING seq",
            )?
            .query_map(params![seq_list(&seqs), deadline], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        count_rows(conn, &lane.to_string(), -(deleted.len() as i64))?;
        for delivery in acked {
            if deleted.contains(&delivery.lease) {
                summary.acked += 1;
            } else {
                warn_stale(lane, &delivery.id);
                summary.stale += 1;
            }
        }
    }
    Ok(committed)
}

/// `seqs` as a JSON array, for a statement that reads them with `json_each`.
fn seq_list(seqs: &[i64]) -> String {
    serde_json::to_string(seqs).expect("integers serialize")
}

/// Rows per multi-row `INSERT` of a publish, largest first: a publish of n rows takes
/// few statements, each prepared once.
const INSERT_CHUNKS: [usize; 4] = [64, 16, 4, 1];

/// The `INSERT` of `rows` rows (one of [`INSERT_CHUNKS`]): each row's id, lane, content
/// type, body, publish time and visible time.
fn insert_statement(rows: usize) -> &'static str {
    static STATEMENTS: OnceLock<Vec<String>> = OnceLock::new();
    let statements = STATEMENTS.get_or_init(|| {
        INSERT_CHUNKS
            .iter()
            .map(|&rows| {
                let values: Vec<String> = (0..rows)
                    .map(|row| {
                        let at = 6 * row + 1;
                        let (published, visible) = (at + 4, at + 5);
                        format!(
                            "(?{at}, ?{}, ?{}, ?{}, ?{published}, ?{visible}, ?{published})",
                            at + 1,
                            at + 2,
                            at + 3,
                        )
                    })
                    .collect();
                format!(
                    "INSERT INTO messages
                     (id, queue, content_type, body, published_ms, visible_ms, enqueued_ms)
                     VALUES {}",
                    values.join(", ")
                )
            })
            .collect()
    });
    let chunk = INSERT_CHUNKS
        .iter()
        .position(|&n| n == rows)
        .expect("a chunk size");
    &statements[chunk]
}

/// The values of one row [`insert`] stores: its id, lane, content type, body, publish
/// time and visible time.
type InsertedRow<'a> = (&'a str, String, &'a str, &'a [u8], &'a u64, u64);

/// Stores every row of `rows` (each with its publish time) in each of its lanes, ready at
/// its publish time plus its delay, in order, a chunk of rows per statement.
fn insert(conn: &Connection, rows: &[(u64, PublishRow)]) -> rusqlite::Result<()> {
    let values: Vec<InsertedRow<'_>> = rows
        .iter()
        .flat_map(|(published, row)| {
            let m = &row.message;
            let visible = published + u64::from(m.delay_seconds) * 1000;
            row.lanes.iter().map(move |lane| {
                (
                    row.id.as_str(),
                    lane.to_string(),
                    m.content_type.as_str(),
                    m.body.as_slice(),
                    published,
                    visible,
                )
            })
        })
        .collect();
    let mut rest = values.as_slice();
    while !rest.is_empty() {
        let size = INSERT_CHUNKS
            .into_iter()
            .find(|&n| n <= rest.len())
            .expect("a chunk of 1 always fits");
        let (chunk, after) = rest.split_at(size);
        let mut bound: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(6 * size);
        for (id, lane, content_type, body, published, visible) in chunk {
            bound.extend([
                id as &dyn rusqlite::ToSql,
                lane,
                content_type,
                body,
                published,
                visible,
            ]);
        }
        conn.prepare_cached(insert_statement(size))?
            .execute(bound.as_slice())?;
        rest = after;
    }
    let mut added: BTreeMap<&str, i64> = BTreeMap::new();
    for (_, lane, ..) in &values {
        *added.entry(lane).or_default() += 1;
    }
    for (lane, n) in added {
        count_rows(conn, lane, n)?;
    }
    Ok(())
}

/// The counts of every lane of `queue` at `now` (see the module doc: no backlog scan).
fn lane_counts(
    conn: &Connection,
    queue: &str,
    now: u64,
) -> rusqlite::Result<Vec<(Lane, QueueCounts)>> {
    // One snapshot for every count: read one by one, a lease committed between two of
    // them counted its row as in flight but not as waiting (a lane of one message held 2).
    let _snapshot = conn.unchecked_transaction()?;
    let held: Vec<(Lane, u64)> = conn
        .prepare_cached(concat!(
            "SELECT lane, held FROM lane_counts WHERE ",
            in_queue!("lane"),
            " ORDER BY lane"
        ))?
        .query_map([queue], |r| Ok((lane_at(r, 0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut not_visible =
        conn.prepare_cached("SELECT COUNT(*) FROM messages WHERE queue = ?1 AND visible_ms > ?2")?;
    let mut in_flight = conn.prepare_cached(
        "SELECT COUNT(*) FROM messages INDEXED BY messages_leased
         WHERE queue = ?1 AND leased = 1 AND visible_ms > ?2",
    )?;
    let mut oldest = conn.prepare_cached(
        "SELECT visible_ms FROM messages WHERE queue = ?1 ORDER BY visible_ms LIMIT 1",
    )?;
    held.into_iter()
        .map(|(lane, held)| {
            let written = lane.to_string();
            let waiting: u64 = not_visible.query_row(params![written, now], |r| r.get(0))?;
            let leased: u64 = in_flight.query_row(params![written, now], |r| r.get(0))?;
            let first: Option<u64> = oldest.query_row([&written], |r| r.get(0)).optional()?;
            let counts = QueueCounts {
                backlog: held.saturating_sub(waiting),
                in_flight: leased,
                delayed: waiting.saturating_sub(leased),
                oldest_ready_ms: first.filter(|&at| at <= now),
            };
            Ok((lane, counts))
        })
        .collect()
}

/// A selected row of a redrive.
struct Redrivable {
    seq: i64,
    /// The written lane it is in.
    lane: String,
    /// The lane it was dead-lettered from.
    source_lane: Option<String>,
    content_type: ContentType,
    body: Vec<u8>,
}

/// Moves the selected rows of `queue` to `target` (see [`Operator::redrive`]).
fn redrive(
    conn: &Connection,
    queue: &str,
    selection: &Selection,
    target: &RedriveTarget,
    routes: &Routes,
    now: u64,
) -> rusqlite::Result<(RedriveSummary, Vec<Lane>)> {
    let (ids, only) = selected(queue, selection);
    let rows: Vec<Redrivable> = conn
        .prepare_cached(&format!(
            "SELECT seq, source_queue, content_type, body, queue FROM messages
             WHERE {IN_QUEUE} AND {SELECTED}"
        ))?
        .query_map(params![queue, ids, only, now], |r| {
            let content_type: String = r.get(2)?;
            Ok(Redrivable {
                seq: r.get(0)?,
                lane: r.get(4)?,
                source_lane: r.get(1)?,
                content_type: ContentType::parse(&content_type).unwrap_or(ContentType::Bytes),
                body: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let (mut woken, mut redriven) = (Vec::new(), 0);
    for row in rows {
        // Back to its source: the lane of the consumer that gave up on it. To a named
        // queue: to the consumers that subscribe to it there.
        let lanes: Vec<Lane> = match target {
            RedriveTarget::Source { known } => row
                .source_lane
                .and_then(|written| written.parse::<Lane>().ok())
                .filter(|lane| known.contains(lane))
                .into_iter()
                .collect(),
            RedriveTarget::Queue(to) => routes.lanes(to, row.content_type, &row.body),
        };
        let Some((first, copies)) = lanes.split_first() else {
            continue;
        };
        let first = first.to_string();
        let moved = conn
            .prepare_cached(
                "UPDATE messages SET queue = ?2, attempts = 0, leased = 0,
             visible_ms = ?3, enqueued_ms = ?3, first_failed_ms = NULL,
             last_failed_ms = NULL, last_error = NULL, dead_ms = NULL,
             dead_reason = NULL, source_queue = NULL, source_attempts = NULL
             WHERE seq = ?1",
            )?
            .execute(params![row.seq, first, now])? as i64;
        count_moved(conn, &row.lane, &first, moved)?;
        copy_to_lanes(conn, row.seq, copies)?;
        redriven += 1;
        woken.extend(lanes);
    }
    let skipped: u64 = conn
        .prepare_cached(&format!(
            "SELECT COUNT(*) FROM messages WHERE {IN_QUEUE} AND {SELECTED}"
        ))?
        .query_row(params![queue, ids, only, now], |r| r.get(0))?;
    Ok((RedriveSummary { redriven, skipped }, woken))
}

#[async_trait]
impl DataPath for SqliteStorage {
    async fn insert(&self, rows: Vec<PublishRow>, now: u64) -> Result<(), QueueError> {
        let written = self.publishes.add(rows.into_iter().map(|row| (now, row)));
        Ok(written.await?)
    }

    async fn lease(&self, lane: &Lane, plan: LeasePlan) -> Result<Leased, QueueError> {
        let lane = lane.clone();
        self.db
            .write(move |conn| Ok(lease(conn, &lane, &plan)?))
            .await
    }

    async fn commit(
        &self,
        lane: &Lane,
        fates: Vec<(Delivery, Fate)>,
        dead_letters: DeadLetterRoute,
        now: u64,
        effects: SideEffects,
    ) -> Result<Committed, QueueError> {
        let lane = lane.clone();
        let effects = effects
            .statements_for(&self.db)
            .await
            .map_err(QueueError::SideEffects)?;
        self.db
            .write(move |conn| {
                if let Some(effects) = &effects {
                    effects(conn).map_err(|err| QueueError::SideEffects(err.to_string()))?;
                }
                Ok(commit(conn, &lane, fates, &dead_letters, now)?)
            })
            .await
    }
}

#[async_trait]
impl Operator for SqliteStorage {
    async fn lanes(&self, queue: &str, now: u64) -> Result<Vec<(Lane, QueueCounts)>, QueueError> {
        let queue = queue.to_owned();
        self.db
            .read(move |conn| Ok(lane_counts(conn, &queue, now)?))
            .await
    }

    async fn list(
        &self,
        queue: &str,
        after: Option<u64>,
        limit: usize,
        now: u64,
    ) -> Result<MessagePage, QueueError> {
        let queue = queue.to_owned();
        let mut rows = self
            .db
            .read(move |conn| {
                let after = after.map_or(0, |a| a.min(i64::MAX as u64) as i64);
                let limit = limit.saturating_add(1).min(i64::MAX as usize) as i64;
                conn.prepare_cached(&format!(
                    "SELECT {STORED_COLUMNS} FROM messages WHERE {IN_QUEUE} AND seq > ?2
                     ORDER BY seq LIMIT ?3"
                ))?
                .query_map(params![queue, after, limit], |row| {
                    Ok((row.get::<_, u64>(0)?, stored_message(row, now)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(QueueError::from)
            })
            .await?;
        let next = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|(seq, _)| *seq)
        } else {
            None
        };
        Ok(MessagePage {
            messages: rows.into_iter().map(|(_, m)| m).collect(),
            next,
        })
    }

    async fn get(
        &self,
        queue: &str,
        id: &str,
        now: u64,
    ) -> Result<Option<StoredMessage>, QueueError> {
        let (queue, id) = (queue.to_owned(), id.to_owned());
        self.db
            .read(move |conn| {
                conn.prepare_cached(&format!(
                    "SELECT {STORED_COLUMNS} FROM messages WHERE {IN_QUEUE} AND id = ?2
                     ORDER BY seq LIMIT 1"
                ))?
                .query_row(params![queue, id], |row| stored_message(row, now))
                .optional()
                .map_err(QueueError::from)
            })
            .await
    }

    async fn redrive(
        &self,
        queue: &str,
        selection: &Selection,
        target: &RedriveTarget,
        routes: Arc<Routes>,
        now: u64,
    ) -> Result<(RedriveSummary, Vec<Lane>), QueueError> {
        let (queue, selection, target) = (queue.to_owned(), selection.clone(), target.clone());
        self.db
            .write_synced(move |conn| Ok(redrive(conn, &queue, &selection, &target, &routes, now)?))
            .await
    }

    async fn purge(&self, queue: &str, selection: &Selection, now: u64) -> Result<u64, QueueError> {
        let (ids, only) = selected(queue, selection);
        let queue = queue.to_owned();
        self.db
            .write_synced(move |conn| {
                let delete =
                    format!("DELETE FROM messages WHERE {IN_QUEUE} AND {SELECTED} RETURNING queue");
                Ok(delete_counted(
                    conn,
                    &delete,
                    params![queue, ids, only, now],
                )?)
            })
            .await
    }

    async fn expire(
        &self,
        queue: &str,
        cutoff_ms: u64,
        now: u64,
        limit: u64,
    ) -> Result<u64, QueueError> {
        let queue = queue.to_owned();
        self.db
            .write(move |conn| {
                let delete = format!(
                    "DELETE FROM messages WHERE seq IN (
                         SELECT seq FROM messages WHERE {IN_QUEUE} AND enqueued_ms < ?2
                         AND (leased = 0 OR visible_ms <= ?3) LIMIT ?4)
                     RETURNING queue"
                );
                Ok(delete_counted(
                    conn,
                    &delete,
                    params![queue, cutoff_ms, now, limit],
                )?)
            })
            .await
    }
}

impl From<rusqlite::Error> for QueueError {
    fn from(err: rusqlite::Error) -> Self {
        storage(err)
    }
}

fn storage(err: rusqlite::Error) -> QueueError {
    QueueError::Storage(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::now_ms;
    use crate::queue::core::EXPIRY_CHUNK;
    use crate::queue::{BatchTerms, NewMessage, QueueBackend, RetryPolicy, Settlement};
    use crate::store::test_db;
    use std::time::Duration;

    const Q: &str = "jobs";
    const DLQ: &str = "jobs-dlq";
    const LONG: Duration = Duration::from_secs(3600);

    fn open() -> (tempfile::TempDir, SqliteQueue) {
        let dir = tempfile::tempdir().unwrap();
        let queue = SqliteQueue::open(&test_db(dir.path())).unwrap();
        (dir, queue)
    }

    fn text(body: &str, delay_seconds: u32) -> NewMessage {
        NewMessage {
            content_type: ContentType::Text,
            body: body.into(),
            delay_seconds,
        }
    }

    fn policy(max_retries: u32, dlq: Option<&str>) -> RetryPolicy {
        RetryPolicy {
            max_retries,
            dead_letter_queue: dlq.map(str::to_owned),
        }
    }

    /// Batches of `max_size` messages, waiting `max_timeout` to fill, leased for an hour,
    /// under [`policy`] `(3, Some(DLQ))`.
    fn terms(max_size: usize, max_timeout: Duration) -> BatchTerms {
        BatchTerms {
            max_size,
            max_timeout,
            batches: 1,
            lease: LONG,
            policy: policy(3, Some(DLQ)),
        }
    }

    /// Runs `work` on the database's reader thread.
    async fn raw<T: Send + 'static>(
        queue: &SqliteQueue,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> T {
        queue
            .storage()
            .database()
            .read(move |conn| work(conn).map_err(QueueError::from))
            .await
            .unwrap()
    }

    /// The default lane of `Q`.
    fn q() -> Lane {
        Lane::of(Q)
    }

    /// The counts of `lane` alone.
    async fn counts_of(queue: &SqliteQueue, lane: &Lane) -> QueueCounts {
        let lanes = queue.lanes(&lane.queue).await.unwrap();
        let found = lanes.into_iter().find(|(l, _)| l == lane);
        found.map(|(_, counts)| counts).unwrap_or_default()
    }

    async fn publish(queue: &SqliteQueue, n: usize) -> Vec<String> {
        let messages = (0..n).map(|i| text(&format!("m{i}"), 0)).collect();
        queue.publish(Q, messages).await.unwrap()
    }

    /// The next batch, failing the test if none comes within `within`.
    async fn batch(
        queue: &SqliteQueue,
        size: usize,
        timeout: Duration,
        within: Duration,
    ) -> Vec<Delivery> {
        tokio::time::timeout(within, queue.next_batch(&q(), &terms(size, timeout)))
            .await
            .expect("a batch within the deadline")
            .unwrap()
    }

    async fn settle_all(
        queue: &SqliteQueue,
        batch: Vec<Delivery>,
        s: Settlement,
        p: &RetryPolicy,
    ) -> SettleSummary {
        let outcomes = batch.into_iter().map(|d| (d, s.clone())).collect();
        queue
            .settle(&q(), p, outcomes, SideEffects::None)
            .await
            .unwrap()
    }

    /// Ready, in-flight and delayed counts.
    fn held(c: QueueCounts) -> (u64, u64, u64) {
        (c.backlog, c.in_flight, c.delayed)
    }

    fn retry(delay_seconds: u32) -> Settlement {
        Settlement::Retry {
            delay_seconds,
            error: "boom".into(),
        }
    }

    #[tokio::test]
    async fn side_effects_commit_with_the_outcomes_or_neither_does() {
        let (_dir, queue) = open();
        let db = queue.storage().database().clone();
        db.write(|c| {
            c.execute_batch("CREATE TABLE effects (v INTEGER)")
                .map_err(crate::store::StoreError::from)
        })
        .await
        .unwrap();
        publish(&queue, 2).await;
        let leased = batch(&queue, 2, LONG, Duration::from_secs(5)).await;
        let effects = |v: i64, then_fail: bool| SideEffects::Local {
            db: db.clone(),
            statements: Arc::new(move |c| {
                c.execute("INSERT INTO effects VALUES (?1)", [v])?;
                if then_fail {
                    c.execute_batch("INSERT INTO no_such_table VALUES (1)")?;
                }
                Ok(())
            }),
        };
        let ack_first = || vec![(leased[0].clone(), Settlement::Ack)];
        let written = || {
            raw(&queue, |c| {
                c.prepare("SELECT v FROM effects")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<i64>>>()
            })
        };

        // Side effects that fail: neither they nor the outcome are committed.
        let failed = queue
            .settle(&q(), &policy(3, None), ack_first(), effects(1, true))
            .await
            .unwrap_err();
        assert!(
            matches!(&failed, QueueError::SideEffects(why) if why.contains("no_such_table")),
            "{failed}"
        );
        assert_eq!(written().await, Vec::<i64>::new());
        assert_eq!(held(queue.counts(Q).await.unwrap()), (0, 2, 0));

        // Side effects that succeed: both are.
        let summary = queue
            .settle(&q(), &policy(3, None), ack_first(), effects(2, false))
            .await
            .unwrap();
        assert_eq!(summary.acked, 1);
        assert_eq!(written().await, vec![2]);
        assert_eq!(queue.get(Q, &leased[0].id).await.unwrap(), None);
        assert_eq!(held(queue.counts(Q).await.unwrap()), (0, 1, 0));
    }

    #[tokio::test]
    async fn a_full_batch_is_delivered_at_once_in_publish_order() {
        let (_dir, queue) = open();
        let ids = publish(&queue, 7).await;
        let first = batch(&queue, 5, LONG, Duration::from_secs(5)).await;
        assert_eq!(
            first.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
            ids[..5]
        );
        assert!(first.iter().all(|d| d.attempts == 1));
        assert_eq!(first[0].body, b"m0");
        let counts = queue.counts(Q).await.unwrap();
        assert_eq!(held(counts), (2, 5, 0));
    }

    #[tokio::test]
    async fn a_lease_of_several_batches_takes_whole_ones_only() {
        let (_dir, queue) = open();
        let ids = publish(&queue, 25).await;
        let wide = BatchTerms {
            batches: 4,
            ..terms(10, LONG)
        };
        let first = queue.next_batch(&q(), &wide).await.unwrap();
        assert_eq!(
            first.iter().map(|d| d.id.clone()).collect::<Vec<_>>(),
            ids[..20],
            "two whole batches, in publish order"
        );
        assert_eq!(
            held(queue.counts(Q).await.unwrap()),
            (5, 20, 0),
            "5 left ready"
        );
    }

    #[tokio::test]
    async fn a_partial_batch_waits_for_the_timeout() {
        let (_dir, queue) = open();
        publish(&queue, 2).await;
        let started = std::time::Instant::now();
        let got = batch(
            &queue,
            10,
            Duration::from_millis(300),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(got.len(), 2);
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken_by_a_publish() {
        let (_dir, queue) = open();
        let queue = Arc::new(queue);
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next_batch(&q(), &terms(1, LONG)).await.unwrap() }
        });
        tokio::task::yield_now().await;
        publish(&queue, 1).await;
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 1);
    }

    #[tokio::test]
    async fn a_released_message_comes_back_without_an_attempt_counted() {
        let (_dir, queue) = open();
        publish(&queue, 1).await;
        let p = policy(0, Some(DLQ));
        let got = batch(&queue, 1, LONG, Duration::from_secs(5)).await;
        assert_eq!(got[0].attempts, 1);
        let release = Settlement::Release { delay_seconds: 0 };
        let summary = settle_all(&queue, got, release, &p).await;
        assert_eq!(summary.released, 1);
        let again = batch(&queue, 1, LONG, Duration::from_secs(5)).await;
        assert_eq!(again[0].attempts, 1, "the released delivery is not counted");
        let stored = queue.get(Q, &again[0].id).await.unwrap().unwrap();
        assert_eq!(stored.last_error, None, "nothing failed");
    }

    #[tokio::test]
    async fn ack_deletes_and_retry_redelivers_after_its_delay() {
        let (_dir, queue) = open();
        publish(&queue, 2).await;
        let mut got = batch(&queue, 2, LONG, Duration::from_secs(5)).await;
        let second = got.pop().unwrap();
        let p = policy(3, Some(DLQ));
        settle_all(&queue, got, Settlement::Ack, &p).await;
        let summary = settle_all(&queue, vec![second], retry(1), &p).await;
        assert_eq!(
            summary,
            SettleSummary {
                retried: 1,
                ..Default::default()
            }
        );
        assert_eq!(held(queue.counts(Q).await.unwrap()), (0, 0, 1));

        let started = std::time::Instant::now();
        let again = batch(&queue, 1, LONG, Duration::from_secs(5)).await;
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            (again[0].attempts, again[0].body.as_slice()),
            (2, &b"m1"[..])
        );
    }

    #[tokio::test]
    async fn max_retries_then_dead_letter_queue() {
        let (_dir, queue) = open();
        publish(&queue, 1).await;
        let p = policy(2, Some(DLQ));
        for attempt in 1..=3 {
            let got = batch(&queue, 1, Duration::ZERO, Duration::from_secs(5)).await;
            assert_eq!(got[0].attempts, attempt);
            let summary = settle_all(&queue, got, retry(0), &p).await;
            assert_eq!(
                summary.dead_lettered,
                usize::from(attempt == 3),
                "attempt {attempt}"
            );
        }
        assert_eq!(queue.counts(Q).await.unwrap(), QueueCounts::default());
        let dead = queue.counts(DLQ).await.unwrap();
        assert_eq!(dead.backlog, 1);
        let row: (String, String, String) = raw(&queue, |conn| {
            conn.query_row(
                "SELECT body, source_queue, dead_reason FROM messages",
                [],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)
                            .map(|b| String::from_utf8(b).unwrap())?,
                        r.get(1)?,
                        r.get(2)?,
                    ))
                },
            )
        })
        .await;
        assert_eq!(row.0, "m0");
        assert_eq!(row.1, Q);
        assert!(
            row.2
                .contains("max_retries (2) exceeded after 3 attempts; last error: boom"),
            "{}",
            row.2
        );
    }

    #[tokio::test]
    async fn dead_letter_outcome_and_drop_without_a_dlq() {
        let (_dir, queue) = open();
        publish(&queue, 2).await;
        let mut got = batch(&queue, 2, LONG, Duration::from_secs(5)).await;
        let second = got.pop().unwrap();
        let dead = Settlement::DeadLetter {
            reason: "poison".into(),
        };
        let summary = settle_all(&queue, got, dead.clone(), &policy(3, Some(DLQ))).await;
        assert_eq!(summary.dead_lettered, 1);
        let summary = settle_all(&queue, vec![second], dead, &policy(3, None)).await;
        assert_eq!(summary.dropped, 1);
        assert_eq!(queue.counts(Q).await.unwrap(), QueueCounts::default());
        assert_eq!(queue.counts(DLQ).await.unwrap().backlog, 1);
    }

    #[tokio::test]
    async fn delayed_messages_wait_and_leases_die_with_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        {
            let queue = SqliteQueue::open(&test_db(&path)).unwrap();
            queue
                .publish(Q, vec![text("later", 3600), text("now", 0)])
                .await
                .unwrap();
            let got = batch(&queue, 10, Duration::ZERO, Duration::from_secs(5)).await;
            assert_eq!(got.len(), 1, "the delayed message is not ready");
            assert_eq!(held(queue.counts(Q).await.unwrap()), (0, 1, 1));
        }
        let reopened = SqliteQueue::open(&test_db(&path)).unwrap();
        assert_eq!(held(reopened.counts(Q).await.unwrap()), (1, 0, 1));
        let again = batch(&reopened, 10, Duration::ZERO, Duration::from_secs(5)).await;
        assert_eq!(
            (again[0].attempts, again[0].body.as_slice()),
            (2, &b"now"[..])
        );
    }

    /// Publishes `n` messages and dead-letters them with the reason "poison"; returns
    /// their ids.
    async fn dead_letter(queue: &SqliteQueue, n: usize) -> Vec<String> {
        let ids = publish(queue, n).await;
        let got = batch(queue, n, Duration::ZERO, Duration::from_secs(5)).await;
        let dead = Settlement::DeadLetter {
            reason: "poison".into(),
        };
        settle_all(queue, got, dead, &policy(3, Some(DLQ))).await;
        ids
    }

    fn ids_of(page: &MessagePage) -> Vec<String> {
        page.messages.iter().map(|m| m.id.clone()).collect()
    }

    #[tokio::test]
    async fn failures_are_recorded_and_dead_letters_keep_why_they_died() {
        let (_dir, queue) = open();
        let ids = publish(&queue, 2).await;
        let p = policy(1, Some(DLQ));
        let mut got = batch(&queue, 2, Duration::ZERO, Duration::from_secs(5)).await;
        let second = got.pop().unwrap();
        settle_all(&queue, got, retry(0), &p).await;
        let dead = Settlement::DeadLetter {
            reason: "poison pill".into(),
        };
        settle_all(&queue, vec![second], dead, &p).await;

        let retried = queue.get(Q, &ids[0]).await.unwrap().unwrap();
        assert_eq!(retried.attempts, 1);
        assert_eq!(retried.state, MessageState::Ready);
        assert_eq!(retried.last_error.as_deref(), Some("boom"));
        let first_failure = retried.first_failed_ms.unwrap();
        assert_eq!(retried.last_failed_ms, Some(first_failure));
        assert_eq!(retried.dead_reason, None);

        let got = batch(&queue, 1, Duration::ZERO, Duration::from_secs(5)).await;
        let over = Settlement::Retry {
            delay_seconds: 0,
            error: "boom again".into(),
        };
        settle_all(&queue, got, over, &p).await;
        assert_eq!(queue.counts(Q).await.unwrap(), QueueCounts::default());

        let page = queue.list(DLQ, None, 10).await.unwrap();
        assert_eq!(ids_of(&page), ids, "publish order");
        assert_eq!(page.next, None);
        let (retried, poisoned) = (&page.messages[0], &page.messages[1]);
        assert_eq!(retried.attempts, 0);
        assert_eq!(retried.source_attempts, Some(2));
        assert_eq!(retried.source_queue.as_deref(), Some(Q));
        assert_eq!(retried.first_failed_ms, Some(first_failure));
        assert!(retried.last_failed_ms >= Some(first_failure));
        assert_eq!(retried.dead_lettered_ms, retried.last_failed_ms);
        assert_eq!(retried.last_error.as_deref(), Some("boom again"));
        assert_eq!(
            retried.dead_reason.as_deref(),
            Some("max_retries (1) exceeded after 2 attempts; last error: boom again")
        );
        assert_eq!(poisoned.source_attempts, Some(1));
        assert_eq!(poisoned.dead_reason.as_deref(), Some("poison pill"));
        assert_eq!(poisoned.last_error, None);
        assert!(poisoned.first_failed_ms.is_some());
        assert_eq!(
            (poisoned.content_type, poisoned.body.as_slice()),
            (ContentType::Text, &b"m1"[..])
        );
    }

    #[tokio::test]
    async fn a_queue_is_listed_page_by_page_with_each_message_state() {
        let (_dir, queue) = open();
        let ids = publish(&queue, 5).await;
        queue.publish(Q, vec![text("later", 3600)]).await.unwrap();
        batch(&queue, 1, Duration::ZERO, Duration::from_secs(5)).await;

        let first = queue.list(Q, None, 2).await.unwrap();
        assert_eq!(ids_of(&first), ids[..2]);
        let states: Vec<_> = first.messages.iter().map(|m| m.state).collect();
        assert_eq!(states, [MessageState::InFlight, MessageState::Ready]);
        let second = queue.list(Q, first.next, 2).await.unwrap();
        assert_eq!(ids_of(&second), ids[2..4]);
        let last = queue.list(Q, second.next, 2).await.unwrap();
        assert_eq!(last.messages.len(), 2);
        assert_eq!(last.messages[0].id, ids[4]);
        assert_eq!(last.messages[1].state, MessageState::Delayed);
        assert_eq!(last.next, None, "the last page says so");
        assert_eq!(
            queue.list(DLQ, None, 2).await.unwrap(),
            MessagePage::default()
        );
        assert_eq!(queue.get(DLQ, &ids[0]).await.unwrap(), None, "wrong queue");
    }

    #[tokio::test]
    async fn redrive_to_the_source_queue_resets_the_message_and_wakes_its_consumer() {
        let (_dir, queue) = open();
        let queue = Arc::new(queue);
        let ids = dead_letter(&queue, 3).await;
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next_batch(&q(), &terms(1, LONG)).await.unwrap() }
        });
        tokio::task::yield_now().await;

        let source = RedriveTarget::Source { known: vec![q()] };
        let one = Selection::Ids(vec![ids[1].clone(), "no-such-id".into()]);
        let summary = queue.redrive(DLQ, &one, &source).await.unwrap();
        assert_eq!(
            summary,
            RedriveSummary {
                redriven: 1,
                skipped: 0
            }
        );
        assert_eq!(queue.counts(DLQ).await.unwrap().backlog, 2);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the consumer is woken")
            .unwrap();
        assert_eq!((got.len(), got[0].id.as_str()), (1, ids[1].as_str()));
        assert_eq!(got[0].attempts, 1, "attempts start over");
        let leased = queue.get(Q, &ids[1]).await.unwrap().unwrap();
        assert_eq!(
            (
                leased.dead_reason,
                leased.source_queue,
                leased.first_failed_ms
            ),
            (None, None, None)
        );

        let unknown = RedriveTarget::Source {
            known: vec![Lane::of("elsewhere")],
        };
        let summary = queue.redrive(DLQ, &Selection::All, &unknown).await.unwrap();
        assert_eq!(
            summary,
            RedriveSummary {
                redriven: 0,
                skipped: 2
            },
            "a source queue that is not known is not redriven to"
        );
    }

    #[tokio::test]
    async fn redrive_to_a_named_queue_takes_every_message_not_in_flight() {
        let (_dir, queue) = open();
        dead_letter(&queue, 3).await;
        let leased = tokio::time::timeout(
            Duration::from_secs(5),
            queue.next_batch(&Lane::of(DLQ), &terms(1, LONG)),
        )
        .await
        .unwrap()
        .unwrap();
        let to = RedriveTarget::Queue("other".into());
        let summary = queue.redrive(DLQ, &Selection::All, &to).await.unwrap();
        assert_eq!(summary.redriven, 2);
        assert_eq!(queue.counts("other").await.unwrap().backlog, 2);
        assert_eq!(
            queue.list(DLQ, None, 10).await.unwrap().messages[0].id,
            leased[0].id,
            "the message in flight stays"
        );
    }

    #[tokio::test]
    async fn purge_deletes_all_or_the_given_ids_but_not_messages_in_flight() {
        let (_dir, queue) = open();
        let ids = publish(&queue, 4).await;
        let leased = batch(&queue, 1, Duration::ZERO, Duration::from_secs(5)).await;
        let some = Selection::Ids(vec![ids[0].clone(), ids[1].clone()]);
        assert_eq!(
            queue.purge(Q, &some).await.unwrap(),
            1,
            "ids[0] is in flight"
        );
        assert_eq!(queue.purge(DLQ, &Selection::All).await.unwrap(), 0);
        assert_eq!(queue.purge(Q, &Selection::All).await.unwrap(), 2);
        let left = queue.list(Q, None, 10).await.unwrap();
        assert_eq!(ids_of(&left), [leased[0].id.clone()]);
    }

    #[tokio::test]
    async fn expired_messages_are_purged_by_when_they_entered_the_queue() {
        let (_dir, queue) = open();
        let ids = publish(&queue, 2).await;
        let cutoff = now_ms() + 1;
        wait_past(cutoff);
        let got = batch(&queue, 1, Duration::ZERO, Duration::from_secs(5)).await;
        let dead = Settlement::DeadLetter {
            reason: "poison".into(),
        };
        settle_all(&queue, got, dead, &policy(3, Some(DLQ))).await;
        let young = publish(&queue, 1).await;

        assert_eq!(queue.purge_expired(Q, cutoff).await.unwrap(), 1);
        assert_eq!(ids_of(&queue.list(Q, None, 10).await.unwrap()), young);
        assert_eq!(
            queue.purge_expired(DLQ, cutoff).await.unwrap(),
            0,
            "a dead-lettered message counts from when it was dead-lettered"
        );
        assert_eq!(ids_of(&queue.list(DLQ, None, 10).await.unwrap()), ids[..1]);
        let cutoff = now_ms() + 1;
        wait_past(cutoff);
        assert_eq!(queue.purge_expired(DLQ, cutoff).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn expiry_deletes_in_chunks_found_by_its_index() {
        let (_dir, queue) = open();
        for _ in 0..21 {
            publish(&queue, 100).await;
        }
        let plan: Vec<String> = raw(&queue, |conn| {
            conn.prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT seq FROM messages WHERE {IN_QUEUE}
                 AND enqueued_ms < ?2 AND (leased = 0 OR visible_ms <= ?3) LIMIT ?4"
            ))?
            .query_map(params![Q, 0, 0, EXPIRY_CHUNK], |r| r.get(3))?
            .collect::<rusqlite::Result<_>>()
        })
        .await;
        // Every lane of the queue is searched through the index, never scanned.
        let searches: Vec<&String> = plan.iter().filter(|s| s.starts_with("SEARCH")).collect();
        assert!(!searches.is_empty(), "{plan:?}");
        assert!(
            searches
                .iter()
                .all(|s| s.contains("USING INDEX messages_expiry")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|s| s.starts_with("SCAN")), "{plan:?}");
        let cutoff = now_ms() + 1;
        wait_past(cutoff);
        assert_eq!(queue.purge_expired(Q, cutoff).await.unwrap(), 2100);
        assert!(queue.list(Q, None, 10).await.unwrap().messages.is_empty());
    }

    /// Waits until the clock reads past `ms`, so that later writes get later times.
    fn wait_past(ms: u64) {
        while now_ms() <= ms {
            std::thread::yield_now();
        }
    }

    #[tokio::test]
    async fn a_database_of_the_first_schema_opens_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        {
            // As an older clawq left it: its own file, imported at open.
            let conn = Connection::open(path.join("queues.db")).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.execute(
                "INSERT INTO messages (id, queue, content_type, body, published_ms, visible_ms,
                 source_queue, dead_reason, dead_ms)
                 VALUES ('old', ?1, 'text', X'6869', 1000, 1000, ?2, 'gone', 2000)",
                params![DLQ, Q],
            )
            .unwrap();
        }
        let queue = SqliteQueue::open(&test_db(&path)).unwrap();
        let old = queue.get(DLQ, "old").await.unwrap().unwrap();
        assert_eq!(old.dead_reason.as_deref(), Some("gone"));
        assert_eq!((old.first_failed_ms, old.source_attempts), (None, None));
        assert_eq!(queue.purge_expired(DLQ, 2000).await.unwrap(), 0);
        assert_eq!(queue.purge_expired(DLQ, 2001).await.unwrap(), 1);
        drop(queue);
        SqliteQueue::open(&test_db(&path)).expect("opening twice adds nothing twice");
    }

    #[tokio::test]
    async fn a_refused_batch_stores_nothing() {
        let (_dir, queue) = open();
        let err = queue
            .publish(Q, vec![text("ok", 0), text("late", 50_000)])
            .await
            .unwrap_err();
        assert!(matches!(err, QueueError::Limit(_)));
        assert_eq!(queue.counts(Q).await.unwrap(), QueueCounts::default());
    }

    /// A queue `Q` read by its default consumer (everything) and by `audit` (only
    /// messages whose `type` is `a`).
    fn fanned_out() -> (tempfile::TempDir, SqliteQueue) {
        let (dir, queue) = open();
        let mut routes = Routes::default();
        routes.add(Q, Q, Default::default());
        let only_a: super::super::routes::Filter =
            serde_json::from_value(serde_json::json!({"type": "a"})).unwrap();
        routes.add(Q, "audit", only_a);
        (dir, queue.with_routes(routes))
    }

    fn typed(kind: &str) -> NewMessage {
        NewMessage {
            content_type: ContentType::Json,
            body: format!(r#"{{"type":"{kind}"}}"#).into_bytes(),
            delay_seconds: 0,
        }
    }

    #[tokio::test]
    async fn each_subscribed_consumer_settles_its_own_copy() {
        let (_dir, queue) = fanned_out();
        let ids = queue
            .publish(Q, vec![typed("a"), typed("b")])
            .await
            .unwrap();
        assert_eq!(queue.counts(Q).await.unwrap().backlog, 3, "a twice, b once");
        let lane = Lane::new(Q, "audit");
        assert_eq!(counts_of(&queue, &lane).await.backlog, 1);

        let audit = tokio::time::timeout(LONG, queue.next_batch(&lane, &terms(10, Duration::ZERO)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(audit[0].id, ids[0]);
        let outcomes = vec![(
            audit[0].clone(),
            Settlement::DeadLetter {
                reason: "audit failed".into(),
            },
        )];
        queue
            .settle(&lane, &policy(3, Some(DLQ)), outcomes, SideEffects::None)
            .await
            .unwrap();

        // The default consumer still gets both messages, on their first attempt.
        let main = batch(&queue, 10, Duration::ZERO, Duration::from_secs(5)).await;
        assert_eq!(
            main.iter().map(|d| &d.id).collect::<Vec<_>>(),
            [&ids[0], &ids[1]]
        );
        assert!(main.iter().all(|d| d.attempts == 1));
        settle_all(&queue, main, Settlement::Ack, &policy(3, Some(DLQ))).await;
        assert_eq!(queue.counts(Q).await.unwrap(), QueueCounts::default());

        // The dead letter names the consumer that gave up, and goes back only to it.
        let dead = queue.get(DLQ, &ids[0]).await.unwrap().unwrap();
        assert_eq!(dead.source_queue.as_deref(), Some(Q));
        assert_eq!(dead.source_consumer.as_deref(), Some("audit"));
        let source = RedriveTarget::Source {
            known: vec![q(), lane.clone()],
        };
        let summary = queue.redrive(DLQ, &Selection::All, &source).await.unwrap();
        assert_eq!(summary.redriven, 1);
        assert_eq!(counts_of(&queue, &lane).await.backlog, 1);
        let lanes = queue.lanes(Q).await.unwrap();
        assert_eq!(lanes.len(), 1);
        assert_eq!((&lanes[0].0, lanes[0].1.backlog), (&lane, 1));
        let page = queue.list(Q, None, 10).await.unwrap();
        assert_eq!(page.messages.len(), 1);
        assert_eq!(page.messages[0].consumer, "audit");

        // One consumer's copies can be purged without touching the others'.
        queue.publish(Q, vec![typed("a")]).await.unwrap();
        let audit = Selection::Consumer("audit".into());
        assert_eq!(queue.purge(Q, &audit).await.unwrap(), 2);
        assert_eq!(counts_of(&queue, &lane).await, QueueCounts::default());
        assert_eq!(
            queue.counts(Q).await.unwrap().backlog,
            1,
            "the default copy stays"
        );
    }

    #[tokio::test]
    async fn a_message_no_consumer_takes_is_not_stored_and_a_redrive_fans_out() {
        let (_dir, queue) = open();
        let mut routes = Routes::default();
        let only_a: super::super::routes::Filter =
            serde_json::from_value(serde_json::json!({"type": "a"})).unwrap();
        routes.add(Q, "audit", only_a);
        let queue = queue.with_routes(routes);
        queue.publish(Q, vec![typed("b")]).await.unwrap();
        assert_eq!(queue.counts(Q).await.unwrap(), QueueCounts::default());

        queue
            .publish(DLQ, vec![typed("a"), typed("b")])
            .await
            .unwrap();
        let to = RedriveTarget::Queue(Q.to_owned());
        let summary = queue.redrive(DLQ, &Selection::All, &to).await.unwrap();
        assert_eq!(
            summary,
            RedriveSummary {
                redriven: 1,
                skipped: 1
            },
            "the message no consumer of the target takes stays where it is"
        );
        assert_eq!(counts_of(&queue, &Lane::new(Q, "audit")).await.backlog, 1);
    }

    #[tokio::test]
    async fn a_lease_that_runs_out_leaves_the_message_ready_and_a_late_outcome_is_ignored() {
        let (_dir, queue) = open();
        let ids = publish(&queue, 2).await;
        let short = BatchTerms {
            lease: Duration::from_millis(200),
            ..terms(1, Duration::ZERO)
        };
        let first = queue.next_batch(&q(), &short).await.unwrap();
        assert_eq!(held(queue.counts(Q).await.unwrap()), (1, 1, 0));
        assert_eq!(
            queue
                .purge(Q, &Selection::Ids(vec![ids[0].clone()]))
                .await
                .unwrap(),
            0,
            "held by its lease"
        );
        wait_past(first[0].lease_deadline_ms);
        assert_eq!(held(queue.counts(Q).await.unwrap()), (2, 0, 0));
        let stored = queue.get(Q, &ids[0]).await.unwrap().unwrap();
        assert_eq!(stored.state, MessageState::Ready);

        let mut again = batch(&queue, 2, Duration::ZERO, Duration::from_secs(5)).await;
        let other = again.remove(0);
        assert_eq!(
            (other.id.as_str(), other.attempts),
            (ids[1].as_str(), 1),
            "ready since it was published, before the lease ran out"
        );
        assert_eq!(again[0].id, ids[0]);
        assert_eq!(again[0].attempts, 2, "the lost delivery counts");
        settle_all(&queue, vec![other], Settlement::Ack, &policy(3, Some(DLQ))).await;
        let late = settle_all(&queue, first, Settlement::Ack, &policy(3, Some(DLQ))).await;
        assert_eq!(
            late,
            SettleSummary {
                stale: 1,
                ..Default::default()
            }
        );
        let summary = settle_all(&queue, again, Settlement::Ack, &policy(3, Some(DLQ))).await;
        assert_eq!(summary.acked, 1, "the live lease settles");

        // Retention and purges take a message whose lease ran out.
        publish(&queue, 1).await;
        let second = queue.next_batch(&q(), &short).await.unwrap();
        wait_past(second[0].lease_deadline_ms);
        assert_eq!(queue.purge_expired(Q, now_ms()).await.unwrap(), 1);
        assert_eq!(queue.counts(Q).await.unwrap(), QueueCounts::default());
    }

    #[tokio::test]
    async fn a_lease_that_runs_out_wakes_its_consumer() {
        let (_dir, queue) = open();
        publish(&queue, 1).await;
        let short = BatchTerms {
            lease: Duration::from_millis(300),
            ..terms(1, Duration::ZERO)
        };
        let first = queue.next_batch(&q(), &short).await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(5), queue.next_batch(&q(), &short))
            .await
            .expect("taken again once the lease ran out")
            .unwrap();
        assert_eq!(
            (again[0].id.as_str(), again[0].attempts),
            (first[0].id.as_str(), 2)
        );
        assert!(now_ms() >= first[0].lease_deadline_ms);
    }

    #[tokio::test]
    async fn a_message_delivered_one_plus_max_retries_times_without_an_outcome_is_dead_lettered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let ids = publish(&SqliteQueue::open(&test_db(&path)).unwrap(), 1).await;
        let two_retries = BatchTerms {
            policy: policy(2, Some(DLQ)),
            ..terms(1, Duration::ZERO)
        };
        // Each process dies while it holds the message.
        for attempt in 1..=3 {
            let queue = SqliteQueue::open(&test_db(&path)).unwrap();
            let got = queue.next_batch(&q(), &two_retries).await.unwrap();
            assert_eq!(got[0].attempts, attempt);
        }
        let queue = Arc::new(SqliteQueue::open(&test_db(&path)).unwrap());
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next_batch(&q(), &two_retries).await }
        });
        wait_for_count(&queue, DLQ, 1).await;
        let dead = queue.get(DLQ, &ids[0]).await.unwrap().unwrap();
        assert_eq!(
            dead.dead_reason.as_deref(),
            Some("delivered 3 times without an outcome")
        );
        assert_eq!(dead.source_attempts, Some(3));
        assert_eq!(queue.counts(Q).await.unwrap(), QueueCounts::default());
        assert!(!waiter.is_finished(), "nothing delivered");
        waiter.abort();
    }

    /// Waits until `queue` holds `n` messages.
    async fn wait_for_count(queue: &SqliteQueue, name: &str, n: u64) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while queue.counts(name).await.unwrap().held() != n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the count within the deadline");
    }

    #[tokio::test]
    async fn dead_letters_fan_out_to_the_consumers_of_the_dead_letter_queue_and_wake_them() {
        let (_dir, queue) = open();
        let mut routes = Routes::default();
        routes.add(DLQ, "reader", Default::default());
        let only_a: super::super::routes::Filter =
            serde_json::from_value(serde_json::json!({"type": "a"})).unwrap();
        routes.add(DLQ, "audit", only_a);
        let queue = Arc::new(queue.with_routes(routes));
        let ids = queue
            .publish(Q, vec![typed("a"), typed("b")])
            .await
            .unwrap();
        let waiters = ["reader", "audit"].map(|consumer| {
            let queue = queue.clone();
            let lane = Lane::new(DLQ, consumer);
            tokio::spawn(async move { queue.next_batch(&lane, &terms(1, LONG)).await.unwrap() })
        });
        tokio::task::yield_now().await;

        let got = batch(&queue, 2, Duration::ZERO, Duration::from_secs(5)).await;
        let dead = Settlement::DeadLetter {
            reason: "poison".into(),
        };
        let summary = settle_all(&queue, got, dead, &policy(3, Some(DLQ))).await;
        assert_eq!(summary.dead_lettered, 2);
        let lanes: Vec<(String, u64)> = queue
            .lanes(DLQ)
            .await
            .unwrap()
            .into_iter()
            .map(|(lane, counts)| (lane.to_string(), counts.held()))
            .collect();
        assert_eq!(
            lanes,
            [
                ("jobs-dlq#audit".to_owned(), 1),
                ("jobs-dlq#reader".to_owned(), 2)
            ]
        );
        let [reader, audit] = waiters;
        for (waiter, id) in [(reader, &ids[0]), (audit, &ids[0])] {
            let got = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("every lane that got a copy is woken")
                .unwrap();
            assert_eq!(&got[0].id, id);
        }
        let copy = queue.get(DLQ, &ids[0]).await.unwrap().unwrap();
        assert_eq!(copy.dead_reason.as_deref(), Some("poison"));
        assert_eq!(copy.source_queue.as_deref(), Some(Q));
    }

    /// The counts of every lane of `queue` at `now` as the rows say, by a full recount
    /// (the GROUP BY scan the gauges no longer run).
    async fn recount(queue: &SqliteQueue, name: &str, now: u64) -> Vec<(Lane, QueueCounts)> {
        let name = name.to_owned();
        raw(queue, move |conn| {
            conn.prepare(&format!(
                "SELECT queue,
                        COALESCE(SUM(visible_ms <= ?2), 0),
                        COALESCE(SUM(leased = 1 AND visible_ms > ?2), 0),
                        COALESCE(SUM(leased = 0 AND visible_ms > ?2), 0),
                        MIN(CASE WHEN visible_ms <= ?2 THEN visible_ms END)
                 FROM messages WHERE {IN_QUEUE} GROUP BY queue ORDER BY queue"
            ))?
            .query_map(params![name, now], |r| {
                let counts = QueueCounts {
                    backlog: r.get(1)?,
                    in_flight: r.get(2)?,
                    delayed: r.get(3)?,
                    oldest_ready_ms: r.get(4)?,
                };
                Ok((lane_at(r, 0)?, counts))
            })?
            .collect()
        })
        .await
    }

    /// Checks that the gauges of `Q` and `DLQ` agree with a recount of their rows.
    async fn assert_counters_agree(queue: &SqliteQueue, after: &str) {
        for name in [Q, DLQ] {
            let now = now_ms();
            let (kept, counted) = raw(queue, {
                let name = name.to_owned();
                move |conn| {
                    Ok((
                        lane_counts(conn, &name, now)?,
                        conn.query_row(
                            "SELECT COUNT(*) FROM lane_counts WHERE held <= 0",
                            [],
                            |r| r.get::<_, u64>(0),
                        )?,
                    ))
                }
            })
            .await;
            assert_eq!(
                kept,
                recount(queue, name, now).await,
                "{name} after {after}"
            );
            assert_eq!(counted, 0, "no empty lane is kept, after {after}");
        }
    }

    #[tokio::test]
    async fn the_counters_agree_with_a_recount_after_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut routes = Routes::default();
        routes.add(Q, Q, Default::default());
        routes.add(Q, "audit", Default::default());
        routes.add(DLQ, DLQ, Default::default());
        let open = || {
            SqliteQueue::open(&test_db(&path))
                .unwrap()
                .with_routes(routes.clone())
        };
        let queue = open();
        let ids = publish(&queue, 6).await;
        queue.publish(Q, vec![text("later", 3600)]).await.unwrap();
        assert_counters_agree(&queue, "publish").await;

        let mut got = batch(&queue, 5, Duration::ZERO, Duration::from_secs(5)).await;
        assert_counters_agree(&queue, "lease").await;
        let p = policy(0, Some(DLQ));
        let (acked, retried, dead, dropped) =
            (got.remove(0), got.remove(0), got.remove(0), got.remove(0));
        settle_all(&queue, vec![acked], Settlement::Ack, &p).await;
        assert_counters_agree(&queue, "ack").await;
        let release = Settlement::Release { delay_seconds: 0 };
        settle_all(&queue, got, release, &p).await;
        assert_counters_agree(&queue, "release").await;
        settle_all(&queue, vec![retried], retry(3600), &policy(3, Some(DLQ))).await;
        assert_counters_agree(&queue, "retry").await;
        let poison = Settlement::DeadLetter {
            reason: "poison".into(),
        };
        settle_all(&queue, vec![dead], poison.clone(), &p).await;
        assert_counters_agree(&queue, "dead letter").await;
        settle_all(&queue, vec![dropped], poison, &policy(0, None)).await;
        assert_counters_agree(&queue, "drop").await;
        // Redelivered with no outcome after max_retries (0) deliveries: given up on.
        let leased = batch(&queue, 1, Duration::ZERO, Duration::from_secs(5)).await;
        drop(queue);
        let queue = open();
        assert_counters_agree(&queue, "restart").await;
        let poisoned = BatchTerms {
            policy: policy(0, Some(DLQ)),
            ..terms(10, Duration::ZERO)
        };
        let fresh = tokio::time::timeout(Duration::from_secs(5), queue.next_batch(&q(), &poisoned))
            .await
            .unwrap()
            .unwrap();
        assert!(fresh.iter().all(|d| d.id != leased[0].id), "given up on");
        assert_counters_agree(&queue, "poison").await;

        let source = RedriveTarget::Source {
            known: vec![q(), Lane::new(Q, "audit")],
        };
        let redriven = queue.redrive(DLQ, &Selection::All, &source).await.unwrap();
        assert!(redriven.redriven > 0);
        assert_counters_agree(&queue, "redrive").await;
        let one = Selection::Ids(vec![ids[5].clone()]);
        assert!(queue.purge(Q, &one).await.unwrap() > 0);
        assert_counters_agree(&queue, "purge").await;
        let cutoff = now_ms() + 1;
        wait_past(cutoff);
        assert!(queue.purge_expired(Q, cutoff).await.unwrap() > 0);
        assert_counters_agree(&queue, "expiry").await;
        assert_eq!(
            queue.purge(Q, &Selection::All).await.unwrap(),
            0,
            "only in flight left"
        );
        drop(queue);
        assert_counters_agree(&open(), "a last restart").await;
    }

    #[tokio::test]
    async fn the_gauges_never_scan_the_backlog() {
        let (_dir, queue) = open();
        for _ in 0..5 {
            publish(&queue, 100).await;
        }
        let plans: Vec<String> = raw(&queue, |conn| {
            let mut plans = Vec::new();
            for sql in [
                "SELECT COUNT(*) FROM messages WHERE queue = ?1 AND visible_ms > ?2",
                "SELECT COUNT(*) FROM messages INDEXED BY messages_leased
                 WHERE queue = ?1 AND leased = 1 AND visible_ms > ?2",
            ] {
                let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let steps = explain.query_map(params![Q, 0], |r| r.get::<_, String>(3))?;
                plans.extend(steps.collect::<rusqlite::Result<Vec<_>>>()?);
            }
            let mut explain = conn.prepare(
                "EXPLAIN QUERY PLAN
                 SELECT visible_ms FROM messages WHERE queue = ?1 ORDER BY visible_ms LIMIT 1",
            )?;
            let steps = explain.query_map(params![Q], |r| r.get::<_, String>(3))?;
            plans.extend(steps.collect::<rusqlite::Result<Vec<_>>>()?);
            Ok(plans)
        })
        .await;
        assert!(
            plans.iter().all(|step| step.starts_with("SEARCH")),
            "{plans:?}"
        );
        assert_eq!(held(queue.counts(Q).await.unwrap()), (500, 0, 0));
    }

    #[tokio::test]
    async fn a_retry_delayed_past_the_retention_comes_before_the_message_expires() {
        let (_dir, queue) = open();
        let retention = Duration::from_secs(600);
        let queue = queue.with_retentions([(Q.to_owned(), retention)].into());
        publish(&queue, 1).await;
        let got = batch(&queue, 1, Duration::ZERO, Duration::from_secs(5)).await;
        let enqueued = got[0].enqueued_ms;
        settle_all(&queue, got, retry(43_200), &policy(3, Some(DLQ))).await;
        let visible: u64 = raw(&queue, |conn| {
            conn.query_row("SELECT visible_ms FROM messages", [], |r| r.get(0))
        })
        .await;
        let expires = enqueued + retention.as_millis() as u64;
        assert_eq!(
            visible,
            expires - crate::queue::core::RETRY_BEFORE_EXPIRY.as_millis() as u64,
            "ready a minute before it expires, not in 12 hours"
        );
        assert_eq!(held(queue.counts(Q).await.unwrap()), (0, 0, 1));
    }
}
