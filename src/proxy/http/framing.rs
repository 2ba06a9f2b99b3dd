//! Message body framing (RFC 9112 §6–7) as plain data: how much of a body is still to come and,
//! for chunked bodies, where the decoder stands. A body is passed through byte for byte; this
//! only says where it ends (and, when a client cannot take chunked, which bytes are data).
//!
//! Every state is a small `Copy` value that can stop at any byte and be sent to the successor.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

/// Longest chunk-size line accepted (size, extensions and the CRLF).
pub const MAX_CHUNK_LINE: u32 = 4096;
/// Largest trailer section accepted.
pub const MAX_TRAILERS: u32 = 16 * 1024;

/// How a message body is delimited, and how much of it is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// No body, or the body has ended.
    Done,
    /// `Content-Length`: this many bytes are still to come.
    Length(u64),
    /// `Transfer-Encoding: chunked`, with the decoder's position.
    Chunked(Chunked),
    /// Delimited by the end of the connection (responses only).
    UntilClose,
}

/// Why a body's framing is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A chunk size that is not hexadecimal or does not fit 64 bits.
    #[error("invalid chunk size")]
    ChunkSize,
    /// A chunk-size line (with its extensions) longer than [`MAX_CHUNK_LINE`].
    #[error("chunk extension too long")]
    ChunkLine,
    /// A byte that cannot appear where it was (bare LF, control character, missing CRLF).
    #[error("invalid chunk framing")]
    Syntax,
    /// A trailer section longer than [`MAX_TRAILERS`].
    #[error("trailer section too large")]
    Trailers,
    /// A trailer field that frames or routes the message (`Content-Length`,
    /// `Transfer-Encoding`, `Host`: RFC 9110 §6.5.1), which a next hop that merges trailers
    /// into the header section would act on.
    #[error("forbidden trailer field")]
    TrailerField,
}

/// Where a chunked decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkStep {
    /// Reading the hex digits of a chunk size (none yet when `line` is 0).
    #[default]
    Size,
    /// In the chunk extensions, up to the CR.
    Ext,
    /// After the CR of a size line: the LF must follow.
    SizeLf,
    /// In a chunk's data.
    Data,
    /// After a chunk's data: CR must follow.
    DataCr,
    /// After a chunk's data and CR: LF must follow.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line: its name while `line` is not 0 (then `size` is a hash of the
    /// name so far), its value once `line` is 0.
    Trailer,
    /// After a trailer line's CR.
    TrailerLf,
    /// After the CR of the final empty line.
    EndLf,
}

/// A chunked decoder's state: the step, the current chunk's size or what is left of it, and
/// the length of the line or trailer section being read (for the limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Chunked {
    /// Where the decoder stands.
    pub step: ChunkStep,
    /// The size being read ([`ChunkStep::Size`]) or the data left ([`ChunkStep::Data`]).
    pub size: u64,
    /// Bytes of the current size line so far.
    pub line: u32,
    /// Bytes of the trailer section so far.
    pub trailers: u32,
    /// The chunk being read is the last one (size 0): trailers follow.
    pub last: bool,
}

/// What [`Framing::advance`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advance {
    /// Bytes of the input that belong to this body (the rest belongs to the next message).
    pub used: usize,
    /// The body ended within them.
    pub done: bool,
}

impl Framing {
    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        matches!(self, Framing::Done)
    }

    /// Takes the body's bytes from the front of `input`; with `data`, appends only the chunk
    /// data to it (decoding chunked for a client that cannot take it). Stops where the body
    /// ends: what follows is the next message.
    pub fn advance(
        &mut self,
        input: &[u8],
        data: Option<&mut BytesMut>,
    ) -> Result<Advance, FramingError> {
        self.advance_with(input, data, None)
    }

    /// [`Framing::advance`] that also appends a chunked body's trailer section (its header
    /// lines and the final empty line) to `trailers`, for a next hop that carries trailers
    /// apart from the data (HTTP/2).
    pub fn advance_with(
        &mut self,
        input: &[u8],
        data: Option<&mut BytesMut>,
        trailers: Option<&mut BytesMut>,
    ) -> Result<Advance, FramingError> {
        match self {
            Framing::Done => Ok(Advance {
                used: 0,
                done: true,
            }),
            Framing::Length(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                *left -= n as u64;
                if let Some(d) = data {
                    d.extend_from_slice(&input[..n]);
                }
                let done = *left == 0;
                if done {
                    *self = Framing::Done;
                }
                Ok(Advance { used: n, done })
            }
            Framing::UntilClose => {
                if let Some(d) = data {
                    d.extend_from_slice(input);
                }
                Ok(Advance {
                    used: input.len(),
                    done: false,
                })
            }
            Framing::Chunked(c) => {
                let r = c.advance(input, data, trailers)?;
                if r.done {
                    *self = Framing::Done;
                }
                Ok(r)
            }
        }
    }
}

