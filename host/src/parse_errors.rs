//! JSON for the answers the HTTP layer (hyper) writes on its own, before any route sees
//! the request: 400 for a request it cannot parse (a request line or header that is not
//! HTTP, a path with bytes outside ASCII such as invalid UTF-8), 414 for a request
//! target over 64 KiB, 431 for a head over its buffer. hyper writes those with an empty
//! body; [`JsonParseErrors`] wraps a connection's stream and replaces such an answer with
//! the API's JSON error as it is written.
//!
//! Every answer of the API itself carries `content-type: application/json` (see
//! [`crate::http_guard`]), so an error head without a content type is hyper's own.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest head hyper writes for an error of its own (status line, `connection`,
/// `content-length` and `date`).
const MAX_HEAD: usize = 512;

/// A connection's stream whose hyper-made error answers are written as JSON.
pub struct JsonParseErrors<I> {
    io: I,
    /// The JSON answer being written in place of hyper's, and how much of it is written.
    replacing: Option<(Vec<u8>, usize)>,
}

impl<I> JsonParseErrors<I> {
    /// Wraps `io`.
    pub fn new(io: I) -> Self {
        JsonParseErrors {
            io,
            replacing: None,
        }
    }
}

/// The JSON answer to write instead of `head`, if `head` is one of hyper's own error
/// answers.
fn replacement(head: &[u8]) -> Option<Vec<u8>> {
    if !head.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let end = head
        .windows(4)
        .take(MAX_HEAD)
        .position(|w| w == b"\r\n\r\n")?;
    let text = std::str::from_utf8(&head[..end + 4]).ok()?;
    let head = text[..end].to_ascii_lowercase();
    let status = head.strip_prefix("http/1.1 ")?.get(..3)?;
    if !status.starts_with('4') || head.contains("\r\ncontent-type:") {
        return None;
    }
    let (code, message) = match status {
        "414" => (
            "uri_too_long",
            "the request target is longer than the host reads",
        ),
        "431" => (
            "headers_too_large",
            "the request head is larger than the host reads",
        ),
        _ => (
            "invalid_request",
            "the request is not valid HTTP/1.1 (its request line, a header, or a path with \
             bytes outside ASCII, such as invalid UTF-8: percent-encode them)",
        ),
    };
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let reason = &text[9..text.find("\r\n")?];
    Some(
        format!(
            "HTTP/1.1 {reason}\r\nconnection: close\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<I: AsyncWrite + Unpin> JsonParseErrors<I> {
    /// Writes what is left of the replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some((bytes, written)) = &mut self.replacing {
            while *written < bytes.len() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, &bytes[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for JsonParseErrors<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replacing.is_none() {
            match replacement(buf) {
                Some(json) => self.replacing = Some((json, 0)),
                None => return Pin::new(&mut self.io).poll_write(cx, buf),
            }
        }
        // hyper's answer (and anything after it: the connection closes) is swallowed.
        ready!(self.poll_replacement(cx))?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_heads_without_a_content_type_are_replaced() {
        let hyper = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        let json = String::from_utf8(replacement(hyper).unwrap()).unwrap();
        assert!(json.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{json}");
        assert!(
            json.ends_with("}}") && json.contains("\"invalid_request\""),
            "{json}"
        );
        let api = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\r\n{}";
        assert!(replacement(api).is_none());
        assert!(replacement(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
    }
}
