//! The component runtime: compiles handler components once, instantiates one per batch
//! through an [`InstancePre`](wasmtime::component::InstancePre) on a pooling allocator,
//! and implements the capability imports of `wit/`.
//!
//! Each batch runs in a fresh store whose WASI context grants nothing: no filesystem,
//! no network, no environment, no clock beyond WASI's defaults. A guest's stderr (where a
//! Rust panic message goes) is captured and reported with its trap.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::actor_storage::{ActorStorage, StorageError};
use crate::bounds::{self, BatchLog, GuestLogs};
use crate::crypto::sha256_hex;
use crate::frame::{MAX_FRAME_BYTES, ReceiptStatus, VERSION};
use crate::relay::hub::ConnectionHub;
use crate::relay::sessions::{
    Delivery, DeliveryIn, ReceiptIn, RelaySessions, SessionError, SessionLimits,
};
use crate::trust::{TrustError, TrustStore};
use crate::world::World;

mod compat;

use compat::HandlerPre;
pub use compat::{HANDLER_EXPORT, LEGACY_HANDLER_EXPORT};

mod bindings {
    wasmtime::component::bindgen!({
        world: "handler-host",
        path: "../wit",
        imports: { default: async },
        exports: { default: async },
    });
}

pub use bindings::clawdentity::queues::types::{
    ContentType, HostError, Message, Outcome, Unhandled, UnhandledReason,
};

impl UnhandledReason {
    /// The reason's name in logs and in the `reason` label of
    /// `clawq_messages_unhandled_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            UnhandledReason::Malformed => "malformed",
            UnhandledReason::UnknownType => "unknown_type",
            UnhandledReason::InvalidField => "invalid_field",
            UnhandledReason::Refused => "refused",
        }
    }
}
use bindings::clawdentity::queues::{actor_storage, log, relay_sessions, trust_store, websocket};

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
    /// The log rate limits of the `log` import.
    pub logs: Arc<GuestLogs>,
}

impl Capabilities {
    /// Every capability, backed by the stores in `data_dir` (created when missing):
    /// revocation markers lasting `revocation_ttl`, relay sessions kept within `limits`,
    /// and a connection hub of its own.
    pub fn open(
        data_dir: &std::path::Path,
        revocation_ttl: Duration,
        limits: SessionLimits,
    ) -> Result<Arc<Capabilities>> {
        let hub = Arc::new(ConnectionHub::default());
        let trust = TrustStore::open(&data_dir.join("trust.db"), revocation_ttl)
            .context("opening the trust store")?;
        let sessions = RelaySessions::open(&data_dir.join("sessions.db"), hub.clone(), limits)
            .context("opening the relay sessions")?;
        let storage = ActorStorage::open(&data_dir.join("actor-storage.db"))
            .context("opening the actor storage")?;
        Ok(Arc::new(Capabilities {
            trust: Arc::new(trust),
            sessions: Arc::new(sessions),
            hub,
            storage: Arc::new(storage),
            logs: Arc::default(),
        }))
    }
}

/// One capability call a handler made, as `clawq run` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Call {
    /// `interface.function`, e.g. `relay-sessions.deliver-receipt`; `log.<level>` for a
    /// log line.
    pub call: String,
    /// The arguments, as text.
    pub args: String,
    /// What the call returned, as text; `None` for a log line.
    pub result: Option<String>,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.call, self.args)?;
        match &self.result {
            Some(result) => write!(f, " -> {result}"),
            None => Ok(()),
        }
    }
}

