//! The host's storage layer: every host store (queues, trust, relay sessions, actor
//! storage, agents, tokens, handler history) keeps its tables in one SQLite database,
//! `<data_dir>/clawq.db`, in WAL mode.
//!
//! **One file, so durability is ordered.** SQLite appends every commit to the one WAL in
//! the order the commits happened, and recovery keeps a prefix of that log (each frame's
//! checksum chains to the one before). So after a crash of the process, the OS or the
//! power, a handler's side effect (a revocation, a receipt row) is never lost while the
//! ack committed after it survives, and the message is delivered again instead. With
//! separate files, one file's commits could reach the disk (a checkpoint) while another's
//! were still in the page cache.
//!
//! **How hard a commit waits for the disk** is the operator's choice ([`Durability`]):
//! `process` (the default) survives a crash of the process at no fsync cost per commit;
//! with `full`, a write whose answer goes out of the host (a producer's 2xx, an
//! operator's change: [`Database::write_synced`]) returns once it is on disk. Other writes
//! (a handler's side effects, an ack) need no fsync of their own: they reach the disk
//! with the next synced commit, in order, and until then a power loss takes them
//! together with every later commit, so a message whose side effects are lost is
//! delivered again.
//!
//! **Threads.** Writes never run on the async runtime's threads: [`Database::write`] hands
//! the work to the database's writer thread, which owns the one write connection and
//! commits every job waiting at that moment in one transaction (group commit: one commit,
//! and with `full` one fsync, for many concurrent callers); one job's error undoes only
//! that job (each job after the transaction's first runs in a savepoint of its own; the
//! first one's error rolls back the transaction). A caller's result is handed
//! back once the group has committed. [`Database::read`] runs work on the reader thread,
//! on its own connection, which sees every write whose `write` call has returned. A
//! third thread, the checkpointer, copies the WAL back into the database file when the
//! writer asks (see [`CHECKPOINT_PAGES`]), so that the copy and its fsyncs hold up no
//! write.
//!
//! Older clawq versions kept one database file per store; [`Database::open`] imports them
//! into `clawq.db` once (see [`import_legacy_files`]).

use std::cell::Cell;
use std::ffi::c_int;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::hooks::Wal;
use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::oneshot;

/// The file name of the host's database inside the data directory.
pub const DATABASE_FILE: &str = "clawq.db";

/// The per-store files of older clawq versions, imported into [`DATABASE_FILE`] at open.
const LEGACY_FILES: [&str; 7] = [
    "queues.db",
    "trust.db",
    "sessions.db",
    "actor-storage.db",
    "agents.db",
    "tokens.db",
    "handlers.db",
];

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements a connection keeps (`prepare_cached`): more than every store's
/// statements together, so that the one writer connection never parses one again
/// (rusqlite's default of 16 had the stores evict each other's statements on every turn).
const STATEMENT_CACHE: usize = 256;

/// Most jobs committed in one group: bounds how long the first of them waits.
const MAX_GROUP: usize = 256;

/// Pages the WAL grows by between two times the writer asks the checkpointer thread to
/// copy the log back into the database file (SQLite's own automatic checkpoint, which
/// the writer would run inside a commit, is off: it held up every write queued behind it
/// for the copy and its two fsyncs).
const CHECKPOINT_PAGES: i32 = 1000;

/// Pages in the WAL after which the writer checkpoints itself, between two groups (once
/// the checkpointer's pass under way, if any, has ended). A checkpoint beside a busy
/// writer never catches up with it, and the log starts over from its beginning only
/// once every frame in it has been copied back: this copies what the checkpointer left,
/// so the log's size stays bounded.
const WRITER_CHECKPOINT_PAGES: i32 = 4000;