impl Chunked {
    /// See [`Framing::advance_with`].
    pub fn advance(
        &mut self,
        input: &[u8],
        mut data: Option<&mut BytesMut>,
        mut trailers: Option<&mut BytesMut>,
    ) -> Result<Advance, FramingError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            if let (Some(t), true) = (trailers.as_deref_mut(), self.last) {
                t.put_u8(b);
            }
            match self.step {
                ChunkStep::Data => {
                    let n = (self.size).min((input.len() - i) as u64) as usize;
                    if let Some(d) = data.as_deref_mut() {
                        d.extend_from_slice(&input[i..i + n]);
                    }
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.step = ChunkStep::DataCr;
                    }
                    continue;
                }
                ChunkStep::Size => {
                    self.line += 1;
                    if let Some(v) = hex(b) {
                        if self.size >> 60 != 0 {
                            return Err(FramingError::ChunkSize);
                        }
                        self.size = self.size << 4 | u64::from(v);
                    } else if self.line == 1 {
                        return Err(FramingError::ChunkSize);
                    } else if b == b'\r' {
                        self.step = ChunkStep::SizeLf;
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.step = ChunkStep::Ext;
                    } else {
                        return Err(FramingError::ChunkSize);
                    }
                }
                ChunkStep::Ext => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(FramingError::ChunkLine);
                    }
                    if b == b'\r' {
                        self.step = ChunkStep::SizeLf;
                    } else if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err(FramingError::Syntax);
                    }
                }
                ChunkStep::SizeLf => {
                    if b != b'\n' {
                        return Err(FramingError::Syntax);
                    }
                    self.line = 0;
                    if self.size == 0 {
                        self.last = true;
                        self.step = ChunkStep::TrailerStart;
                    } else {
                        self.step = ChunkStep::Data;
                    }
                }
                ChunkStep::DataCr => {
                    if b != b'\r' {
                        return Err(FramingError::Syntax);
                    }
                    self.step = ChunkStep::DataLf;
                }
                ChunkStep::DataLf => {
                    if b != b'\n' {
                        return Err(FramingError::Syntax);
                    }
                    self.step = ChunkStep::Size;
                    self.size = 0;
                }
                ChunkStep::TrailerStart | ChunkStep::Trailer => {
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return Err(FramingError::Trailers);
                    }
                    if self.step == ChunkStep::TrailerStart {
                        // A field name (token) or the final empty line; anything else (obs-fold,
                        // a line without a name) is refused as in heads.
                        if b == b'\r' {
                            self.step = ChunkStep::EndLf;
                        } else if is_tchar(b) {
                            self.step = ChunkStep::Trailer;
                            self.line = 1;
                            self.size = name_hash(NAME_HASH_SEED, b);
                        } else {
                            return Err(FramingError::Syntax);
                        }
                    } else if self.line != 0 {
                        // In the name: tokens up to the colon (no space before it).
                        if b == b':' {
                            if FORBIDDEN_TRAILERS.contains(&self.size) {
                                return Err(FramingError::TrailerField);
                            }
                            self.line = 0;
                        } else if is_tchar(b) {
                            self.size = name_hash(self.size, b);
                        } else {
                            return Err(FramingError::Syntax);
                        }
                    } else if b == b'\r' {
                        self.step = ChunkStep::TrailerLf;
                    } else if b == b'\n' || (b < 0x20 && b != b'\t') || b == 0x7f {
                        return Err(FramingError::Syntax);
                    }
                }
                ChunkStep::TrailerLf => {
                    if b != b'\n' {
                        return Err(FramingError::Syntax);
                    }
                    self.step = ChunkStep::TrailerStart;
                    self.size = 0;
                }
                ChunkStep::EndLf => {
                    if b != b'\n' {
                        return Err(FramingError::Syntax);
                    }
                    return Ok(Advance {
                        used: i + 1,
                        done: true,
                    });
                }
            }
            i += 1;
        }
        Ok(Advance {
            used: input.len(),
            done: false,
        })
    }
}

/// A token character (RFC 9110 §5.6.2), as in a field name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

const NAME_HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over the lower-cased name, one byte at a time: a trailer's name is checked against
/// [`FORBIDDEN_TRAILERS`] without keeping it (the decoder's state stays `Copy` and small).
const fn name_hash(h: u64, b: u8) -> u64 {
    (h ^ b.to_ascii_lowercase() as u64).wrapping_mul(0x0100_0000_01b3)
}

const fn hash_name(name: &[u8]) -> u64 {
    let mut h = NAME_HASH_SEED;
    let mut i = 0;
    while i < name.len() {
        h = name_hash(h, name[i]);
        i += 1;
    }
    h
}

