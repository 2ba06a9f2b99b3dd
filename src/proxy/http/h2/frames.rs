//! The frame view of an HTTP/2 connection: where each frame starts and ends in the bytes going
//! each way, and which client streams are open, so the GOAWAY can go at a frame boundary with
//! the frame that ends the last one.

/// The client connection preface, before its first frame.
pub(super) const PREFACE_LEN: usize = 24;

pub(super) const HEADERS: u8 = 0x1;
pub(super) const RST_STREAM: u8 = 0x3;
pub(super) const DATA: u8 = 0x0;
pub(super) const PING: u8 = 0x6;
pub(super) const GOAWAY: u8 = 0x7;
pub(super) const END_STREAM: u8 = 0x1;
pub(super) const ACK: u8 = 0x1;

/// Follows frame boundaries in one direction of the byte stream.
#[derive(Debug, Default, Clone)]
pub(super) struct Parser {
    /// Bytes of the connection preface still to skip (client side only).
    pub(super) skip: usize,
    pub(super) head: [u8; 9],
    pub(super) have: usize,
    pub(super) payload_left: usize,
    /// Bytes fed so far.
    pub(super) pos: u64,
}

impl Parser {
    /// Feeds bytes; calls `frame(type, flags, stream, end)` at each complete frame header,
    /// `end` being the position (in bytes fed) where that frame ends.
    pub(super) fn feed(&mut self, mut bytes: &[u8], mut frame: impl FnMut(u8, u8, u32, u64)) {
        self.pos += bytes.len() as u64;
        let last = self.pos;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have == 9 {
                    let h = self.head;
                    self.have = 0;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    let end = last - (bytes.len() as u64) + self.payload_left as u64;
                    frame(h[3], h[4], stream, end);
                }
            }
        }
    }

    /// Whether everything fed so far ends exactly at a frame boundary.
    pub(super) fn at_boundary(&self) -> bool {
        self.skip == 0 && self.have == 0 && self.payload_left == 0
    }
}

/// The streams of one connection as seen in its frame headers.
#[derive(Debug, Clone)]
pub(super) struct Frames {
    pub(super) inbound: Parser,
    pub(super) outbound: Parser,
    /// Streams the client opened that we have not ended (END_STREAM sent) or reset.
    pub(super) open: Vec<u32>,
    /// The highest stream id the client opened.
    pub(super) last_stream: u32,
    /// Since when no stream has been open (`None` while one is): `keepalive_timeout` after
    /// it, the connection is closed with a GOAWAY.
    pub(super) quiet_since: Option<tokio::time::Instant>,
}

impl Frames {
    pub(super) fn new() -> Frames {
        Frames {
            inbound: Parser {
                skip: PREFACE_LEN,
                ..Parser::default()
            },
            outbound: Parser::default(),
            open: Vec::new(),
            last_stream: 0,
            quiet_since: Some(tokio::time::Instant::now()),
        }
    }

    pub(super) fn read(&mut self, bytes: &[u8]) {
        let (open, last, since) = (&mut self.open, &mut self.last_stream, &mut self.quiet_since);
        self.inbound.feed(bytes, |kind, _, stream, _| match kind {
            HEADERS if stream != 0 && !open.contains(&stream) && stream > *last => {
                open.push(stream);
                *last = stream;
                *since = None;
            }
            RST_STREAM if open.contains(&stream) => {
                open.retain(|s| *s != stream);
                if open.is_empty() {
                    *since = Some(tokio::time::Instant::now());
                }
            }
            _ => {}
        });
    }

    /// Feeds bytes written; returns where (in bytes written) each frame that ends a stream
    /// ends.
    pub(super) fn written(&mut self, bytes: &[u8]) -> Vec<u64> {
        let (open, since) = (&mut self.open, &mut self.quiet_since);
        let mut ends = Vec::new();
        self.outbound.feed(bytes, |kind, flags, stream, end| {
            let ended = match kind {
                HEADERS | DATA => flags & END_STREAM != 0,
                RST_STREAM => true,
                _ => false,
            };
            if ended && open.contains(&stream) {
                open.retain(|s| *s != stream);
                ends.push(end);
                if open.is_empty() {
                    *since = Some(tokio::time::Instant::now());
                }
            }
        });
        ends
    }

    /// No stream open and no frame half written: a single GOAWAY can go now.
    pub(super) fn quiet(&self) -> bool {
        self.open.is_empty() && self.outbound.at_boundary()
    }
}

/// A GOAWAY frame: NO_ERROR, `last_stream` the last stream the client opened.
pub(super) fn goaway(last_stream: u32) -> [u8; 17] {
    let mut f = [0u8; 17];
    f[2] = 8;
    f[3] = GOAWAY;
    f[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    f
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn streams_open_on_client_headers_and_end_on_our_end_stream() {
        let mut f = Frames::new();
        let mut client = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        client.extend(frame(0x4, 0, 0, &[0; 6])); // SETTINGS
        client.extend(frame(HEADERS, 0x5, 1, &[1, 2, 3]));
        client.extend(frame(HEADERS, 0x5, 3, &[1, 2, 3]));
        // Byte by byte: boundaries span reads.
        for b in &client {
            f.read(std::slice::from_ref(b));
        }
        assert_eq!(f.open, vec![1, 3]);
        assert_eq!(f.last_stream, 3);
        assert!(!f.quiet());
        let resp = frame(HEADERS, 0x4, 1, &[9; 4]);
        let _ = f.written(&resp);
        let data = frame(DATA, END_STREAM, 1, b"hello");
        let _ = f.written(&data[..7]);
        assert_eq!(f.open, vec![1, 3]);
        let _ = f.written(&data[7..]);
        assert_eq!(f.open, vec![3]);
        let _ = f.written(&frame(RST_STREAM, 0, 3, &[0; 4])[..10]);
        assert!(f.open.is_empty());
        assert!(!f.quiet(), "half a frame written");
        let _ = f.written(&[0; 3]);
        assert!(f.quiet());
        assert_eq!(goaway(3)[9..13], [0, 0, 0, 3]);
    }
}
