//! The connector (`clawq connect`, spec sections 4 and 5): the agent-side process that
//! holds the agent's WebSocket to the host's `GET /v1/relay/connect` and hands each
//! delivery receipt and each delivery to the agent's local webhook.
//!
//! A `receipt` or `deliver` frame is stored in a durable outbox (`outbox`, SQLite) before
//! it is acknowledged to the host (`receipt_ack`, `deliver_ack` with `accepted: true`); a
//! delivery task (`hook`) drains the outbox into the webhook independently of the
//! WebSocket, with up to `--hook-concurrency` requests in flight, retrying with backoff,
//! so it survives a down hook, a lost connection and a restart of the connector. A frame
//! pushed again is acknowledged again, never stored twice; a `deliver` frame for another
//! agent is refused (`accepted: false`, with a reason); a frame that cannot be stored is
//! not acknowledged (the host pushes it again).
//!
//! Frames that arrive together (those already read from the connection when one is
//! handled, up to [`MAX_BATCH_FRAMES`] or [`MAX_BATCH_BYTES`]) are stored in one
//! transaction, then acknowledged together, in the order they came.
//!
//! The connection is kept with heartbeats (answered, and sent every 30 s; 60 s of silence
//! from the host drops it) and re-established with backoff (1 s doubling to 30 s, ±20%).
//! A refusal with HTTP 401 ends the connector with an error naming the host's reason
//! (unknown agent or wrong token, or agent revoked), and so does a host TLS certificate
//! that does not verify (against the webpki roots and `--ca-cert`): retrying cannot fix
//! either. Every other failure is retried. A
//! close `1000 superseded_by_new_connection` (another connector took over) ends it with
//! `Ok`, as does the shutdown token.

mod hook;
mod outbox;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header::AUTHORIZATION};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::dir_lock::DirLock;
use crate::frame::{Frame, FrameBody, MAX_FRAME_BYTES};
use outbox::Outbox;

/// The host a connector talks to unless told otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8787";
/// The agent's local webhook (OpenClaw) unless told otherwise.
pub const DEFAULT_HOOK_URL: &str = "http://127.0.0.1:18789/hooks/message";
/// The host's endpoint path for connectors.
pub const CONNECT_PATH: &str = crate::frame::CONNECT_PATH;
/// The close reason (with code 1000) of a connection superseded by a newer one.
pub const SUPERSEDED_REASON: &str = crate::relay::hub::SUPERSEDED.1;
/// How many hook requests may be in flight at once unless told otherwise.
pub const DEFAULT_HOOK_CONCURRENCY: usize = 16;
/// The most hook requests in flight at once that `--hook-concurrency` accepts.
pub const MAX_HOOK_CONCURRENCY: usize = 1024;
/// The most frames stored in one outbox transaction.
pub const MAX_BATCH_FRAMES: usize = 256;
/// The most frame bytes stored in one outbox transaction (a frame alone may be larger:
/// it is then stored alone).
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// What `clawq connect` needs.
#[derive(Clone)]
pub struct ConnectorOptions {
    /// The host's base url, `http://host:port` (or `https://`); the WebSocket url is
    /// derived from it (`ws://host:port/v1/relay/connect`).
    pub server: String,
    /// The agent this connector speaks for (`did:cdi:<authority>:agent:<ULID>`).
    pub agent_did: String,
    /// The agent's bearer token for the host.
    pub token: String,
    /// The agent's local webhook (default [`DEFAULT_HOOK_URL`]).
    pub hook_url: String,
    /// Extra headers sent to the webhook with every request (e.g. a hook token).
    pub hook_headers: Vec<(String, String)>,
    /// How many webhook requests may be in flight at once, 1 to
    /// [`MAX_HOOK_CONCURRENCY`] (default [`DEFAULT_HOOK_CONCURRENCY`]). The frames of one
    /// request id are still posted one at a time, in the order they came.
    pub hook_concurrency: usize,
    /// The directory of the outbox (`outbox.db`); one connector at a time may use it.
    pub data_dir: PathBuf,
    /// A PEM file of CA certificates trusted besides the webpki roots, for an `https`
    /// host or hook with a private CA or a self-signed certificate (`--ca-cert`).
    pub ca_cert: Option<PathBuf>,
}

impl ConnectorOptions {
    /// Options with the default hook and hook concurrency, no custom headers, and
    /// `./.clawq-connector` as data directory.
    pub fn new(
        server: impl Into<String>,
        agent_did: impl Into<String>,
        token: impl Into<String>,
    ) -> Self {
        ConnectorOptions {
            server: server.into(),
            agent_did: agent_did.into(),
            token: token.into(),
            hook_url: DEFAULT_HOOK_URL.to_owned(),
            hook_headers: Vec::new(),
            hook_concurrency: DEFAULT_HOOK_CONCURRENCY,
            data_dir: PathBuf::from("./.clawq-connector"),
            ca_cert: None,
        }
    }
}

impl fmt::Debug for ConnectorOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets stay out of logs: the token and the custom headers' values.
        let hook_headers: Vec<&str> = self
            .hook_headers
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        f.debug_struct("ConnectorOptions")
            .field("server", &self.server)
            .field("agent_did", &self.agent_did)
            .field("token", &"<redacted>")
            .field("hook_url", &self.hook_url)
            .field("hook_headers", &hook_headers)
            .field("hook_concurrency", &self.hook_concurrency)
            .field("data_dir", &self.data_dir)
            .field("ca_cert", &self.ca_cert)
            .finish()
    }
}

