//! A listener's rustls `ServerConfig`: the ring provider, the versions from `min_version`
//! (cipher suites are rustls's safe defaults: AEAD only), ALPN, the SNI table, and the
//! settings the record layer needs later (secret extraction).

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

/// Builds the rustls config of a listener; `tickets` encrypts its session tickets (shared by
/// every listener of the process, and handed to the successor).
pub fn server_config(
    t: &ListenerTls,
    tickets: Option<Arc<dyn ProducesTickets>>,
) -> Result<Arc<ServerConfig>, ServerConfigError> {
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
    if let Some(t) = tickets {
        sc.ticketer = t;
    }
    Ok(Arc::new(sc))
}
