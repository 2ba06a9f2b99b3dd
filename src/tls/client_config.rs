//! An upstream's rustls `ClientConfig` (`upstreams.X.tls`): the ring provider, TLS 1.3 and
//! 1.2 with rustls's safe default suites, the server verifier (the WebPKI one over the
//! configured roots, or none with `verify: false`), an optional client certificate, ALPN, and
//! what the record layer needs to continue the session (secret extraction, the key log).
//! Resumption is off: the server's tickets arrive after the take-over, in baton's record
//! layer, which drops them (docs/tls.md, "Upstream TLS").

use super::record::KeyLogCapture;
use crate::config::UpstreamTls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::net::IpAddr;
use std::sync::Arc;

/// Why an upstream's TLS settings could not be turned into a rustls config.
#[derive(Debug, thiserror::Error)]
pub enum ClientConfigError {
    /// rustls refused the versions (cannot happen with the ring provider's suites).
    #[error("tls settings refused by rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The verifier could not be built (no roots: validation refuses this already).
    #[error("cannot verify server certificates: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// An upstream's TLS: its rustls config, the key log that captures each connection's traffic
/// secrets for the record layer, and the configured server name.
#[derive(Debug)]
pub struct TlsClient {
    /// The rustls config (its `key_log` is `keylog`).
    pub config: Arc<ClientConfig>,
    /// Traffic secrets by client random, taken when a session leaves rustls.
    pub keylog: Arc<KeyLogCapture>,
    /// `server_name`, if configured.
    server_name: Option<ServerName<'static>>,
}

impl TlsClient {
    /// The name a connection to a server sends as SNI and verifies: the configured
    /// `server_name`, else the server's host name (`host` of a `host:port` entry), else its
    /// IP address (verified against the certificate's IP subjectAltNames; no SNI is sent
    /// for an address, as RFC 6066 has it).
    pub fn name_for(&self, host: Option<&str>, ip: IpAddr) -> ServerName<'static> {
        if let Some(n) = &self.server_name {
            return n.clone();
        }
        host.and_then(|h| ServerName::try_from(h.to_string()).ok())
            .unwrap_or(ServerName::from(ip))
    }
}

/// Builds the rustls client config of an upstream.
pub fn client_config(t: &UpstreamTls) -> Result<TlsClient, ClientConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = if t.verify {
        let v = WebPkiServerVerifier::builder_with_provider(t.store.clone(), provider.clone())
            .build()?;
        builder.with_webpki_verifier(v)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(
                provider.signature_verification_algorithms,
            )))
    };
    let mut cc = match &t.client_certificate {
        Some(c) => builder.with_client_cert_resolver(Arc::new(
            rustls::sign::SingleCertAndKey::from(c.certified.clone()),
        )),
        None => builder.with_no_client_auth(),
    };
    cc.alpn_protocols = t.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    cc.resumption = Resumption::disabled();
    // The record layer (src/tls/record) continues a session from its extracted secrets.
    cc.enable_secret_extraction = true;
    let keylog = Arc::new(KeyLogCapture::new());
    cc.key_log = keylog.clone();
    Ok(TlsClient {
        config: Arc::new(cc),
        keylog,
        server_name: t
            .server_name
            .as_ref()
            .and_then(|n| ServerName::try_from(n.clone()).ok()),
    })
}

/// `verify: false`: any certificate is accepted. The handshake signature is still checked
/// (it proves the server holds the key of the certificate it sent, which without a verified
/// chain proves nothing about who it is: the warning at load says so).
#[derive(Debug)]
struct Unverified(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
