//! A listener's rustls `ServerConfig`: the ring provider, the versions from `min_version`
//! (cipher suites are rustls's safe defaults: AEAD only), ALPN, the SNI table, and the
//! settings the record layer needs later (secret extraction).

use super::record::KeyLogCapture;
use super::sni::SniResolver;
use crate::config::{ListenerTls, TlsVersion};
use rustls::server::ProducesTickets;
use rustls::ServerConfig;
use std::sync::Arc;

/// Why a listener's TLS settings could not be turned into a rustls config.
#[derive(Debug, thiserror::Error)]
pub enum ServerConfigError {
    /// rustls refused the versions (cannot happen with the ring provider's suites).
    #[error("tls settings refused by rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// No certificate (validation refuses this already).
    #[error("no certificate")]
    NoCertificate,
}

/// A listener's TLS: its rustls config and the key log that captures each connection's
/// traffic secrets for the record layer.
#[derive(Debug, Clone)]
pub struct TlsServer {
    /// The rustls config (its `key_log` is `keylog`).
    pub config: Arc<ServerConfig>,
    /// Traffic secrets by client random, taken when a session leaves rustls.
    pub keylog: Arc<KeyLogCapture>,
}

/// Builds the rustls config of a listener; `tickets` encrypts its session tickets (shared by
/// every listener of the process, and handed to the successor).
pub fn server_config(
    t: &ListenerTls,
    tickets: Option<Arc<dyn ProducesTickets>>,
) -> Result<TlsServer, ServerConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] = match t.min_version {
        TlsVersion::V12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V13 => &[&rustls::version::TLS13],
    };
    let certs: Vec<_> = t
        .certificates
        .iter()
        .map(|c| (c.names.clone(), c.certified.clone()))
        .collect();
    let resolver = SniResolver::new(&certs).ok_or(ServerConfigError::NoCertificate)?;
    let mut sc = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    sc.alpn_protocols = t.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    // The record layer (src/tls/record) continues a session from its extracted secrets.
    sc.enable_secret_extraction = true;
    let keylog = Arc::new(KeyLogCapture::new());
    sc.key_log = keylog.clone();
    if let Some(t) = tickets {
        sc.ticketer = t;
    }
    Ok(TlsServer {
        config: Arc::new(sc),
        keylog,
    })
}
