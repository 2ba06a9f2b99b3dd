//! The TLS record layer of a session after its handshake: the state that a handover moves
//! (cipher suite, per direction the traffic secret and sequence number) and the framing that
//! continues it in the successor.
//!
//! rustls runs the handshake; [`Session::from_rustls`] then takes the session over (keys and
//! sequence numbers from `dangerous_extract_secrets`, TLS 1.3 traffic secrets from
//! [`KeyLogCapture`]) and from then on, in every process, application data goes through
//! [`Session::open`] and [`Session::seal`]. Only framing and the key schedule are written
//! here; the AEADs and HKDF are ring's.
//!
//! - [`keys`]: secrets (zeroized, redacted), HKDF-Expand-Label, one direction's state.
//! - `protect`: one record's header, nonce, additional data, inner type and padding.
//! - `session`: [`Session`]: whole records, alerts, KeyUpdate, record limits, serde.
//! - `keylog`: [`KeyLogCapture`] and [`client_random`].
//! - `extract`: [`Session::from_rustls`].
//! - `stream`: [`TlsStream`] (socket + session + buffers, AsyncRead/AsyncWrite) and
//!   [`ParkedTls`], its plain-data form.
//! - [`ktls`]: the kernel TLS probe and which record layer is in force.

mod error;
mod extract;
mod keylog;
pub mod keys;
pub mod ktls;
mod protect;
mod session;
mod stream;

pub use error::{AlertDescription, RecordError};
pub use keylog::{client_random, ClientRandom, KeyLogCapture, TrafficSecrets};
pub use keys::Aead;
pub use protect::{HEADER_LEN, MAX_FRAGMENT};
pub use session::{Limits, Opened, Session, Version};
pub use stream::{ParkError, ParkedTls, TlsStream};

#[cfg(test)]
mod tests;
