//! `clawq run <file.wasm> --message <json> ...`: runs one batch through a handler
//! component on this machine, against capabilities backed by a throwaway data directory,
//! and reports every capability call the handler made and the outcome of each message.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::clock::now_ms;
use crate::config::DEFAULT_REVOCATION_TTL;
use crate::relay::sessions::SessionLimits;
use crate::runtime::{Call, ContentType, Limits, Message, Outcome, Runtime};
use crate::store::{Database, Durability};
use crate::world::World;

/// What `clawq run` runs and how it reports it.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The component (`.wasm`).
    pub file: PathBuf,
    /// The messages of the batch, in order: JSON text, or `@<path>` of a JSON file.
    pub messages: Vec<String>,
    /// The queue name the handler is told the batch comes from.
    pub queue: String,
    /// The world the component must fit; `None` for the widest, `handler-host`.
    pub world: Option<World>,
    /// The `attempts` of every message (1 for a first delivery).
    pub attempts: u32,
    /// Print the report as one JSON object instead of text.
    pub json: bool,
}

/// What one batch did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every capability call, in order.
    pub calls: Vec<Call>,
    /// The ids of the batch's messages, in order.
    pub ids: Vec<String>,
    /// The handler's outcomes, or why the whole batch failed.
    pub result: Result<Vec<Outcome>, String>,
}

/// Runs `clawq run`: prints the report on stdout; an error when the component is
/// refused or the batch failed (after printing the calls it made), saying why.
pub async fn run(options: RunOptions) -> Result<()> {
    let report = run_batch(&options).await?;
    if options.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    match report.result {
        Ok(_) => Ok(()),
        Err(failure) => Err(anyhow::anyhow!("batch failed: {failure}")),
    }
}

/// Loads the component (refusing it unless `options.world` accepts it) and runs the
/// batch against fresh capabilities in a temporary directory, deleted afterwards.
pub async fn run_batch(options: &RunOptions) -> Result<Report> {
    if options.messages.is_empty() {
        anyhow::bail!("no message to run: give at least one --message <json>");
    }
    let bodies = options
        .messages
        .iter()
        .enumerate()
        .map(|(i, arg)| read_message(arg).with_context(|| format!("--message #{}", i + 1)))
        .collect::<Result<Vec<_>>>()?;
    let file = &options.file;
    let wasm = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let runtime = Runtime::new()?;
    let world = options.world.unwrap_or(World::HandlerHost);
    let handler = runtime.load(&file.display().to_string(), &wasm, world, Limits::default())?;

    let data = tempfile::tempdir().context("creating a temporary data directory")?;
    let db =
        Database::open(data.path(), Durability::Process).context("opening a throwaway database")?;
    let caps = crate::server::open_capabilities(
        &db,
        DEFAULT_REVOCATION_TTL,
        SessionLimits::default(),
        None,
    )
    .context("opening throwaway capabilities")?;
    let timestamp_ms = now_ms();
    let messages: Vec<Message> = bodies
        .into_iter()
        .map(|body| Message {
            id: ulid::Ulid::new().to_string(),
            attempts: options.attempts,
            timestamp_ms,
            content_type: ContentType::Json,
            body,
        })
        .collect();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let result = handler
        .handle_recorded(caps, &options.queue, &messages, Some(calls.clone()))
        .await
        .map_err(|failure| failure.to_string());
    let calls = std::mem::take(&mut *calls.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Report {
        calls,
        ids: messages.into_iter().map(|m| m.id).collect(),
        result,
    })
}

/// The body of a `--message`: JSON text, or `@<path>` of a file holding JSON, stored
/// compact as a published JSON message is.
fn read_message(arg: &str) -> Result<Vec<u8>> {
    let text = match arg.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
        }
        None => arg.to_owned(),
    };
    let body: Value = serde_json::from_str(&text).context("not JSON")?;
    Ok(body.to_string().into_bytes())
}

/// A message's outcome as text: `ack`, `retry (delay 60 s)`, `dead-letter: <reason>`,
/// or `no outcome (retried)` when the handler left it out.
fn show_outcome(outcome: Option<&Outcome>) -> String {
    match outcome {
        Some(Outcome::Ack) => "ack".to_owned(),
        Some(Outcome::Retry(Some(delay))) => format!("retry (delay {delay} s)"),
        Some(Outcome::Retry(None)) => "retry (the consumer's retry_delay)".to_owned(),
        Some(Outcome::DeadLetter(reason)) => format!("dead-letter: {reason}"),
        Some(Outcome::Unhandled(unhandled)) => format!(
            "unhandled ({}): {}",
            unhandled.reason.as_str(),
            unhandled.detail
        ),
        None => "no outcome (retried)".to_owned(),
    }
}

impl Report {
    /// The report for people: the calls, then one line per message (the caller reports
    /// a failure).
    pub fn to_text(&self) -> String {
        let mut text = String::from("calls:\n");
        if self.calls.is_empty() {
            text += "  none\n";
        }
        for call in &self.calls {
            text += &format!("  {call}\n");
        }
        match &self.result {
            Ok(outcomes) => {
                text += "outcomes:\n";
                for (i, id) in self.ids.iter().enumerate() {
                    text += &format!("  {id}: {}\n", show_outcome(outcomes.get(i)));
                }
                if outcomes.len() > self.ids.len() {
                    text += &format!(
                        "  ({} outcomes for {} messages: the extra ones are ignored)\n",
                        outcomes.len(),
                        self.ids.len()
                    );
                }
            }
            Err(_) => text += "outcomes: none, the batch failed\n",
        }
        text
    }

    /// The report for scripts: `{"calls": [{"call", "args", "result"}], "outcomes":
    /// [{"id", "outcome", "delay"?, "reason"?}], "failure": null | "<why>"}`.
    pub fn to_json(&self) -> Value {
        let outcomes: Vec<Value> = match &self.result {
            Ok(outcomes) => self
                .ids
                .iter()
                .enumerate()
                .map(|(i, id)| match outcomes.get(i) {
                    Some(Outcome::Ack) => json!({"id": id, "outcome": "ack"}),
                    Some(Outcome::Retry(delay)) => {
                        json!({"id": id, "outcome": "retry", "delay": delay})
                    }
                    Some(Outcome::DeadLetter(reason)) => {
                        json!({"id": id, "outcome": "dead-letter", "reason": reason})
                    }
                    Some(Outcome::Unhandled(unhandled)) => json!({"id": id,
                        "outcome": "unhandled", "reason": unhandled.reason.as_str(),
                        "detail": unhandled.detail}),
                    None => json!({"id": id, "outcome": null}),
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        json!({
            "calls": self.calls,
            "outcomes": outcomes,
            "failure": self.result.as_ref().err(),
        })
    }
}
