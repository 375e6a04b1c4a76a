//! Throughput benchmark (not a test): prints messages/s through the durable queue into
//! the CRL-invalidation component end to end, the same queue with no handler at all
//! (the engine alone) side by side, the per-batch cost of a fresh instance, the
//! compile/validate time of both bundled components and the time from a deploy to the
//! first batch on the new version, and what a second consumer of the same queue (a
//! subscription that takes every message, or none) costs, and what the queue gauges
//! (`counts`, `lanes`) cost at a 100k backlog.
//!
//! Then the resident memory of the real host (the built `clawq serve`, a process of its
//! own, with no config: the events queue into the bundled CRL component): idle, and
//! after it handled 1,000,000 revocations published over HTTP (`VmRSS` and the peak,
//! `VmHWM`, of `/proc/<pid>/status`). And (`single`) the same host's msg/s with
//! concurrent single-message publishes (1, 16 and 64 producers, a request per message)
//! beside one producer of batches of 100, each with the host's CPU time per message
//! (`/proc/<pid>/stat`): the producers share the host's 2 cores, so the CPU figure says
//! what the host itself costs.
//!
//! And WASM vs native (`native`): the same revocations through one queue loop (take a
//! batch, handle it, settle its acks), handled by the CRL component or by its own logic
//! compiled natively (`crl_invalidation::handling`) against the same capability
//! implementations (`clawq::runtime::native`), interleaved rounds.
//!
//! Run with `cargo bench -p clawq --bench throughput`; a word after `--` runs only the
//! sections whose name contains it (`gauges`, `instance`, `deploy`, `batch`,
//! `subscribers`, `rss`, `native`, `single`). `CLAWQ_BENCH_MESSAGES` sets the message count
//! (default 50000), `CLAWQ_BENCH_RSS_MESSAGES` that of the `rss` section (default
//! 1000000), `CLAWQ_BENCH_ROUNDS` the rounds of the `native` section (default 5),
//! `CLAWQ_BENCH_PRODUCERS` the producer counts of the `single` section (default
//! `1,16,64`; empty: the batches of 100 alone).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clawq::bundled;
use clawq::config::{ConsumerConfig, EVENTS_QUEUE};
use clawq::consumer::{Consumer, to_message};
use clawq::handlers::HandlerSlots;
use clawq::queue::lane::Lane;
use clawq::queue::routes::{Filter, Routes};
use clawq::queue::sqlite::SqliteQueue;
use clawq::queue::{BatchTerms, ContentType, NewMessage, QueueBackend, RetryPolicy, Settlement};
use clawq::relay::sessions::SessionLimits;
use clawq::runtime::native::{Level, NativeBatch};
use clawq::runtime::{
    Capabilities, ContentType as WitContentType, Limits, LoadedHandler, Message, Outcome, Runtime,
};
use clawq::side_effects::SideEffects;
use clawq::store::{Database, Durability};
use clawq::world::World;
use clawq_protocol::body::ContentType as BodyContentType;
use crl_invalidation::handling::{self, Host, StoreError, handle};
use tokio_util::sync::CancellationToken;

const PUBLISH_BATCH: usize = 100;

/// The host's database in `dir`.
fn database(dir: &std::path::Path) -> Database {
    Database::open(dir, Durability::Process).unwrap()
}

/// Every capability, backed by stores in `dir`.
fn capabilities(dir: &std::path::Path) -> Arc<Capabilities> {
    clawq::server::open_capabilities(
        &database(dir),
        Duration::from_secs(3600),
        SessionLimits::default(),
    )
    .unwrap()
}

fn revocation(i: usize) -> NewMessage {
    let did = format!(
        "did:cdi:registry.clawdentity.com:agent:{}",
        ulid::Ulid::from_parts(i as u64, 7)
    );
    let body = serde_json::json!({
        "id": format!("evt-{i}"), "type": "agent.auth.revoked", "version": "v1",
        "timestampUtc": "2026-11-24T10:00:00.000Z", "initiatedByAccountId": null,
        "data": {"reason": "agent_revoked", "metadata": {"agentDid": did}}
    });
    NewMessage {
        content_type: ContentType::Json,
        body: body.to_string().into_bytes(),
        delay_seconds: 0,
    }
}

