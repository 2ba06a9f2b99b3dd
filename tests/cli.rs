//! The command line as an operator uses it: `--version`, `--help`, `check` and `run` exit codes,
//! and the pid file's life.
#![allow(clippy::unwrap_used)]
mod common;

use common::*;
use rustix::process::Signal;
use std::process::Command;

fn baton(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_prints_name_and_version() {
    let (code, out, _) = baton(&["--version"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), format!("baton {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn help_lists_the_commands_and_examples() {
    let (code, out, _) = baton(&["--help"]);
    assert_eq!(code, Some(0));
    for want in [
        "run",
        "check",
        "Examples:",
        "baton run -c config.yaml",
        "baton check -c config.yaml",
    ] {
        assert!(out.contains(want), "--help lacks {want:?}:\n{out}");
    }
}

#[test]
fn unknown_command_is_a_usage_error() {
    let (code, _, err) = baton(&["frobnicate"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("frobnicate"), "{err}");
}

#[test]
fn check_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "listeners:\n  t: {listen: 127.0.0.1:0, upstream: u}\nupstreams:\n  u:\n    servers: [127.0.0.1:1]\n").unwrap();
    let (code, out, _) = baton(&["check", "-c", good.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(out.contains("ok (1 listeners, 1 upstreams)"), "{out}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "listeners:\n  t: {listen: 127.0.0.1:0, upstream: nope}\nlog:\n  format: xml\n",
    )
    .unwrap();
    let (code, _, err) = baton(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    // Every error is reported, not only the first.
    assert!(
        err.contains("bad.yaml:2:38: listeners.t.upstream: unknown upstream \"nope\""),
        "{err}"
    );
    assert!(
        err.contains("bad.yaml:4:11: log.format: unknown value \"xml\""),
        "{err}"
    );
}

#[test]
fn check_defaults_to_config_yaml_in_the_current_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.yaml: cannot read"));
    std::fs::write(
        dir.path().join("config.yaml"),
        "listeners:\n  t: {listen: 127.0.0.1:0, upstream: u}\nupstreams:\n  u:\n    servers: [127.0.0.1:1]\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn run_with_an_invalid_config_exits_2_with_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "listeners:\n  t: {listen: 127.0.0.1:0, upstream: nope}\n",
    )
    .unwrap();
    let (code, _, err) = baton(&["run", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("config.yaml:2:38: listeners.t.upstream: unknown upstream \"nope\""),
        "{err}"
    );
    assert!(
        !dir.path().join("baton.pid").exists(),
        "an invalid config must not write a pid file"
    );
}

#[tokio::test]
async fn run_writes_the_pid_file_beside_the_config_and_removes_it_on_sigterm() {
    let be = echo_backend("").await;
    // The test's working folder is the crate, not the config's folder: a relative pid_file
    // must land beside the config.
    let mut b = Baton::start(&format!(
        "runtime:\n  pid_file: my.pid\nlisteners:\n  t: {{listen: 127.0.0.1:0, upstream: u}}\nupstreams:\n  u:\n    servers: [\"{be}\"]\n"
    ));
    let pid_file = b.dir().join("my.pid");
    let written = std::fs::read_to_string(&pid_file).expect("pid file beside the config");
    assert_eq!(written.trim(), b.pid().to_string());
    assert!(!std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("my.pid")
        .exists());

    b.signal(Signal::TERM);
    assert_eq!(b.wait_exit(WAIT), Some(0), "clean SIGTERM exit is 0");
    assert!(!pid_file.exists(), "pid file removed on a clean exit");
}

#[tokio::test]
async fn run_fails_clearly_when_the_address_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!("listeners:\n  t: {{listen: \"{addr}\", upstream: u}}\nupstreams:\n  u:\n    servers: [127.0.0.1:1]\n"),
    )
    .unwrap();
    let (code, _, err) = baton(&["run", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("listener t: cannot bind {addr}")),
        "{err}"
    );
    // The OS error once, not once per level of the error chain.
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    assert!(!dir.path().join("baton.pid").exists());
}

#[tokio::test]
async fn a_second_run_on_the_same_config_says_which_pid_is_running() {
    let be = echo_backend("").await;
    // SO_REUSEPORT: the second process could bind the same port; only the control socket
    // tells it that baton already runs there.
    let b = Baton::start(&format!(
        "listeners:\n  t: {{listen: 127.0.0.1:0, upstream: u, reuse_port: true}}\nupstreams:\n  u:\n    servers: [\"{be}\"]\n"
    ));
    let (code, _, err) = baton(&["run", "-c", b.config.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("already running as pid {}", b.pid())),
        "{err}"
    );
    // The first one still owns its control socket and answers.
    let (ok, out) = cli(&b.config, "status", &[]);
    assert!(ok && out.contains(&format!("pid {}", b.pid())), "{out}");
}

#[test]
fn a_log_file_that_cannot_be_opened_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    let log = dir.path().join("missing").join("baton.log");
    std::fs::write(
        &cfg,
        format!("log:\n  file: {}\nlisteners:\n  t: {{listen: 127.0.0.1:0, upstream: u}}\nupstreams:\n  u:\n    servers: [127.0.0.1:1]\n", log.display()),
    )
    .unwrap();
    let (code, _, err) = baton(&["run", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot open the log file: {}: ", log.display())),
        "{err}"
    );
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}
