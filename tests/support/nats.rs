//! A real `nats-server -js` for the tests of the NATS backend: the pinned version,
//! installed on first use by `tests/support/install-nats-server`, on a free loopback port
//! with its own store directory.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::OnceLock;

use super::spawn_logged;

/// The `nats-server` binary, installed once per test run.
fn binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/support/install-nats-server"
        );
        let output = Command::new("bash")
            .arg(script)
            .output()
            .expect("running tests/support/install-nats-server");
        assert!(
            output.status.success(),
            "installing nats-server failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    })
}

/// A running `nats-server -js`, stopped when dropped.
pub struct NatsServer {
    child: Child,
    port: u16,
    store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream on a free loopback port and waits until it is ready.
    pub fn start() -> NatsServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = tempfile::tempdir().unwrap();
        let child = Self::spawn(port, &store);
        NatsServer { child, port, store }
    }

    fn spawn(port: u16, store: &tempfile::TempDir) -> Child {
        let mut command = Command::new(binary());
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path());
        let (child, log) = spawn_logged(command, "nats-server");
        log.wait_for(&["Server is ready"]);
        child
    }

    /// The URL clawq connects to: `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The `[backend]` section of a host config that uses this server.
    pub fn backend_config(&self) -> String {
        format!("[backend]\nkind = \"nats\"\nurl = \"{}\"\n", self.url())
    }

    /// Kills the server with SIGKILL and waits until it is gone.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the server again, once it was killed, on the same port and store.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.port, &self.store);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
