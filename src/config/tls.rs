//! `listeners.X.tls`: certificates (read, parsed and checked here, so `check`, `run` and a
//! successor at an upgrade refuse the same broken files with the same message), ALPN,
//! the minimum version and the handshake timeout.
//!
//! Checks per certificate entry: both files readable, the cert file holds at least one PEM
//! `CERTIFICATE`, the key file a private key rustls can sign with (RSA, ECDSA P-256/P-384,
//! Ed25519), the key matches the leaf's public key. Expired and not-yet-valid certificates
//! load (the operator may be replacing them) with a warning ([`super::Config::warnings`]).

use super::errors::Errors;
use super::file::{self, S};
use super::validate::resolve;
use super::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::sync::Arc;

/// The lowest TLS version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the default).
    V12,
    /// TLS 1.3 only.
    V13,
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::V12 => "1.2",
            TlsVersion::V13 => "1.3",
        })
    }
}

/// TLS termination settings of a listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    /// The certificates; the first is served when no other one's names match the SNI.
    pub certificates: Vec<Certificate>,
    /// ALPN protocols offered, in order of preference (empty: no ALPN).
    pub alpn: Vec<String>,
    /// The lowest version accepted.
    pub min_version: TlsVersion,
    /// Time from accept to a completed handshake; the connection is closed after it.
    pub handshake_timeout: Duration,
}

/// Default of `tls.handshake_timeout`: the same as `http.header_read_timeout`'s, a slow
/// client's budget for its first flight.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One certificate with its key, loaded and checked.
#[derive(Clone)]
pub struct Certificate {
    /// The certificate (chain) file.
    pub cert: PathBuf,
    /// The key file.
    pub key: PathBuf,
    /// DNS names of the leaf's subjectAltName, lower case (`*.example.com` kept as written).
    pub names: Vec<String>,
    /// Validity of the leaf, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of the leaf's validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// The chain and the signing key, ready for rustls.
    pub certified: Arc<CertifiedKey>,
    /// `file:line:col: listeners.X.tls.certificates[i]`, for warnings.
    pub origin: String,
}

impl fmt::Debug for Certificate {
    // The key stays out of Debug (it is behind rustls's signing key type, but say so here).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Certificate {
    fn eq(&self, o: &Self) -> bool {
        self.cert == o.cert && self.key == o.key && self.certified.cert == o.certified.cert
    }
}

impl Certificate {
    /// Warnings about its validity at `now` (seconds since the epoch).
    pub fn warnings(&self, now: i64) -> Vec<String> {
        let mut w = Vec::new();
        if self.not_after < now {
            w.push(format!(
                "{}: warning: certificate {} expired at {} (clients will refuse it)",
                self.origin,
                self.cert.display(),
                time_text(self.not_after)
            ));
        }
        if self.not_before > now {
            w.push(format!(
                "{}: warning: certificate {} is not valid before {} (clients will refuse it until then)",
                self.origin,
                self.cert.display(),
                time_text(self.not_before)
            ));
        }
        w
    }
}

/// `2026-12-01T10:00:00Z`.
fn time_text(secs: i64) -> String {
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| secs.to_string())
}

/// Validates `listeners.NAME.tls`.
pub(super) fn listener_tls(
    errs: &mut Errors,
    p: &str,
    dir: &Path,
    protocol: Protocol,
    raw: &S<file::ListenerTls>,
) -> Option<ListenerTls> {
    let tp = format!("{p}.tls");
    let t = &raw.value;
    if t.certificates.value.is_empty() {
        errs.at(
            &t.certificates,
            &format!("{tp}.certificates"),
            "empty list: at least one certificate is needed",
        );
    }
    let mut certificates = Vec::new();
    for (i, c) in t.certificates.value.iter().enumerate() {
        let cp = format!("{tp}.certificates[{i}]");
        if let Some(cert) = load(errs, &cp, dir, c) {
            certificates.push(cert);
        }
    }
    let alpn = match &t.alpn {
        None => match protocol {
            Protocol::Http => vec!["http/1.1".to_string()],
            Protocol::Tcp => Vec::new(),
        },
        Some(list) => {
            let mut out = Vec::new();
            for (i, a) in list.iter().enumerate() {
                let ap = format!("{tp}.alpn[{i}]");
                match (protocol, a.value.as_str()) {
                    (_, "") => errs.at(a, &ap, "empty protocol name"),
                    (_, v) if v.len() > 255 => errs.at(a, &ap, "longer than 255 bytes"),
                    (Protocol::Http, "http/1.1" | "h2") if out.contains(&a.value) => {
                        errs.at(a, &ap, format!("{:?} is listed twice", a.value))
                    }
                    (Protocol::Http, "http/1.1" | "h2") => out.push(a.value.clone()),
                    (Protocol::Http, v) => errs.at(
                        a,
                        &ap,
                        format!(
                            "unknown value {v:?} for an http listener (expected: h2, http/1.1)"
                        ),
                    ),
                    // A tcp listener only terminates TLS: any protocol the backend speaks.
                    (Protocol::Tcp, v) => out.push(v.to_string()),
                }
            }
            out
        }
    };
    let min_version = errs.choice(
        &t.min_version,
        &format!("{tp}.min_version"),
        &[("1.2", TlsVersion::V12), ("1.3", TlsVersion::V13)],
        TlsVersion::V12,
    );
    let handshake_timeout = errs.nonzero_duration(
        &t.handshake_timeout,
        &format!("{tp}.handshake_timeout"),
        DEFAULT_HANDSHAKE_TIMEOUT,
        "every handshake would time out",
    );
    (certificates.len() == t.certificates.value.len() && !certificates.is_empty()).then_some(
        ListenerTls {
            certificates,
            alpn,
            min_version,
            handshake_timeout,
        },
    )
}

