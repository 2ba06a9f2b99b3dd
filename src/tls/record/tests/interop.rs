//! rustls as the peer, in memory: a rustls client and a rustls server shake hands over
//! buffers, the server's session is taken over by [`Session::from_rustls`], and from then on
//! the rustls client talks to our record layer — data both ways, KeyUpdates started by either
//! side, re-keying at the record limit, a park/resume through serde, close_notify both ways —
//! for every TLS 1.3 suite and the TLS 1.2 AEAD suites.

use crate::tls::record::{
    client_random, KeyLogCapture, Limits, Opened, RecordError, Session, Version,
};
use bytes::BytesMut;
use rustls::crypto::ring as provider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{
    ClientConfig, ClientConnection, ServerConfig, ServerConnection, SupportedCipherSuite,
};
use std::io::{Read, Write};
use std::sync::Arc;

/// A client and a server config for one suite, and the server's key log.
#[derive(Clone)]
pub struct Configs {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
    pub keylog: Arc<KeyLogCapture>,
}

/// Configs that can only agree on `suite` (a self-signed ECDSA certificate for "localhost").
pub fn configs(suite: SupportedCipherSuite) -> Configs {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let version = match suite {
        SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
    };
    let prov = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..provider::default_provider()
    });
    let keylog = Arc::new(KeyLogCapture::new());
    let mut server = ServerConfig::builder_with_provider(prov.clone())
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    server.enable_secret_extraction = true;
    server.key_log = keylog.clone();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let client = ClientConfig::builder_with_provider(prov)
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Configs {
        client: Arc::new(client),
        server: Arc::new(server),
        keylog,
    }
}

/// Moves everything `from` wants to write into `to`'s input (whole records, as the handshake
/// driver does) and lets `to` process it; returns the bytes moved.
fn pump(from: &mut impl DerefConn, to: &mut impl DerefConn) -> Vec<u8> {
    let mut wire = Vec::new();
    while from.conn().wants_write() {
        from.conn().write_tls(&mut wire).expect("write_tls");
    }
    let mut rd = &wire[..];
    while !rd.is_empty() {
        to.conn().read_tls(&mut rd).expect("read_tls");
        to.conn().process_new_packets().expect("process");
    }
    wire
}

/// The two connection types share `ConnectionCommon` through Deref; this names what `pump`
/// needs of either.
trait DerefConn {
    fn conn(&mut self) -> &mut rustls::Connection;
}

impl DerefConn for rustls::Connection {
    fn conn(&mut self) -> &mut rustls::Connection {
        self
    }
}

/// A completed in-memory handshake: the client, the server (not yet taken over) and the
/// ClientHello's random.
pub fn handshake(c: &Configs) -> (ClientConnection, ServerConnection, [u8; 32]) {
    let client = ClientConnection::new(c.client.clone(), "localhost".try_into().expect("name"))
        .expect("client");
    let server = ServerConnection::new(c.server.clone()).expect("server");
    let mut client = rustls::Connection::Client(client);
    let mut server = rustls::Connection::Server(server);
    let hello = pump(&mut client, &mut server);
    let random = client_random(&hello).expect("client random");
    for _ in 0..10 {
        if !client.is_handshaking() && !server.is_handshaking() && !server.wants_write() {
            break;
        }
        pump(&mut server, &mut client);
        pump(&mut client, &mut server);
    }
    pump(&mut server, &mut client);
    assert!(!client.is_handshaking() && !server.is_handshaking());
    match (client, server) {
        (rustls::Connection::Client(c), rustls::Connection::Server(s)) => (c, s, random),
        _ => unreachable!("built as client and server"),
    }
}

/// Our side of the conversation: the session and its wire buffers.
struct Ours {
    session: Session,
    inbox: BytesMut,
}

