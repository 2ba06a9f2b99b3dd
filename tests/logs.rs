//! What the logs look like to an operator: RFC 3339 times with milliseconds (text and JSON),
//! one line per HTTP request, no empty fields, and the access log in its own file and format;
//! `log.file` and `log.access_file` are reopened on SIGUSR1, so after logrotate-style renaming
//! new lines go to new files at the configured paths and none to the renamed ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;
mod http_support;
use common::{bin, cli, echo_backend, greeting, pump, wait_until, Baton, LogLines};
use http_support::{backend, exchange, get, h1, WAIT};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

/// Whether `s` starts with `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn is_rfc3339_ms(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() >= 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

fn spawn(config: &Path, rust_log: &str) -> Child {
    Command::new(bin())
        .args(["run", "-c"])
        .arg(config)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn write_config(yaml: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    (dir, config)
}

fn two_listeners(http: std::net::SocketAddr, tcp: std::net::SocketAddr, log: &str) -> String {
    format!(
        "log:\n{log}listeners:\n  web:\n    listen: 127.0.0.1:0\n    protocol: http\n    upstream: app\n\
         \x20 t:\n    listen: 127.0.0.1:0\n    upstream: echo\n\
         upstreams:\n  app:\n    servers: [\"{http}\"]\n  echo:\n    servers: [\"{tcp}\"]\n"
    )
}

/// Waits until the process behind `config` has no live connection (so every close line of
/// the connections so far has been written).
async fn wait_no_connections(config: &Path) {
    let ok = wait_until(WAIT, || {
        let (ok, out) = cli(config, "status", &["--json"]);
        ok && serde_json::from_str::<serde_json::Value>(&out)
            .map(|v| v["connections"]["total"] == 0)
            .unwrap_or(false)
    })
    .await;
    assert!(ok, "connections did not close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_have_rfc3339_times_one_line_per_request_and_no_empty_fields() {
    let (app, _) = backend("app").await;
    let echo = echo_backend("E").await;
    let (dir, config) = write_config(&two_listeners(app, echo, "  level: info\n"));
    let b = Baton::adopt(spawn(&config, "info"), dir, config);
    let mut send = h1(b.addr("web")).await;
    for _ in 0..3 {
        let (status, _, _) = exchange(&mut send, get("demo", "/x")).await;
        assert_eq!(status, 200);
    }
    drop(send);
    wait_no_connections(&b.config).await;
    // A tunnel's close line, written after the HTTP connection's close (which happened before
    // the registry emptied): once it is in, any HTTP close line would be too.
    drop(greeting(b.addr("t"), 1).await.0);
    assert!(b
        .log
        .wait_for(&["connection closed", "kind=Tcp"], WAIT)
        .is_some());

    let lines = b.log.all();
    for l in &lines {
        assert!(is_rfc3339_ms(l), "not an RFC 3339 time: {l}");
        for token in l.split(' ') {
            assert!(!token.ends_with('='), "empty field {token:?} in: {l}");
            assert_ne!(token.split_once('=').map(|x| x.1), Some("-"), "{l}");
        }
    }
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l.contains(" baton::access: "))
        .collect();
    assert_eq!(access.len(), 3, "one access line per request: {access:?}");
    assert!(access[0].contains("method=GET") && access[0].contains("status=200"));
    let http_closes = lines
        .iter()
        .filter(|l| l.contains("connection closed") && l.contains("kind=Http"))
        .count();
    assert_eq!(http_closes, 0, "an HTTP connection's close line at info");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_have_an_rfc3339_ts_and_no_empty_values() {
    let (app, _) = backend("app").await;
    let echo = echo_backend("E").await;
    let (dir, config) = write_config(&two_listeners(app, echo, "  format: json\n"));
    let mut child = spawn(&config, "info");
    let log = Arc::new(LogLines::default());
    pump(child.stderr.take().unwrap(), log.clone(), "baton");
    // Ended on drop, also when an assertion fails (not Baton::adopt: it reads text lines).
    let b = Baton {
        child,
        dir,
        config,
        log: log.clone(),
    };
    let listening = log
        .wait_for(&["\"listening\"", "\"listener\":\"web\""], WAIT)
        .expect("listening line");
    let v: serde_json::Value = serde_json::from_str(&listening).unwrap();
    let addr = v["addr"].as_str().unwrap().parse().unwrap();
    let mut send = h1(addr).await;
    let (status, _, _) = exchange(&mut send, get("demo", "/j")).await;
    assert_eq!(status, 200);
    let line = log
        .wait_for(&["\"target\":\"baton::access\""], WAIT)
        .expect("access line");
    drop(b);

    let access: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(access["path"], "/j");
    assert_eq!(access["status"], 200);
    for l in log.all() {
        let v: serde_json::Value = serde_json::from_str(&l).expect("a JSON line");
        assert!(is_rfc3339_ms(v["ts"].as_str().unwrap()), "{l}");
        for (k, val) in v.as_object().unwrap() {
            assert!(val != "" && val != "-", "empty field {k} in {l}");
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_file_has_its_own_format_and_is_reopened_on_sigusr1() {
    let (app, _) = backend("app").await;
    let echo = echo_backend("E").await;
    let (dir, config) = write_config(&two_listeners(
        app,
        echo,
        "  file: baton.log\n  access_file: access.log\n",
    ));
    let main_log = dir.path().join("baton.log");
    let access_log = dir.path().join("access.log");
    let child = Command::new(bin())
        .args(["run", "-c"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Ended on drop, also when an assertion fails.
    let mut b = Baton {
        child,
        dir,
        config,
        log: Default::default(),
    };
    assert!(wait_until(WAIT, || read(&main_log).contains("to=Ready")).await);
    let addr: std::net::SocketAddr = read(&main_log)
        .lines()
        .find(|l| l.contains("listening") && l.contains("listener=web "))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|a| a.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    let mut send = h1(addr).await;
    let (status, _, _) = exchange(&mut send, get("demo", "/first")).await;
    assert_eq!(status, 200);
    assert!(wait_until(WAIT, || read(&access_log).contains("/first")).await);
    let first = read(&access_log);
    let line = first.lines().next().unwrap();
    // 127.0.0.1 - - [TIME] "GET /first" 200 BYTES "-" "-" host=demo ...
    let (head, rest) = line.split_once(" [").unwrap();
    assert_eq!(head, "127.0.0.1 - -", "{line}");
    assert!(is_rfc3339_ms(rest), "{line}");
    let rest = rest.split_once("] ").unwrap().1;
    assert!(rest.starts_with("\"GET /first\" 200 "), "{line}");
    assert!(
        rest.contains("\"-\" \"-\" ") && rest.contains(" host=demo"),
        "{line}"
    );
    assert!(rest.contains(&format!(" server={app}")), "{line}");
    assert!(
        !read(&main_log).contains("baton::access"),
        "access lines go only to the access file"
    );

    // logrotate: rename both, SIGUSR1, and new lines go to new files at the same paths.
    std::fs::rename(&access_log, b.dir().join("access.log.1")).unwrap();
    std::fs::rename(&main_log, b.dir().join("baton.log.1")).unwrap();
    let pid = rustix::process::Pid::from_raw(b.pid()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::USR1).unwrap();
    assert!(wait_until(WAIT, || read(&main_log).contains("log file reopened")).await);
    let (status, _, _) = exchange(&mut send, get("demo", "/second")).await;
    assert_eq!(status, 200);
    assert!(wait_until(WAIT, || read(&access_log).contains("/second")).await);
    let old = read(&b.dir().join("access.log.1"));
    assert!(old.contains("/first") && !old.contains("/second"), "{old}");
    assert!(!read(&access_log).contains("/first"));
    let old_main = read(&b.dir().join("baton.log.1"));
    assert!(
        old_main.contains("to=Ready") && !old_main.contains("log file reopened"),
        "{old_main}"
    );
    // The process is still alive and serving after the signal.
    assert!(b.child.try_wait().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_file_in_json() {
    let (app, _) = backend("app").await;
    let echo = echo_backend("E").await;
    let (dir, config) = write_config(&two_listeners(
        app,
        echo,
        "  access_file: access.log\n  access_format: json\n",
    ));
    let access_log = dir.path().join("access.log");
    let b = Baton::adopt(spawn(&config, "info"), dir, config);
    let mut send = h1(b.addr("web")).await;
    let (status, _, _) = exchange(&mut send, get("demo", "/j")).await;
    assert_eq!(status, 200);
    assert!(wait_until(WAIT, || read(&access_log).contains("/j")).await);
    let text = read(&access_log);
    let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(is_rfc3339_ms(v["ts"].as_str().unwrap()), "{v}");
    assert_eq!(v["pid"], b.pid());
    assert_eq!(v["method"], "GET");
    assert_eq!(v["status"], 200);
    assert_eq!(v["server"], app.to_string());
    assert_eq!(b.log.count("baton::access"), 0, "not in the main log too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_in_the_supervisor_too_and_never_ends_it() {
    let echo = echo_backend("E").await;
    let b = Baton::start(&format!(
        "runtime:\n  workers: 2\nlisteners:\n  t:\n    listen: 127.0.0.1:0\n    upstream: u\n\
         upstreams:\n  u:\n    servers: [\"{echo}\"]\n"
    ));
    b.signal(rustix::process::Signal::USR1);
    let line = b
        .log
        .wait_for(&["log file reopened", &format!("pid={} ", b.pid())], WAIT);
    assert!(line.is_some(), "the supervisor did not reopen its log");
    assert!(common::alive(b.pid()), "SIGUSR1 ended the supervisor");
    let (ok, out) = cli(&b.config, "status", &[]);
    assert!(ok, "{out}");
}
