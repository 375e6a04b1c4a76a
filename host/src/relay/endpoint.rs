//! `GET /v1/relay/connect`: the connector WebSocket (spec section 4).
//!
//! The connector proves that it speaks for `?agent=<did>` with `Authorization: Bearer
//! <token>` before the upgrade, which the auth layer (`auth`) checks like every route's
//! token; a missing or wrong token, or a revoked agent, gets 401 and no upgrade, the
//! body's message naming which. Removing the agent (`DELETE
//! /v1/agents/{did}`) or revoking it closes its connection (1008 `agent_removed` /
//! `agent_revoked`); both are checked again once a new connection is registered, so one
//! that lands while the connection is set up closes it too. Once connected, every unacked
//! frame of the agent's relay session (receipts and deliveries) is pushed, new ones follow
//! as they come, unacked ones are pushed again when their retry is due (a timer to the
//! session's next due time), heartbeats go both ways, and `receipt_ack` / `deliver_ack`
//! settle a frame. The frames come from the session's actor through the hub, in the
//! order the session recorded them; an ack is put in the actor's mailbox and settled
//! off the connection task, which goes on sending meanwhile.
//!
//! Every send has a timeout ([`Backpressure::send_timeout`], never more than the
//! heartbeat timeout) and gives way to a close the hub asks for, so a connector that
//! stops reading (or a half-open TCP connection) never holds its connection task: it is
//! dropped, and what its relay session holds is pushed again on its next connect.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::Instant;

use super::hub::{ConnectionHub, Outbound, Outgoing};
use super::sessions::{Ask, Kind};
use super::store::SessionStore;
use crate::agents::{AgentRegistry, Refusal};
use crate::api::ApiError;
use crate::auth::Principal;
use crate::frame::{CONNECT_PATH, Frame, FrameBody, MAX_FRAME_BYTES};
use crate::trust::TrustStore;

/// Heartbeat timing of connector connections.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    /// How often the host sends a heartbeat.
    pub interval: Duration,
    /// Silence from the connector after which the connection is closed (1011).
    pub timeout: Duration,
}

/// How far a connector connection may fall behind before it is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backpressure {
    /// How long one frame may take to send (bounded by the heartbeat timeout too); a
    /// connection whose send takes longer is dropped.
    pub send_timeout: Duration,
}

impl Default for Backpressure {
    fn default() -> Self {
        Backpressure {
            send_timeout: Duration::from_secs(10),
        }
    }
}

/// What the endpoint serves from.
#[derive(Clone)]
pub struct RelayState {
    /// Who may connect.
    pub agents: Arc<AgentRegistry>,
    /// Who is revoked.
    pub trust: Arc<TrustStore>,
    /// The relay sessions.
    pub sessions: Arc<SessionStore>,
    /// The open connections.
    pub hub: Arc<ConnectionHub>,
    /// Heartbeat timing.
    pub heartbeat: Heartbeat,
    /// How far a connection may fall behind.
    pub backpressure: Backpressure,
}

/// The endpoint's route.
pub fn router(state: RelayState) -> Router {
    Router::new()
        .route(CONNECT_PATH, get(connect))
        .route("/v1/relay", get(relay_status))
        .with_state(state)
}

/// `GET /v1/relay`: open connections, actors in memory, receipts and deliveries dropped
/// unacked since start, receipts and deliveries waiting for an ack.
async fn relay_status(State(state): State<RelayState>) -> Response {
    let sessions = &state.sessions;
    let pending = match sessions.pending(Kind::Receipt).await {
        Ok(receipts) => sessions
            .pending(Kind::Deliver)
            .await
            .map(|deliveries| (receipts, deliveries)),
        Err(err) => Err(err),
    };
    match pending {
        Ok((receipts_pending, deliveries_pending)) => axum::Json(json!({
            "connections": state.hub.len(),
            "resident_actors": sessions.resident_actors(),
            "receipts_dropped": sessions.dropped_total(Kind::Receipt),
            "deliveries_dropped": sessions.dropped_total(Kind::Deliver),
            "receipts_pending": receipts_pending,
            "deliveries_pending": deliveries_pending,
        }))
        .into_response(),
        Err(err) => {
            let code = "storage_unavailable";
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, err.to_string()).into_response()
        }
    }
}