/// The connector's timings. The defaults are the spec's; tests shorten them.
#[derive(Debug, Clone)]
pub(crate) struct Tuning {
    /// First reconnect delay (1 s), doubled after each failed attempt ...
    pub(crate) reconnect_base: Duration,
    /// ... up to this (30 s); ±20% jitter on top.
    pub(crate) reconnect_max: Duration,
    /// How long the WebSocket handshake may take (15 s).
    pub(crate) connect_timeout: Duration,
    /// Our heartbeat period (30 s).
    pub(crate) heartbeat_interval: Duration,
    /// Silence from the host after which the connection is dropped (60 s).
    pub(crate) idle_timeout: Duration,
    /// First hook retry delay (1 s), doubled after each failure ...
    pub(crate) retry_base: Duration,
    /// ... up to this (60 s).
    pub(crate) retry_max: Duration,
    /// Age at which a receipt or delivery the hook never took is dropped (24 h).
    pub(crate) max_age: Duration,
    /// How long one hook request may take (30 s).
    pub(crate) hook_timeout: Duration,
    /// On shutdown, how long the close handshake and a hook request under way may still
    /// take (5 s).
    pub(crate) shutdown_grace: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            reconnect_base: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(15),
            heartbeat_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            max_age: Duration::from_secs(24 * 60 * 60),
            hook_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Runs the connector until `shutdown` is cancelled (`Ok`), another connector of the
/// agent supersedes this one (`Ok`), or the host refuses the agent with HTTP 401, its TLS
/// certificate does not verify, or the options are invalid (`Err`). Every other failure
/// is retried.
pub async fn run(options: ConnectorOptions, shutdown: CancellationToken) -> Result<()> {
    run_with(options, Tuning::default(), shutdown).await
}

/// [`run`] with explicit timings.
pub(crate) async fn run_with(
    options: ConnectorOptions,
    tuning: Tuning,
    shutdown: CancellationToken,
) -> Result<()> {
    clawq_protocol::did::validate_agent_did(&options.agent_did)
        .map_err(|e| anyhow!("`{}` is not a valid agent DID: {e}", options.agent_did))?;
    if !(1..=MAX_HOOK_CONCURRENCY).contains(&options.hook_concurrency) {
        bail!(
            "the hook concurrency must be 1 to {MAX_HOOK_CONCURRENCY}, not {}",
            options.hook_concurrency
        );
    }
    let tls = crate::tls::client_config(options.ca_cert.as_deref())?;
    let endpoint = Endpoint::new(&options, tls.clone())?;
    let hook = hook::Hook::new(
        &options.hook_url,
        &options.hook_headers,
        tuning.hook_timeout,
        &tls,
    )?;
    crate::private_dir::prepare(&options.data_dir)?;
    // Two connectors draining one outbox would post everything twice.
    let _lock = DirLock::take(&options.data_dir, "connector.lock", "connector")?;
    let outbox = Outbox::open(&options.data_dir, &options.agent_did)?;

    let wake = Arc::new(Notify::new());
    let stop_delivery = CancellationToken::new();
    let delivery = tokio::spawn(hook::deliver(
        outbox.clone(),
        hook,
        options.hook_concurrency,
        wake.clone(),
        tuning.clone(),
        stop_delivery.clone(),
    ));
    tracing::info!(
        "connector for {} starting: host {}, hook {} (at most {} requests at once), outbox {}",
        options.agent_did,
        endpoint.url,
        options.hook_url,
        options.hook_concurrency,
        options.data_dir.join(outbox::OUTBOX_FILE).display()
    );
    let result = relay(&endpoint, &tuning, &outbox, &wake, &shutdown).await;
    stop_delivery.cancel();
    if let Err(error) = delivery.await {
        tracing::error!("the delivery task failed: {error}");
    }
    if let Ok(pending @ 1..) = outbox.pending().await {
        tracing::info!(
            "{pending} receipts and deliveries stay in the outbox; they are posted when the connector \
             starts again"
        );
    }
    result
}

/// Where and how to connect.
struct Endpoint {
    url: String,
    authorization: HeaderValue,
    agent_did: String,
    /// How a `wss` host's certificate is verified.
    tls: Arc<rustls::ClientConfig>,
}

impl Endpoint {
    fn new(options: &ConnectorOptions, tls: Arc<rustls::ClientConfig>) -> Result<Endpoint> {
        let mut url = reqwest::Url::parse(options.server.trim())
            .with_context(|| format!("the server `{}` is not a valid url", options.server))?;
        let scheme = match url.scheme() {
            "http" | "ws" => "ws",
            "https" | "wss" => "wss",
            other => bail!("the server {url} has scheme `{other}`; expected http or https"),
        };
        if url.host_str().is_none() {
            bail!("the server {url} has no host");
        }
        url.set_scheme(scheme)
            .map_err(|()| anyhow!("cannot use {url} as a WebSocket url"))?;
        let path = format!("{}{CONNECT_PATH}", url.path().trim_end_matches('/'));
        url.set_path(&path);
        url.set_fragment(None);
        url.query_pairs_mut()
            .clear()
            .append_pair("agent", &options.agent_did);
        if options.token.trim().is_empty() {
            bail!("the token is empty");
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", options.token.trim()))
            .map_err(|_| {
                anyhow!("the token contains characters that cannot be sent in a header")
            })?;
        authorization.set_sensitive(true);
        Ok(Endpoint {
            url: url.to_string(),
            authorization,
            agent_did: options.agent_did.clone(),
            tls,
        })
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    i64::try_from(crate::clock::now_ms()).unwrap_or(i64::MAX)
}

/// The reconnect delay after `failures` failed attempts in a row: base doubling to the
/// cap, then ±20% jitter.
fn reconnect_delay(failures: u32, tuning: &Tuning) -> Duration {
    let nominal = tuning
        .reconnect_base
        .saturating_mul(1 << failures.min(31))
        .min(tuning.reconnect_max);
    nominal.mul_f64(0.8 + 0.4 * fastrand::f64())
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How one connection ended.
#[derive(Debug)]
enum End {
    /// `shutdown` was cancelled (the connection, if any, was closed with 1000).
    Shutdown,
    /// The host closed it with 1000 `superseded_by_new_connection`.
    Superseded,
    /// The upgrade was refused with 401, for this reason (the host's message).
    Unauthorized(String),
    /// A failure that retrying cannot fix.
    Fatal(anyhow::Error),
    /// Anything else: reconnect.
    Lost { established: bool, why: String },
}

/// Connects and reconnects until the end.
async fn relay(
    endpoint: &Endpoint,
    tuning: &Tuning,
    outbox: &Outbox,
    wake: &Notify,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut failures: u32 = 0;
    let mut refused: u64 = 0;
    loop {
        match session(endpoint, tuning, outbox, wake, &mut refused, shutdown).await {
            End::Shutdown => {
                tracing::info!("connector for {} stopped", endpoint.agent_did);
                return Ok(());
            }
            End::Superseded => {
                tracing::warn!(
                    "another connector took over agent {}: the host closed this connection ({SUPERSEDED_REASON}); \
                     stopping",
                    endpoint.agent_did
                );
                return Ok(());
            }
            End::Unauthorized(why) => {
                let refused = format!("the host refused agent {}: {why}", endpoint.agent_did);
                tracing::error!("{refused}");
                bail!(refused);
            }
            End::Fatal(error) => {
                tracing::error!("connector for {} stopping: {error:#}", endpoint.agent_did);
                return Err(error);
            }
            End::Lost { established, why } => {
                if established {
                    failures = 0;
                }
                let delay = reconnect_delay(failures, tuning);
                failures = failures.saturating_add(1);
                tracing::warn!(
                    "connection to {} {}: {why}; reconnecting in {}",
                    endpoint.url,
                    if established { "lost" } else { "failed" },
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {
                        tracing::info!("connector for {} stopped", endpoint.agent_did);
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// One connection: connect, then serve it until it ends. `refused` counts the
/// deliveries for other agents refused since the connector started.
async fn session(
    endpoint: &Endpoint,
    tuning: &Tuning,
    outbox: &Outbox,
    wake: &Notify,
    refused: &mut u64,
    shutdown: &CancellationToken,
) -> End {
    let mut request = match endpoint.url.as_str().into_client_request() {
        Ok(request) => request,
        Err(error) => return End::Fatal(anyhow!("cannot connect to {}: {error}", endpoint.url)),
    };
    request
        .headers_mut()
        .insert(AUTHORIZATION, endpoint.authorization.clone());
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(config),
        true,
        Some(tokio_tungstenite::Connector::Rustls(endpoint.tls.clone())),
    );
    let connected = tokio::select! {
        _ = shutdown.cancelled() => return End::Shutdown,
        connected = tokio::time::timeout(tuning.connect_timeout, connect) => connected,
    };
    let mut ws = match connected {
        Ok(Ok((ws, _response))) => ws,
        Ok(Err(tungstenite::Error::Http(response)))
            if response.status() == StatusCode::UNAUTHORIZED =>
        {
            return End::Unauthorized(refusal_reason(response.body().as_deref()));
        }
        Ok(Err(tungstenite::Error::Http(response))) => {
            return End::Lost {
                established: false,
                why: format!("the upgrade was refused with HTTP {}", response.status()),
            };
        }
        Ok(Err(tungstenite::Error::Url(error))) => {
            return End::Fatal(anyhow!("cannot connect to {}: {error}", endpoint.url));
        }
        Ok(Err(error)) if crate::tls::is_certificate_error(&error) => {
            return End::Fatal(anyhow!(
                "the host's TLS certificate was not accepted ({}): {error}; if the host uses \
                 a private CA or a self-signed certificate, pass it with --ca-cert <PEM file>",
                endpoint.url
            ));
        }
        Ok(Err(error)) => {
            return End::Lost {
                established: false,
                why: error.to_string(),
            };
        }
        Err(_) => {
            return End::Lost {
                established: false,
                why: format!(
                    "no answer within {}",
                    humantime::format_duration(tuning.connect_timeout)
                ),
            };
        }
    };
    tracing::info!("connected to {} as {}", endpoint.url, endpoint.agent_did);
    let agent_did = &endpoint.agent_did;
    serve(&mut ws, agent_did, tuning, outbox, wake, refused, shutdown).await
}

/// Why the host refused the connector, from the body of its 401 (`{"error": {"message"}}`,
/// e.g. `agent is revoked`), or a generic reason when it gives none.
fn refusal_reason(body: Option<&[u8]>) -> String {
    body.and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
        .and_then(|body| body["error"]["message"].as_str().map(str::to_owned))
        .filter(|message| !message.trim().is_empty())
        .unwrap_or_else(|| "HTTP 401 (unknown agent, wrong token or revoked agent)".to_owned())
}

/// Serves an established connection of `agent_did` until it ends, counting in `refused`
/// the deliveries for other agents it refuses.
async fn serve(
    ws: &mut Socket,
    agent_did: &str,
    tuning: &Tuning,
    outbox: &Outbox,
    wake: &Notify,
    refused: &mut u64,
    shutdown: &CancellationToken,
) -> End {
    let lost = |why: String| End::Lost {
        established: true,
        why,
    };
    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + tuning.heartbeat_interval,
        tuning.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => {
                close(ws, tuning.shutdown_grace).await;
                return End::Shutdown;
            }
            _ = tokio::time::sleep_until(last_heard + tuning.idle_timeout) => {
                return lost(format!(
                    "nothing from the host for {}",
                    humantime::format_duration(tuning.idle_timeout)
                ));
            }
            _ = heartbeat.tick() => {
                if let Err(error) = send(ws, FrameBody::Heartbeat).await {
                    return lost(format!("cannot send a heartbeat: {error}"));
                }
                continue;
            }
            message = ws.next() => message,
        };
        last_heard = Instant::now();
        // This message and those already read after it: the frames to store go into one
        // batch, stored and acknowledged before anything after them is answered.
        let mut batch = Batch::default();
        let mut next = Some(message);
        while let Some(message) = next.take() {
            match incoming(message, agent_did, refused) {
                Incoming::Store { frame, ack, bytes } => {
                    batch.frames.push(frame);
                    batch.acks.push(ack);
                    batch.bytes += bytes;
                }
                Incoming::Ignore => {}
                Incoming::Answer { body, what } => {
                    if let Err(why) = store_then_ack(ws, outbox, wake, &mut batch).await {
                        return lost(why);
                    }
                    if let Err(error) = send(ws, body).await {
                        return lost(format!("cannot {what}: {error}"));
                    }
                }
                Incoming::End { end, closed } => {
                    // What came before the end is still stored; its acks may not go out
                    // (the host pushes those frames again).
                    if let Err(why) = store_then_ack(ws, outbox, wake, &mut batch).await {
                        tracing::warn!("{why}");
                    }
                    if closed {
                        // Let tungstenite send its answer to the close.
                        let _ = tokio::time::timeout(Duration::from_secs(1), ws.flush()).await;
                    }
                    return end;
                }
            }
            if batch.frames.len() < MAX_BATCH_FRAMES && batch.bytes < MAX_BATCH_BYTES {
                next = ws.next().now_or_never();
            }
        }
        if let Err(why) = store_then_ack(ws, outbox, wake, &mut batch).await {
            return lost(why);
        }
    }
}

/// What to do with one message from the host.
enum Incoming {
    /// Store this `receipt` or `deliver` frame (`bytes` long on the wire), then send `ack`.
    Store {
        frame: Frame,
        ack: FrameBody,
        bytes: usize,
    },
    /// Send this frame (after storing the frames before it); `what` it does, for errors.
    Answer { body: FrameBody, what: String },
    /// Nothing (logged if unexpected).
    Ignore,
    /// The connection ended so; `closed`: with a close frame from the host.
    End { end: End, closed: bool },
}

/// What `message` (as read from the connection of `agent_did`) asks for; a delivery for
/// another agent is refused, counted in `refused`.
fn incoming(
    message: Option<Result<Message, tungstenite::Error>>,
    agent_did: &str,
    refused: &mut u64,
) -> Incoming {
    let lost = |why: String, closed: bool| Incoming::End {
        end: End::Lost {
            established: true,
            why,
        },
        closed,
    };
    let text = match message {
        None => return lost("the host closed the connection".into(), false),
        Some(Err(error)) => return lost(error.to_string(), false),
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(Message::Close(frame))) => {
            return match frame {
                Some(frame)
                    if frame.code == CloseCode::Normal
                        && frame.reason.as_str() == SUPERSEDED_REASON =>
                {
                    Incoming::End {
                        end: End::Superseded,
                        closed: true,
                    }
                }
                Some(frame) => lost(
                    format!(
                        "the host closed the connection ({} {})",
                        frame.code, frame.reason
                    ),
                    true,
                ),
                None => lost("the host closed the connection".into(), true),
            };
        }
        Some(Ok(Message::Binary(bytes))) => {
            tracing::warn!(
                "ignoring a binary message of {} bytes from the host",
                bytes.len()
            );
            return Incoming::Ignore;
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
            return Incoming::Ignore;
        }
    };
    let frame = match Frame::parse(text.as_str()) {
        Ok(frame) => frame,
        Err(error) => {
            tracing::warn!(
                "ignoring an unparseable frame of {} bytes from the host: {error}",
                text.len()
            );
            return Incoming::Ignore;
        }
    };
    let bytes = text.len();
    match &frame.body {
        FrameBody::Heartbeat => Incoming::Answer {
            body: FrameBody::HeartbeatAck {
                ack_id: frame.id.clone(),
            },
            what: "answer a heartbeat".into(),
        },
        FrameBody::HeartbeatAck { .. } => Incoming::Ignore,
        FrameBody::Receipt { .. } => Incoming::Store {
            ack: FrameBody::ReceiptAck {
                ack_id: frame.id.clone(),
            },
            frame,
            bytes,
        },
        FrameBody::Deliver(deliver) if deliver.to_agent_did != agent_did => {
            let reason = format!(
                "this connector speaks for {agent_did}, not for {}",
                deliver.to_agent_did
            );
            *refused += 1;
            tracing::warn!(
                "refusing {}: {reason} ({refused} refused since the connector started)",
                outbox::describe(&frame)
            );
            Incoming::Answer {
                what: format!("refuse delivery {}", frame.id),
                body: FrameBody::DeliverAck {
                    ack_id: frame.id,
                    accepted: false,
                    reason: Some(reason),
                },
            }
        }
        FrameBody::Deliver(_) => Incoming::Store {
            ack: FrameBody::DeliverAck {
                ack_id: frame.id.clone(),
                accepted: true,
                reason: None,
            },
            frame,
            bytes,
        },
        FrameBody::ReceiptAck { .. } | FrameBody::DeliverAck { .. } => {
            tracing::warn!(
                "ignoring a {} frame from the host (it only goes the other way)",
                frame.type_name()
            );
            Incoming::Ignore
        }
    }
}

/// `receipt` and `deliver` frames read together, to be stored in one transaction and
/// then acknowledged.
#[derive(Default)]
struct Batch {
    /// The frames, in the order they came.
    frames: Vec<Frame>,
    /// The ack of each frame.
    acks: Vec<FrameBody>,
    /// Their size on the wire.
    bytes: usize,
}

/// Stores the frames of `batch` in the outbox in one transaction (once: a frame seen
/// before is not stored again), wakes the delivery task, then sends their acks, emptying
/// `batch`. `Err` (the connection is to be dropped) says why; when storing failed
/// nothing is sent, so the host pushes the frames again.
async fn store_then_ack(
    ws: &mut Socket,
    outbox: &Outbox,
    wake: &Notify,
    batch: &mut Batch,
) -> Result<(), String> {
    let Batch { frames, acks, .. } = std::mem::take(batch);
    let Some(first) = frames.first() else {
        return Ok(());
    };
    match outbox.store(&frames, now_ms()).await {
        Ok(new) => {
            let mut stored = false;
            for (frame, new) in frames.iter().zip(new) {
                let what = outbox::describe(frame);
                if new {
                    tracing::info!("stored {what}");
                    stored = true;
                } else {
                    tracing::debug!("{what} was already stored; acknowledging it again");
                }
            }
            if stored {
                wake.notify_one();
            }
        }
        Err(error) if frames.len() == 1 => {
            return Err(format!(
                "cannot store {}: {error:#}",
                outbox::describe(first)
            ));
        }
        Err(error) => {
            return Err(format!(
                "cannot store {} frames ({} and the next): {error:#}",
                frames.len(),
                outbox::describe(first)
            ));
        }
    }
    for (frame, ack) in frames.iter().zip(acks) {
        ws.feed(Message::text(Frame::new(ack).to_json()))
            .await
            .map_err(|error| format!("cannot acknowledge {}: {error}", outbox::describe(frame)))?;
    }
    ws.flush()
        .await
        .map_err(|error| format!("cannot acknowledge {} frames: {error}", frames.len()))
}

/// Sends a new frame.
async fn send(ws: &mut Socket, body: FrameBody) -> Result<(), tungstenite::Error> {
    ws.send(Message::text(Frame::new(body).to_json())).await
}

/// Closes with 1000 and waits (at most `grace`) for the host's answer.
async fn close(ws: &mut Socket, grace: Duration) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "connector_shutdown".into(),
    };
    let _ = tokio::time::timeout(grace, async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::path::Path;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
    use axum::extract::{Query, State};
    use axum::http::HeaderMap;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use serde_json::{Value, json};
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::frame::ReceiptStatus;

    const AGENT: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const RECIPIENT: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
    const TOKEN: &str = "agent-token";
    /// The longest any expected event may take.
    const WAIT: Duration = Duration::from_secs(5);

    /// Spec timings, shortened where a test waits on them.
    fn fast() -> Tuning {
        Tuning {
            reconnect_base: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(200),
            connect_timeout: Duration::from_secs(2),
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_millis(400),
            hook_timeout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(1),
            ..Tuning::default()
        }
    }

    async fn within<F: Future>(what: &str, future: F) -> F::Output {
        tokio::time::timeout(WAIT, future)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    async fn serve_router(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(axum::serve(listener, router).into_future());
        format!("http://{addr}")
    }

    /// An address where nothing listens.
    fn dead_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{addr}")
    }

    /// One connector connection, seen from the fake host.
    struct Conn {
        to_connector: mpsc::UnboundedSender<WsMessage>,
        from_connector: mpsc::UnboundedReceiver<WsMessage>,
    }

    impl Conn {
        fn send_text(&self, text: &str) {
            self.to_connector
                .send(WsMessage::Text(text.into()))
                .unwrap();
        }

        fn send(&self, frame: &Frame) {
            self.send_text(&frame.to_json());
        }

        async fn recv(&mut self) -> Option<WsMessage> {
            within("a message from the connector", self.from_connector.recv()).await
        }

        /// The next frame from the connector, skipping its own heartbeats.
        async fn recv_frame(&mut self) -> Frame {
            Frame::parse(&self.recv_raw().await.to_string()).unwrap()
        }

        /// The next frame from the connector as the JSON it sent (checked to parse as a
        /// frame), skipping its own heartbeats.
        async fn recv_raw(&mut self) -> Value {
            loop {
                match self.recv().await {
                    Some(WsMessage::Text(text)) => {
                        let frame =
                            Frame::parse(text.as_str()).expect("the connector sends valid frames");
                        if frame.body != FrameBody::Heartbeat {
                            return serde_json::from_str(text.as_str()).unwrap();
                        }
                    }
                    Some(WsMessage::Ping(_) | WsMessage::Pong(_)) => {}
                    other => panic!("expected a frame, got {other:?}"),
                }
            }
        }

        /// Expects the `deliver_ack` of `deliver`, checked field by field on the wire.
        async fn expect_deliver_ack(&mut self, deliver: &Frame, refusal: Option<&str>) {
            let ack = self.recv_raw().await;
            let mut keys: Vec<&str> = ack
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            let mut want = vec!["accepted", "ackId", "id", "ts", "type", "v"];
            if refusal.is_some() {
                want.push("reason");
                want.sort_unstable();
            }
            assert_eq!(keys, want, "{ack}");
            assert_eq!(ack["v"], 1, "{ack}");
            assert_eq!(ack["type"], "deliver_ack", "{ack}");
            assert!(
                ack["id"]
                    .as_str()
                    .is_some_and(|id| id.parse::<ulid::Ulid>().is_ok() && id != deliver.id),
                "{ack}"
            );
            assert!(
                ack["ts"]
                    .as_str()
                    .is_some_and(|ts| humantime::parse_rfc3339(ts).is_ok()),
                "{ack}"
            );
            assert_eq!(ack["ackId"], deliver.id.as_str(), "{ack}");
            assert_eq!(ack["accepted"], refusal.is_none(), "{ack}");
            if let Some(refusal) = refusal {
                assert!(ack["reason"].as_str().unwrap().contains(refusal), "{ack}");
            }
        }

        async fn expect_receipt_ack(&mut self, receipt: &Frame) {
            let frame = self.recv_frame().await;
            assert_eq!(
                frame.body,
                FrameBody::ReceiptAck {
                    ack_id: receipt.id.clone()
                }
            );
        }
    }

    /// A fake host: `/v1/relay/connect` for [`AGENT`] with [`TOKEN`].
    struct Relay {
        url: String,
        conns: mpsc::UnboundedReceiver<Conn>,
        refused: Arc<AtomicUsize>,
    }

    impl Relay {
        async fn start() -> Relay {
            #[derive(Clone)]
            struct Host {
                conns: mpsc::UnboundedSender<Conn>,
                refused: Arc<AtomicUsize>,
            }
            async fn connect(
                State(host): State<Host>,
                headers: HeaderMap,
                Query(query): Query<HashMap<String, String>>,
                upgrade: WebSocketUpgrade,
            ) -> Response {
                let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
                if bearer != Some(&format!("Bearer {TOKEN}"))
                    || query.get("agent").map(String::as_str) != Some(AGENT)
                {
                    host.refused.fetch_add(1, Ordering::SeqCst);
                    return axum::http::StatusCode::UNAUTHORIZED.into_response();
                }
                upgrade
                    .max_message_size(MAX_FRAME_BYTES)
                    .on_upgrade(move |socket| pump(socket, host.conns))
            }
            async fn pump(socket: WebSocket, conns: mpsc::UnboundedSender<Conn>) {
                let (to_connector, mut outgoing) = mpsc::unbounded_channel();
                let (incoming, from_connector) = mpsc::unbounded_channel();
                let _ = conns.send(Conn {
                    to_connector,
                    from_connector,
                });
                let (mut sink, mut stream) = socket.split();
                loop {
                    tokio::select! {
                        out = outgoing.recv() => match out {
                            Some(message) => if sink.send(message).await.is_err() { break },
                            None => break, // the test dropped the connection
                        },
                        message = stream.next() => match message {
                            Some(Ok(message)) => { let _ = incoming.send(message); }
                            _ => break,
                        },
                    }
                }
            }
            let (conns_tx, conns) = mpsc::unbounded_channel();
            let refused = Arc::new(AtomicUsize::new(0));
            let router = Router::new()
                .route(CONNECT_PATH, get(connect))
                .with_state(Host {
                    conns: conns_tx,
                    refused: refused.clone(),
                });
            Relay {
                url: serve_router(router).await,
                conns,
                refused,
            }
        }

        async fn next_conn(&mut self) -> Conn {
            within("a connection", self.conns.recv())
                .await
                .expect("the relay is running")
        }
    }

    /// A fake agent webhook recording every request; answers the queued statuses, then 200.
    struct HookServer {
        url: String,
        requests: mpsc::UnboundedReceiver<(HeaderMap, Value)>,
    }

    impl HookServer {
        async fn start(statuses: &[u16]) -> HookServer {
            type HookState = (
                mpsc::UnboundedSender<(HeaderMap, Value)>,
                Arc<Mutex<VecDeque<u16>>>,
            );
            async fn hook(
                State((requests, statuses)): State<HookState>,
                headers: HeaderMap,
                body: Bytes,
            ) -> Response {
                let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let _ = requests.send((headers, body));
                let status = statuses.lock().unwrap().pop_front().unwrap_or(200);
                axum::http::StatusCode::from_u16(status)
                    .unwrap()
                    .into_response()
            }
            let (tx, requests) = mpsc::unbounded_channel();
            let statuses = Arc::new(Mutex::new(statuses.iter().copied().collect()));
            let router = Router::new()
                .route("/hooks/message", post(hook))
                .with_state((tx, statuses));
            HookServer {
                url: format!("{}/hooks/message", serve_router(router).await),
                requests,
            }
        }

        async fn next(&mut self) -> (HeaderMap, Value) {
            within("a hook request", self.requests.recv())
                .await
                .expect("the hook is running")
        }
    }

    struct Running {
        shutdown: CancellationToken,
        task: JoinHandle<Result<()>>,
    }

    impl Running {
        fn start(server: &str, token: &str, hook: &str, dir: &Path, tuning: Tuning) -> Running {
            let mut options = ConnectorOptions::new(server, AGENT, token);
            options.hook_url = hook.to_owned();
            options.hook_headers = vec![("X-Hook-Token".into(), "s3cret".into())];
            options.data_dir = dir.to_owned();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(run_with(options, tuning, shutdown.clone()));
            Running { shutdown, task }
        }

        async fn finish(self) -> Result<()> {
            within("the connector to return", self.task)
                .await
                .expect("the connector does not panic")
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.finish().await.expect("a clean stop");
        }
    }

    fn receipt(request: &str, status: ReceiptStatus, reason: Option<&str>) -> Frame {
        Frame::new(FrameBody::Receipt {
            original_frame_id: request.into(),
            to_agent_did: RECIPIENT.into(),
            status,
            reason: reason.map(Into::into),
        })
    }

    /// The frame ids in the outbox, read through a connection of its own.
    fn outbox_rows(dir: &Path) -> Vec<String> {
        let conn = rusqlite::Connection::open(dir.join(outbox::OUTBOX_FILE)).unwrap();
        let mut statement = conn
            .prepare("SELECT frame_id FROM outbox ORDER BY seq")
            .unwrap();
        statement
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    async fn wait_until_outbox_is_empty(dir: &Path) {
        within("an empty outbox", async {
            while !outbox_rows(dir).is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name}"))
            .to_str()
            .unwrap()
    }

    #[tokio::test]
    async fn receipts_reach_the_hook_with_the_spec_headers_and_body() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        let mut hook = HookServer::start(&[]).await;
        let connector = Running::start(&relay.url, TOKEN, &hook.url, dir.path(), fast());
        let mut conn = relay.next_conn().await;

        let delivered = receipt("req-delivered", ReceiptStatus::DeliveredToWebhook, None);
        let failed = receipt(
            "req-failed",
            ReceiptStatus::DeadLettered,
            Some("recipient_unreachable"),
        );
        conn.send(&delivered);
        conn.expect_receipt_ack(&delivered).await;
        conn.send(&failed);
        conn.expect_receipt_ack(&failed).await;

        for (frame, want) in [
            (
                &delivered,
                json!({"type": "clawdentity.receipt.v1", "requestId": "req-delivered", "toAgentDid": RECIPIENT,
                       "status": "delivered_to_webhook", "relayMetadata": {"timestamp": delivered.ts}}),
            ),
            (
                &failed,
                json!({"type": "clawdentity.receipt.v1", "requestId": "req-failed", "toAgentDid": RECIPIENT,
                       "status": "dead_lettered", "reason": "recipient_unreachable",
                       "relayMetadata": {"timestamp": failed.ts},
                       "message": format!("Your message req-failed to {RECIPIENT} could not be delivered: \
                                           recipient_unreachable")}),
            ),
        ] {
            let (headers, body) = hook.next().await;
            assert_eq!(body, want);
            let FrameBody::Receipt {
                original_frame_id, ..
            } = &frame.body
            else {
                unreachable!()
            };
            assert_eq!(
                header(&headers, "content-type"),
                "application/vnd.clawdentity.receipt+json"
            );
            assert_eq!(header(&headers, "x-clawdentity-to-agent-did"), RECIPIENT);
            assert_eq!(header(&headers, "x-clawdentity-verified"), "true");
            assert_eq!(header(&headers, "x-request-id"), original_frame_id);
            assert_eq!(header(&headers, "x-hook-token"), "s3cret");
        }
        wait_until_outbox_is_empty(dir.path()).await;

        connector.shutdown.cancel();
        match conn.recv().await {
            Some(WsMessage::Close(Some(close))) => assert_eq!(close.code, 1000),
            other => panic!("expected a close frame, got {other:?}"),
        }
        connector.finish().await.unwrap();
    }

    #[tokio::test]
    async fn heartbeats_are_answered_garbage_is_ignored_and_receipts_are_stored_before_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        // The hook is down and retries are slow: the receipt stays in the outbox.
        let tuning = Tuning {
            retry_base: Duration::from_secs(30),
            ..fast()
        };
        let connector = Running::start(&relay.url, TOKEN, &dead_url(), dir.path(), tuning);
        let mut conn = relay.next_conn().await;

        conn.send_text("not json");
        conn.send_text(r#"{"v":1,"type":"heartbeat","id":"01HZX4M3Q8V2J7K9T6R5W1N0PB","ts":"2026-11-24T10:00:00Z","x":1}"#);
        conn.to_connector
            .send(WsMessage::Binary(Bytes::from_static(b"\x00")))
            .unwrap();
        let heartbeat = Frame::new(FrameBody::Heartbeat);
        conn.send(&heartbeat);
        assert_eq!(
            conn.recv_frame().await.body,
            FrameBody::HeartbeatAck {
                ack_id: heartbeat.id.clone()
            }
        );

        let frame = receipt("req-1", ReceiptStatus::DeliveredToWebhook, None);
        conn.send(&frame);
        conn.expect_receipt_ack(&frame).await;
        assert_eq!(
            outbox_rows(dir.path()),
            std::slice::from_ref(&frame.id),
            "stored (committed) before the ack"
        );
        connector.stop().await;
        assert_eq!(relay.refused.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_connector_sends_heartbeats_and_reconnects_after_silence() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        let tuning = Tuning {
            heartbeat_interval: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(600),
            ..fast()
        };
        let connector = Running::start(&relay.url, TOKEN, &dead_url(), dir.path(), tuning);
        let mut first = relay.next_conn().await;
        let Some(WsMessage::Text(text)) = first.recv().await else {
            panic!("a heartbeat")
        };
        let beat = Frame::parse(text.as_str()).unwrap();
        assert_eq!(beat.body, FrameBody::Heartbeat);
        first.send(&Frame::new(FrameBody::HeartbeatAck { ack_id: beat.id }));
        // The host now stays silent on `first` (kept open): the connector gives up on it.
        let mut second = relay.next_conn().await;
        let heartbeat = Frame::new(FrameBody::Heartbeat);
        second.send(&heartbeat);
        assert_eq!(
            second.recv_frame().await.body,
            FrameBody::HeartbeatAck {
                ack_id: heartbeat.id
            }
        );
        connector.stop().await;
        drop(first);
    }

    #[tokio::test]
    async fn a_frame_pushed_twice_reaches_the_hook_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        let mut hook = HookServer::start(&[]).await;
        let connector = Running::start(&relay.url, TOKEN, &hook.url, dir.path(), fast());
        let mut conn = relay.next_conn().await;
        let first = receipt("req-1", ReceiptStatus::DeliveredToWebhook, None);
        conn.send(&first);
        conn.send(&first);
        conn.expect_receipt_ack(&first).await;
        conn.expect_receipt_ack(&first).await;
        assert_eq!(header(&hook.next().await.0, "x-request-id"), "req-1");
        wait_until_outbox_is_empty(dir.path()).await;

        // The host drops the connection and re-pushes the frame after the reconnect.
        drop(conn);
        let mut conn = relay.next_conn().await;
        conn.send(&first);
        conn.expect_receipt_ack(&first).await;
        let second = receipt("req-2", ReceiptStatus::DeliveredToWebhook, None);
        conn.send(&second);
        conn.expect_receipt_ack(&second).await;
        assert_eq!(
            header(&hook.next().await.0, "x-request-id"),
            "req-2",
            "req-1 is not posted again"
        );
        connector.stop().await;
        assert!(hook.requests.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_failed_hook_call_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        let mut hook = HookServer::start(&[500]).await;
        let connector = Running::start(&relay.url, TOKEN, &hook.url, dir.path(), fast());
        let mut conn = relay.next_conn().await;
        let frame = receipt("req-1", ReceiptStatus::DeadLettered, None);
        conn.send(&frame);
        conn.expect_receipt_ack(&frame).await;
        let (first, first_body) = hook.next().await;
        let (second, second_body) = hook.next().await;
        assert_eq!(
            (
                header(&first, "x-request-id"),
                header(&second, "x-request-id")
            ),
            ("req-1", "req-1")
        );
        assert_eq!(first_body, second_body);
        wait_until_outbox_is_empty(dir.path()).await;
        connector.stop().await;
        assert!(
            hook.requests.try_recv().is_err(),
            "delivered once it succeeded"
        );
    }

    #[tokio::test]
    async fn pending_receipts_are_delivered_after_a_restart_without_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        let connector = Running::start(&relay.url, TOKEN, &dead_url(), dir.path(), fast());
        let mut conn = relay.next_conn().await;
        let frame = receipt("req-1", ReceiptStatus::DeadLettered, Some("gone"));
        conn.send(&frame);
        conn.expect_receipt_ack(&frame).await;
        connector.stop().await;
        assert_eq!(outbox_rows(dir.path()), std::slice::from_ref(&frame.id));

        let mut hook = HookServer::start(&[]).await;
        let connector = Running::start(&dead_url(), TOKEN, &hook.url, dir.path(), fast());
        let (headers, body) = hook.next().await;
        assert_eq!(header(&headers, "x-request-id"), "req-1");
        assert_eq!(body["reason"], "gone");
        wait_until_outbox_is_empty(dir.path()).await;
        connector.stop().await;
    }

    #[tokio::test]
    async fn a_refused_token_ends_the_connector_without_retrying() {
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::start().await;
        let connector = Running::start(&relay.url, "wrong-token", &dead_url(), dir.path(), fast());
        let error = connector.finish().await.expect_err("a 401 is fatal");
        assert!(error.to_string().contains("refused agent"), "{error:#}");
        assert_eq!(relay.refused.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_refusal_names_the_hosts_reason() {
        let body = br#"{"error": {"code": "unauthorized", "message": "agent is revoked"}}"#;
        assert_eq!(refusal_reason(Some(body)), "agent is revoked");
        for unclear in [None, Some(&b"<html>"[..]), Some(&br#"{"error": {}}"#[..])] {
            assert!(refusal_reason(unclear).starts_with("HTTP 401 (unknown agent"));
        }
    }

    #[tokio::test]
    async fn a_superseded_connector_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        let connector = Running::start(&relay.url, TOKEN, &dead_url(), dir.path(), fast());
        let conn = relay.next_conn().await;
        let close = axum::extract::ws::CloseFrame {
            code: 1000,
            reason: SUPERSEDED_REASON.into(),
        };
        conn.to_connector
            .send(WsMessage::Close(Some(close)))
            .unwrap();
        connector
            .finish()
            .await
            .expect("superseded is not an error");
        assert!(relay.conns.try_recv().is_err(), "no reconnect");
    }

    #[tokio::test]
    async fn one_connector_per_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        let first = Running::start(&relay.url, TOKEN, &dead_url(), dir.path(), fast());
        let _conn = relay.next_conn().await;
        let second = Running::start(&relay.url, TOKEN, &dead_url(), dir.path(), fast());
        let error = second.finish().await.expect_err("the data dir is taken");
        assert!(error.to_string().contains("another connector"), "{error:#}");
        first.stop().await;
    }

    #[tokio::test]
    async fn receipts_older_than_the_maximum_age_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), AGENT).unwrap();
        let old = receipt("req-old", ReceiptStatus::DeliveredToWebhook, None);
        outbox
            .store(&[old], now_ms() - 25 * 60 * 60 * 1000)
            .await
            .unwrap();
        let hook = hook::Hook::new(
            &dead_url(),
            &[],
            Duration::from_secs(1),
            &crate::tls::client_config(None).unwrap(),
        )
        .unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(hook::deliver(
            outbox.clone(),
            hook,
            DEFAULT_HOOK_CONCURRENCY,
            Arc::new(Notify::new()),
            fast(),
            stop.clone(),
        ));
        wait_until_outbox_is_empty(dir.path()).await;
        stop.cancel();
        within("the delivery task", task).await.unwrap();
    }

    /// A delivery from [`RECIPIENT`] to `to`, with a group and a source.
    fn deliver_frame(to: &str) -> Frame {
        Frame::new(FrameBody::Deliver(Box::new(crate::frame::Deliver {
            from_agent_did: RECIPIENT.into(),
            to_agent_did: to.into(),
            payload: json!({"type": "clawdentity:group-member-joined", "groupName": "builders"}),
            delivery_source: Some("proxy.events.queue.group_member_joined".into()),
            content_type: None,
            group_id: Some("grp_01HZX4M3Q8V2J7K9T6R5W1N0PB".into()),
            conversation_id: None,
            reply_to: None,
        })))
    }

    #[tokio::test]
    async fn deliveries_are_acked_once_stored_and_reach_the_hook_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        let mut hook = HookServer::start(&[503]).await;
        let connector = Running::start(&relay.url, TOKEN, &hook.url, dir.path(), fast());
        let mut conn = relay.next_conn().await;

        let frame = deliver_frame(AGENT);
        conn.send(&frame);
        conn.expect_deliver_ack(&frame, None).await;
        // Pushed again (the host had not seen the ack): acked again, not stored twice.
        conn.send(&frame);
        conn.expect_deliver_ack(&frame, None).await;

        // The first post fails (503) and is retried with the same request.
        for _ in 0..2 {
            let (headers, body) = hook.next().await;
            assert_eq!(
                header(&headers, "content-type"),
                "application/vnd.clawdentity.delivery+json"
            );
            assert_eq!(header(&headers, "x-clawdentity-agent-did"), RECIPIENT);
            assert_eq!(header(&headers, "x-clawdentity-to-agent-did"), AGENT);
            assert_eq!(header(&headers, "x-clawdentity-verified"), "true");
            assert_eq!(header(&headers, "x-request-id"), frame.id);
            assert_eq!(
                header(&headers, "x-clawdentity-group-id"),
                "grp_01HZX4M3Q8V2J7K9T6R5W1N0PB"
            );
            assert_eq!(header(&headers, "x-hook-token"), "s3cret");
            assert_eq!(
                body,
                json!({"type": "clawdentity.delivery.v1", "requestId": frame.id,
                       "fromAgentDid": RECIPIENT, "toAgentDid": AGENT,
                       "payload": {"type": "clawdentity:group-member-joined", "groupName": "builders"},
                       "groupId": "grp_01HZX4M3Q8V2J7K9T6R5W1N0PB",
                       "relayMetadata": {"timestamp": frame.ts,
                                         "deliverySource": "proxy.events.queue.group_member_joined",
                                         "groupName": "builders"}})
            );
        }
        wait_until_outbox_is_empty(dir.path()).await;

        // After the delivery, a push of the same frame is still only acked.
        conn.send(&frame);
        conn.expect_deliver_ack(&frame, None).await;
        let receipt = receipt("req-after", ReceiptStatus::DeliveredToWebhook, None);
        conn.send(&receipt);
        conn.expect_receipt_ack(&receipt).await;
        assert_eq!(header(&hook.next().await.0, "x-request-id"), "req-after");
        connector.stop().await;
        assert!(
            hook.requests.try_recv().is_err(),
            "the delivery was posted once"
        );
    }

    #[tokio::test]
    async fn a_delivery_for_another_agent_is_refused_and_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        let mut hook = HookServer::start(&[]).await;
        let connector = Running::start(&relay.url, TOKEN, &hook.url, dir.path(), fast());
        let mut conn = relay.next_conn().await;

        let stray = deliver_frame(RECIPIENT);
        conn.send(&stray);
        conn.expect_deliver_ack(
            &stray,
            Some(&format!("speaks for {AGENT}, not for {RECIPIENT}")),
        )
        .await;
        assert!(outbox_rows(dir.path()).is_empty());
        // The connection goes on: a delivery for the agent is taken.
        let frame = deliver_frame(AGENT);
        conn.send(&frame);
        conn.expect_deliver_ack(&frame, None).await;
        assert_eq!(header(&hook.next().await.0, "x-request-id"), frame.id);
        wait_until_outbox_is_empty(dir.path()).await;
        connector.stop().await;
        assert!(
            hook.requests.try_recv().is_err(),
            "the refused delivery is not posted"
        );
    }

    #[tokio::test]
    async fn a_delivery_that_cannot_be_stored_is_not_acked() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().await;
        let connector = Running::start(&relay.url, TOKEN, &dead_url(), dir.path(), fast());
        let mut conn = relay.next_conn().await;
        let heartbeat = Frame::new(FrameBody::Heartbeat);
        conn.send(&heartbeat);
        conn.recv_frame().await; // the outbox is open and the connection served
        rusqlite::Connection::open(dir.path().join(outbox::OUTBOX_FILE))
            .unwrap()
            .execute_batch("DROP TABLE seen")
            .unwrap();

        let frame = deliver_frame(AGENT);
        conn.send(&frame);
        // No ack: the connector drops the connection, so the host pushes it again.
        loop {
            match conn.recv().await {
                Some(WsMessage::Text(text)) => {
                    let got = Frame::parse(text.as_str()).unwrap();
                    assert_eq!(got.body, FrameBody::Heartbeat, "no ack: {text}");
                }
                Some(WsMessage::Ping(_) | WsMessage::Pong(_)) => {}
                Some(WsMessage::Close(_)) | None => break,
                Some(other) => panic!("unexpected {other:?}"),
            }
        }
        relay.next_conn().await;
        connector.stop().await;
    }

