//! The `clawq` command line.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use clawq::agents::AgentRegistry;
use clawq::config::Config;
use clawq::operator::{AdminArg, Payload};
use clawq::store::{Database, Durability};
use clawq::world::World;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// clawq hosts WASM component handlers for clawdentity's message queues.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, after_long_help = LOG_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `text` (the default) or `json` (see the end of `clawq --help`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CLAWQ_LOG_FORMAT",
        hide_possible_values = true, hide_default_value = true, hide_env = true)]
    log_format: LogFormat,
}

/// The whole story of `--log-format`, told once, under the top-level help.
const LOG_HELP: &str = "Logs go to stderr. `--log-format text` (the default) writes lines for \
people; `--log-format json` writes one JSON object per line, with the span fields (queue, \
handler, version), for machines. `CLAWQ_LOG_FORMAT` sets the format too; `CLAWQ_LOG` takes a \
`tracing` filter (default `info`).";

/// How log lines are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the span fields (queue, handler, version).
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the queues, their handlers and the HTTP API.
    ///
    /// With no config file this serves `clawdentity-events` (the bundled
    /// `crl-invalidation` and `event-router` handlers) and `clawdentity-receipts` (the
    /// bundled `receipt-router`) with clawdentity's defaults.
    ///
    /// The data directory holds one SQLite database, `clawq.db`, with the queues, the
    /// trust store, the relay sessions, the handlers' actor storage, the registered agents,
    /// the issued API tokens and the handler history; the deployed handler versions
    /// (`handlers/`) and the generated admin token (`admin.token`). The per-store files
    /// of older versions are imported at start and kept as `*.db.imported`. Every route but `/healthz` (and `/metrics` with
    /// `metrics_public = true`) needs a bearer token. Logs go to
    /// stderr; `CLAWQ_LOG` takes a `tracing` filter (default `info`, e.g.
    /// `CLAWQ_LOG=clawq=debug`).
    Serve(ServeArgs),
    /// Connect an agent to the host and hand what its relay session sends (delivery
    /// receipts and deliveries) to its local webhook.
    ///
    /// Each frame is kept in a durable outbox (`<data-dir>/outbox.db`) before it is
    /// acknowledged, until the webhook takes it. The agent's token comes from
    /// `CLAWQ_AGENT_TOKEN` (or `--token`, which other users of the machine can see).
    Connect(ConnectArgs),
    /// Say what a handler component imports and exports and which worlds accept it.
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
        /// Fail unless this world (a consumer's `world`) accepts it, e.g. `crl-invalidation`.
        #[arg(long, conflicts_with = "consumer")]
        world: Option<String>,
        /// Fail unless the slot of this consumer of the config would accept it (the
        /// consumer's world), e.g. `clawdentity-receipts` or a named consumer.
        #[arg(long)]
        consumer: Option<String>,
        /// The config file that names the consumer; without one, the defaults (the
        /// spec's two queues).
        #[arg(long, env = "CLAWQ_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run one batch of messages through a handler component locally and show what it did.
    ///
    /// Prints every capability call the handler makes, in order, with its arguments and
    /// result, then each message's outcome. The capabilities are backed by a throwaway
    /// data directory: nothing reaches a running host. Exits 0 when the batch ran
    /// (whatever its outcomes), 1 when it failed (trap, error, limit) or the component is
    /// refused.
    Run(RunArgs),
    /// Create a new handler crate (`clawq new handler <name>`).
    #[command(subcommand)]
    New(NewCommand),
    /// Deploy, list and roll back handler versions on a running host.
    #[command(subcommand)]
    Handlers(HandlersCommand),
    /// Add, list and remove the agents whose connectors may connect, through the running
    /// host (or offline on a data directory given with `--data-dir`).
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Issue, list and remove the API tokens of a running host: producer tokens, which
    /// publish to the queues they name, and extra admin tokens.
    #[command(subcommand)]
    Tokens(clawq::operator::TokensCommand),
    /// Browse and repair the dead-letter queues (or any queue) of a running host.
    #[command(subcommand)]
    Dlq(clawq::operator::DlqCommand),
    /// A one-screen summary of a running host: queues, connections and handler versions.
    Status(AdminArg),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The component (`.wasm`).
    file: PathBuf,
    /// A message of the batch: JSON text, or `@<file>` of a JSON file (repeatable, in
    /// order; content type `json`).
    #[arg(long = "message", value_name = "JSON", required = true)]
    messages: Vec<String>,
    /// The queue the handler is told the batch comes from.
    #[arg(long, default_value = "clawq-run")]
    queue: String,
    /// Refuse the component unless this world accepts it, as `clawq check --world` does
    /// [default: handler-host, every capability].
    #[arg(long)]
    world: Option<String>,
    /// The delivery count of every message (1 for a first delivery).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    attempts: u32,
    /// Print `{"calls", "outcomes", "failure"}` as JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum NewCommand {
    /// Write a new handler crate, `<dir>/<name>/`, that builds outside this workspace.
    ///
    /// The crate holds the WIT contract, a handler for the world that logs and acks each
    /// message (and counts them in its actor storage when the world grants one), unit
    /// tests running it against a fake host, and a README with the build, check, run and
    /// deploy commands.
    Handler {
        /// The crate's name (letters, digits, `-`, `_`; e.g. `my-handler`).
        name: String,
        /// The world the handler targets: crl-invalidation, receipt-router,
        /// receipt-handler or handler-host.
        #[arg(long, default_value = "receipt-handler")]
        world: String,
        /// The directory the crate is created in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address of the HTTP API [default: 127.0.0.1:8787, or the config's `listen`].
    #[arg(long, env = "CLAWQ_LISTEN")]
    listen: Option<SocketAddr>,
    /// Directory of the queue database and the trust store [default: ./.clawq, or the
    /// config's `data_dir`].
    #[arg(long, env = "CLAWQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file (queues, consumers, trust store); optional.
    #[arg(long, short, env = "CLAWQ_CONFIG")]
    config: Option<PathBuf>,
    /// Reload a handler whenever its `.wasm` file changes (development loop).
    #[arg(long)]
    watch: bool,
    /// The admin token, at least 32 characters [default: the config's `admin_token`,
    /// else <data-dir>/admin.token, generated on first start when listening on a
    /// loopback address].
    #[arg(long, env = "CLAWQ_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Serve every route but the connector's without a token (the config's
    /// `insecure_no_auth`): only on a network nobody else reaches.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Keep the queues and the shared state in the NATS JetStream cluster at URL
    /// (`nats://host:port`, several separated by commas) instead of the data directory's
    /// database, so that several hosts serve them together (the config's `[backend]
    /// kind = "nats"`; its `replicas` still apply).
    #[arg(long, env = "CLAWQ_NATS", value_name = "URL")]
    nats: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// Register an agent and print its connector token (shown once, stored hashed). A
    /// revoked agent is refused: its connector could never connect.
    #[command(mut_arg("data_dir", offline_help))]
    Add {
        /// The agent's DID: did:cdi:<authority>:agent:<ULID>.
        did: String,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Remove an agent: its token stops working, and the running host closes its open
    /// connection at once.
    #[command(mut_arg("data_dir", offline_help))]
    Remove {
        /// The agent's DID.
        did: String,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// List the registered agents.
    #[command(mut_arg("data_dir", offline_help))]
    List {
        #[command(flatten)]
        admin: AdminArg,
    },
}

/// The help of `--data-dir` in `clawq agents`.
fn offline_help(arg: clap::Arg) -> clap::Arg {
    arg.help(
        "The host's data directory: where its generated admin token is read from. Given \
         on the command line, the agents of that directory are managed offline instead, \
         without the running host",
    )
}

#[derive(Debug, Subcommand)]
enum HandlersCommand {
    /// List the handler slots with their current version and counters.
    List {
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Load a component into a consumer's slot and make it current.
    Deploy {
        /// The consumer: its queue's name, or the `name` the config gives it.
        consumer: String,
        /// The component (`.wasm`).
        file: PathBuf,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Make the previous version (or VERSION, a hash or its prefix) current again.
    Rollback {
        /// The consumer: its queue's name, or the `name` the config gives it.
        consumer: String,
        /// The version to go back to [default: the one before the current].
        version: Option<String>,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Show a consumer's version history, newest first.
    History {
        /// The consumer: its queue's name, or the `name` the config gives it.
        consumer: String,
        #[command(flatten)]
        admin: AdminArg,
    },
}

/// The world called `name`, or an error listing the worlds.
fn parse_world(name: &str) -> Result<World> {
    World::parse(name).ok_or_else(|| {
        let names: Vec<&str> = World::ALL.iter().map(|w| w.name()).collect();
        anyhow::anyhow!("world `{name}` is not one of {}", names.join(", "))
    })
}

/// Runs `clawq check`: against a world given by name, or by the consumer of a config.
fn check(
    file: &std::path::Path,
    world: Option<&str>,
    consumer: Option<&str>,
    config: Option<&std::path::Path>,
) -> Result<()> {
    let world = match consumer {
        None => world.map(parse_world).transpose()?,
        Some(name) => {
            let config = Config::load(config)?;
            let consumer = config.consumers.get(name).ok_or_else(|| {
                let names: Vec<&str> = config.consumers.keys().map(String::as_str).collect();
                anyhow::anyhow!(
                    "no consumer named `{name}` in the config (its consumers: {})",
                    names.join(", ")
                )
            })?;
            Some(consumer.world)
        }
    };
    let wasm =
        std::fs::read(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let runtime = clawq::runtime::Runtime::new()?;
    print!(
        "{}",
        clawq::check::check(&runtime, &file.display().to_string(), &wasm, world)?
    );
    Ok(())
}

/// Runs `clawq run`.
async fn run(args: RunArgs) -> Result<()> {
    let options = clawq::run::RunOptions {
        file: args.file,
        messages: args.messages,
        queue: args.queue,
        world: args.world.as_deref().map(parse_world).transpose()?,
        attempts: args.attempts,
        json: args.json,
    };
    clawq::run::run(options).await
}

/// Runs `clawq new`.
fn new(command: NewCommand) -> Result<()> {
    match command {
        NewCommand::Handler { name, world, dir } => {
            print!(
                "{}",
                clawq::scaffold::new_handler(&name, parse_world(&world)?, &dir)?
            );
        }
    }
    Ok(())
}

/// Runs a `handlers` subcommand against a running host.
async fn handlers(command: HandlersCommand) -> Result<()> {
    use reqwest::Method;
    let show_version = |v: &serde_json::Value| {
        let hash = v["version"].as_str().unwrap_or_default();
        format!(
            "{} {} ({} bytes)",
            v["name"].as_str().unwrap_or_default(),
            &hash[..hash.len().min(12)],
            v["size"]
        )
    };
    match command {
        HandlersCommand::List { admin } => {
            let answer = admin
                .client()?
                .call(Method::GET, &["handlers"], &[], None)
                .await?;
            for slot in answer["handlers"].as_array().into_iter().flatten() {
                let c = &slot["counters"];
                println!(
                    "{:<28} {:<24} {:<18} {}  batches {} failed {} traps {} limits {}",
                    slot["consumer"].as_str().unwrap_or_default(),
                    slot["queue"].as_str().unwrap_or_default(),
                    slot["world"].as_str().unwrap_or_default(),
                    show_version(&slot["current"]),
                    c["batches"],
                    c["failed"],
                    c["traps"],
                    c["limit_hits"]
                );
            }
        }
        HandlersCommand::Deploy {
            consumer,
            file,
            admin,
        } => {
            let wasm = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let name = clawq::handlers::handler_name(&file.to_string_lossy());
            let answer = admin
                .client()?
                .call(
                    Method::PUT,
                    &["handlers", &consumer],
                    &[("name", name)],
                    Some(Payload::Wasm(wasm)),
                )
                .await?;
            println!(
                "{consumer}: now serving {} (loaded in {:.1} ms)",
                show_version(&answer),
                answer["load_ms"].as_f64().unwrap_or_default()
            );
        }
        HandlersCommand::Rollback {
            consumer,
            version,
            admin,
        } => {
            let body = Payload::Json(serde_json::json!({"version": version}));
            let answer = admin
                .client()?
                .call(
                    Method::POST,
                    &["handlers", &consumer, "rollback"],
                    &[],
                    Some(body),
                )
                .await?;
            println!("{consumer}: rolled back to {}", show_version(&answer));
        }
        HandlersCommand::History { consumer, admin } => {
            let answer = admin
                .client()?
                .call(Method::GET, &["handlers", &consumer], &[], None)
                .await?;
            for entry in answer["history"].as_array().into_iter().flatten() {
                println!(
                    "{}  {}  {:>8} bytes  by {}",
                    entry["loaded_at"].as_str().unwrap_or_default(),
                    entry["version"].as_str().unwrap_or_default(),
                    entry["size"],
                    entry["loaded_by"].as_str().unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// Runs an `agents` subcommand: through the running host, or, when `offline` names a
/// data directory, on its registry without the host.
async fn agents(command: AgentsCommand, offline: Option<PathBuf>) -> Result<()> {
    use reqwest::Method;
    if let Some(dir) = offline {
        return agents_offline(&command, &dir).await;
    }
    match command {
        AgentsCommand::Add { did, admin } => {
            let body = Payload::Json(serde_json::json!({"did": did}));
            let answer = host_client(&admin)?
                .call(Method::POST, &["agents"], &[], Some(body))
                .await?;
            print_token(&did, answer["token"].as_str().unwrap_or_default());
        }
        AgentsCommand::Remove { did, admin } => {
            let answer = host_client(&admin)?
                .call(Method::DELETE, &["agents", &did], &[], None)
                .await?;
            let closed = if answer["connection_closed"] == true {
                "; its connection is closed"
            } else {
                ""
            };
            eprintln!("agent {did} removed{closed}");
        }
        AgentsCommand::List { admin } => {
            let answer = host_client(&admin)?
                .call(Method::GET, &["agents"], &[], None)
                .await?;
            for agent in answer["agents"].as_array().into_iter().flatten() {
                let field = |name: &str| agent[name].as_str().unwrap_or_default().to_owned();
                println!("{}\t{}", field("did"), field("addedAt"));
            }
        }
    }
    Ok(())
}

/// The admin API client of `clawq agents`; when it cannot be made (no admin token at
/// hand, a bad `--server`), the error says what the command needs.
fn host_client(admin: &AdminArg) -> Result<clawq::operator::Client> {
    admin.client().map_err(|e| {
        e.context(
            "`clawq agents` works through the running host (--server, and its admin token: \
             --admin-token, CLAWQ_ADMIN_TOKEN, or CLAWQ_DATA_DIR naming its data \
             directory), or offline with --data-dir <dir>",
        )
    })
}

/// Prints the token of the agent `did` just registered, and that it is shown once.
fn print_token(did: &str, token: &str) {
    println!("{token}");
    eprintln!("agent {did} registered; give this token to its connector (it is not shown again)");
}

/// Runs an `agents` subcommand on the registry of the data directory `dir`, without the
/// host; an agent its trust store holds revoked is not added.
async fn agents_offline(command: &AgentsCommand, dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create the data directory {}: {e}", dir.display()))?;
    // One commit, then the process exits: it may as well be on disk when it does.
    let db = Database::open(dir, Durability::Full)?;
    let registry = AgentRegistry::open(&db)?;
    match command {
        AgentsCommand::Add { did, .. } => {
            let trust = clawq::trust::TrustStore::open(&db, clawq::config::DEFAULT_REVOCATION_TTL)?;
            print_token(did, &registry.register(did, &trust).await?);
        }
        AgentsCommand::Remove { did, .. } => {
            registry.remove(did).await?;
            eprintln!(
                "agent {did} removed from {}; a host serving it refuses its next connect \
                 (remove it through the host to close its open connection too)",
                dir.display()
            );
        }
        AgentsCommand::List { .. } => {
            for agent in registry.list().await? {
                println!("{}\t{}", agent.did, clawq::clock::iso8601(agent.added_ms));
            }
        }
    }
    Ok(())
}

/// The data directory given on the command line of `clawq agents ...` (`--data-dir`, not
/// `CLAWQ_DATA_DIR`): the agents are then managed offline, in that directory.
fn agents_offline_dir(matches: &clap::ArgMatches) -> Option<PathBuf> {
    let (_, agents) = matches.subcommand_matches("agents")?.subcommand()?;
    (agents.value_source("data_dir") == Some(clap::parser::ValueSource::CommandLine))
        .then(|| agents.get_one::<PathBuf>("data_dir").cloned())
        .flatten()
}

#[derive(Debug, clap::Args)]
struct ConnectArgs {
    /// The host's base url.
    #[arg(long, env = "CLAWQ_SERVER", default_value = clawq::connector::DEFAULT_SERVER)]
    server: String,
    /// The agent's DID: did:cdi:<authority>:agent:<ULID>.
    #[arg(long, value_name = "DID", value_parser = parse_agent_did)]
    agent: String,
    /// The agent's connector token (from `clawq agents add`); prefer `CLAWQ_AGENT_TOKEN`,
    /// since a command line is visible to other users.
    #[arg(long, env = "CLAWQ_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The agent's local webhook.
    #[arg(long, default_value = clawq::connector::DEFAULT_HOOK_URL)]
    hook: String,
    /// An extra header sent to the webhook, `name: value` (repeatable), e.g. a hook token.
    #[arg(long = "hook-header", value_name = "NAME: VALUE", value_parser = parse_hook_header)]
    hook_headers: Vec<(String, String)>,
    /// How many webhook requests may be in flight at once (1 to 1024); the frames of one
    /// request id are still posted one at a time, in the order they came.
    #[arg(long, env = "CLAWQ_HOOK_CONCURRENCY", value_name = "N",
          default_value_t = clawq::connector::DEFAULT_HOOK_CONCURRENCY,
          value_parser = parse_hook_concurrency)]
    hook_concurrency: usize,
    /// Directory of the connector's outbox.
    #[arg(long, default_value = "./.clawq-connector")]
    data_dir: PathBuf,
    /// A PEM file of CA certificates to trust besides the public (webpki) roots, for an
    /// `https` server or hook with a private CA or a self-signed certificate.
    #[arg(long, env = "CLAWQ_CA_CERT", value_name = "PEM")]
    ca_cert: Option<PathBuf>,
}

/// Checks `--agent`.
fn parse_agent_did(did: &str) -> Result<String, String> {
    clawq_protocol::did::validate_agent_did(did)
        .map_err(|e| format!("not a valid agent DID: {e}"))?;
    Ok(did.to_owned())
}

/// Reads `--hook-concurrency`.
fn parse_hook_concurrency(n: &str) -> Result<usize, String> {
    let max = clawq::connector::MAX_HOOK_CONCURRENCY;
    n.trim()
        .parse()
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| format!("expected a number of requests from 1 to {max}"))
}

/// Reads a `--hook-header "name: value"`.
fn parse_hook_header(header: &str) -> Result<(String, String), String> {
    let (name, value) = header
        .split_once(':')
        .ok_or("expected `name: value`, e.g. `x-hook-token: <secret>`")?;
    let (name, value) = (name.trim(), value.trim());
    reqwest::header::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a valid header name (expected `name: value`)"))?;
    reqwest::header::HeaderValue::from_str(value).map_err(|_| {
        format!("the value of header `{name}` contains characters not allowed in a header")
    })?;
    Ok((name.to_owned(), value.to_owned()))
}

/// Runs the connector until Ctrl-C or SIGTERM.
async fn connect(args: ConnectArgs) -> Result<()> {
    let options = clawq::connector::ConnectorOptions {
        server: args.server,
        agent_did: args.agent,
        token: args.token.ok_or_else(|| {
            anyhow::anyhow!(
                "no agent token: set CLAWQ_AGENT_TOKEN to the token `clawq agents add` printed"
            )
        })?,
        hook_url: args.hook,
        hook_headers: args.hook_headers,
        hook_concurrency: args.hook_concurrency,
        data_dir: args.data_dir,
        ca_cert: args.ca_cert,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    clawq::connector::run(options, shutdown).await
}

/// Runs the command; a failure is printed as one `error:` line with its causes (never a
/// backtrace, whatever `RUST_BACKTRACE` says) and exits with status 1.
fn main() -> std::process::ExitCode {
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Lets a printing command end quietly when its reader goes away (`clawq status | head`),
/// as other command-line tools do, instead of panicking on a broken pipe. Only for the
/// commands that hold no socket open: Rust ignores SIGPIPE so that a peer closing a
/// socket is an error, not the end of the server.
fn end_quietly_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The log filter: `CLAWQ_LOG` (a default level and per-target levels, e.g.
/// `info,clawq=debug`) when set, else `default`.
fn log_filter(default: &str) -> Result<Targets> {
    let given = std::env::var("CLAWQ_LOG").ok();
    let spec = given
        .as_deref()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(default);
    spec.parse().with_context(|| {
        format!("CLAWQ_LOG={spec:?} is not a log filter: give a level and per-target levels, e.g. `info` or `info,clawq=debug`")
    })
}

fn run_cli() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `clawq run` lists the guest's log lines with its other calls.
    let default_filter = match cli.command {
        Command::Run(_) => "info,clawq::guest=off",
        _ => "info",
    };
    let logs = tracing_subscriber::registry().with(log_filter(default_filter)?);
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with(stderr.with_ansi(std::io::stderr().is_terminal()))
            .init(),
        LogFormat::Json => logs.with(stderr.json()).init(),
    }
    if !matches!(cli.command, Command::Serve(_) | Command::Connect(_)) {
        end_quietly_on_closed_stdout();
    }
    let runtime = match cli.command {
        // One WebSocket and a few hook connections: one thread runs them (the outbox's
        // SQLite work goes to blocking threads), sparing the wakeups across the worker
        // threads of a multi-threaded runtime on every frame.
        Command::Connect(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Runtime::new()?,
    };
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Connect(args) => runtime.block_on(connect(args)),
        Command::Agents(command) => runtime.block_on(agents(command, agents_offline_dir(&matches))),
        Command::Handlers(command) => runtime.block_on(handlers(command)),
        Command::Check {
            file,
            world,
            consumer,
            config,
        } => check(
            &file,
            world.as_deref(),
            consumer.as_deref(),
            config.as_deref(),
        ),
        Command::Run(args) => runtime.block_on(run(args)),
        Command::New(command) => new(command),
        Command::Dlq(command) => runtime.block_on(clawq::operator::dlq(command)),
        Command::Tokens(command) => runtime.block_on(clawq::operator::tokens(command)),
        Command::Status(server) => runtime.block_on(clawq::operator::status(server)),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(data_dir) = args.data_dir {
        config.data_dir = data_dir;
    }
    if let Some(token) = args.admin_token {
        config.admin_token = Some(clawq::auth::AdminTokenSetting {
            token,
            origin: "--admin-token or CLAWQ_ADMIN_TOKEN".to_owned(),
        });
    }
    config.insecure_no_auth |= args.insecure_no_auth;
    if let Some(url) = args.nats {
        let replicas = config.cluster.as_ref().map_or(1, |c| c.replicas);
        config.cluster = Some(clawq::cluster::ClusterConfig { url, replicas });
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    clawq::server::serve_with(config, args.watch, shutdown).await
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
