//! Session-ticket keys that baton holds, so a client resumes across an upgrade: the keys are
//! handed to the successor over the handover channel (never written to disk or a log) and
//! the successor decrypts the tickets its predecessor issued.
//!
//! A ticket is `key name (16) ‖ nonce (12) ‖ AES-256-GCM(state) ‖ tag (16)`, the name also
//! authenticated as additional data. The current key encrypts; the current and the previous
//! key decrypt. Every [`ROTATE`] a fresh key becomes current and the oldest is dropped, so a
//! ticket is accepted for at least one and at most two rotation periods. Key bytes are
//! zeroized when dropped; ring's expanded AES key exists only for the duration of one call.

use rand::RngCore;
use ring::aead;
use rustls::server::ProducesTickets;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use zeroize::Zeroize;

/// How often a new key takes over (nginx and Go rotate on a similar scale).
pub const ROTATE: Duration = Duration::from_secs(12 * 3600);
/// Bytes of one key on the handover channel: name (16) then AES-256 key (32).
pub const KEY_WIRE_LEN: usize = 16 + 32;
/// Most keys a process holds (current and previous).
const KEEP: usize = 2;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// One ticket key.
#[derive(Clone)]
pub struct TicketKey {
    /// Identifies the key inside a ticket (random, not secret).
    name: [u8; 16],
    /// The AES-256-GCM key.
    key: [u8; 32],
}

impl TicketKey {
    fn random() -> TicketKey {
        let mut k = TicketKey {
            name: [0; 16],
            key: [0; 32],
        };
        let mut rng = rand::rng();
        rng.fill_bytes(&mut k.name);
        rng.fill_bytes(&mut k.key);
        k
    }

    fn aead(&self) -> Option<aead::LessSafeKey> {
        aead::UnboundKey::new(&aead::AES_256_GCM, &self.key)
            .ok()
            .map(aead::LessSafeKey::new)
    }
}

impl Drop for TicketKey {
    fn drop(&mut self) {
        self.name.zeroize();
        self.key.zeroize();
    }
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketKey(..)")
    }
}

/// The keys, newest first, and when the newest took over.
struct Keys {
    list: Vec<TicketKey>,
    since: Instant,
}

/// The process's ticket keys, shared by every TLS listener (`ServerConfig::ticketer`).
pub struct Ticketer {
    keys: Mutex<Keys>,
    /// How long the current key encrypts before this process makes a new one itself.
    rotate: Duration,
    /// The lifetime hint sent to clients (the rotation period of whoever makes the keys).
    lifetime: Duration,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticketer").finish_non_exhaustive()
    }
}

impl Default for Ticketer {
    fn default() -> Self {
        Ticketer::new(ROTATE)
    }
}

impl Ticketer {
    /// Fresh keys, rotated every `rotate`.
    pub fn new(rotate: Duration) -> Ticketer {
        Ticketer {
            keys: Mutex::new(Keys {
                list: vec![TicketKey::random()],
                since: Instant::now(),
            }),
            rotate,
            lifetime: rotate,
        }
    }

    /// The keys of a worker in multi-process mode: its supervisor makes them, hands them to
    /// every worker and sends fresh ones every [`ROTATE`] ([`Self::import`]), so every
    /// worker encrypts with the same key and decrypts what any other issued. A worker
    /// rotates on its own only if no keys came for two periods (a supervisor that does not
    /// send them): then its tickets resume only on itself, but its key still changes.
    pub fn follower() -> Ticketer {
        Ticketer {
            rotate: ROTATE * 2,
            ..Ticketer::new(ROTATE)
        }
    }

    /// Makes a fresh current key if the current one has served its period; true if it did
    /// (the supervisor then sends the keys to its workers).
    pub fn rotate_if_due(&self) -> bool {
        if self.age() < self.rotate {
            return false;
        }
        self.rotate();
        true
    }

    /// Makes a fresh current key now; the current one becomes the previous one.
    pub fn rotate(&self) {
        let mut k = self.lock();
        k.list.insert(0, TicketKey::random());
        k.list.truncate(KEEP);
        k.since = Instant::now();
    }

    /// How long the current key has been current.
    pub fn age(&self) -> Duration {
        self.lock().since.elapsed()
    }

