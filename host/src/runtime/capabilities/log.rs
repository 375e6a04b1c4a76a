//! The `log` import: leveled log lines, attributed to the calling handler.

use super::BatchState;
use crate::bounds;
use crate::runtime::bindings::clawdentity::queues::log;

impl log::Host for BatchState {
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
        self.record_line(name, &message);
        let (handler, version) = (&*self.handler, &*self.version);
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
