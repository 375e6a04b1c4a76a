//! Who may call which route: the one table of every route and the access it needs
//! ([`ROUTES`]), the one middleware that checks it for every request ([`protect`]), and
//! the admin token the host starts with ([`admin_token`]).
//!
//! Three kinds of bearer token: the admin token (and admin tokens issued with `clawq
//! tokens add --role admin`) may call everything; a producer token (`clawq tokens add
//! --role producer --queue Q`) may only publish to the queues it names; an agent's
//! connector token (`clawq agents add`) only opens that agent's connector WebSocket. Only
//! `GET /healthz`, and `GET /metrics` when `metrics_public = true`, need no token; a route
//! the table does not know needs an admin token too (401 without one, 404 with it).
//! Tokens are compared as SHA-256 digests: in constant time for the admin token, by a
//! lookup of the digest for the issued ones. The middleware puts who called
//! ([`Principal`]) into the request's extensions.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::agents::AgentRegistry;
use crate::api::ApiError;
use crate::crypto::sha256;
use crate::tokens::{Role, TokenStore};
use crate::trust::TrustStore;

/// The file of the generated admin token, in the data directory.
pub const TOKEN_FILE: &str = "admin.token";
/// The shortest admin token accepted, in characters.
pub const MIN_TOKEN_CHARS: usize = 32;

/// What a route needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing: open to anyone who reaches the port.
    Open,
    /// Nothing when the config says `metrics_public = true`, else an admin token.
    Metrics,
    /// A producer token naming the route's `{queue}`, or an admin token.
    Producer,
    /// The connector token of the agent the query names (`?agent=<did>`); an admin token
    /// does not do.
    Agent,
    /// An admin token.
    Admin,
}

/// One route of the HTTP API and the access it needs.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Its method (`HEAD` is served as `GET`).
    pub method: &'static str,
    /// Its path; a `{name}` segment matches any one segment.
    pub path: &'static str,
    /// What its caller needs.
    pub access: Access,
}

const fn route(method: &'static str, path: &'static str, access: Access) -> Route {
    Route {
        method,
        path,
        access,
    }
}

/// Every route the host serves, with the access it needs; the first that matches a
/// request's method and path applies, and a request none matches needs an admin token.
pub const ROUTES: &[Route] = &[
    route("GET", "/healthz", Access::Open),
    route("GET", "/metrics", Access::Metrics),
    route("POST", "/v1/queues/{queue}/messages", Access::Producer),
    route(
        "POST",
        "/v1/queues/{queue}/messages/batch",
        Access::Producer,
    ),
    route("GET", "/v1/relay/connect", Access::Agent),
    route("GET", "/v1/queues", Access::Admin),
    route("GET", "/v1/queues/{queue}", Access::Admin),
    route("GET", "/v1/queues/{queue}/messages", Access::Admin),
    route("DELETE", "/v1/queues/{queue}/messages", Access::Admin),
    route("GET", "/v1/queues/{queue}/messages/{id}", Access::Admin),
    route("POST", "/v1/queues/{queue}/redrive", Access::Admin),
    route("GET", "/v1/trust/agents/{did}", Access::Admin),
    route("GET", "/v1/relay", Access::Admin),
    route("GET", "/v1/handlers", Access::Admin),
    route("GET", "/v1/handlers/{consumer}", Access::Admin),
    route("PUT", "/v1/handlers/{consumer}", Access::Admin),
    route("POST", "/v1/handlers/{consumer}/rollback", Access::Admin),
    route("POST", "/v1/agents", Access::Admin),
    route("GET", "/v1/agents", Access::Admin),
    route("DELETE", "/v1/agents/{did}", Access::Admin),
    route("POST", "/v1/tokens", Access::Admin),
    route("GET", "/v1/tokens", Access::Admin),
    route("DELETE", "/v1/tokens/{id}", Access::Admin),
];

/// The access a request with `method` and `path` needs, and the `{queue}` segment of
/// its route, if it has one.
pub fn access_of<'p>(method: &str, path: &'p str) -> (Access, Option<&'p str>) {
    let method = if method == "HEAD" { "GET" } else { method };
    let given: Vec<&str> = path.split('/').collect();
    for route in ROUTES.iter().filter(|r| r.method == method) {
        let pattern: Vec<&str> = route.path.split('/').collect();
        if pattern.len() != given.len() {
            continue;
        }
        let mut queue = None;
        let matched = pattern.iter().zip(&given).all(|(p, g)| {
            if *p == "{queue}" {
                queue = Some(*g);
            }
            p == g || (p.starts_with('{') && !g.is_empty())
        });
        if matched {
            return (route.access, queue);
        }
    }
    (Access::Admin, None)
}

