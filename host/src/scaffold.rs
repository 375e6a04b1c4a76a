//! `clawq new handler <name>`: writes a new handler crate that builds on its own, outside
//! any workspace, with the WIT contract of this clawq, a minimal handler for the chosen
//! world and a unit test that runs it against a fake host.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::world::World;

/// The WIT contract, copied into every new crate.
const CONTRACT: &str = include_str!("../../wit/queues.wit");

const CARGO_TOML: &str = r#"[package]
name = "{{name}}"
version = "0.1.0"
edition = "2024"
description = "A clawq queue handler (world `{{world}}`)"
publish = false

[lib]
# `cdylib`: the component, built for wasm32-wasip2; `rlib`: `cargo test` runs natively.
crate-type = ["cdylib", "rlib"]

[dependencies]
wit-bindgen = "0.63"
serde_json = "1"

# A crate of its own: it never joins a workspace of an enclosing directory.
[workspace]

[profile.release]
opt-level = "s"
lto = true
strip = true
"#;

const LIB_RS: &str = r##"//! {{name}}: a clawq queue handler for world `{{world}}`.
//!
//! The world grants the imports {{grants}}; the component imports only those it uses.
//!
//! `handle` gets a batch of messages and answers one outcome per message: `ack`,
//! `retry`, `dead-letter`, or `unhandled` for a message that retrying cannot fix (the host
//! acknowledges it, logs a warning with the reason and counts it). The decisions are made
//! by [`Imports::decide`], which reaches the host only through the closures of
//! [`Imports`], so that `cargo test` runs it natively against a fake host.

wit_bindgen::generate!({ world: "{{world}}", path: "wit" });

