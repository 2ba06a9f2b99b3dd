//! The main log's line format: one line per event, text or JSON, each with an RFC 3339
//! timestamp, the level, `pid` and `generation` (and `worker` in multi-process mode), the
//! target, the message and the event's fields. Fields with an empty value are left out.

use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats every event of the main log as one line.
pub(super) struct LineFormat {
    pub json: bool,
    pub pid: u32,
    pub generation: u64,
    /// The worker index in multi-process mode.
    pub worker: Option<usize>,
}

/// An event's message and fields, in the order they were recorded.
#[derive(Default)]
pub(super) struct Fields {
    pub message: String,
    pub rest: Vec<(&'static str, serde_json::Value)>,
}

impl Fields {
    /// The fields of `ev`; string fields that are empty or `-` (the data path's "none") are
    /// dropped: an absent value is no field, not `trace_id=` or `server=-`.
    pub fn of(ev: &Event<'_>) -> Fields {
        let mut f = Fields::default();
        ev.record(&mut f);
        f.rest.retain(
            |(_, v)| !matches!(v, serde_json::Value::String(s) if s.is_empty() || s == "-"),
        );
        f
    }

    /// The string value of field `name`, if it has one.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.rest
            .iter()
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.as_str())
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        if f.name() == "message" {
            self.message = format!("{v:?}");
        } else {
            self.rest
                .push((f.name(), serde_json::Value::String(format!("{v:?}"))));
        }
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        if f.name() == "message" {
            self.message = v.to_string();
        } else {
            self.rest.push((f.name(), v.into()));
        }
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.rest.push((f.name(), v.into()));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.rest.push((f.name(), v.into()));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.rest.push((f.name(), v.into()));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.rest.push((f.name(), v.into()));
    }
}

/// Appends ` key=value` pairs: plain when the value has no space, quote or `=`, else as JSON.
pub(super) fn write_pairs<'a>(
    line: &mut String,
    pairs: impl IntoIterator<Item = &'a (&'static str, serde_json::Value)>,
) {
    for (k, v) in pairs {
        match v {
            serde_json::Value::String(s) if !s.contains([' ', '"', '=']) => {
                let _ = write!(line, " {k}={s}");
            }
            v => {
                let _ = write!(line, " {k}={v}");
            }
        }
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
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
        let meta = ev.metadata();
        if self.json {
            let mut m = serde_json::Map::new();
            m.insert("ts".into(), super::time::now().into());
            m.insert(
                "level".into(),
                meta.level().as_str().to_ascii_lowercase().into(),
            );
            m.insert("pid".into(), self.pid.into());
            m.insert("generation".into(), self.generation.into());
            if let Some(i) = self.worker {
                m.insert("worker".into(), i.into());
            }
            m.insert("target".into(), meta.target().into());
            m.insert("msg".into(), f.message.into());
            for (k, v) in f.rest {
                m.insert(k.into(), v);
            }
            writeln!(w, "{}", serde_json::Value::Object(m))
        } else {
            let mut line = format!("{} {:5}", super::time::now(), meta.level());
            if let Some(i) = self.worker {
                let _ = write!(line, " worker={i}");
            }
            let _ = write!(
                line,
                " pid={} gen={} {}: {}",
                self.pid,
                self.generation,
                meta.target(),
                f.message
            );
            write_pairs(&mut line, &f.rest);
            writeln!(w, "{line}")
        }
    }
}
