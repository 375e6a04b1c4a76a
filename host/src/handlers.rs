//! Handler slots: each consumer's current component version, swapped atomically while
//! the host runs, with a persisted version history for rollback and automatic rollback
//! of a new version that keeps failing.
//!
//! A batch takes the slot's current version when it starts and finishes on it; a swap
//! only changes what the next batch gets. Loading (compile, validate, instantiate once)
//! happens before the swap, off the async workers; a refused component leaves the old
//! version serving.
//!
//! The versions and their history are kept in the host's database and data directory,
//! or, when several hosts share a cluster, in the cluster ([`jetstream`]): there every
//! host follows a deploy or rollback made on any of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::bundled;
use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::config::ConsumerConfig;
use crate::crypto::sha256_hex;
use crate::queue::routes::Filter;
use crate::runtime::{BatchFailure, Capabilities, Limits, LoadError, LoadedHandler, Runtime};
use crate::store::Database;
use crate::world::World;

mod jetstream;

/// Why a deploy or rollback did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// No consumer has that name (or it has no handler).
    #[error("no handler slot named `{0}`")]
    UnknownSlot(String),
    /// The component was refused; the old version still serves.
    #[error(transparent)]
    Refused(#[from] LoadError),
    /// The version asked for is not kept.
    #[error("{0}")]
    NoSuchVersion(String),
    /// Storage failed.
    #[error("handler storage failed: {0:#}")]
    Storage(#[from] anyhow::Error),
}

/// Counters of one slot since start.
#[derive(Debug, Default)]
pub struct SlotCounters {
    batches: AtomicU64,
    failed: AtomicU64,
    traps: AtomicU64,
    errors: AtomicU64,
    limit_hits: AtomicU64,
    capacity_releases: AtomicU64,
    auto_rollbacks: AtomicU64,
}

/// A snapshot of [`SlotCounters`].
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CounterSnapshot {
    /// Batches run.
    pub batches: u64,
    /// Batches that failed (trap, error or limit).
    pub failed: u64,
    /// Batches whose handler trapped.
    pub traps: u64,
    /// Batches whose handler returned an error.
    pub errors: u64,
    /// Batches stopped by a sandbox limit.
    pub limit_hits: u64,
    /// Batches released without running (nor counting an attempt) because the host had
    /// no room for their instance.
    pub capacity_releases: u64,
    /// Automatic rollbacks after a crash loop.
    pub auto_rollbacks: u64,
}

/// How the current version has fared.
#[derive(Debug, Default)]
struct Health {
    /// Failed batches in a row of the current version (0: its latest batch succeeded,
    /// or it has run none).
    consecutive_failures: u32,
    /// The version before the current one, if it was healthy when it was replaced: its
    /// latest batch had not failed (it may have run none, as a version just loaded at
    /// start). A new version is never rolled back to one that was failing.
    healthy_previous: Option<String>,
}

/// One consumer's handler slot.
pub struct Slot {
    queue: String,
    filter: Filter,
    world: World,
    limits: Limits,
    auto_rollback_after: u32,
    current: RwLock<Arc<LoadedHandler>>,
    health: Mutex<Health>,
    counters: SlotCounters,
}

impl Slot {
    /// The version a batch starting now runs on.
    pub fn current(&self) -> Arc<LoadedHandler> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The queue its consumer reads.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The messages of the queue its consumer takes.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// The world this slot accepts.
    pub fn world(&self) -> World {
        self.world
    }

    /// The slot's counters.
    pub fn counters(&self) -> CounterSnapshot {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CounterSnapshot {
            batches: get(&c.batches),
            failed: get(&c.failed),
            traps: get(&c.traps),
            errors: get(&c.errors),
            limit_hits: get(&c.limit_hits),
            capacity_releases: get(&c.capacity_releases),
            auto_rollbacks: get(&c.auto_rollbacks),
        }
    }

    fn swap(&self, handler: Arc<LoadedHandler>) -> Arc<LoadedHandler> {
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            handler,
        );
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let previous_ok = health.consecutive_failures == 0;
        *health = Health {
            healthy_previous: previous_ok.then(|| old.version().to_owned()),
            ..Health::default()
        };
        old
    }

    /// Counts a batch of `handler`; returns the version to roll back to when the current
    /// version just crossed the crash-loop threshold.
    fn record(
        &self,
        handler: &LoadedHandler,
        outcome: Result<(), &BatchFailure>,
    ) -> Option<String> {
        let c = &self.counters;
        if let Err(failure) = outcome {
            let kind = match failure {
                BatchFailure::Trap(_) => &c.traps,
                BatchFailure::Error(_) => &c.errors,
                BatchFailure::Limit(_) => &c.limit_hits,
                // The host's fault: the handler's counters and health are left alone.
                BatchFailure::Capacity(_) => {
                    c.capacity_releases.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            };
            kind.fetch_add(1, Ordering::Relaxed);
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
        c.batches.fetch_add(1, Ordering::Relaxed);
        if handler.version() != self.current().version() {
            return None; // a batch of a version already replaced
        }
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(()) => {
                health.consecutive_failures = 0;
                None
            }
            Err(_) => {
                health.consecutive_failures += 1;
                let crash_loop = self.auto_rollback_after > 0
                    && health.consecutive_failures == self.auto_rollback_after;
                crash_loop
                    .then(|| health.healthy_previous.clone())
                    .flatten()
            }
        }
    }
}

/// One entry of a slot's history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    /// The version (SHA-256 of the component).
    pub version: String,
    /// The name it was deployed under (`null` in histories older than names).
    pub name: Option<String>,
    /// Its size in bytes.
    pub size: u64,
    /// When it became current, ISO-8601.
    pub loaded_at: String,
    /// Who made it current: `config`, `api`, `watch`, `rollback`, `auto-rollback`.
    pub loaded_by: String,
    /// `current`, or how it stopped being current: `superseded` (by a newer deploy),
    /// `rolled_back` or `auto_rolled_back`.
    pub status: &'static str,
}

