//! The component runtime: compiles handler components once, instantiates one per batch
//! through an [`InstancePre`](wasmtime::component::InstancePre) on a pooling allocator,
//! and implements the capability imports of `wit/`.
//!
//! Each batch runs in a fresh store whose WASI context grants nothing: no filesystem,
//! no network, no environment, no clock beyond WASI's defaults. A guest's stderr (where a
//! Rust panic message goes) is captured and reported with its trap.

use std::sync::Arc;

use anyhow::{Context, Result};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::actor_storage::{ActorStorage, StorageError};
use crate::frame::{MAX_FRAME_BYTES, ReceiptStatus};
use crate::relay::hub::ConnectionHub;
use crate::relay::sessions::{Delivery, ReceiptIn, RelaySessions, SessionError};
use crate::trust::{TrustError, TrustStore};

mod bindings {
    wasmtime::component::bindgen!({
        world: "handler-host",
        path: "../wit",
        imports: { default: async },
        exports: { default: async },
    });
}

pub use bindings::clawdentity::queues::types::{ContentType, HostError, Message, Outcome};
use bindings::clawdentity::queues::{actor_storage, log, relay_sessions, trust_store, websocket};
use bindings::{HandlerHost, HandlerHostPre};

/// Most bytes of a guest's stderr kept for a trap report.
const STDERR_CAPTURE_BYTES: usize = 16 * 1024;
/// Most handler instances alive at once across the host.
const MAX_INSTANCES: u32 = 256;
/// Largest linear memory of a handler instance.
const MAX_MEMORY_BYTES: usize = 64 << 20;

/// The host services a handler's imports reach.
pub struct Capabilities {
    /// Backs the `trust-store` import.
    pub trust: Arc<TrustStore>,
    /// Backs the `relay-sessions` import.
    pub sessions: Arc<RelaySessions>,
    /// Backs the `websocket` import; revocations close connections through it too.
    pub hub: Arc<ConnectionHub>,
    /// Backs the `actor-storage` import.
    pub storage: Arc<ActorStorage>,
}

/// The shared compiler and linker of every handler.
pub struct Runtime {
    engine: Engine,
    linker: Linker<BatchState>,
}

/// A compiled handler component, ready to be instantiated for each batch.
pub struct LoadedHandler {
    name: Arc<str>,
    pre: HandlerHostPre<BatchState>,
}

/// Why a whole batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchFailure {
    /// The guest trapped (a panic, an unreachable, a limit).
    #[error("handler trapped: {0}")]
    Trap(String),
    /// The guest's `handle` returned an error.
    #[error("handler returned an error: {0}")]
    Error(String),
}

/// The per-batch state of a store.
pub struct BatchState {
    wasi: WasiCtx,
    table: ResourceTable,
    caps: Arc<Capabilities>,
    handler: Arc<str>,
}

impl Runtime {
    /// Builds the engine (async, pooling allocator) and the linker of every capability.
    pub fn new() -> Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(MAX_INSTANCES)
            .total_core_instances(MAX_INSTANCES * 4)
            .total_memories(MAX_INSTANCES)
            .total_tables(MAX_INSTANCES * 2)
            .max_memory_size(MAX_MEMORY_BYTES);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        HandlerHost::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        Ok(Runtime { engine, linker })
    }

    /// Compiles `wasm` and checks that it is a handler this host can run.
    pub fn load(&self, name: &str, wasm: &[u8]) -> Result<LoadedHandler> {
        let component = Component::new(&self.engine, wasm)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("compiling handler `{name}`"))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("linking handler `{name}`"))?;
        let pre = HandlerHostPre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("handler `{name}` does not export `handler`"))?;
        Ok(LoadedHandler {
            name: name.into(),
            pre,
        })
    }
}

impl LoadedHandler {
    /// The name the handler was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs one batch in a fresh instance and returns the guest's outcomes.
    pub async fn handle(
        &self,
        caps: Arc<Capabilities>,
        queue: &str,
        messages: &[Message],
    ) -> Result<Vec<Outcome>, BatchFailure> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE_BYTES);
        let state = BatchState {
            wasi: WasiCtxBuilder::new().stderr(stderr.clone()).build(),
            table: ResourceTable::new(),
            caps,
            handler: self.name.clone(),
        };
        let mut store = Store::new(self.pre.engine(), state);
        let trap = |err: wasmtime::Error| {
            let err = anyhow::Error::from(err);
            let output = String::from_utf8_lossy(&stderr.contents())
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            let cause = err.root_cause();
            BatchFailure::Trap(if output.is_empty() {
                cause.to_string()
            } else {
                format!("{cause}; stderr: {output}")
            })
        };
        let instance = self.pre.instantiate_async(&mut store).await.map_err(trap)?;
        instance
            .clawdentity_queues_handler()
            .call_handle(&mut store, queue, messages)
            .await
            .map_err(trap)?
            .map_err(BatchFailure::Error)
    }
}

impl WasiView for BatchState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::clawdentity::queues::types::Host for BatchState {}

