//! End to end: who may call which route. Every route of the host's table is called with
//! no token, a wrong token, an agent's connector token, a producer token for another
//! queue, one for the route's queue and the admin token; each answers the status its
//! access says, and a refused call changes nothing. Issued tokens are shown once, listed
//! without their secret and refused as soon as they are removed; a host on a
//! non-loopback address without an admin token, or with a short one, does not start.

use crate::support::*;
use clawq::auth::{Access, ROUTES};
use serde_json::{Value, json};

/// Two queues without consumers: their messages stay where they are published.
const CONFIG: &str = r#"
[[queues.producers]]
queue = "jobs"

[[queues.producers]]
queue = "other"
"#;

/// Who a call is made as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Nobody,
    WrongToken,
    Agent,
    ProducerOfOther,
    ProducerOfJobs,
    Admin,
}

const CALLERS: [Caller; 6] = [
    Caller::Nobody,
    Caller::WrongToken,
    Caller::Agent,
    Caller::ProducerOfOther,
    Caller::ProducerOfJobs,
    Caller::Admin,
];

/// One call of the table: a route of the host's table, the access this test holds it
/// needs (the table must agree), the concrete request made to it, and the status its own
/// credential gets (the admin token; the agent's token for the connector's route).
struct Call {
    method: &'static str,
    pattern: &'static str,
    access: Access,
    path: String,
    body: Option<Value>,
    allowed: u16,
}

/// The tokens of the table's callers.
struct Tokens {
    admin: String,
    agent: String,
    producer_of_other: String,
    producer_of_jobs: String,
}

impl Tokens {
    fn of(&self, caller: Caller) -> Option<&str> {
        match caller {
            Caller::Nobody => None,
            Caller::WrongToken => Some("cqadm_0000000000000000000000000000000000000000"),
            Caller::Agent => Some(&self.agent),
            Caller::ProducerOfOther => Some(&self.producer_of_other),
            Caller::ProducerOfJobs => Some(&self.producer_of_jobs),
            Caller::Admin => Some(&self.admin),
        }
    }
}

/// The status `caller` gets from a route needing `access`, whose own credential gets
/// `allowed`.
fn expected(access: Access, caller: Caller, allowed: u16) -> u16 {
    use Caller::*;
    match (access, caller) {
        (Access::Open, _) => 200,
        (Access::Agent, Agent) => allowed,
        (Access::Agent, _) => 401,
        (_, Nobody | WrongToken | Agent) => 401,
        (Access::Producer, ProducerOfJobs) => allowed,
        (_, ProducerOfOther | ProducerOfJobs) => 403,
        (_, Admin) => allowed,
    }
}

/// The status and JSON body of `method` `path` with `body`, sent to `host` as the holder
/// of `token` (`None`: without credentials).
fn call(
    host: &Host,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    answer(host.send_as(token, method, path, body))
}

/// A token issued through the API.
fn issue(host: &Host, role: &str, queues: &[&str]) -> (String, String) {
    let (status, reply) = host.post("/v1/tokens", &json!({"role": role, "queues": queues}));
    assert_eq!(status, 200, "{reply}");
    let field = |name: &str| reply[name].as_str().unwrap().to_owned();
    (field("id"), field("token"))
}

/// What a refused call must leave as it was: the queues' counts and messages, the
/// agents, the tokens, the handlers and the trust store.
fn state(host: &Host) -> Value {
    let read = |path: &str| {
        let (status, body) = host.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        body
    };
    json!({
        "queues": read("/v1/queues"),
        "jobs": read("/v1/queues/jobs/messages"),
        "other": read("/v1/queues/other/messages"),
        "agents": read("/v1/agents"),
        "tokens": read("/v1/tokens"),
        "handlers": read("/v1/handlers"),
        "revoked": host.is_revoked(DID_A),
    })
}