/// Every handler slot of the host, with their persisted history.
pub struct HandlerSlots {
    slots: BTreeMap<String, Arc<Slot>>,
    runtime: Arc<Runtime>,
    caps: Arc<Capabilities>,
    versions: Versions,
    /// Held while a version is made current (recorded, then swapped in), so that
    /// following the cluster's record never sees a version this host is making current
    /// as another host's.
    switching: tokio::sync::Mutex<()>,
}

/// Where the versions and their history are kept.
enum Versions {
    /// The database's `slots` and `history` tables, the components in `blobs`.
    Local { db: Database, blobs: PathBuf },
    /// The cluster's.
    Cluster(Box<jetstream::ClusterVersions>),
}

impl HandlerSlots {
    /// Opens the history in `data_dir` and fills one slot per consumer that has a
    /// handler: with the version that was current before a restart, or with the config's
    /// handler when the config names a different one than at the last start.
    pub async fn open(
        data_dir: &Path,
        database: &Database,
        runtime: Arc<Runtime>,
        caps: Arc<Capabilities>,
        consumers: impl IntoIterator<Item = &ConsumerConfig>,
    ) -> anyhow::Result<Self> {
        let blobs = data_dir.join("handlers");
        std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        let conn = database.connection(
            "CREATE TABLE IF NOT EXISTS slots (
                 consumer       TEXT PRIMARY KEY,
                 current        TEXT NOT NULL,
                 config_version TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS history (
                 seq       INTEGER PRIMARY KEY,
                 consumer  TEXT NOT NULL,
                 version   TEXT NOT NULL,
                 size      INTEGER NOT NULL,
                 loaded_ms INTEGER NOT NULL,
                 loaded_by TEXT NOT NULL
             );",
        )?;
        // Histories written before versions kept their name get the column, empty.
        let named: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('history') WHERE name = 'name'",
            [],
            |r| r.get(0),
        )?;
        if !named {
            conn.execute("ALTER TABLE history ADD COLUMN name TEXT", [])?;
        }
        let versions = Versions::Local {
            db: database.clone(),
            blobs,
        };
        HandlerSlots::fill(versions, runtime, caps, consumers).await
    }

    /// [`HandlerSlots::open`] for a host sharing `cluster`: the versions and their
    /// history are the cluster's, and the slots follow a deploy or rollback made by any
    /// host.
    pub async fn open_cluster(
        cluster: &Cluster,
        runtime: Arc<Runtime>,
        caps: Arc<Capabilities>,
        consumers: impl IntoIterator<Item = &ConsumerConfig>,
    ) -> anyhow::Result<Arc<Self>> {
        let (versions, changes) = jetstream::ClusterVersions::open(cluster).await?;
        let versions = Versions::Cluster(Box::new(versions));
        let slots = Arc::new(HandlerSlots::fill(versions, runtime, caps, consumers).await?);
        tokio::spawn(slots.clone().follow(changes));
        Ok(slots)
    }

    /// One slot per consumer that has a handler, over `versions`: with the version that
    /// was current before a restart, or with the config's handler when the config names a
    /// different one than at the last start.
    async fn fill(
        versions: Versions,
        runtime: Arc<Runtime>,
        caps: Arc<Capabilities>,
        consumers: impl IntoIterator<Item = &ConsumerConfig>,
    ) -> anyhow::Result<Self> {
        let mut slots = HandlerSlots {
            slots: BTreeMap::new(),
            runtime,
            caps,
            versions,
            switching: tokio::sync::Mutex::new(()),
        };
        for consumer in consumers {
            let Some(reference) = &consumer.handler else {
                continue;
            };
            let config_wasm = read_handler(reference)?;
            let config_version = sha256_hex(&config_wasm);
            let stored = slots.versions.stored(&consumer.name).await?;
            let (wasm, by) = match stored {
                Some((current, seen)) if seen == config_version => {
                    match slots.versions.read(&current).await {
                        Ok(bytes) => (bytes, None),
                        Err(_) => (config_wasm, Some("config")),
                    }
                }
                _ => (config_wasm, Some("config")),
            };
            let name = match by {
                None => slots.kept_name(&consumer.name, &sha256_hex(&wasm)).await?,
                Some(_) => None,
            }
            .unwrap_or_else(|| handler_name(reference));
            let handler = slots
                .load(
                    &consumer.name,
                    &name,
                    wasm.clone(),
                    consumer.world,
                    consumer.limits,
                )
                .await?;
            if let Some(by) = by {
                slots
                    .versions
                    .persist(&consumer.name, &handler, &wasm, by, Some(&config_version))
                    .await?;
            }
            tracing::info!(consumer = %consumer.name, handler = %name, version = %handler.version(), "handler loaded");
            let slot = Slot {
                queue: consumer.queue.clone(),
                filter: consumer.filter.clone(),
                world: consumer.world,
                limits: consumer.limits,
                auto_rollback_after: consumer.auto_rollback_after,
                current: RwLock::new(Arc::new(handler)),
                health: Mutex::new(Health::default()),
                counters: SlotCounters::default(),
            };
            slots.slots.insert(consumer.name.clone(), Arc::new(slot));
        }
        Ok(slots)
    }

    /// The name `version` last had in the history of `consumer`, if it kept one.
    async fn kept_name(&self, consumer: &str, version: &str) -> anyhow::Result<Option<String>> {
        self.versions.kept_name(consumer, version).await
    }

    /// The slot of `consumer`.
    pub fn slot(&self, consumer: &str) -> Result<&Arc<Slot>, SlotError> {
        self.slots
            .get(consumer)
            .ok_or_else(|| SlotError::UnknownSlot(consumer.to_owned()))
    }

    /// Every slot, by consumer.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Arc<Slot>)> {
        self.slots.iter()
    }

    /// Compiles and validates off the async workers, then instantiates once; the handler
    /// gets the actors of `consumer`.
    async fn load(
        &self,
        consumer: &str,
        name: &str,
        wasm: Vec<u8>,
        world: World,
        limits: Limits,
    ) -> Result<LoadedHandler, LoadError> {
        let runtime = self.runtime.clone();
        let name_owned = name.to_owned();
        let handler =
            tokio::task::spawn_blocking(move || runtime.load(&name_owned, &wasm, world, limits))
                .await
                .map_err(|e| LoadError(format!("loading `{name}` failed: {e}")))??
                .owned_by(consumer);
        handler.check_instantiates(self.caps.clone()).await?;
        Ok(handler)
    }

    /// Loads `wasm` into the slot of `consumer` and makes it current, logged and listed
    /// under `name` (letters, digits, `.`, `_`, `-`; at most 64) or, without one, under
    /// `unnamed-<version>`; `by` says who asked.
    pub async fn deploy(
        &self,
        consumer: &str,
        name: Option<&str>,
        wasm: Vec<u8>,
        by: &str,
    ) -> Result<Arc<LoadedHandler>, SlotError> {
        let name = match name {
            Some(name) => valid_name(name)?.to_owned(),
            None => format!("unnamed-{}", &sha256_hex(&wasm)[..12]),
        };
        self.switch(consumer, &name, wasm, by).await
    }

    /// Loads `wasm` as `name` into the slot of `consumer` and makes it current.
    async fn switch(
        &self,
        consumer: &str,
        name: &str,
        wasm: Vec<u8>,
        by: &str,
    ) -> Result<Arc<LoadedHandler>, SlotError> {
        let slot = self.slot(consumer)?;
        let handler = Arc::new(
            self.load(consumer, name, wasm.clone(), slot.world, slot.limits)
                .await?,
        );
        let _switching = self.switching.lock().await;
        self.versions
            .persist(consumer, &handler, &wasm, by, None)
            .await?;
        install(consumer, slot, handler.clone(), by);
        Ok(handler)
    }

    /// Follows the cluster's record of the current versions (each consumer's, as
    /// `changes` brings them): a version another host made current is loaded and swapped
    /// in here too.
    async fn follow(
        self: Arc<Self>,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<jetstream::Change>,
    ) {
        while let Some((consumer, version)) = changes.recv().await {
            let _switching = self.switching.lock().await;
            let Ok(slot) = self.slot(&consumer) else {
                continue; // a consumer this host does not serve
            };
            if slot.current().version() == version {
                continue;
            }
            let loaded = async {
                let wasm = self.versions.read(&version).await?;
                let name = self
                    .kept_name(&consumer, &version)
                    .await?
                    .unwrap_or_else(|| format!("unnamed-{}", &version[..12.min(version.len())]));
                Ok::<_, SlotError>(
                    self.load(&consumer, &name, wasm, slot.world, slot.limits)
                        .await?,
                )
            };
            match loaded.await {
                Ok(handler) => install(&consumer, slot, Arc::new(handler), "cluster"),
                Err(err) => tracing::error!(consumer, version = %version, error = %err,
                    "cannot load the version another host made current; the old one keeps serving"),
            }
        }
    }

    /// Makes `version` (or, when `None`, the version before the current one) current again.
    pub async fn rollback(
        &self,
        consumer: &str,
        version: Option<&str>,
        by: &str,
    ) -> Result<Arc<LoadedHandler>, SlotError> {
        let slot = self.slot(consumer)?;
        let current = slot.current().version().to_owned();
        let target = match version {
            Some(v) => self
                .history(consumer)
                .await?
                .into_iter()
                .find(|e| e.version.starts_with(v) && !v.is_empty())
                .map(|e| e.version),
            None => self
                .history(consumer)
                .await?
                .into_iter()
                .map(|e| e.version)
                .find(|v| *v != current),
        }
        .ok_or_else(|| {
            SlotError::NoSuchVersion(match version {
                Some(v) => format!("version `{v}` is not in the history of `{consumer}`"),
                None => format!("`{consumer}` has no earlier version to roll back to"),
            })
        })?;
        let wasm = self.versions.read(&target).await?;
        let name = self
            .kept_name(consumer, &target)
            .await?
            .unwrap_or_else(|| format!("unnamed-{}", &target[..12]));
        self.switch(consumer, &name, wasm, by).await
    }

    /// The history of `consumer`, newest first.
    pub async fn history(&self, consumer: &str) -> Result<Vec<HistoryEntry>, SlotError> {
        self.slot(consumer)?;
        let mut entries = self.versions.history(consumer).await?;
        // Newest first: each entry ended when the next newer one was loaded.
        for i in 1..entries.len() {
            entries[i].status = match entries[i - 1].loaded_by.as_str() {
                "rollback" => "rolled_back",
                "auto-rollback" => "auto_rolled_back",
                _ => "superseded",
            };
        }
        Ok(entries)
    }

    /// Counts a finished batch of `handler` in `consumer`'s slot and rolls a crash-looping
    /// new version (`auto_rollback_after` failed batches in a row, whether or not it ever
    /// succeeded) back to the healthy one it replaced. The messages of those batches were
    /// retried, each failure costing them one attempt: the restored version gets them
    /// with the attempts they have left.
    pub async fn record(
        &self,
        consumer: &str,
        handler: &LoadedHandler,
        outcome: Result<(), &BatchFailure>,
    ) {
        let Ok(slot) = self.slot(consumer) else {
            return;
        };
        let Some(previous) = slot.record(handler, outcome) else {
            return;
        };
        tracing::error!(consumer, version = %&handler.version()[..12], failures = slot.auto_rollback_after,
            "new handler version keeps failing: rolling back to {}, which gets its messages \
             with the attempts they have left", &previous[..12]);
        match self
            .rollback(consumer, Some(&previous), "auto-rollback")
            .await
        {
            Ok(_) => {
                slot.counters.auto_rollbacks.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => tracing::error!(consumer, error = %err, "automatic rollback failed"),
        }
    }
}

