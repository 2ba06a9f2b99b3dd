//! Choosing a certificate by SNI: an exact name first, then a `*.` wildcard covering exactly
//! one label (RFC 6125: `*.example.com` matches `a.example.com`, not `example.com` nor
//! `a.b.example.com`), else the listener's first certificate. Names come from each
//! certificate's subjectAltName; when two certificates claim a name the one listed first wins.

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::Arc;

/// Names are few and chosen by the operator: a std map is plenty.
type Map<V> = HashMap<String, V>;

/// The certificates of one listener, by name.
#[derive(Debug)]
pub struct SniResolver {
    exact: Map<Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: Map<Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// Builds the table; `certs` is (names, key) in the order of the config, the first the
    /// default. `None` when there is no certificate.
    pub fn new(certs: &[(Vec<String>, Arc<CertifiedKey>)]) -> Option<SniResolver> {
        let default = certs.first()?.1.clone();
        let (mut exact, mut wildcard) = (Map::new(), Map::new());
        for (names, key) in certs {
            for n in names {
                let n = n.to_ascii_lowercase();
                match n.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()),
                    None => exact.entry(n),
                }
                .or_insert_with(|| key.clone());
            }
        }
        Some(SniResolver {
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate for `sni` (already lower case, as rustls gives it).
    pub fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = sni.map(|n| n.trim_end_matches('.')) else {
            return &self.default;
        };
        if let Some(k) = self.exact.get(name) {
            return k;
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return k;
            }
        }
        &self.default
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).clone())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(tag: u8) -> Arc<CertifiedKey> {
        // Only the identity matters here; a one-byte "certificate" tells them apart.
        #[derive(Debug)]
        struct NoSign;
        impl rustls::sign::SigningKey for NoSign {
            fn choose_scheme(
                &self,
                _: &[rustls::SignatureScheme],
            ) -> Option<Box<dyn rustls::sign::Signer>> {
                None
            }
            fn algorithm(&self) -> rustls::SignatureAlgorithm {
                rustls::SignatureAlgorithm::ECDSA
            }
        }
        Arc::new(CertifiedKey::new(vec![vec![tag].into()], Arc::new(NoSign)))
    }

    fn tag(k: &Arc<CertifiedKey>) -> u8 {
        k.cert[0].as_ref()[0]
    }

    #[test]
    fn exact_then_one_label_wildcard_then_default() {
        let r = SniResolver::new(&[
            (vec!["a.test".into()], key(1)),
            (vec!["b.test".into(), "*.w.test".into()], key(2)),
            (vec!["x.w.test".into(), "b.test".into()], key(3)),
        ])
        .unwrap();
        assert_eq!(tag(r.pick(Some("a.test"))), 1);
        assert_eq!(
            tag(r.pick(Some("b.test"))),
            2,
            "the first listed wins a shared name"
        );
        assert_eq!(
            tag(r.pick(Some("b.test."))),
            2,
            "a trailing dot is the same name"
        );
        assert_eq!(tag(r.pick(Some("x.w.test"))), 3, "exact beats wildcard");
        assert_eq!(tag(r.pick(Some("y.w.test"))), 2);
        assert_eq!(
            tag(r.pick(Some("w.test"))),
            1,
            "a wildcard does not cover its parent"
        );
        assert_eq!(tag(r.pick(Some("z.y.w.test"))), 1, "nor two labels");
        assert_eq!(tag(r.pick(Some("other.test"))), 1);
        assert_eq!(tag(r.pick(None)), 1);
    }
}
