//! The HTTP server's accept loop: serves the API router on every connection (HTTP/1.1,
//! with upgrades for the relay WebSocket), over TLS when configured, and holds up under
//! abusive clients:
//!
//! - a client has `header_read_timeout` to finish its TLS handshake and each request's
//!   headers, or its connection is closed;
//! - at most `max_connections` connections are open at once. At the cap, a new
//!   connection evicts the oldest one that waits for its client (still sending its
//!   headers or its request body, or idle between requests): clients that never finish
//!   their requests cannot lock out a well-behaved one. Only when every connection is
//!   busy serving a request is the new one closed at once;
//! - every request goes through [`crate::http_guard`] (JSON errors, head limits) and
//!   [`crate::body_budget`] (request bodies buffered at once); the HTTP layer's own
//!   answers to requests it cannot parse are JSON too ([`crate::parse_errors`]).
//!
//! A WebSocket leaves the count once upgraded: the relay hub holds those (one per
//! registered agent). On shutdown, no connection is accepted any more, idle ones are
//! closed, and requests under way finish.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body_budget::BodyBudget;
use crate::http_guard;
use crate::parse_errors::JsonParseErrors;

/// The HTTP server's limits (`[http]` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpLimits {
    /// How long a client may take to finish a TLS handshake and send a request's headers.
    pub header_read_timeout: Duration,
    /// Most connections open at once (WebSockets not counted once upgraded).
    pub max_connections: usize,
    /// Most bytes of request bodies buffered at once, across all requests.
    pub max_buffered_body_bytes: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_buffered_body_bytes: 64 << 20,
        }
    }
}

/// Largest request head (request line and headers) hyper reads; the guard refuses
/// smaller heads than that with JSON errors first.
const MAX_HEAD_BUFFER: usize = 64 << 10;
/// Most headers hyper parses; the guard refuses more than [`http_guard::MAX_HEADERS`].
const MAX_PARSED_HEADERS: usize = 2 * http_guard::MAX_HEADERS;

/// The open connections, oldest first.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: BTreeMap<u64, Connection>,
}

/// One open connection.
struct Connection {
    /// What it is doing.
    activity: Arc<Activity>,
    /// Cancelled to close it.
    evict: CancellationToken,
}

/// What a connection is doing, as counts of [`Counted`] guards.
#[derive(Default)]
struct Activity {
    /// Requests under way (headers read, response not fully sent).
    requests: AtomicUsize,
    /// Request bodies a handler may still read from the client.
    bodies: AtomicUsize,
}

impl Activity {
    /// Whether the connection waits for its client: no request under way (its headers
    /// not sent yet, or idle between requests), or a request body still to come.
    fn waits_for_client(&self) -> bool {
        self.requests.load(Ordering::SeqCst) == 0 || self.bodies.load(Ordering::SeqCst) > 0
    }
}

/// Which count of an [`Activity`] a [`Counted`] holds.
#[derive(Clone, Copy)]
enum Count {
    Request,
    Body,
}

/// One unit of a connection's [`Activity`], held until dropped.
struct Counted(Arc<Activity>, Count);

impl Counted {
    fn start(activity: &Arc<Activity>, count: Count) -> Counted {
        let counted = Counted(activity.clone(), count);
        counted.counter().fetch_add(1, Ordering::SeqCst);
        counted
    }

    fn counter(&self) -> &AtomicUsize {
        match self.1 {
            Count::Request => &self.0.requests,
            Count::Body => &self.0.bodies,
        }
    }

    /// `body`, holding the count until it is done with (sent, read, or dropped).
    fn until_done(self, body: Body) -> Body {
        crate::watched_body::watched(body, move |_| {
            let _counted = &self;
            Ok(())
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.counter().fetch_sub(1, Ordering::SeqCst);
    }
}

impl Connections {
    /// Makes room for one more connection within `max`: evicts the oldest connection
    /// that waits for its client if needed. Returns the new connection's id and state,
    /// or `None` when every connection is busy.
    fn admit(&mut self, max: usize) -> Option<(u64, Arc<Activity>, CancellationToken)> {
        if self.open.len() >= max {
            let idle = self
                .open
                .iter()
                .find(|(_, c)| c.activity.waits_for_client())
                .map(|(id, _)| *id)?;
            if let Some(evicted) = self.open.remove(&idle) {
                evicted.evict.cancel();
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let connection = Connection {
            activity: Arc::default(),
            evict: CancellationToken::new(),
        };
        let admitted = (id, connection.activity.clone(), connection.evict.clone());
        self.open.insert(id, connection);
        Some(admitted)
    }
}

/// Removes its connection from the open ones when dropped.
struct Slot {
    id: u64,
    connections: Arc<Mutex<Connections>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.connections).open.remove(&self.id);
    }
}

fn lock(connections: &Mutex<Connections>) -> std::sync::MutexGuard<'_, Connections> {
    connections
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Everything a connection task needs.
#[derive(Clone)]
struct Shared {
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: HttpLimits,
    budget: BodyBudget,
    connections: Arc<Mutex<Connections>>,
    shutdown: CancellationToken,
}

/// Serves `app` on `listener` (over TLS with `tls`) within `limits` until `shutdown` is
/// cancelled, then waits for the requests under way to finish.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: HttpLimits,
    app: Router,
    shutdown: CancellationToken,
) -> Result<()> {
    let shared = Shared {
        app,
        tls,
        limits,
        budget: BodyBudget::new(limits.max_buffered_body_bytes),
        connections: Arc::default(),
        shutdown: shutdown.clone(),
    };
    ensure_descriptors(limits.max_connections);
    let tasks = TaskTracker::new();
    let mut refusals = Refusals::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, most likely: give the open connections a
                // moment to close rather than spin.
                tracing::warn!("accepting a connection failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = lock(&shared.connections).admit(limits.max_connections);
        let Some((id, activity, evict)) = admitted else {
            refusals.refused(peer, limits.max_connections);
            continue;
        };
        let slot = Slot {
            id,
            connections: shared.connections.clone(),
        };
        tasks.spawn(connection(
            shared.clone(),
            stream,
            peer,
            slot,
            activity,
            evict,
        ));
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// File descriptors kept for everything but the HTTP connections: databases, WebSockets
/// of connectors, handler files, the listener.
const DESCRIPTORS_KEPT: u64 = 256;

/// Raises the process's open-file limit to its hard limit, and warns when that still
/// leaves too few descriptors for `max_connections` connections and the rest.
fn ensure_descriptors(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            }
        }
    }
    let needed = max_connections as u64 + DESCRIPTORS_KEPT;
    if limit.rlim_cur < needed {
        tracing::warn!(
            "the open-file limit ({}) is too low for http.max_connections ({max_connections}) \
             and the host's own files: lower http.max_connections or raise the limit \
             (ulimit -n) to at least {needed}",
            limit.rlim_cur
        );
    }
}