{{#storage}}
use clawdentity::queues::actor_storage;
{{/storage}}
use clawdentity::queues::log::{self, Level};
{{#storage}}
use clawdentity::queues::types::{HostError, Message, Outcome, Unhandled, UnhandledReason};

/// The handler's actor in its actor storage.
const ACTOR: &str = "{{name}}";
/// The key of the number of messages handled, in decimal.
const HANDLED: &str = "handled";
{{/storage}}
{{^storage}}
use clawdentity::queues::types::{Message, Outcome, Unhandled, UnhandledReason};
{{/storage}}

struct Handler;

impl exports::clawdentity::queues::handler::Guest for Handler {
    fn handle(_queue: String, messages: Vec<Message>) -> Result<Vec<Outcome>, String> {
{{^storage}}
        let imports = Imports { log: log::write };
{{/storage}}
{{#storage}}
        let imports = Imports {
            log: log::write,
            get: actor_storage::get,
            put: actor_storage::put,
        };
{{/storage}}
        Ok(messages.iter().map(|m| imports.decide(m)).collect())
    }
}

// Only the component exports `handle`: the export names of the component model are not
// valid symbol names for a native library, and the native build is there for the tests.
#[cfg(target_arch = "wasm32")]
export!(Handler);

/// The capability calls the handler makes: the real imports in `handle`, fakes in the
/// tests. Add a field for each import you use.
{{^storage}}
struct Imports<L> {
    /// Writes a log line (`log::write`).
    log: L,
}

impl<L: Fn(Level, &str)> Imports<L> {
{{/storage}}
{{#storage}}
struct Imports<L, G, P> {
    /// Writes a log line (`log::write`).
    log: L,
    /// Reads a value of an actor (`actor_storage::get`).
    get: G,
    /// Writes a value of an actor (`actor_storage::put`).
    put: P,
}

impl<L, G, P> Imports<L, G, P>
where
    L: Fn(Level, &str),
    G: Fn(&str, &str) -> Result<Option<Vec<u8>>, HostError>,
    P: Fn(&str, &str, &[u8]) -> Result<(), HostError>,
{
{{/storage}}
    /// Decides the outcome of one message: a JSON body is logged and acked; any other body
    /// is `unhandled` (malformed), since delivering it again cannot fix it.
    fn decide(&self, message: &Message) -> Outcome {
        let body = match serde_json::from_slice::<serde_json::Value>(&message.body) {
            Ok(body) => body,
            Err(err) => {
                return Outcome::Unhandled(Unhandled {
                    reason: UnhandledReason::Malformed,
                    detail: format!("body is not JSON: {err}"),
                });
            }
        };
        let (id, attempt) = (&message.id, message.attempts);
        let text = format!("message {id} (attempt {attempt}): {body}");
        (self.log)(Level::Info, &text);
{{#storage}}
        // Capability errors: retry a transient one, log and ack a permanent one.
        if let Err(err) = self.count_handled() {
            if err.transient {
                return Outcome::Retry(None);
            }
            let text = format!("message {}: not counted: {}", message.id, err.message);
            (self.log)(Level::Error, &text);
        }
{{/storage}}
        Outcome::Ack
    }
{{#storage}}

    /// Adds one to the number of messages handled (deliveries, since a message can be
    /// delivered again) kept in the actor storage, and returns it.
    fn count_handled(&self) -> Result<u64, HostError> {
        let stored = (self.get)(ACTOR, HANDLED)?;
        let handled = stored
            .and_then(|value| String::from_utf8(value).ok()?.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        (self.put)(ACTOR, HANDLED, handled.to_string().as_bytes())?;
        Ok(handled)
    }
{{/storage}}
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawdentity::queues::types::ContentType;
    use std::cell::RefCell;
{{#storage}}
    use std::collections::HashMap;

    /// A fake actor storage: values by `actor/key`; `None` when it is unavailable.
    type Storage = Option<RefCell<HashMap<String, Vec<u8>>>>;

    /// Decides a message of `body` against a fake host with `storage`; returns the
    /// outcome and the log.
    fn decide_with(body: &str, storage: &Storage) -> (Outcome, Vec<(Level, String)>) {
        let logged = RefCell::new(Vec::new());
        let unavailable = || HostError {
            transient: true,
            message: "unavailable".into(),
        };
        let imports = Imports {
            log: |level, text: &str| logged.borrow_mut().push((level, text.to_owned())),
            get: |actor: &str, key: &str| -> Result<Option<Vec<u8>>, HostError> {
                let values = storage.as_ref().ok_or_else(unavailable)?.borrow();
                Ok(values.get(&format!("{actor}/{key}")).cloned())
            },
            put: |actor: &str, key: &str, value: &[u8]| -> Result<(), HostError> {
                let mut values = storage.as_ref().ok_or_else(unavailable)?.borrow_mut();
                values.insert(format!("{actor}/{key}"), value.to_vec());
                Ok(())
            },
        };
        let outcome = imports.decide(&message(body));
        (outcome, logged.into_inner())
    }

    /// Decides a message of `body` against a fake host; returns the outcome and the log.
    fn decide(body: &str) -> (Outcome, Vec<(Level, String)>) {
        decide_with(body, &Some(RefCell::default()))
    }
{{/storage}}
{{^storage}}

    /// Decides a message of `body` against a fake host; returns the outcome and the log.
    fn decide(body: &str) -> (Outcome, Vec<(Level, String)>) {
        let logged = RefCell::new(Vec::new());
        let imports = Imports {
            log: |level, text: &str| logged.borrow_mut().push((level, text.to_owned())),
        };
        let outcome = imports.decide(&message(body));
        (outcome, logged.into_inner())
    }
{{/storage}}

    fn message(body: &str) -> Message {
        Message {
            id: "m1".into(),
            attempts: 1,
            timestamp_ms: 0,
            content_type: ContentType::Json,
            body: body.into(),
        }
    }

    #[test]
    fn a_json_message_is_logged_and_acked() {
        let (outcome, logged) = decide(r#"{"hello":"world"}"#);
        assert!(matches!(outcome, Outcome::Ack));
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert_eq!(logged[0].0, Level::Info);
        assert!(logged[0].1.contains(r#"{"hello":"world"}"#), "{logged:?}");
    }

    #[test]
    fn a_body_that_is_not_json_is_unhandled() {
        let (outcome, logged) = decide("not json");
        assert!(logged.is_empty(), "{logged:?}");
        match outcome {
            Outcome::Unhandled(unhandled) => {
                assert_eq!(unhandled.reason, UnhandledReason::Malformed);
                assert!(unhandled.detail.starts_with("body is not JSON"), "{}", unhandled.detail);
            }
            other => panic!("{other:?}"),
        }
    }
{{#storage}}

    #[test]
    fn messages_are_counted_and_an_unavailable_storage_retries() {
        let storage: Storage = Some(RefCell::default());
        for _ in 0..2 {
            assert!(matches!(decide_with("{}", &storage).0, Outcome::Ack));
        }
        let values = storage.as_ref().unwrap().borrow();
        assert_eq!(values[&format!("{ACTOR}/{HANDLED}")], b"2");
        let (outcome, _) = decide_with("{}", &None);
        assert!(matches!(outcome, Outcome::Retry(None)));
    }
{{/storage}}
}
"##;

const README_MD: &str = r##"# {{name}}

A clawq queue handler: a WebAssembly component for world `{{world}}` of
`wit/queues.wit`, the whole contract, documented item by item.
The world grants the imports {{grants}}.

`src/lib.rs` answers one outcome per message (`ack`, `retry`, `dead-letter`, or
`unhandled` for a message that retrying cannot fix: the host acknowledges it, logs a
warning with the reason and counts it in `clawq_messages_unhandled_total`). As
generated, it logs each JSON message and acks it, and answers `unhandled` (`malformed`)
for any other body.
{{#storage}}
It also counts the JSON messages it handled in its actor storage (actor `{{name}}`,
key `handled`), and retries a message when that storage is unavailable for a while.
{{/storage}}
The decisions are kept apart from the host's imports, so that the unit tests run them
against a fake host.

```sh
cargo test                                        # the handler against a fake host
rustup target add wasm32-wasip2                   # once
cargo build --target wasm32-wasip2 --release      # the component:
# target/wasm32-wasip2/release/{{crate}}.wasm

# which worlds accept it, and why the others do not
clawq check target/wasm32-wasip2/release/{{crate}}.wasm --world {{world}}
# one batch on this machine, against throwaway capabilities: every call and outcome
clawq run target/wasm32-wasip2/release/{{crate}}.wasm --world {{world}} --message '{"hello": "world"}'
# into a running host's consumer (admin token: --admin-token or CLAWQ_ADMIN_TOKEN)
clawq handlers deploy <consumer> target/wasm32-wasip2/release/{{crate}}.wasm
clawq handlers rollback <consumer>                # back to the previous version
```

To run it next to a queue's bundled handler, the operator gives it a consumer of its own
in the host's config, with the messages it takes:

```toml
[[queues.consumers]]
queue = "clawdentity-receipts"
name = "{{name}}"
handler = "target/wasm32-wasip2/release/{{crate}}.wasm"
world = "{{world}}"
filter = { type = "delivery_receipt" }
```

Delivery is at least once: a message can be delivered again, so keep the handler
idempotent.
"##;

const GITIGNORE: &str = "/target\n";

/// Writes the crate `<parent>/<name>/` of a new handler for `world`; returns what to
/// print: where it is and the next steps.
pub fn new_handler(name: &str, world: World, parent: &Path) -> Result<String> {
    check_crate_name(name).map_err(|why| anyhow::anyhow!("`{name}` {why}"))?;
    let dir = parent.join(name);
    if dir.exists() {
        anyhow::bail!(
            "{} already exists: choose another name or --dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(parent)
        .with_context(|| format!("creating directory {}", parent.display()))?;
    std::fs::create_dir(&dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let storage = world.grants().contains(&"actor-storage");
    let fill = |template: &str| {
        sections(template, "storage", storage)
            .replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"))
            .replace("{{world}}", world.name())
            .replace("{{grants}}", &world.grants().join(", "))
    };
    let files: [(&str, String); 5] = [
        ("Cargo.toml", fill(CARGO_TOML)),
        ("src/lib.rs", fill(LIB_RS)),
        ("wit/queues.wit", CONTRACT.to_owned()),
        ("README.md", fill(README_MD)),
        (".gitignore", GITIGNORE.to_owned()),
    ];
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)
                .with_context(|| format!("creating directory {}", folder.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(next_steps(name, world, &dir))
}

/// `template` with its `{{#section}}` lines (up to `{{/section}}`) kept only when `on`, and
/// its `{{^section}}` lines only when not; the marker lines themselves are dropped.
fn sections(template: &str, section: &str, on: bool) -> String {
    let (start, inverse, end) = (
        format!("{{{{#{section}}}}}"),
        format!("{{{{^{section}}}}}"),
        format!("{{{{/{section}}}}}"),
    );
    let mut keep = true;
    let mut text = String::with_capacity(template.len());
    for line in template.split_inclusive('\n') {
        match line.trim_end() {
            marker if marker == start => keep = on,
            marker if marker == inverse => keep = !on,
            marker if marker == end => keep = true,
            _ if keep => text += line,
            _ => {}
        }
    }
    text
}

/// What to do with the new crate at `dir`.
fn next_steps(name: &str, world: World, dir: &Path) -> String {
    let wasm: PathBuf = ["target", "wasm32-wasip2", "release"]
        .iter()
        .collect::<PathBuf>()
        .join(format!("{}.wasm", name.replace('-', "_")));
    let wasm = wasm.display();
    format!(
        "created handler crate `{name}` for world `{world}` in {dir}\n\n\
         next steps:\n  \
         cd {dir}\n  \
         cargo test                                      # the handler against a fake host\n  \
         rustup target add wasm32-wasip2                 # once\n  \
         cargo build --target wasm32-wasip2 --release\n  \
         clawq check {wasm} --world {world}\n  \
         clawq run {wasm} --world {world} --message '{{\"hello\": \"world\"}}'\n  \
         clawq handlers deploy <consumer> {wasm}\n",
        dir = dir.display()
    )
}

/// Why `name` cannot name a crate (Cargo's rules, and no clash with a dependency).
fn check_crate_name(name: &str) -> Result<(), String> {
    const RESERVED: [&str; 9] = [
        "std",
        "core",
        "alloc",
        "proc_macro",
        "proc-macro",
        "test",
        "wit-bindgen",
        "wit_bindgen",
        "serde_json",
    ];
    if name.is_empty() || name.len() > 64 {
        return Err("is not a valid crate name: it must have 1 to 64 characters".into());
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err("is not a valid crate name: it must start with an ASCII letter".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "is not a valid crate name: {c:?} is not allowed (only ASCII letters, digits, `-` and `_`)"
        ));
    }
    if RESERVED.contains(&name) || is_keyword(name) {
        return Err("is not a valid crate name: it is reserved".into());
    }
    Ok(())
}

/// Whether `name` is a Rust keyword.
fn is_keyword(name: &str) -> bool {
    const KEYWORDS: [&str; 51] = [
        "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
        "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
        "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub",
        "ref", "return", "self", "static", "struct", "super", "trait", "true", "try", "type",
        "typeof", "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
    ];
    KEYWORDS.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_kept_or_dropped() {
        let template = "a\n{{#s}}\nb\n{{/s}}\n{{^s}}\nc\n{{/s}}\nd\n";
        assert_eq!(sections(template, "s", true), "a\nb\nd\n");
        assert_eq!(sections(template, "s", false), "a\nc\nd\n");
        for world in World::ALL {
            let storage = world.grants().contains(&"actor-storage");
            let lib = sections(LIB_RS, "storage", storage);
            assert!(!lib.contains("{{#") && !lib.contains("{{^") && !lib.contains("{{/"));
            assert_eq!(lib.contains("actor_storage::get"), storage, "{world}");
        }
    }

    #[test]
    fn crate_names_follow_cargo_rules() {
        for good in ["demo-handler", "my_handler2", "x"] {
            assert_eq!(check_crate_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "2fast",
            "-x",
            "has space",
            "dot.ted",
            "ünï",
            "fn",
            "std",
            "serde_json",
        ] {
            assert!(check_crate_name(bad).is_err(), "{bad}");
        }
    }
}
