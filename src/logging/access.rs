//! The access log (`log.access_file`): one line per HTTP request, from the events of target
//! [`TARGET`], in its own format: `combined`, like nginx's combined format
//!
//! ```text
//! 127.0.0.1 - - [2026-12-01T08:09:03.561Z] "GET /b HTTP/1.1" 200 13 "-" "-" host=demo listener=web server=127.0.0.1:9102 duration_ms=1 conn=5
//! ```
//!
//! (the time is RFC 3339 as in the main log; the event's other fields follow as `key=value`),
//! or `json`: one object per line with `ts`, `pid`, `generation` and every field typed.

use super::format::{write_pairs, Fields};
use crate::config::AccessFormat;
use std::fmt::Write as _;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The tracing target of access lines; the HTTP engine emits one event per request with it.
pub const TARGET: &str = "baton::access";

/// Fields placed in the combined line's fixed positions, so not repeated after it.
const POSITIONAL: [&str; 8] = [
    "client",
    "method",
    "path",
    "version",
    "status",
    "bytes",
    "referer",
    "user_agent",
];

/// Formats access events for the access file.
pub(super) struct AccessLine {
    pub format: AccessFormat,
    pub pid: u32,
    pub generation: u64,
}

/// `v` as text, `-` when absent (a number field renders as its digits).
fn text(f: &Fields, name: &str) -> String {
    match f.rest.iter().find(|(k, _)| *k == name).map(|(_, v)| v) {
        None => "-".into(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// The combined-like line for one request.
fn combined(f: &Fields) -> String {
    // The client's IP alone, as in nginx's `$remote_addr`.
    let client = f.str("client").unwrap_or("-");
    let ip = client
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| client.to_string());
    let mut request = format!("{} {}", text(f, "method"), text(f, "path"));
    if let Some(v) = f.str("version") {
        let _ = write!(request, " {v}");
    }
    let mut line = format!(
        "{ip} - - [{}] {} {} {} \"{}\" \"{}\"",
        super::time::now(),
        serde_json::Value::String(request),
        text(f, "status"),
        text(f, "bytes"),
        text(f, "referer").replace('"', "\\\""),
        text(f, "user_agent").replace('"', "\\\""),
    );
    // `complete=true` is every normal request: only the exception is worth a field.
    let usual = |k: &str, v: &serde_json::Value| k == "complete" && v.as_bool() == Some(true);
    let rest = f
        .rest
        .iter()
        .filter(|(k, v)| !POSITIONAL.contains(k) && !usual(k, v));
    write_pairs(&mut line, rest);
    line
}

impl<S, N> FormatEvent<S, N> for AccessLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        ev: &Event<'_>,
    ) -> std::fmt::Result {
        let f = Fields::of(ev);
        match self.format {
            AccessFormat::Combined => writeln!(w, "{}", combined(&f)),
            AccessFormat::Json => {
                let mut m = serde_json::Map::new();
                m.insert("ts".into(), super::time::now().into());
                m.insert("pid".into(), self.pid.into());
                m.insert("generation".into(), self.generation.into());
                for (k, v) in f.rest {
                    m.insert(k.into(), v);
                }
                writeln!(w, "{}", serde_json::Value::Object(m))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&'static str, serde_json::Value)]) -> Fields {
        Fields {
            message: "request".into(),
            rest: pairs.to_vec(),
        }
    }

    #[test]
    fn combined_line_has_the_fixed_positions_then_the_rest() {
        let f = fields(&[
            ("conn", 5.into()),
            ("listener", "web".into()),
            ("method", "GET".into()),
            ("host", "demo".into()),
            ("path", "/b".into()),
            ("status", 200.into()),
            ("bytes", 13.into()),
            ("complete", true.into()),
            ("client", "127.0.0.1:40000".into()),
        ]);
        let line = combined(&f);
        let (head, tail) = line.split_once(" [").unwrap();
        assert_eq!(head, "127.0.0.1 - -");
        let tail = tail.split_once("] ").unwrap().1;
        assert_eq!(
            tail,
            "\"GET /b\" 200 13 \"-\" \"-\" conn=5 listener=web host=demo"
        );
    }

    #[test]
    fn combined_line_keeps_an_incomplete_flag_and_quotes_odd_paths() {
        let f = fields(&[
            ("method", "GET".into()),
            ("path", "/a \"b\"".into()),
            ("status", 502.into()),
            ("bytes", 0.into()),
            ("complete", false.into()),
            ("client", "[::1]:1".into()),
        ]);
        let line = combined(&f);
        assert!(line.starts_with("::1 - - ["), "{line}");
        assert!(
            line.ends_with("\"GET /a \\\"b\\\"\" 502 0 \"-\" \"-\" complete=false"),
            "{line}"
        );
    }
}
