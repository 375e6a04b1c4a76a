//! Configuration: one optional TOML file whose queue/consumer keys mirror wrangler's, with
//! defaults that serve the two queues of the spec when there is no file at all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clawq_protocol::event::DELIVERED_TYPES;
use serde::Deserialize;

use crate::actor_storage::Quota;
use crate::auth::AdminTokenSetting;
use crate::bounds::LogRate;
use crate::queue::lane::Lane;
use crate::queue::routes::{Filter, Routes};
use crate::queue::{BatchTerms, RetryPolicy};
use crate::relay::endpoint::Backpressure;
use crate::relay::sessions::{Retry, SessionLimits};
use crate::runtime::{Limits, MAX_MEMORY_BYTES};
use crate::world::World;

/// The events queue of the spec (section 1).
pub const EVENTS_QUEUE: &str = "clawdentity-events";
/// The receipts queue of the spec (section 1).
pub const RECEIPTS_QUEUE: &str = "clawdentity-receipts";
/// The name of the bundled event router's consumer: a second default consumer of
/// [`EVENTS_QUEUE`] that takes the events delivered to agents (spec section 5).
pub const EVENT_ROUTER: &str = "event-router";
/// The longest delivery or retry delay a message may have: 12 hours.
pub const MAX_DELAY_SECONDS: u32 = 12 * 60 * 60;
/// The longest batch timeout wrangler accepts.
const MAX_BATCH_TIMEOUT_SECONDS: f64 = 60.0;
/// The largest batch wrangler accepts.
const MAX_BATCH_SIZE: usize = 100;
/// The largest CPU budget of a batch (`cpu_timeout`).
pub const MAX_CPU_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest wall-clock deadline of a batch (`wall_timeout`): 15 minutes, as
/// Cloudflare's consumers.
pub const MAX_WALL_TIMEOUT: Duration = Duration::from_secs(900);

/// How long a batch's messages stay leased beyond its wall-clock deadline: room for the
/// wait for an instance and for committing the outcomes. A lease that runs out leaves
/// its messages to be delivered again.
pub const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// The smallest memory cap, in MiB, that holds a full batch of `max_batch_size`
/// messages of the largest size: the messages twice (as the host lowers them and as the
/// guest decodes them) and 2 MiB for the guest itself.
pub fn min_memory_mb(max_batch_size: usize) -> usize {
    (2 * max_batch_size * crate::queue::MAX_BODY_BYTES).div_ceil(1 << 20) + 2
}

/// Everything `clawq serve` needs, after defaults are applied.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// Where the queue database and the trust store live.
    pub data_dir: PathBuf,
    /// The consumers, by name: one per queue unless a queue fans out to several.
    pub consumers: BTreeMap<String, ConsumerConfig>,
    /// Queues that only receive messages (declared producers and dead-letter queues).
    pub plain_queues: Vec<String>,
    /// The retention of each queue whose config sets one (`retention`); the others keep
    /// [`DEFAULT_RETENTION`].
    pub retention: BTreeMap<String, Duration>,
    /// How long a revocation marker lasts.
    pub revocation_ttl: Duration,
    /// Relay sessions and connector connections.
    pub relay: RelayConfig,
    /// The admin token (`admin_token`, or `--admin-token` / `CLAWQ_ADMIN_TOKEN`), with
    /// where it was given; generated when `None` (see [`crate::auth::admin_token`]).
    pub admin_token: Option<AdminTokenSetting>,
    /// Whether `GET /metrics` needs no token (`metrics_public`).
    pub metrics_public: bool,
    /// Whether every route but the connector's needs no token (`insecure_no_auth`, or
    /// `clawq serve --insecure-no-auth`).
    pub insecure_no_auth: bool,
    /// The HTTP server's protection against abusive clients (`[http]`).
    pub http: crate::listener::HttpLimits,
    /// The certificate chain and private key (PEM files) to terminate TLS with
    /// (`tls_cert`, `tls_key`); plain HTTP when `None`.
    pub tls: Option<TlsFiles>,
    /// How hard a commit to the host's database waits for the disk (`durability`).
    pub durability: crate::store::Durability,
    /// The NATS JetStream cluster the queues and the shared state live in (`[backend]
    /// kind = "nats"`, or `--nats URL`); `None`: the embedded SQLite database.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// The PEM files `clawq serve` terminates TLS with.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (`tls_cert`).
    pub cert: PathBuf,
    /// The private key (`tls_key`).
    pub key: PathBuf,
}

/// Relay sessions and connector connections (`[relay]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayConfig {
    /// What the relay sessions keep, how long, and how they retry.
    pub sessions: SessionLimits,
    /// How often the host sends a heartbeat to each connector.
    pub heartbeat_interval: Duration,
    /// Silence from a connector after which its connection is closed.
    pub heartbeat_timeout: Duration,
    /// How far a connector connection may fall behind before it is closed.
    pub backpressure: Backpressure,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            sessions: SessionLimits::default(),
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(60),
            backpressure: Backpressure::default(),
        }
    }
}