    fn lock(&self) -> MutexGuard<'_, Keys> {
        // Plain data behind a short lock: a panic elsewhere leaves it usable.
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys for the successor, newest first, [`KEY_WIRE_LEN`] bytes each. The buffer is
    /// zeroized when dropped.
    pub fn export(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let k = self.lock();
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(k.list.len() * KEY_WIRE_LEN));
        for key in &k.list {
            out.extend_from_slice(&key.name);
            out.extend_from_slice(&key.key);
        }
        out
    }

    /// Takes over the predecessor's keys (from [`Self::export`]): they replace this process's
    /// own, so tickets issued before the upgrade resume after it, and the rotation schedule
    /// continues with a full period. Returns how many were taken; bytes that are not whole
    /// keys are refused (keys unchanged).
    pub fn import(&self, bytes: &[u8]) -> Result<usize, TicketKeysError> {
        self.import_aged(bytes, Duration::ZERO)
    }

    /// [`Self::import`] of keys whose current one has been current for `age` already (the
    /// supervisor's own keys across its re-exec), so the rotation schedule carries on.
    pub fn import_aged(&self, bytes: &[u8], age: Duration) -> Result<usize, TicketKeysError> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(KEY_WIRE_LEN) {
            return Err(TicketKeysError(bytes.len()));
        }
        let list: Vec<TicketKey> = bytes
            .chunks_exact(KEY_WIRE_LEN)
            .take(KEEP)
            .map(|c| {
                let mut k = TicketKey {
                    name: [0; 16],
                    key: [0; 32],
                };
                k.name.copy_from_slice(&c[..16]);
                k.key.copy_from_slice(&c[16..]);
                k
            })
            .collect();
        let n = list.len();
        let mut k = self.lock();
        k.list = list;
        let now = Instant::now();
        k.since = now.checked_sub(age).unwrap_or(now);
        Ok(n)
    }

    /// The current key, rotating first if its time is up.
    fn current(&self) -> TicketKey {
        self.rotate_if_due();
        self.lock().list[0].clone()
    }
}

/// Handed-over ticket keys that are not a whole number of keys.
#[derive(Debug, thiserror::Error)]
#[error("ticket keys: {0} bytes is not a whole number of {KEY_WIRE_LEN}-byte keys")]
pub struct TicketKeysError(pub usize);

impl ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        // The hint to clients: a ticket is surely accepted this long.
        self.lifetime.as_secs().min(u64::from(u32::MAX)) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.current();
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(16 + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .aead()?
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&key.name),
                &mut out[16 + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < 16 + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(16);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = {
            let k = self.lock();
            k.list.iter().find(|k| k.name == name)?.clone()
        };
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key
            .aead()?
            .open_in_place(nonce, aead::Aad::from(&key.name), &mut buf)
            .ok()?;
        let n = plain.len();
        buf.truncate(n);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tickets_round_trip_and_survive_an_export_import() {
        let a = Ticketer::default();
        let t = a.encrypt(b"session state").unwrap();
        assert_eq!(a.decrypt(&t).unwrap(), b"session state");
        let b = Ticketer::default();
        assert_eq!(b.decrypt(&t), None, "another process's keys do not open it");
        assert_eq!(b.import(&a.export()).unwrap(), 1);
        assert_eq!(b.decrypt(&t).unwrap(), b"session state");
    }

    #[test]
    fn a_changed_byte_is_refused() {
        let a = Ticketer::default();
        let mut t = a.encrypt(b"state").unwrap();
        for i in [0, 20, t.len() - 1] {
            t[i] ^= 1;
            assert_eq!(a.decrypt(&t), None, "byte {i}");
            t[i] ^= 1;
        }
        assert_eq!(a.decrypt(&t[..10]), None);
    }

    #[test]
    fn rotation_keeps_the_previous_key_for_one_period() {
        let a = Ticketer::new(Duration::ZERO);
        let t1 = a.encrypt(b"one").unwrap();
        // Every encrypt rotates with a zero period: t1's key is now the previous one.
        let t2 = a.encrypt(b"two").unwrap();
        assert_eq!(a.decrypt(&t1).unwrap(), b"one");
        let _t3 = a.encrypt(b"three").unwrap();
        assert_eq!(a.decrypt(&t1), None, "two rotations later the key is gone");
        assert_eq!(a.decrypt(&t2).unwrap(), b"two");
        assert_eq!(a.export().len(), 2 * KEY_WIRE_LEN);
    }

    #[test]
    fn a_follower_takes_its_leaders_rotations_and_keeps_the_schedule_across_an_import() {
        let leader = Ticketer::new(Duration::from_secs(3600));
        let worker = Ticketer::follower();
        assert_eq!(worker.lifetime(), ROTATE.as_secs() as u32);
        assert!(!leader.rotate_if_due(), "not due yet");
        worker.import(&leader.export()).unwrap();
        let t1 = worker.encrypt(b"one").unwrap();
        assert_eq!(leader.decrypt(&t1).unwrap(), b"one", "same keys everywhere");
        // An image after a re-exec takes the keys with their age: due at once here.
        let next = Ticketer::new(Duration::from_secs(3600));
        next.import_aged(&leader.export(), Duration::from_secs(3600))
            .unwrap();
        assert!(next.age() >= Duration::from_secs(3600));
        assert!(next.rotate_if_due(), "the schedule carried on");
        assert!(!next.rotate_if_due(), "once per period");
        worker.import(&next.export()).unwrap();
        let t2 = worker.encrypt(b"two").unwrap();
        assert_eq!(next.decrypt(&t2).unwrap(), b"two");
        assert_eq!(
            worker.decrypt(&t1).unwrap(),
            b"one",
            "the previous key still opens"
        );
        assert_eq!(
            leader.decrypt(&t2),
            None,
            "a new key the old image never had"
        );
    }

    #[test]
    fn partial_keys_are_refused() {
        let a = Ticketer::default();
        assert!(a.import(&[0u8; 47]).is_err());
        assert!(a.import(&[]).is_err());
    }
}
