//! Helpers for the TLS tests: one HTTPS request with `openssl s_client`, saving or offering a
//! session, and whether it resumed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};

/// One HTTPS request with openssl s_client, saving (`-sess_out`) or offering (`-sess_in`) a
/// session: its whole output.
pub fn s_client(port: u16, version: &str, sess: (&str, &Path), ca: &Path) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            version,
            "-ign_eof",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["-servername", "a.test", "-CAfile"])
        .arg(ca)
        .arg(sess.0)
        .arg(sess.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The response ends with the server's close: by then the session tickets have arrived.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    super::printed(&out)
}

/// Whether s_client says the session was resumed.
pub fn reused(out: &str) -> bool {
    out.lines().any(|l| l.starts_with("Reused,"))
}
