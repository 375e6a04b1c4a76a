//! Recording the capability calls of a batch, for `clawq run`: every capability call is
//! made through [`recorded`], which makes it and records it (a log line through
//! [`record_line`]); neither does anything more unless the batch records.

use std::fmt;
use std::sync::{Arc, Mutex};

use super::HostError;

/// One capability call a handler made, as `clawq run` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Call {
    /// `interface.function`, e.g. `relay-sessions.deliver-receipt`; `log.<level>` for a
    /// log line.
    pub call: String,
    /// The arguments, as text.
    pub args: String,
    /// What the call returned, as text; `None` for a log line.
    pub result: Option<String>,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.call, self.args)?;
        match &self.result {
            Some(result) => write!(f, " -> {result}"),
            None => Ok(()),
        }
    }
}

/// Where the capability calls of a batch are recorded, in order.
pub type CallLog = Arc<Mutex<Vec<Call>>>;

/// Makes the capability call `call` (the future `run`) and, when the batch records its
/// calls (`calls`), records it: its arguments as `args` shows them, taken before the
/// call, and what it returned, a success as `show` shows it. `args` and `show` run only
/// when the batch records.
pub(super) async fn recorded<T>(
    calls: Option<&CallLog>,
    call: &str,
    args: impl FnOnce() -> String,
    show: impl FnOnce(&T) -> String,
    run: impl Future<Output = Result<T, HostError>>,
) -> Result<T, HostError> {
    let args = calls.is_some().then(args);
    let result = run.await;
    if let Some(args) = args {
        record_result(calls, call, || args, show, &result);
    }
    result
}

/// Records, when the batch records its calls (`calls`), that the capability call
/// `call` with the arguments `args` shows returned `result` (a success as `show` shows
/// it). `args` and `show` run only when the batch records.
pub(super) fn record_result<T>(
    calls: Option<&CallLog>,
    call: &str,
    args: impl FnOnce() -> String,
    show: impl FnOnce(&T) -> String,
    result: &Result<T, HostError>,
) {
    if let Some(calls) = calls {
        let shown = match result {
            Ok(value) => show(value),
            Err(err) if err.transient => format!("error (transient): {}", err.message),
            Err(err) => format!("error: {}", err.message),
        };
        push(calls, call.to_owned(), args(), Some(shown));
    }
}

/// Records a log line (`log.<level>`, the message as its argument), when the batch
/// records its calls (`calls`).
pub(super) fn record_line(calls: Option<&CallLog>, level: &str, message: &str) {
    if let Some(calls) = calls {
        push(calls, format!("log.{level}"), format!("{message:?}"), None);
    }
}

/// Appends one call to `calls`.
fn push(calls: &CallLog, call: String, args: String, result: Option<String>) {
    let mut calls = calls.lock().unwrap_or_else(|p| p.into_inner());
    calls.push(Call { call, args, result });
}
