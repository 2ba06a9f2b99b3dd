//! [`Session`]: a TLS session after its handshake, as plain data plus the ring keys built from
//! it. It opens whole records, seals data into records, answers and starts KeyUpdates, keeps
//! each key under its record limit, and sends and notices close_notify.

use super::keys::{Aead, DirState};
use super::protect::{self, content, Direction, MAX_FRAGMENT};
use super::{AlertDescription, RecordError};
use bytes::{Buf, BytesMut};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The protocol version of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Version {
    /// TLS 1.2 (AEAD suites only; no KeyUpdate, no renegotiation).
    Tls12,
    /// TLS 1.3.
    Tls13,
}

/// How many records one key may protect before the session acts (tests lower them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Records we seal under one key: TLS 1.3 sends a KeyUpdate of its own first; TLS 1.2
    /// cannot re-key, so sealing fails with [`RecordError::LimitReached`] and the session ends.
    pub tx_records: u64,
    /// Records we open under one of the peer's keys before asking it (TLS 1.3 KeyUpdate with
    /// update_requested) to change it.
    pub rx_records: u64,
}

impl Limits {
    /// The limits for an AEAD ([`Aead::confidentiality_limit`] both ways).
    pub fn for_aead(aead: Aead) -> Limits {
        let n = aead.confidentiality_limit();
        Limits {
            tx_records: n,
            rx_records: n,
        }
    }
}

/// What [`Session::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// Records were opened (or none was complete); the session goes on.
    Open,
    /// The peer sent close_notify: no more data comes from it (bytes after it are ignored).
    Closed,
}

/// Session flags that are not key material.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Flags {
    /// A KeyUpdate we must send before our next data record: `Some(ask_peer_too)`.
    key_update: Option<bool>,
    /// We asked the peer to update its key and have not seen its KeyUpdate yet.
    asked_peer: bool,
    /// The peer's close_notify arrived.
    received_close: bool,
    /// Our close_notify was sealed.
    sent_close: bool,
    /// We are the client of this session (baton to a TLS upstream): the server's
    /// NewSessionTickets are accepted and dropped. Absent from a predecessor that had no
    /// upstream TLS: a server session.
    #[serde(default)]
    client: bool,
}

/// The plain-data form of a [`Session`]: what travels to the successor (borrowed to send,
/// owned when received).
#[derive(Serialize, Deserialize)]
struct Wire<D> {
    version: Version,
    aead: Aead,
    rx: D,
    tx: D,
    limits: Limits,
    flags: Flags,
}

/// A TLS session after its handshake. Serializes to plain data (the secrets included, for the
/// private handover channel only); its Debug output never shows key material.
pub struct Session {
    version: Version,
    aead: Aead,
    /// Records from the peer.
    rx: Direction,
    /// Records to the peer.
    tx: Direction,
    limits: Limits,
    flags: Flags,
}

impl Session {
    /// A session from its plain parts, checking every length.
    pub fn new(
        version: Version,
        aead: Aead,
        rx: DirState,
        tx: DirState,
    ) -> Result<Session, RecordError> {
        Session::from_wire(Wire {
            version,
            aead,
            rx,
            tx,
            limits: Limits::for_aead(aead),
            flags: Flags::default(),
        })
    }

    fn from_wire(w: Wire<DirState>) -> Result<Session, RecordError> {
        let direction = |state: DirState| -> Result<Direction, RecordError> {
            state.check(w.aead)?;
            if w.version == Version::Tls13 && state.secret.is_empty() {
                return Err(RecordError::BadKey);
            }
            let aead = w.aead.key(state.key.bytes())?;
            Ok(Direction { state, aead })
        };
        Ok(Session {
            version: w.version,
            aead: w.aead,
            rx: direction(w.rx)?,
            tx: direction(w.tx)?,
            limits: w.limits,
            flags: w.flags,
        })
    }

    /// The protocol version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The AEAD of the cipher suite.
    pub fn aead(&self) -> Aead {
        self.aead
    }

    /// Sequence numbers of the next record (received, sent).
    pub fn seqs(&self) -> (u64, u64) {
        (self.rx.state.seq, self.tx.state.seq)
    }

    /// KeyUpdates applied since the handshake (received direction, sent direction).
    pub fn generations(&self) -> (u32, u32) {
        (self.rx.state.generation, self.tx.state.generation)
    }

    /// The record limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Replaces the record limits (tests use small ones to exercise re-keying).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The peer's close_notify has arrived.
    pub fn received_close(&self) -> bool {
        self.flags.received_close
    }

    /// Our close_notify has been sealed.
    pub fn sent_close(&self) -> bool {
        self.flags.sent_close
    }

    /// Marks the session as ours as the client (TLS to an upstream): the server may send
    /// NewSessionTickets after the handshake, which are dropped (baton does not resume
    /// upstream sessions).
    pub fn set_client(&mut self) {
        self.flags.client = true;
    }

    /// Whether we are the client of this session.
    pub fn is_client(&self) -> bool {
        self.flags.client
    }