/// Makes `handler` the current version of `consumer`'s `slot`, as `by` asked.
fn install(consumer: &str, slot: &Slot, handler: Arc<LoadedHandler>, by: &str) {
    let old = slot.swap(handler.clone());
    crate::metrics::version_switched(consumer, old.version(), handler.version());
    tracing::info!(consumer, handler = handler.name(), from = %&old.version()[..12],
        to = %&handler.version()[..12], by, "handler swapped");
}

impl Versions {
    /// The current version of `consumer` and the config's version at its last start, if
    /// it has a record.
    async fn stored(&self, consumer: &str) -> anyhow::Result<Option<(String, String)>> {
        let db = match self {
            Versions::Local { db, .. } => db,
            Versions::Cluster(cluster) => return cluster.stored(consumer).await,
        };
        let name = consumer.to_owned();
        db.read(move |conn| {
            conn.query_row(
                "SELECT current, config_version FROM slots WHERE consumer = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(anyhow::Error::from)
        })
        .await
    }

    /// The bytes of the kept `version`.
    async fn read(&self, version: &str) -> anyhow::Result<Vec<u8>> {
        match self {
            Versions::Local { blobs, .. } => std::fs::read(blob(blobs, version))
                .with_context(|| format!("reading kept version {version}")),
            Versions::Cluster(cluster) => cluster.read(version).await,
        }
    }

    /// The name `version` last had in the history of `consumer`, if it kept one.
    async fn kept_name(&self, consumer: &str, version: &str) -> anyhow::Result<Option<String>> {
        let db = match self {
            Versions::Local { db, .. } => db,
            Versions::Cluster(_) => {
                let history = self.history(consumer).await?;
                return Ok(history
                    .into_iter()
                    .filter(|e| e.version == version)
                    .find_map(|e| e.name));
            }
        };
        let key = [consumer.to_owned(), version.to_owned()];
        db.read(move |conn| {
            conn.query_row(
                "SELECT name FROM history
                 WHERE consumer = ?1 AND version = ?2 AND name IS NOT NULL
                 ORDER BY seq DESC LIMIT 1",
                key,
                |r| r.get(0),
            )
            .optional()
            .map_err(anyhow::Error::from)
        })
        .await
    }

    /// Stores the bytes of `handler` and records it as the current version of `consumer`.
    /// The bytes are on disk (synced, with the folder's entry) before the record commits,
    /// so that no crash leaves a record of a version whose file is missing or torn.
    async fn persist(
        &self,
        consumer: &str,
        handler: &LoadedHandler,
        wasm: &[u8],
        by: &str,
        config_version: Option<&str>,
    ) -> anyhow::Result<()> {
        let (db, blobs) = match self {
            Versions::Local { db, blobs } => (db, blobs),
            Versions::Cluster(cluster) => {
                return cluster
                    .persist(consumer, handler, wasm, by, config_version)
                    .await;
            }
        };
        let blob = blob(blobs, handler.version());
        if !blob.exists() {
            write_synced(&blob, wasm)
                .with_context(|| format!("storing the handler file {}", blob.display()))?;
        }
        let record = (
            consumer.to_owned(),
            handler.version().to_owned(),
            config_version.map(str::to_owned),
            handler.size() as i64,
            by.to_owned(),
            handler.name().to_owned(),
        );
        db.write_synced(move |conn| {
            let (consumer, version, config_version, size, by, name) = record;
            conn.execute(
                "INSERT INTO slots (consumer, current, config_version)
                     VALUES (?1, ?2, COALESCE(?3, ''))
                     ON CONFLICT (consumer) DO UPDATE
                     SET current = ?2, config_version = COALESCE(?3, config_version)",
                params![consumer, version, config_version],
            )?;
            conn.execute(
                "INSERT INTO history (consumer, version, size, loaded_ms, loaded_by, name)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![consumer, version, size, now_ms(), by, name],
            )?;
            Ok::<_, anyhow::Error>(())
        })
        .await
    }

    /// The history of `consumer`, newest first, every entry `current`.
    async fn history(&self, consumer: &str) -> anyhow::Result<Vec<HistoryEntry>> {
        let db = match self {
            Versions::Local { db, .. } => db,
            Versions::Cluster(cluster) => return cluster.history(consumer).await,
        };
        let consumer = consumer.to_owned();
        db.read(move |conn| {
            conn.prepare(
                "SELECT version, size, loaded_ms, loaded_by, name FROM history
                 WHERE consumer = ?1 ORDER BY seq DESC",
            )?
            .query_map([consumer], |r| {
                let ms: u64 = r.get(2)?;
                Ok(HistoryEntry {
                    version: r.get(0)?,
                    size: r.get(1)?,
                    loaded_at: crate::clock::iso8601(ms),
                    loaded_by: r.get(3)?,
                    name: r.get(4)?,
                    status: "current",
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(anyhow::Error::from)
        })
        .await
    }
}

/// Where the bytes of `version` are kept in `blobs`.
fn blob(blobs: &Path, version: &str) -> PathBuf {
    blobs.join(format!("{version}.wasm"))
}

/// Writes `bytes` to `path` through a temporary file, synced, then renamed into place,
/// with the folder synced so that the new name is on disk too.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)?;
    if let Some(folder) = path.parent() {
        std::fs::File::open(folder)?.sync_all()?;
    }
    Ok(())
}

/// `name` when it may name a handler: 1 to 64 letters, digits, `.`, `_` or `-`.
fn valid_name(name: &str) -> Result<&str, SlotError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err(SlotError::Refused(LoadError(format!(
            "handler name `{name}` refused: use 1 to 64 letters, digits, `.`, `_` or `-`"
        ))))
    }
}

/// The bytes of a handler named in the config: a bundled one or a `.wasm` file.
pub fn read_handler(reference: &str) -> anyhow::Result<Vec<u8>> {
    match bundled::find(reference) {
        Some(bytes) => Ok(bytes.to_vec()),
        None => std::fs::read(reference).with_context(|| {
            format!(
                "handler `{reference}` is neither a bundled handler ({}) nor a readable .wasm file",
                bundled::NAMES.join(", ")
            )
        }),
    }
}

/// The name a handler is logged under: a bundled handler's name or the file's stem.
pub fn handler_name(reference: &str) -> String {
    match Path::new(reference).file_stem() {
        Some(stem) if bundled::find(reference).is_none() => stem.to_string_lossy().into_owned(),
        _ => reference.to_owned(),
    }
}

/// How often `--watch` looks at the handler files.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(300);

/// `clawq serve --watch`: deploys a handler again whenever its `.wasm` file changes,
/// until `shutdown`. A refused build is logged and the old version keeps serving.
pub async fn watch(
    slots: Arc<HandlerSlots>,
    files: Vec<(String, PathBuf)>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let stamp = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .ok()
    };
    let mut seen: Vec<_> = files.iter().map(|(_, path)| stamp(path)).collect();
    for (consumer, path) in &files {
        tracing::info!(consumer, file = %path.display(), "watching the handler file");
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
        for ((consumer, path), last) in files.iter().zip(seen.iter_mut()) {
            let now = stamp(path);
            if now.is_none() || now == *last {
                continue;
            }
            *last = now;
            let Ok(wasm) = std::fs::read(path) else {
                continue;
            };
            if wasm.is_empty()
                || sha256_hex(&wasm)
                    == slots
                        .slot(consumer)
                        .map(|s| s.current().version().to_owned())
                        .unwrap_or_default()
            {
                continue;
            }
            let name = handler_name(&path.to_string_lossy());
            match slots.deploy(consumer, Some(&name), wasm, "watch").await {
                Ok(handler) => {
                    tracing::info!(consumer, version = %&handler.version()[..12], "reloaded the changed handler")
                }
                Err(err) => {
                    tracing::warn!(consumer, error = %err, "the changed handler was refused; the old version keeps serving")
                }
            }
        }
    }
}