#[test]
fn every_route_answers_each_caller_as_its_access_says_and_refusals_change_nothing() {
    let host = Host::start(CONFIG);
    let agent = host.add_agent(DID_A);
    let (_, producer_of_other) = issue(&host, "producer", &["other"]);
    let (_, producer_of_jobs) = issue(&host, "producer", &["jobs"]);
    let (victim_token, _) = issue(&host, "producer", &["jobs"]);
    let tokens = Tokens {
        admin: host.admin_token(),
        agent,
        producer_of_other,
        producer_of_jobs,
    };
    let id = host.publish("jobs", json!({"n": "shown"}));
    let victim = host.publish("jobs", json!({"n": "purged"}));
    // Each route with the body sent to it and what its own credential gets. The
    // connector's token passes its route, where a plain GET is then no WebSocket
    // upgrade (400); the deploy is refused as no component (400); there is no earlier
    // version to roll back to (404).
    let publish = Some(json!({"body": 1}));
    let batch = Some(json!({"messages": [{"body": 2}]}));
    let purge = Some(json!({"ids": [victim]}));
    let redrive = Some(json!({"ids": [id], "to": "other"}));
    let agent = Some(json!({"did": DID_B}));
    let token = Some(json!({"role": "producer", "queues": ["jobs"]}));
    let rows: [(&'static str, &'static str, Option<Value>, u16); 23] = [
        ("GET", "/healthz", None, 200),
        ("GET", "/metrics", None, 200),
        ("POST", "/v1/queues/{queue}/messages", publish, 200),
        ("POST", "/v1/queues/{queue}/messages/batch", batch, 200),
        ("GET", "/v1/relay/connect", None, 400),
        ("GET", "/v1/queues", None, 200),
        ("GET", "/v1/queues/{queue}", None, 200),
        ("GET", "/v1/queues/{queue}/messages", None, 200),
        ("GET", "/v1/queues/{queue}/messages/{id}", None, 200),
        ("DELETE", "/v1/queues/{queue}/messages", purge, 200),
        ("POST", "/v1/queues/{queue}/redrive", redrive, 200),
        ("GET", "/v1/trust/agents/{did}", None, 200),
        ("GET", "/v1/relay", None, 200),
        ("GET", "/v1/handlers", None, 200),
        ("GET", "/v1/handlers/{consumer}", None, 200),
        (
            "PUT",
            "/v1/handlers/{consumer}",
            Some(json!("not wasm")),
            400,
        ),
        ("POST", "/v1/handlers/{consumer}/rollback", None, 404),
        ("POST", "/v1/agents", agent, 200),
        ("GET", "/v1/agents", None, 200),
        ("DELETE", "/v1/agents/{did}", None, 200),
        ("POST", "/v1/tokens", token, 200),
        ("GET", "/v1/tokens", None, 200),
        ("DELETE", "/v1/tokens/{id}", None, 200),
    ];
    let calls = rows.map(|(method, pattern, body, allowed)| Call {
        method,
        pattern,
        access: match pattern {
            "/healthz" => Access::Open,
            "/metrics" => Access::Metrics,
            "/v1/relay/connect" => Access::Agent,
            "/v1/queues/{queue}/messages" | "/v1/queues/{queue}/messages/batch"
                if method == "POST" =>
            {
                Access::Producer
            }
            _ => Access::Admin,
        },
        path: match pattern {
            "/v1/relay/connect" => format!("{pattern}?agent={DID_A}"),
            "/v1/agents/{did}" => format!("/v1/agents/{DID_B}"),
            "/v1/tokens/{id}" => format!("/v1/tokens/{victim_token}"),
            _ => pattern
                .replace("{queue}", "jobs")
                .replace("{id}", &id)
                .replace("{did}", DID_A)
                .replace("{consumer}", "clawdentity-events"),
        },
        body,
        allowed,
    });
    let key = |method: &str, path: &str, access: Access| format!("{method} {path} {access:?}");
    let mut tabled: Vec<String> = ROUTES
        .iter()
        .map(|r| key(r.method, r.path, r.access))
        .collect();
    let mut called: Vec<String> = calls
        .iter()
        .map(|c| key(c.method, c.pattern, c.access))
        .collect();
    tabled.sort();
    called.sort();
    assert_eq!(
        called, tabled,
        "the test calls every route of the table, with the access it holds each needs"
    );

    for call in &calls {
        for caller in CALLERS {
            let before = state(&host);
            let response = host.send_as(
                tokens.of(caller),
                call.method,
                &call.path,
                call.body.as_ref(),
            );
            let challenge = response.headers().get("www-authenticate").cloned();
            let (status, body) = answer(response);
            let what = format!("{caller:?} {} {}", call.method, call.path);
            let want = expected(call.access, caller, call.allowed);
            assert_eq!(status, want, "{what}: {body}");
            if status == 401 || status == 403 {
                let code = if status == 401 {
                    "unauthorized"
                } else {
                    "forbidden"
                };
                assert_eq!(body["error"]["code"], code, "{what}: {body}");
                assert_eq!(
                    challenge.is_some(),
                    status == 401,
                    "{what}: WWW-Authenticate on a 401 only"
                );
            }
            if status >= 400 {
                assert_eq!(state(&host), before, "{what} changed nothing");
            }
        }
    }

    // A route the table does not know: a token first, then the router's answer.
    for (method, path, allowed) in [("GET", "/v1/nope", 404), ("DELETE", "/healthz", 405)] {
        assert_eq!(
            call(&host, None, method, path, None).0,
            401,
            "{method} {path}"
        );
        let with_admin = host.send_as(Some(&tokens.admin), method, path, None);
        assert_eq!(with_admin.status(), allowed, "{method} {path}");
    }
}

