//! The error collector every validation step reports through, and the parsers of single
//! values it uses (durations, sizes, addresses, log filters).

use super::file::S;
use super::runtime::parse_size;
use super::*;

/// Collects errors while the typed config is built, so `baton check` can list them all.
pub(super) struct Errors<'a> {
    pub(super) file: &'a Path,
    /// (line, column, message), sorted by position at the end.
    pub(super) list: Vec<(u64, u64, String)>,
}

impl Errors<'_> {
    pub(super) fn at<T>(&mut self, span: &S<T>, path: &str, msg: impl fmt::Display) {
        let loc = span.referenced;
        self.list.push((
            loc.line(),
            loc.column(),
            format!(
                "{}:{}:{}: {path}: {msg}",
                self.file.display(),
                loc.line(),
                loc.column()
            ),
        ));
    }

    pub(super) fn duration(
        &mut self,
        v: &Option<S<String>>,
        path: &str,
        default: Duration,
    ) -> Duration {
        match v {
            None => default,
            Some(s) => parse_duration(&s.value).unwrap_or_else(|e| {
                self.at(s, path, e);
                default
            }),
        }
    }

    /// A duration that must be above zero: at zero `run` would spin, panic (a zero interval),
    /// or fail every attempt (a zero timeout). `why` says what zero would do.
    pub(super) fn nonzero_duration(
        &mut self,
        v: &Option<S<String>>,
        path: &str,
        default: Duration,
        why: &str,
    ) -> Duration {
        let d = self.duration(v, path, default);
        if let (Some(s), true) = (v, d.is_zero()) {
            self.at(s, path, format!("must be above 0 ({why})"));
            return default;
        }
        d
    }

    /// A duration where `0` means "no limit".
    pub(super) fn opt_duration(
        &mut self,
        v: &Option<S<String>>,
        path: &str,
        default: Option<Duration>,
    ) -> Option<Duration> {
        match v {
            None => default,
            Some(_) => {
                let d = self.duration(v, path, Duration::ZERO);
                (!d.is_zero()).then_some(d)
            }
        }
    }

    /// A size (`65536`, `64KiB`, `1.5GiB`); `None` after reporting an error.
    pub(super) fn size(&mut self, v: &S<super::file::NumOrText>, path: &str) -> Option<u64> {
        match &v.value {
            super::file::NumOrText::Num(n) => Some(*n),
            super::file::NumOrText::Text(t) => parse_size(t).map_err(|e| self.at(v, path, e)).ok(),
        }
    }

    /// A size where `0` is allowed (it means "no limit").
    pub(super) fn size_or_zero(
        &mut self,
        v: &S<super::file::NumOrText>,
        path: &str,
    ) -> Option<u64> {
        match &v.value {
            super::file::NumOrText::Text(t) if t.trim() == "0" => Some(0),
            _ => self.size(v, path),
        }
    }

    pub(super) fn addr(&mut self, s: &S<String>, path: &str) -> Option<SocketAddr> {
        parse_addr(&s.value).map_err(|e| self.at(s, path, e)).ok()
    }

    pub(super) fn choice<T: Copy>(
        &mut self,
        v: &Option<S<String>>,
        path: &str,
        options: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(s) = v else { return default };
        match options.iter().find(|(name, _)| *name == s.value) {
            Some((_, t)) => *t,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.at(
                    s,
                    path,
                    format!(
                        "unknown value {:?} (expected one of: {})",
                        s.value,
                        names.join(", ")
                    ),
                );
                default
            }
        }
    }
}

/// Parses a duration such as `500ms`, `2s`, `1m`, `1h`, `1d`, or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("bad duration {s:?}: missing unit (ms, s, m, h, d)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("bad duration {s:?}: expected a number then a unit, like 500ms or 2s")
    })?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(format!(
                "bad duration {s:?}: unknown unit {unit:?} (ms, s, m, h, d)"
            ))
        }
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("bad duration {s:?}: too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The levels a log filter may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Smallest `max_header_bytes`: below it, ordinary browser requests are refused.
pub(super) const MIN_HEADER_BYTES: u64 = 1024;

/// Checks a `log.level` filter: `info`, or `warn,baton=debug` (comma-separated, each a level or
/// `target=level`). tracing's own parser takes a bare word such as `inof` as a target name at
/// level trace, which turns every other line off, errors included; here it is refused.
pub(super) fn check_log_filter(s: &str) -> Result<(), String> {
    let level_ok = |l: &str| LEVELS.contains(&l.trim().to_ascii_lowercase().as_str());
    let expect = "expected a level (trace, debug, info, warn, error, off) or target=level, comma-separated, like warn,baton=debug";
    if s.trim().is_empty() {
        return Err(format!("empty filter: {expect}"));
    }
    for d in s.split(',') {
        let d = d.trim();
        let ok = match d.rsplit_once('=') {
            // A span filter (`target[span{field=x}]=level`) is passed on as tracing reads it.
            _ if d.contains('[') => true,
            Some((target, level)) => !target.trim().is_empty() && level_ok(level),
            None => level_ok(d),
        };
        if !ok {
            return Err(format!("bad filter directive {d:?}: {expect}"));
        }
    }
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| ())
        .map_err(|e| format!("bad filter {s:?}: {e}"))
}

/// Parses `ip:port`; hostnames are refused (listeners and the admin endpoint bind, and binding
/// a name would make the address depend on DNS at start).
pub(super) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("bad address {s:?}: expected ip:port, like 127.0.0.1:8080"))
}
