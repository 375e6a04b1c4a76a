//! The three systems under test, each started fresh on its own empty data directory
//! for one run: `clawq serve`, `nats-server -js` and a Worker in Miniflare.

use std::fmt::Display;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;

use crate::procs::{Server, free_port};
use crate::workload::{BATCH, BATCH_TIMEOUT, Measurement, POLL};

/// The most messages the Miniflare publisher lets be published and not yet acked.
const MINIFLARE_WINDOW: u64 = 5_000;

/// How long a server may take to come up.
const START_LIMIT: Duration = Duration::from_secs(60);

/// Where the programs under test are, and where runs keep their data.
pub struct Setup {
    /// The `clawq` release binary.
    pub clawq: PathBuf,
    /// Another `clawq` build, to compare with (`--clawq-before`).
    pub clawq_before: Option<PathBuf>,
    /// The `nats-server` binary.
    pub nats_server: PathBuf,
    /// The Node binary that runs Miniflare.
    pub node: PathBuf,
    /// `miniflare/host.mjs`: starts Miniflare with the bench Worker.
    pub miniflare_host: PathBuf,
    /// The directory each run's data directory and logs go under.
    pub work: PathBuf,
    /// The file every server's pid is appended to (for the shell's exit trap).
    pub pid_file: PathBuf,
    /// How long one run may take, from the first publish to the last ack.
    pub run_limit: Duration,
}

fn nats_err<E: Display>(e: E) -> anyhow::Error {
    anyhow!("{e}")
}

/// Measures one run: `publish` and `done` (which resolves once every message has been
/// acked) run together; the clock starts at the first publish, the server's CPU time is
/// read before and after.
async fn drive(
    server: &mut Server,
    n: usize,
    limit: Duration,
    publish: impl Future<Output = Result<()>>,
    done: impl Future<Output = Result<()>>,
) -> Result<Measurement> {
    server.check_alive()?;
    let before = server.cpu();
    let started = Instant::now();
    let publish = async {
        publish.await?;
        Ok::<_, anyhow::Error>(started.elapsed())
    };
    let (published_in, ()) = tokio::time::timeout(limit, async { tokio::try_join!(publish, done) })
        .await
        .map_err(|_| anyhow!("not done within {limit:?}"))??;
    let elapsed = started.elapsed();
    let after = server.cpu();
    let measurement = Measurement {
        rate: n as f64 / elapsed.as_secs_f64(),
        publish_rate: n as f64 / published_in.as_secs_f64(),
        cpu_per_message: (after.seconds - before.seconds) / n as f64,
        peak_rss: server.peak_rss(),
        detail: String::new(),
    };
    server.check_alive()?;
    Ok(measurement)
}