impl log::Host for BatchState {
    async fn write(&mut self, level: log::Level, message: String) {
        let handler = &*self.handler;
        match level {
            log::Level::Trace => tracing::trace!(target: "clawq::guest", handler, "{message}"),
            log::Level::Debug => tracing::debug!(target: "clawq::guest", handler, "{message}"),
            log::Level::Info => tracing::info!(target: "clawq::guest", handler, "{message}"),
            log::Level::Warn => tracing::warn!(target: "clawq::guest", handler, "{message}"),
            log::Level::Error => tracing::error!(target: "clawq::guest", handler, "{message}"),
        }
    }
}

impl trust_store::Host for BatchState {
    async fn revoke_agent(&mut self, did: String) -> Result<(), HostError> {
        let trust = self.caps.trust.clone();
        let revoked = did.clone();
        off_worker(move || trust.revoke(&revoked)).await?;
        if self.caps.hub.close(&did, 1008, "agent_revoked") {
            tracing::info!(agent = %did, "revoked agent's connection closed");
        }
        Ok(())
    }

    async fn is_revoked(&mut self, did: String) -> Result<bool, HostError> {
        let trust = self.caps.trust.clone();
        off_worker(move || trust.is_revoked(&did)).await
    }
}

impl relay_sessions::Host for BatchState {
    async fn deliver_receipt(
        &mut self,
        receipt: relay_sessions::Receipt,
    ) -> Result<relay_sessions::Delivery, HostError> {
        let receipt = ReceiptIn {
            request_id: receipt.request_id.trim().to_owned(),
            sender_agent_did: receipt.sender_agent_did,
            recipient_agent_did: receipt.recipient_agent_did,
            status: match receipt.status {
                relay_sessions::ReceiptStatus::DeliveredToWebhook => {
                    ReceiptStatus::DeliveredToWebhook
                }
                relay_sessions::ReceiptStatus::DeadLettered => ReceiptStatus::DeadLettered,
            },
            reason: receipt.reason,
        };
        match self.caps.sessions.deliver(receipt).await {
            Ok(Delivery::Pushed(n)) => Ok(relay_sessions::Delivery::Pushed(n)),
            Ok(Delivery::Stored) => Ok(relay_sessions::Delivery::Stored),
            Ok(Delivery::Unchanged) => Ok(relay_sessions::Delivery::Unchanged),
            Ok(Delivery::Ignored) => Ok(relay_sessions::Delivery::Ignored),
            Err(err) => Err(HostError {
                transient: matches!(err, SessionError::Unavailable(_)),
                message: err.to_string(),
            }),
        }
    }
}

impl websocket::Host for BatchState {
    async fn send_frame(&mut self, agent_did: String, frame: String) -> Result<u32, HostError> {
        let refuse = |message: String| HostError {
            transient: false,
            message,
        };
        clawq_protocol::did::validate_agent_did(&agent_did)
            .map_err(|e| refuse(format!("`{agent_did}`: {e}")))?;
        if frame.len() > MAX_FRAME_BYTES {
            return Err(refuse(format!(
                "frame of {} bytes exceeds the 1 MiB limit",
                frame.len()
            )));
        }
        if !matches!(
            serde_json::from_str(&frame),
            Ok(serde_json::Value::Object(_))
        ) {
            return Err(refuse("frame is not a JSON object".into()));
        }
        Ok(self.caps.hub.send(&agent_did, frame))
    }
}

impl actor_storage::Host for BatchState {
    async fn get(&mut self, actor: String, key: String) -> Result<Option<Vec<u8>>, HostError> {
        let (storage, handler) = (self.caps.storage.clone(), self.handler.clone());
        off_worker(move || storage.get(&handler, &actor, &key)).await
    }

    async fn put(&mut self, actor: String, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let (storage, handler) = (self.caps.storage.clone(), self.handler.clone());
        off_worker(move || storage.put(&handler, &actor, &key, &value)).await
    }

    async fn delete(&mut self, actor: String, key: String) -> Result<(), HostError> {
        let (storage, handler) = (self.caps.storage.clone(), self.handler.clone());
        off_worker(move || storage.delete(&handler, &actor, &key)).await
    }

    async fn list_prefix(
        &mut self,
        actor: String,
        prefix: String,
    ) -> Result<Vec<(String, Vec<u8>)>, HostError> {
        let (storage, handler) = (self.caps.storage.clone(), self.handler.clone());
        off_worker(move || storage.list_prefix(&handler, &actor, &prefix)).await
    }
}

/// An error of a blocking capability call, as the guest sees it.
trait GuestError: std::fmt::Display {
    /// Whether a later attempt may succeed.
    fn is_transient(&self) -> bool;
}

impl GuestError for TrustError {
    fn is_transient(&self) -> bool {
        TrustError::is_transient(self)
    }
}

impl GuestError for StorageError {
    fn is_transient(&self) -> bool {
        matches!(self, StorageError::Unavailable(_))
    }
}

/// Runs a blocking capability call off the async workers and maps its error for the guest.
async fn off_worker<T: Send + 'static, E: GuestError + Send + 'static>(
    call: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, HostError> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result.map_err(|err| HostError {
            transient: err.is_transient(),
            message: err.to_string(),
        }),
        Err(join) => Err(HostError {
            transient: true,
            message: format!("capability task failed: {join}"),
        }),
    }
}