thread_local! {
    /// The pages in the WAL after the last commit of the writer on this thread (see
    /// [`note_wal_pages`]); 0 once [`checkpoint_if_due`] has read it.
    static WAL_PAGES: Cell<i32> = const { Cell::new(0) };
}

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// A commit survives a crash of the process (`synchronous = NORMAL` in WAL mode); a
    /// crash of the OS or a power loss may take the last commits, never an earlier one
    /// without the later ones.
    #[default]
    Process,
    /// A commit survives power loss too (`synchronous = FULL`: the WAL is synced before a
    /// commit returns).
    Full,
}

impl Durability {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Process => "process",
            Durability::Full => "full",
        }
    }

    fn synchronous(self) -> &'static str {
        match self {
            Durability::Process => "NORMAL",
            Durability::Full => "FULL",
        }
    }
}

/// Errors of the storage layer itself; each store turns them into its own error type.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("{0}")]
    Sqlite(String),
    /// The work panicked; what it wrote was undone.
    #[error("a storage call panicked; its writes were undone")]
    Panicked,
    /// The database's threads are gone (the host is shutting down).
    #[error("the database is closed")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Sqlite(err.to_string())
    }
}

/// A write job: runs on the writer thread inside the group's transaction (or is told why
/// it cannot run) and returns whether it succeeded (else its writes are undone)
/// and what to do once the group's fate is known.
struct WriteJob {
    run: RunWrite,
    /// Whether its commit must be on disk before it returns (under `full`).
    synced: bool,
}

/// The work of a [`WriteJob`].
type RunWrite = Box<dyn FnOnce(Result<&Connection, StoreError>) -> (bool, Finish) + Send>;

/// Hands a job's result back once its group committed (`Ok`) or failed to.
type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A write queued with [`Database::write_later`]: resolves once it is committed (or
/// failed to be).
pub type Pending<E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), E>> + Send>>;

/// A read job: runs on the reader thread.
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The host's database: cheap to clone, every clone reaching the same threads.
#[derive(Clone)]
pub struct Database {
    writer: mpsc::Sender<WriteJob>,
    reader: mpsc::Sender<ReadJob>,
    path: PathBuf,
    durability: Durability,
}

impl Database {
    /// Opens (or creates) `clawq.db` in `data_dir`, imports the files of older versions
    /// found there, and starts the writer and reader threads.
    pub fn open(data_dir: &Path, durability: Durability) -> anyhow::Result<Database> {
        let path = data_dir.join(DATABASE_FILE);
        let mut conn = connect(&path, durability)?;
        import_legacy_files(&mut conn, data_dir)?;
        let reader = connect(&path, durability)?;
        reader.pragma_update(None, "query_only", true)?;
        let checkpointer = Arc::new(Mutex::new(connect(&path, durability)?));
        let writer_checkpoints = checkpointer.clone();
        let (write_jobs, writes) = mpsc::channel();
        let (read_jobs, reads) = mpsc::channel();
        let (checkpoint_wanted, checkpoints) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("clawq-db-writer".into())
            .spawn(move || {
                let checkpoints = Checkpoints {
                    wanted: checkpoint_wanted,
                    conn: writer_checkpoints,
                    asked_at: 0,
                };
                write_loop(conn, durability, writes, checkpoints)
            })?;
        std::thread::Builder::new()
            .name("clawq-db-reader".into())
            .spawn(move || read_loop(reader, reads))?;
        std::thread::Builder::new()
            .name("clawq-db-checkpointer".into())
            .spawn(move || checkpoint_loop(checkpointer, checkpoints))?;
        Ok(Database {
            writer: write_jobs,
            reader: read_jobs,
            path,
            durability,
        })
    }

