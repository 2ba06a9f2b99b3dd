//! The TLS record layer of a session after its handshake: the state that a handover moves
//! (cipher suite, per direction the traffic secret and sequence number) and the framing that
//! continues it in the successor.
