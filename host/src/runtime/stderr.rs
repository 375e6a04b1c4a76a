//! A guest's stderr: every write is accepted (a guest never traps because of its own
//! output), and the first and last [`KEPT_BYTES`] are kept for its trap report.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Bytes kept from each end of a guest's stderr.
pub const KEPT_BYTES: usize = 2048;

/// The capture of one batch's stderr; clones share it.
#[derive(Clone, Default)]
pub struct StderrCapture(Arc<Mutex<Capture>>);

#[derive(Default)]
struct Capture {
    head: Vec<u8>,
    /// The last bytes written after the head filled, oldest first once rotated by
    /// `start`.
    tail: Vec<u8>,
    /// Where the oldest byte of `tail` is, once it is full.
    start: usize,
    total: usize,
}

impl StderrCapture {
    /// Takes `bytes` as written.
    fn take(&self, bytes: &[u8]) {
        let mut capture = self.0.lock().unwrap_or_else(|p| p.into_inner());
        capture.total += bytes.len();
        let room = KEPT_BYTES - capture.head.len();
        let (head, rest) = bytes.split_at(room.min(bytes.len()));
        capture.head.extend_from_slice(head);
        // Only the last KEPT_BYTES of `rest` can end up in the tail.
        let rest = &rest[rest.len().saturating_sub(KEPT_BYTES)..];
        for &byte in rest {
            if capture.tail.len() < KEPT_BYTES {
                capture.tail.push(byte);
            } else {
                let at = capture.start;
                capture.tail[at] = byte;
                capture.start = (at + 1) % KEPT_BYTES;
            }
        }
    }

    /// What the guest wrote, whitespace collapsed: all of it when it was short, else its
    /// head, `… (<n> bytes) …` and its tail.
    pub fn report(&self) -> String {
        let capture = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let collapse = |bytes: &[u8]| {
            String::from_utf8_lossy(bytes)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (newest, oldest) = capture.tail.split_at(capture.start);
        let tail = [oldest, newest].concat();
        if capture.total == capture.head.len() + tail.len() {
            return collapse(&[capture.head.as_slice(), &tail].concat());
        }
        format!(
            "{} … ({} bytes) … {}",
            collapse(&capture.head),
            capture.total,
            collapse(&tail)
        )
    }
}

impl IsTerminal for StderrCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrCapture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for StderrCapture {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.take(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrCapture {
    async fn ready(&mut self) {}
}

impl AsyncWrite for StderrCapture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.take(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_keeps_its_head_and_tail() {
        let capture = StderrCapture::default();
        capture.take(b"short panic");
        assert_eq!(capture.report(), "short panic");

        let flood = StderrCapture::default();
        flood.take(b"START ");
        for _ in 0..1000 {
            flood.take(&[b'x'; 1000]);
        }
        flood.take(b" panicked at the end");
        let report = flood.report();
        assert!(report.starts_with("START x"), "{}", &report[..40]);
        assert!(report.contains("… (1000026 bytes) …"));
        assert!(report.ends_with("x panicked at the end"));
        assert!(report.len() < 2 * KEPT_BYTES + 64, "{}", report.len());
    }
}
