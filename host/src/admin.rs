//! The admin HTTP API: handler versions (deploy, list, history, rollback) and the agents
//! whose connectors may connect (add, list, remove). Every route needs `Authorization:
//! Bearer <admin token>`; the token is generated into the data directory on first start
//! unless the config or `CLAWQ_ADMIN_TOKEN` gives one.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde_json::{Value, json};

use crate::agents::{AgentError, AgentRegistry};
use crate::api::ApiError;
use crate::handlers::{HandlerSlots, Slot, SlotError};
use crate::relay::hub::ConnectionHub;
use crate::runtime::LoadedHandler;
use crate::trust::TrustStore;

/// Largest component accepted by a deploy.
const MAX_COMPONENT_BYTES: usize = 64 << 20;
/// The file of the generated admin token, in the data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// What the admin API serves from.
#[derive(Clone)]
pub struct AdminState {
    /// The handler slots.
    pub slots: Arc<HandlerSlots>,
    /// The token every request must present.
    pub token: Arc<str>,
    /// The agents whose connectors may connect.
    pub agents: Arc<AgentRegistry>,
    /// Who is revoked (a revoked agent is not added).
    pub trust: Arc<TrustStore>,
    /// The open connector connections (a removed agent's is closed).
    pub hub: Arc<ConnectionHub>,
}

/// The admin token: `configured` if given, else the one in `data_dir`, generated (mode
/// 0600) on first start.
pub fn admin_token(data_dir: &Path, configured: Option<String>) -> anyhow::Result<String> {
    if let Some(token) = configured.filter(|t| !t.trim().is_empty()) {
        return Ok(token);
    }
    let path = data_dir.join(TOKEN_FILE);
    if let Ok(token) = std::fs::read_to_string(&path) {
        return Ok(token.trim().to_owned());
    }
    let token = crate::crypto::random_token("cqadm_")?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing the admin token to {}", path.display()))?;
        writeln!(file, "{token}")?;
    }
    tracing::info!(path = %path.display(), "generated the admin API token");
    Ok(token)
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/handlers", get(list))
        .route("/v1/handlers/{consumer}", put(deploy).get(show))
        .route("/v1/handlers/{consumer}/rollback", post(rollback))
        .route("/v1/agents", post(add_agent).get(list_agents))
        .route("/v1/agents/{did}", delete(remove_agent))
        .layer(DefaultBodyLimit::max(MAX_COMPONENT_BYTES))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given != Some(&*state.token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin API needs `Authorization: Bearer <admin token>`",
        );
    }
    next.run(request).await
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

/// Runs a registry call off the async threads (SQLite blocks).
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| AgentError::Storage(e.to_string()))?
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
    let token = blocking(move || state.agents.register(&request.did, &state.trust))
        .await
        .map_err(IntoResponse::into_response)?;
    tracing::info!(agent = %did, "agent registered");
    Ok(Json(json!({"did": did, "token": token})))
}

/// `GET /v1/agents`: the registered agents (never their tokens).
async fn list_agents(State(state): State<AdminState>) -> Result<Json<Value>, AgentError> {
    let agents = blocking(move || Ok(state.agents.list()?)).await?;
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
    let agents = state.agents.clone();
    let removed = did.clone();
    blocking(move || agents.remove(&removed)).await?;
    let closed = state.hub.close(&did, 1008, "agent_removed");
    tracing::info!(agent = %did, closed, "agent removed");
    Ok(Json(
        json!({"did": did, "removed": true, "connection_closed": closed}),
    ))
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
    body["history"] = serde_json::to_value(state.slots.history(&consumer)?).unwrap_or_default();
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
