//! `clawq serve`: opens the stores, loads the handlers, starts one consumer per queue and
//! the HTTP API, and shuts all of it down cleanly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::actor_storage::ActorStorage;
use crate::admin::{self, AdminState};
use crate::agents::AgentRegistry;
use crate::api::{self, AppState, ConsumerInfo, QueueInfo};
use crate::auth::{self, AuthState};
use crate::bundled;
use crate::cluster::Cluster;
use crate::config::{Config, ConsumerConfig};
use crate::consumer::Consumer;
use crate::dir_lock::DirLock;
use crate::handlers::{self, HandlerSlots};
use crate::metrics::{self, MetricsState};
use crate::queue::QueueBackend;
use crate::queue::jetstream::JetStreamQueue;
use crate::queue::lane::Lane;
use crate::queue::sqlite::SqliteQueue;
use crate::relay::cluster_sessions::ClusterSessions;
use crate::relay::endpoint::{self, Heartbeat, RelayState};
use crate::relay::hub::ConnectionHub;
use crate::relay::sessions::{RelaySessions, SessionLimits};
use crate::relay::store::SessionStore;
use crate::runtime::{Capabilities, Runtime};
use crate::store::Database;
use crate::tokens::TokenStore;
use crate::trust::TrustStore;

/// The file in the data directory that a running host holds locked.
pub const LOCK_FILE: &str = "serve.lock";
/// How long in-flight batches get to finish after a shutdown is asked for.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// How long a stopping host waits for its connector connections to send their close
/// frames.
const CLOSE_DEADLINE: Duration = Duration::from_secs(2);

/// Logs a warning for every lane holding copies of messages for a consumer the config no
/// longer has (removed, or renamed): nothing takes them, and they stay until they expire.
async fn warn_of_unconsumed_lanes(config: &Config, backend: &dyn QueueBackend) -> Result<()> {
    for queue in config.queue_names() {
        let configured: Vec<Lane> = config.consumers_of(queue).map(|c| c.lane()).collect();
        for (lane, counts) in backend.lanes(queue).await? {
            // A queue no consumer reads (a dead-letter queue) keeps its messages in its
            // own lane.
            if configured.contains(&lane) || (lane.is_default() && configured.is_empty()) {
                continue;
            }
            let consumer = lane.consumer.as_str();
            tracing::warn!(
                queue,
                consumer,
                messages = counts.held(),
                retention = ?config.retention_of(queue),
                "messages wait for a consumer the config no longer has: configure it again to \
                 handle them, drop them with `clawq dlq purge {queue} --consumer {consumer}`, \
                 or they expire with the queue's retention"
            );
        }
    }
    Ok(())
}

/// Every capability a handler may import, backed by the stores in `db`: revocation
/// markers lasting `revocation_ttl`, relay sessions kept within `limits`, actor storage,
/// and a connection hub of its own.
pub fn open_capabilities(
    db: &Database,
    revocation_ttl: Duration,
    limits: SessionLimits,
) -> Result<Arc<Capabilities>> {
    let hub = Arc::new(ConnectionHub::default());
    let trust = TrustStore::open(db, revocation_ttl).context("opening the trust store")?;
    let storage = ActorStorage::open(db).context("opening the actor storage")?;
    let sessions = SessionStore::Sqlite(Arc::new(
        RelaySessions::open(db, hub.clone(), limits).context("opening the relay sessions")?,
    ));
    Ok(capabilities(hub, trust, storage, sessions))
}

/// [`open_capabilities`] for a host sharing `cluster`: the trust store, the actor storage
/// and the relay sessions are the cluster's.
pub async fn open_cluster_capabilities(
    cluster: &Cluster,
    revocation_ttl: Duration,
    limits: SessionLimits,
) -> Result<Arc<Capabilities>> {
    let hub = Arc::new(ConnectionHub::default());
    let trust = TrustStore::open_cluster(cluster, revocation_ttl, hub.clone())
        .await
        .context("opening the cluster's trust store")?;
    let storage = ActorStorage::open_cluster(cluster)
        .await
        .context("opening the cluster's actor storage")?;
    let sessions = SessionStore::Cluster(ClusterSessions::open(cluster, hub.clone(), limits));
    Ok(capabilities(hub, trust, storage, sessions))
}