    /// Runs `work` on the writer thread, inside a transaction it shares with the other
    /// writes waiting at that moment, and returns its result once that transaction has
    /// committed (durable against a crash of the process; against power loss once a
    /// later synced commit is, see the module doc). An error (or a panic) of `work` undoes
    /// what `work` wrote and nothing else; a failed commit fails every write of the group.
    /// `work` must not begin or end transactions itself.
    pub async fn write<T, E>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(false, work).await
    }

    /// [`Database::write`] for a write whose answer leaves the host (a producer's 2xx, an
    /// operator's change): with `durability = "full"` it returns once on disk.
    pub async fn write_synced<T, E>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.submit(true, work).await
    }

    /// [`Database::write`] without waiting for it: `work` is queued at once (after every
    /// write queued before it, so it commits no later than they do, and before every
    /// write queued after it) and the returned future resolves once its group committed.
    pub fn write_later<E>(
        &self,
        work: impl FnOnce(&Connection) -> Result<(), E> + Send + 'static,
    ) -> Pending<E>
    where
        E: From<StoreError> + Send + 'static,
    {
        self.queue_write(false, work)
    }

    /// [`Database::write_later`], synced as [`Database::write_synced`] when `synced`: for a
    /// caller that picks one at run time.
    pub(crate) fn queue_write<E>(
        &self,
        synced: bool,
        work: impl FnOnce(&Connection) -> Result<(), E> + Send + 'static,
    ) -> Pending<E>
    where
        E: From<StoreError> + Send + 'static,
    {
        let queued = self.enqueue(synced, work);
        Box::pin(async move { queued?.await.unwrap_or(Err(E::from(StoreError::Closed))) })
    }

    /// Hands `work` to the writer thread and waits for its group's commit.
    async fn submit<T, E>(
        &self,
        synced: bool,
        work: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let committed = self.enqueue(synced, work)?;
        committed.await.unwrap_or(Err(E::from(StoreError::Closed)))
    }

    /// Hands `work` to the writer thread; the receiver gets its result once its group's
    /// fate is known.
    fn enqueue<T, E>(
        &self,
        synced: bool,
        work: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<oneshot::Receiver<Result<T, E>>, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let run = Box::new(move |conn: Result<&Connection, StoreError>| {
            let result = match conn {
                Err(err) => Err(E::from(err)),
                Ok(conn) => caught(conn, work),
            };
            let ok = result.is_ok();
            let finish: Finish = Box::new(move |committed| {
                let _ = tx.send(match committed {
                    Ok(()) => result,
                    // The job's own error says more than the commit's.
                    Err(_) if result.is_err() => result,
                    Err(err) => Err(E::from(err)),
                });
            });
            (ok, finish)
        });
        self.writer
            .send(WriteJob { run, synced })
            .map_err(|_| E::from(StoreError::Closed))?;
        Ok(rx)
    }

    /// Runs `work` on the reader thread, which sees every write that has returned.
    pub async fn read<T, E>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            let _ = tx.send(caught(conn, work));
        });
        self.reader
            .send(job)
            .map_err(|_| E::from(StoreError::Closed))?;
        rx.await.unwrap_or(Err(E::from(StoreError::Closed)))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A connection of its own to the database with `schema` (idempotent `CREATE ... IF
    /// NOT EXISTS` statements) run on it first: what a store uses at open, to create and
    /// migrate its tables before it serves.
    pub fn connection(&self, schema: &str) -> rusqlite::Result<Connection> {
        let conn = connect(&self.path, self.durability)?;
        conn.execute_batch(schema)?;
        Ok(conn)
    }
}

/// Runs `work` on `conn`, a panic turned into [`StoreError::Panicked`].
fn caught<T, E: From<StoreError>>(
    conn: &Connection,
    work: impl FnOnce(&Connection) -> Result<T, E>,
) -> Result<T, E> {
    std::panic::catch_unwind(AssertUnwindSafe(|| work(conn)))
        .unwrap_or_else(|_| Err(E::from(StoreError::Panicked)))
}