/// The close (1008) of a connection whose agent became refused while it was set up.
fn refused_close(refusal: Refusal) -> End {
    match refusal {
        Refusal::UnknownOrWrongToken => End::Close(1008, "agent_removed"),
        Refusal::Revoked => End::Close(1008, "agent_revoked"),
    }
}

/// The upgrade of a connector whose agent the auth layer admitted (the [`Principal`] it
/// put into the request); anything else is refused.
async fn connect(
    State(state): State<RelayState>,
    principal: Option<Extension<Principal>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Some(Extension(Principal::Agent { did, token })) = principal else {
        let message = "only an agent's connector token opens its connection";
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    };
    match upgrade {
        Ok(upgrade) => {
            // Registered before the response goes out: a connection the connector opens
            // once this one's upgrade is answered supersedes it, although the two
            // upgrades then finish in no set order.
            let registered = state.hub.register(&did);
            let running = state.hub.track_connection();
            let (hub, failed_did, id) = (state.hub.clone(), did.clone(), registered.0);
            upgrade
                .read_buffer_size(READ_BUFFER_BYTES)
                .max_message_size(2 * MAX_FRAME_BYTES)
                .max_frame_size(2 * MAX_FRAME_BYTES)
                .on_failed_upgrade(move |_| {
                    hub.disconnect(&failed_did, id, UPGRADE_FAILED.reason())
                })
                .on_upgrade(move |socket| async move {
                    serve_connection(socket, did, token, registered, state).await;
                    drop(running);
                })
                .into_response()
        }
        Err(rejection) => rejection.into_response(),
    }
}

/// How much a connection reads from its socket at a time. A connector sends small
/// frames (acks, heartbeats), and every read zeroes this much first: the default of
/// 128 KiB made the zeroing the largest cost of a connection. A larger message still
/// arrives whole, over several reads.
const READ_BUFFER_BYTES: usize = 8 * 1024;

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// How long the close frame of a connection that is ending may take to send: a peer
/// that does not take it by then is dropped without it.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// With this close frame.
    Close(u16, &'static str),
    /// Without a close frame, for this reason (the peer closed, or the socket failed or
    /// could not take a frame in time).
    Quiet(&'static str),
}

/// How a connection whose upgrade was answered but never completed ends.
const UPGRADE_FAILED: End = End::Quiet("upgrade_failed");

impl End {
    /// Why the connection ends: the close reason, or why it ends without a close.
    fn reason(self) -> &'static str {
        match self {
            End::Close(_, reason) | End::Quiet(reason) => reason,
        }
    }
}

/// The sending half of a connection: every send is bounded by a timeout, and gives way
/// to a close the hub asks for meanwhile, so that a peer that does not read never holds
/// the connection task.
struct Link<'a> {
    sink: SplitSink<WebSocket, Message>,
    outgoing: &'a Outgoing,
    timeout: Duration,
}

impl Link<'_> {
    /// Sends `message` within the send timeout.
    async fn send(&mut self, message: Message) -> Result<(), End> {
        bounded(self.outgoing, self.timeout, self.sink.send(message)).await
    }

    /// Queues `message` to be sent with the next flush (it is written out sooner if
    /// the write buffer fills), within the send timeout.
    async fn feed(&mut self, message: Message) -> Result<(), End> {
        bounded(self.outgoing, self.timeout, self.sink.feed(message)).await
    }

    /// Writes out the messages fed, within the send timeout.
    async fn flush(&mut self) -> Result<(), End> {
        bounded(self.outgoing, self.timeout, self.sink.flush()).await
    }

    /// Sends the close frame `code` and `reason`, if the peer takes it within
    /// [`CLOSE_GRACE`].
    async fn close(&mut self, code: u16, reason: &'static str) {
        let grace = CLOSE_GRACE.min(self.timeout);
        let _ = tokio::time::timeout(grace, self.sink.send(close_frame(code, reason))).await;
    }
}