    /// A control record (KeyUpdate) waits to be sealed by [`Session::take_pending`] (or ahead
    /// of the next [`Session::seal`]).
    pub fn has_pending(&self) -> bool {
        self.flags.key_update.is_some() && !self.flags.sent_close
    }

    fn gcm12(&self) -> bool {
        self.version == Version::Tls12 && self.aead != Aead::Chacha20Poly1305
    }

    /// Decrypts every complete record at the front of `cipher` (a partial one stays there),
    /// appending application data to `plain`. A KeyUpdate changes the receiving key at once
    /// and, when the peer asks, queues ours ([`Session::has_pending`]).
    pub fn open(
        &mut self,
        cipher: &mut BytesMut,
        plain: &mut BytesMut,
    ) -> Result<Opened, RecordError> {
        while !self.flags.received_close {
            let Some(len) = protect::complete(self.version, cipher)? else {
                return Ok(Opened::Open);
            };
            let gcm12 = self.gcm12();
            let rec = &mut cipher[..len];
            let p = protect::open(self.version, gcm12, &mut self.rx, rec)?;
            let body = &rec[p.range];
            match p.typ {
                content::DATA => plain.extend_from_slice(body),
                content::ALERT => self.on_alert(body)?,
                content::HANDSHAKE => self.on_handshake(body)?,
                other => return Err(RecordError::UnexpectedType(other)),
            }
            cipher.advance(len);
            self.watch_rx_limit();
        }
        Ok(Opened::Closed)
    }

    fn on_alert(&mut self, body: &[u8]) -> Result<(), RecordError> {
        let [level, desc] = *body else {
            return Err(RecordError::Malformed("alert"));
        };
        let desc = AlertDescription(desc);
        match desc {
            AlertDescription::CLOSE_NOTIFY => self.flags.received_close = true,
            // user_canceled is followed by close_notify; TLS 1.2 warnings are informational.
            AlertDescription::USER_CANCELED => {}
            _ if self.version == Version::Tls12 && level == 1 => {}
            _ => return Err(RecordError::Alert(desc)),
        }
        Ok(())
    }

    fn on_handshake(&mut self, body: &[u8]) -> Result<(), RecordError> {
        const KEY_UPDATE: u8 = 24;
        let Some(&typ) = body.first() else {
            return Err(RecordError::Malformed("handshake record"));
        };
        if self.version == Version::Tls13 && self.flags.client && typ == NEW_SESSION_TICKET {
            return skip_tickets(body);
        }
        if self.version == Version::Tls12 || typ != KEY_UPDATE {
            return Err(RecordError::UnexpectedHandshake(typ));
        }
        // The key changes after this message, so it must end its record (RFC 8446 §5.1):
        // the record is exactly one KeyUpdate.
        let ask = match body {
            [KEY_UPDATE, 0, 0, 1, 0] => false,
            [KEY_UPDATE, 0, 0, 1, 1] => true,
            _ => return Err(RecordError::Malformed("key_update")),
        };
        rekey(self.aead, &mut self.rx)?;
        tracing::debug!(
            generation = self.rx.state.generation,
            update_requested = ask,
            "tls key update from the peer"
        );
        self.flags.asked_peer = false;
        if ask {
            // One KeyUpdate of ours answers any number of requests (RFC 8446 §4.6.3).
            self.flags.key_update.get_or_insert(false);
        }
        Ok(())
    }

    fn watch_rx_limit(&mut self) {
        if self.version == Version::Tls13
            && self.rx.state.seq >= self.limits.rx_records
            && !self.flags.asked_peer
        {
            self.flags.key_update = Some(true);
            self.flags.asked_peer = true;
        }
    }