/// Opens a connection to the database at `path`: WAL, the durability's `synchronous`,
/// temporary files in memory, a busy timeout, stable query plans, a statement cache
/// that holds every statement of the stores.
fn connect(path: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    static UNCOUNTED: std::sync::Once = std::sync::Once::new();
    UNCOUNTED.call_once(count_no_memory);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", durability.synchronous())?;
    // Savepoints (one per write job) and statement journals in memory: in a file they
    // cost a `pwrite` per page a job touches, more than the commits themselves.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Plans that never depend on the values bound: otherwise a statement whose plan
    // SQLite could fit to a parameter's value (the lease's `LIMIT ?3`, say) is marked
    // stale each time its parameters are bound, and parsed and planned again on every
    // call.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Turns SQLite's memory statistics off, before SQLite first starts in this process (its
/// configuration is fixed from then on; if something started it earlier, they stay on).
/// They are never read, and with them on every allocation and free of SQLite takes a
/// global mutex.
fn count_no_memory() {
    // SAFETY: `sqlite3_config` only sets a global of SQLite's; it refuses
    // (`SQLITE_MISUSE`) once SQLite has started, changing nothing then.
    let status =
        unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0) };
    if status != rusqlite::ffi::SQLITE_OK {
        tracing::debug!(
            status,
            "SQLite had started already: its memory statistics stay on"
        );
    }
}

/// Runs the one statement `sql`, prepared once per connection: what the writer runs
/// around every job (a transaction's and a savepoint's statements) costs no parsing.
pub(crate) fn execute_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// The writer thread: takes every job waiting, runs them in one transaction, commits
/// (synced under `full` when a job asks for it), then hands each its result and sees
/// whether the log wants a checkpoint ([`checkpoint_if_due`]); until every [`Database`]
/// is dropped.
fn write_loop(
    conn: Connection,
    durability: Durability,
    jobs: mpsc::Receiver<WriteJob>,
    mut checkpoints: Checkpoints,
) {
    // Replaces SQLite's automatic checkpoint.
    conn.wal_hook(Some(note_wal_pages));
    let mut syncing = durability == Durability::Full;
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let sync = durability == Durability::Full && group.iter().any(|job| job.synced);
        if sync != syncing {
            let level = if sync { "FULL" } else { "NORMAL" };
            match conn.pragma_update(None, "synchronous", level) {
                Ok(()) => syncing = sync,
                Err(err) => tracing::error!(error = %err, level, "could not set synchronous"),
            }
        }
        commit_group(&conn, group);
        checkpoint_if_due(&mut checkpoints);
    }
}

/// The WAL hook of the writer's connection: keeps the log's size for
/// [`checkpoint_if_due`].
fn note_wal_pages(_: &Wal, pages: c_int) -> rusqlite::Result<()> {
    WAL_PAGES.set(pages);
    Ok(())
}

/// The writer's side of the checkpoints: how it asks the checkpointer thread for one, and
/// the connection they run on, which the writer takes itself past
/// [`WRITER_CHECKPOINT_PAGES`].
struct Checkpoints {
    wanted: mpsc::SyncSender<()>,
    conn: Arc<Mutex<Connection>>,
    /// The log's size in pages when the writer last asked for (or ran) a checkpoint; 0
    /// once the log has started over.
    asked_at: i32,
}

/// After a commit of the writer: asks the checkpointer thread for a checkpoint each time
/// the log has grown by [`CHECKPOINT_PAGES`] since the last ask (unless one is asked for
/// already); past [`WRITER_CHECKPOINT_PAGES`], waits for the checkpointer's pass under
/// way to end and runs one itself, which then copies every frame left (unless a read
/// still needs some), so that the next commit starts the log over.
///
/// Asking after every commit past [`CHECKPOINT_PAGES`] instead had the checkpointer run
/// back to back, each pass copying a commit or two and syncing both files: about 900
/// fsyncs a second at 50,000 msg/s.
fn checkpoint_if_due(checkpoints: &mut Checkpoints) {
    let pages = WAL_PAGES.replace(0);
    if pages == 0 {
        return; // nothing was committed
    }
    if pages < checkpoints.asked_at {
        checkpoints.asked_at = 0;
    }
    if pages >= WRITER_CHECKPOINT_PAGES {
        checkpoint(&checkpoints.conn);
        checkpoints.asked_at = pages;
    } else if pages >= checkpoints.asked_at + CHECKPOINT_PAGES {
        let _ = checkpoints.wanted.try_send(());
        checkpoints.asked_at = pages;
    }
}

