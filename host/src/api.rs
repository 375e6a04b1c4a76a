//! The HTTP API, shaped like Cloudflare Queues' REST API: publish messages, read queue
//! counts, read the trust store, check health. Every error is a JSON body
//! `{"error": {"code": ..., "message": ...}}`, and a refused request stores nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::queue::lane::Lane;
use crate::queue::{
    ContentType, LimitError, NewMessage, QueueBackend, QueueCounts, QueueError, Selection,
};
use crate::trust::{TrustError, TrustStore};

mod messages;

/// Largest request body accepted before parsing (a full batch, base64 and JSON escapes
/// included); the message limits proper are checked after parsing.
const MAX_REQUEST_BYTES: usize = 4 << 20;

/// A body above this size is parsed off the runtime's worker threads.
const LARGE_BODY_BYTES: usize = 64 << 10;

/// What the API serves from.
#[derive(Clone)]
pub struct AppState {
    /// The queue engine.
    pub backend: Arc<dyn QueueBackend>,
    /// Every queue served, with what consumes it.
    pub queues: Arc<BTreeMap<String, QueueInfo>>,
    /// The trust store.
    pub trust: Arc<TrustStore>,
    /// The NATS cluster the host shares its queues and state through, if it does.
    pub cluster: Option<crate::cluster::Cluster>,
}

/// What the API tells about a queue besides its counts.
#[derive(Debug, Clone, Default)]
pub struct QueueInfo {
    /// Its consumers; the queue's default consumer (named like it) first.
    pub consumers: Vec<ConsumerInfo>,
    /// The dead-letter queue of its first consumer, if any.
    pub dead_letter_queue: Option<String>,
    /// How long it keeps a message: a publish delayed that long would expire unseen.
    pub retention: std::time::Duration,
}

/// One consumer of a queue, as the API shows it.
#[derive(Debug, Clone)]
pub struct ConsumerInfo {
    /// The consumer's name (its handler slot).
    pub name: String,
    /// Where its copies of the queue's messages are kept.
    pub lane: Lane,
    /// Its handler, if it has one.
    pub handler: Option<String>,
    /// The messages it takes, field by field (`{}`: all).
    pub filter: Value,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/queues", get(list_queues))
        .route("/v1/queues/{queue}", get(queue_status))
        .route(
            "/v1/queues/{queue}/messages",
            post(publish_one)
                .get(messages::list)
                .delete(messages::purge),
        )
        .route("/v1/queues/{queue}/messages/{id}", get(messages::show))
        .route("/v1/queues/{queue}/redrive", post(messages::redrive))
        .route("/v1/queues/{queue}/messages/batch", post(publish_batch))
        .route("/v1/trust/agents/{did}", get(agent_trust))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(state)
}

/// `GET /healthz`: 200 while the host can serve. A host on a NATS cluster answers 503
/// while it has lost the connection (it reconnects by itself), naming the outage.
async fn healthz(State(state): State<AppState>) -> Response {
    match &state.cluster {
        None => Json(json!({"status": "ok"})).into_response(),
        Some(cluster) if cluster.is_connected() => {
            Json(json!({"status": "ok", "nats": "connected"})).into_response()
        }
        Some(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unavailable",
                "nats": "disconnected",
                "error": {
                    "code": "nats_unavailable",
                    "message": "the host lost its connection to NATS and is reconnecting",
                },
            })),
        )
            .into_response(),
    }
}

/// A JSON error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error answer with this status, machine-readable code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<QueueError> for ApiError {
    fn from(err: QueueError) -> Self {
        match err {
            QueueError::Limit(limit) => {
                let (status, code) = match limit {
                    LimitError::BodyTooLarge { .. } => {
                        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
                    }
                    LimitError::BatchTooLarge(_) => {
                        (StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large")
                    }
                    LimitError::TooManyMessages(_) => {
                        (StatusCode::BAD_REQUEST, "too_many_messages")
                    }
                    LimitError::EmptyBatch => (StatusCode::BAD_REQUEST, "empty_batch"),
                    LimitError::DelayTooLong { .. } => (StatusCode::BAD_REQUEST, "delay_too_long"),
                };
                ApiError::new(status, code, limit.to_string())
            }
            // A settlement's error; no route settles, but one would fail the same way.
            QueueError::Storage(message) | QueueError::SideEffects(message) => {
                tracing::error!(%message, "queue storage failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    message,
                )
            }
        }
    }
}