async fn fill(queue: &SqliteQueue, n: usize) {
    let messages: Vec<NewMessage> = (0..n).map(revocation).collect();
    for chunk in messages.chunks(PUBLISH_BATCH) {
        queue.publish(EVENTS_QUEUE, chunk.to_vec()).await.unwrap();
    }
}

async fn wait_drained(queue: &SqliteQueue) {
    loop {
        let c = queue.counts(EVENTS_QUEUE).await.unwrap();
        if c.backlog + c.in_flight + c.delayed == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Messages/s taken and acked by a bare loop over the queue engine, no handler.
async fn engine_alone(n: usize, batch_size: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let queue = SqliteQueue::open(&database(dir.path())).unwrap();
    fill(&queue, n).await;
    let policy = RetryPolicy {
        max_retries: 3,
        dead_letter_queue: None,
    };
    let lane = Lane::of(EVENTS_QUEUE);
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let terms = BatchTerms {
            max_size: batch_size,
            max_timeout: Duration::ZERO,
            batches: 1,
            lease: Duration::from_secs(60),
            policy: policy.clone(),
        };
        let batch = queue.next_batch(&lane, &terms).await.unwrap();
        done += batch.len();
        let acks = batch.into_iter().map(|d| (d, Settlement::Ack)).collect();
        queue
            .settle(&lane, &policy, acks, SideEffects::None)
            .await
            .unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Mean time of [`QueueBackend::counts`] and [`QueueBackend::lanes`] of a queue holding
/// `backlog` ready messages (what `GET /v1/queues/{q}` and `/metrics` pay).
async fn gauges_at_backlog(backlog: usize) -> (Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let queue = SqliteQueue::open(&database(dir.path())).unwrap();
    fill(&queue, backlog).await;
    let rounds = 50;
    let started = Instant::now();
    for _ in 0..rounds {
        queue.counts(EVENTS_QUEUE).await.unwrap();
    }
    let counts = started.elapsed() / rounds;
    let started = Instant::now();
    for _ in 0..rounds {
        queue.lanes(EVENTS_QUEUE).await.unwrap();
    }
    (counts, started.elapsed() / rounds)
}

/// Messages/s through a real consumer running the CRL-invalidation component.
async fn end_to_end(
    runtime: &Arc<Runtime>,
    n: usize,
    batch_size: usize,
    concurrency: usize,
) -> f64 {
    fanned_out(runtime, n, batch_size, concurrency, None).await
}

/// Messages/s through the CRL-invalidation consumer of the events queue and, with
/// `second`, a second consumer (`audit`, the same component) subscribed with that filter.
async fn fanned_out(
    runtime: &Arc<Runtime>,
    n: usize,
    batch_size: usize,
    concurrency: usize,
    second: Option<Filter>,
) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let primary = ConsumerConfig {
        max_batch_size: batch_size,
        max_batch_timeout: Duration::ZERO,
        max_concurrency: concurrency,
        ..ConsumerConfig::default_for(EVENTS_QUEUE)
    };
    let mut configs = vec![primary.clone()];
    if let Some(filter) = second {
        configs.push(ConsumerConfig {
            name: "audit".into(),
            filter,
            ..primary
        });
    }
    let mut routes = Routes::default();
    for c in &configs {
        routes.add(&c.queue, &c.name, c.filter.clone());
    }
    let queue = Arc::new(
        SqliteQueue::open(&database(dir.path()))
            .unwrap()
            .with_routes(routes),
    );
    let caps = capabilities(dir.path());
    fill(&queue, n).await;
    let slots = Arc::new(
        HandlerSlots::open(
            dir.path(),
            &database(dir.path()),
            runtime.clone(),
            caps.clone(),
            &configs,
        )
        .await
        .unwrap(),
    );
    let backend: Arc<dyn QueueBackend> = queue.clone();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running: Vec<_> = configs
        .into_iter()
        .map(|c| {
            let consumer = Consumer::new(c, slots.clone(), backend.clone(), caps.clone());
            tokio::spawn(consumer.run(stop.clone()))
        })
        .collect();
    wait_drained(&queue).await;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.cancel();
    for consumer in running {
        consumer.await.unwrap();
    }
    let last = format!(
        "did:cdi:registry.clawdentity.com:agent:{}",
        ulid::Ulid::from_parts(n as u64 - 1, 7)
    );
    assert!(
        caps.trust.is_revoked(&last).await.unwrap(),
        "the last revocation landed"
    );
    rate
}

/// The bundled CRL-invalidation component, loaded with the default limits.
fn crl_component(runtime: &Runtime) -> LoadedHandler {
    runtime
        .load(
            "crl-invalidation",
            bundled::CRL_INVALIDATION,
            World::CrlInvalidation,
            Limits::default(),
        )
        .unwrap()
}

/// Mean time of one batch's fresh instance plus an empty `handle` call.
async fn per_batch_instance(runtime: &Runtime, rounds: u32) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let caps = capabilities(dir.path());
    let handler = crl_component(runtime);
    for _ in 0..100 {
        handler
            .handle(caps.clone(), EVENTS_QUEUE, &[])
            .await
            .unwrap();
    }
    let started = Instant::now();
    for _ in 0..rounds {
        handler
            .handle(caps.clone(), EVENTS_QUEUE, &[])
            .await
            .unwrap();
    }
    started.elapsed() / rounds
}

/// Compile/validate time of both bundled components, and the time from a deploy
/// returning to the first batch handled by the new version.
async fn swap(runtime: &Arc<Runtime>) {
    for (name, wasm, world) in [
        (
            "crl-invalidation",
            bundled::CRL_INVALIDATION,
            World::CrlInvalidation,
        ),
        (
            "receipt-router",
            bundled::RECEIPT_ROUTER,
            World::ReceiptRouter,
        ),
    ] {
        let rounds = 5;
        let started = Instant::now();
        for _ in 0..rounds {
            runtime.load(name, wasm, world, Limits::default()).unwrap();
        }
        println!(
            "compile + validate {name}: {:?}",
            started.elapsed() / rounds
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(SqliteQueue::open(&database(dir.path())).unwrap());
    let caps = capabilities(dir.path());
    let config = ConsumerConfig {
        max_batch_timeout: Duration::ZERO,
        ..ConsumerConfig::default_for(EVENTS_QUEUE)
    };
    let slots = Arc::new(
        HandlerSlots::open(
            dir.path(),
            &database(dir.path()),
            runtime.clone(),
            caps.clone(),
            [&config],
        )
        .await
        .unwrap(),
    );
    let backend: Arc<dyn QueueBackend> = queue.clone();
    let stop = CancellationToken::new();
    let running =
        tokio::spawn(Consumer::new(config, slots.clone(), backend, caps.clone()).run(stop.clone()));
    for round in 0..5u64 {
        // The same component under a new hash: a custom section at the end.
        let mut v2 = bundled::CRL_INVALIDATION.to_vec();
        v2.extend_from_slice(&[0, 3, 2, b'v', b'0' + round as u8]);
        let called = Instant::now();
        slots
            .deploy(EVENTS_QUEUE, Some("crl-v2"), v2, "bench")
            .await
            .unwrap();
        let returned = Instant::now();
        let message = revocation(1_000_000 + round as usize);
        queue.publish(EVENTS_QUEUE, vec![message]).await.unwrap();
        let did = format!(
            "did:cdi:registry.clawdentity.com:agent:{}",
            ulid::Ulid::from_parts(1_000_000 + round, 7)
        );
        while !caps.trust.is_revoked(&did).await.unwrap() {
            tokio::task::yield_now().await;
        }
        println!(
            "deploy call {:?}; first batch on the new version done {:?} after the call returned",
            returned - called,
            returned.elapsed()
        );
    }
    stop.cancel();
    running.await.unwrap();
}

/// The built `clawq serve` on loopback, with no config, on its own data directory;
/// killed when dropped.
struct ServeProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    async fn start() -> ServeProcess {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let listen = addr.to_string();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_clawq"))
            .args([
                "serve",
                "--insecure-no-auth",
                "--listen",
                &listen,
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting clawq serve");
        let host = ServeProcess {
            child,
            addr,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        while http.get(host.url("/healthz")).send().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        host
    }

    /// The URL of `path` on this host.
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The CPU time the process has used so far, user and system.
    fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // The fields after the command name (which is in parentheses); `utime` and
        // `stime` are the 14th and 15th of the line, in clock ticks.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let ticks: u64 = after_name
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|t| t.parse::<u64>().unwrap())
            .sum();
        // SAFETY: `sysconf` only reads a constant of the system.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Duration::from_secs_f64(ticks as f64 / per_second)
    }

    /// `VmRSS` and `VmHWM` of the process, in MB.
    fn memory(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| -> f64 {
            let kb: f64 = status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse().ok())
                .unwrap();
            kb / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The request bodies that publish `n` revocations from `producers` concurrent
/// producers, `per_request` messages a request (1: the single-message route's
/// `{"body": ...}`, else the batch route's `{"messages": [...]}`): one list per producer,
/// written before the clock starts so that the producers spend their CPU on HTTP alone
/// (they share the host's 2 cores).
fn request_bodies(n: usize, producers: usize, per_request: usize) -> Vec<Vec<Vec<u8>>> {
    (0..producers)
        .map(|p| {
            let mine = p * n / producers..(p + 1) * n / producers;
            mine.clone()
                .step_by(per_request)
                .map(|first| {
                    let bodies = (first..(first + per_request).min(mine.end))
                        .map(|i| [&b"{\"body\":"[..], &revocation(i).body, b"}"].concat());
                    match per_request {
                        1 => bodies.collect::<Vec<_>>().concat(),
                        _ => {
                            let joined = bodies.collect::<Vec<_>>().join(&b","[..]);
                            [&b"{\"messages\":["[..], &joined, b"]}"].concat()
                        }
                    }
                })
                .collect()
        })
        .collect()
}

/// Posts each producer's `requests` (see [`request_bodies`]) to `host`, the producers
/// concurrently, each on its own keep-alive HTTP/1.1 connection and each request after
/// the one before it was answered; `per_request` says which route. Returns once every
/// request is answered.
///
/// The producers use hyper's bare connection rather than a pooled client: they share the
/// host's 2 cores, and the lighter they are, the more of the cores the figure gives to
/// the host (as a load generator such as `wrk` would).
async fn publish_over_http(host: &ServeProcess, requests: Vec<Vec<Vec<u8>>>, per_request: usize) {
    let route = if per_request == 1 { "" } else { "/batch" };
    let path = format!("/v1/queues/{EVENTS_QUEUE}/messages{route}");
    let producers: Vec<_> = requests
        .into_iter()
        .map(|mine| {
            let (addr, path) = (host.addr, path.clone());
            let host_header = addr.to_string();
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                for body in mine {
                    let request = hyper::Request::post(&path)
                        .header(hyper::header::HOST, &host_header)
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        .unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    let status = response.status();
                    // Read the answer to its end so that the connection can carry the next.
                    let answer = http_body_util::BodyExt::collect(response.into_body())
                        .await
                        .unwrap();
                    assert!(status.is_success(), "{status}: {:?}", answer.to_bytes());
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
}

/// Waits until the events queue of `host` holds no message (polled every 20 ms).
async fn wait_handled(host: &ServeProcess) {
    let http = reqwest::Client::new();
    let status_url = host.url(&format!("/v1/queues/{EVENTS_QUEUE}"));
    loop {
        let status: serde_json::Value = http
            .get(&status_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let held: u64 = ["backlog", "in_flight", "delayed"]
            .iter()
            .map(|k| status[k].as_u64().unwrap())
            .sum();
        if held == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The host's resident memory idle, then after it handled `n` revocations published
/// over HTTP by 4 producers in batches of 100.
async fn host_memory(n: usize) {
    let host = ServeProcess::start().await;
    // Settled after its start (the component compiled, the first empty polls made).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle, idle_peak) = host.memory();
    let requests = request_bodies(n, 4, PUBLISH_BATCH);
    let started = Instant::now();
    publish_over_http(&host, requests, PUBLISH_BATCH).await;
    wait_handled(&host).await;
    let elapsed = started.elapsed();
    let (after, peak) = host.memory();
    println!(
        "clawq serve resident memory: idle {idle:.1} MB (peak {idle_peak:.1} MB); after \
         {n} revocations published and handled in {elapsed:?} ({:.0} msg/s): {after:.1} MB \
         (peak {peak:.1} MB)",
        n as f64 / elapsed.as_secs_f64()
    );
}

/// Which code runs the CRL handler's logic in the WASM-vs-native comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Logic {
    /// The bundled component, instantiated per batch.
    Wasm,
    /// The component's own logic (`crl_invalidation::handling`), compiled natively.
    Native,
}

/// The host's log levels, in the order of [`handling::Level`]'s.
const LEVELS: [Level; 3] = [Level::Info, Level::Warn, Level::Error];

/// The capability calls of the CRL handler's logic run natively: those of a batch of the
/// loaded component (the implementations its imports reach).
struct NativeImports<'a>(&'a mut NativeBatch);

impl Host for NativeImports<'_> {
    async fn revoke_agent(&mut self, did: &str) -> Result<(), StoreError> {
        let revoked = self.0.revoke_agent(did.to_owned()).await;
        revoked.map_err(|err| StoreError {
            transient: err.transient,
            message: err.message,
        })
    }

    async fn log(&mut self, level: handling::Level, line: &str) {
        self.0.log(LEVELS[level as usize], line.to_owned()).await;
    }
}

/// Runs `messages` through `logic` (the CRL component `handler`, or its logic natively
/// against the capabilities of a batch of it) over `caps`; returns whether every message
/// was acknowledged, and the batch's side effects, to commit with the acks.
async fn handled(
    logic: Logic,
    handler: &LoadedHandler,
    caps: Arc<Capabilities>,
    messages: &[Message],
) -> (bool, SideEffects) {
    if logic == Logic::Wasm {
        let handled = handler
            .call(caps, EVENTS_QUEUE, messages, None)
            .await
            .unwrap();
        let acked = handled.outcomes.iter().all(|o| matches!(o, Outcome::Ack));
        return (acked, handled.side_effects);
    }
    let mut batch = handler.native_batch(caps);
    let mut acked = true;
    for message in messages {
        let content_type = match message.content_type {
            WitContentType::Json => BodyContentType::Json,
            WitContentType::Text => BodyContentType::Text,
            WitContentType::Bytes => BodyContentType::Bytes,
        };
        let imports = &mut NativeImports(&mut batch);
        let outcome = handle(imports, &message.id, content_type, &message.body).await;
        acked &= outcome == handling::Outcome::Ack;
    }
    (acked, batch.side_effects().unwrap())
}

/// One side of the WASM-vs-native comparison: a queue loop (take a batch, run it through
/// `logic`, settle its acks) over a data directory of its own holding `n` revocations,
/// and the time it spent so far.
struct CrlQueueLoop {
    logic: Logic,
    queue: SqliteQueue,
    caps: Arc<Capabilities>,
    terms: BatchTerms,
    lane: Lane,
    /// How many revocations it was filled with.
    n: usize,
    /// How many are not done yet.
    left: usize,
    /// Time spent in the loop on each batch: taking, handling and settling it.
    in_loop: Vec<Duration>,
    /// The part of it spent in the handler (its commit of the batch's revocations
    /// included).
    in_handler: Vec<Duration>,
    _dir: tempfile::TempDir,
}

impl CrlQueueLoop {
    /// The loop of `logic` over `n` fresh revocations, in batches of `batch_size`.
    async fn new(logic: Logic, n: usize, batch_size: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let queue = SqliteQueue::open(&database(dir.path())).unwrap();
        fill(&queue, n).await;
        let terms = ConsumerConfig {
            max_batch_size: batch_size,
            max_batch_timeout: Duration::ZERO,
            ..ConsumerConfig::default_for(EVENTS_QUEUE)
        }
        .batch_terms();
        CrlQueueLoop {
            logic,
            caps: capabilities(dir.path()),
            queue,
            terms,
            lane: Lane::of(EVENTS_QUEUE),
            n,
            left: n,
            in_loop: Vec::new(),
            in_handler: Vec::new(),
            _dir: dir,
        }
    }

    /// Takes one batch, runs it through the loop's logic (the component `handler`, or
    /// its logic natively) and settles its acks; does nothing once every message is done.
    async fn step(&mut self, handler: &LoadedHandler) {
        if self.left == 0 {
            return;
        }
        let started = Instant::now();
        let mut batch = self
            .queue
            .next_batch(&self.lane, &self.terms)
            .await
            .unwrap();
        let messages: Vec<Message> = batch.iter_mut().map(to_message).collect();
        let handler_started = Instant::now();
        let (acked, side_effects) =
            handled(self.logic, handler, self.caps.clone(), &messages).await;
        self.in_handler.push(handler_started.elapsed());
        assert!(acked, "{:?}: every revocation is acked", self.logic);
        self.left -= batch.len();
        let acks = batch.into_iter().map(|d| (d, Settlement::Ack)).collect();
        let policy = &self.terms.policy;
        self.queue
            .settle(&self.lane, policy, acks, side_effects)
            .await
            .unwrap();
        self.in_loop.push(started.elapsed());
    }

    /// Runs every message of the loop through `handler`, then checks that the last
    /// revocation landed.
    async fn drain(&mut self, handler: &LoadedHandler) {
        while self.left > 0 {
            self.step(handler).await;
        }
        self.check_revoked().await;
    }

    /// Checks that the loop's last revocation landed in its trust store.
    async fn check_revoked(&self) {
        let last = format!(
            "did:cdi:registry.clawdentity.com:agent:{}",
            ulid::Ulid::from_parts(self.n as u64 - 1, 7)
        );
        let revoked = self.caps.trust.is_revoked(&last).await.unwrap();
        assert!(revoked, "{:?}: the last revocation landed", self.logic);
    }
}

/// Seconds: the sum of `times`, and the middle one.
fn sum_and_median(times: &[Duration]) -> (f64, f64) {
    let mut seconds: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    seconds.sort_by(f64::total_cmp);
    (seconds.iter().sum(), seconds[seconds.len() / 2])
}

/// The smallest, middle and largest of `values`, as `min/median/max`.
fn spread(mut values: Vec<f64>) -> String {
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    format!(
        "{:.2}/{median:.2}/{:.2}",
        values[0],
        values[values.len() - 1]
    )
}

/// The system's load averages over 1, 5 and 15 minutes.
fn load_average() -> String {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    loadavg
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// WASM vs native of the same CRL handler logic on the same queue loop, for each batch
/// size: `rounds` rounds, each running `n` revocations through the component and `n`
/// through its logic compiled natively, one batch of each in turn (so that both see the
/// same load); prints msg/s, handler µs per message and the ratio WASM/native of each
/// round and their spread.
async fn wasm_vs_native(runtime: &Runtime, n: usize, rounds: usize) {
    let handler = crl_component(runtime);
    // Warm-up, not counted: the first instances of the pool, the first pages of memory.
    for logic in [Logic::Wasm, Logic::Native] {
        CrlQueueLoop::new(logic, n.min(5_000), 10)
            .await
            .drain(&handler)
            .await;
    }
    println!(
        "WASM vs native, CRL handler, {n} messages a side a round, batches of the two sides \
         interleaved; load average {}",
        load_average()
    );
    for batch_size in [10, 100] {
        // Per round: WASM/native of the loop's msg/s, of a typical (the median) batch's
        // loop and handler time; handler µs/msg of a typical batch, and the difference.
        let mut figures: [Vec<f64>; 6] = Default::default();
        for round in 1..=rounds {
            let mut sides = [
                CrlQueueLoop::new(Logic::Wasm, n, batch_size).await,
                CrlQueueLoop::new(Logic::Native, n, batch_size).await,
            ];
            // One batch of each side in turn, which side goes first alternating.
            let mut first = round % 2;
            while sides.iter().any(|side| side.left > 0) {
                sides[first].step(&handler).await;
                sides[1 - first].step(&handler).await;
                first = 1 - first;
            }
            for side in &sides {
                side.check_revoked().await;
            }
            let [wasm, native] = sides.map(|side| {
                let (in_loop, typical_loop) = sum_and_median(&side.in_loop);
                let (in_handler, typical_handler) = sum_and_median(&side.in_handler);
                let per_message = 1e6 / batch_size as f64;
                [
                    n as f64 / in_loop,
                    in_handler * 1e6 / n as f64,
                    typical_loop,
                    typical_handler,
                    typical_handler * per_message,
                ]
            });
            let round_figures = [
                wasm[0] / native[0],
                native[2] / wasm[2],
                native[3] / wasm[3],
                wasm[4],
                native[4],
                wasm[4] - native[4],
            ];
            println!(
                "batch {batch_size:>3}, round {round}: WASM {:>6.0} msg/s (handler {:>5.1} µs/msg; \
                 a typical batch {:>5.1}) | native {:>6.0} msg/s (handler {:>5.1} µs/msg; a typical \
                 batch {:>5.1}) | WASM/native {:.2}, typical batch {:.2}, its handler alone {:.2}",
                wasm[0],
                wasm[1],
                wasm[4],
                native[0],
                native[1],
                native[4],
                round_figures[0],
                round_figures[1],
                round_figures[2],
            );
            for (all, figure) in figures.iter_mut().zip(round_figures) {
                all.push(figure);
            }
        }
        let [loops, typical, handlers, wasm, native, extra] = figures;
        println!(
            "batch {batch_size:>3}, min/median/max of {rounds} rounds: WASM/native msg/s {}; \
             typical batch {}, its handler time alone {}; handler µs/msg of a typical batch: \
             WASM {}, native {}, WASM costs {} more",
            spread(loops),
            spread(typical),
            spread(handlers),
            spread(wasm),
            spread(native),
            spread(extra)
        );
    }
    println!("load average {}", load_average());
}

/// What [`served`] measured.
struct Served {
    /// Messages published a second.
    published: f64,
    /// Messages handled a second (published until the queue is empty).
    handled: f64,
    /// The host's CPU time (user and system) per message, in µs, from the first publish
    /// until the queue is empty.
    host_cpu_micros: f64,
}

/// Publishes `n` messages to the real `clawq serve` from `producers` concurrent
/// producers, `per_request` messages a request, and waits until they are all handled.
async fn served(n: usize, producers: usize, per_request: usize) -> Served {
    let host = ServeProcess::start().await;
    let requests = request_bodies(n, producers, per_request);
    let (started, cpu_before) = (Instant::now(), host.cpu_time());
    publish_over_http(&host, requests, per_request).await;
    let published = started.elapsed();
    wait_handled(&host).await;
    let (handled, cpu) = (started.elapsed(), host.cpu_time() - cpu_before);
    let rate = |took: Duration| n as f64 / took.as_secs_f64();
    Served {
        published: rate(published),
        handled: rate(handled),
        host_cpu_micros: cpu.as_secs_f64() * 1e6 / n as f64,
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; a plain word selects sections.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let run = |section: &str| only.is_empty() || only.iter().any(|o| section.contains(o.as_str()));
    let n: usize = std::env::var("CLAWQ_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let runtime = Arc::new(Runtime::new().unwrap());

    if run("gauges") {
        let (counts, lanes) = gauges_at_backlog(100_000).await;
        println!("queue gauges at a 100k backlog: counts {counts:?}, lanes {lanes:?}");
    }

    if run("instance") {
        println!(
            "per-batch fresh instance + empty handle call: {:?}",
            per_batch_instance(&runtime, 20_000).await
        );
    }

    if run("deploy") {
        swap(&runtime).await;
    }

    if run("batch") {
        for (batch_size, concurrency) in [(10, 1), (10, 2), (100, 1)] {
            let alone = engine_alone(n, batch_size).await;
            let wasm = end_to_end(&runtime, n, batch_size, concurrency).await;
            println!(
                "batch {batch_size:>3}, concurrency {concurrency}: engine alone {alone:>8.0} msg/s | \
                 queue → CRL component → trust store {wasm:>8.0} msg/s | ratio {:.2}",
                wasm / alone
            );
        }
    }

    if run("rss") {
        let n = std::env::var("CLAWQ_BENCH_RSS_MESSAGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        host_memory(n).await;
    }

    if run("single") {
        // Side by side: concurrent single-message publishes (each its own request, sharing
        // the writer's group commits) and one producer of batches of 100.
        // `CLAWQ_BENCH_PRODUCERS` lists the producer counts (`1,16,64` unless set; empty:
        // the batches of 100 alone).
        let counts = std::env::var("CLAWQ_BENCH_PRODUCERS").unwrap_or_else(|_| "1,16,64".into());
        let batched = served(n, 1, PUBLISH_BATCH).await;
        println!(
            "HTTP publish → CRL component, 1 producer of batches of 100: published {:>7.0} \
             msg/s, handled {:>7.0} msg/s, host CPU {:.1} µs/msg",
            batched.published, batched.handled, batched.host_cpu_micros
        );
        for producers in counts.split(',').filter_map(|p| p.trim().parse().ok()) {
            let single = served(n, producers, 1).await;
            println!(
                "HTTP publish → CRL component, {producers:>2} producers of single messages: \
                 published {:>7.0} msg/s, handled {:>7.0} msg/s, host CPU {:.1} µs/msg | ratio \
                 published to batches of 100 {:.2}",
                single.published,
                single.handled,
                single.host_cpu_micros,
                single.published / batched.published
            );
        }
    }

    if run("subscribers") {
        let every: Filter = serde_json::from_value(serde_json::json!({})).unwrap();
        let none: Filter =
            serde_json::from_value(serde_json::json!({"type": "pair.accepted"})).unwrap();
        let one = fanned_out(&runtime, n, 10, 1, None).await;
        let filtered = fanned_out(&runtime, n, 10, 1, Some(none)).await;
        let both = fanned_out(&runtime, n, 10, 1, Some(every)).await;
        println!(
            "events queue, batch 10: CRL alone {one:>8.0} msg/s | + a subscriber its filter keeps \
             out {filtered:>8.0} msg/s (ratio {:.2}) | + a subscriber of every message {both:>8.0} \
             msg/s (ratio {:.2}, each message handled twice)",
            filtered / one,
            both / one
        );
    }

    if run("native") {
        let rounds = std::env::var("CLAWQ_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        wasm_vs_native(&runtime, n, rounds).await;
    }
}