/// Where the capability calls of a batch are recorded, in order.
pub type CallLog = Arc<Mutex<Vec<Call>>>;

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
    /// Whose actors its `actor-storage` calls reach: its consumer's.
    actors: Arc<str>,
    version: String,
    size: usize,
    limits: Limits,
    instances: Arc<Semaphore>,
    pre: HandlerPre,
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
    /// The actor-storage namespace of the batch: the consumer's name.
    actors: Arc<str>,
    version: Arc<str>,
    memory: MemoryCap,
    /// Records every capability call when set (`clawq run`).
    calls: Option<CallLog>,
    /// The batch's share of its consumer's log rate.
    log: BatchLog,
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
        compat::add_to_linker(&mut linker)?;
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

    /// Compiles the component `wasm` (blocking) for a look at what it imports and
    /// exports; [`Runtime::load_compiled`] then loads it without compiling it again.
    pub fn compile_component(&self, name: &str, wasm: &[u8]) -> Result<Compiled, LoadError> {
        let component = self
            .compile(wasm)
            .map_err(|why| LoadError(format!("handler `{name}` refused: {why}")))?;
        let ty = component.component_type();
        let names = |items: &mut dyn Iterator<Item = &str>| items.map(str::to_owned).collect();
        Ok(Compiled {
            imports: names(&mut ty.imports(&self.engine).map(|(name, _)| name)),
            exports: names(&mut ty.exports(&self.engine).map(|(name, _)| name)),
            component,
        })
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
        let compiled = self.compile_component(name, wasm)?;
        self.load_compiled(name, wasm, &compiled, world, limits)
    }

    /// Checks that `compiled` (the component `wasm`) is a handler of `world` that
    /// instantiates, and makes it ready to run.
    pub fn load_compiled(
        &self,
        name: &str,
        wasm: &[u8],
        compiled: &Compiled,
        world: World,
        limits: Limits,
    ) -> Result<LoadedHandler, LoadError> {
        let refuse = |why: String| LoadError(format!("handler `{name}` refused: {why}"));
        let component = &compiled.component;
        let component_type = component.component_type();
        world
            .check_imports(component_type.imports(&self.engine).map(|(name, _)| name))
            .map_err(refuse)?;
        let pre = self.linker.instantiate_pre(component).map_err(|e| {
            refuse(format!(
                "it cannot be linked: {}",
                anyhow::Error::from(e).root_cause()
            ))
        })?;
        let pre = HandlerPre::new(pre, &compiled.exports).map_err(|e| {
            refuse(format!(
                "it does not export `{HANDLER_EXPORT}` as world `{world}` requires: {}",
                anyhow::Error::from(e).root_cause()
            ))
        })?;
        Ok(LoadedHandler {
            name: name.into(),
            actors: name.into(),
            version: sha256_hex(wasm),
            size: wasm.len(),
            limits,
            instances: Arc::new(Semaphore::new(limits.max_instances)),
            pre,
        })
    }
}

/// A compiled component and the names of what it imports and exports.
pub struct Compiled {
    /// Its imports (interface names such as `clawdentity:queues/log@0.2.0`).
    pub imports: Vec<String>,
    /// Its exports.
    pub exports: Vec<String>,
    component: Component,
}

impl LoadedHandler {
    /// The name the handler was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives the handler the actors of `consumer` (by default those of its own name), so
    /// that its stored state follows the consumer across new versions and renames of the
    /// component, and two consumers running one component keep theirs apart.
    pub fn owned_by(mut self, consumer: &str) -> Self {
        self.actors = consumer.into();
        self
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
        let (mut store, _) = self.store(caps, None);
        self.pre.instantiate(&mut store).await.map_err(|e| {
            LoadError(format!(
                "handler `{}` refused: it does not instantiate: {}",
                self.name,
                anyhow::Error::from(e).root_cause()
            ))
        })
    }

    fn store(
        &self,
        caps: Arc<Capabilities>,
        calls: Option<CallLog>,
    ) -> (Store<BatchState>, MemoryOutputPipe) {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE_BYTES);
        let version: Arc<str> = self.version[..12].into();
        let log = caps.logs.batch(&self.actors, &self.name, &version);
        let state = BatchState {
            wasi: WasiCtxBuilder::new().stderr(stderr.clone()).build(),
            table: ResourceTable::new(),
            caps,
            handler: self.name.clone(),
            actors: self.actors.clone(),
            version,
            memory: MemoryCap {
                limit: self.limits.memory_bytes,
                exceeded: false,
            },
            calls,
            log,
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
        self.handle_recorded(caps, queue, messages, None).await
    }

