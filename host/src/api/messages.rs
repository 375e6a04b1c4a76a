//! The routes that browse and repair the messages of a queue, dead-letter queues above
//! all: list them page by page, show one, redrive them (to the queue each was
//! dead-lettered from, or to a named queue) and purge them.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{ApiError, AppState, parse_json};
use crate::queue::lane::Lane;
use crate::queue::{ContentType, RedriveTarget, Selection, StoredMessage};

/// Messages per page when the request does not say.
const DEFAULT_PAGE: usize = 50;
/// Most messages per page.
const MAX_PAGE: usize = 1000;

/// `GET /v1/queues/{queue}/messages` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `POST /v1/queues/{queue}/redrive` body; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveRequest {
    ids: Option<Vec<String>>,
    consumer: Option<String>,
    to: Option<String>,
}

/// `DELETE /v1/queues/{queue}/messages` body: exactly one of its fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    ids: Option<Vec<String>>,
    consumer: Option<String>,
    #[serde(default)]
    all: bool,
}

/// `GET /v1/queues/{queue}/messages?limit=&cursor=`: one page of the queue's messages in
/// publish order, and the cursor of the next page (`null` on the last one).
pub(super) async fn list(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    state.known_queue(&queue)?;
    let Query(query) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let after = query
        .cursor
        .map(|cursor| {
            cursor.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "cursor `{cursor}` is not one a previous page returned"
                ))
            })
        })
        .transpose()?;
    let page = state.backend.list(&queue, after, limit).await?;
    Ok(Json(json!({
        "queue": queue,
        "messages": page.messages.iter().map(message_json).collect::<Vec<_>>(),
        "cursor": page.next.map(|next| next.to_string()),
    })))
}

/// `GET /v1/queues/{queue}/messages/{id}`: one message.
pub(super) async fn show(
    State(state): State<AppState>,
    Path((queue, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    state.known_queue(&queue)?;
    match state.backend.get(&queue, &id).await? {
        Some(message) => Ok(Json(message_json(&message))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "message_not_found",
            format!("no message `{id}` in queue `{queue}`"),
        )),
    }
}

/// `POST /v1/queues/{queue}/redrive` with `{"ids": [...], "to": "queue"}` (or
/// `"consumer"` for `ids`), all optional: moves the messages (all, those ids, or the
/// copies kept for that consumer) to the queue each was dead-lettered from, or to
/// `to`, with their attempts reset. Answers `{"redriven": n, "skipped": m}`, `skipped`
/// counting the selected messages that record no source queue the host serves. A message
/// goes back only to the consumer that gave up on it; one sent to `to` goes to the
/// consumers of `to` that subscribe to it.
pub(super) async fn redrive(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    state.known_queue(&queue)?;
    let request: RedriveRequest = parse_optional_json(body)?;
    let selection = selection(request.ids, request.consumer)?;
    state.known_selection(&queue, &selection).await?;
    let target = match request.to {
        Some(to) if to == queue => {
            return Err(ApiError::bad_request(format!(
                "`to` is `{queue}` itself: name another queue, or leave `to` out to send each message back to its source queue"
            )));
        }
        Some(to) => {
            state.known_queue(&to)?;
            RedriveTarget::Queue(to)
        }
        None => RedriveTarget::Source {
            known: state
                .queues
                .iter()
                .flat_map(|(queue, info)| {
                    std::iter::once(Lane::of(queue))
                        .chain(info.consumers.iter().map(|c| c.lane.clone()))
                })
                .collect(),
        },
    };
    let summary = state.backend.redrive(&queue, &selection, &target).await?;
    tracing::info!(queue, redriven = summary.redriven, skipped = summary.skipped, to = ?target, "messages redriven");
    Ok(Json(
        json!({"redriven": summary.redriven, "skipped": summary.skipped}),
    ))
}

/// `DELETE /v1/queues/{queue}/messages` with `{"ids": [...]}`, `{"consumer": "name"}` or
/// `{"all": true}`: deletes those messages, the copies kept for that consumer, or every
/// message. A request without any of them is refused: deleting a whole queue must be
/// asked for. Answers `{"purged": n}`.
pub(super) async fn purge(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    state.known_queue(&queue)?;
    let request: PurgeRequest = parse_optional_json(body)?;
    let selection = match (request.all, selection(request.ids, request.consumer)?) {
        (true, Selection::All) => Selection::All,
        (true, _) => {
            return Err(ApiError::bad_request(
                "give one of `ids`, `consumer` or `all`, not several",
            ));
        }
        (false, Selection::All) => {
            return Err(ApiError::bad_request(
                "say which messages to purge: `ids`, `consumer`, or `\"all\": true` to delete every message of the queue",
            ));
        }
        (false, selection) => selection,
    };
    state.known_selection(&queue, &selection).await?;
    let purged = state.backend.purge(&queue, &selection).await?;
    tracing::info!(queue, purged, "messages purged");
    Ok(Json(json!({"purged": purged})))
}

/// Parses a JSON body that may be left out (empty): then every field takes its default.
fn parse_optional_json<T: DeserializeOwned + Default>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    match body {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(T::default()),
        body => parse_json(body),
    }
}

/// The messages an `ids` or a `consumer` field selects (the copies kept for that consumer
/// of the queue): all without either; an empty list is refused, being more likely a
/// mistake than a wish to do nothing.
fn selection(ids: Option<Vec<String>>, consumer: Option<String>) -> Result<Selection, ApiError> {
    match (ids, consumer) {
        (Some(_), Some(_)) => Err(ApiError::bad_request("give `ids` or `consumer`, not both")),
        (None, Some(consumer)) => Ok(Selection::Consumer(consumer)),
        (None, None) => Ok(Selection::All),
        (Some(ids), None) if ids.is_empty() => Err(ApiError::bad_request(
            "`ids` is empty: list message ids, or leave `ids` out to select every message",
        )),
        (Some(ids), None) => Ok(Selection::Ids(ids)),
    }
}

/// A stored message as the API shows it; the body is JSON for a `json` message, a string
/// for `text` and base64 for `bytes` (as producers send them).
fn message_json(m: &StoredMessage) -> Value {
    let body = match m.content_type {
        ContentType::Json => serde_json::from_slice(&m.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&m.body).into_owned())),
        ContentType::Text => Value::String(String::from_utf8_lossy(&m.body).into_owned()),
        ContentType::Bytes => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&m.body))
        }
    };
    json!({
        "id": m.id,
        "consumer": m.consumer,
        "state": m.state.as_str(),
        "attempts": m.attempts,
        "published_ms": m.published_ms,
        "first_failed_ms": m.first_failed_ms,
        "last_failed_ms": m.last_failed_ms,
        "last_error": m.last_error,
        "dead_lettered_ms": m.dead_lettered_ms,
        "dead_reason": m.dead_reason,
        "source_queue": m.source_queue,
        "source_consumer": m.source_consumer,
        "source_attempts": m.source_attempts,
        "content_type": m.content_type.as_str(),
        "body": body,
    })
}