/// The checkpointer thread: copies the log back into the database file each time the
/// writer asks, until the writer is gone.
fn checkpoint_loop(conn: Arc<Mutex<Connection>>, wanted: mpsc::Receiver<()>) {
    while wanted.recv().is_ok() {
        checkpoint(&conn);
    }
}

/// Copies as much of the log back into the database file as no reader still needs,
/// without waiting for a reader, on the one connection every checkpoint of this
/// database runs on (so no checkpoint of the writer finds another under way).
fn checkpoint(conn: &Mutex<Connection>) {
    let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(err) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::warn!(error = %err, "a checkpoint of the database's log failed");
    }
}

/// Runs `group` in one transaction and finishes every job with the outcome of the commit
/// that covers it. Each job but the transaction's first runs in a savepoint, so that its
/// error undoes only its own writes; the first needs none (its error rolls the whole
/// transaction back, which holds nothing else yet, and the next job begins a new one).
/// A savepoint copies every page a job touches before the job changes it: most groups
/// hold one or two jobs, and this copy was a tenth of the writer's time.
fn commit_group(conn: &Connection, group: Vec<WriteJob>) {
    let mut pending: Vec<Finish> = Vec::with_capacity(group.len());
    let mut open = false;
    for job in group {
        let first = !open;
        if first {
            if let Err(err) = execute_cached(conn, "BEGIN IMMEDIATE") {
                let err = StoreError::from(err);
                let (_, finish) = (job.run)(Err(err.clone()));
                finish(Err(err));
                continue;
            }
            open = true;
        }
        let saved = match first {
            true => Ok(()),
            false => execute_cached(conn, "SAVEPOINT job"),
        };
        let (ok, finish) = (job.run)(Ok(conn));
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back (a full disk, an I/O error): the
            // jobs before this one are undone too.
            let lost = StoreError::Sqlite("the transaction was rolled back".into());
            for earlier in pending.drain(..) {
                earlier(Err(lost.clone()));
            }
            finish(Err(lost));
            open = false;
            continue;
        }
        let undone = match (ok && saved.is_ok(), first) {
            (true, true) => Ok(()),
            (true, false) => execute_cached(conn, "RELEASE job"),
            (false, false) => conn.execute_batch("ROLLBACK TO job; RELEASE job"),
            (false, true) => {
                open = false;
                execute_cached(conn, "ROLLBACK")
            }
        };
        if let Err(err) = undone {
            tracing::error!(error = %err, "could not end or undo a write");
        }
        pending.push(finish);
    }
    // No transaction left open: the last one was the failed first job's, rolled back,
    // and nothing is left to commit.
    let committed = match open {
        true => execute_cached(conn, "COMMIT").map_err(StoreError::from),
        false => Ok(()),
    };
    if committed.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    for finish in pending {
        finish(committed.clone());
    }
}

/// The reader thread: runs each read job, until every [`Database`] is dropped.
fn read_loop(conn: Connection, jobs: mpsc::Receiver<ReadJob>) {
    while let Ok(job) = jobs.recv() {
        job(&conn);
    }
}

/// A database in `dir` with the default durability, for tests.
#[cfg(test)]
pub(crate) fn test_db(dir: &Path) -> Database {
    Database::open(dir, Durability::Process).expect("opening a test database")
}

/// The values of column `v` of table `t` in `db`, in the order they were inserted, for
/// tests.
#[cfg(test)]
pub(crate) async fn test_rows(db: &Database) -> Vec<i64> {
    db.read(|c| {
        c.prepare("SELECT v FROM t ORDER BY rowid")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()
            .map_err(StoreError::from)
    })
    .await
    .unwrap()
}

