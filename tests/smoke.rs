//! The shortest end-to-end path: a TCP listener forwards to an echo backend.
#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn tcp_echo_through_baton() {
    let be = echo_backend("A").await;
    let b = Baton::start(&format!(
        "listeners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\nupstreams:\n  u:\n    servers: [\"{be}\"]\n"
    ));
    let (mut s, g) = greeting(b.addr("t"), 1).await;
    assert_eq!(g, "A");
    s.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
}