impl Ours {
    /// Client → us: everything the client wants to write, opened.
    fn recv(&mut self, client: &mut ClientConnection) -> (Vec<u8>, Opened) {
        while client.wants_write() {
            let mut w = Vec::new();
            client.write_tls(&mut w).expect("client write_tls");
            self.inbox.extend_from_slice(&w);
        }
        let mut plain = BytesMut::new();
        let opened = self
            .session
            .open(&mut self.inbox, &mut plain)
            .expect("open");
        (plain.to_vec(), opened)
    }

    /// Us → client: `data` sealed (after any pending control record), read by the client.
    fn send(&mut self, client: &mut ClientConnection, data: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        self.session.take_pending(&mut out).expect("pending");
        self.session.seal(data, &mut out).expect("seal");
        deliver(client, &out)
    }
}

/// Feeds ciphertext to the client and returns the plaintext it reads.
fn deliver(client: &mut ClientConnection, wire: &[u8]) -> Vec<u8> {
    let mut rd = wire;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if !rd.is_empty() {
            client.read_tls(&mut rd).expect("client read_tls");
            client.process_new_packets().expect("client process");
        }
        // Read out as we go: rustls buffers a bounded amount of plaintext.
        loop {
            match client.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("client read: {e}"),
            }
        }
        if rd.is_empty() {
            return got;
        }
    }
}

fn exchange(ours: &mut Ours, client: &mut ClientConnection, tag: &str) {
    let ask = format!("client says {tag}");
    client
        .writer()
        .write_all(ask.as_bytes())
        .expect("client write");
    let (got, opened) = ours.recv(client);
    assert_eq!(opened, Opened::Open);
    assert_eq!(got, ask.as_bytes(), "{tag}");
    let reply = format!("server says {tag}");
    assert_eq!(
        ours.send(client, reply.as_bytes()),
        reply.as_bytes(),
        "{tag}"
    );
}

fn conversation(suite: SupportedCipherSuite) {
    let c = configs(suite);
    let (mut client, server, random) = handshake(&c);
    let (session, early) = Session::from_rustls(server, &random, &c.keylog).expect("take over");
    assert!(early.is_empty());
    assert!(
        c.keylog.is_empty(),
        "the capture is taken, nothing left behind"
    );
    let tls13 = session.version() == Version::Tls13;
    let mut ours = Ours {
        session,
        inbox: BytesMut::new(),
    };
    exchange(&mut ours, &mut client, "hello");

    // A large write: several 16 KiB records each way.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    client.set_buffer_limit(None);
    client.writer().write_all(&big).expect("client write");
    let (got, _) = ours.recv(&mut client);
    assert_eq!(got, big);
    assert_eq!(ours.send(&mut client, &big), big);

    if tls13 {
        // The client re-keys (asking us to follow): we answer before our next data record.
        client.refresh_traffic_keys().expect("client key update");
        exchange(&mut ours, &mut client, "after the client's KeyUpdate");
        assert_eq!(ours.session.generations(), (1, 1));

        // We re-key and ask the client to follow.
        ours.session.request_key_update(true);
        exchange(&mut ours, &mut client, "after our KeyUpdate");
        exchange(&mut ours, &mut client, "once more");
        assert_eq!(ours.session.generations(), (2, 2));

        // Record limits: every third record under one key makes us re-key (and ask the
        // client to); the conversation carries on across all of it.
        ours.session.set_limits(Limits {
            tx_records: 3,
            rx_records: 3,
        });
        for i in 0..6 {
            exchange(&mut ours, &mut client, &format!("limited {i}"));
        }
        let (rx_gen, tx_gen) = ours.session.generations();
        assert!(tx_gen >= 4 && rx_gen >= 3, "re-keyed: {rx_gen} {tx_gen}");
    }

    // Park: the session becomes plain data and comes back (as in a successor).
    let json = serde_json::to_vec(&ours.session).expect("serialize");
    let dbg = format!("{:?}", ours.session);
    assert!(!dbg.contains('['), "no key material in Debug: {dbg}");
    ours.session = serde_json::from_slice(&json).expect("deserialize");
    exchange(&mut ours, &mut client, "after a park");

    // close_notify both ways.
    client.send_close_notify();
    let (got, opened) = ours.recv(&mut client);
    assert!(got.is_empty());
    assert_eq!(opened, Opened::Closed);
    assert!(ours.session.received_close());
    let mut out = BytesMut::new();
    ours.session.close_notify(&mut out).expect("close");
    assert!(deliver(&mut client, &out).is_empty());
    assert!(
        matches!(client.reader().read(&mut [0u8; 1]), Ok(0)),
        "the client sees a clean close"
    );
    assert!(matches!(
        ours.session.seal(b"late", &mut out),
        Err(RecordError::Closed)
    ));
}