#[test]
fn a_producer_token_cannot_revoke_an_agent_through_another_queue() {
    let host = Host::start(CONFIG);
    let (_, producer) = issue(&host, "producer", &["jobs"]);
    let revocation = json!({"body": revocation_event("agent_revoked", json!({"agentDid": DID_A}))});
    let (status, body) = call(
        &host,
        Some(&producer),
        "POST",
        "/v1/queues/clawdentity-events/messages",
        Some(&revocation),
    );
    assert_eq!((status, &body["error"]["code"]), (403, &json!("forbidden")));
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("may not publish to `clawdentity-events`"),
        "{message}"
    );
    assert_eq!(
        host.queue("clawdentity-events")["backlog"],
        0,
        "nothing stored"
    );
    assert!(!host.is_revoked(DID_A));
}

#[test]
fn tokens_are_shown_once_listed_without_secret_and_refused_once_removed() {
    let host = Host::start(CONFIG);
    let output = host.cli_output(&[
        "tokens", "add", "--role", "producer", "--queue", "jobs", "--name", "ci",
    ]);
    assert!(output.status.success(), "{output:?}");
    let secret = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    let said = String::from_utf8(output.stderr).unwrap();
    assert!(secret.starts_with("cqp_"), "{secret}");
    assert!(said.contains("it is not shown again"), "{said}");
    let publish = || {
        let body = json!({"body": {"n": 1}});
        call(
            &host,
            Some(&secret),
            "POST",
            "/v1/queues/jobs/messages",
            Some(&body),
        )
        .0
    };
    assert_eq!(publish(), 200);

    let listed = host.cli(&["tokens", "list"]);
    assert!(
        !listed.contains(&secret),
        "the secret is never listed: {listed}"
    );
    let row = listed
        .lines()
        .find(|l| l.contains(" ci "))
        .unwrap_or_else(|| panic!("no row named ci in {listed}"));
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[1..4], ["producer", "jobs", "ci"], "{listed}");
    let (_, api) = host.get("/v1/tokens");
    assert_eq!(
        json_keys(&api["tokens"][0]),
        ["createdAt", "id", "name", "queues", "role"].into(),
        "{api}"
    );

    host.cli(&["tokens", "remove", fields[0]]);
    assert_eq!(publish(), 401, "refused at once");
    let again = host.cli_output(&["tokens", "remove", fields[0]]);
    let said = String::from_utf8(again.stderr).unwrap();
    assert!(said.contains("token_not_found, HTTP 404"), "{said}");

    let unserved = host.cli_output(&["tokens", "add", "--role", "producer", "--queue", "nope"]);
    let said = String::from_utf8(unserved.stderr).unwrap();
    assert!(!unserved.status.success());
    assert!(said.contains("no queue named `nope` is served"), "{said}");
    assert!(
        host.cli(&["tokens", "list"]).lines().count() == 1,
        "only the header left"
    );

    let admin = host.cli(&["tokens", "add", "--role", "admin"]);
    let admin = admin.trim();
    assert_eq!(call(&host, Some(admin), "GET", "/v1/queues", None).0, 200);
}

