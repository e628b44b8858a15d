//! How connections to PostgreSQL are secured, from the URL's libpq-style
//! `sslmode` and `sslrootcert` parameters.
//!
//! | `sslmode` | payrail |
//! |---|---|
//! | absent, `disable` | no TLS |
//! | `prefer` | TLS if the server offers it, verified; plain otherwise |
//! | `require`, `verify-ca`, `verify-full` | TLS, verified, or no connection |
//!
//! Verified means the certificate chains to `sslrootcert` (a PEM file; the
//! public web roots when absent or `system`) and names the host. libpq's
//! `require` and `prefer` do not verify, and so accept any server that sits
//! in between; a ledger's connection does not get that choice. `sslrootcert`
//! alone means `verify-full`.

use std::path::Path;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::conn::{DbError, DbErrorKind};

/// The URL the driver is given, and the TLS it connects with (`None`: none).
pub(crate) struct Secured {
    pub url: String,
    pub tls: Option<MakeRustlsConnect>,
}

fn bad(why: String) -> DbError {
    DbError::new(
        DbErrorKind::Unavailable,
        format!("bad PostgreSQL URL: {why}"),
    )
}

/// Where the URL's parameters begin, found as the driver finds them: the
/// credentials run to the first '@' (a password may hold a '?').
fn query_start(url: &str) -> Option<usize> {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let after_credentials = url[after_scheme..]
        .find('@')
        .map_or(after_scheme, |i| after_scheme + i + 1);
    url[after_credentials..]
        .find('?')
        .map(|i| after_credentials + i)
}

/// Takes `sslmode` and `sslrootcert` out of the URL (the driver knows
/// neither `verify-*` nor `sslrootcert`) and builds the connector.
pub(crate) fn secure(url: &str) -> Result<Secured, DbError> {
    let (base, query) = match query_start(url) {
        Some(i) => (&url[..i], &url[i + 1..]),
        None => (url, ""),
    };
    let mut kept = Vec::new();
    let (mut mode, mut root) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || {
            percent_decode_str(value)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| bad(format!("{key} is not UTF-8")))
        };
        match key {
            "sslmode" => mode = Some(value()?),
            "sslrootcert" => root = Some(value()?),
            _ => kept.push(pair),
        }
    }
    let verified = match (mode.as_deref(), &root) {
        (None, None) | (Some("disable"), _) => None,
        (Some("prefer"), _) => Some("prefer"),
        (None, Some(_)) | (Some("require" | "verify-ca" | "verify-full"), _) => Some("require"),
        (Some(other), _) => {
            return Err(bad(format!(
                "sslmode '{other}' is not one of disable, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    let Some(driver_mode) = verified else {
        if mode.is_none() {
            // As given: the driver's own default (prefer) finds no TLS to use.
            return Ok(Secured {
                url: url.to_string(),
                tls: None,
            });
        }
        kept.push("sslmode=disable");
        return Ok(Secured {
            url: format!("{base}?{}", kept.join("&")),
            tls: None,
        });
    };
    kept.push(match driver_mode {
        "prefer" => "sslmode=prefer",
        _ => "sslmode=require",
    });
    let roots = match root.as_deref() {
        None | Some("system") => {
            RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
        }
        Some(path) => roots_from(Path::new(path))?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS set-up: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // PostgreSQL 17 takes direct TLS (`sslnegotiation=direct`) only with it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(Secured {
        url: format!("{base}?{}", kept.join("&")),
        tls: Some(MakeRustlsConnect::new(config)),
    })
}

fn roots_from(path: &Path) -> Result<RootCertStore, DbError> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(format!("sslrootcert {shown}: {e}")))?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad(format!(
            "sslrootcert {shown} holds no usable certificate"
        )));
    }
    Ok(roots)
}

