//! TLS end to end (issue 13 item 3): `clawq serve` terminates TLS itself with a
//! self-signed certificate generated here (rcgen); the real `clawq connect` reaches it
//! over `wss://` when given the certificate with `--ca-cert`, and a receipt reaches the
//! agent's hook, an `https` one verified with the same CA; without it the connector stops with a clear certificate error; plain
//! HTTP to the TLS port gets no answer; bad certificate files stop the host at start.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::support::*;
use serde_json::Value;

const RECEIPTS: &str = "clawdentity-receipts";

/// A self-signed certificate for `localhost` and 127.0.0.1, with its key, as PEM files.
struct SelfSigned {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

fn self_signed() -> SelfSigned {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    SelfSigned { dir, cert, key }
}

/// The config of a host terminating TLS with `cert` and `key`.
fn tls_config(cert: &Path, key: &Path) -> String {
    format!(
        "tls_cert = {:?}\ntls_key = {:?}\n{}",
        cert.display().to_string(),
        key.display().to_string(),
        fast_config("")
    )
}

/// A host serving https with a fresh self-signed certificate, trusted by the test.
fn tls_host() -> (Host, SelfSigned) {
    let tls = self_signed();
    let mut host = Host::start(&tls_config(&tls.cert, &tls.key));
    assert!(host.base.starts_with("https://127.0.0.1:"), "{}", host.base);
    host.trust(&tls.cert);
    (host, tls)
}

#[test]
fn a_connector_given_the_ca_reaches_a_tls_host_over_wss_and_the_receipt_an_https_hook() {
    let (host, tls) = tls_host();
    let (status, health) = host.get("/healthz");
    assert_eq!((status, &health["status"]), (200, &Value::from("ok")));
    let token = host.add_agent(DID_A);
    let hook = FakeHook::start_tls(&tls.cert, &tls.key);
    assert!(hook.url.starts_with("https://127.0.0.1:"), "{}", hook.url);
    let outbox = tempfile::tempdir().unwrap();
    let mut command = Connector::command(&host.base, DID_A, &token, &hook.url, outbox.path());
    command.arg("--ca-cert").arg(&tls.cert);
    let connector = Connector::spawn(command);
    connector.log.wait_for(&["connected to wss://127.0.0.1:"]);

    host.publish(
        RECEIPTS,
        receipt("req-tls", DID_A, DID_B, "delivered_to_webhook", None),
    );
    let requests = hook.wait_requests(1);
    assert_eq!(requests[0].body["requestId"], "req-tls");
    assert_eq!(requests[0].body["status"], "delivered_to_webhook");
}

#[test]
fn without_the_ca_the_connector_stops_with_a_certificate_error() {
    let (host, _tls) = tls_host();
    let token = host.add_agent(DID_A);
    let hook = FakeHook::start();
    let outbox = tempfile::tempdir().unwrap();
    let mut connector = Connector::start(&host, DID_A, &token, &hook.url, outbox.path());
    let status = connector.wait_exit();
    assert!(!status.success(), "{status}");
    let line = connector
        .log
        .wait_for(&["TLS certificate was not accepted", "--ca-cert"]);
    assert!(line.text.contains("UnknownIssuer"), "{}", line.text);
    assert!(
        connector.log.matching(&["reconnecting"]).is_empty(),
        "a certificate error is not retried"
    );
}

#[test]
fn plain_http_to_the_tls_port_gets_no_http_answer() {
    let (host, _tls) = tls_host();
    let address = host.base.trim_start_matches("https://");
    let plain = reqwest::blocking::Client::new()
        .get(format!("http://{address}/healthz"))
        .timeout(DEADLINE)
        .send();
    assert!(plain.is_err(), "{plain:?}");

    let mut socket = std::net::TcpStream::connect(address).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(host.get("/healthz").0, 200, "https still answers");
}

#[test]
fn missing_or_mismatched_tls_files_stop_the_host_with_a_clear_error() {
    let tls = self_signed();
    let missing = tls.dir.path().join("missing.pem");
    let error = refused_serve(&tls_config(&missing, &tls.key));
    assert!(
        error.contains("tls_cert") && error.contains("missing.pem"),
        "{error}"
    );

    let error = refused_serve(&tls_config(&tls.cert, &tls.cert));
    assert!(
        error.contains("tls_key") && error.contains("cert.pem"),
        "{error}"
    );

    let other = self_signed();
    let error = refused_serve(&tls_config(&tls.cert, &other.key));
    assert!(error.contains("does not fit the certificate"), "{error}");

    let error = refused_serve(&format!(
        "tls_cert = {:?}\n",
        tls.cert.display().to_string()
    ));
    assert!(error.contains("TLS needs both"), "{error}");
}