/// Runs `io` (a write to the connection) within `timeout`, giving way to a close the hub
/// asks for on `outgoing` meanwhile.
async fn bounded(
    outgoing: &Outgoing,
    timeout: Duration,
    io: impl std::future::Future<Output = Result<(), axum::Error>>,
) -> Result<(), End> {
    tokio::select! {
        biased;
        (code, reason) = outgoing.closed() => Err(End::Close(code, reason)),
        sent = tokio::time::timeout(timeout, io) => match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Quiet("send_failed")),
            Err(_) => Err(End::Quiet("send_timeout")),
        },
    }
}

/// Asks the session of `did` to push what the connection must send for `ask`; true
/// if it did. A session that cannot be reached is asked again after the first retry
/// delay.
async fn ask_session(sessions: &SessionStore, did: &str, ask: Ask, outgoing: &Outgoing) -> bool {
    match sessions.push(did, ask).await {
        Ok(_) => true,
        Err(err) => {
            tracing::error!(agent = %did, error = %err, "reading the relay session failed");
            let delay = sessions.limits().retry.initial.as_millis() as u64;
            outgoing.retry_by(crate::clock::now_ms() + delay);
            false
        }
    }
}

/// Sleeps until `at_ms` (ms since the Unix epoch), or forever when `None`.
async fn sleep_until(at_ms: Option<u64>) {
    match at_ms {
        Some(at) => {
            let wait = Duration::from_millis(at.saturating_sub(crate::clock::now_ms()));
            tokio::time::sleep(wait).await
        }
        None => std::future::pending().await,
    }
}

/// Runs one connector connection, `registered` with the hub as `(id, outgoing)`, until
/// it closes. The agent's admission (with its `token`) is checked again now that the
/// connection is registered, so that a removal or a revocation that landed while it was
/// set up (and found no connection to close) still closes it.
async fn serve_connection(
    socket: WebSocket,
    did: String,
    token: String,
    (id, outgoing): (u64, Outgoing),
    state: RelayState,
) {
    tracing::info!(agent = %did, "connector connected");
    let (sink, stream) = socket.split();
    let mut link = Link {
        sink,
        outgoing: &outgoing,
        timeout: state.backpressure.send_timeout.min(state.heartbeat.timeout),
    };
    let end = match state.agents.admission(&did, &token, &state.trust).await {
        Ok(None) => converse(&did, &state, &mut link, stream).await,
        Ok(Some(refusal)) => refused_close(refusal),
        Err(err) => {
            tracing::error!(agent = %did, error = %err, "authenticating a connector failed");
            End::Close(1011, "storage_unavailable")
        }
    };
    if let End::Close(code, reason) = end {
        link.close(code, reason).await;
    }
    let why = end.reason();
    drop(link);
    drop(outgoing);
    state.hub.disconnect(&did, id, why);
    state.sessions.disconnected(&did, id);
    tracing::info!(agent = %did, why, "connector disconnected");
}

/// Sends what the session of `did` pushes (every unacked frame first, then new frames
/// as they are recorded and unacked ones when their retry is due), heartbeats, and
/// handles what the connector sends, until the connection ends.
async fn converse(
    did: &str,
    state: &RelayState,
    link: &mut Link<'_>,
    mut stream: SplitStream<WebSocket>,
) -> End {
    let sessions = &*state.sessions;
    let outgoing = link.outgoing;
    // Until the connect push went through, every ask is a connect push.
    let mut connected = ask_session(sessions, did, Ask::Connected, outgoing).await;
    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + state.heartbeat.interval,
        state.heartbeat.interval,
    );
    let mut last_heard = Instant::now();
    loop {
        let step = tokio::select! {
            incoming = stream.next() => {
                last_heard = Instant::now();
                receive(did, sessions, link, incoming).await
            }
            out = outgoing.next() => match out {
                Outbound::Frames(frames) => send_all(link, frames).await,
                Outbound::Close(code, reason) => Err(End::Close(code, reason)),
            },
            _ = sleep_until(outgoing.retry_at_ms()) => {
                outgoing.retry_came();
                let ask = if connected { Ask::Due } else { Ask::Connected };
                connected |= ask_session(sessions, did, ask, outgoing).await;
                Ok(())
            }
            _ = heartbeat.tick() => {
                let beat = Frame::new(FrameBody::Heartbeat);
                link.send(Message::Text(beat.to_json().into())).await
            }
            _ = tokio::time::sleep_until(last_heard + state.heartbeat.timeout) => {
                Err(End::Close(1011, "heartbeat_ack_timeout"))
            }
        };
        if let Err(end) = step {
            return end;
        }
    }
}

