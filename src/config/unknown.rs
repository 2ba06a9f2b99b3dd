//! Unknown keys, all of them in one run.
//!
//! serde's `deny_unknown_fields` stops at the first unknown key, so a typo hid every other
//! error of the file. Instead the raw model ignores unknown keys and `serde_ignored` reports
//! the path of each one; this module finds where each sits in the text (a second, generic read
//! of the YAML that keeps every key's position) and which keys were expected there (the field
//! list serde derives for the struct at that path).

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;
use std::fmt;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// The key path serde_ignored reports, as steps from the root; `None` for the internal
/// fields of `Spanned` wrappers, which are no key of the file.
pub(super) fn segments(p: &serde_ignored::Path) -> Option<Vec<Seg>> {
    use serde_ignored::Path;
    let mut out = Vec::new();
    let mut cur = p;
    loop {
        cur = match cur {
            Path::Root => break,
            Path::Seq { parent, index } => {
                out.push(Seg::Index(*index));
                parent
            }
            Path::Map { parent, key } => {
                if key.starts_with("__serde_saphyr") {
                    return None;
                }
                out.push(Seg::Key(key.clone()));
                parent
            }
            Path::Some { parent }
            | Path::NewtypeStruct { parent }
            | Path::NewtypeVariant { parent } => parent,
        };
    }
    out.reverse();
    Some(out)
}

/// The YAML as a tree that keeps the position of every key.
#[derive(Debug)]
pub(super) enum Node {
    Map(Vec<(Spanned<String>, Node)>),
    Seq(Vec<Node>),
    Scalar,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Node, A::Error> {
                let mut v = Vec::new();
                // A key that is not a string (a number, a list) cannot be a known key.
                while let Some(k) = m.next_key::<Spanned<KeyText>>()? {
                    let node = m.next_value::<Node>()?;
                    v.push((
                        Spanned {
                            value: k.value.0,
                            referenced: k.referenced,
                            defined: k.defined,
                        },
                        node,
                    ));
                }
                Ok(Node::Map(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Node, A::Error> {
                let mut v = Vec::new();
                while let Some(n) = s.next_element::<Node>()? {
                    v.push(n);
                }
                Ok(Node::Seq(v))
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Scalar)
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping key as text, whatever its YAML type (`80: x` has the key "80").
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<KeyText, E> {
                Ok(KeyText("~".into()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Where the key at `path` is: (line, column), and the operator's spelling of the path
/// (`listeners.db.max_conections`, `upstreams.pg.servers[1].wieght`). Steps that are no key
/// of the file (the `value` field of a `Spanned` wrapper) are skipped.
pub(super) fn locate(root: &Node, path: &[Seg]) -> Option<(u64, u64, String)> {
    let mut node = root;
    let mut shown = String::new();
    let mut at = None;
    for seg in path {
        match (seg, node) {
            (Seg::Index(i), Node::Seq(items)) => {
                node = items.get(*i)?;
                shown.push_str(&format!("[{i}]"));
            }
            (Seg::Key(k), Node::Map(entries)) => {
                match entries.iter().find(|(n, _)| &n.value == k) {
                    Some((name, child)) => {
                        if !shown.is_empty() {
                            shown.push('.');
                        }
                        shown.push_str(k);
                        at = Some((name.referenced.line(), name.referenced.column()));
                        node = child;
                    }
                    None if k == "value" => {}
                    None => return None,
                }
            }
            (Seg::Key(k), _) if k == "value" => {}
            _ => return None,
        }
    }
    let (line, col) = at?;
    Some((line, col, shown))
}

/// The field names serde derives for `T` (a struct), read by asking `T` to deserialize from a
/// deserializer that only records what it is asked for.
pub(super) fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The keys expected where `path`'s last key sits, for the message; empty if unknown.
pub(super) fn expected_at(path: &[Seg]) -> &'static [&'static str] {
    use super::file;
    // Only the keys the operator typed, without indices and Spanned `value` steps; the names
    // the operator chose (listener and upstream names) become `*`.
    let mut shape: Vec<&str> = Vec::new();
    for seg in &path[..path.len().saturating_sub(1)] {
        let Seg::Key(k) = seg else { continue };
        let named = matches!(shape.last(), Some(&"listeners" | &"upstreams")) && shape.len() == 1;
        if named {
            shape.push("*");
        } else if k != "value" {
            shape.push(k);
        }
    }
    match shape.as_slice() {
        [] => fields_of::<file::File>(),
        ["runtime"] => fields_of::<file::Runtime>(),
        ["runtime", "worker_limits"] => fields_of::<file::WorkerLimits>(),
        ["admin"] => fields_of::<file::Admin>(),
        ["log"] => fields_of::<file::Log>(),
        ["listeners", "*"] => fields_of::<file::Listener>(),
        ["listeners", "*", "routes"] => fields_of::<file::Route>(),
        ["listeners", "*", "http"] => fields_of::<file::ListenerHttp>(),
        ["listeners", "*", "http", "connect"] => fields_of::<file::ConnectRaw>(),
        ["listeners", "*", "tls"] => fields_of::<file::ListenerTls>(),
        ["listeners", "*", "tls", "certificates"] => fields_of::<file::CertEntry>(),
        ["upstreams", "*"] => fields_of::<file::Upstream>(),
        ["upstreams", "*", "servers"] => fields_of::<file::ServerLong>(),
        ["upstreams", "*", "health_check"] => fields_of::<file::HealthCheck>(),
        ["upstreams", "*", "http"] => fields_of::<file::UpstreamHttp>(),
        ["upstreams", "*", "tls"] => fields_of::<file::UpstreamTls>(),
        ["upstreams", "*", "tls", "client_certificate"] => fields_of::<file::CertEntry>(),
        _ => &[],
    }
}

/// Reads `text` as a generic tree (for key positions); `None` if it is not valid YAML (the
/// typed read then reports why).
pub(super) fn tree(text: &str) -> Option<Node> {
    serde_saphyr::from_str::<Node>(text).ok()
}
