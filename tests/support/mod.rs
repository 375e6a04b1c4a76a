//! Test support: starts the real `clawq` binary on a loopback port with its own data
//! directory, reads its log, and talks to it over HTTP.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod nats;

/// The test handler whose outcomes the message bodies script.
pub const SCRIPTED_HANDLER: &str = clawq_test_guests::SCRIPTED_HANDLER;
/// The test handler that traps on every batch.
pub const FAILING_HANDLER: &str = clawq_test_guests::FAILING_HANDLER;
/// The test handler whose messages script attacks on the sandbox.
pub const HOSTILE_HANDLER: &str = clawq_test_guests::HOSTILE_HANDLER;
/// A valid agent DID.
pub const DID_A: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PB";
/// Another valid agent DID.
pub const DID_B: &str = "did:cdi:registry.clawdentity.com:agent:01HZX4M3Q8V2J7K9T6R5W1N0PC";
/// How long a test waits for anything before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// One line of the host's log and when the test saw it.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// The text.
    pub text: String,
    /// When it was read.
    pub at: Instant,
}

/// The log a child process writes to stderr, as the test has read it so far.
#[derive(Default)]
pub struct Log {
    lines: Mutex<Vec<LogLine>>,
    grew: Condvar,
    /// Set once the process's stderr is closed and every line of it is read.
    ended: std::sync::atomic::AtomicBool,
}

impl Log {
    /// Waits for a line containing every one of `needles`.
    pub fn wait_for(&self, needles: &[&str]) -> LogLine {
        let deadline = Instant::now() + DEADLINE;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(line) = lines
                .iter()
                .find(|l| needles.iter().all(|n| l.text.contains(n)))
            {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {needles:?} within {DEADLINE:?}"
            );
            lines = self.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// The lines so far that contain every one of `needles`.
    pub fn matching(&self, needles: &[&str]) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|l| needles.iter().all(|n| l.text.contains(n)))
            .cloned()
            .collect()
    }
}

/// Starts `command` with its stderr read line by line into a [`Log`] (and echoed with
/// `prefix`, for failing tests). Its log filter is `info`, or the test run's
/// `CLAWQ_TEST_LOG` (e.g. `info,clawq=debug`, to debug a test).
pub fn spawn_logged(mut command: Command, prefix: &'static str) -> (Child, Arc<Log>) {
    let filter = std::env::var("CLAWQ_TEST_LOG").unwrap_or_else(|_| "info".into());
    let mut child = command
        .env("CLAWQ_LOG", filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting clawq");
    let log = Arc::new(Log::default());
    let stderr = child.stderr.take().unwrap();
    let reader_log = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(text) = line else { break };
            eprintln!("[{prefix}] {text}");
            reader_log.lines.lock().unwrap().push(LogLine {
                text,
                at: Instant::now(),
            });
            reader_log.grew.notify_all();
        }
        reader_log
            .ended
            .store(true, std::sync::atomic::Ordering::SeqCst);
    });
    (child, log)
}

/// A running `clawq serve` process.
pub struct Host {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    log: Arc<Log>,
    /// The logs of the runs before the last restart, oldest first.
    earlier_logs: Vec<Arc<Log>>,
    data_dir: PathBuf,
    config: PathBuf,
    http: reqwest::blocking::Client,
    /// The admin token it was given (`None`: the one it generated).
    admin_token: Option<String>,
    /// The CA certificate (PEM) an `https` host is verified with ([`Host::trust`]).
    ca_cert: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

/// The tests' HTTP client: a fresh connection per request (a refused oversized body
/// closes its own), trusting `ca_cert` (PEM) when given.
fn http_client(ca_cert: Option<&Path>) -> reqwest::blocking::Client {
    let mut builder = reqwest::blocking::Client::builder()
        .timeout(DEADLINE)
        .pool_max_idle_per_host(0);
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).unwrap();
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    }
    builder.build().unwrap()
}

impl Host {
    /// Starts a host with `config` (TOML) and a fresh data directory.
    pub fn start(config: &str) -> Host {
        Host::start_with(config, &[])
    }

    /// Starts a host with `config`, a fresh data directory and extra `serve` arguments.
    pub fn start_with(config: &str, args: &[&str]) -> Host {
        Host::start_on("127.0.0.1:0", config, args)
    }

    /// Starts a host listening on `listen` (a test reaches it on the loopback address)
    /// with `config`, a fresh data directory and extra `serve` arguments.
    pub fn start_on(listen: &str, config: &str, args: &[&str]) -> Host {
        Host::start_in_env(listen, config, args, &[])
    }

