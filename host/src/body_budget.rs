//! The bound on request bodies buffered at once, across all requests
//! (`http.max_buffered_body_mb`): a request reserves its body's bytes before a handler
//! buffers them, and gives them back once it is answered. A request whose body does not
//! fit in what is left is answered 503 `server_busy` (with `Retry-After`) instead of
//! being buffered; one larger than the whole budget 413 `request_too_large`.
//!
//! A body is reserved chunk by chunk as it arrives, so a client sending slowly holds no
//! more than it sent; one whose `Content-Length` does not fit in what is left is refused
//! before any of it is read (a client sending `Expect: 100-continue` sends none of it).

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::ApiError;

/// Seconds a client refused for want of room is told to wait.
const RETRY_AFTER_SECONDS: &str = "1";

/// The bytes of request bodies that may be buffered at once.
#[derive(Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    max: u64,
}

/// What one request holds of the budget; given back when dropped.
#[derive(Default)]
struct Held {
    permit: Option<OwnedSemaphorePermit>,
    /// A chunk found no room: the request is answered `server_busy`.
    starved: bool,
}

impl Held {
    fn add(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
    }
}

/// A request's share of the budget, held until it is answered.
pub struct Reservation(Arc<Mutex<Held>>);

impl Reservation {
    /// Whether a chunk of the body found no room (the handler then saw the body fail).
    pub fn starved(&self) -> bool {
        self.0.lock().map(|held| held.starved).unwrap_or(true)
    }
}

impl BodyBudget {
    /// A budget of `max` bytes (at most `u32::MAX`).
    pub fn new(max: u64) -> BodyBudget {
        let max = max.min(u64::from(u32::MAX));
        BodyBudget {
            bytes: Arc::new(Semaphore::new(max as usize)),
            max,
        }
    }

    /// Meters `request`'s body, or refuses it when it cannot be buffered now: a
    /// `Content-Length` larger than the whole budget or than what is left of it.
    pub fn admit(&self, request: Request) -> Result<(Request, Reservation), Refused> {
        let length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(length) = length {
            if length > self.max {
                return Err(Refused::TooLarge {
                    length,
                    max: self.max,
                });
            }
            if length > self.bytes.available_permits() as u64 {
                return Err(Refused::Busy);
            }
        }
        let held = Arc::new(Mutex::new(Held::default()));
        let request = request.map(|body| metered(body, self.bytes.clone(), held.clone()));
        Ok((request, Reservation(held)))
    }
}

/// Why a body is not buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It is larger than the whole budget: 413 `request_too_large`.
    TooLarge {
        /// Its `Content-Length`.
        length: u64,
        /// The budget.
        max: u64,
    },
    /// What is buffered leaves no room for it now: 503 `server_busy`, `Retry-After`.
    Busy,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            Refused::TooLarge { length, max } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!(
                    "a body of {length} bytes is more than the host buffers at once \
                     (http.max_buffered_body_mb: {max} bytes)"
                ),
            ),
            Refused::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                "the host is buffering as many request bodies as it may \
                 (http.max_buffered_body_mb); try again shortly"
                    .to_owned(),
            ),
        };
        let mut response = ApiError::new(status, code, message).into_response();
        if self == Refused::Busy {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        response
    }
}

/// Makes the allocator give every large buffer (a request body) back to the OS as soon as
/// it is freed. glibc otherwise raises its mmap threshold after the first such buffer
/// is freed and keeps the later ones in its heaps, where freed bodies pile up as
/// resident memory the budget does not see.
pub fn return_large_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator setting; a fixed threshold is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The error a metered body fails with when a chunk finds no room.
#[derive(Debug, thiserror::Error)]
#[error("no room to buffer the request body (http.max_buffered_body_mb)")]
struct NoRoom;

/// `body`, reserving each chunk in `bytes` as it arrives and keeping it in `held`.
fn metered(body: Body, bytes: Arc<Semaphore>, held: Arc<Mutex<Held>>) -> Body {
    crate::watched_body::watched(body, move |chunk| {
        let permit = u32::try_from(chunk.len())
            .ok()
            .and_then(|n| bytes.clone().try_acquire_many_owned(n).ok());
        let mut held = lock(&held);
        match permit {
            Some(permit) => {
                held.add(permit);
                Ok(())
            }
            None => {
                held.starved = true;
                Err(NoRoom.into())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_length(length: u64) -> Request {
        Request::builder()
            .header(header::CONTENT_LENGTH, length)
            .body(Body::empty())
            .unwrap()
    }

    #[test]
    fn a_body_is_refused_while_what_is_buffered_leaves_no_room_for_it() {
        let budget = BodyBudget::new(100);
        let (request, first) = budget.admit(with_length(0)).unwrap();
        drop(request);
        let held = budget.bytes.clone().try_acquire_many_owned(60).unwrap();
        lock(&first.0).add(held);
        assert_eq!(budget.admit(with_length(60)).err(), Some(Refused::Busy));
        drop(first);
        assert!(budget.admit(with_length(60)).is_ok());
        assert_eq!(
            budget.admit(with_length(101)).err(),
            Some(Refused::TooLarge {
                length: 101,
                max: 100
            })
        );
    }
}
