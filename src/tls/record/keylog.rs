//! [`KeyLogCapture`]: the `KeyLog` a TLS listener's rustls `ServerConfig` carries, so the
//! connection's TLS 1.3 application traffic secrets (which `dangerous_extract_secrets` does
//! not give, only the keys derived from them) are at hand for KeyUpdate when the record layer
//! takes over. Nothing is written anywhere: the secrets stay in memory, zeroized on drop,
//! until [`KeyLogCapture::take`] hands them to the session or they expire.

use super::keys::Secret;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The client random of a ClientHello: what the key log is keyed by.
pub type ClientRandom = [u8; 32];

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

/// How long captured secrets wait for their connection's take-over. A handshake that fails
/// never takes them; pruning bounds what such handshakes leave behind.
const EXPIRY: Duration = Duration::from_secs(120);
/// Captures between two prunes (so a prune, O(entries), is rare).
const PRUNE_EVERY: u32 = 256;

#[derive(Default)]
struct Entry {
    client: Option<Secret>,
    server: Option<Secret>,
    at: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<ClientRandom, Entry>,
    since_prune: u32,
}

/// The traffic secrets of one connection: client → server (what we open) and server →
/// client (what we seal).
#[derive(Debug)]
pub struct TrafficSecrets {
    /// `CLIENT_TRAFFIC_SECRET_0`.
    pub client: Secret,
    /// `SERVER_TRAFFIC_SECRET_0`.
    pub server: Secret,
}

/// Captures `CLIENT_TRAFFIC_SECRET_0` / `SERVER_TRAFFIC_SECRET_0` by client random. Set it as
/// `ServerConfig::key_log` (with `enable_secret_extraction = true`); one capture can serve
/// every connection of a config.
#[derive(Default)]
pub struct KeyLogCapture {
    inner: Mutex<Inner>,
}

impl KeyLogCapture {
    /// An empty capture.
    pub fn new() -> KeyLogCapture {
        KeyLogCapture::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes both secrets of the connection with this client random, if both were captured.
    pub fn take(&self, random: &ClientRandom) -> Option<TrafficSecrets> {
        let entry = self.lock().entries.remove(random)?;
        Some(TrafficSecrets {
            client: entry.client?,
            server: entry.server?,
        })
    }

    /// Drops what was captured for a connection whose handshake failed.
    pub fn forget(&self, random: &ClientRandom) {
        self.lock().entries.remove(random);
    }

    /// Number of connections with captured secrets not yet taken.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Nothing is waiting to be taken.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn capture(&self, label: &str, random: &[u8], secret: &[u8], now: Instant) {
        let Ok(random) = ClientRandom::try_from(random) else {
            return;
        };
        let mut inner = self.lock();
        inner.since_prune += 1;
        if inner.since_prune >= PRUNE_EVERY {
            inner.since_prune = 0;
            inner
                .entries
                .retain(|_, e| e.at.is_some_and(|at| now.duration_since(at) < EXPIRY));
        }
        let entry = inner.entries.entry(random).or_default();
        entry.at = Some(now);
        let secret = Some(Secret::from_slice(secret));
        match label {
            CLIENT_SECRET => entry.client = secret,
            SERVER_SECRET => entry.server = secret,
            _ => {}
        }
    }
}

impl rustls::KeyLog for KeyLogCapture {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        self.capture(label, client_random, secret, Instant::now());
    }

    fn will_log(&self, label: &str) -> bool {
        // Only what KeyUpdate needs: handshake secrets and TLS 1.2's master secret are never
        // even handed to us.
        label == CLIENT_SECRET || label == SERVER_SECRET
    }
}

impl std::fmt::Debug for KeyLogCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyLogCapture({} waiting)", self.len())
    }
}

/// The client random of the ClientHello at the start of `records` (the first plaintext
/// handshake records a client sent, as read whole by the handshake driver); `None` until
/// enough of it is there or if it is not a ClientHello.
pub fn client_random(records: &[u8]) -> Option<ClientRandom> {
    // Handshake bytes: the fragments of the leading handshake records, joined (a ClientHello
    // may be split across records; the random sits in its first 38 bytes).
    const WANT: usize = 4 + 2 + 32;
    let mut hs = Vec::with_capacity(WANT);
    let mut rest = records;
    while hs.len() < WANT {
        let [typ, _, _, hi, lo, ..] = *rest else {
            return None;
        };
        if typ != 22 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let frag = rest.get(5..5 + len)?;
        hs.extend_from_slice(&frag[..frag.len().min(WANT - hs.len())]);
        rest = &rest[5 + len..];
    }
    // msg_type client_hello (1), 3-byte length, legacy_version, then the random.
    if hs[0] != 1 {
        return None;
    }
    ClientRandom::try_from(&hs[6..WANT]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_both_secrets_and_hands_them_over_once() {
        let cap = KeyLogCapture::new();
        let r = [7u8; 32];
        cap.capture(CLIENT_SECRET, &r, &[1; 32], Instant::now());
        assert!(cap.take(&r).is_none(), "only one secret yet");
        cap.capture(CLIENT_SECRET, &r, &[1; 32], Instant::now());
        cap.capture(SERVER_SECRET, &r, &[2; 32], Instant::now());
        let s = cap.take(&r).expect("both captured");
        assert_eq!(s.client.bytes(), &[1; 32]);
        assert_eq!(s.server.bytes(), &[2; 32]);
        assert!(cap.take(&r).is_none());
        assert!(cap.is_empty());
        assert!(!format!("{s:?}").contains("1, 1"), "secrets are redacted");
    }

    #[test]
    fn stale_entries_are_pruned() {
        let cap = KeyLogCapture::new();
        let t0 = Instant::now();
        cap.capture(CLIENT_SECRET, &[1; 32], &[1; 32], t0);
        let later = t0 + EXPIRY + Duration::from_secs(1);
        for i in 0..PRUNE_EVERY {
            let mut r = [2u8; 32];
            r[..4].copy_from_slice(&i.to_be_bytes());
            cap.capture(SERVER_SECRET, &r, &[3; 32], later);
        }
        assert!(cap.take(&[1; 32]).is_none());
        assert!(
            !cap.lock().entries.contains_key(&[1; 32]),
            "expired entry pruned"
        );
    }

    #[test]
    fn client_random_across_fragmented_records() {
        let mut hello = vec![1, 0, 0, 60, 3, 3];
        hello.extend((0..32).map(|i| i as u8));
        hello.extend([0; 22]);
        // Split the handshake message after 10 bytes into two records.
        let mut recs = vec![22, 3, 1, 0, 10];
        recs.extend_from_slice(&hello[..10]);
        recs.extend([22, 3, 1, 0, (hello.len() - 10) as u8]);
        recs.extend_from_slice(&hello[10..]);
        let want: ClientRandom = core::array::from_fn(|i| i as u8);
        assert_eq!(client_random(&recs), Some(want));
        assert_eq!(client_random(&recs[..20]), None, "incomplete");
        assert_eq!(client_random(&[23, 3, 3, 0, 1, 0]), None, "not a handshake");
        assert_eq!(client_random(&[]), None);
    }
}
