//! The `log` import: leveled log lines, attributed to the calling handler.

use wasmtime::component::HasData;

use super::BatchState;
use crate::bounds::{self, BatchLog};
use crate::runtime::bindings::clawdentity::queues::log;
use crate::runtime::record::{CallLog, record_line};

/// What the `log` import reaches of a batch: its share of the consumer's log rate, the
/// handler's name and version its lines are attributed to, and the batch's call log.
pub(in crate::runtime) struct LogView<'a> {
    log: &'a mut BatchLog,
    handler: &'a str,
    version: &'a str,
    calls: Option<&'a CallLog>,
}

/// The `log` import's view of a batch's state, for the linker.
pub(in crate::runtime) struct HasLog;

impl HasData for HasLog {
    type Data<'a> = LogView<'a>;
}

impl HasLog {
    /// The view of `state`.
    pub(in crate::runtime) fn view(state: &mut BatchState) -> LogView<'_> {
        LogView {
            log: &mut state.log,
            handler: &state.handler,
            version: &state.version,
            calls: state.calls.as_ref(),
        }
    }
}

impl log::Host for LogView<'_> {
    async fn write(&mut self, level: log::Level, message: String) {
        if !self.log.admit() {
            return;
        }
        let message = bounds::log_line(message);
        let name = match level {
            log::Level::Trace => "trace",
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        record_line(self.calls, name, &message);
        let (handler, version) = (self.handler, self.version);
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "clawq::guest", handler, version, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "clawq::guest", handler, version, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "clawq::guest", handler, version, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "clawq::guest", handler, version, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "clawq::guest", handler, version, "{message}")
            }
        }
    }
}
