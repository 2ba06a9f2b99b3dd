//! `upstreams.X.tls`: TLS from baton to an upstream's servers (TLS origination). The trusted
//! roots (the system's store by default, or a `ca` PEM file), the name sent as SNI and
//! verified, an optional client certificate, ALPN, and `verify: false`, the escape hatch.
//!
//! Files are read and checked here, as for `listeners.X.tls`, so `check`, `run` and a
//! successor refuse the same broken file with the same `file:line:col: key: why` message.

use super::errors::Errors;
use super::file::{self, S};
use super::tls::load;
use super::validate::resolve;
use super::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;

/// Where an upstream's trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustRoots {
    /// The system's store (`SSL_CERT_FILE` / `SSL_CERT_DIR` if set, else the distribution's
    /// bundle, e.g. `/etc/ssl/certs/ca-certificates.crt` on Debian), read at load.
    System,
    /// The CAs of a PEM file (`ca:`).
    File(PathBuf),
    /// None: `verify: false`, the server's certificate is not checked.
    Unverified,
}

/// TLS to the servers of an upstream.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Where the roots come from.
    pub roots: TrustRoots,
    /// The roots themselves (empty with `verify: false`).
    pub store: Arc<rustls::RootCertStore>,
    /// The name sent as SNI and verified; `None`: each server's host name, or its IP address
    /// (verified against the certificate's IP subjectAltNames, and no SNI sent).
    pub server_name: Option<String>,
    /// The certificate presented when a server asks for one.
    pub client_certificate: Option<Certificate>,
    /// Whether the server's certificate is verified (`verify: false` turns it off).
    pub verify: bool,
    /// ALPN protocols offered (empty: no ALPN extension).
    pub alpn: Vec<String>,
    /// `file:line:col: upstreams.X.tls`, for warnings.
    pub origin: String,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("roots", &self.roots)
            .field("trust_anchors", &self.store.len())
            .field("server_name", &self.server_name)
            .field("client_certificate", &self.client_certificate)
            .field("verify", &self.verify)
            .field("alpn", &self.alpn)
            .finish()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, o: &Self) -> bool {
        self.roots == o.roots
            && self.store.roots == o.store.roots
            && self.server_name == o.server_name
            && self.client_certificate == o.client_certificate
            && self.verify == o.verify
            && self.alpn == o.alpn
    }
}

impl UpstreamTls {
    /// Warnings about settings that load: verification off, a client certificate expired or
    /// not yet valid.
    pub fn warnings(&self, now: i64) -> Vec<String> {
        let mut w = Vec::new();
        if !self.verify {
            w.push(format!(
                "{}.verify: warning: server certificates are NOT verified: baton talks TLS to whoever answers at these addresses, and anyone on the path can read and change this traffic (use ca: instead)",
                self.origin
            ));
        }
        if let Some(c) = &self.client_certificate {
            w.extend(c.warnings(now));
        }
        w
    }
}

/// Validates `upstreams.NAME.tls`; `h2c` says the upstream speaks h2c (refused with TLS).
pub(super) fn upstream_tls(
    errs: &mut Errors,
    p: &str,
    dir: &Path,
    raw: &S<file::UpstreamTls>,
    h2c: bool,
) -> Option<UpstreamTls> {
    let tp = format!("{p}.tls");
    let before = errs.list.len();
    let t = &raw.value;
    if h2c {
        errs.at(
            raw,
            &tp,
            "an h2c upstream cannot use tls: h2c is cleartext HTTP/2, and HTTP/2 over TLS to upstreams is not built (use http.protocol: http1 with tls)",
        );
    }
    let verify = t.verify.as_ref().is_none_or(|v| v.value);
    let (roots, store) = match (&t.ca, verify) {
        (Some(ca), false) => {
            errs.at(
                ca,
                &format!("{tp}.ca"),
                "has no use with verify: false (nothing is verified)",
            );
            (TrustRoots::Unverified, rustls::RootCertStore::empty())
        }
        (None, false) => (TrustRoots::Unverified, rustls::RootCertStore::empty()),
        (Some(ca), true) => {
            let path = resolve(dir, &ca.value);
            let store = ca_file(errs, &format!("{tp}.ca"), ca, &path);
            (TrustRoots::File(path), store)
        }
        (None, true) => (TrustRoots::System, system_roots(errs, &tp, raw)),
    };
    let server_name = t.server_name.as_ref().and_then(|n| {
        let name = n.value.trim_end_matches('.').to_ascii_lowercase();
        match ServerName::try_from(name.as_str()) {
            Ok(_) => Some(name),
            Err(_) => {
                errs.at(
                    n,
                    &format!("{tp}.server_name"),
                    format!("{:?} is not a DNS name or an IP address", n.value),
                );
                None
            }
        }
    });
    let client_certificate = t
        .client_certificate
        .as_ref()
        .and_then(|c| load(errs, &format!("{tp}.client_certificate"), dir, c));
    let mut alpn = Vec::new();
    for (i, a) in t.alpn.iter().flatten().enumerate() {
        let ap = format!("{tp}.alpn[{i}]");
        match a.value.len() {
            0 => errs.at(a, &ap, "empty protocol name"),
            n if n > 255 => errs.at(a, &ap, "longer than 255 bytes"),
            _ => alpn.push(a.value.clone()),
        }
    }
    let loc = raw.referenced;
    (errs.list.len() == before).then(|| UpstreamTls {
        roots,
        store: Arc::new(store),
        server_name,
        client_certificate,
        verify,
        alpn,
        origin: format!(
            "{}:{}:{}: {tp}",
            errs.file.display(),
            loc.line(),
            loc.column()
        ),
    })
}

/// The CAs of `path` (`ca:`): every PEM certificate in it, each usable as a trust anchor.
fn ca_file(errs: &mut Errors, key: &str, at: &S<String>, path: &Path) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    let pem = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            errs.at(at, key, format!("cannot read {}: {e}", path.display()));
            return store;
        }
    };
    let certs: Result<Vec<CertificateDer<'static>>, _> =
        CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(c) if c.is_empty() => errs.at(
            at,
            key,
            format!("{}: no PEM CERTIFICATE in it", path.display()),
        ),
        Ok(c) => {
            for (i, der) in c.into_iter().enumerate() {
                if let Err(e) = store.add(der) {
                    errs.at(
                        at,
                        key,
                        format!(
                            "{}: certificate {} cannot be a trust anchor: {e}",
                            path.display(),
                            i + 1
                        ),
                    );
                }
            }
        }
        Err(e) => errs.at(at, key, format!("{}: bad PEM: {e}", path.display())),
    }
    store
}

/// The system's roots (rustls-native-certs); an error if there are none.
fn system_roots(errs: &mut Errors, tp: &str, raw: &S<file::UpstreamTls>) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _ignored) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        errs.at(
            raw,
            tp,
            format!("no system root certificates found{why}: install the ca-certificates package, set SSL_CERT_FILE, or name a PEM file with ca:"),
        );
    }
    store
}
