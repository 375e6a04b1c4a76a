//! A body that shows each data chunk to a check as it goes through, and keeps the check,
//! with whatever it captured, until the body is dropped: the body budget meters request
//! bodies with it, and the listener counts a request as under way until its response is
//! sent. The size hint goes through unchanged (a response keeps its `Content-Length`).

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::BoxError;
use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};

/// `body`, with `check` seeing each of its data chunks; a chunk `check` refuses ends the
/// body with that error.
pub fn watched<F>(body: Body, check: F) -> Body
where
    F: FnMut(&Bytes) -> Result<(), BoxError> + Send + Unpin + 'static,
{
    Body::new(Watched { body, check })
}

struct Watched<F> {
    body: Body,
    check: F,
}

impl<F> http_body::Body for Watched<F>
where
    F: FnMut(&Bytes) -> Result<(), BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other.map(|f| f.map(|r| r.map_err(Into::into))),
        };
        if let Some(data) = frame.data_ref()
            && let Err(error) = (self.check)(data)
        {
            return Poll::Ready(Some(Err(error)));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
