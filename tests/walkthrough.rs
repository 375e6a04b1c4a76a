//! The README's walk-through, run as written: the fenced `sh` blocks of its sections
//! "Revoke an agent", "Route a delivery receipt to the sender's agent" and "Tell an
//! agent that a pairing was accepted", in order, against a real host, with only the
//! host's address, the agent's token and the webhook (a fake OpenClaw) substituted. The
//! commands run with `bash -c` (curl, and the `clawq` under test on `PATH`), so the README
//! cannot drift from what works.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::*;
use serde_json::Value;

/// The sections of the walk-through, in the order a reader runs them.
const SECTIONS: [&str; 3] = [
    "Revoke an agent",
    "Route a delivery receipt to the sender's agent",
    "Tell an agent that a pairing was accepted",
];
/// Where the README has the host listen.
const README_HOST: &str = "http://127.0.0.1:8787";
/// The README's webhook.
const README_HOOK: &str = "http://127.0.0.1:18789/hooks/message";
/// How the README shows the token `clawq agents add` printed.
const README_TOKEN: &str = "cqa_...";

/// One command line of a block, and the output the README shows under it (a comment
/// line of JSON), if any.
#[derive(Debug)]
struct Step {
    command: String,
    shown: Option<String>,
}

/// The commands of the fenced `sh` blocks of the README section `title`: comment lines
/// dropped, a command continued over lines (a trailing `\`, or an open `'` quote) kept
/// whole.
fn steps_of(readme: &str, title: &str) -> Vec<Step> {
    let heading = format!("\n## {title}\n");
    let start = readme
        .find(&heading)
        .unwrap_or_else(|| panic!("the README has no section `## {title}`"))
        + heading.len();
    let section = &readme[start..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut steps: Vec<Step> = Vec::new();
    let mut blocks = section.split("```").skip(1).step_by(2);
    let mut found = false;
    for block in blocks.by_ref() {
        let Some(body) = block.strip_prefix("sh\n") else {
            continue;
        };
        found = true;
        let mut command = String::new();
        for line in body.lines() {
            let trimmed = line.trim();
            if command.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
                let output = trimmed.strip_prefix("# ").filter(|o| o.starts_with('{'));
                if let (Some(output), Some(last)) = (output, steps.last_mut()) {
                    last.shown.get_or_insert_with(|| output.to_owned());
                }
                continue;
            }
            command.push_str(line);
            command.push('\n');
            let quote_open = command.matches('\'').count() % 2 == 1;
            if !quote_open && !trimmed.ends_with('\\') {
                steps.push(Step {
                    command: std::mem::take(&mut command).trim().to_owned(),
                    shown: None,
                });
            }
        }
        assert!(
            command.is_empty(),
            "an unfinished command in `{title}`: {command}"
        );
    }
    assert!(found, "the section `{title}` has no sh block");
    steps
}

/// The keys of the JSON object the README shows (`{"did":"did:cdi:...","revoked":true}`
/// gives `did` and `revoked`), with the value of those shown as `true` or `false`.
fn shown_fields(shown: &str) -> Vec<(String, Option<bool>)> {
    shown
        .split('"')
        .collect::<Vec<_>>()
        .windows(3)
        .filter(|w| w[2].starts_with(':') && !w[1].is_empty() && !w[1].contains(' '))
        .map(|w| {
            let value = w[2][1..].trim_start();
            let flag = if value.starts_with("true") {
                Some(true)
            } else if value.starts_with("false") {
                Some(false)
            } else {
                None
            };
            (w[1].to_owned(), flag)
        })
        .collect()
}

/// Whether `answer` has every field the README shows, with the flags it shows.
fn matches_shown(answer: &Value, shown: &str) -> bool {
    shown_fields(shown).iter().all(|(key, flag)| match flag {
        Some(flag) => answer[key] == *flag,
        None => answer.get(key).is_some(),
    })
}

/// The walk-through's environment: the host's address and admin token, `clawq` on
/// `PATH`, a scratch working directory.
struct Shell<'a> {
    host: &'a Host,
    hook: &'a str,
    admin_token: String,
    cwd: &'a Path,
    token: Option<String>,
}

