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

use crate::trust::TrustStore;

mod bindings {
    wasmtime::component::bindgen!({
        world: "handler-host",
        path: "../wit",
        imports: { default: async },
        exports: { default: async },
    });
}

pub use bindings::clawdentity::queues::types::{ContentType, HostError, Message, Outcome};
use bindings::clawdentity::queues::{log, trust_store};
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
        run_blocking(move || trust.revoke(&did)).await
    }

    async fn is_revoked(&mut self, did: String) -> Result<bool, HostError> {
        let trust = self.caps.trust.clone();
        run_blocking(move || trust.is_revoked(&did)).await
    }
}

/// Runs a trust-store call off the async workers and maps its error for the guest.
async fn run_blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, crate::trust::TrustError> + Send + 'static,
) -> Result<T, HostError> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result.map_err(|err| HostError {
            transient: err.is_transient(),
            message: err.to_string(),
        }),
        Err(join) => Err(HostError {
            transient: true,
            message: format!("trust store task failed: {join}"),
        }),
    }
}
