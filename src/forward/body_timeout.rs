//! Body inactivity timeout, one type for both directions: a client request body that stops
//! arriving, and an upstream response body that stops after its headers.
//!
//! [`TimedBody`] restarts a timer on every frame. When the timer fires while the inner body
//! has nothing to give, the body ends with a [`BodyTimeout`] error: hyper then resets the
//! stream or closes the connection on both sides, so no client or upstream connection stays
//! held by a silent peer. Each firing is logged and counted.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep};

use crate::BoxError;

/// Which body went silent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The client's request body, on its way to Coinbase.
    Request,
    /// Coinbase's response body, on its way to the client.
    Response,
}

impl Direction {
    /// The `kind` label of `cbgate_timeouts_total`.
    pub fn kind(self) -> &'static str {
        match self {
            Direction::Request => "request_body",
            Direction::Response => "upstream_body",
        }
    }
}

/// A body went silent for longer than `body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("{} sent nothing for {after:?} (body_timeout)", match .direction {
    Direction::Request => "the client's request body",
    Direction::Response => "the upstream response body",
})]
pub struct BodyTimeout {
    pub direction: Direction,
    pub after: Duration,
}

pin_project_lite::pin_project! {
    /// Wraps a body and fails it once `timeout` passes without a frame.
    pub struct TimedBody<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
        timeout: Duration,
        direction: Direction,
        fired: Counter,
        request_id: Option<HeaderValue>,
        done: bool,
    }
}

impl<B> TimedBody<B> {
    /// Starts the timer now (inside the runtime). `fired` is incremented when it fires;
    /// `request_id` goes into the log line.
    pub fn new(
        inner: B,
        timeout: Duration,
        direction: Direction,
        fired: Counter,
        request_id: Option<HeaderValue>,
    ) -> TimedBody<B> {
        TimedBody {
            inner,
            sleep: tokio::time::sleep(timeout),
            timeout,
            direction,
            fired,
            request_id,
            done: false,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        // The body first: data that arrived while nobody polled is progress, not silence.
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = Instant::now() + *this.timeout;
                this.sleep.as_mut().reset(next);
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        ready!(this.sleep.as_mut().poll(cx));
        *this.done = true;
        this.fired.inc();
        let rid = this
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::warn!(
            request_id = rid,
            kind = this.direction.kind(),
            after_ms = this.timeout.as_millis() as u64,
            "body timeout: a body sent nothing for body_timeout; releasing the connections"
        );
        Poll::Ready(Some(Err(Box::new(BodyTimeout {
            direction: *this.direction,
            after: *this.timeout,
        }))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt as _;
    use http_body_util::StreamBody;

    #[tokio::test]
    async fn a_silent_body_fails_after_the_timeout_and_frames_restart_it() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let fired = Counter::default();
        let mut body = Box::pin(TimedBody::new(
            StreamBody::new(stream),
            Duration::from_millis(400),
            Direction::Response,
            fired.clone(),
            None,
        ));
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .expect("send");
        assert!(body.frame().await.expect("frame").is_ok());
        // Within the restarted timer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"b"))))
            .await
            .expect("send");
        assert!(body.frame().await.expect("frame").is_ok());
        let err = body.frame().await.expect("an error").expect_err("timeout");
        assert!(err.is::<BodyTimeout>(), "{err}");
        // Two frames restarted the timer: it fired no sooner than 400 ms after the last one.
        assert!(started.elapsed() >= Duration::from_millis(600));
        assert_eq!(fired.get(), 1);
        assert!(body.frame().await.is_none());
        drop(tx);
    }
}