/// How one queue is consumed (wrangler's `[[queues.consumers]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerConfig {
    /// The consumer's name, unique on the host: its handler slot in the admin API and
    /// its lane in the queue. The queue's name unless the config gives another, which a
    /// second consumer of a queue must.
    pub name: String,
    /// The queue consumed.
    pub queue: String,
    /// The messages of the queue it takes (all when empty).
    pub filter: Filter,
    /// The handler: the name of a bundled component or a path to a `.wasm` file. `None`
    /// leaves the queue without a consumer: messages wait until one is configured.
    pub handler: Option<String>,
    /// Largest batch handed to the handler.
    pub max_batch_size: usize,
    /// Longest wait for a batch to fill, from the first ready message.
    pub max_batch_timeout: Duration,
    /// Retries before a message goes to the dead-letter queue (or is dropped).
    pub max_retries: u32,
    /// Delay of a retry the handler gave no delay for, in seconds.
    pub retry_delay: u32,
    /// Where messages go after `max_retries` or when dead-lettered.
    pub dead_letter_queue: Option<String>,
    /// Batches of this queue handled at the same time.
    pub max_concurrency: usize,
    /// The world the handler slot accepts: what the handler may import.
    pub world: World,
    /// The handler's sandbox.
    pub limits: Limits,
    /// Failed batches in a row after which a new version is rolled back (0: never).
    pub auto_rollback_after: u32,
    /// How many log lines its handler may write (`log_burst`, `log_rate`).
    pub log_rate: LogRate,
    /// How much its actors may keep (`storage_max_keys`, `storage_limit_mb`).
    pub storage_quota: Quota,
}

impl ConsumerConfig {
    /// The spec's default consumer of `queue`, or generic defaults for another queue.
    pub fn default_for(queue: &str) -> Self {
        let (handler, max_batch_size) = match queue {
            EVENTS_QUEUE => (Some("crl-invalidation".to_owned()), 10),
            RECEIPTS_QUEUE => (Some("receipt-router".to_owned()), 25),
            _ => (None, 10),
        };
        let world = match queue {
            EVENTS_QUEUE => World::CrlInvalidation,
            RECEIPTS_QUEUE => World::ReceiptHandler,
            _ => World::HandlerHost,
        };
        let dead_letter_queue = [EVENTS_QUEUE, RECEIPTS_QUEUE]
            .contains(&queue)
            .then(|| format!("{queue}-dlq"));
        ConsumerConfig {
            name: queue.to_owned(),
            queue: queue.to_owned(),
            filter: Filter::default(),
            handler,
            max_batch_size,
            max_batch_timeout: Duration::from_secs(5),
            max_retries: 3,
            retry_delay: 0,
            dead_letter_queue,
            max_concurrency: 1,
            world,
            limits: Limits::default(),
            auto_rollback_after: 3,
            log_rate: LogRate::default(),
            storage_quota: Quota::default(),
        }
    }

    /// The consumers of a host without a config file: each spec queue's bundled handler
    /// (named like its queue), and the bundled event router next to the CRL handler on
    /// [`EVENTS_QUEUE`], taking only the event types it delivers, with the queue's
    /// batch, retry and dead-letter defaults. A config entry naming one of them overrides
    /// only the keys it gives.
    pub fn defaults() -> [ConsumerConfig; 3] {
        [
            ConsumerConfig::default_for(EVENTS_QUEUE),
            ConsumerConfig::default_for(RECEIPTS_QUEUE),
            ConsumerConfig {
                name: EVENT_ROUTER.to_owned(),
                filter: Filter::field("type", &DELIVERED_TYPES),
                handler: Some(EVENT_ROUTER.to_owned()),
                world: World::EventRouter,
                ..ConsumerConfig::default_for(EVENTS_QUEUE)
            },
        ]
    }

    /// The lane this consumer takes its batches from.
    pub fn lane(&self) -> Lane {
        Lane::new(&self.queue, &self.name)
    }

    /// How this consumer takes batches: its batch settings, a lease of its wall-clock
    /// deadline plus [`LEASE_MARGIN`] (a healthy batch never outlives it), and its
    /// retry policy.
    pub fn batch_terms(&self) -> BatchTerms {
        BatchTerms {
            max_size: self.max_batch_size,
            max_timeout: self.max_batch_timeout,
            batches: 1,
            lease: self.limits.wall_timeout + LEASE_MARGIN,
            policy: RetryPolicy {
                max_retries: self.max_retries,
                dead_letter_queue: self.dead_letter_queue.clone(),
            },
        }
    }

