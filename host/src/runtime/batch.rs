//! One batch in its sandbox: a fresh store per batch with a memory cap, a CPU budget
//! (see [`super::cpu`]) and a wall-clock deadline around instantiation and call, run once
//! the host has room for the instance; and the classification of what went wrong.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::capabilities::Capabilities;
use super::compat::HandlerPre;
use super::failure::{BatchFailure, bounded};
use super::record::CallLog;
use super::stderr::StderrCapture;
use super::{Message, Outcome, cpu};
use crate::actor_storage::ActorClaims;
use crate::bounds::BatchLog;
use crate::crypto::sha256_hex;
use crate::side_effects::SideEffects;

/// The sandbox of one handler: what a batch may use before it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory of an instance, in bytes.
    pub memory_bytes: usize,
    /// Most CPU time a batch may use (counted in epoch ticks the guest ran through).
    pub cpu_timeout: Duration,
    /// Longest a batch may take, instantiation and call, waiting included.
    pub wall_timeout: Duration,
    /// Most instances of the handler alive at once; a batch waits for one to end.
    pub max_instances: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            cpu_timeout: Duration::from_secs(10),
            wall_timeout: Duration::from_secs(30),
            max_instances: 16,
        }
    }
}

/// Longest a batch waits for room for its instance. Past it the batch is released
/// without counting an attempt and taken again later: it never waits past its lease,
/// which outlasts its wall-clock deadline by [`crate::config::LEASE_MARGIN`].
pub const MAX_ROOM_WAIT: Duration = Duration::from_secs(15);
const _: () = assert!(MAX_ROOM_WAIT.as_secs() < crate::config::LEASE_MARGIN.as_secs());

/// Room for instances: the host's pool (shared by every handler) and the handler's own
/// `max_instances`. A batch waits for both before it instantiates, at most `wait`.
pub(super) struct Capacity {
    pool: Arc<Semaphore>,
    instances: Arc<Semaphore>,
    wait: Duration,
}

impl Capacity {
    /// `max_instances` of the handler, within the host's `pool`.
    pub(super) fn new(pool: Arc<Semaphore>, max_instances: usize) -> Self {
        Capacity {
            pool,
            instances: Arc::new(Semaphore::new(max_instances)),
            wait: MAX_ROOM_WAIT,
        }
    }

    /// Waits until the handler and the host both have room for one more instance, at
    /// most its `wait`: then the batch fails with [`BatchFailure::Capacity`].
    async fn acquire_in_time(
        &self,
        handler: &str,
    ) -> Result<[OwnedSemaphorePermit; 2], BatchFailure> {
        tokio::time::timeout(self.wait, self.acquire())
            .await
            .map_err(|_| {
                BatchFailure::Capacity(format!(
                    "no room for an instance of `{handler}` within {:?}",
                    self.wait
                ))
            })
    }

    /// Waits until the handler and the host both have room for one more instance.
    async fn acquire(&self) -> [OwnedSemaphorePermit; 2] {
        let closed = "instance semaphores are never closed";
        let instance = self.instances.clone().acquire_owned().await.expect(closed);
        let pool = self.pool.clone().acquire_owned().await.expect(closed);
        [instance, pool]
    }
}

/// A compiled and validated handler component, ready to be instantiated for each batch.
pub struct LoadedHandler {
    name: Arc<str>,
    /// Whose actors its `actor-storage` calls reach: its consumer's.
    actors: Arc<str>,
    version: String,
    size: usize,
    limits: Limits,
    capacity: Capacity,
    pre: HandlerPre,
}

/// The per-batch state of a store.
pub struct BatchState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) caps: Arc<Capabilities>,
    pub(super) handler: Arc<str>,
    /// The actor-storage namespace of the batch: the consumer's name.
    pub(super) actors: Arc<str>,
    /// The actors the batch holds, released when the batch ends.
    pub(super) claims: ActorClaims,
    pub(super) version: Arc<str>,
    memory: MemoryCap,
    /// Records every capability call when set (`clawq run`).
    pub(super) calls: Option<CallLog>,
    /// The batch's share of its consumer's log rate.
    pub(super) log: BatchLog,
    /// The agents the batch revoked, written only once its call has returned, with its
    /// outcomes (see [`side_effects`]).
    pub(super) revoked: Vec<String>,
}

