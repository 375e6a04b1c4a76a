//! The component runtime: compiles handler components once, instantiates one per batch
//! through an [`InstancePre`](wasmtime::component::InstancePre) on a pooling allocator,
//! and implements the capability imports of `wit/`.
//!
//! Each batch runs in a fresh store whose WASI context grants nothing: no filesystem,
//! no network, no environment, no clock beyond WASI's defaults. A guest's stderr (where a
//! Rust panic message goes) is captured and reported with its trap.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::actor_storage::{ActorStorage, StorageError};
use crate::crypto::sha256_hex;
use crate::frame::{MAX_FRAME_BYTES, ReceiptStatus};
use crate::relay::hub::ConnectionHub;
use crate::relay::sessions::{Delivery, ReceiptIn, RelaySessions, SessionError};
use crate::trust::{TrustError, TrustStore};
use crate::world::World;

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
/// Most handler instances alive at once across the host (the pooling allocator's size).
const POOL_INSTANCES: u32 = 256;
/// The largest memory any handler may be granted.
pub const MAX_MEMORY_BYTES: usize = 1 << 30;
/// How often the epoch advances: the granularity of CPU deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(10);

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

/// The sandbox of one handler: what a batch may use before it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory of an instance, in bytes.
    pub memory_bytes: usize,
    /// Longest a batch may run (CPU deadline, by epoch interruption).
    pub timeout: Duration,
    /// Most instances of the handler alive at once; a batch over it is retried.
    pub max_instances: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            timeout: Duration::from_secs(10),
            max_instances: 16,
        }
    }
}

/// The shared compiler and linker of every handler.
pub struct Runtime {
    engine: Engine,
    linker: Linker<BatchState>,
}

/// A compiled and validated handler component, ready to be instantiated for each batch.
pub struct LoadedHandler {
    name: Arc<str>,
    version: String,
    size: usize,
    limits: Limits,
    instances: Arc<Semaphore>,
    pre: HandlerHostPre<BatchState>,
}

/// Why a component cannot be loaded; the message names the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// Why a whole batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchFailure {
    /// The guest trapped (a panic, an unreachable, a bad memory access).
    #[error("handler trapped: {0}")]
    Trap(String),
    /// The guest's `handle` returned an error.
    #[error("handler returned an error: {0}")]
    Error(String),
    /// The batch exceeded a sandbox limit and was stopped.
    #[error("handler stopped: {0}")]
    Limit(String),
}

/// The per-batch state of a store.
pub struct BatchState {
    wasi: WasiCtx,
    table: ResourceTable,
    caps: Arc<Capabilities>,
    handler: Arc<str>,
    version: Arc<str>,
    memory: MemoryCap,
}

/// Refuses memory growth past the handler's limit, remembering that it did.
struct MemoryCap {
    limit: usize,
    exceeded: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exceeded = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes exceeded",
                self.limit
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

impl Runtime {
    /// Builds the engine (async, pooling allocator, epoch interruption) and the linker of
    /// every capability, and starts the epoch ticker.
    pub fn new() -> Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 4)
            .total_memories(POOL_INSTANCES)
            .total_tables(POOL_INSTANCES * 2)
            .max_memory_size(MAX_MEMORY_BYTES);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("clawq-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        HandlerHost::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        Ok(Runtime { engine, linker })
    }

    /// Checks that `wasm` is a component (not a core module) and compiles it.
    fn compile(&self, wasm: &[u8]) -> Result<Component, String> {
        const MAGIC: &[u8] = b"\0asm";
        match wasm.get(..8) {
            Some([m0, m1, m2, m3, 1, 0, 0, 0]) if [*m0, *m1, *m2, *m3] == *MAGIC => {
                return Err(
                    "it is a core WebAssembly module, not a component (build it for wasm32-wasip2)"
                        .into(),
                );
            }
            Some([m0, m1, m2, m3, _, _, 1, 0]) if [*m0, *m1, *m2, *m3] == *MAGIC => {}
            _ => return Err("it is not a WebAssembly component".into()),
        }
        Component::new(&self.engine, wasm).map_err(|e| {
            format!(
                "it does not compile: {}",
                anyhow::Error::from(e).root_cause()
            )
        })
    }

    /// The names of what the component `wasm` imports and exports.
    pub fn interface(&self, wasm: &[u8]) -> Result<(Vec<String>, Vec<String>), LoadError> {
        let component = self.compile(wasm).map_err(LoadError)?;
        let ty = component.component_type();
        let imports = ty
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        let exports = ty
            .exports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        Ok((imports, exports))
    }

    /// Compiles `wasm` and checks that it is a handler of `world` that instantiates.
    /// Blocking (compilation): call it off the async workers.
    pub fn load(
        &self,
        name: &str,
        wasm: &[u8],
        world: World,
        limits: Limits,
    ) -> Result<LoadedHandler, LoadError> {
        let refuse = |why: String| LoadError(format!("handler `{name}` refused: {why}"));
        let component = self.compile(wasm).map_err(refuse)?;
        let component_type = component.component_type();
        world
            .check_imports(component_type.imports(&self.engine).map(|(name, _)| name))
            .map_err(refuse)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            refuse(format!(
                "it cannot be linked: {}",
                anyhow::Error::from(e).root_cause()
            ))
        })?;
        let pre = HandlerHostPre::new(pre).map_err(|e| {
            refuse(format!(
                "it does not export `clawdentity:queues/handler@0.1.0` as world `{world}` requires: {}",
                anyhow::Error::from(e).root_cause()
            ))
        })?;
        Ok(LoadedHandler {
            name: name.into(),
            version: sha256_hex(wasm),
            size: wasm.len(),
            limits,
            instances: Arc::new(Semaphore::new(limits.max_instances)),
            pre,
        })
    }
}

