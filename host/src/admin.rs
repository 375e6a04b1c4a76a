//! The admin HTTP API: handler versions (deploy, list, history, rollback), the agents
//! whose connectors may connect (add, list, remove) and the issued API tokens (add, list,
//! remove). Every route needs an admin token (see `auth`).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde_json::{Value, json};

use crate::agents::{AgentError, AgentRegistry};
use crate::api::ApiError;
use crate::handlers::{HandlerSlots, Slot, SlotError};
use crate::relay::hub::ConnectionHub;
use crate::runtime::LoadedHandler;
use crate::tokens::{Role, Token, TokenStore};
use crate::trust::TrustStore;

/// Largest component accepted by a deploy.
const MAX_COMPONENT_BYTES: usize = 64 << 20;

/// What the admin API serves from.
#[derive(Clone)]
pub struct AdminState {
    /// The handler slots.
    pub slots: Arc<HandlerSlots>,
    /// The issued API tokens.
    pub tokens: Arc<TokenStore>,
    /// The queues served (a producer token names some of them).
    pub queues: Arc<BTreeSet<String>>,
    /// The agents whose connectors may connect.
    pub agents: Arc<AgentRegistry>,
    /// Who is revoked (a revoked agent is not added).
    pub trust: Arc<TrustStore>,
    /// The open connector connections (a removed agent's is closed).
    pub hub: Arc<ConnectionHub>,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/handlers", get(list))
        .route("/v1/handlers/{consumer}", put(deploy).get(show))
        .route("/v1/handlers/{consumer}/rollback", post(rollback))
        .route("/v1/agents", post(add_agent).get(list_agents))
        .route("/v1/agents/{did}", delete(remove_agent))
        .route("/v1/tokens", post(add_token).get(list_tokens))
        .route("/v1/tokens/{id}", delete(remove_token))
        .layer(DefaultBodyLimit::max(MAX_COMPONENT_BYTES))
        .with_state(state)
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    ApiError::new(status, code, message).into_response()
}

impl IntoResponse for SlotError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            SlotError::UnknownSlot(_) => (StatusCode::NOT_FOUND, "handler_not_found"),
            SlotError::Refused(_) => (StatusCode::BAD_REQUEST, "invalid_component"),
            SlotError::NoSuchVersion(_) => (StatusCode::NOT_FOUND, "version_not_found"),
            SlotError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_failed"),
        };
        error(status, code, self.to_string())
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            AgentError::InvalidDid { .. } => (StatusCode::BAD_REQUEST, "invalid_did"),
            AgentError::AlreadyRegistered(_) => (StatusCode::CONFLICT, "agent_exists"),
            AgentError::Revoked(_) => (StatusCode::CONFLICT, "agent_revoked"),
            AgentError::NotRegistered(_) => (StatusCode::NOT_FOUND, "agent_not_found"),
            AgentError::Storage(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable"),
        };
        error(status, code, self.to_string())
    }
}

/// The body of `POST /v1/agents`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AddAgent {
    did: String,
}

/// `POST /v1/agents`: registers an agent (unless it is revoked) and answers its token,
/// which is not shown again.
async fn add_agent(State(state): State<AdminState>, body: Bytes) -> Result<Json<Value>, Response> {
    let request: AddAgent = serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("expected {{\"did\": \"<agent DID>\"}}: {e}"),
        )
    })?;
    let did = request.did.clone();
    let token = state
        .agents
        .register(&request.did, &state.trust)
        .await
        .map_err(IntoResponse::into_response)?;
    tracing::info!(agent = %did, "agent registered");
    Ok(Json(json!({"did": did, "token": token})))
}

/// `GET /v1/agents`: the registered agents (never their tokens).
async fn list_agents(State(state): State<AdminState>) -> Result<Json<Value>, AgentError> {
    let agents = state.agents.list().await?;
    let agents: Vec<Value> = agents
        .into_iter()
        .map(|a| json!({"did": a.did, "addedAt": crate::clock::iso8601(a.added_ms)}))
        .collect();
    Ok(Json(json!({"agents": agents})))
}

/// `DELETE /v1/agents/{did}`: removes an agent and closes its open connection (1008
/// `agent_removed`).
async fn remove_agent(
    State(state): State<AdminState>,
    UrlPath(did): UrlPath<String>,
) -> Result<Json<Value>, AgentError> {
    state.agents.remove(&did).await?;
    let closed = state.hub.close(&did, 1008, "agent_removed");
    tracing::info!(agent = %did, closed, "agent removed");
    Ok(Json(
        json!({"did": did, "removed": true, "connection_closed": closed}),
    ))
}

/// The body of `POST /v1/tokens`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AddToken {
    role: Role,
    #[serde(default)]
    queues: Vec<String>,
    #[serde(default)]
    name: String,
}

fn token_json(token: &Token) -> Value {
    json!({
        "id": token.id,
        "name": token.name,
        "role": token.role.name(),
        "queues": token.queues,
        "createdAt": crate::clock::iso8601(token.created_ms),
    })
}

fn storage_error(err: impl std::fmt::Display) -> Response {
    let code = "storage_unavailable";
    error(StatusCode::SERVICE_UNAVAILABLE, code, err.to_string())
}

