//! Receipt-path benchmark (not a test): publish over HTTP → receipt-router component →
//! relay session → connector WebSocket frame, against an in-process host on loopback;
//! then on to the agent's hook through the real connector (the built `clawq connect`, a
//! process of its own) and a hook server on loopback that records when each POST
//! arrives.
//!
//! Prints the publish→frame latency p50/p99 at a steady 1,000 receipts/s to one agent;
//! the most receipts/s routed to 1,000 connected agents; the publish→hook POST latency
//! p50/p99 at a steady 1,000 receipts/s for 10 s through one connector; and the most
//! receipts/s through one connector, fed by the host (publish → hook POST); then the
//! connector alone, fed by a stand-in host: frame pushed → hook POST p50/p99 at 1,000
//! receipts/s for 10 s, and the most receipts/s when frames are pushed as fast as the
//! connector acknowledges them. Run with `cargo bench -p clawq --bench receipts`; a word
//! after `--` runs only the sections whose name contains it (`frame`, `agents`,
//! `hook-via-host`, `hook-alone`; `hook` for both of the last two).
//!
//! A session keeps every receipt of these runs (`max_receipts_per_agent = 1000000`);
//! `CLAWQ_BENCH_RECEIPT_CAP` sets another cap (e.g. the default, 500).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawq::agents::AgentRegistry;
use clawq::config::Config;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use tokio_util::sync::CancellationToken;

const RECEIPTS: &str = "clawdentity-receipts";
const RECIPIENT: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";