/// `clawq serve` with `args` and the config `CONFIG` after `settings`, on a fresh data
/// directory prepared by `prepare`, refusing to start: what it said.
fn refused_start(settings: &str, args: &[&str], prepare: impl FnOnce(&std::path::Path)) -> String {
    refused_serve_with(&format!("{settings}\n{CONFIG}"), args, prepare)
}

#[test]
fn a_non_loopback_host_needs_a_token_or_insecure_no_auth() {
    let said = refused_start("", &["--listen", "0.0.0.0:0"], |_| {});
    assert!(
        said.contains("refusing to serve on 0.0.0.0:0 without an admin token")
            && said.contains("CLAWQ_ADMIN_TOKEN")
            && said.contains("--insecure-no-auth"),
        "{said}"
    );

    let token = "t".repeat(40);
    let config = format!("admin_token = \"{token}\"\n{CONFIG}");
    let host = Host::start_on("0.0.0.0:0", &config, &[]).with_admin_token(&token);
    assert_eq!(call(&host, None, "GET", "/v1/queues", None).0, 401);
    assert_eq!(host.get("/v1/queues").0, 200);
    assert!(
        !host.data_dir().join("admin.token").exists(),
        "none generated"
    );
    drop(host);

    let open = Host::start_on("0.0.0.0:0", CONFIG, &["--insecure-no-auth"]);
    open.wait_log_all(&["INSECURE", "without a token"]);
    assert_eq!(call(&open, None, "GET", "/v1/queues", None).0, 200);
    let body = json!({"body": {"n": 1}});
    let published = call(&open, None, "POST", "/v1/queues/jobs/messages", Some(&body));
    assert_eq!(published.0, 200, "{published:?}");
    assert_eq!(
        open.refused_status(DID_A, None),
        401,
        "agents still need their token"
    );
}

#[test]
fn an_empty_or_short_admin_token_is_refused_naming_where_it_came_from() {
    let said = refused_start("", &[], |data| {
        std::fs::write(data.join("admin.token"), "short\n").unwrap();
    });
    assert!(
        said.contains("admin.token is 5 characters long") && said.contains("at least 32"),
        "{said}"
    );
    let said = refused_start("admin_token = \"\"", &[], |_| {});
    assert!(
        said.contains("from the config's `admin_token` is empty"),
        "{said}"
    );
    let said = refused_start("", &["--admin-token", "0123456789"], |_| {});
    assert!(
        said.contains("from --admin-token or CLAWQ_ADMIN_TOKEN is 10 characters long"),
        "{said}"
    );
}

#[test]
fn metrics_are_open_only_when_the_config_says_so() {
    let host = Host::start(CONFIG);
    assert_eq!(call(&host, None, "GET", "/metrics", None).0, 401);
    let public = Host::start(&format!("metrics_public = true\n{CONFIG}"));
    let response = public.send_as(None, "GET", "/metrics", None);
    assert_eq!(response.status(), 200);
    assert!(response.text().unwrap().contains("clawq_queue_backlog"));
    assert_eq!(
        call(&public, None, "GET", "/v1/queues", None).0,
        401,
        "only /metrics"
    );
}

#[test]
fn every_route_the_host_serves_is_in_the_table() {
    let tabled: Vec<&str> = ROUTES.iter().map(|r| r.path).collect();
    let mut served: Vec<String> = Vec::new();
    for (file, source) in host_sources() {
        // The routers of the unit tests' fakes are not the host's.
        let source = source.split("#[cfg(test)]").next().unwrap();
        for (at, _) in source.match_indices(".route(") {
            let rest = source[at + ".route(".len()..].trim_start();
            let path = match rest.strip_prefix('"') {
                Some(literal) => literal.split('"').next().unwrap(),
                None if rest.starts_with("CONNECT_PATH") => clawq::frame::CONNECT_PATH,
                None => panic!(
                    "{}: a route whose path this test cannot read",
                    file.display()
                ),
            };
            served.push(path.to_owned());
        }
    }
    assert!(served.len() >= ROUTES.len() / 2, "routes found: {served:?}");
    for path in served {
        assert!(
            tabled.contains(&path.as_str()),
            "{path} is served but not in auth::ROUTES"
        );
    }
}