impl BatchState {
    /// The state of a batch of a handler named `test` over `caps`, recording its calls.
    #[cfg(test)]
    pub(super) fn recording(caps: Arc<Capabilities>) -> Self {
        let test: Arc<str> = "test".into();
        let claims = caps.storage.claims(Duration::from_secs(1));
        BatchState {
            log: caps.logs.batch(&test, &test, &test),
            revoked: Vec::new(),
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
            caps,
            handler: "test".into(),
            actors: "test".into(),
            claims,
            version: "test".into(),
            memory: MemoryCap {
                limit: 1 << 20,
                exceeded: false,
            },
            calls: Some(CallLog::default()),
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

/// The side effects of the batch of `state`: its revocations, all together, to be
/// committed with its outcomes (the acks above all), so that an outcome never outlives
/// them. All together, they cost one transaction (the outcomes' own), however long the
/// guest took between them: written one by one as the guest revoked them, a batch of 100
/// took ten transactions.
pub(super) fn side_effects(state: &mut BatchState) -> Result<SideEffects, BatchFailure> {
    let revoked = std::mem::take(&mut state.revoked);
    if revoked.is_empty() {
        return Ok(SideEffects::None);
    }
    state
        .caps
        .trust
        .revocations(revoked)
        .map_err(|err| not_committed(err.to_string()))
}

/// The failure of a batch whose side effects could not be committed: the host's fault,
/// so its messages are released without counting an attempt.
fn not_committed(why: String) -> BatchFailure {
    BatchFailure::Capacity(format!("the batch's revocations were not committed: {why}"))
}

/// A batch the handler returned from: its outcomes, and the side effects to commit with
/// them.
pub struct Handled {
    /// One per message, in order (as many as the handler returned).
    pub outcomes: Vec<Outcome>,
    /// What the batch wrote through its capabilities, not committed yet.
    pub side_effects: SideEffects,
}

impl LoadedHandler {
    /// The handler `pre` (the component `wasm`) named `name`, run within `limits` and
    /// `capacity`; its actors are those of its own name until [`LoadedHandler::owned_by`].
    pub(super) fn new(
        name: &str,
        wasm: &[u8],
        limits: Limits,
        pre: HandlerPre,
        capacity: Capacity,
    ) -> Self {
        LoadedHandler {
            name: name.into(),
            actors: name.into(),
            version: sha256_hex(wasm),
            size: wasm.len(),
            limits,
            capacity,
            pre,
        }
    }

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

    /// Instantiates the handler once without calling it, within its limits: proves it
    /// can run.
    pub async fn check_instantiates(
        &self,
        caps: Arc<Capabilities>,
    ) -> Result<(), super::LoadError> {
        let refused = |why: String| {
            super::LoadError(format!(
                "handler `{}` refused: it does not instantiate: {why}",
                self.name
            ))
        };
        let _room = self.capacity.acquire().await;
        let (mut store, stderr) = self.store(caps, None);
        let instantiated = self.pre.instantiate(&mut store);
        match tokio::time::timeout(self.limits.wall_timeout, instantiated).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(refused(self.classify(&store, &stderr, err).to_string())),
            Err(_) => Err(refused(self.wall_clock_exceeded().to_string())),
        }
    }

    fn store(
        &self,
        caps: Arc<Capabilities>,
        calls: Option<CallLog>,
    ) -> (Store<BatchState>, StderrCapture) {
        let stderr = StderrCapture::default();
        let wasi = WasiCtxBuilder::new().stderr(stderr.clone()).build();
        let mut store = Store::new(self.pre.engine(), self.state(caps, calls, wasi));
        store.limiter(|state| &mut state.memory);
        cpu::budget(&mut store, self.limits.cpu_timeout);
        (store, stderr)
    }

    /// The state of one batch of the handler over `caps`, in the WASI context `wasi`.
    pub(super) fn state(
        &self,
        caps: Arc<Capabilities>,
        calls: Option<CallLog>,
        wasi: WasiCtx,
    ) -> BatchState {
        let version: Arc<str> = self.version[..12].into();
        let log = caps.logs.batch(&self.actors, &self.name, &version);
        let claims = caps.storage.claims(self.limits.wall_timeout);
        BatchState {
            wasi,
            table: ResourceTable::new(),
            caps,
            handler: self.name.clone(),
            actors: self.actors.clone(),
            claims,
            version,
            memory: MemoryCap {
                limit: self.limits.memory_bytes,
                exceeded: false,
            },
            calls,
            log,
            revoked: Vec::new(),
        }
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
    /// when given; the batch's side effects are committed before it returns.
    pub async fn handle_recorded(
        &self,
        caps: Arc<Capabilities>,
        queue: &str,
        messages: &[Message],
        calls: Option<CallLog>,
    ) -> Result<Vec<Outcome>, BatchFailure> {
        let handled = self.call(caps, queue, messages, calls).await?;
        handled.side_effects.commit().await.map_err(not_committed)?;
        Ok(handled.outcomes)
    }

    /// Runs one batch in a fresh instance, appending every capability call of the batch
    /// to `calls` when given, and returns the guest's outcomes with the batch's side
    /// effects, not committed yet: the caller commits them with the outcomes. The batch
    /// waits for room for its instance (not counted in its deadlines, at most
    /// [`MAX_ROOM_WAIT`]: then it fails with [`BatchFailure::Capacity`]), then
    /// instantiates and calls the handler within the wall-clock deadline.
    pub async fn call(
        &self,
        caps: Arc<Capabilities>,
        queue: &str,
        messages: &[Message],
        calls: Option<CallLog>,
    ) -> Result<Handled, BatchFailure> {
        let _room = self.capacity.acquire_in_time(&self.name).await?;
        let (mut store, stderr) = self.store(caps, calls);
        let call = self.pre.handle(&mut store, queue, messages);
        match tokio::time::timeout(self.limits.wall_timeout, call).await {
            Ok(Ok(outcomes)) => {
                let outcomes = outcomes.map_err(|error| BatchFailure::Error(bounded(&error)))?;
                Ok(Handled {
                    outcomes,
                    side_effects: side_effects(store.data_mut())?,
                })
            }
            Ok(Err(err)) => Err(self.classify(&store, &stderr, err)),
            Err(_) => Err(self.wall_clock_exceeded()),
        }
    }

    /// What stopped the guest of `store` with `err`: a limit, the host's capacity, or a
    /// trap (reported with what the guest wrote to stderr).
    fn classify(
        &self,
        store: &Store<BatchState>,
        stderr: &StderrCapture,
        err: wasmtime::Error,
    ) -> BatchFailure {
        let err = anyhow::Error::from(err);
        if store.data().memory.exceeded {
            return BatchFailure::Limit(format!(
                "memory limit of {} MiB exceeded",
                self.limits.memory_bytes >> 20
            ));
        }
        if matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            return BatchFailure::Limit(format!(
                "CPU budget of {:?} used up",
                self.limits.cpu_timeout
            ));
        }
        if let Some(exhausted) = err
            .chain()
            .find(|e| e.is::<wasmtime::PoolConcurrencyLimitError>())
        {
            return BatchFailure::Capacity(exhausted.to_string());
        }
        let output = stderr.report();
        let cause = err.root_cause();
        BatchFailure::Trap(if output.is_empty() {
            cause.to_string()
        } else {
            format!("{cause}; stderr: {output}")
        })
    }

    fn wall_clock_exceeded(&self) -> BatchFailure {
        BatchFailure::Limit(format!(
            "wall-clock deadline of {:?} exceeded",
            self.limits.wall_timeout
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::sessions::SessionLimits;
    use crate::runtime::{ContentType, Runtime};
    use crate::world::World;

    /// One `hostile-handler` message scripting `attack`.
    fn message(attack: &str) -> Message {
        Message {
            id: "m".into(),
            attempts: 1,
            timestamp_ms: 0,
            content_type: ContentType::Json,
            body: attack.as_bytes().to_vec(),
        }
    }

    /// The hostile handler loaded within `limits`, and capabilities in `dir`.
    fn hostile(limits: Limits, dir: &std::path::Path) -> (LoadedHandler, Arc<Capabilities>) {
        let runtime = Runtime::new().unwrap();
        let wasm = std::fs::read(clawq_test_guests::HOSTILE_HANDLER).unwrap();
        let handler = runtime
            .load("hostile", &wasm, World::HandlerHost, limits)
            .unwrap();
        let caps = crate::server::open_capabilities(
            &crate::store::test_db(dir),
            Duration::from_secs(60),
            SessionLimits::default(),
        )
        .unwrap();
        (handler, caps)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wall_clock_deadline_stops_a_spinning_guest_between_its_slices() {
        let limits = Limits {
            cpu_timeout: Duration::from_secs(60),
            wall_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let (handler, caps) = hostile(limits, dir.path());
        let started = std::time::Instant::now();
        let spin = [message(r#"{"do": "spin"}"#)];
        let failure = handler.handle(caps, "q", &spin).await.unwrap_err();
        assert_eq!(
            failure.to_string(),
            "handler stopped: wall-clock deadline of 300ms exceeded"
        );
        assert!(failure.is_guest_fault());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_with_no_room_for_its_instance_in_time_fails_for_want_of_capacity() {
        let limits = Limits {
            max_instances: 1,
            ..Limits::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let (mut handler, caps) = hostile(limits, dir.path());
        assert_eq!(handler.capacity.wait, MAX_ROOM_WAIT);
        handler.capacity.wait = Duration::from_millis(300);
        let taken = handler.capacity.acquire().await;
        let started = std::time::Instant::now();
        let failure = handler
            .handle(caps.clone(), "q", &[message(r#"{"do": "ack"}"#)])
            .await
            .unwrap_err();
        assert_eq!(
            failure.to_string(),
            "host out of capacity: no room for an instance of `hostile` within 300ms"
        );
        assert!(!failure.is_guest_fault(), "released, not counted");
        assert!(started.elapsed() >= Duration::from_millis(300));
        drop(taken);
        let outcomes = handler
            .handle(caps, "q", &[message(r#"{"do": "ack"}"#)])
            .await
            .unwrap();
        assert!(matches!(outcomes[..], [Outcome::Ack]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_waits_for_an_instance_instead_of_failing() {
        let limits = Limits {
            max_instances: 1,
            ..Limits::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let (handler, caps) = hostile(limits, dir.path());
        let sleep = [message(r#"{"do": "sleep", "seconds": 1}"#)];
        let started = std::time::Instant::now();
        let (first, second) = tokio::join!(
            handler.handle(caps.clone(), "q", &sleep),
            handler.handle(caps.clone(), "q", &sleep)
        );
        assert!(matches!(first.unwrap()[..], [Outcome::Ack]));
        assert!(
            matches!(second.unwrap()[..], [Outcome::Ack]),
            "the second waited"
        );
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "one instance at a time: {:?}",
            started.elapsed()
        );
    }
}