/// Publishes receipts `0..total` (the body of each made by `body`) to the batch route
/// `url` from 4 concurrent producers, in batches of 100; returns once all are accepted.
async fn publish_from_four(
    http: &reqwest::Client,
    url: &str,
    total: usize,
    body: impl Fn(usize) -> Value + Clone + Send + 'static,
) {
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let (http, url, body) = (http.clone(), url.to_owned(), body.clone());
            tokio::spawn(async move {
                for chunk in (p * total / 4..(p + 1) * total / 4)
                    .collect::<Vec<_>>()
                    .chunks(100)
                {
                    let messages: Vec<Value> =
                        chunk.iter().map(|&n| json!({"body": body(n)})).collect();
                    let response = http
                        .post(&url)
                        .json(&json!({"messages": messages}))
                        .send()
                        .await
                        .unwrap();
                    assert!(response.status().is_success());
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
}

/// Publishes `count` receipts for agent 0, one a millisecond, each alone to `url`, with
/// request ids `<prefix>-<n>`; returns when each was sent, by request id.
async fn publish_at_steady_rate(
    http: &reqwest::Client,
    url: &str,
    count: usize,
    prefix: &str,
) -> Arc<Mutex<HashMap<String, Instant>>> {
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for n in 0..count {
        tick.tick().await;
        let (http, url, sent) = (http.clone(), url.to_owned(), sent.clone());
        let id = format!("{prefix}-{n}");
        tokio::spawn(async move {
            sent.lock().await.insert(id.clone(), Instant::now());
            http.post(url)
                .json(&json!({"body": receipt(&id, &agent(0))}))
                .send()
                .await
                .unwrap();
        });
    }
    sent
}

fn agent(i: usize) -> String {
    format!(
        "did:cdi:registry.clawdentity.com:agent:{}",
        ulid::Ulid::from_parts(i as u64, 1)
    )
}

fn receipt(id: &str, sender: &str) -> Value {
    json!({"type": "delivery_receipt", "requestId": id, "senderAgentDid": sender,
           "recipientAgentDid": RECIPIENT, "status": "delivered_to_webhook"})
}

/// Starts a host with `agents` registered; returns its base URL and their tokens.
async fn start_host(dir: &Path, agents: usize, stop: CancellationToken) -> (String, Vec<String>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // By default a session keeps every receipt of the runs below (one agent gets tens of
    // thousands).
    let cap: usize = std::env::var("CLAWQ_BENCH_RECEIPT_CAP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // Batches of the receipts queue handled at once (2 unless `CLAWQ_BENCH_RECEIPT_CONCURRENCY`
    // says otherwise).
    let concurrency: usize = std::env::var("CLAWQ_BENCH_RECEIPT_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    println!("max_receipts_per_agent = {cap}, max_concurrency = {concurrency}");
    let mut config = Config::parse(&format!(
        "[[queues.consumers]]\nqueue = \"clawdentity-receipts\"\nmax_batch_size = 100\nmax_batch_timeout = 0.001\nmax_concurrency = {concurrency}\n\
         [relay]\nmax_receipts_per_agent = {cap}\n",
    ))
    .unwrap();
    config.listen = format!("127.0.0.1:{port}").parse().unwrap();
    config.data_dir = dir.to_owned();
    // The producers below publish without a token (loopback only).
    config.insecure_no_auth = true;
    std::fs::create_dir_all(dir).unwrap();
    let db = clawq::store::Database::open(dir, clawq::store::Durability::Process).unwrap();
    let registry = AgentRegistry::open(&db).unwrap();
    let mut tokens = Vec::with_capacity(agents);
    for i in 0..agents {
        tokens.push(registry.add(&agent(i)).await.unwrap());
    }
    tokio::spawn(clawq::server::serve(config, stop));
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (base, tokens)
}

/// Connects agent `i` and forwards (requestId, arrival) of each receipt frame, acking it.
async fn connector(
    base: &str,
    i: usize,
    token: &str,
    seen: mpsc::UnboundedSender<(String, Instant)>,
) -> Connected {
    let url = format!(
        "{}/v1/relay/connect?agent={}",
        base.replace("http://", "ws://"),
        agent(i)
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let (mut sink, mut stream) = socket.split();
    let reading = tokio::spawn(async move {
        while let Some(Ok(tungstenite::Message::Text(text))) = stream.next().await {
            let at = Instant::now();
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == "receipt" {
                let _ = seen.send((frame["originalFrameId"].as_str().unwrap().to_owned(), at));
                let ack = json!({"v": 1, "type": "receipt_ack", "id": ulid::Ulid::new().to_string(),
                                 "ts": "2026-11-25T10:00:00.000Z", "ackId": frame["id"]});
                if sink
                    .send(tungstenite::Message::Text(ack.to_string().into()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    Connected(reading.abort_handle())
}

/// A stand-in connector's connection, closed when dropped: a later section's connector
/// for the same agent gets its frames then.
struct Connected(tokio::task::AbortHandle);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// CPU time spent so far by this process's threads named `name` (from
/// `/proc/self/task/*/schedstat`, in ns).
fn thread_cpu(name: &str) -> Duration {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            total += stat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(total)
}

/// CPU time (user and system) spent so far by process `pid` (`self` for this one), from
/// `/proc/<pid>/stat`.
fn process_cpu(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces), from the 3rd on.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields
        .get(11..13)
        .unwrap_or_default()
        .iter()
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    // Clock ticks of 10 ms (USER_HZ is 100 on Linux).
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency_at_steady_rate(base: &str, token: &str) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _connected = connector(base, 0, token, tx).await;
    let http = reqwest::Client::new();
    let count = 5_000;
    let url = format!("{base}/v1/queues/{RECEIPTS}/messages");
    let writer_before = thread_cpu("clawq-db-writer");
    let sent = publish_at_steady_rate(&http, &url, count, "lat").await;
    let mut latencies = Vec::with_capacity(count);
    while latencies.len() < count {
        let (id, at) = rx.recv().await.unwrap();
        latencies.push(at - sent.lock().await[&id]);
    }
    let writer = thread_cpu("clawq-db-writer") - writer_before;
    latencies.sort();
    println!(
        "publish → connector frame at 1,000 receipts/s ({count} receipts): p50 {:?}, p99 {:?}, max {:?}; \
         database writer thread CPU {:?} per receipt",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[count - 1],
        writer / count as u32
    );
}

async fn throughput_to_many_agents(base: &str, tokens: &[String]) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut connected = Vec::with_capacity(tokens.len());
    for (i, token) in tokens.iter().enumerate() {
        connected.push(connector(base, i, token, tx.clone()).await);
    }
    let http = reqwest::Client::new();
    let total = 50_000;
    let url = format!("{base}/v1/queues/{RECEIPTS}/messages/batch");
    let started = Instant::now();
    let agents = tokens.len();
    publish_from_four(&http, &url, total, move |n| {
        receipt(&format!("tp-{n}"), &agent(n % agents))
    })
    .await;
    let published = started.elapsed();
    let mut received = 0;
    while received < total {
        rx.recv().await.unwrap();
        received += 1;
    }
    let elapsed = started.elapsed();
    println!(
        "{total} receipts to {} connected agents: published in {published:?}, all frames in {elapsed:?}: {:.0} receipts/s routed",
        tokens.len(),
        total as f64 / elapsed.as_secs_f64()
    );
}

/// A hook on loopback that answers 200 and reports (`x-request-id`, arrival) of each POST.
async fn start_hook() -> (String, mpsc::UnboundedReceiver<(String, Instant)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hooks/message",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let at = Instant::now();
            let id = headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let _ = tx.send((id, at));
            async { axum::http::StatusCode::OK }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/message", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, app).into_future());
    (url, rx)
}

/// Starts the built `clawq connect` for agent `i` against `server`, posting to `hook`, its
/// outbox and its log (`connector.log`) in `dir`; killed when dropped.
struct ConnectorProcess(Child);

impl ConnectorProcess {
    fn start(server: &str, i: usize, token: &str, hook: &str, dir: &Path) -> ConnectorProcess {
        std::fs::create_dir_all(dir).unwrap();
        let log = std::fs::File::create(dir.join("connector.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_clawq"))
            .args([
                "connect",
                "--server",
                server,
                "--agent",
                &agent(i),
                "--hook",
                hook,
            ])
            .arg("--data-dir")
            .arg(dir.join("outbox"))
            .env("CLAWQ_AGENT_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting clawq connect");
        ConnectorProcess(child)
    }
}

impl Drop for ConnectorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `count` hook POSTs (at most `within`), returning the arrival of each id.
async fn hook_arrivals(
    hook: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    count: usize,
    within: Duration,
) -> HashMap<String, Instant> {
    let deadline = tokio::time::Instant::now() + within;
    let mut arrived = HashMap::with_capacity(count);
    while arrived.len() < count {
        match tokio::time::timeout_at(deadline, hook.recv()).await {
            Ok(Some((id, at))) => {
                arrived.entry(id).or_insert(at);
            }
            _ => break,
        }
    }
    arrived
}

/// Publish → hook POST through one connector at a steady 1,000 receipts/s for 10 s.
async fn hook_latency_at_steady_rate(base: &str, token: &str, dir: &Path) {
    let (hook_url, mut hook) = start_hook().await;
    let _connector = ConnectorProcess::start(base, 0, token, &hook_url, dir);
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/queues/{RECEIPTS}/messages");
    // Once connected (a first receipt made it to the hook), the measured run.
    let response = http
        .post(&url)
        .json(&json!({"body": receipt("hook-warmup", &agent(0))}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let warmed_up = hook_arrivals(&mut hook, 1, Duration::from_secs(30)).await;
    assert_eq!(
        warmed_up.len(),
        1,
        "the connector delivers; its log:\n{}",
        std::fs::read_to_string(dir.join("connector.log")).unwrap_or_default()
    );
    let count = 10_000;
    let started = Instant::now();
    let sent = publish_at_steady_rate(&http, &url, count, "hook-lat").await;
    let published = started.elapsed();
    let arrived = hook_arrivals(&mut hook, count, Duration::from_secs(120)).await;
    let sent = sent.lock().await;
    let mut latencies: Vec<Duration> = arrived
        .iter()
        .filter_map(|(id, at)| Some(at.saturating_duration_since(*sent.get(id)?)))
        .collect();
    latencies.sort();
    let last = arrived.values().max().copied().unwrap_or(started);
    println!(
        "publish → hook POST through one connector at 1,000 receipts/s ({count} receipts published in {published:?}): \
         {} reached the hook in {:?} ({:.0}/s): p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        last - started,
        latencies.len() as f64 / (last - started).as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );
}

/// The most receipts/s through one connector, published as fast as the host takes them.
async fn hook_throughput_through_the_host(base: &str, token: &str, dir: &Path) {
    let (hook_url, mut hook) = start_hook().await;
    let connector = ConnectorProcess::start(base, 1, token, &hook_url, dir);
    let connector_pid = connector.0.id().to_string();
    let http = reqwest::Client::new();
    let total = 20_000;
    let url = format!("{base}/v1/queues/{RECEIPTS}/messages/batch");
    let (host_before, connector_before) = (process_cpu("self"), process_cpu(&connector_pid));
    let started = Instant::now();
    publish_from_four(&http, &url, total, |n| {
        receipt(&format!("hook-tp-{n}"), &agent(1))
    })
    .await;
    let published = started.elapsed();
    let arrived = hook_arrivals(&mut hook, total, Duration::from_secs(180)).await;
    let last = arrived.values().max().copied().unwrap_or(started);
    let host_cpu = process_cpu("self") - host_before;
    let connector_cpu = process_cpu(&connector_pid) - connector_before;
    println!(
        "{total} receipts published for one agent as fast as the host takes them (in {published:?}): \
         {} reached its connector's hook in {:?}: {:.0} receipts/s through one connector; CPU per receipt: \
         the connector {:.0} µs, this process (the host, the producers and the hook) {:.0} µs",
        arrived.len(),
        last - started,
        arrived.len() as f64 / (last - started).as_secs_f64(),
        connector_cpu.as_secs_f64() * 1e6 / total as f64,
        host_cpu.as_secs_f64() * 1e6 / total as f64,
    );
}

/// When each receipt frame was pushed, by its `originalFrameId`.
type Pushed = Arc<std::sync::Mutex<HashMap<String, Instant>>>;

/// A stand-in for the host: accepts one connector and pushes `total` receipt frames, one
/// per `every` tick (or as fast as it can), keeping at most `window` of them
/// unacknowledged, and noting in `pushed` when each went out; returns when the
/// connector is gone.
async fn push_receipts(
    listener: tokio::net::TcpListener,
    total: usize,
    window: usize,
    every: Option<Duration>,
    pushed: Pushed,
) {
    use clawq::frame::{Frame, FrameBody, ReceiptStatus};
    let (stream, _) = listener.accept().await.unwrap();
    let socket = tokio_tungstenite::accept_async(stream).await.unwrap();
    let (mut sink, mut stream) = socket.split();
    let room = Arc::new(Semaphore::new(window));
    let acks = room.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            if let tungstenite::Message::Text(text) = message
                && let Ok(frame) = Frame::parse(&text)
                && matches!(frame.body, FrameBody::ReceiptAck { .. })
            {
                acks.add_permits(1);
            }
        }
    });
    let mut tick = every.map(tokio::time::interval);
    for n in 0..total {
        if let Some(tick) = &mut tick {
            tick.tick().await;
        }
        room.acquire().await.unwrap().forget();
        let id = format!("direct-{n}");
        let frame = Frame::new(FrameBody::Receipt {
            original_frame_id: id.clone(),
            to_agent_did: RECIPIENT.into(),
            status: ReceiptStatus::DeliveredToWebhook,
            reason: None,
        });
        pushed.lock().unwrap().insert(id, Instant::now());
        if sink
            .send(tungstenite::Message::Text(frame.to_json().into()))
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = reader.await;
}

/// The connector alone, fed by a stand-in host: frame pushed → hook POST p50/p99 at a
/// steady 1,000 receipts/s for 10 s, then the most receipts/s when the stand-in pushes
/// frames as fast as the connector acknowledges them (at most 1,000 unacknowledged).
async fn hook_path_of_the_connector_alone(dir: &Path) {
    for (run, total, every) in [
        ("steady", 10_000, Some(Duration::from_millis(1))),
        ("flood", 30_000, None),
    ] {
        let (hook_url, mut hook) = start_hook().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        let pushed: Pushed = Arc::default();
        tokio::spawn(push_receipts(listener, total, 1_000, every, pushed.clone()));
        let _connector =
            ConnectorProcess::start(&server, 2, "bench-token", &hook_url, &dir.join(run));
        let arrived = hook_arrivals(&mut hook, total, Duration::from_secs(180)).await;
        let pushed = pushed.lock().unwrap();
        let first = pushed.values().min().copied().unwrap_or_else(Instant::now);
        let last = arrived.values().max().copied().unwrap_or(first);
        let rate = arrived.len() as f64 / (last - first).as_secs_f64();
        if every.is_some() {
            let mut latencies: Vec<Duration> = arrived
                .iter()
                .filter_map(|(id, at)| Some(at.saturating_duration_since(*pushed.get(id)?)))
                .collect();
            latencies.sort();
            println!(
                "frame pushed → hook POST, the connector alone at 1,000 receipts/s ({total} frames): {} reached \
                 the hook in {:?} ({rate:.0}/s): p50 {:?}, p99 {:?}, max {:?}",
                arrived.len(),
                last - first,
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99),
                latencies.last().unwrap()
            );
        } else {
            println!(
                "{total} receipt frames pushed to one connector as fast as it acknowledges them: {} reached the \
                 hook in {:?}: {rate:.0} receipts/s",
                arrived.len(),
                last - first,
            );
        }
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
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (base, tokens) = start_host(&dir.path().join("host"), 1_000, stop.clone()).await;
    if run("frame") {
        latency_at_steady_rate(&base, &tokens[0]).await;
    }
    if run("agents") {
        throughput_to_many_agents(&base, &tokens).await;
    }
    if run("hook-via-host") {
        hook_latency_at_steady_rate(&base, &tokens[0], &dir.path().join("connector-0")).await;
        hook_throughput_through_the_host(&base, &tokens[1], &dir.path().join("connector-1")).await;
    }
    if run("hook-alone") {
        hook_path_of_the_connector_alone(&dir.path().join("connector-2")).await;
    }
    stop.cancel();
}