impl From<TrustError> for ApiError {
    fn from(err: TrustError) -> Self {
        match err {
            TrustError::InvalidDid { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_did", err.to_string())
            }
            TrustError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                err.to_string(),
            ),
        }
    }
}

/// One message as a producer sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    /// The body as the producer wrote it: a `json` body is stored as these bytes, so it
    /// is never parsed into a tree and written out again.
    body: Box<RawValue>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    delay_seconds: u32,
}

/// A batch as a producer sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    messages: Vec<PublishRequest>,
}

impl PublishRequest {
    /// The message to store, with its body encoded as its content type says.
    fn into_message(self, index: usize) -> Result<NewMessage, ApiError> {
        let name = self.content_type.as_deref().unwrap_or("json");
        let content_type = ContentType::parse(name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "message {index}: content_type `{name}` is not one of json, text, bytes"
            ))
        })?;
        let string = |body: &RawValue| {
            serde_json::from_str::<String>(body.get()).map_err(|_| {
                ApiError::bad_request(format!(
                    "message {index}: a {name} body must be a JSON string"
                ))
            })
        };
        let body = match content_type {
            ContentType::Json => Box::<str>::from(self.body).into_string().into_bytes(),
            ContentType::Text => string(&self.body)?.into_bytes(),
            ContentType::Bytes => base64::engine::general_purpose::STANDARD
                .decode(string(&self.body)?)
                .map_err(|e| {
                    ApiError::bad_request(format!("message {index}: body is not valid base64: {e}"))
                })?,
        };
        Ok(NewMessage {
            content_type,
            body,
            delay_seconds: self.delay_seconds,
        })
    }
}

/// Parses a JSON request body, turning every failure into a clear JSON error.
fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            "request_too_large",
            rejection.body_text(),
        )
    })?;
    let parse = || {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    };
    // Parsing megabytes holds the thread a while: let the runtime's other tasks (every
    // other request) move to another thread meanwhile.
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if bytes.len() > LARGE_BODY_BYTES && multi_thread {
        tokio::task::block_in_place(parse)
    } else {
        parse()
    }
}

impl AppState {
    fn known_queue(&self, queue: &str) -> Result<&QueueInfo, ApiError> {
        self.queues.get(queue).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "queue_not_found",
                format!("no queue named `{queue}`"),
            )
        })
    }

    /// Refuses a selection of the copies kept for a consumer that `queue` neither has in
    /// the config nor holds messages for (a name mistyped, most likely): acting on it
    /// would silently do nothing.
    async fn known_selection(&self, queue: &str, selection: &Selection) -> Result<(), ApiError> {
        let Selection::Consumer(consumer) = selection else {
            return Ok(());
        };
        let info = self.known_queue(queue)?;
        if info.consumers.iter().any(|c| &c.name == consumer) {
            return Ok(());
        }
        let lane = Lane::new(queue, consumer);
        if self
            .backend
            .lanes(queue)
            .await?
            .iter()
            .any(|(l, _)| *l == lane)
        {
            return Ok(());
        }
        let configured: Vec<&str> = info.consumers.iter().map(|c| c.name.as_str()).collect();
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "consumer_not_found",
            format!(
                "queue `{queue}` has no consumer `{consumer}` and holds no messages kept for one \
                 (its consumers: {})",
                if configured.is_empty() {
                    "none".to_owned()
                } else {
                    configured.join(", ")
                }
            ),
        ))
    }

    async fn publish(
        &self,
        queue: &str,
        requests: Vec<PublishRequest>,
    ) -> Result<Vec<String>, ApiError> {
        let retention = self.known_queue(queue)?.retention.as_secs();
        let messages = requests
            .into_iter()
            .enumerate()
            .map(|(index, request)| request.into_message(index))
            .collect::<Result<Vec<_>, _>>()?;
        let expiring = messages
            .iter()
            .position(|m| u64::from(m.delay_seconds) >= retention);
        if let Some(index) = expiring {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "delay_too_long",
                format!(
                    "message {index}: delay_seconds is {}, not shorter than the retention of \
                     queue `{queue}` ({retention} s): it would expire before its first delivery",
                    messages[index].delay_seconds
                ),
            ));
        }
        let ids = self.backend.publish(queue, messages).await?;
        crate::metrics::published(queue, ids.len());
        Ok(ids)
    }

    async fn status_of(&self, queue: &str) -> Result<Value, ApiError> {
        let info = self.known_queue(queue)?;
        let lanes: HashMap<Lane, QueueCounts> =
            self.backend.lanes(queue).await?.into_iter().collect();
        let counts = QueueCounts::total(lanes.values());
        let consumers: Vec<Value> = info
            .consumers
            .iter()
            .map(|c| {
                let counts = lanes.get(&c.lane).copied().unwrap_or_default();
                json!({
                    "name": c.name,
                    "handler": c.handler,
                    "filter": c.filter,
                    "backlog": counts.backlog,
                    "in_flight": counts.in_flight,
                    "delayed": counts.delayed,
                })
            })
            .collect();
        let dead_lettered = match &info.dead_letter_queue {
            Some(dlq) => Some(self.backend.counts(dlq).await?.held()),
            None => None,
        };
        Ok(json!({
            "queue": queue,
            "backlog": counts.backlog,
            "in_flight": counts.in_flight,
            "delayed": counts.delayed,
            "handler": info.consumers.first().and_then(|c| c.handler.clone()),
            "consumers": consumers,
            "dead_letter_queue": info.dead_letter_queue,
            "dead_lettered": dead_lettered,
        }))
    }
}