/// How often a refused connection is logged at most.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Connections refused because every open one is busy, logged at most once every
/// [`REFUSAL_LOG_INTERVAL`] with how many were refused since.
#[derive(Default)]
struct Refusals {
    since_logged: u64,
    logged_at: Option<tokio::time::Instant>,
}

impl Refusals {
    fn refused(&mut self, peer: SocketAddr, max_connections: usize) {
        self.since_logged += 1;
        if self
            .logged_at
            .is_some_and(|at| at.elapsed() < REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            %peer,
            refused = self.since_logged,
            "refused connections: all {max_connections} connections (http.max_connections) \
             are serving requests"
        );
        self.since_logged = 0;
        self.logged_at = Some(tokio::time::Instant::now());
    }
}

/// Serves one connection until it ends, is evicted, or shutdown closes it.
async fn connection(
    shared: Shared,
    stream: TcpStream,
    peer: SocketAddr,
    _slot: Slot,
    activity: Arc<Activity>,
    evict: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let Some(tls) = shared.tls.clone() else {
        return serve_io(shared, stream, activity, evict).await;
    };
    let handshake = tokio::select! {
        _ = evict.cancelled() => return,
        _ = shared.shutdown.cancelled() => return,
        handshake = tokio::time::timeout(shared.limits.header_read_timeout, tls.accept(stream)) => handshake,
    };
    match handshake {
        Ok(Ok(stream)) => serve_io(shared, stream, activity, evict).await,
        Ok(Err(error)) => tracing::debug!(%peer, "TLS handshake failed: {error}"),
        Err(_) => tracing::debug!(%peer, "TLS handshake not finished in time"),
    }
}

/// Serves HTTP/1.1 on `io`.
async fn serve_io<I>(shared: Shared, io: I, activity: Arc<Activity>, evict: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (app, budget) = (shared.app.clone(), shared.budget.clone());
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let under_way = Counted::start(&activity, Count::Request);
        let receiving = Counted::start(&activity, Count::Body);
        let request = request.map(|body| receiving.until_done(Body::new(body)));
        let (app, budget) = (app.clone(), budget.clone());
        async move {
            let response = http_guard::handle(app, &budget, request).await;
            Ok::<Response, Infallible>(response.map(|body| under_way.until_done(body)))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BUFFER)
        .max_headers(MAX_PARSED_HEADERS);
    let served = builder
        .serve_connection(TokioIo::new(JsonParseErrors::new(io)), service)
        .with_upgrades();
    tokio::pin!(served);
    tokio::select! {
        result = served.as_mut() => {
            if let Err(error) = result {
                tracing::debug!("connection ended: {error}");
            }
        }
        _ = evict.cancelled() => {}
        _ = shared.shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_connection_waiting_for_its_client_is_evicted() {
        let mut connections = Connections::default();
        let (_, busy, busy_evict) = connections.admit(2).unwrap();
        let _request = Counted::start(&busy, Count::Request);
        let (_, _, idle_evict) = connections.admit(2).unwrap();
        let (_, third, third_evict) = connections.admit(2).unwrap();
        assert!(idle_evict.is_cancelled() && !busy_evict.is_cancelled());
        let _request = Counted::start(&third, Count::Request);
        let body = Counted::start(&third, Count::Body);
        let (_, _, _) = connections.admit(2).unwrap();
        assert!(third_evict.is_cancelled(), "its body was still to come");
        let (_, fourth, _) = connections.admit(2).unwrap();
        drop(body);
        let _request = Counted::start(&fourth, Count::Request);
        assert!(connections.admit(2).is_none(), "every connection is busy");
    }
}