/// Trailer fields refused (RFC 9110 §6.5.1: framing and routing fields must not be trailers).
const FORBIDDEN_TRAILERS: [u64; 3] = [
    hash_name(b"content-length"),
    hash_name(b"transfer-encoding"),
    hash_name(b"host"),
];

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends `data` as one chunk (nothing for empty data: an empty chunk would end the body).
pub fn encode_chunk(out: &mut BytesMut, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let mut size = [0u8; 16];
    let mut n = data.len();
    let mut i = size.len();
    loop {
        i -= 1;
        size[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.reserve(data.len() + 20);
    out.put_slice(&size[i..]);
    out.put_slice(b"\r\n");
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// The last chunk and an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn run(body: &[u8], step: usize) -> Result<(usize, Vec<u8>), FramingError> {
        let mut f = Framing::Chunked(Chunked::default());
        let mut data = BytesMut::new();
        let mut pos = 0;
        while pos < body.len() {
            let end = (pos + step).min(body.len());
            let r = f.advance(&body[pos..end], Some(&mut data))?;
            pos += r.used;
            if r.done {
                return Ok((pos, data.to_vec()));
            }
        }
        Ok((usize::MAX, data.to_vec()))
    }

    #[test]
    fn chunked_at_every_split() {
        let body =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (used, data) = run(body, step).unwrap();
            assert_eq!(used, body.len() - 4, "step {step}");
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz");
        }
    }

    #[test]
    fn chunked_rejects() {
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"\r\n",
            b"11111111111111111\r\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\n folded\r\n\r\n",
            b"5;a\0\r\n",
        ] {
            assert!(run(bad, 1).is_err(), "{:?}", String::from_utf8_lossy(bad));
            assert!(run(bad, bad.len()).is_err());
        }
        let long = [b"1;".as_slice(), &[b'a'; 5000]].concat();
        assert_eq!(run(&long, 100), Err(FramingError::ChunkLine));
        let trailers = [b"0\r\n".as_slice(), &b"X-A: b\r\n".repeat(3000)].concat();
        assert_eq!(run(&trailers, 100), Err(FramingError::Trailers));
    }

    #[test]
    fn trailer_lines_are_field_lines() {
        for bad in [
            &b"0\r\nX Y: z\r\n\r\n"[..],
            b"0\r\nX : z\r\n\r\n",
            b"0\r\nno colon\r\n\r\n",
            b"0\r\nNoColon\r\n\r\n",
            b"0\r\n: v\r\n\r\n",
            b"0\r\nX\xffY: z\r\n\r\n",
            b"0\r\nGET /x HTTP/1.1\r\n\r\n",
        ] {
            for step in [1, bad.len()] {
                assert_eq!(
                    run(bad, step),
                    Err(FramingError::Syntax),
                    "{:?}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        for bad in [
            &b"0\r\nContent-Length: 5\r\n\r\n"[..],
            b"0\r\nX-A: 1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"0\r\nhOsT:a\r\n\r\n",
        ] {
            for step in [1, 3, bad.len()] {
                assert_eq!(
                    run(bad, step),
                    Err(FramingError::TrailerField),
                    "{:?}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        // The decoder's state crosses an upgrade as JSON at any byte, a trailer name's
        // hash included: a forbidden name split there is still refused.
        let body = b"5\r\nhello\r\n0\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n";
        let colon = body.len() - b": 5\r\n\r\n".len();
        for at in 0..=colon {
            let mut f = Framing::Chunked(Chunked::default());
            let r = f.advance(&body[..at], None).unwrap();
            assert_eq!(r.used, at);
            let mut f: Framing = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
            assert_eq!(
                f.advance(&body[at..], None),
                Err(FramingError::TrailerField),
                "{at}"
            );
        }
        for good in [
            &b"0\r\nX-T:v\r\n\r\n"[..],
            b"0\r\nContent-Length-X: 1\r\nHosts: a: b\r\n\r\n",
            b"0\r\nX-A: \"a b\"\t\r\nServer-Timing: db;dur=53\r\n\r\n",
        ] {
            for step in 1..good.len() {
                assert_eq!(run(good, step).map(|r| r.0), Ok(good.len()), "{step}");
            }
        }
    }

    #[test]
    fn length_and_until_close() {
        let mut f = Framing::Length(5);
        assert_eq!(
            f.advance(b"abc", None).unwrap(),
            Advance {
                used: 3,
                done: false
            }
        );
        assert_eq!(
            f.advance(b"defgh", None).unwrap(),
            Advance {
                used: 2,
                done: true
            }
        );
        assert!(f.is_done());
        let mut f = Framing::UntilClose;
        assert_eq!(f.advance(b"abc", None).unwrap().used, 3);
    }

    #[test]
    fn encoded_chunks_decode() {
        let mut out = BytesMut::new();
        encode_chunk(&mut out, &[7u8; 300]);
        encode_chunk(&mut out, b"");
        out.extend_from_slice(LAST_CHUNK);
        let (used, data) = run(&out, 7).unwrap();
        assert_eq!(used, out.len());
        assert_eq!(data, vec![7u8; 300]);
    }
}