/// Who made a request, as the middleware found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Anyone: an open route, or every route but the connector's when the host runs
    /// with `--insecure-no-auth`.
    Anyone,
    /// The admin token, or an issued admin token.
    Admin,
    /// A producer token, by its id.
    Producer(String),
    /// The connector of an agent, with the token it presented (its admission is checked
    /// again once the connection is registered).
    Agent {
        /// The agent's DID.
        did: String,
        /// Its connector token.
        token: String,
    },
}

/// What the middleware checks requests against.
#[derive(Clone)]
pub struct AuthState {
    /// The SHA-256 of the admin token.
    admin: [u8; 32],
    /// The issued tokens.
    tokens: Arc<TokenStore>,
    /// The agents and their connector tokens.
    agents: Arc<AgentRegistry>,
    /// Who is revoked (a revoked agent's connector is refused).
    trust: Arc<TrustStore>,
    /// Whether `/metrics` is open.
    metrics_public: bool,
    /// Whether every route but the connector's is open.
    insecure_no_auth: bool,
}

impl AuthState {
    /// Checks requests against the `admin` token, the issued `tokens` and the `agents`
    /// (those `trust` holds revoked refused).
    pub fn new(
        admin: &str,
        tokens: Arc<TokenStore>,
        agents: Arc<AgentRegistry>,
        trust: Arc<TrustStore>,
    ) -> Self {
        AuthState {
            admin: sha256(admin.as_bytes()),
            tokens,
            agents,
            trust,
            metrics_public: false,
            insecure_no_auth: false,
        }
    }

    /// Opens `/metrics` to anyone when `public`.
    pub fn metrics_public(self, public: bool) -> Self {
        AuthState {
            metrics_public: public,
            ..self
        }
    }

    /// Opens every route but the connector's when `insecure`.
    pub fn insecure_no_auth(self, insecure: bool) -> Self {
        AuthState {
            insecure_no_auth: insecure,
            ..self
        }
    }

