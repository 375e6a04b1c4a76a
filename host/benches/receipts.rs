//! Receipt-path benchmark (not a test): publish over HTTP → receipt-router component →
//! relay session → connector WebSocket frame, against an in-process host on loopback.
//!
//! Prints the publish→frame latency p50/p99 at a steady 1,000 receipts/s to one agent,
//! and the most receipts/s routed to 1,000 connected agents. Run with
//! `cargo bench -p clawq --bench receipts`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawq::agents::AgentRegistry;
use clawq::config::Config;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use tokio_util::sync::CancellationToken;

const RECEIPTS: &str = "clawdentity-receipts";
const RECIPIENT: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
/// The host's admin token, which publishing takes.
const ADMIN_TOKEN: &str = "bench-admin-token-bench-admin-token";

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
async fn start_host(
    dir: &std::path::Path,
    agents: usize,
    stop: CancellationToken,
) -> (String, Vec<String>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = Config::parse(&format!(
        "admin_token = \"{ADMIN_TOKEN}\"\n[[queues.consumers]]\nqueue = \"clawdentity-receipts\"\nmax_batch_size = 100\nmax_batch_timeout = 0.001\nmax_concurrency = 2\n",
    ))
    .unwrap();
    config.listen = format!("127.0.0.1:{port}").parse().unwrap();
    config.data_dir = dir.to_owned();
    std::fs::create_dir_all(dir).unwrap();
    let db = clawq::store::Database::open(dir, clawq::store::Durability::Process).unwrap();
    let registry = AgentRegistry::open(&db).unwrap();
    let tokens = (0..agents)
        .map(|i| registry.add(&agent(i)).unwrap())
        .collect();
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
) {
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
    tokio::spawn(async move {
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
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency_at_steady_rate(base: &str, token: &str) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    connector(base, 0, token, tx).await;
    let http = reqwest::Client::new();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let count = 5_000;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let url = format!("{base}/v1/queues/{RECEIPTS}/messages");
    for n in 0..count {
        tick.tick().await;
        let (http, url, sent) = (http.clone(), url.clone(), sent.clone());
        tokio::spawn(async move {
            let id = format!("lat-{n}");
            sent.lock().await.insert(id.clone(), Instant::now());
            http.post(url)
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"body": receipt(&id, &agent(0))}))
                .send()
                .await
                .unwrap();
        });
    }
    let mut latencies = Vec::with_capacity(count);
    while latencies.len() < count {
        let (id, at) = rx.recv().await.unwrap();
        latencies.push(at - sent.lock().await[&id]);
    }
    latencies.sort();
    println!(
        "publish → connector frame at 1,000 receipts/s ({count} receipts): p50 {:?}, p99 {:?}, max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[count - 1]
    );
}

async fn throughput_to_many_agents(base: &str, tokens: &[String]) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (i, token) in tokens.iter().enumerate() {
        connector(base, i, token, tx.clone()).await;
    }
    let http = reqwest::Client::new();
    let total = 50_000;
    let url = format!("{base}/v1/queues/{RECEIPTS}/messages/batch");
    let started = Instant::now();
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let (http, url) = (http.clone(), url.clone());
            let agents = tokens.len();
            tokio::spawn(async move {
                for chunk in (p * total / 4..(p + 1) * total / 4)
                    .collect::<Vec<_>>()
                    .chunks(100)
                {
                    let messages: Vec<Value> = chunk
                        .iter()
                        .map(|n| json!({"body": receipt(&format!("tp-{n}"), &agent(n % agents))}))
                        .collect();
                    let response = http
                        .post(&url)
                        .bearer_auth(ADMIN_TOKEN)
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

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (base, tokens) = start_host(dir.path(), 1_000, stop.clone()).await;
    latency_at_steady_rate(&base, &tokens[0]).await;
    throughput_to_many_agents(&base, &tokens).await;
    stop.cancel();
}