    fn validate(&self) -> Result<()> {
        let q = &self.queue;
        if self.name != *q {
            validate_name("consumer", &self.name)?;
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.max_batch_size) {
            bail!("queue `{q}`: max_batch_size must be between 1 and {MAX_BATCH_SIZE}");
        }
        if self.max_batch_timeout.as_secs_f64() > MAX_BATCH_TIMEOUT_SECONDS {
            bail!("queue `{q}`: max_batch_timeout must be at most {MAX_BATCH_TIMEOUT_SECONDS} s");
        }
        if self.retry_delay > MAX_DELAY_SECONDS {
            bail!("queue `{q}`: retry_delay must be at most {MAX_DELAY_SECONDS} s");
        }
        if self.max_concurrency == 0 {
            bail!("queue `{q}`: max_concurrency must be at least 1");
        }
        if !(1..=MAX_MEMORY_BYTES >> 20).contains(&(self.limits.memory_bytes >> 20)) {
            bail!(
                "queue `{q}`: memory_limit_mb must be between 1 and {}",
                MAX_MEMORY_BYTES >> 20
            );
        }
        if self.limits.max_instances == 0 {
            bail!("queue `{q}`: max_instances must be at least 1");
        }
        if self.max_concurrency > self.limits.max_instances {
            bail!(
                "queue `{q}`: max_concurrency ({}) cannot exceed max_instances ({}): every \
                 batch needs an instance of its own",
                self.max_concurrency,
                self.limits.max_instances
            );
        }
        let needed_mb = min_memory_mb(self.max_batch_size);
        if self.limits.memory_bytes >> 20 < needed_mb {
            bail!(
                "queue `{q}`: memory_limit_mb ({}) is too small for a full batch: \
                 max_batch_size {} of messages up to 128 KiB needs at least {needed_mb}",
                self.limits.memory_bytes >> 20,
                self.max_batch_size
            );
        }
        let (cpu, wall) = (self.limits.cpu_timeout, self.limits.wall_timeout);
        if cpu > MAX_CPU_TIMEOUT {
            bail!(
                "queue `{q}`: cpu_timeout must be at most {} s",
                MAX_CPU_TIMEOUT.as_secs()
            );
        }
        if wall > MAX_WALL_TIMEOUT {
            bail!(
                "queue `{q}`: wall_timeout must be at most {} s",
                MAX_WALL_TIMEOUT.as_secs()
            );
        }
        if wall < cpu {
            bail!(
                "queue `{q}`: wall_timeout ({} s) must be at least cpu_timeout ({} s)",
                wall.as_secs_f64(),
                cpu.as_secs_f64()
            );
        }
        if self.log_rate.burst == 0
            || !(self.log_rate.per_second.is_finite() && self.log_rate.per_second > 0.0)
        {
            bail!("queue `{q}`: log_burst must be at least 1 and log_rate a number of lines > 0");
        }
        if self.storage_quota.keys == 0 || self.storage_quota.bytes == 0 {
            bail!("queue `{q}`: storage_max_keys and storage_limit_mb must be at least 1");
        }
        if self.dead_letter_queue.as_deref() == Some(q) {
            bail!("queue `{q}`: dead_letter_queue cannot be the queue itself");
        }
        Ok(())
    }
}

/// The config file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    admin_token: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    http: FileHttp,
    #[serde(default)]
    metrics_public: bool,
    #[serde(default)]
    insecure_no_auth: bool,
    #[serde(default)]
    durability: crate::store::Durability,
    #[serde(default)]
    queues: FileQueues,
    #[serde(default)]
    trust: FileTrust,
    #[serde(default)]
    relay: FileRelay,
    #[serde(default)]
    backend: FileBackend,
}

/// `[backend]`: where the queues and the host's state live.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    /// `"sqlite"` (the default: one host, its own database file) or `"nats"`.
    kind: Option<String>,
    /// The NATS server(s), for `kind = "nats"`.
    url: Option<String>,
    /// Copies of each stream and bucket, for `kind = "nats"` (1 to 5).
    replicas: Option<usize>,
}