    /// Who may make a request of `method` to `uri` with `headers`, or the refusal to
    /// answer.
    async fn principal(
        &self,
        method: &str,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Principal, Response> {
        let (access, queue) = access_of(method, uri.path());
        if access == Access::Agent {
            return self.agent(uri, headers).await;
        }
        let public = match access {
            Access::Open => true,
            Access::Metrics => self.metrics_public,
            _ => false,
        };
        if public || self.insecure_no_auth {
            return Ok(Principal::Anyone);
        }
        let Some(given) = bearer(headers) else {
            return Err(unauthorized(
                "this route needs `Authorization: Bearer <token>`",
            ));
        };
        if bool::from(sha256(given.as_bytes()).ct_eq(&self.admin)) {
            return Ok(Principal::Admin);
        }
        let found = self
            .tokens
            .find(given)
            .await
            .map_err(|err| unavailable(&err))?;
        let Some(token) = found else {
            return Err(unauthorized("unknown token"));
        };
        match (token.role, access, queue) {
            (Role::Admin, _, _) => Ok(Principal::Admin),
            (Role::Producer, Access::Producer, Some(queue))
                if token.queues.iter().any(|q| q == queue) =>
            {
                Ok(Principal::Producer(token.id))
            }
            (Role::Producer, Access::Producer, Some(queue)) => Err(forbidden(format!(
                "producer token {} may not publish to `{queue}` (it publishes to {})",
                token.id,
                token.queues.join(", ")
            ))),
            (Role::Producer, _, _) => Err(forbidden(format!(
                "producer token {} may only publish to its queues; this route needs an \
                 admin token",
                token.id
            ))),
        }
    }

    /// The connector of the agent the query names, if its token is that agent's and the
    /// agent is not revoked.
    async fn agent(&self, uri: &Uri, headers: &HeaderMap) -> Result<Principal, Response> {
        let did = axum::extract::Query::<ConnectQuery>::try_from_uri(uri)
            .ok()
            .and_then(|query| query.0.agent);
        let (Some(did), Some(token)) = (did, bearer(headers)) else {
            return Err(unauthorized(
                "an ?agent=<did> and an `Authorization: Bearer <token>` are required",
            ));
        };
        let token = token.to_owned();
        match self.agents.admission(&did, &token, &self.trust).await {
            Ok(None) => Ok(Principal::Agent { did, token }),
            Ok(Some(refusal)) => {
                let why = refusal.message();
                tracing::info!(agent = %did, why, "connector refused");
                Err(unauthorized(why))
            }
            Err(err) => {
                tracing::error!(error = %err, "authenticating a connector failed");
                Err(unavailable(&err))
            }
        }
    }
}

/// The query of the connector's route.
#[derive(serde::Deserialize)]
struct ConnectQuery {
    agent: Option<String>,
}

/// The bearer token of a request with `headers`, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A 401 `unauthorized` answer, with `WWW-Authenticate: Bearer`.
fn unauthorized(message: &str) -> Response {
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// A 403 `forbidden` answer: a valid token that may not call the route.
fn forbidden(message: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response()
}

/// A 503 `storage_unavailable` answer: the stores could not say who is calling.
fn unavailable(err: &anyhow::Error) -> Response {
    let code = "storage_unavailable";
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, format!("{err:#}")).into_response()
}

/// `router`, every route of it (its fallback included) behind the access check of
/// [`ROUTES`].
pub fn protect(router: Router, state: AuthState) -> Router {
    router.layer(middleware::from_fn_with_state(state, authenticate))
}

/// The middleware: refuses the request, or passes it on with its [`Principal`] in its
/// extensions.
async fn authenticate(
    State(state): State<AuthState>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    let (uri, headers) = (request.uri().clone(), request.headers().clone());
    match state.principal(method.as_str(), &uri, &headers).await {
        Ok(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(refusal) => refusal,
    }
}

/// Where the admin token comes from, for the errors that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenSetting {
    /// The token.
    pub token: String,
    /// Where it was given (the config file's `admin_token`, `--admin-token` /
    /// `CLAWQ_ADMIN_TOKEN`).
    pub origin: String,
}

/// The admin token `clawq serve` starts with: `configured` if given, else the one in
/// `<data_dir>/admin.token`, else one generated there (mode 0600), but only when `listen`
/// is a loopback address or `insecure_no_auth` is set. A token shorter than [`MIN_TOKEN_CHARS`] is
/// refused, the error naming where it came from; so is a non-loopback address without a
/// token, the error saying what to do.
pub fn admin_token(
    data_dir: &Path,
    configured: Option<&AdminTokenSetting>,
    listen: SocketAddr,
    insecure_no_auth: bool,
) -> anyhow::Result<String> {
    if let Some(setting) = configured {
        return sane(setting.token.trim(), &setting.origin);
    }
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) => return sane(token.trim(), &format!("the token file {}", path.display())),
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("reading the admin token {}", path.display()));
        }
        Err(_) => {}
    }
    if !listen.ip().is_loopback() && !insecure_no_auth {
        bail!(
            "refusing to serve on {listen} without an admin token: anyone who reaches that \
             address could publish, read, purge and redrive every queue. Set `admin_token` \
             in the config or CLAWQ_ADMIN_TOKEN (at least {MIN_TOKEN_CHARS} characters), or \
             listen on a loopback address (a token is then generated into {}), or pass \
             --insecure-no-auth to serve every route but the connector's without a token",
            path.display()
        );
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

/// `token`, unless it is shorter than [`MIN_TOKEN_CHARS`].
fn sane(token: &str, origin: &str) -> anyhow::Result<String> {
    let chars = token.chars().count();
    if chars < MIN_TOKEN_CHARS {
        bail!(
            "the admin token from {origin} is {}: it must be at least {MIN_TOKEN_CHARS} \
             characters (e.g. `openssl rand -hex 32`), or remove it to have one generated",
            if chars == 0 {
                "empty".to_owned()
            } else {
                format!("{chars} characters long")
            }
        );
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_decides_and_unknown_routes_need_an_admin_token() {
        assert_eq!(access_of("GET", "/healthz"), (Access::Open, None));
        assert_eq!(access_of("HEAD", "/healthz"), (Access::Open, None));
        assert_eq!(
            access_of("POST", "/v1/queues/q1/messages/batch"),
            (Access::Producer, Some("q1"))
        );
        assert_eq!(
            access_of("GET", "/v1/queues/q1/messages/batch"),
            (Access::Admin, Some("q1"))
        );
        assert_eq!(access_of("POST", "/healthz"), (Access::Admin, None));
        assert_eq!(
            access_of("POST", "/v1/queues//messages"),
            (Access::Admin, None)
        );
        assert_eq!(access_of("GET", "/nope"), (Access::Admin, None));
    }

    #[test]
    fn short_tokens_are_refused_naming_their_origin() {
        let dir = tempfile::tempdir().unwrap();
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let short = AdminTokenSetting {
            token: "abc".into(),
            origin: "CLAWQ_ADMIN_TOKEN".into(),
        };
        let err = admin_token(dir.path(), Some(&short), loopback, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("from CLAWQ_ADMIN_TOKEN is 3 characters"),
            "{err}"
        );
        std::fs::write(dir.path().join(TOKEN_FILE), "\n").unwrap();
        let err = admin_token(dir.path(), None, loopback, false).unwrap_err();
        assert!(err.to_string().contains("admin.token is empty"), "{err}");
    }
}
