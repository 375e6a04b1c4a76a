//! The `clawq` command line.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use clawq::agents::AgentRegistry;
use clawq::config::Config;
use tokio_util::sync::CancellationToken;

/// clawq hosts WASM component handlers for clawdentity's message queues.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the queues, their handlers and the HTTP API.
    ///
    /// With no config file this serves `clawdentity-events` (CRL-invalidation handler)
    /// and `clawdentity-receipts` with the spec's defaults.
    Serve(ServeArgs),
    /// Connect an agent to the host and hand its delivery receipts to its local webhook.
    ///
    /// Receipts are kept in a durable outbox (`<data-dir>/outbox.db`) until the webhook
    /// takes them.
    Connect(ConnectArgs),
    /// Register the agents whose connectors may connect (`clawq agents add <did>`).
    #[command(subcommand)]
    Agents(AgentsCommand),
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
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// Register an agent and print its connector token (shown once, stored hashed).
    Add {
        /// The agent's DID: did:cdi:<authority>:agent:<ULID>.
        did: String,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Remove an agent: its token stops working at its next connect.
    Remove {
        /// The agent's DID.
        did: String,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// List the registered agents.
    List {
        #[command(flatten)]
        data: DataDirArg,
    },
}

#[derive(Debug, clap::Args)]
struct DataDirArg {
    /// The host's data directory.
    #[arg(long, env = "CLAWQ_DATA_DIR", default_value = clawq::config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

/// Runs an `agents` subcommand against the data directory (the host may be running).
fn agents(command: AgentsCommand) -> Result<()> {
    let open = |data: &DataDirArg| -> Result<AgentRegistry> {
        std::fs::create_dir_all(&data.data_dir)?;
        AgentRegistry::open(&data.data_dir.join("agents.db"))
    };
    match command {
        AgentsCommand::Add { did, data } => {
            let token = open(&data)?.add(&did)?;
            println!("{token}");
            eprintln!(
                "agent {did} registered; give this token to its connector (it is not shown again)"
            );
        }
        AgentsCommand::Remove { did, data } => {
            if !open(&data)?.remove(&did)? {
                anyhow::bail!("agent {did} is not registered");
            }
            eprintln!("agent {did} removed");
        }
        AgentsCommand::List { data } => {
            for agent in open(&data)?.list()? {
                let added =
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(agent.added_ms);
                println!(
                    "{}\t{}",
                    agent.did,
                    humantime::format_rfc3339_seconds(added)
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
struct ConnectArgs {
    /// The host's base url.
    #[arg(long, env = "CLAWQ_SERVER", default_value = clawq::connector::DEFAULT_SERVER)]
    server: String,
    /// The agent's DID: did:cdi:<authority>:agent:<ULID>.
    #[arg(long, value_name = "DID", value_parser = parse_agent_did)]
    agent: String,
    /// The agent's connector token (from `clawq agents add`).
    #[arg(long, env = "CLAWQ_AGENT_TOKEN", hide_env_values = true)]
    token: String,
    /// The agent's local webhook.
    #[arg(long, default_value = clawq::connector::DEFAULT_HOOK_URL)]
    hook: String,
    /// An extra header sent to the webhook, `name: value` (repeatable), e.g. a hook token.
    #[arg(long = "hook-header", value_name = "NAME: VALUE", value_parser = parse_hook_header)]
    hook_headers: Vec<(String, String)>,
    /// Directory of the connector's outbox.
    #[arg(long, default_value = "./.clawq-connector")]
    data_dir: PathBuf,
}

/// Checks `--agent`.
fn parse_agent_did(did: &str) -> Result<String, String> {
    clawq_protocol::did::validate_agent_did(did)
        .map_err(|e| format!("not a valid agent DID: {e}"))?;
    Ok(did.to_owned())
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
        token: args.token,
        hook_url: args.hook,
        hook_headers: args.hook_headers,
        data_dir: args.data_dir,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    clawq::connector::run(options, shutdown).await
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLAWQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Connect(args) => runtime.block_on(connect(args)),
        Command::Agents(command) => agents(command),
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
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    clawq::server::serve(config, shutdown).await
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
