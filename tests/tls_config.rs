//! `tls:` certificates that are broken: `baton check` and `baton run` refuse the same files
//! with the same `file:line:col: key: why` message; an expired certificate is a warning.
#![allow(clippy::unwrap_used)]
mod common;
use common::make_cert;
use std::path::Path;
use std::process::Command;

fn config(dir: &Path, cert: &str, key: &str) -> std::path::PathBuf {
    let yaml = format!(
        "runtime: {{ pid_file: baton.pid, control_socket: baton.sock }}\nlisteners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n    tls:\n      certificates:\n        - {{ cert: {cert}, key: {key} }}\nupstreams:\n  app:\n    servers: [127.0.0.1:9]\n"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `baton CMD -c config`: (exit code, output).
fn baton(cmd: &str, config: &Path) -> (Option<i32>, String) {
    let out = Command::new(common::bin())
        .args([cmd, "-c"])
        .arg(config)
        .output()
        .unwrap();
    (out.status.code(), common::printed(&out))
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused_by_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "a", &["DNS:a.test"], 30);
    make_cert(dir.path(), "b", &["DNS:b.test"], 30);
    let cfg = config(dir.path(), "a.pem", "b.key");
    for cmd in ["check", "run"] {
        let (code, out) = baton(cmd, &cfg);
        assert_eq!(code, Some(2), "{cmd}: {out}");
        assert!(
            out.contains("config.yaml:9:31: listeners.web.tls.certificates[0].key:")
                && out.contains("b.key does not match the certificate in"),
            "{cmd}: {out}"
        );
    }
}

#[test]
fn a_missing_file_and_a_file_without_pem_are_refused_by_check_and_run() {
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "a", &["DNS:a.test"], 30);
    std::fs::write(dir.path().join("junk.pem"), "not a certificate\n").unwrap();
    for (cert, key, want) in [
        ("gone.pem", "a.key", "certificates[0].cert: cannot read"),
        ("junk.pem", "a.key", "junk.pem: no PEM CERTIFICATE in it"),
        ("a.pem", "a.pem", "a.pem: no PEM private key in it"),
    ] {
        let cfg = config(dir.path(), cert, key);
        for cmd in ["check", "run"] {
            let (code, out) = baton(cmd, &cfg);
            assert_eq!(code, Some(2), "{cmd} {cert} {key}: {out}");
            assert!(out.contains(want), "{cmd} {cert} {key}: {out}");
            assert!(out.contains("config.yaml:9:"), "{cmd}: position: {out}");
        }
    }
}

#[test]
fn an_expired_certificate_loads_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "old", &["DNS:old.test"], -1);
    let cfg = config(dir.path(), "old.pem", "old.key");
    let (code, out) = baton("check", &cfg);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("listeners.web.tls.certificates[0]: warning: certificate")
            && out.contains("old.pem expired at"),
        "{out}"
    );
    let (_, dump) = baton("check", &cfg);
    assert!(dump.contains("ok (1 listeners"), "{dump}");
    let out = Command::new(common::bin())
        .args(["check", "--dump", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    for key in [
        "tls:",
        "certificates:",
        "old.pem",
        "alpn:",
        "- http/1.1",
        "min_version: \"1.2\"",
        "handshake_timeout: 10s",
    ] {
        assert!(dump.contains(key), "dump lacks {key}: {dump}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_logs_the_expiry_warning_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    make_cert(dir.path(), "old", &["DNS:old.test"], -1);
    let cfg = config(dir.path(), "old.pem", "old.key");
    let b = common::Baton::start_in(dir, cfg);
    b.log
        .wait_for(
            &["configuration warning", "old.pem expired at"],
            common::WAIT,
        )
        .expect("warning logged");
}