/// Imports the per-store database files of older clawq versions found in `data_dir`
/// into `conn`'s database: each file's tables and indexes, rows and all, in one
/// transaction per file, recorded in `imported_files`; then renames the file (and its
/// WAL) with a `.imported` suffix, kept as a backup. The stores bring the imported
/// tables up to date themselves when they open, as they would the old files.
fn import_legacy_files(conn: &mut Connection, data_dir: &Path) -> anyhow::Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS imported_files (
             name        TEXT PRIMARY KEY,
             imported_ms INTEGER NOT NULL
         )",
    )?;
    for name in LEGACY_FILES {
        let legacy = data_dir.join(name);
        if !legacy.exists() {
            continue;
        }
        let done: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM imported_files WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?;
        if !done {
            let tables = import_file(conn, &legacy, name)
                .map_err(|err| anyhow::anyhow!("importing {}: {err}", legacy.display()))?;
            tracing::info!(file = %legacy.display(), tables, "imported a database file of an older clawq into clawq.db");
        }
        for suffix in ["", "-wal", "-shm"] {
            let from = data_dir.join(format!("{name}{suffix}"));
            if from.exists() {
                let to = data_dir.join(format!("{name}.imported{suffix}"));
                std::fs::rename(&from, &to).map_err(|err| {
                    anyhow::anyhow!("renaming {} after its import: {err}", from.display())
                })?;
            }
        }
    }
    Ok(())
}