/// The capabilities over `hub` and these stores, with no log rates set yet.
fn capabilities(
    hub: Arc<ConnectionHub>,
    trust: TrustStore,
    storage: ActorStorage,
    sessions: SessionStore,
) -> Arc<Capabilities> {
    Arc::new(Capabilities {
        trust: Arc::new(trust),
        sessions: Arc::new(sessions),
        hub,
        storage: Arc::new(storage),
        logs: Arc::default(),
    })
}

/// Runs the host until `shutdown` is cancelled.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<()> {
    serve_with(config, false, shutdown).await
}

/// Runs the host until `shutdown` is cancelled; with `watch`, reloads the handlers given
/// as `.wasm` files whenever they change.
pub async fn serve_with(config: Config, watch: bool, shutdown: CancellationToken) -> Result<()> {
    crate::private_dir::prepare(&config.data_dir)?;
    // First of all: a second host on the same data would clear the leases of this one and
    // deliver its messages in flight a second time.
    let _lock = DirLock::take(&config.data_dir, LOCK_FILE, "`clawq serve`")?;
    let admin_token = auth::admin_token(
        &config.data_dir,
        config.admin_token.as_ref(),
        config.listen,
        config.insecure_no_auth,
    )?;
    if config.insecure_no_auth {
        tracing::warn!(
            listen = %config.listen,
            "INSECURE: --insecure-no-auth serves every route but the connector's without a \
             token: anyone who reaches the port can publish, read, purge and redrive every \
             queue, deploy handlers and manage agents and tokens"
        );
    }
    crate::body_budget::return_large_buffers_to_the_os();
    let tls = match &config.tls {
        Some(files) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
            &files.cert,
            &files.key,
        )?)),
        None => None,
    };
    let cluster = match &config.cluster {
        Some(settings) => {
            let cluster = crate::cluster::Cluster::connect(settings).await?;
            tracing::info!(url = %settings.url, replicas = settings.replicas, "connected to NATS JetStream");
            Some(cluster)
        }
        None => None,
    };
    let db = Database::open(&config.data_dir, config.durability)
        .with_context(|| format!("opening the database in {}", config.data_dir.display()))?;
    let backend: Arc<dyn QueueBackend> = match &cluster {
        // Several hosts share the queues: each queue a stream of the cluster.
        Some(cluster) => Arc::new(
            JetStreamQueue::open(cluster, config.retentions())
                .with_routes(config.routes())
                .with_retentions(config.retentions()),
        ),
        None => Arc::new(
            SqliteQueue::open(&db)
                .context("opening the queue database")?
                .with_routes(config.routes())
                .with_retentions(config.retentions()),
        ),
    };
    warn_of_unconsumed_lanes(&config, backend.as_ref()).await?;
    let caps = match &cluster {
        Some(cluster) => {
            let (ttl, limits) = (config.revocation_ttl, config.relay.sessions);
            open_cluster_capabilities(cluster, ttl, limits).await?
        }
        None => open_capabilities(&db, config.revocation_ttl, config.relay.sessions)?,
    };
    for consumer in config.consumers.values() {
        caps.logs.set_rate(&consumer.name, consumer.log_rate);
        caps.storage
            .set_quota(&consumer.name, consumer.storage_quota);
    }
    let (trust, sessions, hub) = (caps.trust.clone(), caps.sessions.clone(), caps.hub.clone());
    let (agents, tokens) = match &cluster {
        Some(cluster) => (
            AgentRegistry::open_cluster(cluster, hub.clone()).await,
            TokenStore::open_cluster(cluster).await,
        ),
        None => (AgentRegistry::open(&db), TokenStore::open(&db)),
    };
    let agents = Arc::new(agents.context("opening the agent registry")?);
    let tokens = Arc::new(tokens.context("opening the token store")?);
    let runtime = Arc::new(Runtime::new()?);

    let slots = match &cluster {
        Some(cluster) => {
            HandlerSlots::open_cluster(cluster, runtime, caps.clone(), config.consumers.values())
                .await?
        }
        None => Arc::new(
            HandlerSlots::open(
                &config.data_dir,
                &db,
                runtime,
                caps.clone(),
                config.consumers.values(),
            )
            .await?,
        ),
    };
    metrics::register(config.queue_names(), &slots);
    let mut consumers = JoinSet::new();
    let consumers_stop = CancellationToken::new();
    for consumer in config.consumers.values() {
        if consumer.handler.is_none() {
            tracing::info!(queue = %consumer.queue, consumer = %consumer.name,
                "consumer has no handler: its messages wait for one");
            continue;
        }
        tracing::info!(queue = %consumer.queue, consumer = %consumer.name, "consumer started");
        let consumer = Consumer::new(
            consumer.clone(),
            slots.clone(),
            backend.clone(),
            caps.clone(),
        );
        consumers.spawn(consumer.run(consumers_stop.clone()));
    }

    if watch {
        let files = config
            .consumers
            .values()
            .filter_map(|c| Some((c.name.clone(), c.handler.clone()?)))
            .filter(|(_, handler)| bundled::find(handler).is_none())
            .map(|(name, handler)| (name, PathBuf::from(handler)))
            .collect();
        tokio::spawn(handlers::watch(slots.clone(), files, shutdown.clone()));
    }

    let queues: BTreeMap<String, QueueInfo> = config
        .queue_names()
        .map(|name| {
            let mut consumers: Vec<&ConsumerConfig> = config.consumers_of(name).collect();
            consumers.sort_by_key(|c| c.name != name);
            let info = QueueInfo {
                dead_letter_queue: consumers.first().and_then(|c| c.dead_letter_queue.clone()),
                retention: config.retention_of(name),
                consumers: consumers
                    .into_iter()
                    .map(|c| ConsumerInfo {
                        name: c.name.clone(),
                        lane: c.lane(),
                        handler: c.handler.clone(),
                        filter: c.filter.to_json(),
                    })
                    .collect(),
            };
            (name.to_owned(), info)
        })
        .collect();
    let metrics = MetricsState {
        backend: backend.clone(),
        queues: Arc::new(queues.keys().cloned().collect()),
        slots: slots.clone(),
        hub: hub.clone(),
        sessions: sessions.clone(),
        storage: caps.storage.clone(),
    };
    tokio::spawn(
        sessions
            .clone()
            .sweep_every(crate::retention::SWEEP_INTERVAL, shutdown.clone()),
    );
    let relay = RelayState {
        agents: agents.clone(),
        trust: trust.clone(),
        sessions,
        hub: hub.clone(),
        heartbeat: Heartbeat {
            interval: config.relay.heartbeat_interval,
            timeout: config.relay.heartbeat_timeout,
        },
        backpressure: config.relay.backpressure,
    };
    tokio::spawn(crate::retention::run(
        backend.clone(),
        config.retentions(),
        crate::retention::SWEEP_INTERVAL,
        shutdown.clone(),
    ));
    let auth = AuthState::new(&admin_token, tokens.clone(), agents.clone(), trust.clone())
        .metrics_public(config.metrics_public)
        .insecure_no_auth(config.insecure_no_auth);
    let admin = AdminState {
        slots: slots.clone(),
        tokens,
        queues: Arc::new(queues.keys().cloned().collect()),
        agents,
        trust: caps.trust.clone(),
        hub: hub.clone(),
    };
    let app = api::router(AppState {
        backend,
        queues: Arc::new(queues),
        trust,
        cluster,
    })
    .merge(endpoint::router(relay))
    .merge(metrics::router(metrics))
    .merge(admin::router(admin));
    let app = auth::protect(app, auth);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    crate::allocator::release_freed_memory();
    tracing::info!(data_dir = %config.data_dir.display(), "clawq listening on {scheme}://{}", listener.local_addr()?);

    let closing = (shutdown.clone(), hub.clone());
    tokio::spawn(async move {
        closing.0.cancelled().await;
        closing.1.close_all(1001, "host_shutting_down");
    });
    crate::listener::serve(listener, tls, config.http, app, shutdown.clone())
        .await
        .context("serving HTTP")?;

    tracing::info!("shutting down: finishing the batches in flight");
    consumers_stop.cancel();
    let drained = tokio::time::timeout(DRAIN_DEADLINE, async {
        while consumers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "batches still running after {DRAIN_DEADLINE:?}; they will be delivered again"
        );
    }
    // A connection opened while the host was stopping is closed too; each sends its
    // close frame before the host exits.
    hub.close_all(1001, "host_shutting_down");
    if tokio::time::timeout(CLOSE_DEADLINE, hub.connections_ended())
        .await
        .is_err()
    {
        tracing::warn!("connector connections still closing after {CLOSE_DEADLINE:?}");
    }
    tracing::info!("stopped");
    Ok(())
}