/// Reads and checks one certificate entry; `None` after reporting why.
pub(super) fn load(
    errs: &mut Errors,
    cp: &str,
    dir: &Path,
    c: &S<file::CertEntry>,
) -> Option<Certificate> {
    let e = &c.value;
    let cert_path = resolve(dir, &e.cert.value);
    let key_path = resolve(dir, &e.key.value);
    let mut fail = |at: &S<String>, key: &str, msg: String| {
        errs.at(at, &format!("{cp}.{key}"), msg);
        None
    };
    let cert_pem = match std::fs::read(&cert_path) {
        Ok(b) => b,
        Err(err) => {
            return fail(
                &e.cert,
                "cert",
                format!("cannot read {}: {err}", cert_path.display()),
            )
        }
    };
    let key_pem = match std::fs::read(&key_path) {
        Ok(b) => b,
        Err(err) => {
            return fail(
                &e.key,
                "key",
                format!("cannot read {}: {err}", key_path.display()),
            )
        }
    };
    let chain: Result<Vec<CertificateDer<'static>>, _> =
        CertificateDer::pem_slice_iter(&cert_pem).collect();
    let chain = match chain {
        Ok(c) if c.is_empty() => {
            return fail(
                &e.cert,
                "cert",
                format!("{}: no PEM CERTIFICATE in it", cert_path.display()),
            )
        }
        Ok(c) => c,
        Err(err) => {
            return fail(
                &e.cert,
                "cert",
                format!("{}: bad PEM: {err}", cert_path.display()),
            )
        }
    };
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return fail(
                &e.key,
                "key",
                format!(
                    "{}: no PEM private key in it (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
                    key_path.display()
                ),
            )
        }
        Err(err) => {
            return fail(
                &e.key,
                "key",
                format!("{}: bad PEM: {err}", key_path.display()),
            )
        }
    };
    let signer = match rustls::crypto::ring::sign::any_supported_type(&key) {
        Ok(s) => s,
        Err(err) => {
            return fail(
                &e.key,
                "key",
                format!("{}: unusable private key: {err}", key_path.display()),
            )
        }
    };
    let (names, not_before, not_after) = match leaf_facts(&chain[0]) {
        Ok(f) => f,
        Err(err) => {
            return fail(
                &e.cert,
                "cert",
                format!("{}: bad certificate: {err}", cert_path.display()),
            )
        }
    };
    let certified = CertifiedKey::new(chain, signer);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return fail(
                &e.key,
                "key",
                format!(
                    "{} does not match the certificate in {}",
                    key_path.display(),
                    cert_path.display()
                ),
            )
        }
        // The key type cannot tell its public key: nothing to compare, rustls still signs.
        Err(_) => {}
    }
    let loc = c.referenced;
    Some(Certificate {
        cert: cert_path,
        key: key_path,
        names,
        not_before,
        not_after,
        certified: Arc::new(certified),
        origin: format!(
            "{}:{}:{}: {cp}",
            errs.file.display(),
            loc.line(),
            loc.column()
        ),
    })
}

/// The leaf's DNS subjectAltNames (lower case) and validity.
fn leaf_facts(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64, i64), String> {
    let (_, x) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    let v = x.validity();
    Ok((names, v.not_before.timestamp(), v.not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn times_print_as_dates() {
        assert_eq!(time_text(0), "Jan  1 00:00:00 1970 +00:00");
    }
}
