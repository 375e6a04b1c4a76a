//! What every HTTP request and answer goes through, whatever the route: the request head
//! within bounds (414 `uri_too_long`, 431 `headers_too_large`), the body within the
//! [`BodyBudget`], and every error answered with the API's JSON body
//! `{"error": {"code", "message"}}`, the plain-text rejections of the HTTP framework
//! (a path that is not UTF-8, a malformed or repeated query parameter, an oversize
//! body, a wrong method or content type) included.

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt as _;

use crate::api::ApiError;
use crate::body_budget::{BodyBudget, Refused};

/// Longest request target (path and query) answered; longer ones get 414.
pub const MAX_URI_BYTES: usize = 8 << 10;
/// Most request headers answered; more get 431.
pub const MAX_HEADERS: usize = 100;
/// Most bytes of request headers (names and values) answered; more get 431.
pub const MAX_HEADER_BYTES: usize = 32 << 10;
/// Most bytes of a non-JSON error body kept as the JSON error's message.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Answers `request` with `app`, within the head bounds and the `budget`, every error as
/// JSON.
pub async fn handle(app: Router, budget: &BodyBudget, request: Request) -> Response {
    if let Err(refused) = check_head(&request) {
        return refused.into_response();
    }
    let (request, reservation) = match budget.admit(request) {
        Ok(admitted) => admitted,
        Err(refused) => return refused.into_response(),
    };
    let response = match app.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    if reservation.starved() {
        return Refused::Busy.into_response();
    }
    as_json(response).await
}

/// Refuses a request target or headers over the bounds.
fn check_head(request: &Request) -> Result<(), ApiError> {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is {target} bytes; at most {MAX_URI_BYTES} are answered"),
        ));
    }
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "{} headers of {bytes} bytes; at most {MAX_HEADERS} headers of \
                 {MAX_HEADER_BYTES} bytes are answered",
                headers.len()
            ),
        ));
    }
    Ok(())
}

/// `response`, its body turned into the API's JSON error when it is an error without a
/// JSON body.
async fn as_json(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(response.headers()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_MESSAGE_BYTES * 4)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_owned();
    if message.is_empty() {
        message = status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_owned();
    }
    message.truncate(message.floor_char_boundary(MAX_MESSAGE_BYTES));
    let json = ApiError::new(status, code_of(status), message).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    let (json_parts, json_body) = json.into_parts();
    parts.headers.extend(json_parts.headers);
    Response::from_parts(parts, Body::new(json_body))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// The error code of a framework rejection with `status`.
fn code_of(status: StatusCode) -> &'static str {
    let codes = [
        (StatusCode::NOT_FOUND, "not_found"),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
        (StatusCode::URI_TOO_LONG, "uri_too_long"),
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
        ),
        (StatusCode::SERVICE_UNAVAILABLE, "server_busy"),
    ];
    match codes.iter().find(|(s, _)| *s == status) {
        Some((_, code)) => code,
        None if status.is_server_error() => "internal",
        None => "invalid_request",
    }
}
