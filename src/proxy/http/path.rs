//! Request path normalization, so that routing and the upstream see the same path and a route
//! cannot be bypassed with `/public/../internal`, `/%69nternal` or `//internal`.
//!
//! Percent-encoded unreserved characters (RFC 3986 §2.3) are decoded, other escapes are kept
//! (with upper-case hex), duplicate slashes are merged and dot segments removed (§5.2.4). The
//! query is passed on untouched. An invalid escape is an error (400).

use std::borrow::Cow;

/// Why a path cannot be normalized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-encoding in path")]
    Escape,
    /// The path does not start with `/`.
    #[error("path must start with /")]
    Relative,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hexval(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|v| v as u8)
}

/// The normalized form of an origin-form target (`/path?query`): the target itself, borrowed,
/// when there is nothing to change (the usual request: no copy), else a new buffer.
pub fn normalize(target: &[u8]) -> Result<Cow<'_, [u8]>, PathError> {
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], Some(&target[i..])),
        None => (target, None),
    };
    if path.first() != Some(&b'/') {
        return Err(PathError::Relative);
    }
    // Fast path: nothing to decode, no dot segment, no double slash (a `/.` that starts an
    // ordinary name like `/.well-known` takes the slow path, which keeps it).
    let clean = !path
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'%' || (b == b'/' && matches!(path.get(i + 1), Some(b'/' | b'.'))));
    if clean {
        return Ok(Cow::Borrowed(target));
    }
    // Decode unreserved escapes first, so `%2e%2e` is a dot segment like `..`.
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%' {
            let (h, l) = match (path.get(i + 1), path.get(i + 2)) {
                (Some(&h), Some(&l)) => (hexval(h), hexval(l)),
                _ => (None, None),
            };
            let (Some(h), Some(l)) = (h, l) else {
                return Err(PathError::Escape);
            };
            let v = h << 4 | l;
            if unreserved(v) {
                decoded.push(v);
            } else {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                decoded.extend_from_slice(&[
                    b'%',
                    HEX[usize::from(v >> 4)],
                    HEX[usize::from(v & 15)],
                ]);
            }
            i += 3;
        } else {
            decoded.push(b);
            i += 1;
        }
    }
    // Segments after the leading slash; empty ones (double slashes) are merged away, except a
    // trailing one, which keeps the trailing slash.
    let mut out: Vec<&[u8]> = Vec::new();
    let segs: Vec<&[u8]> = decoded[1..].split(|&b| b == b'/').collect();
    let last = segs.len().saturating_sub(1);
    let mut trailing = false;
    for (n, seg) in segs.iter().enumerate() {
        trailing = false;
        match *seg {
            b"" => trailing = n == last,
            b"." => trailing = true,
            b".." => {
                out.pop();
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut result = Vec::with_capacity(decoded.len() + query.map_or(0, <[u8]>::len));
    result.push(b'/');
    result.extend_from_slice(&out.join(&b'/'));
    if trailing && !out.is_empty() {
        result.push(b'/');
    }
    if let Some(q) = query {
        result.extend_from_slice(q);
    }
    Ok(Cow::Owned(result))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        for (input, want) in [
            ("/", "/"),
            ("/a/b?x=/../y", "/a/b?x=/../y"),
            ("/public/../internal", "/internal"),
            ("/%69nternal", "/internal"),
            ("//internal", "/internal"),
            ("/a//b///c", "/a/b/c"),
            ("/a/./b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../../etc", "/etc"),
            ("/%2e%2E/x", "/x"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/..", "/"),
            ("/%7euser", "/~user"),
            ("/a/", "/a/"),
            ("/a/.", "/a/"),
            ("/..", "/"),
        ] {
            let got = normalize(input.as_bytes()).unwrap();
            assert_eq!(String::from_utf8_lossy(&got), want, "{input}");
        }
    }

    #[test]
    fn rejects() {
        assert_eq!(normalize(b"/%zz"), Err(PathError::Escape));
        assert_eq!(normalize(b"/%2"), Err(PathError::Escape));
        assert_eq!(normalize(b"a/b"), Err(PathError::Relative));
    }
}