impl Shell<'_> {
    /// `command` as run here: the README's address, webhook and token replaced.
    fn substitute(&self, command: &str) -> String {
        let mut command = command
            .replace(README_HOST, &self.host.base)
            .replace(README_HOOK, self.hook);
        if command.contains(README_TOKEN) {
            let token = self
                .token
                .as_deref()
                .expect("the walk-through uses a token before `clawq agents add` printed one");
            command = command.replace(README_TOKEN, token);
        }
        command
    }

    /// `bash -c <command>` in the scratch directory, with `clawq` on `PATH` and the
    /// host's address and admin token in the environment.
    fn bash(&self, command: &str) -> Command {
        let bin = Path::new(env!("CARGO_BIN_EXE_clawq")).parent().unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let mut bash = Command::new("bash");
        bash.args(["-c", command])
            .current_dir(self.cwd)
            .env("PATH", path)
            .env("CLAWQ_SERVER", &self.host.base)
            .env("CLAWQ_ADMIN_TOKEN", &self.admin_token)
            .env_remove("CLAWQ_DATA_DIR");
        bash
    }

    /// Runs `command` to its end and returns its stdout; it must succeed.
    fn run(&self, command: &str) -> String {
        let Output {
            status,
            stdout,
            stderr,
        } = self.bash(command).output().unwrap();
        assert!(
            status.success(),
            "`{command}` failed: {}",
            String::from_utf8_lossy(&stderr)
        );
        String::from_utf8(stdout).unwrap()
    }

    /// Runs a `curl` step and checks its JSON answer against what the README shows;
    /// a `GET` (nothing changes) is repeated until it does, a step that changes
    /// something runs once.
    fn curl(&self, step: &Step, command: &str) {
        let answer = || -> Value {
            let out = self.run(command);
            serde_json::from_str(&out).unwrap_or_else(|_| panic!("`{command}` answered {out}"))
        };
        let reads_only = !command.contains("-X ");
        match &step.shown {
            Some(shown) if reads_only => {
                wait_for(&format!("`{command}` to answer {shown}"), || {
                    Some(answer()).filter(|a| matches_shown(a, shown))
                });
            }
            shown => {
                let answer = answer();
                assert!(answer.get("error").is_none(), "`{command}`: {answer}");
                if let Some(shown) = shown {
                    assert!(
                        matches_shown(&answer, shown),
                        "`{command}`: {answer}, not {shown}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_readme_walk_through_runs_in_order() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let host = Host::start(&fast_config(""));
    let hook = FakeHook::start();
    let cwd = tempfile::tempdir().unwrap();
    let mut shell = Shell {
        host: &host,
        hook: &hook.url,
        admin_token: host.admin_token(),
        cwd: cwd.path(),
        token: None,
    };
    let mut connector: Option<Connector> = None;
    let mut revoked = Vec::new();
    let mut agent = None;
    for title in SECTIONS {
        for step in steps_of(&readme, title) {
            let command = shell.substitute(&step.command);
            if command.starts_with("curl ") {
                shell.curl(&step, &command);
                if command.contains("/v1/trust/agents/") {
                    revoked.push(command.rsplit('/').next().unwrap().to_owned());
                }
            } else if command.starts_with("clawq agents add ") {
                let token = shell.run(&command).trim().to_owned();
                assert!(token.starts_with("cqa_"), "`{command}` printed {token}");
                shell.token = Some(token);
                agent = command.split_whitespace().last().map(str::to_owned);
            } else if command.contains("clawq connect ") {
                // `env` runs it in the process the test stops (its variables set).
                let started = Connector::spawn(shell.bash(&format!("exec env {command}")));
                started.log.wait_for(&["connected to"]);
                connector = Some(started);
            } else {
                panic!("the walk-through has a command this test does not run: {command}");
            }
        }
    }

    assert_eq!(revoked.len(), 1, "the revocation is looked up once");
    assert!(host.is_revoked(&revoked[0]), "the revocation is visible");
    let connector = connector.expect("the walk-through starts a connector");
    let requests = hook.wait_requests(2);
    let content_type = |i: usize| requests[i].headers["content-type"].as_str();
    assert_eq!(content_type(0), "application/vnd.clawdentity.receipt+json");
    assert_eq!(requests[0].body["requestId"], "req-1");
    let message = requests[0].body["message"].as_str().unwrap_or_default();
    assert!(message.contains("could not be delivered"), "{message}");
    assert_eq!(content_type(1), "application/vnd.clawdentity.delivery+json");
    assert_eq!(
        requests[1].headers["x-clawdentity-to-agent-did"],
        agent.expect("the walk-through registers an agent"),
        "the pairing reaches the agent registered and connected"
    );
    assert!(
        connector.log.matching(&["refused"]).is_empty(),
        "the connector was never refused"
    );
}

#[test]
fn steps_are_read_whole_with_the_output_the_readme_shows() {
    let readme = "# R\n\n## A\n\n```sh\n# a comment\ncurl -s -X POST http://x \\\n  -d '{\"a\": 1,\n  \"b\": 2}'\n# {\"id\":\"01M8...\",\"ok\":true}\nclawq agents list\n```\n\n```toml\nx = 1\n```\n## B\n";
    let steps = steps_of(readme, "A");
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert!(steps[0].command.ends_with("\"b\": 2}'"), "{steps:?}");
    let shown = steps[0].shown.as_deref().unwrap();
    assert_eq!(
        shown_fields(shown),
        [("id".to_owned(), None), ("ok".to_owned(), Some(true))]
    );
    assert!(matches_shown(
        &serde_json::json!({"id": "x", "ok": true}),
        shown
    ));
    assert!(!matches_shown(
        &serde_json::json!({"id": "x", "ok": false}),
        shown
    ));
    assert_eq!(steps[1].command, "clawq agents list");
    assert!(steps[1].shown.is_none());
}
