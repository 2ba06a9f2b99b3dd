//! Reading the YAML text into the raw file model, with errors an operator can act on:
//! `file:line:col: key.path: message`, the key path tracked by serde_path_to_error and the
//! YAML library's wording made plain.

use super::file;
use super::unknown;
use super::ConfigError;
use std::collections::HashMap;
use std::path::Path;

/// Problems found while reading, each as (line, column, message without the file name).
pub(super) type Found = Vec<(u64, u64, String)>;

/// Reads the YAML into the raw model, substituting `${VAR}` and `${VAR:-default}` from the
/// environment in values. Unknown keys do not stop the read: each is returned with its
/// position, so `baton check` lists them with every other error. A failure is reported as
/// `file:line:column: key.path: message`, the key path tracked by `serde_path_to_error` (the
/// YAML error alone says what is wrong and where, not under which key), together with the
/// unknown keys met before it.
pub(super) fn read_yaml(path: &Path, text: &str) -> Result<(file::File, Found), ConfigError> {
    let mut key_path = String::new();
    let mut ignored: Vec<Vec<unknown::Seg>> = Vec::new();
    let env: HashMap<String, String> = std::env::vars().collect();
    let options = serde_saphyr::Options::default().with_properties(env);
    let res = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        let mut note = |p: serde_ignored::Path| {
            if let Some(segs) = unknown::segments(&p) {
                ignored.push(segs);
            }
        };
        let de = serde_ignored::Deserializer::new(de, &mut note);
        serde_path_to_error::deserialize(de).map_err(|e| {
            key_path = key_path_of(e.path());
            e.into_inner()
        })
    });
    let mut found = unknown_keys(text, &ignored);
    match res {
        Ok(f) => Ok((f, found)),
        Err(e) => {
            let (line, col) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or_default();
            let loc = if line > 0 {
                format!("{line}:{col}:")
            } else {
                String::new()
            };
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
            found.push((line, col, format!("{loc}{key} {first}")));
            found.sort_by_key(|(l, c, _)| (*l, *c));
            Err(ConfigError(
                found
                    .into_iter()
                    .map(|(_, _, m)| format!("{}:{m}", path.display()))
                    .collect(),
            ))
        }
    }
}

/// The unknown keys serde skipped, located in the text, as `line:col: key.path: message`.
fn unknown_keys(text: &str, ignored: &[Vec<unknown::Seg>]) -> Found {
    if ignored.is_empty() {
        return Vec::new();
    }
    let tree = unknown::tree(text);
    let mut found = Vec::new();
    for segs in ignored {
        let Some(unknown::Seg::Key(key)) = segs.last() else {
            continue;
        };
        let (line, col, shown) = tree
            .as_ref()
            .and_then(|t| unknown::locate(t, segs))
            .unwrap_or((0, 0, key.clone()));
        let expected = unknown::expected_at(segs);
        let hint = if expected.is_empty() {
            String::new()
        } else {
            format!(", expected one of {}", expected.join(", "))
        };
        let loc = if line > 0 {
            format!("{line}:{col}:")
        } else {
            String::new()
        };
        found.push((
            line,
            col,
            format!("{loc} {shown}: unknown key `{key}`{hint}"),
        ));
    }
    found
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
        m if m.starts_with("missing property `") => {
            let name = m
                .trim_start_matches("missing property `")
                .trim_end_matches('`');
            format!(
                "environment variable {name} is not set (set it, or write ${{{name}:-default}})"
            )
        }
        m => m
            .replace("unknown field", "unknown key")
            .replace("missing field", "missing key"),
    };
    (key_path, msg)
}
