//! The control socket: a Unix socket (mode 0600, peer uid checked with SO_PEERCRED) over which
//! `baton status|stop|upgrade|reload` talk to the running process. One JSON request line, one
//! JSON reply line. Requests are passed to the lifecycle as [`ControlRequest`] values; this
//! module knows nothing about upgrades.

use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

/// A command sent by the CLI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Report the process state.
    Status,
    /// Stop gracefully (or at once with `fast`).
    Stop {
        /// Close connections now instead of draining.
        #[serde(default)]
        fast: bool,
    },
    /// Start a successor binary and hand everything over. The reply comes once the
    /// successor has committed and serves, or with `wait` once the old process is done.
    Upgrade {
        /// Binary to start instead of the configured one.
        #[serde(default)]
        binary: Option<PathBuf>,
        /// Reply only once the old process has finished draining.
        #[serde(default)]
        wait: bool,
    },
    /// Re-read the configuration: an upgrade with the same binary.
    Reload {
        /// Reply only once the old process has finished draining.
        #[serde(default)]
        wait: bool,
    },
}

/// The reply to a command: success with a JSON body, or an error message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the command succeeded.
    pub ok: bool,
    /// One line for a person.
    pub message: String,
    /// Details for scripts.
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Reply {
    /// A success.
    pub fn ok(message: impl Into<String>, data: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            message: message.into(),
            data,
        }
    }
    /// A failure.
    pub fn err(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            message: message.into(),
            data: serde_json::Value::Null,
        }
    }
}

/// A command waiting for the lifecycle's answer.
#[derive(Debug)]
pub struct ControlRequest {
    /// What was asked.
    pub command: Command,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Reply>,
}

/// Binds the control socket at `path` (replacing a stale one), mode 0600.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Bind under a restrictive umask-free path: set the mode right after bind, before serving.
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Longest request line; a longer one is refused (a real request is well under 1 KiB).
pub const MAX_REQUEST_LINE: u64 = 64 * 1024;

/// How long a client has to send its request line once connected (the CLI sends it at once).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Most control connections served at once; accepting waits while this many are open, so
/// clients that connect and send nothing cannot take every file descriptor.
pub const MAX_CONNECTIONS: usize = 32;

/// Serves the control socket until `stop`; each accepted command becomes a [`ControlRequest`].
/// Handlers run on `tracker`, so the process can wait for replies to be written before it exits.
pub async fn serve(
    listener: UnixListener,
    tx: mpsc::Sender<ControlRequest>,
    stop: CancellationToken,
    tracker: tokio_util::task::TaskTracker,
) {
    let my_uid = rustix::process::getuid().as_raw();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = crate::listener::AcceptBackoff::new("control");
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                if !backoff.failed(&e, &stop).await {
                    return;
                }
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(c) if c.uid() == my_uid || c.uid() == 0 => {}
            Ok(c) => {
                tracing::warn!(
                    peer_uid = c.uid(),
                    "control socket: refused a client of another user"
                );
                let reply = Reply::err(format!(
                    "refused: uid {} may not control this baton (only uid {my_uid} or root)",
                    c.uid()
                ));
                tracker.spawn(async move {
                    write_reply(stream, reply).await;
                    drop(permit);
                });
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: cannot read peer credentials");
                continue;
            }
        }
        let tx = tx.clone();
        tracker.spawn(async move {
            handle(stream, tx).await;
            drop(permit);
        });
    }
}

/// Reads one request line: at most [`MAX_REQUEST_LINE`] bytes within [`READ_TIMEOUT`].
async fn read_request(r: tokio::net::unix::OwnedReadHalf) -> Result<Command, String> {
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(MAX_REQUEST_LINE));
    match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Err(format!(
            "no request line within {}s",
            READ_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("cannot read request: {e}")),
        Ok(Ok(n)) if n as u64 >= MAX_REQUEST_LINE && !line.ends_with('\n') => Err(format!(
            "request line longer than {} KiB",
            MAX_REQUEST_LINE / 1024
        )),
        Ok(Ok(_)) => {
            serde_json::from_str::<Command>(line.trim()).map_err(|e| format!("bad request: {e}"))
        }
    }
}

async fn handle(stream: UnixStream, tx: mpsc::Sender<ControlRequest>) {
    let (r, mut w) = stream.into_split();
    let reply = match read_request(r).await {
        Err(why) => {
            tracing::debug!(reason = %why, "control socket: request refused");
            Reply::err(why)
        }
        Ok(command) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx
                .send(ControlRequest {
                    command,
                    reply: reply_tx,
                })
                .await
                .is_err()
            {
                Reply::err("baton is shutting down")
            } else {
                reply_rx
                    .await
                    .unwrap_or_else(|_| Reply::err("baton stopped before answering"))
            }
        }
    };
    let mut out = serde_json::to_string(&reply)
        .unwrap_or_else(|_| "{\"ok\":false,\"message\":\"encoding error\"}".into());
    out.push('\n');
    let _ = w.write_all(out.as_bytes()).await;
}

/// Writes one reply line and closes.
async fn write_reply(mut stream: UnixStream, reply: Reply) {
    let mut out = serde_json::to_string(&reply)
        .unwrap_or_else(|_| "{\"ok\":false,\"message\":\"encoding error\"}".into());
    out.push('\n');
    let _ = stream.write_all(out.as_bytes()).await;
}

/// Client side: sends one command and waits for the reply.
pub async fn request(path: &Path, command: &Command) -> Result<Reply, ControlClientError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ControlClientError::NotRunning {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
            _ => ControlClientError::Connect {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    let (r, mut w) = stream.into_split();
    let mut msg =
        serde_json::to_string(command).map_err(|e| ControlClientError::Protocol(e.to_string()))?;
    msg.push('\n');
    // A server that refuses us answers at once and closes, so our write may fail: the
    // reply, if any, says more than the broken pipe.
    let written = w.write_all(msg.as_bytes()).await;
    let mut line = String::new();
    let read = BufReader::new(r).read_line(&mut line).await;
    if line.is_empty() {
        written.map_err(ControlClientError::Io)?;
        read.map_err(ControlClientError::Io)?;
        return Err(ControlClientError::Protocol(
            "connection closed without a reply".into(),
        ));
    }
    serde_json::from_str(line.trim()).map_err(|e| ControlClientError::Protocol(e.to_string()))
}

/// Why the CLI could not talk to the running process.
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    /// Nothing listens on the control socket.
    #[error("no baton is running (cannot connect to {}: {source})", path.display())]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        source: io::Error,
    },
    /// The socket exists but cannot be used (e.g. permission denied).
    #[error("cannot connect to the control socket {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        source: io::Error,
    },
    /// The exchange failed.
    #[error("control socket: {0}")]
    Io(io::Error),
    /// The reply was not understood.
    #[error("control socket: bad reply: {0}")]
    Protocol(String),
}