#[test]
fn tls13_aes128gcm() {
    conversation(provider::cipher_suite::TLS13_AES_128_GCM_SHA256);
}

#[test]
fn tls13_aes256gcm() {
    conversation(provider::cipher_suite::TLS13_AES_256_GCM_SHA384);
}

#[test]
fn tls13_chacha20poly1305() {
    conversation(provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256);
}

#[test]
fn tls12_ecdhe_aes128gcm() {
    conversation(provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
}

#[test]
fn tls12_ecdhe_aes256gcm() {
    conversation(provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384);
}

#[test]
fn tls12_ecdhe_chacha20poly1305() {
    conversation(provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256);
}

#[test]
fn takes_over_after_a_key_update_inside_rustls() {
    // The client re-keys while rustls still runs the server: rustls follows (and answers),
    // so the captured secret 0 is one step behind in both directions.
    let c = configs(provider::cipher_suite::TLS13_AES_128_GCM_SHA256);
    let (client, server, random) = handshake(&c);
    let mut client = rustls::Connection::Client(client);
    let mut server = rustls::Connection::Server(server);
    client.refresh_traffic_keys().expect("key update");
    client.writer().write_all(b"ping").expect("write");
    pump(&mut client, &mut server);
    let mut ping = [0u8; 4];
    server.reader().read_exact(&mut ping).expect("server read");
    server.writer().write_all(b"pong").expect("write");
    pump(&mut server, &mut client);
    let (mut client, server) = match (client, server) {
        (rustls::Connection::Client(c), rustls::Connection::Server(s)) => (c, s),
        _ => unreachable!("built as client and server"),
    };
    let (session, _) = Session::from_rustls(server, &random, &c.keylog).expect("take over");
    assert_eq!(session.generations(), (1, 1));
    let mut ours = Ours {
        session,
        inbox: BytesMut::new(),
    };
    assert_eq!(deliver(&mut client, &[]), b"pong");
    exchange(&mut ours, &mut client, "after rustls re-keyed");
}

#[test]
fn take_over_refuses_what_it_cannot_continue() {
    let c = configs(provider::cipher_suite::TLS13_AES_128_GCM_SHA256);
    // Mid-handshake.
    let server = ServerConnection::new(c.server.clone()).expect("server");
    assert!(matches!(
        Session::from_rustls(server, &[0; 32], &c.keylog),
        Err(RecordError::HandshakeIncomplete)
    ));
    // A completed handshake whose secrets the key log never saw.
    let (_client, server, _random) = handshake(&c);
    assert!(matches!(
        Session::from_rustls(server, &[0; 32], &c.keylog),
        Err(RecordError::NoSecret)
    ));
}

#[test]
fn plaintext_rustls_decrypted_comes_back() {
    let c = configs(provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256);
    let (client, server, random) = handshake(&c);
    let mut client = rustls::Connection::Client(client);
    let mut server = rustls::Connection::Server(server);
    client.writer().write_all(b"early bird").expect("write");
    pump(&mut client, &mut server);
    let server = match server {
        rustls::Connection::Server(s) => s,
        rustls::Connection::Client(_) => unreachable!("built as a server"),
    };
    let (_, early) = Session::from_rustls(server, &random, &c.keylog).expect("take over");
    assert_eq!(early, b"early bird");
}