async fn publish_one(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    state.known_queue(&queue)?;
    let request: PublishRequest = parse_json(body)?;
    let ids = state.publish(&queue, vec![request]).await?;
    Ok(Json(json!({"id": ids[0]})))
}

async fn publish_batch(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    state.known_queue(&queue)?;
    let request: BatchRequest = parse_json(body)?;
    let ids = state.publish(&queue, request.messages).await?;
    Ok(Json(json!({"ids": ids})))
}

async fn queue_status(
    State(state): State<AppState>,
    Path(queue): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(state.status_of(&queue).await?))
}

async fn list_queues(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut queues = Vec::new();
    for name in state.queues.keys() {
        queues.push(state.status_of(name).await?);
    }
    Ok(Json(json!({"queues": queues})))
}

async fn agent_trust(
    State(state): State<AppState>,
    Path(did): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let found = state.trust.lookup(&did).await?;
    Ok(Json(json!({
        "did": did,
        "revoked": found.revoked_at_ms.is_some(),
        "revokedAt": found.revoked_at_ms.map(crate::clock::iso8601),
        "expiresAt": found.expires_at_ms.map(crate::clock::iso8601),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(request: &str) -> Result<NewMessage, ApiError> {
        serde_json::from_str::<PublishRequest>(request)
            .unwrap()
            .into_message(0)
    }

    #[test]
    fn a_json_body_is_stored_as_the_producer_wrote_it() {
        let body = r#"{ "type": "agent.revoked", "agentDid": "did:cdi:x", "n": 123456789012345678901234 }"#;
        let message = stored(&format!(r#"{{"body": {body}}}"#)).unwrap();
        assert_eq!(message.content_type, ContentType::Json);
        // Keys in their order, the spaces, and a number no f64 holds: all kept.
        assert_eq!(String::from_utf8(message.body).unwrap(), body);
    }

    #[test]
    fn text_and_bytes_bodies_are_decoded_from_their_json_string() {
        let text = stored(r#"{"body": "caf\u00e9 \"quoted\"", "content_type": "text"}"#).unwrap();
        assert_eq!(text.body, "café \"quoted\"".as_bytes());
        let bytes = stored(r#"{"body": "AAEC/w==", "content_type": "bytes"}"#).unwrap();
        assert_eq!(bytes.body, [0, 1, 2, 255]);
        for (request, error) in [
            (
                r#"{"body": {"a": 1}, "content_type": "text"}"#,
                "message 0: a text body must be a JSON string",
            ),
            (
                r#"{"body": 7, "content_type": "bytes"}"#,
                "message 0: a bytes body must be a JSON string",
            ),
        ] {
            let err = stored(request).expect_err(request);
            assert_eq!(err.message, error, "{request}");
        }
    }
}