/// Polls `url` until it answers 200, the server staying alive, within [`START_LIMIT`].
async fn wait_http(server: &mut Server, http: &reqwest::Client, url: &str) -> Result<()> {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        server.check_alive()?;
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer within {START_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `count` every [`POLL`] until it reaches `n` (the caller bounds the time).
async fn poll_until(n: usize, mut count: impl AsyncFnMut() -> Result<u64>) -> Result<()> {
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if count().await? >= n as u64 {
            return Ok(());
        }
    }
}

/// A fresh, empty directory `work/<name>`.
fn fresh_dir(work: &Path, name: &str) -> Result<PathBuf> {
    let dir = work.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The JSON request bodies that publish `bodies` in batches of [`BATCH`], each message
/// wrapped as `wrap(body)`.
fn batch_requests(bodies: &[String], wrap: impl Fn(&str) -> String) -> Vec<String> {
    bodies
        .chunks(BATCH)
        .map(|chunk| {
            let messages: Vec<String> = chunk.iter().map(|b| wrap(b)).collect();
            format!("{{\"messages\":[{}]}}", messages.join(","))
        })
        .collect()
}

/// POSTs each request in turn (one batch in flight), failing on any answer but 2xx.
async fn post_all(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    requests: Vec<String>,
) -> Result<()> {
    for body in requests {
        let mut request = http
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await?;
        if !answer.status().is_success() {
            let status = answer.status();
            bail!(
                "{url}: {status}: {}",
                answer.text().await.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// `clawq serve` (the release binary `binary`, its config starting with `config_head`)
/// with the bundled CRL-invalidation handler consuming `clawdentity-events` in batches of
/// 100; the end seen from the trust store, then `GET /metrics`.
pub async fn clawq(
    setup: &Setup,
    binary: &Path,
    config_head: &str,
    run: &str,
    bodies: &[String],
) -> Result<Measurement> {
    let dir = fresh_dir(&setup.work, run)?;
    let port = free_port()?;
    let token = "peer-benchmark-admin-token-0123456789abcdef";
    let config = dir.join("clawq.toml");
    std::fs::write(
        &config,
        format!(
            "{config_head}[[queues.consumers]]\nqueue = \"clawdentity-events\"\nmax_batch_size = {BATCH}\n\
             max_batch_timeout = {}\n",
            BATCH_TIMEOUT.as_secs_f64()
        ),
    )?;
    let mut command = Command::new(binary);
    command
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--config")
        .arg(&config)
        .env("CLAWQ_ADMIN_TOKEN", token);
    let mut server = Server::spawn(
        "clawq serve",
        command,
        &dir.join("server.log"),
        &setup.pid_file,
    )?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_http(&mut server, &http, &format!("{base}/healthz")).await?;

    let requests = batch_requests(bodies, |b| {
        format!("{{\"body\":{b},\"content_type\":\"json\"}}")
    });
    let publish_url = format!("{base}/v1/queues/clawdentity-events/messages/batch");
    let metrics_url = format!("{base}/metrics");
    let n = bodies.len();
    let publish = post_all(&http, &publish_url, Some(token), requests);
    // The end, seen cheaply: every GET /metrics counts each queue's messages (a scan of
    // the whole backlog, on the queue's connection), so it is read only once the last
    // message's agent is revoked (a point lookup in the trust store). With one batch at
    // a time in publish order, every message is handled by then; the acked counter says
    // when the last outcomes are committed.
    let last: serde_json::Value = serde_json::from_str(&bodies[n - 1])?;
    let last_did = last["data"]["metadata"]["agentDid"]
        .as_str()
        .context("no agentDid in the last message")?;
    let trust_url = format!("{base}/v1/trust/agents/{last_did}");
    let done = async {
        poll_until(1, async || {
            let answer: serde_json::Value = http
                .get(&trust_url)
                .bearer_auth(token)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            Ok(u64::from(answer["revoked"] == true))
        })
        .await?;
        loop {
            let text = http
                .get(&metrics_url)
                .bearer_auth(token)
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            if acked_in_metrics(&text, "clawdentity-events")? >= n as u64 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let mut m = drive(&mut server, n, setup.run_limit, publish, done).await?;

    // Not measured: how much of the run the CRL handler's batches took.
    let text = http
        .get(&metrics_url)
        .bearer_auth(token)
        .send()
        .await?
        .text()
        .await?;
    let events = "consumer=\"clawdentity-events\"";
    let batches = series(&text, "clawq_handler_batch_duration_seconds_count", events);
    let handled = series(&text, "clawq_handler_batch_duration_seconds_sum", events);
    if let (Some(batches), Some(handled)) = (batches, handled) {
        let run = n as f64 / m.rate;
        m.detail = format!(
            "{batches:.0} batches, handler {:.2} ms a batch, {:.0} % of the run",
            handled / batches * 1e3,
            handled / run * 100.0
        );
    }
    server.stop(Duration::from_secs(30));
    Ok(m)
}

/// The value of the first series `name{...}` whose labels include `label`.
fn series(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
}

/// `clawq_messages_acked_total{queue="<queue>"}` in Prometheus text.
fn acked_in_metrics(text: &str, queue: &str) -> Result<u64> {
    series(
        text,
        "clawq_messages_acked_total",
        &format!("queue=\"{queue}\""),
    )
    .map(|v| v as u64)
    .ok_or_else(|| anyhow!("no clawq_messages_acked_total for {queue} in /metrics"))
}

/// `nats-server -js` (file storage, default sync) with a WorkQueue stream and one
/// durable pull consumer: fetches of 100, each message acked; PubAcks awaited per batch.
pub async fn nats(setup: &Setup, run: &str, bodies: &[String]) -> Result<Measurement> {
    let dir = fresh_dir(&setup.work, run)?;
    let port = free_port()?;
    let mut command = Command::new(&setup.nats_server);
    command
        .arg("-js")
        .arg("-sd")
        .arg(dir.join("store"))
        .arg("-a")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string());
    let mut server = Server::spawn(
        "nats-server",
        command,
        &dir.join("server.log"),
        &setup.pid_file,
    )?;
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + START_LIMIT;
    let consumer_client = loop {
        server.check_alive()?;
        match async_nats::connect(&url).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => bail!("{url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let publisher_client = async_nats::connect(&url).await?;
    let js = async_nats::jetstream::new(consumer_client.clone());
    use async_nats::jetstream::{consumer, stream};
    let events = js
        .create_stream(stream::Config {
            name: "EVENTS".into(),
            subjects: vec!["events".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let crl: consumer::PullConsumer = events
        .create_consumer(consumer::pull::Config {
            durable_name: Some("crl".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .map_err(nats_err)?;
    let publisher = async_nats::jetstream::new(publisher_client);
    let payloads: Vec<bytes::Bytes> = bodies.iter().map(|b| b.clone().into()).collect();
    let n = bodies.len();

    let publish = async {
        for chunk in payloads.chunks(BATCH) {
            let mut acks = Vec::with_capacity(chunk.len());
            for payload in chunk {
                acks.push(
                    publisher
                        .publish("events", payload.clone())
                        .await
                        .map_err(nats_err)?,
                );
            }
            for ack in acks {
                ack.await.map_err(nats_err)?;
            }
        }
        Ok(())
    };
    let acked = Arc::new(AtomicU64::new(0));
    let done = async {
        while acked.load(Ordering::Relaxed) < n as u64 {
            let mut batch = crl
                .batch()
                .max_messages(BATCH)
                .expires(BATCH_TIMEOUT)
                .messages()
                .await
                .map_err(nats_err)?;
            while let Some(message) = batch.next().await {
                let message = message.map_err(nats_err)?;
                message.ack().await.map_err(nats_err)?;
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }
        // ack() only queues the ack: the run is done once the server has them all.
        consumer_client.flush().await.map_err(nats_err)?;
        Ok(())
    };
    let m = drive(&mut server, n, setup.run_limit, publish, done).await?;

    // Not measured: the stream must be empty now (a WorkQueue deletes what is acked).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = events;
    loop {
        let left = events.info().await.map_err(nats_err)?.state.messages;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{left} messages still in the stream after every ack");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop(Duration::from_secs(30));
    Ok(m)
}

/// A Worker in Miniflare (workerd) with a queue producer binding, fed by `sendBatch`
/// through a fetch route, and a consumer of batches of 100 acking each message; acks
/// counted by the Worker and read from its `/stats` route.
pub async fn miniflare(setup: &Setup, run: &str, bodies: &[String]) -> Result<Measurement> {
    let dir = fresh_dir(&setup.work, run)?;
    let port = free_port()?;
    let mut command = Command::new(&setup.node);
    command
        .arg(&setup.miniflare_host)
        .arg(port.to_string())
        .arg(dir.join("persist"))
        .arg(BATCH.to_string())
        .arg(BATCH_TIMEOUT.as_secs_f64().to_string());
    let mut server = Server::spawn(
        "miniflare",
        command,
        &dir.join("server.log"),
        &setup.pid_file,
    )?;
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_http(&mut server, &http, &format!("{base}/stats")).await?;

    let requests = batch_requests(bodies, |b| b.to_owned());
    let publish_url = format!("{base}/publish");
    let stats_url = format!("{base}/stats");
    let n = bodies.len();
    let acked = async || -> Result<u64> {
        let stats: serde_json::Value = http
            .get(&stats_url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        stats["acked"]
            .as_u64()
            .context("no `acked` in the Worker's /stats")
    };
    let publish = async {
        let mut published = 0u64;
        for body in requests {
            let answer = http
                .post(&publish_url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            if !answer.status().is_success() {
                let status = answer.status();
                bail!(
                    "{publish_url}: {status}: {}",
                    answer.text().await.unwrap_or_default()
                );
            }
            let sent: serde_json::Value = answer.json().await?;
            published += BATCH as u64;
            // Miniflare's broker holds a timer per message until it is queued, and workerd
            // allows 10,000 timers: keep at most MINIFLARE_WINDOW messages unacked.
            let mut acked_now = sent["acked"].as_u64().context("no `acked` in /publish")?;
            while published - acked_now > MINIFLARE_WINDOW {
                tokio::time::sleep(Duration::from_millis(10)).await;
                acked_now = acked().await?;
            }
        }
        Ok(())
    };
    let done = poll_until(n, acked);
    let m = drive(&mut server, n, setup.run_limit, publish, done).await;
    server.stop(Duration::from_secs(30));
    m
}