    /// Starts a host with `config` and a fresh data directory, with `env` added to its
    /// environment for this run only (a restart runs without it).
    pub fn start_env(config: &str, env: &[(&str, &std::ffi::OsStr)]) -> Host {
        Host::start_in_env("127.0.0.1:0", config, &[], env)
    }

    fn start_in_env(
        listen: &str,
        config: &str,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("clawq.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut host = Host::spawn(&dir.path().join("data"), &config_path, listen, args, env);
        host._dir = Some(dir);
        host
    }

    /// Sends the admin token `token` (the one the config or the environment gave the
    /// host) instead of the generated one.
    pub fn with_admin_token(mut self, token: &str) -> Host {
        self.admin_token = Some(token.to_owned());
        self
    }

    fn spawn(
        data_dir: &Path,
        config: &Path,
        listen: &str,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Host {
        let mut command = Command::new(env!("CARGO_BIN_EXE_clawq"));
        command
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .arg("--config")
            .arg(config)
            .args(args)
            .envs(env.iter().copied());
        let (child, log) = spawn_logged(command, "clawq");
        let mut host = Host {
            child,
            base: String::new(),
            log,
            earlier_logs: Vec::new(),
            data_dir: data_dir.to_owned(),
            config: config.to_owned(),
            http: http_client(None),
            admin_token: None,
            ca_cert: None,
            _dir: None,
        };
        let ready = host.wait_log("clawq listening on ");
        let address = ready.text.split("listening on ").nth(1).unwrap();
        host.base = address
            .split(|c: char| c.is_whitespace() || c == '"')
            .next()
            .unwrap()
            .replace("0.0.0.0", "127.0.0.1");
        host
    }

    /// Trusts the CA certificate (PEM) at `ca_cert` for this `https` host, in the
    /// requests of the test and of [`Host::cli`].
    pub fn trust(&mut self, ca_cert: &Path) {
        self.http = http_client(Some(ca_cert));
        self.ca_cert = Some(ca_cert.to_owned());
    }

    /// The data directory of this host.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Kills the host with SIGKILL and starts it again on the same data and config.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.restart();
    }

    /// Kills the host with SIGKILL and waits until it is gone.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the host again, once it has exited, on the same data and config. The log
    /// methods then read the new run; [`Host::all_log_lines`] reads every run.
    pub fn restart(&mut self) {
        let mut restarted = Host::spawn(&self.data_dir, &self.config, "127.0.0.1:0", &[], &[]);
        restarted._dir = self._dir.take();
        restarted.admin_token = self.admin_token.take();
        if let Some(ca_cert) = &self.ca_cert {
            restarted.trust(ca_cert);
        }
        restarted.earlier_logs = std::mem::take(&mut self.earlier_logs);
        restarted.earlier_logs.push(self.log.clone());
        std::mem::swap(self, &mut restarted);
    }

    /// Replaces the config the host reads at its next [`Host::restart`].
    pub fn set_config(&self, config: &str) {
        std::fs::write(&self.config, config).unwrap();
    }

    /// Sends SIGTERM to the host and waits for it to exit; returns how it exited.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM failed");
        wait_for("the host to exit after SIGTERM", || {
            self.child.try_wait().unwrap()
        })
    }

    /// The lines of every run so far (across restarts) that contain every one of
    /// `needles`, oldest first; the runs that ended are read to their last line.
    pub fn all_log_lines(&self, needles: &[&str]) -> Vec<LogLine> {
        for log in &self.earlier_logs {
            wait_for("the log of an earlier run to be read to its end", || {
                log.ended
                    .load(std::sync::atomic::Ordering::SeqCst)
                    .then_some(())
            });
        }
        self.earlier_logs
            .iter()
            .chain([&self.log])
            .flat_map(|log| log.matching(needles))
            .collect()
    }

    /// Waits for a log line containing every one of `needles`.
    pub fn wait_log_all(&self, needles: &[&str]) -> LogLine {
        self.log.wait_for(needles)
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str) -> LogLine {
        self.log.wait_for(&[needle])
    }

