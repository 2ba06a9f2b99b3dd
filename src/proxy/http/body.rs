//! Bodies of hyper's messages (h2c): the request body handed to an upstream (size-limited, and
//! taken back for a retry if no byte of it was sent), and the response body handed to the
//! client (which ends the request for in-flight counting, keeps the server counted as active,
//! enforces the request deadline and writes the access log line). Both stream frame by frame:
//! nothing is buffered.

use super::service::ReqLog;
use crate::upstream::ServerGuard;
use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

/// Errors carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The response body type of the proxy service.
pub type ResBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body from static text.
pub fn full(text: &'static str) -> ResBody {
    Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|n| match n {})
        .boxed_unsync()
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReqBodyError {
    /// More than `max_body_bytes` arrived.
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    /// A newer attempt owns the body (this one was abandoned for a retry).
    #[error("request body taken by a retry")]
    Superseded,
}

#[derive(Debug)]
struct ReqBodyState {
    body: Option<ResBody>,
    read: u64,
    limit: Option<u64>,
    too_large: bool,
    /// A frame was handed to an upstream: the body can no longer be replayed.
    started: bool,
    /// The attempt that owns the body.
    epoch: u64,
    /// When the upstream last took a frame (hyper's client polls for one as the stream's flow
    /// control allows): the response timeout counts from there.
    taken_at: Option<tokio::time::Instant>,
}

/// The client's request body as given to one upstream attempt.
#[derive(Debug)]
pub struct ReplayBody {
    state: Arc<Mutex<ReqBodyState>>,
    epoch: u64,
}

fn lock(m: &Mutex<ReqBodyState>) -> MutexGuard<'_, ReqBodyState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReplayBody {
    /// Wraps a client body (an h2c stream's, or one the engine feeds), limited to `limit` bytes.
    pub fn new(body: ResBody, limit: Option<u64>) -> ReplayBody {
        let state = ReqBodyState {
            body: Some(body),
            read: 0,
            limit,
            too_large: false,
            started: false,
            epoch: 0,
            taken_at: None,
        };
        ReplayBody {
            state: Arc::new(Mutex::new(state)),
            epoch: 0,
        }
    }

    /// A body for another attempt, if nothing of this one was sent yet.
    pub fn replay(&self) -> Option<ReplayBody> {
        let mut st = lock(&self.state);
        if st.started {
            return None;
        }
        st.epoch += 1;
        Some(ReplayBody {
            state: self.state.clone(),
            epoch: st.epoch,
        })
    }

    /// A handle that can be replayed after this body was given away.
    pub fn handle(&self) -> ReplayBody {
        ReplayBody {
            state: self.state.clone(),
            epoch: self.epoch,
        }
    }

    /// When the upstream last took a frame of this body, if it took one.
    pub fn taken_at(&self) -> Option<tokio::time::Instant> {
        lock(&self.state).taken_at
    }

    /// Whether the body exceeded `max_body_bytes`.
    pub fn too_large(&self) -> bool {
        lock(&self.state).too_large
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut st = lock(&self.state);
        if st.epoch != self.epoch {
            return Poll::Ready(Some(Err(ReqBodyError::Superseded.into())));
        }
        let Some(body) = st.body.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(body).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => {
                st.started = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                st.started = true;
                st.taken_at = Some(tokio::time::Instant::now());
                if let Some(d) = frame.data_ref() {
                    st.read += d.len() as u64;
                    if let Some(limit) = st.limit.filter(|l| st.read > *l) {
                        st.too_large = true;
                        return Poll::Ready(Some(Err(ReqBodyError::TooLarge(limit).into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.state)
            .body
            .as_ref()
            .is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.state)
            .body
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

/// What the end of a response body releases.
#[derive(Debug, Default)]
pub struct Release {
    /// Keeps the server counted as active while the response streams.
    pub guard: Option<ServerGuard>,
}

/// The response body given to the client.
pub struct Tracked {
    inner: ResBody,
    bytes: u64,
    deadline: Option<Instant>,
    /// The timer for `deadline`, made only if the body has to wait (most end at once).
    timer: Option<Pin<Box<Sleep>>>,
    log: Option<ReqLog>,
    release: Release,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// The response deadline passed while the body streamed.
#[derive(Debug, thiserror::Error)]
#[error("request_timeout passed while the response streamed")]
pub struct DeadlinePassed;

impl Tracked {
    /// Wraps a response body; `log` is written (and the request counted as ended) when the body
    /// ends or is dropped.
    pub fn new(
        inner: ResBody,
        log: ReqLog,
        deadline: Option<Instant>,
        release: Release,
    ) -> Tracked {
        Tracked {
            inner,
            bytes: 0,
            deadline,
            timer: None,
            log: Some(log),
            release,
        }
    }

    fn finish(&mut self, complete: bool) {
        self.release.guard.take();
        if let Some(log) = self.log.take() {
            log.emit(self.bytes, complete);
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                if let Some(d) = this.deadline {
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(d)));
                    if timer.as_mut().poll(cx).is_ready() {
                        this.finish(false);
                        return Poll::Ready(Some(Err(DeadlinePassed.into())));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

use std::future::Future as _;