    /// Encrypts `plain` into records of at most 16 KiB appended to `out`, preceded by any
    /// pending KeyUpdate and by our own when the sending key reaches its limit.
    pub fn seal(&mut self, plain: &[u8], out: &mut BytesMut) -> Result<(), RecordError> {
        if self.flags.sent_close {
            return Err(RecordError::Closed);
        }
        for chunk in plain.chunks(MAX_FRAGMENT) {
            if self.tx.state.seq >= self.limits.tx_records {
                match self.version {
                    Version::Tls13 => {
                        self.flags.key_update.get_or_insert(false);
                    }
                    Version::Tls12 => return Err(RecordError::LimitReached),
                }
            }
            self.take_pending(out)?;
            let gcm12 = self.gcm12();
            protect::seal(self.version, gcm12, &mut self.tx, content::DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Starts a KeyUpdate of ours (TLS 1.3; a no-op for TLS 1.2), asking the peer to update
    /// too when `ask_peer`. It is sealed by the next [`Session::take_pending`] or
    /// [`Session::seal`].
    pub fn request_key_update(&mut self, ask_peer: bool) {
        if self.version == Version::Tls13 {
            let ask = self.flags.key_update.unwrap_or(false) || ask_peer;
            self.flags.key_update = Some(ask);
        }
    }

    /// Seals the control records waiting to be sent (a KeyUpdate) into `out`.
    pub fn take_pending(&mut self, out: &mut BytesMut) -> Result<(), RecordError> {
        let Some(ask) = self.flags.key_update.take() else {
            return Ok(());
        };
        if self.flags.sent_close {
            return Ok(());
        }
        let msg = [24, 0, 0, 1, u8::from(ask)];
        protect::seal(
            self.version,
            false,
            &mut self.tx,
            content::HANDSHAKE,
            &msg,
            out,
        )?;
        rekey(self.aead, &mut self.tx)?;
        tracing::debug!(
            generation = self.tx.state.generation,
            update_requested = ask,
            "tls key update sent"
        );
        if ask {
            self.flags.asked_peer = true;
        }
        Ok(())
    }

    /// Seals our close_notify into `out` (once; later calls add nothing). Nothing can be
    /// sealed after it; records can still be opened.
    pub fn close_notify(&mut self, out: &mut BytesMut) -> Result<(), RecordError> {
        self.send_alert(AlertDescription::CLOSE_NOTIFY, out)
    }

    /// Seals an alert into `out` (close_notify as a warning, anything else fatal) and closes
    /// the session for writing.
    pub fn send_alert(
        &mut self,
        desc: AlertDescription,
        out: &mut BytesMut,
    ) -> Result<(), RecordError> {
        if self.flags.sent_close {
            return Ok(());
        }
        let level = if desc == AlertDescription::CLOSE_NOTIFY {
            1
        } else {
            2
        };
        let gcm12 = self.gcm12();
        protect::seal(
            self.version,
            gcm12,
            &mut self.tx,
            content::ALERT,
            &[level, desc.0],
            out,
        )?;
        self.flags.sent_close = true;
        Ok(())
    }
}

#[cfg(test)]
impl Session {
    /// Seals one record of any content type (tests forge what a peer might send).
    pub(crate) fn seal_raw(
        &mut self,
        typ: u8,
        content: &[u8],
        out: &mut BytesMut,
    ) -> Result<(), RecordError> {
        let gcm12 = self.gcm12();
        protect::seal(self.version, gcm12, &mut self.tx, typ, content, out)
    }
}

/// Handshake type of a TLS 1.3 NewSessionTicket.
const NEW_SESSION_TICKET: u8 = 4;

/// Reads past a record of whole NewSessionTicket messages (a server's, to us as its client).
/// A server sends them right after the handshake, usually one or two per record; one split
/// across records is refused (no server we know does that with tickets of a few hundred bytes).
fn skip_tickets(mut body: &[u8]) -> Result<(), RecordError> {
    while !body.is_empty() {
        let [typ, a, b, c, rest @ ..] = body else {
            return Err(RecordError::Malformed("new_session_ticket"));
        };
        if *typ != NEW_SESSION_TICKET {
            return Err(RecordError::UnexpectedHandshake(*typ));
        }
        let len = (usize::from(*a) << 16) | (usize::from(*b) << 8) | usize::from(*c);
        let Some(next) = rest.get(len..) else {
            return Err(RecordError::Malformed(
                "new_session_ticket split across records",
            ));
        };
        body = next;
    }
    tracing::trace!("tls session ticket from the upstream dropped");
    Ok(())
}

/// Applies a KeyUpdate to one direction and rebuilds its ring key.
fn rekey(aead: Aead, dir: &mut Direction) -> Result<(), RecordError> {
    dir.state.advance(aead)?;
    dir.aead = aead.key(dir.state.key.bytes())?;
    Ok(())
}

impl Serialize for Session {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Wire {
            version: self.version,
            aead: self.aead,
            rx: &self.rx.state,
            tx: &self.tx.state,
            limits: self.limits,
            flags: self.flags,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Session {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Session, D::Error> {
        let wire = Wire::<DirState>::deserialize(d)?;
        Session::from_wire(wire).map_err(serde::de::Error::custom)
    }
}

impl Clone for Session {
    fn clone(&self) -> Session {
        let dir = |d: &Direction| Direction {
            state: d.state.clone(),
            aead: d.aead.clone(),
        };
        Session {
            version: self.version,
            aead: self.aead,
            rx: dir(&self.rx),
            tx: dir(&self.tx),
            limits: self.limits,
            flags: self.flags,
        }
    }
}

impl PartialEq for Session {
    fn eq(&self, o: &Session) -> bool {
        // The ring keys follow from the key bytes in the states.
        self.version == o.version
            && self.aead == o.aead
            && self.rx.state == o.rx.state
            && self.tx.state == o.tx.state
            && self.limits == o.limits
            && self.flags == o.flags
    }
}

impl Eq for Session {}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Sequence numbers and generations only: key material never reaches a log.
        f.debug_struct("Session")
            .field("version", &self.version)
            .field("aead", &self.aead)
            .field("rx_seq", &self.rx.state.seq)
            .field("tx_seq", &self.tx.state.seq)
            .field("generations", &self.generations())
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}