    /// [`LoadedHandler::handle`], appending every capability call of the batch to `calls`
    /// when given.
    pub async fn handle_recorded(
        &self,
        caps: Arc<Capabilities>,
        queue: &str,
        messages: &[Message],
        calls: Option<CallLog>,
    ) -> Result<Vec<Outcome>, BatchFailure> {
        let Ok(_instance_slot) = self.instances.try_acquire() else {
            return Err(BatchFailure::Limit(format!(
                "all {} instances of the handler are busy (max_instances)",
                self.limits.max_instances
            )));
        };
        let (mut store, stderr) = self.store(caps, calls);
        let result = self.pre.handle(&mut store, queue, messages).await;
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

impl BatchState {
    /// Records a capability call and what it returned, when calls are recorded; `args`
    /// and `show` (the success value as text) run only then.
    fn record<T>(
        &self,
        call: &str,
        args: impl FnOnce() -> String,
        result: &Result<T, HostError>,
        show: impl FnOnce(&T) -> String,
    ) {
        if let Some(calls) = &self.calls {
            let result = match result {
                Ok(value) => show(value),
                Err(err) if err.transient => format!("error (transient): {}", err.message),
                Err(err) => format!("error: {}", err.message),
            };
            push_call(calls, call.to_owned(), args(), Some(result));
        }
    }
}

/// Appends one call to `calls`.
fn push_call(calls: &CallLog, call: String, args: String, result: Option<String>) {
    let mut calls = calls.lock().unwrap_or_else(|p| p.into_inner());
    calls.push(Call { call, args, result });
}

impl log::Host for BatchState {
    async fn write(&mut self, level: log::Level, message: String) {
        if !self.log.admit() {
            return;
        }
        let message = bounds::log_line(message);
        if let Some(calls) = &self.calls {
            let name = match level {
                log::Level::Trace => "trace",
                log::Level::Debug => "debug",
                log::Level::Info => "info",
                log::Level::Warn => "warn",
                log::Level::Error => "error",
            };
            push_call(calls, format!("log.{name}"), format!("{message:?}"), None);
        }
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
        let result = self.caps.trust.revoke(&did).map_err(guest_error);
        if result.is_ok() && self.caps.hub.close(&did, 1008, "agent_revoked") {
            tracing::info!(agent = %did, "revoked agent's connection closed");
        }
        self.record("trust-store.revoke-agent", || did, &result, |_| "ok".into());
        result
    }

    async fn is_revoked(&mut self, did: String) -> Result<bool, HostError> {
        let result = self.caps.trust.is_revoked(&did).map_err(guest_error);
        self.record("trust-store.is-revoked", || did, &result, bool::to_string);
        result
    }
}

impl relay_sessions::Host for BatchState {
    async fn deliver_receipt(
        &mut self,
        receipt: relay_sessions::Receipt,
    ) -> Result<relay_sessions::Delivery, HostError> {
        let args = self.calls.as_ref().map(|_| show_receipt(&receipt));
        let receipt = ReceiptIn {
            request_id: receipt.request_id.trim().to_owned(),
            sender_agent_did: receipt.sender_agent_did.trim().to_owned(),
            recipient_agent_did: receipt.recipient_agent_did.trim().to_owned(),
            status: match receipt.status {
                relay_sessions::ReceiptStatus::DeliveredToWebhook => {
                    ReceiptStatus::DeliveredToWebhook
                }
                relay_sessions::ReceiptStatus::DeadLettered => ReceiptStatus::DeadLettered,
            },
            reason: trimmed_option(receipt.reason),
        };
        let result = match bounds::receipt_fields(&receipt.request_id, receipt.reason.as_deref()) {
            Ok(()) => session_result(self.caps.sessions.deliver_receipt(receipt).await),
            Err(too_large) => Err(too_large.into()),
        };
        let args = || args.unwrap_or_default();
        self.record(
            "relay-sessions.deliver-receipt",
            args,
            &result,
            show_delivery,
        );
        result
    }

    async fn deliver(
        &mut self,
        delivery: relay_sessions::AgentDelivery,
    ) -> Result<relay_sessions::Delivery, HostError> {
        let args = self.calls.as_ref().map(|_| show_agent_delivery(&delivery));
        let delivery = DeliveryIn {
            dedup_key: delivery.dedup_key.trim().to_owned(),
            from_agent_did: delivery.from_agent_did.trim().to_owned(),
            to_agent_did: delivery.to_agent_did.trim().to_owned(),
            payload: delivery.payload.trim().to_owned(),
            delivery_source: trimmed_option(delivery.delivery_source),
            content_type: trimmed_option(delivery.content_type),
            group_id: trimmed_option(delivery.group_id),
            conversation_id: trimmed_option(delivery.conversation_id),
            reply_to: trimmed_option(delivery.reply_to),
        };
        let result = session_result(self.caps.sessions.deliver(delivery).await);
        let args = || args.unwrap_or_default();
        self.record("relay-sessions.deliver", args, &result, show_delivery);
        result
    }
}

/// `value` trimmed; `None` when it is blank.
fn trimmed_option(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// A session's answer as the guest sees it: a refusal is permanent, an unavailable
/// session transient.
fn session_result(
    result: Result<Delivery, SessionError>,
) -> Result<relay_sessions::Delivery, HostError> {
    match result {
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

/// What a session did, as `clawq run` shows it.
fn show_delivery(delivery: &relay_sessions::Delivery) -> String {
    match delivery {
        relay_sessions::Delivery::Pushed(n) => format!("pushed({n})"),
        relay_sessions::Delivery::Stored => "stored".into(),
        relay_sessions::Delivery::Unchanged => "unchanged".into(),
        relay_sessions::Delivery::Ignored => "ignored".into(),
    }
}

/// A delivery as `clawq run` shows it.
fn show_agent_delivery(delivery: &relay_sessions::AgentDelivery) -> String {
    let mut text = format!(
        "{{dedup-key: {:?}, from: {}, to: {}, payload: {}",
        delivery.dedup_key, delivery.from_agent_did, delivery.to_agent_did, delivery.payload
    );
    let optional = [
        ("delivery-source", &delivery.delivery_source),
        ("content-type", &delivery.content_type),
        ("group-id", &delivery.group_id),
        ("conversation-id", &delivery.conversation_id),
        ("reply-to", &delivery.reply_to),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            text += &format!(", {name}: {value:?}");
        }
    }
    text + "}"
}

/// A receipt as `clawq run` shows it.
fn show_receipt(receipt: &relay_sessions::Receipt) -> String {
    let status = match receipt.status {
        relay_sessions::ReceiptStatus::DeliveredToWebhook => "delivered-to-webhook",
        relay_sessions::ReceiptStatus::DeadLettered => "dead-lettered",
    };
    let mut text = format!(
        "{{request-id: {:?}, sender: {}, recipient: {}, status: {status}",
        receipt.request_id, receipt.sender_agent_did, receipt.recipient_agent_did
    );
    if let Some(reason) = &receipt.reason {
        text += &format!(", reason: {reason:?}");
    }
    if let Some(at) = &receipt.processed_at {
        text += &format!(", processed-at: {at:?}");
    }
    text + "}"
}

impl websocket::Host for BatchState {
    async fn send_frame(&mut self, agent_did: String, frame: String) -> Result<u32, HostError> {
        let result = self.push_frame(&agent_did, &frame);
        let args = || format!("{agent_did} {frame}");
        let show = |n: &u32| format!("{n} connection{}", if *n == 1 { "" } else { "s" });
        self.record("websocket.send-frame", args, &result, show);
        result
    }
}

impl BatchState {
    /// Checks `frame`, completes its envelope and sends it to the connections of
    /// `agent_did`.
    fn push_frame(&self, agent_did: &str, frame: &str) -> Result<u32, HostError> {
        let refuse = |message: String| HostError {
            transient: false,
            message,
        };
        clawq_protocol::did::validate_agent_did(agent_did)
            .map_err(|e| refuse(format!("`{agent_did}`: {e}")))?;
        bounds::check("frame", frame.len(), MAX_FRAME_BYTES)?;
        let frame = fill_envelope(frame, crate::clock::now_ms())
            .ok_or_else(|| refuse("frame is not a JSON object".into()))?;
        bounds::check("frame", frame.len(), MAX_FRAME_BYTES)?;
        Ok(self.caps.hub.send(agent_did, frame.into_owned()))
    }
}

/// `frame` with the envelope fields it lacks added: `"v": 1`, a new ULID `id` and `ts`,
/// the time `now_ms` in ISO-8601. `None` when `frame` is not a JSON object.
fn fill_envelope(frame: &str, now_ms: u64) -> Option<std::borrow::Cow<'_, str>> {
    let serde_json::Value::Object(mut fields) = serde_json::from_str(frame).ok()? else {
        return None;
    };
    if ["v", "id", "ts"].iter().all(|k| fields.contains_key(*k)) {
        return Some(frame.into());
    }
    fields.entry("v").or_insert(VERSION.into());
    fields
        .entry("id")
        .or_insert_with(|| ulid::Ulid::new().to_string().into());
    fields
        .entry("ts")
        .or_insert_with(|| crate::clock::iso8601(now_ms).into());
    Some(serde_json::Value::Object(fields).to_string().into())
}

impl actor_storage::Host for BatchState {
    async fn get(&mut self, actor: String, key: String) -> Result<Option<Vec<u8>>, HostError> {
        let result = self
            .caps
            .storage
            .get(&self.actors, &actor, &key)
            .map_err(guest_error);
        let show = |value: &Option<Vec<u8>>| match value {
            Some(bytes) => format!("{} bytes", bytes.len()),
            None => "none".into(),
        };
        self.record(
            "actor-storage.get",
            || format!("{actor} {key:?}"),
            &result,
            show,
        );
        result
    }

    async fn put(&mut self, actor: String, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let result = self
            .caps
            .storage
            .put(&self.actors, &actor, &key, &value)
            .map_err(guest_error);
        let args = || format!("{actor} {key:?} ({} bytes)", value.len());
        self.record("actor-storage.put", args, &result, |_| "ok".into());
        result
    }

    async fn delete(&mut self, actor: String, key: String) -> Result<(), HostError> {
        let result = self
            .caps
            .storage
            .delete(&self.actors, &actor, &key)
            .map_err(guest_error);
        let args = || format!("{actor} {key:?}");
        self.record("actor-storage.delete", args, &result, |_| "ok".into());
        result
    }

    async fn list_prefix(
        &mut self,
        actor: String,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, HostError> {
        let after = start_after.as_deref();
        let result = self
            .caps
            .storage
            .list_prefix(&self.actors, &actor, &prefix, after, limit)
            .map_err(guest_error);
        let args = || format!("{actor} {prefix:?} after {after:?} limit {limit}");
        let show = |entries: &Vec<(String, Vec<u8>)>| format!("{} entries", entries.len());
        self.record("actor-storage.list-prefix", args, &result, show);
        result
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn filled(frame: &str) -> Value {
        serde_json::from_str(&fill_envelope(frame, 1_764_072_599_776).unwrap()).unwrap()
    }

    #[test]
    fn a_pushed_frame_gets_the_envelope_fields_it_lacks() {
        let frame = filled(r#"{"type":"nudge","n":1}"#);
        assert_eq!(frame["v"], json!(1));
        assert_eq!(frame["ts"], json!("2025-11-25T12:09:59.776Z"));
        let id = frame["id"].as_str().unwrap();
        assert!(id.len() == 26 && id.parse::<ulid::Ulid>().is_ok(), "{id}");
        assert_eq!((&frame["type"], &frame["n"]), (&json!("nudge"), &json!(1)));

        let own = r#"{"v":7,"id":"mine","ts":"then","type":"x"}"#;
        assert_eq!(
            fill_envelope(own, 0).unwrap(),
            own,
            "a complete envelope is kept as is"
        );
        let partial = filled(r#"{"id":"mine","type":"x"}"#);
        assert_eq!((&partial["id"], &partial["v"]), (&json!("mine"), &json!(1)));

        for not_an_object in ["[]", "1", "nope", ""] {
            assert!(fill_envelope(not_an_object, 0).is_none(), "{not_an_object}");
        }
    }

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";

    /// The state of a batch over fresh capabilities in `dir`, recording its calls.
    fn batch_state(dir: &std::path::Path) -> BatchState {
        let caps = Capabilities::open(dir, Duration::from_secs(60), SessionLimits::default());
        let caps = caps.unwrap();
        let test: Arc<str> = "test".into();
        BatchState {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            log: caps.logs.batch(&test, &test, &test),
            caps,
            handler: "test".into(),
            actors: "test".into(),
            version: "test".into(),
            memory: MemoryCap {
                limit: 1 << 20,
                exceeded: false,
            },
            calls: Some(CallLog::default()),
        }
    }

    #[tokio::test]
    async fn the_deliver_capability_trims_checks_and_records() {
        use relay_sessions::Host;
        let dir = tempfile::tempdir().unwrap();
        let mut state = batch_state(dir.path());
        let padded = relay_sessions::AgentDelivery {
            dedup_key: " pair.accepted:a:b:1 ".into(),
            from_agent_did: format!(" {B}"),
            to_agent_did: format!("{A}\n"),
            payload: r#" {"system": {}} "#.into(),
            delivery_source: Some(" proxy.events.queue.pair_accepted ".into()),
            content_type: None,
            group_id: None,
            conversation_id: Some("  ".into()),
            reply_to: None,
        };
        let stored = state.deliver(padded.clone()).await.unwrap();
        assert_eq!(show_delivery(&stored), "stored");
        let again = state.deliver(padded.clone()).await.unwrap();
        assert_eq!(show_delivery(&again), "unchanged", "the trimmed key dedups");

        let sessions = state.caps.sessions.clone();
        let push = sessions
            .to_push(A, crate::relay::sessions::Ask::Connected)
            .await;
        let frames = push.unwrap().frames;
        assert_eq!(frames.len(), 1);
        let frame: Value = serde_json::from_str(&frames[0]).unwrap();
        assert_eq!(
            (&frame["fromAgentDid"], &frame["toAgentDid"]),
            (&json!(B), &json!(A))
        );
        assert_eq!(frame["deliverySource"], "proxy.events.queue.pair_accepted");
        assert!(
            frame.get("conversationId").is_none(),
            "a blank field is left out: {frame}"
        );

        let not_json = relay_sessions::AgentDelivery {
            payload: "{oops".into(),
            ..padded.clone()
        };
        let err = state.deliver(not_json).await.unwrap_err();
        assert!(
            !err.transient && err.message.contains("`payload`"),
            "{err:?}"
        );
        let long_group = relay_sessions::AgentDelivery {
            group_id: Some("g".repeat(2000)),
            ..padded
        };
        let err = state.deliver(long_group).await.unwrap_err();
        assert!(
            !err.transient && err.message.contains("`group-id`"),
            "{err:?}"
        );

        let receipt = relay_sessions::Receipt {
            request_id: " r1 ".into(),
            sender_agent_did: format!("  {A} "),
            recipient_agent_did: format!("{B} "),
            status: relay_sessions::ReceiptStatus::DeadLettered,
            reason: Some(" ".into()),
            processed_at: None,
        };
        let routed = state.deliver_receipt(receipt).await.unwrap();
        assert_eq!(show_delivery(&routed), "stored", "padded values are routed");
        let push = sessions.to_push(A, crate::relay::sessions::Ask::Due).await;
        let receipt: Value = serde_json::from_str(&push.unwrap().frames[0]).unwrap();
        assert_eq!(receipt["originalFrameId"], "r1");
        assert!(
            receipt.get("reason").is_none(),
            "a blank reason is none: {receipt}"
        );

        let calls = state.calls.as_ref().unwrap().lock().unwrap().clone();
        let shown: Vec<String> = calls
            .iter()
            .map(|c| format!("{} -> {:?}", c.call, c.result))
            .collect();
        assert_eq!(
            shown,
            [
                "relay-sessions.deliver -> Some(\"stored\")",
                "relay-sessions.deliver -> Some(\"unchanged\")",
                "relay-sessions.deliver -> Some(\"error: invalid delivery: `payload` is not JSON: key must be a string at line 1 column 2\")",
                "relay-sessions.deliver -> Some(\"error: invalid delivery: `group-id` is 2000 bytes, over the 1024-byte limit\")",
                "relay-sessions.deliver-receipt -> Some(\"stored\")",
            ]
        );
    }
}
