//! Every file in `tests/config/invalid/` fails `baton check` with exit code 2 and the message its
//! `# expect:` lines name (position and key path included); every file in `tests/config/valid/`
//! and the repository's `config.yaml` passes with exit code 0.
#![allow(clippy::unwrap_used)]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Runs `baton check -c path`; returns (exit code, stdout, stderr).
fn check(path: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(common::bin())
        .args(["check", "-c"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_invalid_config_fails_with_its_expected_message() {
    let files = yaml_files("tests/config/invalid");
    assert!(
        files.len() >= 20,
        "expected the whole set of invalid examples, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let expects: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(
            !expects.is_empty(),
            "{} has no `# expect:` line",
            f.display()
        );
        let (code, _, stderr) = check(f);
        if code != Some(2) {
            failures.push(format!(
                "{}: exit code {code:?}, want 2; stderr: {stderr}",
                f.display()
            ));
        }
        // Each error line starts with the file name as given, then line:col.
        for e in &expects {
            let want = format!("{}:{e}", f.display());
            if !stderr.contains(&want) {
                failures.push(format!(
                    "{}: stderr lacks {want:?}; got:\n{stderr}",
                    f.display()
                ));
            }
        }
        // One error per line: as many lines as expectations, so nothing extra or missing.
        let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
        if lines != expects.len() {
            failures.push(format!(
                "{}: {lines} error lines, want {}:\n{stderr}",
                f.display(),
                expects.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_valid_config_passes() {
    let mut files = yaml_files("tests/config/valid");
    assert!(files.len() >= 4);
    files.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml"));
    for f in &files {
        let (code, stdout, stderr) = check(f);
        assert_eq!(code, Some(0), "{} failed: {stderr}", f.display());
        assert!(stdout.contains("ok"), "{}: {stdout}", f.display());
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let (code, _, stderr) = check(&missing);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("nope.yaml: cannot read"), "{stderr}");
}

#[test]
fn errors_name_the_file_as_given() {
    // A relative path is echoed as given, so an editor can jump to it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.yaml"),
        "listeners:\n  db:\n    listen: 127.0.0.1:1\n    upstream: nope\n",
    )
    .unwrap();
    let out = Command::new(common::bin())
        .args(["check", "-c", "c.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("c.yaml:4:15: listeners.db.upstream: unknown upstream \"nope\""),
        "{stderr}"
    );
}

/// `check --dump` prints every default, substitutes environment variables, and its output is
/// itself a config that dumps to the same text.
#[test]
fn dump_prints_the_effective_config_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("c.yaml");
    std::fs::write(
        &src,
        "listeners:\n  web:\n    listen: ${BATON_TEST_ADDR}\n    protocol: http\n    upstream: app\n    http:\n      connect:\n        allow: [\"*.Internal:443\", \"db:*\"]\nupstreams:\n  app:\n    servers:\n      - ${BATON_TEST_SERVER:-127.0.0.1:9001}\nlog:\n  file: \"${NOT_SUBSTITUTED}.log\"\n",
    )
    .unwrap();
    let dump = |path: &Path| {
        let out = Command::new(common::bin())
            .args(["check", "--dump", "-c"])
            .arg(path)
            .env("BATON_TEST_ADDR", "127.0.0.1:18111")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = dump(&src);
    for want in [
        "listen: 127.0.0.1:18111",
        "addr: 127.0.0.1:9001",
        // A quoted value is taken literally.
        "${NOT_SUBSTITUTED}.log",
        "header_read_timeout: 10s",
        "connect_timeout: 2s",
        "eject_after: 3",
        "*.internal:443",
        "db:*",
        "connect_timeout: 10s",
        &format!(
            "control_socket: {}",
            dir.path().join("baton.sock").display()
        ),
    ] {
        assert!(first.contains(want), "dump lacks {want:?}:\n{first}");
    }
    let copy = dir.path().join("dumped.yaml");
    std::fs::write(&copy, &first).unwrap();
    let second = dump(&copy);
    let body = |s: &str| s.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(body(&first), body(&second));
}
