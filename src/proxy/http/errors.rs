//! Errors of one proxied request: which side failed, the status the client sees, and whether
//! another server may be tried. Every error response has a short plain-text body.

use super::body::{full, ResBody};
use http::{header, Response, StatusCode};

/// Which side of the proxy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something wrong or too big, or was too slow.
    Client,
    /// The upstream server refused, reset, timed out or answered garbage.
    Upstream,
    /// baton itself (configuration).
    Internal,
}

impl Side {
    /// Name used in log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route matched and the listener has no default.
    #[error("no route for this host and path")]
    NoRoute,
    /// The request is malformed or ambiguous (smuggling attempt).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request body is larger than `max_body_bytes`.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// The upstream has no server that may be tried.
    #[error("no server available in upstream {0}")]
    NoServer(String),
    /// Connecting, sending or reading the response head failed.
    #[error("upstream {server}: {reason}")]
    Upstream {
        /// The server that failed.
        server: std::net::SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The server did not start its response within `response_timeout`.
    #[error("upstream {0} did not answer in time")]
    UpstreamTimeout(std::net::SocketAddr),
    /// The whole exchange took longer than `request_timeout`.
    #[error("request took longer than request_timeout")]
    RequestTimeout,
    /// A route or listener names an upstream that does not exist (config bug).
    #[error("missing upstream {0}")]
    MissingUpstream(String),
    /// The client's protocol cannot carry this request (CONNECT over HTTP/2).
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// The client paused its request body longer than `http.body_timeout`.
    #[error("request body paused longer than body_timeout")]
    BodyTimeout,
}

impl ProxyError {
    /// The status a client sees.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoServer(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) | ProxyError::RequestTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::MissingUpstream(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::NotSupported(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::NoRoute
            | ProxyError::BadRequest(_)
            | ProxyError::BodyTooLarge(_)
            | ProxyError::NotSupported(_)
            | ProxyError::BodyTimeout => Side::Client,
            ProxyError::NoServer(_)
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::RequestTimeout => Side::Upstream,
            ProxyError::MissingUpstream(_) => Side::Internal,
        }
    }

    /// The short text the client gets.
    fn body_text(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no route\n",
            ProxyError::BadRequest(_) => "bad request\n",
            ProxyError::BodyTooLarge(_) => "request body too large\n",
            ProxyError::NoServer(_) => "no server available\n",
            ProxyError::Upstream { .. } => "bad gateway\n",
            ProxyError::UpstreamTimeout(_) => "upstream timeout\n",
            ProxyError::RequestTimeout => "request timeout\n",
            ProxyError::MissingUpstream(_) => "internal error\n",
            ProxyError::NotSupported(_) => "not implemented\n",
            ProxyError::BodyTimeout => "request body timeout\n",
        }
    }

    /// The response a client sees for this error.
    pub fn response(&self) -> Response<ResBody> {
        plain(self.status(), self.body_text())
    }
}

/// A response with a short plain-text body.
pub fn plain(status: StatusCode, text: &'static str) -> Response<ResBody> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The raw bytes of a 408 written directly to a client whose request head did not arrive in time
/// (hyper's own header timeout closes without a response).
pub const RAW_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 24\r\nconnection: close\r\n\r\nrequest header timeout\r\n";
