//! Operator commands that talk HTTP to a running host: `clawq dlq list|show|redrive|purge`
//! (browse and repair dead-letter queues, or any queue) and `clawq status` (a one-screen
//! summary). They print readable text and fail with the API's error message.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::{Method, Url};
use serde_json::{Value, json};

use crate::text::truncate;

/// How long a command waits for the host.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest failure reason shown in a `dlq list` row (`dlq show` shows all of it).
const REASON_WIDTH: usize = 72;

/// Which host to talk to.
#[derive(Debug, clap::Args)]
pub struct ServerArg {
    /// The host's base url.
    #[arg(long, env = "CLAWQ_SERVER", default_value = crate::connector::DEFAULT_SERVER)]
    pub server: String,
    /// A PEM file of CA certificates to trust besides the public (webpki) roots, for an
    /// `https` host with a private CA or a self-signed certificate.
    #[arg(long, env = "CLAWQ_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// `clawq dlq`: browse and repair a dead-letter queue (or any queue) of a running host.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List a queue's messages, oldest first, with why each one failed.
    List {
        /// The queue, e.g. `clawdentity-events-dlq`.
        queue: String,
        /// Messages per page (1-1000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Where to start: the cursor printed under the previous page.
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Show one message in full, body included.
    Show {
        /// The queue holding it.
        queue: String,
        /// The message id.
        id: String,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Move messages back to the queue each was dead-lettered from (or to `--to`), ready
    /// at once with their attempts reset: those given with `--id`, or all of them.
    Redrive {
        /// The queue holding them.
        queue: String,
        /// A message to redrive (repeatable); without it every message is.
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        /// Only the copies kept for this consumer of the queue.
        #[arg(long, value_name = "NAME", conflicts_with = "ids")]
        consumer: Option<String>,
        /// Send them to this queue instead of their source queues.
        #[arg(long, value_name = "QUEUE")]
        to: Option<String>,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Delete messages for good: those given with `--id`, the copies kept for a consumer
    /// with `--consumer` (one the config no longer has, say), or every one with `--all`.
    #[command(group = clap::ArgGroup::new("which").required(true).args(["ids", "consumer", "all"]))]
    Purge {
        /// The queue holding them.
        queue: String,
        /// A message to delete (repeatable).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<String>,
        /// Delete the copies kept for this consumer of the queue.
        #[arg(long, value_name = "NAME")]
        consumer: Option<String>,
        /// Delete every message of the queue (messages in flight excepted).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        admin: AdminArg,
    },
}

/// Runs a `clawq dlq` command and prints its result.
pub async fn dlq(command: DlqCommand) -> Result<()> {
    let text = match command {
        DlqCommand::List {
            queue,
            limit,
            cursor,
            admin,
        } => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(cursor.map(|c| ("cursor", c)));
            let page = admin
                .client()?
                .call(Method::GET, &["queues", &queue, "messages"], &query, None)
                .await?;
            render_list(&queue, limit, &page)
        }
        DlqCommand::Show { queue, id, admin } => {
            let message = admin
                .client()?
                .call(Method::GET, &["queues", &queue, "messages", &id], &[], None)
                .await?;
            render_message(&queue, &message)
        }
        DlqCommand::Redrive {
            queue,
            ids,
            consumer,
            to,
            admin,
        } => {
            let mut body = json!({});
            if !ids.is_empty() {
                body["ids"] = json!(ids);
            }
            if let Some(consumer) = &consumer {
                body["consumer"] = json!(consumer);
            }
            if let Some(to) = &to {
                body["to"] = json!(to);
            }
            let reply = admin
                .client()?
                .call(
                    Method::POST,
                    &["queues", &queue, "redrive"],
                    &[],
                    Some(Payload::Json(body)),
                )
                .await?;
            render_redrive(&queue, &ids, to.as_deref(), &reply)
        }
        DlqCommand::Purge {
            queue,
            ids,
            consumer,
            all,
            admin,
        } => {
            // The argument group makes exactly one of them given.
            let body = match consumer {
                Some(consumer) => json!({"consumer": consumer}),
                None if all => json!({"all": true}),
                None => json!({"ids": ids}),
            };
            let reply = admin
                .client()?
                .call(
                    Method::DELETE,
                    &["queues", &queue, "messages"],
                    &[],
                    Some(Payload::Json(body)),
                )
                .await?;
            format!(
                "purged {} from {queue}\n",
                messages(count(&reply, "purged"))
            )
        }
    };
    print!("{text}");
    Ok(())
}

/// `clawq tokens`: issue, list and remove the API tokens of a running host.
#[derive(Debug, clap::Subcommand)]
pub enum TokensCommand {
    /// Issue a token and print it: shown once, stored hashed. A producer token publishes
    /// to the queues it names (and does nothing else); an admin token may call every
    /// route.
    Add {
        /// What the token may do.
        #[arg(long, value_parser = ["producer", "admin"])]
        role: String,
        /// A queue a producer token publishes to (repeatable; one the host serves).
        #[arg(long = "queue", value_name = "QUEUE")]
        queues: Vec<String>,
        /// A name telling what the token is for, shown by `clawq tokens list`.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        admin: AdminArg,
    },
    /// List the issued tokens (never their secrets).
    List {
        #[command(flatten)]
        admin: AdminArg,
    },
    /// Remove a token: the next request with it is refused.
    Remove {
        /// The token's id (`tok_...`, from `clawq tokens list`).
        id: String,
        #[command(flatten)]
        admin: AdminArg,
    },
}

/// Runs a `clawq tokens` command.
pub async fn tokens(command: TokensCommand) -> Result<()> {
    match command {
        TokensCommand::Add {
            role,
            queues,
            name,
            admin,
        } => {
            let body = json!({"role": role, "queues": queues, "name": name});
            let reply = admin
                .client()?
                .call(Method::POST, &["tokens"], &[], Some(Payload::Json(body)))
                .await?;
            println!("{}", text(&reply["token"]));
            eprintln!(
                "{role} token {} issued{}; it is not shown again",
                text(&reply["id"]),
                if queues.is_empty() {
                    String::new()
                } else {
                    format!(" for {}", queues.join(", "))
                }
            );
        }
        TokensCommand::List { admin } => {
            let reply = admin
                .client()?
                .call(Method::GET, &["tokens"], &[], None)
                .await?;
            let mut rows = vec![
                ["ID", "ROLE", "QUEUES", "NAME", "CREATED"]
                    .map(String::from)
                    .to_vec(),
            ];
            for token in reply["tokens"].as_array().into_iter().flatten() {
                let queues: Vec<String> = token["queues"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                rows.push(vec![
                    text(&token["id"]),
                    text(&token["role"]),
                    if queues.is_empty() {
                        "-".into()
                    } else {
                        queues.join(",")
                    },
                    if token["name"] == "" {
                        "-".into()
                    } else {
                        text(&token["name"])
                    },
                    text(&token["createdAt"]),
                ]);
            }
            print!("{}", table(&rows));
        }
        TokensCommand::Remove { id, admin } => {
            admin
                .client()?
                .call(Method::DELETE, &["tokens", &id], &[], None)
                .await?;
            eprintln!("token {id} removed; requests with it are refused");
        }
    }
    Ok(())
}

/// Runs `clawq status`: every queue with its counts, handler and dead letters, the
/// connector connections, and the handler versions.
pub async fn status(admin: AdminArg) -> Result<()> {
    let client = admin.client()?;
    let queues = client.call(Method::GET, &["queues"], &[], None).await?;
    let relay = client.call(Method::GET, &["relay"], &[], None).await?;
    print!("{}", render_status(client.base.as_str(), &queues));
    println!(
        "\nconnectors: {} connected, {} relay actors in memory, {} receipts dropped",
        count(&relay, "connections"),
        count(&relay, "resident_actors"),
        count(&relay, "receipts_dropped")
    );
    match client.call(Method::GET, &["handlers"], &[], None).await {
        Ok(reply) => {
            let mut rows = vec![
                [
                    "CONSUMER",
                    "QUEUE",
                    "FILTER",
                    "WORLD",
                    "VERSION",
                    "BATCHES",
                    "FAILED",
                    "LIMIT HITS",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for slot in reply["handlers"].as_array().into_iter().flatten() {
                let version = text(&slot["current"]["version"]);
                rows.push(vec![
                    text(&slot["consumer"]),
                    text(&slot["queue"]),
                    filter(&slot["filter"]),
                    text(&slot["world"]),
                    format!(
                        "{} {}",
                        text(&slot["current"]["name"]),
                        &version[..version.len().min(12)]
                    ),
                    count(&slot["counters"], "batches").to_string(),
                    count(&slot["counters"], "failed").to_string(),
                    count(&slot["counters"], "limit_hits").to_string(),
                ]);
            }
            print!("\n{}", table(&rows));
        }
        Err(err) => println!("\nhandlers: not shown ({err:#})"),
    }
    Ok(())
}

/// A request body.
pub enum Payload {
    /// JSON.
    Json(Value),
    /// A WebAssembly component.
    Wasm(Vec<u8>),
}

/// The API of one host.
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

/// The admin API of one host: where it is and its admin token.
#[derive(Debug, clap::Args)]
pub struct AdminArg {
    #[command(flatten)]
    server: ServerArg,
    /// The admin token [default: read from <data-dir>/admin.token].
    #[arg(long, env = "CLAWQ_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// The host's data directory, where its generated admin token is.
    #[arg(long, env = "CLAWQ_DATA_DIR", default_value = crate::config::DEFAULT_DATA_DIR)]
    data_dir: std::path::PathBuf,
}

impl AdminArg {
    /// A client of the admin API, with the token given or the host's generated one.
    pub fn client(&self) -> Result<Client> {
        let token = match &self.admin_token {
            Some(token) => token.clone(),
            None => {
                let file = self.data_dir.join(crate::auth::TOKEN_FILE);
                std::fs::read_to_string(&file)
                    .with_context(|| {
                        format!("no --admin-token and cannot read {}", file.display())
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Ok(Client {
            token: Some(token),
            ..Client::new(&self.server)?
        })
    }
}

impl Client {
    /// A client of the host at `server`, without credentials.
    pub fn new(server: &ServerArg) -> Result<Client> {
        let base = Url::parse(&server.server)
            .ok()
            .filter(|url| url.scheme() == "http" || url.scheme() == "https")
            .with_context(|| {
                format!(
                    "--server `{}` is not an http(s) url, e.g. {}",
                    server.server,
                    crate::connector::DEFAULT_SERVER
                )
            })?;
        let tls = crate::tls::client_config(server.ca_cert.as_deref())?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .use_preconfigured_tls((*tls).clone())
            .build()?;
        Ok(Client {
            http,
            base,
            token: None,
        })
    }

    /// Sends a request to `/v1/<segments...>` (each segment escaped) and returns the JSON
    /// answer, or the API's error message.
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<Payload>,
    ) -> Result<Value> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("--server `{}` cannot take a path", self.base))?
            .pop_if_empty()
            .push("v1")
            .extend(segments);
        let mut request = self.http.request(method, url).query(query);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request = match body {
            None => request,
            Some(Payload::Json(json)) => request.json(&json),
            Some(Payload::Wasm(bytes)) => request
                .header("content-type", "application/wasm")
                .body(bytes),
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach clawq at {}", self.base))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading the answer of clawq at {}", self.base))?;
        let reply: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            match reply["error"]["message"].as_str() {
                Some(message) => bail!(
                    "{message} ({}, HTTP {})",
                    reply["error"]["code"].as_str().unwrap_or("error"),
                    status.as_u16()
                ),
                None => bail!("clawq answered HTTP {status}: {text}"),
            }
        }
        if reply.is_null() {
            bail!("clawq answered something that is not JSON: {text}");
        }
        Ok(reply)
    }
}

/// A `dlq list` page (of up to `limit` messages) as a table, with the command for the
/// next page.
fn render_list(queue: &str, limit: usize, page: &Value) -> String {
    let messages = page["messages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if messages.is_empty() && page["cursor"].is_null() {
        return format!("{queue} holds no messages\n");
    }
    let mut rows = vec![
        [
            "ID",
            "STATE",
            "ATTEMPTS",
            "FIRST FAILED",
            "LAST FAILED",
            "FROM",
            "WHY",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for m in messages {
        rows.push(vec![
            text(&m["id"]),
            text(&m["state"]),
            attempts(m),
            time(&m["first_failed_ms"]),
            time(&m["last_failed_ms"]),
            source(m),
            truncate(&why(m), REASON_WIDTH),
        ]);
    }
    let mut out = table(&rows);
    if let Some(cursor) = page["cursor"].as_str() {
        let _ = writeln!(
            out,
            "more: clawq dlq list {queue} --limit {limit} --cursor {cursor}"
        );
    }
    out
}

/// A message in full, one field a line, fields it does not have left out.
fn render_message(queue: &str, m: &Value) -> String {
    let mut out = String::new();
    let fields = [
        ("id", text(&m["id"])),
        ("queue", format!("{queue} ({})", text(&m["state"]))),
        ("published", time(&m["published_ms"])),
        ("attempts", attempts(m)),
        ("source queue", source(m)),
        ("dead-lettered", time(&m["dead_lettered_ms"])),
        ("reason", text(&m["dead_reason"])),
        ("first failed", time(&m["first_failed_ms"])),
        ("last failed", time(&m["last_failed_ms"])),
        ("last error", text(&m["last_error"])),
        ("content type", text(&m["content_type"])),
    ];
    for (name, value) in fields {
        if value != "-" {
            let _ = writeln!(out, "{:<14} {value}", format!("{name}:"));
        }
    }
    let body = match &m["body"] {
        Value::String(s) => s.clone(),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    };
    let _ = writeln!(out, "body:\n{body}");
    out
}

/// What a redrive did, and why selected messages stayed, if some did.
fn render_redrive(queue: &str, ids: &[String], to: Option<&str>, reply: &Value) -> String {
    let (redriven, skipped) = (count(reply, "redriven"), count(reply, "skipped"));
    let destination = to.map_or("their source queues".to_owned(), |to| format!("`{to}`"));
    let mut out = format!(
        "redriven {} from {queue} to {destination}\n",
        messages(redriven)
    );
    if skipped > 0 {
        let _ = writeln!(
            out,
            "{} stayed in {queue}: they record no source queue the host serves (use --to)",
            messages(skipped)
        );
    }
    let missing = (ids.len() as u64).saturating_sub(redriven + skipped);
    if missing > 0 {
        let _ = writeln!(
            out,
            "{missing} of the given ids are not in {queue}, or are in flight"
        );
    }
    out
}

/// The `clawq status` screen.
fn render_status(base: &str, reply: &Value) -> String {
    let queues = reply["queues"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut rows = vec![
        [
            "QUEUE",
            "HANDLER",
            "BACKLOG",
            "IN FLIGHT",
            "DELAYED",
            "DEAD-LETTERED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for q in queues {
        let dead = match q["dead_letter_queue"].as_str() {
            Some(dlq) => format!("{} in {dlq}", count(q, "dead_lettered")),
            None => "-".to_owned(),
        };
        rows.push(vec![
            text(&q["queue"]),
            handlers(q),
            count(q, "backlog").to_string(),
            count(q, "in_flight").to_string(),
            count(q, "delayed").to_string(),
            dead,
        ]);
    }
    let held: u64 = queues
        .iter()
        .map(|q| count(q, "backlog") + count(q, "in_flight") + count(q, "delayed"))
        .sum();
    format!(
        "clawq at {base}: {} queues, {} held\n{}",
        queues.len(),
        messages(held),
        table(&rows)
    )
}

/// Rows as left-aligned columns two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// A string field, or `-` when it is absent.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A time in milliseconds since the epoch as ISO 8601, or `-`.
fn time(ms: &Value) -> String {
    ms.as_u64().map_or("-".to_owned(), crate::clock::iso8601)
}

/// A count field of an API answer (0 when absent).
fn count(value: &Value, field: &str) -> u64 {
    value[field].as_u64().unwrap_or(0)
}

/// A subscription filter in one line: `type=a|b status=c`, or `all`.
fn filter(value: &Value) -> String {
    let fields: Vec<String> = value
        .as_object()
        .into_iter()
        .flatten()
        .map(|(path, values)| {
            let values: Vec<String> = values.as_array().into_iter().flatten().map(text).collect();
            format!("{path}={}", values.join("|"))
        })
        .collect();
    if fields.is_empty() {
        "all".to_owned()
    } else {
        fields.join(" ")
    }
}

/// The handlers of a queue's consumers, `-` for none.
fn handlers(q: &Value) -> String {
    let names: Vec<String> = q["consumers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["handler"].as_str())
        .map(crate::handlers::handler_name)
        .collect();
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.join(", ")
    }
}

/// "1 message", "3 messages".
fn messages(n: u64) -> String {
    format!("{n} message{}", if n == 1 { "" } else { "s" })
}

/// Where a dead-lettered message came from: its source queue, and the consumer of that
/// queue that gave up on it when the queue has several (one not named like the queue).
fn source(m: &Value) -> String {
    let queue = text(&m["source_queue"]);
    match m["source_consumer"].as_str() {
        Some(consumer) if consumer != queue => format!("{queue} ({consumer})"),
        _ => queue,
    }
}

/// The deliveries of a message: those in its source queue for a dead-lettered one.
fn attempts(m: &Value) -> String {
    match m["source_attempts"].as_u64() {
        Some(before) => format!("{before} in {}", source(m)),
        None => count(m, "attempts").to_string(),
    }
}

/// Why a message failed: the dead-letter reason, else the last error, on one line.
fn why(m: &Value) -> String {
    let reason = m["dead_reason"]
        .as_str()
        .or(m["last_error"].as_str())
        .unwrap_or("-");
    reason.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_renders_as_a_table_with_the_next_command() {
        let page = json!({
            "messages": [{
                "id": "01A", "state": "ready", "attempts": 0, "source_attempts": 4,
                "source_queue": "jobs", "first_failed_ms": 0, "last_failed_ms": 1000,
                "dead_reason": "max_retries (3) exceeded\nafter 4 attempts", "last_error": "x"
            }, {
                "id": "01B", "state": "delayed", "attempts": 2, "last_error": "boom"
            }],
            "cursor": "7"
        });
        let out = render_list("jobs-dlq", 2, &page);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "ID   STATE    ATTEMPTS   FIRST FAILED              LAST FAILED               FROM  WHY"
        );
        assert_eq!(
            lines[1],
            "01A  ready    4 in jobs  1970-01-01T00:00:00.000Z  1970-01-01T00:00:01.000Z  jobs  \
             max_retries (3) exceeded after 4 attempts"
        );
        assert_eq!(
            lines[2],
            "01B  delayed  2          -                         -                         -     boom"
        );
        assert_eq!(
            lines[3],
            "more: clawq dlq list jobs-dlq --limit 2 --cursor 7"
        );
        assert_eq!(
            render_list("q", 20, &json!({"messages": [], "cursor": null})),
            "q holds no messages\n"
        );
    }

    #[test]
    fn a_redrive_says_what_stayed_and_what_was_not_found() {
        let ids = ["a", "b", "c", "d"].map(String::from);
        let out = render_redrive(
            "jobs-dlq",
            &ids,
            None,
            &json!({"redriven": 1, "skipped": 2}),
        );
        assert_eq!(
            out,
            "redriven 1 message from jobs-dlq to their source queues\n\
             2 messages stayed in jobs-dlq: they record no source queue the host serves (use --to)\n\
             1 of the given ids are not in jobs-dlq, or are in flight\n"
        );
    }
}
