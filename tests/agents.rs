//! End to end: the agents whose connectors may connect, managed through the running
//! host (`POST/GET/DELETE /v1/agents`, `clawq agents add|list|remove`) or offline on a
//! data directory; a removal or a revocation closes the agent's connection at once, a
//! revoked agent cannot be added, and `clawq connect` says why the host refused it.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::*;
use serde_json::{Value, json};

/// Runs `clawq <args>` in the directory `cwd` with only the environment `env` set for
/// clawq (no `CLAWQ_DATA_DIR` unless given), as an operator would from anywhere.
fn clawq_in(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_clawq"));
    command.args(args).current_dir(cwd);
    for var in [
        "CLAWQ_SERVER",
        "CLAWQ_DATA_DIR",
        "CLAWQ_ADMIN_TOKEN",
        "CLAWQ_CONFIG",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied()).output().unwrap()
}

/// The text of `output`'s stdout, once it succeeded.
fn succeeded(output: Output) -> String {
    assert!(
        output.status.success(),
        "clawq failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The stderr of `output`, once it failed.
fn failed(output: Output) -> String {
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(!output.status.success(), "clawq succeeded: {stderr}");
    stderr
}

/// The DIDs of `GET /v1/agents`.
fn listed(host: &Host) -> Vec<String> {
    let (status, reply) = host.admin("GET", "/v1/agents", Vec::new(), None);
    assert_eq!(status, 200, "{reply}");
    reply["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|agent| {
            let keys: Vec<&String> = agent.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["addedAt", "did"], "no token is listed: {agent}");
            agent["did"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Waits until the host counts `n` open connector connections.
fn wait_connections(host: &Host, n: u64) {
    wait_for(&format!("{n} open connections"), || {
        (host.get("/v1/relay").1["connections"] == n).then_some(())
    });
}

#[test]
fn agents_added_from_another_directory_are_registered_in_the_running_host() {
    let host = Host::start("");
    let elsewhere = tempfile::tempdir().unwrap();
    let admin = host.admin_token();
    let env = [
        ("CLAWQ_SERVER", host.base.as_str()),
        ("CLAWQ_ADMIN_TOKEN", admin.as_str()),
    ];

    let no_token = clawq_in(
        elsewhere.path(),
        &[("CLAWQ_SERVER", &host.base)],
        &["agents", "add", DID_A],
    );
    let said = failed(no_token);
    assert!(
        said.contains("works through the running host") && said.contains("admin.token"),
        "{said}"
    );
    let token = succeeded(clawq_in(elsewhere.path(), &env, &["agents", "add", DID_A]));
    let token = token.trim();
    assert!(token.starts_with("cqa_"), "{token}");
    assert!(
        !elsewhere.path().join(".clawq").exists(),
        "no registry is created where the command runs"
    );
    host.connect(DID_A, Some(token))
        .expect("the running host takes the token");
    assert_eq!(listed(&host), [DID_A]);
    let list = succeeded(clawq_in(elsewhere.path(), &env, &["agents", "list"]));
    assert!(list.starts_with(&format!("{DID_A}\t20")), "{list}");

    let again = failed(clawq_in(elsewhere.path(), &env, &["agents", "add", DID_A]));
    assert!(
        again.contains("already registered") && again.contains("agent_exists, HTTP 409"),
        "{again}"
    );
    let unauthorized = clawq_in(
        elsewhere.path(),
        &[
            ("CLAWQ_SERVER", &host.base),
            ("CLAWQ_ADMIN_TOKEN", "cqadm_wrong"),
        ],
        &["agents", "add", DID_B],
    );
    assert!(failed(unauthorized).contains("HTTP 401"));
    let (status, reply) = host.admin(
        "POST",
        "/v1/agents",
        json!({"did": "did:cdi:nope"}).to_string().into_bytes(),
        None,
    );
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("invalid_did"))
    );
    let (status, reply) = host.admin("POST", "/v1/agents", b"{\"agent\": 1}".to_vec(), None);
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    assert_eq!(listed(&host), [DID_A], "refusals store nothing");
}

#[test]
fn removing_an_agent_closes_its_connection_and_its_connector_says_why_it_is_refused() {
    let host = Host::start("");
    let token = host.add_agent(DID_A);
    let mut socket = host.connect(DID_A, Some(&token)).unwrap();
    wait_connections(&host, 1);

    let removed = host.cli_output(&["agents", "remove", DID_A]);
    let said = String::from_utf8_lossy(&removed.stderr);
    assert!(said.contains("removed; its connection is closed"), "{said}");
    match next_event(&mut socket, &["heartbeat"]) {
        Seen::Closed(code, reason) => assert_eq!((code, reason.as_str()), (1008, "agent_removed")),
        Seen::Frame(frame) => panic!("expected the close, got {frame}"),
    }
    assert!(listed(&host).is_empty());
    let (status, reply) = host.admin("DELETE", &format!("/v1/agents/{DID_A}"), Vec::new(), None);
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (404, Some("agent_not_found"))
    );

    let dir = tempfile::tempdir().unwrap();
    let hook = FakeHook::start();
    let connector = Connector::start(&host, DID_A, &token, &hook.url, dir.path());
    connector.log.wait_for(&[&format!(
        "error: the host refused agent {DID_A}: unknown agent or wrong token"
    )]);
}

#[test]
fn a_revoked_agent_is_disconnected_refused_and_cannot_be_added_again() {
    let host = Host::start(&fast_events_config(""));
    let token = host.add_agent(DID_A);
    let hook = FakeHook::start();
    let dir = tempfile::tempdir().unwrap();
    let connector = Connector::start(&host, DID_A, &token, &hook.url, dir.path());
    wait_connections(&host, 1);

    host.publish(
        "clawdentity-events",
        revocation_event("agent_revoked", json!({"agentDid": DID_A})),
    );
    connector
        .log
        .wait_for(&["the host closed the connection (1008 agent_revoked)"]);
    connector.log.wait_for(&[&format!(
        "error: the host refused agent {DID_A}: agent is revoked"
    )]);

    host.cli(&["agents", "remove", DID_A]);
    let through_host =
        String::from_utf8(host.cli_output(&["agents", "add", DID_A]).stderr).unwrap();
    assert!(
        through_host.contains(&format!("agent {DID_A} is revoked"))
            && through_host.contains("agent_revoked, HTTP 409"),
        "{through_host}"
    );
    let (status, reply) = host.admin(
        "POST",
        "/v1/agents",
        json!({"did": DID_A}).to_string().into_bytes(),
        None,
    );
    assert_eq!(
        (status, reply["error"]["code"].clone()),
        (409, Value::from("agent_revoked"))
    );

    // Offline, on the host's data directory: its trust store holds the revocation too.
    let elsewhere = tempfile::tempdir().unwrap();
    let data_dir = host.data_dir().to_str().unwrap();
    let offline = ["agents", "add", DID_A, "--data-dir", data_dir];
    let refused = failed(clawq_in(elsewhere.path(), &[], &offline));
    assert!(
        refused.contains(&format!("agent {DID_A} is revoked")),
        "{refused}"
    );
    let offline_b = ["agents", "add", DID_B, "--data-dir", data_dir];
    let token_b = succeeded(clawq_in(elsewhere.path(), &[], &offline_b));
    assert_eq!(listed(&host), [DID_B], "the host reads the same registry");
    host.connect(DID_B, Some(token_b.trim()))
        .expect("an agent added offline connects");
}