    /// The log lines so far that contain every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<LogLine> {
        self.log.matching(needles)
    }

    /// Sends `method` `path` with an optional JSON `body`, as the holder of `token`
    /// (`None`: without credentials), and returns the response.
    pub fn send_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::blocking::Response {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        request.send().unwrap()
    }

    /// A request to `path` with the admin token.
    fn admin_request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::blocking::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.admin_token())
    }

    /// GETs `path` (with the admin token) and returns the status and JSON body.
    pub fn get(&self, path: &str) -> (u16, Value) {
        answer(
            self.admin_request(reqwest::Method::GET, path)
                .send()
                .unwrap(),
        )
    }

    /// POSTs raw `body` as JSON to `path` (with the admin token) and returns the status
    /// and JSON body.
    pub fn post_raw(&self, path: &str, body: impl Into<reqwest::blocking::Body>) -> (u16, Value) {
        let request = self
            .admin_request(reqwest::Method::POST, path)
            .header("content-type", "application/json")
            .body(body);
        answer(request.send().unwrap())
    }

    /// DELETEs `path` with an optional JSON `body` (with the admin token) and returns the
    /// status and JSON body.
    pub fn delete(&self, path: &str, body: Option<&Value>) -> (u16, Value) {
        answer(self.send_as(Some(&self.admin_token()), "DELETE", path, body))
    }

    /// POSTs `body` to `path` (with the admin token) and returns the status and JSON body.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string())
    }

    /// Publishes one JSON message to `queue` and returns its id.
    pub fn publish(&self, queue: &str, body: Value) -> String {
        let (status, reply) = self.post(
            &format!("/v1/queues/{queue}/messages"),
            &serde_json::json!({"body": body}),
        );
        assert_eq!(status, 200, "{reply}");
        reply["id"].as_str().unwrap().to_owned()
    }

    /// Publishes a batch of JSON messages to `queue` and returns their ids.
    pub fn publish_batch(&self, queue: &str, bodies: &[Value]) -> Vec<String> {
        let messages: Vec<Value> = bodies
            .iter()
            .map(|b| serde_json::json!({"body": b}))
            .collect();
        let (status, reply) = self.post(
            &format!("/v1/queues/{queue}/messages/batch"),
            &serde_json::json!({"messages": messages}),
        );
        assert_eq!(status, 200, "{reply}");
        reply["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| id.as_str().unwrap().to_owned())
            .collect()
    }

    /// The status of `queue` (`GET /v1/queues/{queue}`).
    pub fn queue(&self, queue: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/queues/{queue}"));
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits until `queue` holds no message: none ready, in flight or delayed.
    pub fn wait_drained(&self, queue: &str) -> Value {
        wait_for(&format!("queue {queue} to drain"), || {
            let status = self.queue(queue);
            let held = ["backlog", "in_flight", "delayed"]
                .iter()
                .map(|k| status[k].as_u64().unwrap())
                .sum::<u64>();
            (held == 0).then_some(status)
        })
    }

    /// The admin token of this host: the one it was started with, else the one it
    /// generated.
    pub fn admin_token(&self) -> String {
        self.admin_token.clone().unwrap_or_else(|| {
            std::fs::read_to_string(self.data_dir.join("admin.token"))
                .unwrap()
                .trim()
                .to_owned()
        })
    }

    /// Sends an admin request (with the admin token unless `token` says otherwise).
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let token = token.map_or_else(|| self.admin_token(), str::to_owned);
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let request = self.http.request(method, format!("{}{path}", self.base));
        answer(request.bearer_auth(token).body(body).send().unwrap())
    }

    /// The host process's resident memory in KiB: now (`VmRSS`) and at its peak so far
    /// (`VmHWM`), read from `/proc/<pid>/status`.
    pub fn memory_kib(&self) -> (u64, u64) {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).unwrap();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {path}"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The host's metrics text (`GET /metrics`, with the admin token).
    pub fn metrics_text(&self) -> String {
        let response = self.admin_request(reqwest::Method::GET, "/metrics");
        let response = response.send().unwrap();
        assert_eq!(response.status(), 200, "GET /metrics");
        response.text().unwrap()
    }

    /// The host's metrics (`GET /metrics`), parsed.
    pub fn scrape(&self) -> prometheus_parse::Scrape {
        let text = self.metrics_text();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("valid Prometheus text")
    }

    /// Whether the trust store says `did` is revoked.
    pub fn is_revoked(&self, did: &str) -> bool {
        let (status, body) = self.get(&format!("/v1/trust/agents/{did}"));
        assert_eq!(status, 200, "{body}");
        body["revoked"].as_bool().unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The longest `/healthz` may take while a hostile handler runs (the bound).
pub const HEALTHZ_BOUND: Duration = Duration::from_millis(100);
/// The most the host's resident memory may peak at while a hostile handler attacks it
/// ([`Host::under_attack`]), in MiB: the host, a guest at its memory cap, and the
/// batch's copies of what it returned. Without the bounds, a 20 MB error for 25
/// messages took the host to 4.4 GB.
pub const ATTACK_RSS_BOUND_MIB: u64 = 256;
/// The most rounds [`Host::under_attack`] runs before it gives up on seeing the other
/// queue flow during the attack.
const MAX_ATTACK_ROUNDS: u32 = 50;

/// One probe while handlers run (`what` measures one request): its latency, which must
/// stay under [`HEALTHZ_BOUND`]. A single probe over it (the machine is shared, and
/// another test's host may hold the cores for a moment) is probed again at once; the
/// second must be under it: a guest holding a runtime thread would hold it for its whole
/// CPU budget.
pub fn probe(what: &str, mut measure: impl FnMut() -> Duration) -> Duration {
    let latency = measure();
    if latency >= HEALTHZ_BOUND {
        let again = measure();
        assert!(
            again < HEALTHZ_BOUND,
            "{what} took {latency:?}, then {again:?}, while handlers ran"
        );
    }
    latency
}

/// What a host showed while a hostile handler attacked it ([`Host::under_attack`]).
#[derive(Debug)]
pub struct AttackFigures {
    /// The rounds of the attack that ran.
    pub rounds: u32,
    /// The `/healthz` probes made during the attack.
    pub probes: usize,
    /// The slowest of them.
    pub healthz_max: Duration,
}

impl Host {
    /// How long `GET /healthz` takes, on a fresh connection.
    pub fn healthz_latency(&self) -> Duration {
        let started = Instant::now();
        let (status, body) = self.get("/healthz");
        assert_eq!((status, &body["status"]), (200, &serde_json::json!("ok")));
        started.elapsed()
    }

    /// A `/healthz` probe (see [`probe`]).
    pub fn healthz_probe(&self) -> Duration {
        probe("healthz", || self.healthz_latency())
    }

    /// Bytes of the SQLite database `name` in the data directory, with its write-ahead
    /// log.
    pub fn db_bytes(&self, name: &str) -> u64 {
        [name.to_owned(), format!("{name}-wal")]
            .iter()
            .filter_map(|f| std::fs::metadata(self.data_dir.join(f)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Runs an attack in rounds and proves the host holds while it runs: `start(r)`
    /// publishes round `r` (from 1), `over(r)` says whether round `r` is over. Once the
    /// first round is published, a revocation of [`DID_A`] is published on
    /// `clawdentity-events`; rounds run until [`DID_A`] is seen revoked while a round
    /// was not over yet (the other queue flowed during the attack). Every poll probes
    /// `/healthz` ([`probe`]: within [`HEALTHZ_BOUND`]); the host's peak resident memory
    /// must stay under [`ATTACK_RSS_BOUND_MIB`]. The figures are printed as `what` and
    /// returned.
    pub fn under_attack(
        &self,
        what: &str,
        mut start: impl FnMut(u32),
        mut over: impl FnMut(u32) -> bool,
    ) -> AttackFigures {
        let (rss_before_kib, _) = self.memory_kib();
        let mut latencies = Vec::new();
        let (mut rounds, mut revoked_during) = (0, false);
        while !revoked_during {
            rounds += 1;
            assert!(
                rounds <= MAX_ATTACK_ROUNDS,
                "{what}: no revocation went through while {MAX_ATTACK_ROUNDS} rounds ran"
            );
            start(rounds);
            if rounds == 1 {
                self.publish(
                    "clawdentity-events",
                    revocation_event("agent_revoked", serde_json::json!({"agentDid": DID_A})),
                );
            }
            let deadline = Instant::now() + DEADLINE;
            loop {
                latencies.push(self.healthz_probe());
                // Seen revoked, then the round seen still running: revoked during it.
                let revoked = self.is_revoked(DID_A);
                if over(rounds) {
                    break;
                }
                revoked_during |= revoked;
                assert!(
                    Instant::now() < deadline,
                    "{what}: round {rounds} not over within {DEADLINE:?}"
                );
            }
        }
        let (_, rss_peak_kib) = self.memory_kib();
        let figures = AttackFigures {
            rounds,
            probes: latencies.len(),
            healthz_max: latencies.iter().max().copied().unwrap_or_default(),
        };
        eprintln!(
            "{what}: {rounds} rounds; /healthz {} probes, max {:?}; RSS {} MiB before, \
             peak {} MiB (bound {ATTACK_RSS_BOUND_MIB} MiB)",
            figures.probes,
            figures.healthz_max,
            rss_before_kib / 1024,
            rss_peak_kib / 1024,
        );
        assert!(
            rss_peak_kib < ATTACK_RSS_BOUND_MIB * 1024,
            "{what}: the host's RSS peaked at {rss_peak_kib} KiB"
        );
        figures
    }
}

/// The status and JSON body (`null` when it has none) of `response`.
pub fn answer(response: reqwest::blocking::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

/// Runs `clawq serve` with `config` (TOML) on a fresh data directory on loopback,
/// expects it to refuse to start, and returns what it printed on stderr (see
/// [`refused_serve_with`]).
pub fn refused_serve(config: &str) -> String {
    refused_serve_with(config, &["--listen", "127.0.0.1:0"], |_| {})
}

/// Runs `clawq serve` with `args` and `config` (TOML) on a fresh data directory prepared
/// by `prepare`, without `CLAWQ_ADMIN_TOKEN`; expects it to refuse to start before it
/// opens any database, and returns what it printed on stderr.
pub fn refused_serve_with(config: &str, args: &[&str], prepare: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    prepare(&data);
    let config_path = dir.path().join("clawq.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_clawq"))
        .arg("serve")
        .args(args)
        .arg("--data-dir")
        .arg(&data)
        .arg("--config")
        .arg(&config_path)
        .env_remove("CLAWQ_ADMIN_TOKEN")
        // A NATS server that is not there is given up on at once, not after 10 s.
        .env("CLAWQ_NATS_CONNECT_TIMEOUT", "0.2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("clawq serve to exit", || child.try_wait().unwrap());
    let mut said = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut said).unwrap();
    assert!(
        !status.success(),
        "clawq serve started with {config}: {said}"
    );
    assert!(
        !data.join("clawq.db").exists(),
        "refused before opening anything"
    );
    said
}

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`].
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of the sample `name` whose labels include every one of `labels`, if the
/// scrape has one.
pub fn find_sample(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
    match found.map(|s| &s.value)? {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => Some(*v),
        other => panic!("sample {name} {labels:?} is not a number: {other:?}"),
    }
}

/// The keys of a JSON object, in order (panics when `value` is not an object), for exact
/// key-set checks of frames and hook bodies.
pub fn json_keys(value: &Value) -> std::collections::BTreeSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

/// An `agent.auth.revoked` event envelope.
pub fn revocation_event(reason: &str, metadata: Value) -> Value {
    serde_json::json!({
        "id": format!("evt-{}", std::process::id()),
        "type": "agent.auth.revoked",
        "version": "v1",
        "timestampUtc": "2026-11-24T10:00:00.000Z",
        "initiatedByAccountId": "acc_1",
        "data": {"reason": reason, "metadata": metadata}
    })
}

/// The config of a host whose events queue batches quickly, with `extra` appended.
pub fn fast_events_config(extra: &str) -> String {
    format!(
        "[[queues.consumers]]\nqueue = \"clawdentity-events\"\nmax_batch_timeout = 0.05\n\n{extra}"
    )
}

/// Consumer settings that let a handler log every message it handles: the scripted
/// handler's log lines are how the tests see what it did, so they must not meet the
/// default log rate (100 lines, then 50 a second).
pub const UNLIMITED_LOGS: &str = "log_burst = 1000000\nlog_rate = 1000000";

/// A consumer of `queue` running the scripted test handler, logging without a rate
/// limit, with `settings` appended.
pub fn scripted_consumer(queue: &str, settings: &str) -> String {
    format!(
        "[[queues.consumers]]\nqueue = \"{queue}\"\nhandler = \"{SCRIPTED_HANDLER}\"\ndead_letter_queue = \"{queue}-dlq\"\n{UNLIMITED_LOGS}\n{settings}\n"
    )
}

/// A connector-side WebSocket, driven synchronously by a test.
pub type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

pub use tokio_tungstenite::tungstenite;

impl Host {
    /// Runs `clawq <args>` against this host (`CLAWQ_SERVER` and `CLAWQ_DATA_DIR` are
    /// its url and data directory, `CLAWQ_ADMIN_TOKEN` the token it was given if any) and
    /// returns its output, success or failure.
    pub fn cli_output(&self, args: &[&str]) -> std::process::Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_clawq"));
        command
            .args(args)
            .env("CLAWQ_SERVER", &self.base)
            .env("CLAWQ_DATA_DIR", &self.data_dir);
        if let Some(token) = &self.admin_token {
            command.env("CLAWQ_ADMIN_TOKEN", token);
        }
        if let Some(ca_cert) = &self.ca_cert {
            command.env("CLAWQ_CA_CERT", ca_cert);
        }
        command.output().unwrap()
    }

    /// Runs `clawq <args>` against this host (see [`Host::cli_output`]), expects success
    /// and returns what it printed on stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_output(args);
        assert!(
            output.status.success(),
            "clawq {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs a second `clawq serve` on this host's data directory and config, listening on
    /// this host's address, and returns its output once it has exited.
    pub fn serve_again(&self) -> std::process::Output {
        let listen = self.base.trim_start_matches("http://");
        Command::new(env!("CARGO_BIN_EXE_clawq"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(&self.data_dir)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// The process id of the host's current run.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Registers `did` with `clawq agents add` and returns its token.
    pub fn add_agent(&self, did: &str) -> String {
        self.cli(&["agents", "add", did]).trim().to_owned()
    }

    /// Opens the connector WebSocket of `did` with `token` (`None`: no credentials).
    pub fn connect(&self, did: &str, token: Option<&str>) -> Result<Socket, tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let url = format!(
            "{}/v1/relay/connect?agent={did}",
            self.base.replace("http://", "ws://")
        );
        let mut request = url.into_client_request().unwrap();
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (socket, _) = tungstenite::connect(request)?;
        if let tungstenite::stream::MaybeTlsStream::Plain(tcp) = socket.get_ref() {
            tcp.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
        }
        Ok(socket)
    }

    /// The HTTP status with which the host refuses a connector.
    pub fn refused_status(&self, did: &str, token: Option<&str>) -> u16 {
        match self.connect(did, token) {
            Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(other) => panic!("expected an HTTP refusal, got {other}"),
            Ok(_) => panic!("the connection was accepted"),
        }
    }
}

/// What a connector socket saw next.
#[derive(Debug)]
pub enum Seen {
    /// A JSON frame.
    Frame(Value),
    /// The host closed the connection with this code and reason.
    Closed(u16, String),
}

/// The next frame or close on `socket` (either end of a connection), skipping frames of
/// the types in `skip`.
pub fn next_event<S: std::io::Read + std::io::Write>(
    socket: &mut tungstenite::WebSocket<S>,
    skip: &[&str],
) -> Seen {
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(
            Instant::now() < deadline,
            "nothing arrived within {DEADLINE:?}"
        );
        match socket.read() {
            Ok(tungstenite::Message::Text(text)) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if !skip.contains(&frame["type"].as_str().unwrap_or_default()) {
                    return Seen::Frame(frame);
                }
            }
            Ok(tungstenite::Message::Close(close)) => {
                let (code, reason) = close.map_or((1005, String::new()), |c| {
                    (c.code.into(), c.reason.to_string())
                });
                return Seen::Closed(code, reason);
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Seen::Closed(1006, String::new());
            }
            Err(e) => panic!("socket failed: {e}"),
        }
    }
}

/// The next frame on `socket` other than heartbeats.
pub fn next_frame<S: std::io::Read + std::io::Write>(
    socket: &mut tungstenite::WebSocket<S>,
) -> Value {
    match next_event(socket, &["heartbeat"]) {
        Seen::Frame(frame) => frame,
        Seen::Closed(code, reason) => {
            panic!("closed with {code} {reason} while waiting for a frame")
        }
    }
}

/// Sends a frame (JSON) on `socket`.
pub fn send_frame<S: std::io::Read + std::io::Write>(
    socket: &mut tungstenite::WebSocket<S>,
    frame: &Value,
) {
    socket
        .send(tungstenite::Message::Text(frame.to_string().into()))
        .unwrap();
}

/// A connector frame of `kind` with `fields`.
pub fn frame(kind: &str, fields: Value) -> Value {
    let mut frame = serde_json::json!({
        "v": 1, "type": kind, "id": ulid::Ulid::new().to_string(), "ts": "2026-11-25T10:00:00.000Z"
    });
    frame
        .as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    frame
}

/// A delivery receipt from `sender` about a message to `recipient`.
pub fn receipt(
    request_id: &str,
    sender: &str,
    recipient: &str,
    status: &str,
    reason: Option<&str>,
) -> Value {
    let mut r = serde_json::json!({
        "type": "delivery_receipt", "requestId": request_id, "senderAgentDid": sender,
        "recipientAgentDid": recipient, "status": status, "processedAt": "2026-11-25T10:00:00.000Z"
    });
    if let Some(reason) = reason {
        r["reason"] = reason.into();
    }
    r
}

/// The config of a host whose queues batch quickly, with `extra` appended.
pub fn fast_config(extra: &str) -> String {
    format!(
        "[[queues.consumers]]\nqueue = \"clawdentity-events\"\nmax_batch_timeout = 0.05\n\n\
         [[queues.consumers]]\nqueue = \"clawdentity-receipts\"\nmax_batch_timeout = 0.05\n\n{extra}"
    )
}

/// One request the fake webhook received.
#[derive(Debug, Clone)]
pub struct HookRequest {
    /// Its headers, names lowercase.
    pub headers: std::collections::HashMap<String, String>,
    /// Its JSON body.
    pub body: Value,
}

/// A fake OpenClaw webhook on loopback: records every request to `/hooks/message` and
/// answers 503 while it is set down.
pub struct FakeHook {
    /// The webhook URL.
    pub url: String,
    requests: Arc<Mutex<Vec<HookRequest>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Serves `app` on `listener` (TLS when `tls` is given) through clawq's own listener, from
/// a thread of its own, until the returned sender is used or dropped.
pub fn serve_in_background(
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
) -> tokio::sync::oneshot::Sender<()> {
    listener.set_nonblocking(true).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let shutdown = tokio_util::sync::CancellationToken::new();
            let cancel = shutdown.clone();
            tokio::spawn(async move {
                let _ = stopped.await;
                cancel.cancel();
            });
            let limits = clawq::listener::HttpLimits::default();
            clawq::listener::serve(listener, tls, limits, app, shutdown)
                .await
                .unwrap();
        });
    });
    stop
}

impl FakeHook {
    /// Starts the hook on a free port.
    pub fn start() -> FakeHook {
        FakeHook::start_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// Starts the hook on `port` (which must be free).
    pub fn start_on_port(port: u16) -> FakeHook {
        FakeHook::start_on(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap())
    }

    /// Starts the hook on a free port, serving `https` with the certificate `cert` and
    /// key `key` (PEM files) through clawq's own listener.
    pub fn start_tls(cert: &Path, key: &Path) -> FakeHook {
        let tls = clawq::tls::server_config(cert, key).unwrap();
        FakeHook::start_with(
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            Some(tokio_rustls::TlsAcceptor::from(tls)),
        )
    }

    fn start_on(listener: std::net::TcpListener) -> FakeHook {
        FakeHook::start_with(listener, None)
    }

    fn start_with(
        listener: std::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FakeHook {
        use axum::http::{HeaderMap, StatusCode};
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!(
            "{scheme}://{}/hooks/message",
            listener.local_addr().unwrap()
        );
        let requests: Arc<Mutex<Vec<HookRequest>>> = Arc::default();
        let down: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (recorded, is_down) = (requests.clone(), down.clone());
        let app = axum::Router::new().route(
            "/hooks/message",
            axum::routing::post(
                move |headers: HeaderMap, body: axum::body::Bytes| async move {
                    if is_down.load(std::sync::atomic::Ordering::SeqCst) {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let headers = headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_owned(),
                                v.to_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect();
                    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    recorded.lock().unwrap().push(HookRequest { headers, body });
                    StatusCode::OK
                },
            ),
        );
        let stop = serve_in_background(listener, tls, app);
        FakeHook {
            url,
            requests,
            down,
            stop: Some(stop),
        }
    }

    /// Makes the hook answer 503 (`true`) or record requests again (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until the hook has received `n` requests and returns them.
    pub fn wait_requests(&self, n: usize) -> Vec<HookRequest> {
        wait_for(&format!("{n} webhook requests"), || {
            let requests = self.requests.lock().unwrap();
            (requests.len() >= n).then(|| requests.clone())
        })
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<HookRequest> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeHook {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A running `clawq connect` process.
pub struct Connector {
    child: Child,
    /// What it logged.
    pub log: Arc<Log>,
}

impl Connector {
    /// Starts a connector of `did` against `host`, delivering to `hook_url`, with its
    /// outbox in `data_dir` and a custom `x-hook-token` header.
    pub fn start(
        host: &Host,
        did: &str,
        token: &str,
        hook_url: &str,
        data_dir: &Path,
    ) -> Connector {
        Connector::start_at(&host.base, did, token, hook_url, data_dir)
    }

    /// [`Connector::start`] against the host at `server` (`http://host:port`), e.g. a
    /// [`FakeRelay`].
    pub fn start_at(
        server: &str,
        did: &str,
        token: &str,
        hook_url: &str,
        data_dir: &Path,
    ) -> Connector {
        Connector::spawn(Connector::command(server, did, token, hook_url, data_dir))
    }

    /// The command [`Connector::start_at`] runs, for a test to add arguments to.
    pub fn command(
        server: &str,
        did: &str,
        token: &str,
        hook_url: &str,
        data_dir: &Path,
    ) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_clawq"));
        command
            .args([
                "connect", "--server", server, "--agent", did, "--hook", hook_url,
            ])
            .args(["--hook-header", "x-hook-token: hook-secret", "--data-dir"])
            .arg(data_dir)
            .env("CLAWQ_AGENT_TOKEN", token);
        command
    }

    /// Waits for the connector to exit on its own (at most [`DEADLINE`]).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        wait_for("the connector to exit", || self.child.try_wait().unwrap())
    }

    /// Starts `command` (a connector, however it is launched: e.g. `bash -c` running a
    /// documented command line) with its log read as a connector's.
    pub fn spawn(command: Command) -> Connector {
        let (child, log) = spawn_logged(command, "connector");
        Connector { child, log }
    }

    /// Kills the connector with SIGKILL.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host's end of a connector WebSocket, driven synchronously by a test.
pub type HostSocket = tungstenite::WebSocket<std::net::TcpStream>;

/// A stand-in for the host's connector endpoint on loopback, for connector tests that
/// need frames the real host does not send yet: it accepts `GET /v1/relay/connect` of one
/// agent with one bearer token (anything else gets 401) and hands each connection to the
/// test, which plays the host frame by frame.
pub struct FakeRelay {
    /// The base url to give `clawq connect --server`.
    pub base: String,
    connections: std::sync::mpsc::Receiver<HostSocket>,
}

impl FakeRelay {
    /// Listens on a free port for connectors of `did` with `token`.
    pub fn start(did: &str, token: &str) -> FakeRelay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (sender, connections) = std::sync::mpsc::channel();
        let check = Upgrade {
            path: format!("/v1/relay/connect?agent={}", did.replace(':', "%3A")),
            bearer: format!("Bearer {token}"),
        };
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                if let Ok(socket) = tungstenite::accept_hdr(stream, check.clone()) {
                    socket
                        .get_ref()
                        .set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    if sender.send(socket).is_err() {
                        return;
                    }
                }
            }
        });
        FakeRelay { base, connections }
    }

    /// The next accepted connection (waits at most [`DEADLINE`]).
    pub fn accept(&self) -> HostSocket {
        self.connections
            .recv_timeout(DEADLINE)
            .expect("a connector connected")
    }
}