/// Sends `frames` in order, written out together (one write for the frames that waited
/// together, rather than one each); `Err` says how the connection ends when one did not
/// go through.
async fn send_all(link: &mut Link<'_>, frames: Vec<String>) -> Result<(), End> {
    for frame in frames {
        let bytes = frame.len();
        link.feed(Message::Text(frame.into())).await?;
        link.outgoing.sent(bytes);
    }
    link.flush().await
}

/// Handles what the connector sent (`incoming`); `Err` says how the connection ends.
async fn receive(
    did: &str,
    sessions: &SessionStore,
    link: &mut Link<'_>,
    incoming: Option<Result<Message, axum::Error>>,
) -> Result<(), End> {
    const TOO_LARGE: End = End::Close(1009, "frame_too_large");
    let text = match incoming {
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(Message::Close(_))) | None => return Err(End::Quiet("closed_by_connector")),
        Some(Ok(_)) => return Ok(()),
        Some(Err(err)) => {
            tracing::info!(agent = %did, error = %err, "connection failed");
            let inner = err.into_inner();
            let capacity = inner
                .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
                .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)));
            return Err(if capacity {
                TOO_LARGE
            } else {
                End::Quiet("receive_failed")
            });
        }
    };
    if text.len() > MAX_FRAME_BYTES {
        return Err(TOO_LARGE);
    }
    let frame = match Frame::parse(&text) {
        Ok(frame) => frame,
        Err(err) => {
            tracing::debug!(agent = %did, error = %err, "unparseable frame ignored");
            return Ok(());
        }
    };
    match frame.body {
        FrameBody::Heartbeat => {
            let ack = Frame::new(FrameBody::HeartbeatAck { ack_id: frame.id });
            link.send(Message::Text(ack.to_json().into())).await?;
        }
        FrameBody::ReceiptAck { ack_id } => {
            let acked = sessions.ack(did, Kind::Receipt, &ack_id);
            settle_in_background(did, "receipt_ack", ack_id, acked);
        }
        FrameBody::DeliverAck {
            ack_id,
            accepted: true,
            ..
        } => {
            let acked = sessions.ack(did, Kind::Deliver, &ack_id);
            settle_in_background(did, "deliver_ack", ack_id, acked);
        }
        FrameBody::DeliverAck {
            ack_id,
            accepted: false,
            reason,
        } => {
            let rejected = sessions.reject(did, Kind::Deliver, &ack_id, reason.as_deref());
            settle_in_background(did, "deliver_ack", ack_id, rejected);
        }
        FrameBody::HeartbeatAck { .. } | FrameBody::Receipt { .. } | FrameBody::Deliver(_) => {}
    }
    Ok(())
}

/// Waits for `settling` (an ack already in the session's mailbox) off the connection
/// task, which goes on sending meanwhile, then logs it (see [`settled`]).
fn settle_in_background(
    did: &str,
    frame_type: &'static str,
    ack_id: String,
    settling: impl std::future::Future<Output = Result<bool, super::sessions::SessionError>>
    + Send
    + 'static,
) {
    let did = did.to_owned();
    tokio::spawn(async move { settled(&did, frame_type, &ack_id, settling.await) });
}

/// Logs what settling the frame `ack_id` (with a `frame_type` ack) did, when it did
/// not simply settle it.
fn settled(
    did: &str,
    frame_type: &str,
    ack_id: &str,
    result: Result<bool, super::sessions::SessionError>,
) {
    match result {
        Ok(true) => {}
        Ok(false) => tracing::debug!(agent = %did, ack_id, frame_type,
            "ack of a frame the session does not hold ignored"),
        Err(err) => tracing::error!(agent = %did, ack_id, frame_type, error = %err,
            "recording an ack failed"),
    }
}

