//! Reading the YAML text into the raw file model, with errors an operator can act on:
//! `file:line:col: key.path: message`, the key path tracked by serde_path_to_error and the
//! YAML library's wording made plain.

use super::file;
use super::ConfigError;
use std::path::Path;

/// Reads the YAML into the raw model. A failure is reported as
/// `file:line:column: key.path: message`, the key path tracked by `serde_path_to_error` (the
/// YAML error alone says what is wrong and where, not under which key).
pub(super) fn read_yaml(path: &Path, text: &str) -> Result<file::File, ConfigError> {
    let mut key_path = String::new();
    let res = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            key_path = key_path_of(e.path());
            e.into_inner()
        })
    });
    res.map_err(|e| {
        let loc = e
            .location()
            .map(|l| format!("{}:{}:", l.line(), l.column()))
            .unwrap_or_default();
        let msg = e.without_snippet().to_string();
        // The message repeats the position at its end; keep the first line only.
        let first = msg.lines().next().unwrap_or("invalid YAML");
        let first = first.split(" at line ").next().unwrap_or(first);
        let (key_path, first) = plain_message(key_path, first);
        let key = if key_path.is_empty() {
            String::new()
        } else {
            format!(" {key_path}:")
        };
        ConfigError(vec![format!("{}:{loc}{key} {first}", path.display())])
    })
}

/// The operator's key path (`listeners.db.upstream`, `upstreams.pg.servers[1]`) from serde's:
/// drops the `value` field of [`S`] wrappers and unknown (`?`) segments.
fn key_path_of(p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    let mut prev: Option<String> = None;
    for seg in p.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                // `value` is the field of a Spanned wrapper, unless it names a listener or an
                // upstream (the only maps whose keys the operator chooses).
                let named = matches!(prev.as_deref(), Some("listeners" | "upstreams"));
                if key != "value" || named {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(key);
                }
                prev = Some(key.clone());
                continue;
            }
            Segment::Enum { variant } => out.push_str(&format!(".{variant}")),
            Segment::Unknown => {}
        }
        prev = None;
    }
    out
}

/// Rewrites the YAML library's wording where it is unclear to an operator.
fn plain_message(mut key_path: String, msg: &str) -> (String, String) {
    if let Some(rest) = msg.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest);
        if !key_path.is_empty() {
            key_path.push('.');
        }
        key_path.push_str(key);
        return (
            key_path,
            "duplicate key (a key may appear only once in a mapping)".into(),
        );
    }
    let msg = match msg {
        "invalid u64" | "invalid u32" | "invalid usize" | "invalid u16" | "invalid u8" => {
            "expected a whole number (0 or more)".to_string()
        }
        "expected string scalar" => "expected a string".to_string(),
        "expected mapping start" => "expected a mapping (key: value entries)".to_string(),
        m => m
            .replace("unknown field", "unknown key")
            .replace("missing field", "missing key"),
    };
    (key_path, msg)
}