/// Copies every table and index of the database file `legacy` into `conn`'s, and records
/// the file as imported, in one transaction; returns how many tables it copied.
fn import_file(conn: &mut Connection, legacy: &Path, name: &str) -> rusqlite::Result<usize> {
    conn.execute("ATTACH DATABASE ?1 AS legacy", [legacy.to_string_lossy()])?;
    let copied = (|| {
        let tx = conn.transaction()?;
        let objects: Vec<(String, String, String)> = tx
            .prepare(
                "SELECT type, name, sql FROM legacy.sqlite_master
                 WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%'
                 ORDER BY type = 'index', rowid",
            )?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut tables = 0;
        for (kind, object, sql) in &objects {
            tx.execute_batch(sql)?;
            if kind == "table" {
                tx.execute_batch(&format!(
                    "INSERT INTO main.\"{object}\" SELECT * FROM legacy.\"{object}\""
                ))?;
                tables += 1;
            }
        }
        tx.execute(
            "INSERT INTO imported_files (name, imported_ms) VALUES (?1, ?2)",
            params![name, crate::clock::now_ms() as i64],
        )?;
        tx.commit()?;
        Ok(tables)
    })();
    conn.execute_batch("DETACH DATABASE legacy")?;
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Failure {
        Store(String),
        Mine,
    }

    impl From<StoreError> for Failure {
        fn from(err: StoreError) -> Self {
            Failure::Store(err.to_string())
        }
    }

    fn open() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path(), Durability::Process).unwrap();
        (dir, db)
    }

    /// Runs the `CREATE TABLE` statement `sql` on `db`.
    async fn create(db: &Database, sql: &'static str) {
        db.write(move |c| c.execute_batch(sql).map_err(StoreError::from))
            .await
            .unwrap();
    }

    #[test]
    fn the_checkpointer_is_asked_once_per_checkpoint_pages_of_log_growth() {
        let (wanted, asks) = mpsc::sync_channel(1);
        let conn = Connection::open_in_memory().unwrap();
        let mut checkpoints = Checkpoints {
            wanted,
            conn: Arc::new(Mutex::new(conn)),
            asked_at: 0,
        };
        let step = CHECKPOINT_PAGES;
        // The log's size after each commit (0: a group that committed nothing), and
        // whether the writer asks after it.
        let commits = [
            (step / 2, false),
            (step, true),
            (step + 1, false),
            (0, false),
            (2 * step - 1, false),
            (2 * step, true),
            (2 * step + 3, false),
            (10, false), // the log started over
            (step + 10, true),
        ];
        for (pages, asks_now) in commits {
            WAL_PAGES.set(pages);
            checkpoint_if_due(&mut checkpoints);
            assert_eq!(asks.try_recv().is_ok(), asks_now, "at {pages} pages");
        }
    }

    #[tokio::test]
    async fn a_failed_or_panicking_write_undoes_only_itself() {
        let (_dir, db) = open();
        create(&db, "CREATE TABLE t (v INTEGER)").await;
        let ok = |v: i64| {
            let db = db.clone();
            async move {
                db.write(move |c| {
                    c.execute("INSERT INTO t VALUES (?1)", [v])
                        .map_err(StoreError::from)
                })
                .await
            }
        };
        let failing = db.write(|c| -> Result<(), Failure> {
            c.execute("INSERT INTO t VALUES (100)", []).unwrap();
            Err(Failure::Mine)
        });
        let panicking = db.write(|c| -> Result<(), Failure> {
            c.execute("INSERT INTO t VALUES (200)", []).unwrap();
            panic!("boom")
        });
        let (a, failed, panicked, b) = tokio::join!(ok(1), failing, panicking, ok(2));
        assert_eq!((a.unwrap(), b.unwrap()), (1, 1));
        assert_eq!(failed, Err(Failure::Mine));
        assert!(matches!(panicked, Err(Failure::Store(m)) if m.contains("panicked")));
        assert_eq!(test_rows(&db).await, vec![1, 2]);
    }

    #[tokio::test]
    async fn the_first_write_of_a_group_undoes_only_itself_when_it_fails_or_panics() {
        let (_dir, db) = open();
        create(&db, "CREATE TABLE t (v INTEGER)").await;
        let insert = |v: i64| {
            db.write_later(move |c| {
                c.execute("INSERT INTO t VALUES (?1)", [v])
                    .map(drop)
                    .map_err(|e| Failure::from(StoreError::from(e)))
            })
        };
        let failing = || {
            db.write_later(|c| -> Result<(), Failure> {
                c.execute("INSERT INTO t VALUES (100)", []).unwrap();
                Err(Failure::Mine)
            })
        };
        let panicking = || {
            db.write_later(|c| -> Result<(), Failure> {
                c.execute("INSERT INTO t VALUES (200)", []).unwrap();
                panic!("boom")
            })
        };
        let panicked = |result: Result<(), Failure>| matches!(result, Err(Failure::Store(m)) if m.contains("panicked"));
        // Queued while the writer is idle, each failing write is the first of its group,
        // which runs it without a savepoint: alone in its group, then followed by
        // another write.
        assert_eq!(failing().await, Err(Failure::Mine));
        assert!(panicked(panicking().await));
        let (failed, after) = tokio::join!(failing(), insert(1));
        assert_eq!((failed, after), (Err(Failure::Mine), Ok(())));
        let (failed, after) = tokio::join!(panicking(), insert(2));
        assert!(panicked(failed));
        assert_eq!(after, Ok(()));
        assert_eq!(test_rows(&db).await, vec![1, 2]);
    }

    #[tokio::test]
    async fn concurrent_writes_commit_together_and_each_sees_the_ones_before() {
        let (_dir, db) = open();
        create(&db, "CREATE TABLE t (v INTEGER)").await;
        let writes = (0..500).map(|v| {
            let db = db.clone();
            tokio::spawn(async move {
                db.write(move |c| {
                    let before: i64 = c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))?;
                    c.execute("INSERT INTO t VALUES (?1)", [v])?;
                    Ok::<_, StoreError>(before)
                })
                .await
                .unwrap()
            })
        });
        let mut seen: Vec<i64> = futures_util::future::join_all(writes)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        seen.sort();
        // Each write saw every write run before it: the counts are 0..500, once each.
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        assert_eq!(test_rows(&db).await.len(), 500);
    }

    #[tokio::test]
    async fn the_log_is_copied_back_and_starts_over_while_writes_keep_coming() {
        let (dir, db) = open();
        create(&db, "CREATE TABLE t (v INTEGER, b BLOB)").await;
        // Three times the log's bound, in commits of 8 rows of a page each.
        let commits = 3 * WRITER_CHECKPOINT_PAGES / 8;
        for commit in 0..commits {
            db.write(move |c| {
                for row in 0..8 {
                    c.execute(
                        "INSERT INTO t VALUES (?1, zeroblob(3000))",
                        [commit * 8 + row],
                    )?;
                }
                Ok::<_, StoreError>(())
            })
            .await
            .unwrap();
        }
        let frame = 24 + 4096;
        let wal = std::fs::metadata(dir.path().join("clawq.db-wal"))
            .unwrap()
            .len();
        assert!(
            wal <= 2 * WRITER_CHECKPOINT_PAGES as u64 * frame,
            "the log grew to {wal} bytes, {} frames",
            wal / frame
        );
        let count: i64 = db
            .read(|c| Ok::<_, StoreError>(c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(count, i64::from(commits * 8));
    }

    #[test]
    fn a_cached_statement_is_not_prepared_again_when_its_parameters_change() {
        let dir = tempfile::tempdir().unwrap();
        let conn = connect(&dir.path().join(DATABASE_FILE), Durability::Process).unwrap();
        conn.execute_batch(
            "CREATE TABLE t (k TEXT, v INTEGER); CREATE INDEX t_kv ON t (k, v);
             INSERT INTO t VALUES ('a', 1), ('a', 2), ('a', 3), ('b', 1);",
        )
        .unwrap();
        // The shape of the queue's lease: a range and a `LIMIT` bound as parameters.
        let sql = "SELECT v FROM t WHERE k = ?1 AND v <= ?2 ORDER BY v LIMIT ?3";
        for (limit, expected) in [(2, vec![1, 2]), (10, vec![1, 2, 3]), (1, vec![1])] {
            let found: Vec<i64> = conn
                .prepare_cached(sql)
                .unwrap()
                .query_map(params!["a", 3, limit], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert_eq!(found, expected);
        }
        let statement = conn.prepare_cached(sql).unwrap();
        assert_eq!(
            statement.get_status(rusqlite::StatementStatus::RePrepare),
            0
        );
    }

    #[tokio::test]
    async fn the_files_of_an_older_version_are_imported_once_and_kept_as_backups() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(dir.path().join("trust.db")).unwrap();
            old.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE revoked_agents (did TEXT PRIMARY KEY, revoked_ms INTEGER);
                 CREATE INDEX revoked_at ON revoked_agents (revoked_ms);
                 INSERT INTO revoked_agents VALUES ('did:a', 1), ('did:b', 2);",
            )
            .unwrap();
        }
        let db = Database::open(dir.path(), Durability::Full).unwrap();
        let imported = db
            .read(|c| {
                let n: i64 =
                    c.query_row("SELECT COUNT(*) FROM revoked_agents", [], |r| r.get(0))?;
                let index: i64 = c.query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE name = 'revoked_at'",
                    [],
                    |r| r.get(0),
                )?;
                Ok::<_, StoreError>((n, index))
            })
            .await
            .unwrap();
        assert_eq!(imported, (2, 1));
        assert!(!dir.path().join("trust.db").exists());
        assert!(dir.path().join("trust.db.imported").exists());
        drop(db);
        // Opened again: nothing to import, nothing imported twice.
        let db = Database::open(dir.path(), Durability::Process).unwrap();
        let n = db
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM revoked_agents", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(StoreError::from)
            })
            .await
            .unwrap();
        assert_eq!(n, 2);
    }
}