impl FileBackend {
    fn apply(self) -> Result<Option<crate::cluster::ClusterConfig>> {
        match self.kind.as_deref() {
            None | Some("sqlite") => {
                if self.url.is_some() || self.replicas.is_some() {
                    bail!("backend.url and backend.replicas need backend.kind = \"nats\"");
                }
                Ok(None)
            }
            Some("nats") => {
                let replicas = self.replicas.unwrap_or(1);
                if !(1..=5).contains(&replicas) {
                    bail!("backend.replicas must be between 1 and 5 (JetStream's range)");
                }
                Ok(Some(crate::cluster::ClusterConfig {
                    url: self
                        .url
                        .unwrap_or_else(|| crate::cluster::DEFAULT_URL.to_owned()),
                    replicas,
                }))
            }
            Some(other) => bail!("backend.kind must be \"sqlite\" or \"nats\", not {other:?}"),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRelay {
    /// Seconds a session row (receipt or delivery) lives; the key predates deliveries.
    receipt_ttl: Option<u64>,
    /// Most rows of each kind per agent; the key predates deliveries.
    max_receipts_per_agent: Option<usize>,
    /// Seconds before an unacked frame is first pushed again.
    retry_initial: Option<f64>,
    /// Longest delay between pushes of an unacked frame, in seconds.
    retry_max: Option<f64>,
    /// Most pushes of one frame before it is dropped.
    retry_max_attempts: Option<u32>,
    /// Seconds between heartbeats.
    heartbeat_interval: Option<f64>,
    /// Seconds of silence before a connection is closed.
    heartbeat_timeout: Option<f64>,
    /// Seconds one frame may take to send.
    send_timeout: Option<f64>,
}

impl FileRelay {
    fn apply(self) -> Result<RelayConfig> {
        let defaults = RelayConfig::default();
        let seconds = |value: Option<f64>, key: &str, default: Duration| match value {
            None => Ok(default),
            Some(s) if s.is_finite() && s > 0.0 => Ok(Duration::from_secs_f64(s)),
            Some(_) => bail!("relay.{key} must be a number of seconds > 0"),
        };
        let (sessions, retry) = (defaults.sessions, defaults.sessions.retry);
        let relay = RelayConfig {
            sessions: SessionLimits {
                ttl: self
                    .receipt_ttl
                    .map(Duration::from_secs)
                    .unwrap_or(sessions.ttl),
                max_per_agent: self
                    .max_receipts_per_agent
                    .unwrap_or(sessions.max_per_agent),
                retry: Retry {
                    initial: seconds(self.retry_initial, "retry_initial", retry.initial)?,
                    max: seconds(self.retry_max, "retry_max", retry.max)?,
                    max_attempts: self.retry_max_attempts.unwrap_or(retry.max_attempts),
                    jitter: retry.jitter,
                },
            },
            heartbeat_interval: seconds(
                self.heartbeat_interval,
                "heartbeat_interval",
                defaults.heartbeat_interval,
            )?,
            heartbeat_timeout: seconds(
                self.heartbeat_timeout,
                "heartbeat_timeout",
                defaults.heartbeat_timeout,
            )?,
            backpressure: Backpressure {
                send_timeout: seconds(
                    self.send_timeout,
                    "send_timeout",
                    defaults.backpressure.send_timeout,
                )?,
            },
        };
        if relay.heartbeat_timeout <= relay.heartbeat_interval {
            bail!(
                "relay.heartbeat_timeout ({} s) must be longer than relay.heartbeat_interval \
                 ({} s): every connection would be closed between two heartbeats",
                relay.heartbeat_timeout.as_secs_f64(),
                relay.heartbeat_interval.as_secs_f64()
            );
        }
        if relay.sessions.max_per_agent == 0 {
            bail!("relay.max_receipts_per_agent must be at least 1");
        }
        if relay.sessions.retry.max_attempts == 0 {
            bail!("relay.retry_max_attempts must be at least 1");
        }
        Ok(relay)
    }
}

/// `[http]`: the HTTP server's limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    /// Seconds a client has to send its request headers (and finish a TLS handshake).
    header_read_timeout: Option<f64>,
    /// Most connections open at once.
    max_connections: Option<usize>,
    /// Most MiB of request bodies buffered at once, across all requests.
    max_buffered_body_mb: Option<u64>,
}

impl FileHttp {
    fn apply(self) -> Result<crate::listener::HttpLimits> {
        let defaults = crate::listener::HttpLimits::default();
        let header_read_timeout = match self.header_read_timeout {
            None => defaults.header_read_timeout,
            Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s),
            Some(_) => bail!("http.header_read_timeout must be a number of seconds > 0"),
        };
        let max_connections = self.max_connections.unwrap_or(defaults.max_connections);
        if max_connections == 0 {
            bail!("http.max_connections must be at least 1");
        }
        let max_buffered_body_bytes = match self.max_buffered_body_mb {
            None => defaults.max_buffered_body_bytes,
            Some(mb @ 1..=4095) => mb << 20,
            Some(_) => bail!("http.max_buffered_body_mb must be between 1 and 4095"),
        };
        Ok(crate::listener::HttpLimits {
            header_read_timeout,
            max_connections,
            max_buffered_body_bytes,
        })
    }
}

/// `tls_cert` and `tls_key`: both or neither.
fn tls_files(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<TlsFiles>> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (Some(_), None) => bail!("tls_cert is set but tls_key is not: TLS needs both"),
        (None, Some(_)) => bail!("tls_key is set but tls_cert is not: TLS needs both"),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQueues {
    #[serde(default)]
    producers: Vec<FileProducer>,
    #[serde(default)]
    consumers: Vec<FileConsumer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProducer {
    queue: String,
    /// Seconds a message is kept.
    retention: Option<u64>,
    /// Accepted for wrangler compatibility; clawq has no bindings.
    #[serde(default)]
    #[allow(dead_code)]
    binding: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConsumer {
    queue: String,
    name: Option<String>,
    filter: Option<Filter>,
    handler: Option<String>,
    max_batch_size: Option<usize>,
    max_batch_timeout: Option<f64>,
    max_retries: Option<u32>,
    retry_delay: Option<u32>,
    dead_letter_queue: Option<String>,
    max_concurrency: Option<usize>,
    world: Option<String>,
    /// Memory limit of an instance, in MiB.
    memory_limit_mb: Option<usize>,
    /// CPU budget of a batch, in seconds.
    cpu_timeout: Option<f64>,
    /// Wall-clock deadline of a batch, in seconds.
    wall_timeout: Option<f64>,
    max_instances: Option<usize>,
    auto_rollback_after: Option<u32>,
    /// Seconds a message is kept.
    retention: Option<u64>,
    /// Guest log lines written at once before `log_rate` applies.
    log_burst: Option<u32>,
    /// Guest log lines a second.
    log_rate: Option<f64>,
    /// Most keys in the consumer's actor storage.
    storage_max_keys: Option<u64>,
    /// Most MiB in the consumer's actor storage.
    storage_limit_mb: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTrust {
    /// Seconds a revocation marker lasts.
    revocation_ttl: Option<u64>,
}

/// Defaults that apply when neither the command line nor the file says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";
/// The default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = ".clawq";
/// How long a message is kept by default: 4 days (Cloudflare Queues' default).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(4 * 24 * 60 * 60);
/// The shortest and longest retention a queue may have, in seconds (Cloudflare's bounds:
/// 60 s to 14 days).
pub const RETENTION_SECONDS: std::ops::RangeInclusive<u64> = 60..=14 * 24 * 60 * 60;
/// The default lifetime of a revocation marker: 30 days.
pub const DEFAULT_REVOCATION_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);

impl Config {
    /// Reads the config file at `path` (if any) and applies the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let file = match path {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                Self::parse_file(&text)
                    .with_context(|| format!("in config file {}", path.display()))?
            }
        };
        Self::from_file(file)
    }

    /// Parses config text (TOML) and applies the defaults.
    pub fn parse(text: &str) -> Result<Config> {
        Self::from_file(Self::parse_file(text)?)
    }

    fn parse_file(text: &str) -> Result<FileConfig> {
        Ok(toml::from_str(text)?)
    }

    fn from_file(file: FileConfig) -> Result<Config> {
        let mut consumers: BTreeMap<String, ConsumerConfig> = ConsumerConfig::defaults()
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect();
        // The defaults no entry has named yet.
        let mut untouched: Vec<String> = consumers.keys().cloned().collect();
        let mut retention = BTreeMap::new();
        for p in &file.queues.producers {
            set_retention(&mut retention, &p.queue, p.retention)?;
        }
        for c in file.queues.consumers {
            set_retention(&mut retention, &c.queue, c.retention)?;
            let name = c.name.clone().unwrap_or_else(|| c.queue.clone());
            let default = untouched.contains(&name);
            untouched.retain(|n| *n != name);
            let base = match consumers.remove(&name) {
                Some(base) if base.queue == c.queue => base,
                Some(base) if default => bail!(
                    "consumer `{name}` of queue `{}`: `{name}` is the name of a bundled \
                     consumer of queue `{}`; give this one another name",
                    c.queue,
                    base.queue
                ),
                Some(_) => bail!("consumer `{name}` is configured for two queues"),
                // Another consumer of a queue gets its settings, but no handler.
                None if name != c.queue => ConsumerConfig {
                    handler: None,
                    ..ConsumerConfig::default_for(&c.queue)
                },
                None => ConsumerConfig::default_for(&c.queue),
            };
            let timeout = match c.max_batch_timeout {
                Some(s) if !(s.is_finite() && s >= 0.0) => {
                    bail!(
                        "queue `{}`: max_batch_timeout must be a number of seconds ≥ 0",
                        c.queue
                    )
                }
                Some(s) => Duration::from_secs_f64(s),
                None => base.max_batch_timeout,
            };
            let world = match &c.world {
                None => base.world,
                Some(name) => World::parse(name).with_context(|| {
                    let names: Vec<&str> = World::ALL.iter().map(|w| w.name()).collect();
                    format!(
                        "queue `{}`: world `{name}` is not one of {}",
                        c.queue,
                        names.join(", ")
                    )
                })?,
            };
            let seconds = |value: Option<f64>, key: &str, default: Duration| match value {
                Some(s) if !(s.is_finite() && s > 0.0) => {
                    bail!("queue `{}`: {key} must be a number of seconds > 0", c.queue)
                }
                Some(s) => Ok(Duration::from_secs_f64(s)),
                None => Ok(default),
            };
            let limits = Limits {
                memory_bytes: c
                    .memory_limit_mb
                    .map_or(base.limits.memory_bytes, |mb| mb << 20),
                cpu_timeout: seconds(c.cpu_timeout, "cpu_timeout", base.limits.cpu_timeout)?,
                wall_timeout: seconds(c.wall_timeout, "wall_timeout", base.limits.wall_timeout)?,
                max_instances: c.max_instances.unwrap_or(base.limits.max_instances),
            };
            let merged = ConsumerConfig {
                name: name.clone(),
                queue: c.queue.clone(),
                filter: c.filter.unwrap_or(base.filter),
                handler: c.handler.or(base.handler),
                max_batch_size: c.max_batch_size.unwrap_or(base.max_batch_size),
                max_batch_timeout: timeout,
                max_retries: c.max_retries.unwrap_or(base.max_retries),
                retry_delay: c.retry_delay.unwrap_or(base.retry_delay),
                dead_letter_queue: c.dead_letter_queue.or(base.dead_letter_queue),
                max_concurrency: c.max_concurrency.unwrap_or(base.max_concurrency),
                world,
                limits,
                auto_rollback_after: c.auto_rollback_after.unwrap_or(base.auto_rollback_after),
                log_rate: LogRate {
                    burst: c.log_burst.unwrap_or(base.log_rate.burst),
                    per_second: c.log_rate.unwrap_or(base.log_rate.per_second),
                },
                storage_quota: Quota {
                    keys: c.storage_max_keys.unwrap_or(base.storage_quota.keys),
                    bytes: c
                        .storage_limit_mb
                        .map_or(base.storage_quota.bytes, |mb| mb.saturating_mul(1 << 20)),
                },
            };
            merged.validate()?;
            consumers.insert(name, merged);
        }
        let mut plain_queues: Vec<String> =
            file.queues.producers.into_iter().map(|p| p.queue).collect();
        plain_queues.extend(
            consumers
                .values()
                .filter_map(|c| c.dead_letter_queue.clone()),
        );
        plain_queues.retain(|q| !consumers.values().any(|c| c.queue == *q));
        plain_queues.sort();
        plain_queues.dedup();
        for queue in consumers.values().map(|c| &c.queue).chain(&plain_queues) {
            validate_name("queue", queue)?;
        }
        for c in consumers.values() {
            let kept = retention
                .get(&c.queue)
                .copied()
                .unwrap_or(DEFAULT_RETENTION);
            if u64::from(c.retry_delay) > kept.as_secs() {
                bail!(
                    "queue `{}`: retention ({} s) is shorter than the retry_delay of consumer \
                     `{}` ({} s): its retried messages would expire before their next delivery",
                    c.queue,
                    kept.as_secs(),
                    c.name,
                    c.retry_delay
                );
            }
        }
        Ok(Config {
            listen: file
                .listen
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default")),
            data_dir: file.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            consumers,
            plain_queues,
            retention,
            revocation_ttl: file
                .trust
                .revocation_ttl
                .map(Duration::from_secs)
                .unwrap_or(DEFAULT_REVOCATION_TTL),
            relay: file.relay.apply()?,
            admin_token: file.admin_token.map(|token| AdminTokenSetting {
                token,
                origin: "the config's `admin_token`".to_owned(),
            }),
            metrics_public: file.metrics_public,
            insecure_no_auth: file.insecure_no_auth,
            durability: file.durability,
            cluster: file.backend.apply()?,
            http: file.http.apply()?,
            tls: tls_files(file.tls_cert, file.tls_key)?,
        })
    }

    /// Every queue the host serves, consumed or not, each once.
    pub fn queue_names(&self) -> impl Iterator<Item = &str> {
        let consumed: std::collections::BTreeSet<&str> =
            self.consumers.values().map(|c| c.queue.as_str()).collect();
        consumed
            .into_iter()
            .chain(self.plain_queues.iter().map(String::as_str))
    }

    /// The consumers of `queue`, in name order.
    pub fn consumers_of<'a>(&'a self, queue: &'a str) -> impl Iterator<Item = &'a ConsumerConfig> {
        self.consumers.values().filter(move |c| c.queue == queue)
    }

    /// The subscriptions of every consumed queue, for the queue engine.
    pub fn routes(&self) -> Routes {
        let mut routes = Routes::default();
        for c in self.consumers.values() {
            routes.add(&c.queue, &c.name, c.filter.clone());
        }
        routes
    }

    /// How long messages of `queue` are kept.
    pub fn retention_of(&self, queue: &str) -> Duration {
        self.retention
            .get(queue)
            .copied()
            .unwrap_or(DEFAULT_RETENTION)
    }

    /// The retention of every queue the host serves, for the retention sweep.
    pub fn retentions(&self) -> BTreeMap<String, Duration> {
        self.queue_names()
            .map(|q| (q.to_owned(), self.retention_of(q)))
            .collect()
    }
}

/// Records the `retention` (seconds) a producer or consumer entry of `queue` sets, after
/// checking it against [`RETENTION_SECONDS`] and any other entry of the same queue.
fn set_retention(
    retention: &mut BTreeMap<String, Duration>,
    queue: &str,
    seconds: Option<u64>,
) -> Result<()> {
    let Some(seconds) = seconds else {
        return Ok(());
    };
    if !RETENTION_SECONDS.contains(&seconds) {
        bail!(
            "queue `{queue}`: retention must be between {} and {} seconds",
            RETENTION_SECONDS.start(),
            RETENTION_SECONDS.end()
        );
    }
    let value = Duration::from_secs(seconds);
    if let Some(earlier) = retention.insert(queue.to_owned(), value)
        && earlier != value
    {
        bail!(
            "queue `{queue}`: retention is set to {} and {seconds} seconds by two entries",
            earlier.as_secs()
        );
    }
    Ok(())
}

/// Queue names follow Cloudflare's rule: lowercase letters, digits and dashes, ≤ 63 chars.
/// Checks the name of a queue or a consumer (`what`).
fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!("invalid {what} name `{name}`: use 1-63 lowercase letters, digits and dashes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_serves_the_spec_queues() {
        let config = Config::load(None).unwrap();
        let events = &config.consumers[EVENTS_QUEUE];
        assert_eq!(events.handler.as_deref(), Some("crl-invalidation"));
        assert!(events.filter.is_empty());
        let router = &config.consumers[EVENT_ROUTER];
        assert_eq!(
            (router.queue.as_str(), router.handler.as_deref()),
            (EVENTS_QUEUE, Some("event-router"))
        );
        assert_eq!(router.world, World::EventRouter);
        assert_eq!(
            router.filter.to_json(),
            serde_json::json!({"type": ["pair.accepted", "group.member.joined"]})
        );
        assert_eq!(
            (
                router.max_batch_size,
                router.max_batch_timeout,
                router.max_retries
            ),
            (10, Duration::from_secs(5), 3)
        );
        assert_eq!(
            router.dead_letter_queue.as_deref(),
            Some("clawdentity-events-dlq")
        );
        assert_eq!(config.consumers.len(), 3);
        assert_eq!(events.max_batch_size, 10);
        assert_eq!(events.max_batch_timeout, Duration::from_secs(5));
        assert_eq!(
            events.dead_letter_queue.as_deref(),
            Some("clawdentity-events-dlq")
        );
        assert_eq!(config.consumers[RECEIPTS_QUEUE].max_batch_size, 25);
        assert_eq!(
            config.plain_queues,
            ["clawdentity-events-dlq", "clawdentity-receipts-dlq"]
        );
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn consumer_keys_override_the_defaults_of_their_queue() {
        let config = Config::parse(
            r#"
            [[queues.consumers]]
            queue = "clawdentity-events"
            max_batch_timeout = 0.25
            max_retries = 1

            [[queues.consumers]]
            queue = "jobs"
            handler = "./jobs.wasm"
            dead_letter_queue = "jobs-dlq"
            "#,
        )
        .unwrap();
        let events = &config.consumers[EVENTS_QUEUE];
        assert_eq!(events.max_batch_timeout, Duration::from_millis(250));
        assert_eq!(events.max_retries, 1);
        assert_eq!(events.max_batch_size, 10);
        assert_eq!(
            config.consumers["jobs"].handler.as_deref(),
            Some("./jobs.wasm")
        );
        assert!(config.plain_queues.contains(&"jobs-dlq".to_owned()));
    }

    #[test]
    fn the_event_router_is_kept_next_to_a_configured_events_consumer_and_overridden_by_name() {
        let config = Config::parse(
            r#"
            [[queues.consumers]]
            queue = "clawdentity-events"
            max_batch_timeout = 0.25

            [[queues.consumers]]
            queue = "clawdentity-events"
            name = "audit"
            handler = "audit.wasm"
            filter = { type = "pair.accepted" }

            [[queues.consumers]]
            queue = "clawdentity-events"
            name = "event-router"
            max_retries = 7
            "#,
        )
        .unwrap();
        let names: Vec<&str> = config
            .consumers_of(EVENTS_QUEUE)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["audit", EVENTS_QUEUE, EVENT_ROUTER]);
        let router = &config.consumers[EVENT_ROUTER];
        assert_eq!(router.max_retries, 7, "the entry's key applies");
        assert_eq!(
            router.max_batch_timeout,
            Duration::from_secs(5),
            "the events consumer's entry is not the router's"
        );
        assert_eq!(router.handler.as_deref(), Some("event-router"));
        assert_eq!(router.world, World::EventRouter);
        assert!(!router.filter.is_empty(), "its filter stays");
        let pair = br#"{"type":"pair.accepted"}"#;
        let routes = config.routes();
        let lanes: Vec<String> = routes
            .lanes(EVENTS_QUEUE, crate::queue::ContentType::Json, pair)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lanes,
            [
                "clawdentity-events#audit",
                "clawdentity-events",
                "clawdentity-events#event-router"
            ]
        );