/// The hosts a connection may reach over the network without TLS: what the
/// start-up warns about. `prefer` counts, since anyone in between can answer
/// "no TLS" for the server. Loopback and Unix sockets are left out.
pub(crate) fn plain_remote_hosts(url: &str) -> Vec<String> {
    use std::str::FromStr;
    let Ok(secured) = secure(url) else {
        return Vec::new();
    };
    let Ok(cfg) = postgres::Config::from_str(&secured.url) else {
        return Vec::new();
    };
    if secured.tls.is_some() && cfg.get_ssl_mode() != postgres::config::SslMode::Prefer {
        return Vec::new();
    }
    let names = cfg.get_hosts().iter().filter_map(|h| match h {
        postgres::config::Host::Tcp(name) => Some(name.clone()),
        _ => None,
    });
    let addresses = cfg.get_hostaddrs().iter().map(|ip| ip.to_string());
    names
        .chain(addresses)
        .filter(|name| {
            let name = name.trim_start_matches('[').trim_end_matches(']');
            name != "localhost"
                && !name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn modes_map_to_what_the_driver_knows() {
        let plain = secure("postgres://u@h/d").unwrap();
        assert!(plain.tls.is_none());
        assert_eq!(plain.url, "postgres://u@h/d");
        let off = secure("postgres://u@h/d?sslmode=disable&connect_timeout=3").unwrap();
        assert!(off.tls.is_none());
        assert_eq!(
            off.url,
            "postgres://u@h/d?connect_timeout=3&sslmode=disable"
        );
        // Off wins, and the driver never sees what it does not know.
        let off = secure("postgres://u@h/d?sslrootcert=/x.pem&sslmode=disable").unwrap();
        assert!(off.tls.is_none());
        assert_eq!(off.url, "postgres://u@h/d?sslmode=disable");
        // A '?' in the password is not where the parameters begin.
        let s = secure("postgres://u:a?b@h/d?sslmode=require").unwrap();
        assert!(s.tls.is_some());
        assert_eq!(s.url, "postgres://u:a?b@h/d?sslmode=require");
        let s = secure("postgres://u:a?sslmode=require@h/d").unwrap();
        assert!(s.tls.is_none());
        assert_eq!(s.url, "postgres://u:a?sslmode=require@h/d");
        for mode in ["require", "verify-ca", "verify-full"] {
            let s = secure(&format!("postgres://u@h/d?sslmode={mode}&user=x")).unwrap();
            assert!(s.tls.is_some(), "{mode}");
            assert_eq!(s.url, "postgres://u@h/d?user=x&sslmode=require", "{mode}");
        }
        let prefer = secure("postgres://u@h/d?sslmode=prefer").unwrap();
        assert!(prefer.tls.is_some());
        assert_eq!(prefer.url, "postgres://u@h/d?sslmode=prefer");
        // A root certificate alone asks for verification.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, TEST_CA).unwrap();
        let s = secure(&format!("postgres://u@h/d?sslrootcert={}", ca.display())).unwrap();
        assert!(s.tls.is_some());
        assert_eq!(s.url, "postgres://u@h/d?sslmode=require");
        // Kept parameters keep their exact text (a '+' is not a space).
        let s = secure("postgres://u@h/d?password=a+b%40c&sslmode=require").unwrap();
        assert_eq!(s.url, "postgres://u@h/d?password=a+b%40c&sslmode=require");
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let e = secure("postgres://u@h/d?sslmode=allow").err().unwrap();
        assert!(e.detail.contains("sslmode 'allow'"), "{e}");
        let e = secure("postgres://u@h/d?sslmode=require&sslrootcert=/no/such/ca.pem")
            .err()
            .unwrap();
        assert!(e.detail.contains("/no/such/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = secure(&format!(
            "postgres://u@h/d?sslmode=verify-full&sslrootcert={}",
            empty.display()
        ))
        .err()
        .unwrap();
        assert!(e.detail.contains("no usable certificate"), "{e}");
    }

    #[test]
    fn only_plain_connections_to_other_machines_are_flagged() {
        assert_eq!(
            plain_remote_hosts("postgres://u@db.internal:5432/d"),
            ["db.internal"]
        );
        assert!(plain_remote_hosts("postgres://u@127.0.0.1/d").is_empty());
        assert!(plain_remote_hosts("postgres://u@localhost/d").is_empty());
        assert!(plain_remote_hosts("postgres://u@[::1]/d").is_empty());
        assert!(plain_remote_hosts("postgres://u@db.internal/d?sslmode=require").is_empty());
        // prefer can be talked out of TLS by anyone in between.
        assert_eq!(
            plain_remote_hosts("postgres://u@db.internal/d?sslmode=prefer"),
            ["db.internal"]
        );
        assert_eq!(
            plain_remote_hosts("postgres://u@localhost/d?hostaddr=10.0.0.5"),
            ["10.0.0.5"]
        );
        assert!(plain_remote_hosts("postgres://u@%2Frun%2Fpostgresql/d").is_empty());
    }

    fn param() -> impl Strategy<Value = String> {
        // Keys and values with the URL's own delimiters percent-encoded,
        // as a client writes them; '+' and '%XX' must survive as sent.
        ("[a-z_]{1,12}", "([a-zA-Z0-9+._-]|%2[0-9A-F]|%40|%3F){0,10}")
            .prop_filter("not a TLS key", |(k, _)| {
                k != "sslmode" && k != "sslrootcert"
            })
            .prop_map(|(k, v)| format!("{k}={v}"))
    }

    proptest! {
        /// Whatever the URL, `secure` and the start-up's warning answer
        /// without panicking: any text, and URLs that reach the driver's
        /// own parser with odd hosts, ports and parameters.
        #[test]
        fn any_url_is_answered(
            url in prop_oneof![
                "\\PC{0,80}",
                "postgres(ql)?://([a-z:?@]{0,8}@)?[a-z0-9.:\\[\\]%/,-]{0,24}(/[a-z]{0,6})?(\\?[a-z_=&%?@.-]{0,30})?",
            ],
        ) {
            let _ = secure(&url);
            let _ = plain_remote_hosts(&url);
        }

        /// Wherever the TLS settings stand among other parameters, and
        /// whatever the password holds ('?', '&', even "sslmode=disable"),
        /// the other parameters reach the driver as sent and in order,
        /// the driver sees exactly one sslmode it knows and never
        /// sslrootcert, and a verified mode always gets TLS.
        #[test]
        fn tls_settings_are_taken_out_and_the_rest_kept(
            password in "[a-z?&=]{0,6}(sslmode=disable)?",
            before in proptest::collection::vec(param(), 0..4),
            after in proptest::collection::vec(param(), 0..4),
            mode in proptest::option::of(prop_oneof![
                Just("disable"), Just("prefer"), Just("require"), Just("verify-ca"), Just("verify-full"),
            ]),
            system_root in any::<bool>(),
        ) {
            let base = format!("postgres://u:{password}@db.example/d");
            let mut params = before.clone();
            if let Some(mode) = mode {
                params.push(format!("sslmode={mode}"));
            }
            if system_root {
                params.push("sslrootcert=system".into());
            }
            params.extend(after.iter().cloned());
            let url = if params.is_empty() { base.clone() } else { format!("{base}?{}", params.join("&")) };

            let secured = secure(&url).map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
            let wants_tls = match mode {
                Some("disable") => false,
                Some(_) => true,
                None => system_root,
            };
            prop_assert_eq!(secured.tls.is_some(), wants_tls, "{}", url);
            let kept: Vec<String> = before.iter().chain(&after).cloned().collect();
            let driver_mode = match (mode, wants_tls) {
                (None, false) => None,
                (Some("prefer"), _) => Some("sslmode=prefer"),
                (_, true) => Some("sslmode=require"),
                (Some(_), false) => Some("sslmode=disable"),
            };
            let expected = match driver_mode {
                None => url.clone(),
                Some(m) => {
                    let mut all = kept.clone();
                    all.push(m.to_string());
                    format!("{base}?{}", all.join("&"))
                }
            };
            prop_assert_eq!(&secured.url, &expected);
            let query = secured.url.split_once("@db.example/d").map_or("", |(_, q)| q);
            prop_assert!(
                !query.trim_start_matches('?').split('&').any(|p| p.starts_with("sslrootcert=")),
                "{}",
                secured.url
            );
        }
    }

    /// A self-signed CA certificate (its key is not kept), only for parsing.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBlDCCATmgAwIBAgIUbzFKJsOGF4bRPs3OF8L1N0giOkswCgYIKoZIzj0EAwIw
HzEdMBsGA1UEAwwUcGF5cmFpbCB1bml0LXRlc3QgQ0EwHhcNMjYxMTIyMTMyODIx
WhcNMzYxMTE5MTMyODIxWjAfMR0wGwYDVQQDDBRwYXlyYWlsIHVuaXQtdGVzdCBD
QTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMvvrUeqD5b869DzLZXTi+lR/Uge
wIq1FJuUqP5Vt8T3SJ1MM0x+YKTat9Xwm/ZDxNP+auyRRAMsybfu6VKJqcyjUzBR
MB0GA1UdDgQWBBRoCGc2+8R+1DvU+l/FV004/SYZQTAfBgNVHSMEGDAWgBRoCGc2
+8R+1DvU+l/FV004/SYZQTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kA
MEYCIQDbok36hSmFB42WB/0iOUOqP/g5fFlHWs8rIM5bsnQvOAIhANm+q4gzSJYd
JcjdUJfuBJeBw2DT8CKG2Ba+AMz1N6NL
-----END CERTIFICATE-----
";
}
