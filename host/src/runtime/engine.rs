//! The engine: compiles handler components once, on a pooling allocator with epoch
//! interruption (the clock of every CPU budget and of the guests' yields), and links
//! every capability of both contract versions.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::batch::{BatchState, Capacity, Limits, LoadedHandler};
use super::compat::{self, HANDLER_EXPORT, HandlerPre};
use crate::world::World;

/// Most handler instances alive at once across the host (the pooling allocator's size).
const POOL_INSTANCES: u32 = 256;
/// The largest memory any handler may be granted.
pub const MAX_MEMORY_BYTES: usize = 1 << 30;
/// How much of a pooled memory or table slot stays mapped when its instance is freed,
/// reset in place for the next batch: a handler's stack, data and first heap pages.
const KEEP_RESIDENT_BYTES: usize = 2 << 20;
/// How often the epoch advances: the slice after which a running guest yields its
/// thread, and the granularity of CPU budgets.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The shared compiler and linker of every handler.
pub struct Runtime {
    engine: Engine,
    linker: Linker<BatchState>,
    /// One permit per instance the pooling allocator holds: a batch waits for one before
    /// it instantiates, so that the pool is never exhausted.
    pool: Arc<Semaphore>,
}

/// Why a component cannot be loaded; the message names the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

impl Runtime {
    /// Builds the engine (async, pooling allocator, epoch interruption) and the linker of
    /// every capability, and starts the epoch ticker.
    pub fn new() -> Result<Self> {
        // A batch holds one of POOL_INSTANCES permits while its instance lives, so the
        // pool never runs out of component instances. Its other limits (core instances,
        // memories, tables) are shared: a batch that finds them exhausted is the host's
        // fault, released without counting an attempt (`BatchFailure::Capacity`).
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 4)
            .total_memories(POOL_INSTANCES)
            .total_tables(POOL_INSTANCES * 2)
            .max_memory_size(MAX_MEMORY_BYTES)
            // A slot freed by a batch is reset by rewriting the pages the batch touched
            // (found with Linux's PAGEMAP_SCAN where the kernel has it) instead of
            // unmapping them all: the next batch in that slot takes no page faults and
            // the host no TLB shootdowns.
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .table_keep_resident(KEEP_RESIDENT_BYTES)
            .pagemap_scan(Enabled::Auto);
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
        Ok(Runtime {
            engine,
            linker,
            pool: Arc::new(Semaphore::new(POOL_INSTANCES as usize)),
        })
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
        Ok(LoadedHandler::new(
            name,
            wasm,
            limits,
            pre,
            Capacity::new(self.pool.clone(), limits.max_instances),
        ))
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