        let err = Config::parse("[[queues.consumers]]\nqueue = \"jobs\"\nname = \"event-router\"")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "consumer `event-router` of queue `jobs`: `event-router` is the name of a bundled \
             consumer of queue `clawdentity-events`; give this one another name"
        );
    }

    #[test]
    fn retention_is_four_days_unless_a_producer_or_consumer_entry_says_otherwise() {
        let config = Config::parse(
            r#"
            [[queues.producers]]
            queue = "audit"
            retention = 3600

            [[queues.consumers]]
            queue = "jobs"
            dead_letter_queue = "jobs-dlq"
            retention = 1209600
            "#,
        )
        .unwrap();
        let retentions = config.retentions();
        assert_eq!(retentions["audit"], Duration::from_secs(3600));
        assert_eq!(retentions["jobs"], Duration::from_secs(14 * 24 * 3600));
        assert_eq!(retentions["jobs-dlq"], DEFAULT_RETENTION);
        assert_eq!(retentions[EVENTS_QUEUE], Duration::from_secs(4 * 24 * 3600));
        assert_eq!(
            retentions.len(),
            config.queue_names().count(),
            "every served queue has one"
        );
    }

    #[test]
    fn a_queue_fans_out_to_named_consumers_with_filters() {
        let config = Config::parse(
            r#"
            [[queues.consumers]]
            queue = "clawdentity-receipts"
            name = "dead-letter-digest"
            handler = "digest.wasm"
            world = "receipt-handler"
            filter = { type = "delivery_receipt", status = "dead_lettered" }
            "#,
        )
        .unwrap();
        let digest = &config.consumers["dead-letter-digest"];
        assert_eq!(digest.queue, RECEIPTS_QUEUE);
        assert_eq!(
            digest.lane().to_string(),
            "clawdentity-receipts#dead-letter-digest"
        );
        assert_eq!(
            digest.filter.to_json(),
            serde_json::json!({"type": ["delivery_receipt"], "status": ["dead_lettered"]})
        );
        assert_eq!(digest.max_batch_size, 25, "the queue's defaults apply");
        let router = &config.consumers[RECEIPTS_QUEUE];
        assert_eq!(router.handler.as_deref(), Some("receipt-router"));
        assert!(
            router.filter.is_empty(),
            "the bundled default takes everything"
        );
        assert_eq!(config.consumers_of(RECEIPTS_QUEUE).count(), 2);
        assert_eq!(
            config
                .queue_names()
                .filter(|q| *q == RECEIPTS_QUEUE)
                .count(),
            1
        );
        let receipt = br#"{"type":"delivery_receipt","status":"dead_lettered"}"#;
        let lanes = config.routes();
        let lanes: Vec<String> = lanes
            .lanes(RECEIPTS_QUEUE, crate::queue::ContentType::Json, receipt)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lanes,
            [
                "clawdentity-receipts",
                "clawdentity-receipts#dead-letter-digest"
            ]
        );
    }

    #[test]
    fn relay_keys_set_the_connection_bounds() {
        let config = Config::parse("[relay]\nsend_timeout = 2.5\n").unwrap();
        let expected = Backpressure {
            send_timeout: Duration::from_millis(2500),
        };
        assert_eq!(config.relay.backpressure, expected);
        let defaults = Config::parse("").unwrap().relay.backpressure;
        assert_eq!(defaults.send_timeout, Duration::from_secs(10));
    }

    #[test]
    fn backend_keys_choose_sqlite_or_a_nats_cluster() {
        assert_eq!(Config::parse("").unwrap().cluster, None);
        assert_eq!(
            Config::parse("[backend]\nkind = \"sqlite\"")
                .unwrap()
                .cluster,
            None
        );
        let cluster = Config::parse("[backend]\nkind = \"nats\"").unwrap().cluster;
        assert_eq!(
            cluster,
            Some(crate::cluster::ClusterConfig {
                url: crate::cluster::DEFAULT_URL.to_owned(),
                replicas: 1
            })
        );
        let text = "[backend]\nkind = \"nats\"\nurl = \"nats://a:1,nats://b:2\"\nreplicas = 3";
        let cluster = Config::parse(text).unwrap().cluster.unwrap();
        assert_eq!(
            (cluster.url.as_str(), cluster.replicas),
            ("nats://a:1,nats://b:2", 3)
        );
        for (text, needle) in [
            ("[backend]\nkind = \"kafka\"", "backend.kind"),
            ("[backend]\nurl = \"nats://a:1\"", "backend.kind = \"nats\""),
            (
                "[backend]\nkind = \"nats\"\nreplicas = 0",
                "backend.replicas",
            ),
            (
                "[backend]\nkind = \"nats\"\nreplicas = 7",
                "backend.replicas",
            ),
            ("[backend]\nkind = \"nats\"\nstream = \"x\"", "stream"),
        ] {
            let err = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn relay_keys_set_the_session_limits() {
        let config = Config::parse(
            "[relay]\nreceipt_ttl = 60\nmax_receipts_per_agent = 7\n\
             retry_initial = 0.5\nretry_max = 4\nretry_max_attempts = 3\n",
        )
        .unwrap();
        let sessions = config.relay.sessions;
        assert_eq!(
            (sessions.ttl, sessions.max_per_agent),
            (Duration::from_secs(60), 7)
        );
        let retry = sessions.retry;
        assert_eq!(
            (retry.initial, retry.max, retry.max_attempts, retry.jitter),
            (Duration::from_millis(500), Duration::from_secs(4), 3, 0.2)
        );
        assert_eq!(
            Config::parse("").unwrap().relay.sessions,
            SessionLimits::default()
        );
        for (text, needle) in [
            ("[relay]\nretry_max_attempts = 0", "retry_max_attempts"),
            ("[relay]\nretry_initial = -1", "retry_initial"),
            ("[relay]\nsend_timeout = 0", "send_timeout"),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn a_full_batch_of_the_largest_messages_fits_twice_in_the_smallest_memory() {
        assert_eq!(min_memory_mb(1), 3);
        assert_eq!(min_memory_mb(10), 5);
        assert_eq!(min_memory_mb(100), 27);
        let defaults = ConsumerConfig::default_for("jobs").limits;
        assert_eq!(
            (defaults.cpu_timeout, defaults.wall_timeout),
            (Duration::from_secs(10), Duration::from_secs(30))
        );
        let config = Config::parse(
            "[[queues.consumers]]\nqueue = \"jobs\"\ncpu_timeout = 0.5\nwall_timeout = 2.5\n\
             max_batch_size = 100\nmemory_limit_mb = 27",
        )
        .unwrap();
        let limits = config.consumers["jobs"].limits;
        assert_eq!(limits.cpu_timeout, Duration::from_millis(500));
        assert_eq!(limits.wall_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        for (text, needle) in [
            (
                "[[queues.consumers]]\nqueue = \"a\"\nname = \"B#\"",
                "invalid consumer name",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\n[[queues.consumers]]\nqueue = \"b\"\nname = \"a\"",
                "configured for two queues",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nfilter = { type = [] }",
                "lists no value",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nmax_batch_size = 0",
                "max_batch_size",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nmax_batch_timeout = 61",
                "max_batch_timeout",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nretry_delay = 50000",
                "retry_delay",
            ),
            ("[[queues.consumers]]\nqueue = \"A\"", "invalid queue name"),
            (
                "[[queues.consumers]]\nqueue = \"a\"\ndead_letter_queue = \"a\"",
                "itself",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nmax_batch_sise = 3",
                "max_batch_sise",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nretention = 59",
                "retention must be between 60 and 1209600 seconds",
            ),
            (
                "[[queues.producers]]\nqueue = \"a\"\nretention = 600\n\n\
                 [[queues.consumers]]\nqueue = \"a\"\nretention = 700",
                "by two entries",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nwall_timeout = 0",
                "wall_timeout must be a number of seconds > 0",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nwall_timeout = 901\ncpu_timeout = 1",
                "wall_timeout must be at most 900 s",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\ncpu_timeout = 300.5",
                "cpu_timeout must be at most 300 s",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nwall_timeout = 5",
                "wall_timeout (5 s) must be at least cpu_timeout (10 s)",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nmax_concurrency = 17",
                "max_concurrency (17) cannot exceed max_instances (16)",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nmemory_limit_mb = 4",
                "memory_limit_mb (4) is too small for a full batch: max_batch_size 10",
            ),
            (
                "[[queues.consumers]]\nqueue = \"a\"\nretention = 60\nretry_delay = 61",
                "queue `a`: retention (60 s) is shorter than the retry_delay of consumer `a` (61 s)",
            ),
            (
                "[relay]\nheartbeat_interval = 30\nheartbeat_timeout = 30",
                "relay.heartbeat_timeout (30 s) must be longer than relay.heartbeat_interval (30 s)",
            ),
            (
                "[relay]\nheartbeat_timeout = 10",
                "relay.heartbeat_timeout (10 s) must be longer than relay.heartbeat_interval (30 s)",
            ),
        ] {
            let err = format!("{:#}", Config::parse(text).unwrap_err());
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn output_keys_set_the_log_rate_and_the_storage_quota() {
        let config = Config::parse(
            "[[queues.consumers]]\nqueue = \"a\"\nlog_burst = 5\nlog_rate = 0.5\n\
             storage_max_keys = 20\nstorage_limit_mb = 2",
        )
        .unwrap();
        let a = &config.consumers["a"];
        let rate = LogRate {
            burst: 5,
            per_second: 0.5,
        };
        assert_eq!((a.log_rate, a.storage_quota.keys), (rate, 20));
        assert_eq!(a.storage_quota.bytes, 2 << 20);
        let b = &config.consumers[EVENTS_QUEUE];
        assert_eq!((b.log_rate, b.storage_quota), Default::default());
        for (key, value) in [
            ("log_burst", "0"),
            ("log_rate", "0"),
            ("log_rate", "-1"),
            ("storage_max_keys", "0"),
            ("storage_limit_mb", "0"),
        ] {
            let text = format!("[[queues.consumers]]\nqueue = \"a\"\n{key} = {value}");
            let err = format!("{:#}", Config::parse(&text).unwrap_err());
            assert!(err.contains(key), "{key} = {value}: {err}");
        }
    }
}