#[cfg(test)]
mod tests {
    use futures_util::stream::SplitStream;
    use serde_json::Value;
    use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

    use super::*;
    use crate::relay::sessions::{
        Delivery, DeliveryIn, DropReason, RelaySessions, Retry, SessionLimits,
    };

    const A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
    const B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
    const DEADLINE: Duration = Duration::from_secs(10);

    type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// The endpoint on a loopback port, with agent `A` registered, sessions within
    /// `limits` and connections within `heartbeat` and `backpressure`; returns the
    /// sessions, the hub, a client of `A` whose connection is live and the temporary
    /// directory of the stores.
    async fn connected(
        limits: SessionLimits,
        heartbeat: Heartbeat,
        backpressure: Backpressure,
    ) -> (
        Arc<RelaySessions>,
        Arc<ConnectionHub>,
        futures_util::stream::SplitSink<Client, tungstenite::Message>,
        SplitStream<Client>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::test_db(dir.path());
        let hub = Arc::new(ConnectionHub::default());
        let sessions = Arc::new(RelaySessions::open(&db, hub.clone(), limits).unwrap());
        let agents = Arc::new(AgentRegistry::open(&db).unwrap());
        let token = agents.add(A).await.unwrap();
        let trust = TrustStore::open(&db, Duration::from_secs(60));
        let trust = Arc::new(trust.unwrap());
        let tokens = crate::tokens::TokenStore::open(&db).unwrap();
        let admin = "a".repeat(crate::auth::MIN_TOKEN_CHARS);
        let auth =
            crate::auth::AuthState::new(&admin, Arc::new(tokens), agents.clone(), trust.clone());
        let state = RelayState {
            agents,
            trust,
            sessions: Arc::new(SessionStore::Sqlite(sessions.clone())),
            hub: hub.clone(),
            heartbeat,
            backpressure,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = crate::auth::protect(router(state), auth);
        tokio::spawn(async move { axum::serve(listener, app).await });
        let url = format!("ws://{address}{CONNECT_PATH}?agent={A}");
        let mut request = url.into_client_request().unwrap();
        let bearer = format!("Bearer {token}").parse().unwrap();
        request.headers_mut().insert("authorization", bearer);
        let (client, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let (sink, stream) = client.split();
        // Live once its connect push went through: new frames are pushed from then on.
        let deadline = Instant::now() + DEADLINE;
        while !hub.is_live(A) {
            assert!(Instant::now() < deadline, "not live within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (sessions, hub, sink, stream, dir)
    }

    /// Heartbeats every minute, a connection closed after a minute of silence.
    const UNHURRIED: Heartbeat = Heartbeat {
        interval: Duration::from_secs(60),
        timeout: Duration::from_secs(60),
    };

    fn delivery(key: &str) -> DeliveryIn {
        DeliveryIn {
            dedup_key: key.into(),
            from_agent_did: B.into(),
            to_agent_did: A.into(),
            payload: r#"{"n": 1}"#.into(),
            delivery_source: None,
            content_type: None,
            group_id: None,
            conversation_id: None,
            reply_to: None,
        }
    }

    /// The next frame whose id is not in `skip`.
    async fn next_frame(stream: &mut SplitStream<Client>, skip: &[&Value]) -> Value {
        loop {
            let message = tokio::time::timeout(DEADLINE, stream.next())
                .await
                .expect("a frame within the deadline")
                .expect("the connection open")
                .unwrap();
            if let tungstenite::Message::Text(text) = message {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if !skip.contains(&&frame["id"]) {
                    return frame;
                }
            }
        }
    }

    fn connector_frame(body: FrameBody) -> tungstenite::Message {
        tungstenite::Message::Text(Frame::new(body).to_json().into())
    }

    #[tokio::test]
    async fn deliver_acks_settle_deliveries_and_refusals_are_dropped_and_counted() {
        let retry = Retry {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(100),
            jitter: 0.0,
            max_attempts: 25,
        };
        let limits = SessionLimits {
            retry,
            ..SessionLimits::default()
        };
        let (sessions, _hub, mut sink, mut stream, _dir) =
            connected(limits, UNHURRIED, Backpressure::default()).await;

        let pushed = sessions.deliver(delivery("k1")).await.unwrap();
        assert_eq!(pushed, Delivery::Pushed(1));
        let first = next_frame(&mut stream, &[]).await;
        assert_eq!(first["type"], "deliver", "{first}");
        let again = next_frame(&mut stream, &[]).await;
        assert_eq!(again, first, "retried while connected and unacked");
        let accepted = FrameBody::DeliverAck {
            ack_id: first["id"].as_str().unwrap().into(),
            accepted: true,
            reason: None,
        };
        sink.send(connector_frame(accepted)).await.unwrap();

        sessions.deliver(delivery("k2")).await.unwrap();
        // Retries of the first sent before its ack was read may come first.
        let second = next_frame(&mut stream, &[&first["id"]]).await;
        assert_eq!(second["payload"], json!({"n": 1}), "{second}");
        let refused = FrameBody::DeliverAck {
            ack_id: second["id"].as_str().unwrap().into(),
            accepted: false,
            reason: Some("no room".into()),
        };
        sink.send(connector_frame(refused)).await.unwrap();
        let unknown = FrameBody::DeliverAck {
            ack_id: ulid::Ulid::new().to_string(),
            accepted: false,
            reason: None,
        };
        sink.send(connector_frame(unknown)).await.unwrap();
        let beat = Frame::new(FrameBody::Heartbeat);
        sink.send(tungstenite::Message::Text(beat.to_json().into()))
            .await
            .unwrap();
        let skip = [&first["id"], &second["id"]];
        let ack = next_frame(&mut stream, &skip).await;
        assert_eq!(
            ack["ackId"],
            beat.id.as_str(),
            "the acks before it are settled"
        );

        assert_eq!(sessions.dropped(Kind::Deliver, DropReason::Rejected), 1);
        let left = sessions.push(A, Ask::Connected).await.unwrap();
        assert!(left.frames.is_empty(), "both settled: {left:?}");
        assert_eq!(left.next_at_ms, None);
    }

    #[tokio::test]
    async fn a_peer_that_talks_but_never_reads_is_dropped_within_the_heartbeat_timeout() {
        let heartbeat = Heartbeat {
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
        };
        // A send timeout of a minute: only the heartbeat timeout bounds the stuck send.
        let backpressure = Backpressure {
            send_timeout: Duration::from_secs(60),
        };
        let (sessions, hub, mut sink, _stream, _dir) =
            connected(SessionLimits::default(), heartbeat, backpressure).await;
        // The peer keeps talking, so only a send that cannot go through can end it.
        let talking = tokio::spawn(async move {
            let mut beats = tokio::time::interval(Duration::from_millis(100));
            loop {
                beats.tick().await;
                if sink
                    .send(connector_frame(FrameBody::Heartbeat))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let pad = json!("f".repeat(1_000_000)).to_string();
        for i in 0..40 {
            let flood = DeliveryIn {
                payload: pad.clone(),
                ..delivery(&format!("flood-{i}"))
            };
            sessions.deliver(flood).await.unwrap();
        }
        let ended = async {
            while !hub.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), ended)
            .await
            .expect("dropped well before the send timeout of a minute");
        talking.abort();
    }

    #[tokio::test]
    async fn a_message_over_the_socket_limit_is_closed_as_too_large() {
        let (_sessions, _hub, mut sink, mut stream, _dir) =
            connected(SessionLimits::default(), UNHURRIED, Backpressure::default()).await;
        let huge = "x".repeat(2 * MAX_FRAME_BYTES + 1);
        // The host may close before it has read the whole message.
        let _ = sink.send(tungstenite::Message::Text(huge.into())).await;
        let close = loop {
            let message = tokio::time::timeout(DEADLINE, stream.next())
                .await
                .expect("an answer within the deadline");
            match message {
                Some(Ok(tungstenite::Message::Close(close))) => break close,
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        let close = close.expect("a close code");
        assert_eq!(
            (u16::from(close.code), close.reason.as_str()),
            (1009, "frame_too_large")
        );
    }
}