/// The [`FakeRelay`]'s check of an upgrade request: its path and query, and its token.
#[derive(Clone)]
struct Upgrade {
    path: String,
    bearer: String,
}

impl tungstenite::handshake::server::Callback for Upgrade {
    fn on_request(
        self,
        request: &tungstenite::handshake::server::Request,
        response: tungstenite::handshake::server::Response,
    ) -> Result<
        tungstenite::handshake::server::Response,
        tungstenite::handshake::server::ErrorResponse,
    > {
        let authorization = request.headers().get("authorization");
        if request.uri().to_string() == self.path
            && authorization.is_some_and(|value| value == self.bearer.as_str())
        {
            return Ok(response);
        }
        let mut refusal = tungstenite::handshake::server::ErrorResponse::new(Some(format!(
            "refused {} ({authorization:?})",
            request.uri()
        )));
        *refusal.status_mut() = tungstenite::http::StatusCode::UNAUTHORIZED;
        Err(refusal)
    }
}

/// Every Rust source file of the host (`host/src`), with its text: for the tests that
/// check the documentation against what the code can answer or export.
pub fn host_sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, files: &mut Vec<(PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                files.push((path, text));
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    files
}

/// The snake_case string literal `text` starts with (`"name"...`), if any.
pub fn leading_literal(text: &str) -> Option<&str> {
    let rest = text.strip_prefix('"')?;
    let end = rest.find(|c: char| !(c.is_ascii_lowercase() || c == '_'))?;
    (end > 0 && rest[end..].starts_with('"')).then(|| &rest[..end])
}

/// Runs `command` to its end, with no input; kills its process group and fails the test
/// when it takes longer than `deadline`.
pub fn run_bounded(mut command: Command, deadline: Duration) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let child = command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    let group = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(deadline) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{group}")])
                .status();
            panic!("{command:?} did not finish within {deadline:?}");
        }
    }
}