    #[test]
    fn the_websocket_url_is_derived_from_the_server() {
        let tls = crate::tls::client_config(None).unwrap();
        let url = |server: &str| {
            Endpoint::new(&ConnectorOptions::new(server, AGENT, TOKEN), tls.clone()).map(|e| e.url)
        };
        let query =
            "agent=did%3Acdi%3Aregistry.clawdentity.com%3Aagent%3A01HZX4M3Q8V2J7K9T6R5W1N0PB";
        assert_eq!(
            url("http://127.0.0.1:8787").unwrap(),
            format!("ws://127.0.0.1:8787/v1/relay/connect?{query}")
        );
        assert_eq!(
            url("https://relay.example/").unwrap(),
            format!("wss://relay.example/v1/relay/connect?{query}")
        );
        assert!(url("ftp://relay.example").is_err());
        assert!(Endpoint::new(&ConnectorOptions::new(DEFAULT_SERVER, AGENT, " "), tls).is_err());
    }

    #[test]
    fn reconnect_delays_double_with_jitter_up_to_the_cap() {
        let tuning = Tuning::default();
        for (failures, nominal) in [
            (0, 1.0),
            (1, 2.0),
            (2, 4.0),
            (4, 16.0),
            (5, 30.0),
            (40, 30.0),
        ] {
            let delay = reconnect_delay(failures, &tuning).as_secs_f64();
            assert!(
                (nominal * 0.8..=nominal * 1.2).contains(&delay),
                "{failures}: {delay}"
            );
        }
    }
}