impl LoadedHandler {
    /// The name the handler was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version: the SHA-256 of the component, in hex.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The component's size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Instantiates the handler once without calling it: proves it can run.
    pub async fn check_instantiates(&self, caps: Arc<Capabilities>) -> Result<(), LoadError> {
        let (mut store, _) = self.store(caps);
        self.pre
            .instantiate_async(&mut store)
            .await
            .map(drop)
            .map_err(|e| {
                LoadError(format!(
                    "handler `{}` refused: it does not instantiate: {}",
                    self.name,
                    anyhow::Error::from(e).root_cause()
                ))
            })
    }

    fn store(&self, caps: Arc<Capabilities>) -> (Store<BatchState>, MemoryOutputPipe) {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE_BYTES);
        let state = BatchState {
            wasi: WasiCtxBuilder::new().stderr(stderr.clone()).build(),
            table: ResourceTable::new(),
            caps,
            handler: self.name.clone(),
            version: self.version[..12].into(),
            memory: MemoryCap {
                limit: self.limits.memory_bytes,
                exceeded: false,
            },
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| &mut state.memory);
        let ticks = self
            .limits
            .timeout
            .as_millis()
            .div_ceil(EPOCH_TICK.as_millis())
            .max(1);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store.epoch_deadline_trap();
        (store, stderr)
    }

    /// Runs one batch in a fresh instance and returns the guest's outcomes.
    pub async fn handle(
        &self,
        caps: Arc<Capabilities>,
        queue: &str,
        messages: &[Message],
    ) -> Result<Vec<Outcome>, BatchFailure> {
        let Ok(_instance_slot) = self.instances.try_acquire() else {
            return Err(BatchFailure::Limit(format!(
                "all {} instances of the handler are busy (max_instances)",
                self.limits.max_instances
            )));
        };
        let (mut store, stderr) = self.store(caps);
        let result = async {
            let instance = self.pre.instantiate_async(&mut store).await?;
            instance
                .clawdentity_queues_handler()
                .call_handle(&mut store, queue, messages)
                .await
        }
        .await;
        match result {
            Ok(outcomes) => outcomes.map_err(BatchFailure::Error),
            Err(err) => {
                let err = anyhow::Error::from(err);
                if store.data().memory.exceeded {
                    return Err(BatchFailure::Limit(format!(
                        "memory limit of {} MiB exceeded",
                        self.limits.memory_bytes >> 20
                    )));
                }
                if matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                    return Err(BatchFailure::Limit(format!(
                        "CPU deadline of {:?} exceeded",
                        self.limits.timeout
                    )));
                }
                let output = String::from_utf8_lossy(&stderr.contents())
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                let cause = err.root_cause();
                Err(BatchFailure::Trap(if output.is_empty() {
                    cause.to_string()
                } else {
                    format!("{cause}; stderr: {output}")
                }))
            }
        }
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
        let (handler, version) = (&*self.handler, &*self.version);
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "clawq::guest", handler, version, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "clawq::guest", handler, version, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "clawq::guest", handler, version, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "clawq::guest", handler, version, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "clawq::guest", handler, version, "{message}")
            }
        }
    }
}

impl trust_store::Host for BatchState {
    async fn revoke_agent(&mut self, did: String) -> Result<(), HostError> {
        self.caps.trust.revoke(&did).map_err(guest_error)?;
        if self.caps.hub.close(&did, 1008, "agent_revoked") {
            tracing::info!(agent = %did, "revoked agent's connection closed");
        }
        Ok(())
    }

    async fn is_revoked(&mut self, did: String) -> Result<bool, HostError> {
        self.caps.trust.is_revoked(&did).map_err(guest_error)
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
        let storage = &self.caps.storage;
        storage
            .get(&self.handler, &actor, &key)
            .map_err(guest_error)
    }

    async fn put(&mut self, actor: String, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let storage = &self.caps.storage;
        storage
            .put(&self.handler, &actor, &key, &value)
            .map_err(guest_error)
    }

    async fn delete(&mut self, actor: String, key: String) -> Result<(), HostError> {
        let storage = &self.caps.storage;
        storage
            .delete(&self.handler, &actor, &key)
            .map_err(guest_error)
    }

    async fn list_prefix(
        &mut self,
        actor: String,
        prefix: String,
    ) -> Result<Vec<(String, Vec<u8>)>, HostError> {
        let storage = &self.caps.storage;
        storage
            .list_prefix(&self.handler, &actor, &prefix)
            .map_err(guest_error)
    }
}

/// An error of a storage-backed capability call.
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

/// A capability's error as the guest sees it. The storage calls behind the capabilities
/// are short SQLite statements (tens of µs) and run in place: handing each to the blocking
/// pool cost more in thread switches than the statement itself.
fn guest_error<E: GuestError>(err: E) -> HostError {
    HostError {
        transient: err.is_transient(),
        message: err.to_string(),
    }
}