/// The answer to a token store call that failed.
fn token_storage_error(err: anyhow::Error) -> Response {
    storage_error(format!("{err:#}"))
}

/// `POST /v1/tokens`: issues a token (a producer token for the served queues it names,
/// or an admin token) and answers it with its secret, which is not shown again.
async fn add_token(State(state): State<AdminState>, body: Bytes) -> Result<Json<Value>, Response> {
    let request: AddToken = serde_json::from_slice(&body).map_err(|e| {
        let expected = r#"expected {"role": "producer" | "admin", "queues": [...], "name": "..."}"#;
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{expected}: {e}"),
        )
    })?;
    match request.role {
        Role::Producer if request.queues.is_empty() => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "a producer token names the queues it publishes to (`queues`)",
            ));
        }
        Role::Admin if !request.queues.is_empty() => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "an admin token may call every route: it names no queues",
            ));
        }
        _ => {}
    }
    if let Some(unknown) = request.queues.iter().find(|q| !state.queues.contains(*q)) {
        let served: Vec<&str> = state.queues.iter().map(String::as_str).collect();
        return Err(error(
            StatusCode::NOT_FOUND,
            "queue_not_found",
            format!(
                "no queue named `{unknown}` is served, so no token publishes to it (the \
                 queues: {})",
                served.join(", ")
            ),
        ));
    }
    let (token, secret) = state
        .tokens
        .create(request.role, &request.queues, &request.name)
        .await
        .map_err(token_storage_error)?;
    tracing::info!(id = %token.id, role = token.role.name(), queues = ?token.queues, "token issued");
    let mut body = token_json(&token);
    body["token"] = secret.into();
    Ok(Json(body))
}

/// `GET /v1/tokens`: the issued tokens (never their secrets).
async fn list_tokens(State(state): State<AdminState>) -> Result<Json<Value>, Response> {
    let tokens = state.tokens.list().await.map_err(token_storage_error)?;
    let tokens: Vec<Value> = tokens.iter().map(token_json).collect();
    Ok(Json(json!({"tokens": tokens})))
}

/// `DELETE /v1/tokens/{id}`: removes a token; the next request with it is refused.
async fn remove_token(
    State(state): State<AdminState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, Response> {
    if !state
        .tokens
        .remove(&id)
        .await
        .map_err(token_storage_error)?
    {
        return Err(error(
            StatusCode::NOT_FOUND,
            "token_not_found",
            format!("no token with id `{id}`"),
        ));
    }
    tracing::info!(id = %id, "token removed");
    Ok(Json(json!({"id": id, "removed": true})))
}

fn version_json(handler: &LoadedHandler) -> Value {
    json!({"name": handler.name(), "version": handler.version(), "size": handler.size()})
}

fn slot_json(consumer: &str, slot: &Slot) -> Value {
    json!({
        "consumer": consumer,
        "queue": slot.queue(),
        "filter": slot.filter().to_json(),
        "world": slot.world().name(),
        "current": version_json(&slot.current()),
        "counters": slot.counters(),
    })
}

async fn list(State(state): State<AdminState>) -> Json<Value> {
    let handlers: Vec<Value> = state
        .slots
        .all()
        .map(|(consumer, slot)| slot_json(consumer, slot))
        .collect();
    Json(json!({"handlers": handlers}))
}

async fn show(
    State(state): State<AdminState>,
    UrlPath(consumer): UrlPath<String>,
) -> Result<Json<Value>, SlotError> {
    let slot = state.slots.slot(&consumer)?;
    let mut body = slot_json(&consumer, slot);
    body["history"] =
        serde_json::to_value(state.slots.history(&consumer).await?).unwrap_or_default();
    Ok(Json(body))
}

/// The query of a deploy: `?name=` names the component (logs, listings).
#[derive(serde::Deserialize)]
struct DeployQuery {
    name: Option<String>,
}

async fn deploy(
    State(state): State<AdminState>,
    UrlPath(consumer): UrlPath<String>,
    axum::extract::Query(query): axum::extract::Query<DeployQuery>,
    wasm: Bytes,
) -> Result<Json<Value>, SlotError> {
    let started = std::time::Instant::now();
    let name = query.name.as_deref();
    let handler = state
        .slots
        .deploy(&consumer, name, wasm.to_vec(), "api")
        .await?;
    let mut body = version_json(&handler);
    body["consumer"] = consumer.into();
    body["load_ms"] = (started.elapsed().as_secs_f64() * 1000.0).into();
    Ok(Json(body))
}

async fn rollback(
    State(state): State<AdminState>,
    UrlPath(consumer): UrlPath<String>,
    body: Bytes,
) -> Result<Json<Value>, Response> {
    let version = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let request: Value = serde_json::from_slice(&body).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("invalid JSON body: {e}"),
            )
        })?;
        match request.get("version") {
            None | Some(Value::Null) => None,
            Some(Value::String(v)) => Some(v.clone()),
            Some(_) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "`version` must be a string",
                ));
            }
        }
    };
    let handler = state
        .slots
        .rollback(&consumer, version.as_deref(), "rollback")
        .await
        .map_err(IntoResponse::into_response)?;
    let mut body = version_json(&handler);
    body["consumer"] = consumer.into();
    Ok(Json(body))
}
