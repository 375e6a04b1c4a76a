//! TLS with rustls (the `ring` provider): the server side `clawq serve` terminates TLS
//! with (`tls_cert`, `tls_key`), and the client side the connector reaches an `https`/
//! `wss` host and an `https` hook with (the webpki roots, plus an optional CA
//! certificate given with `--ca-cert`).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of the PEM file at `path` (at least one).
fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading the {what} {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("the {what} {} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        bail!(
            "the {what} {} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)",
            path.display()
        );
    }
    Ok(certs)
}

/// The server side: the certificate chain at `cert` (PEM, leaf first) and the private key
/// at `key` (PEM: PKCS#8, PKCS#1 or SEC1). Fails with a message naming the file when one
/// is missing, unreadable, or they do not belong together.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain = certificates(cert, "TLS certificate (tls_cert)")?;
    let private_key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "reading the TLS private key (tls_key) {}: expected a PEM private key",
            key.display()
        )
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .with_context(|| {
            format!(
                "the TLS key {} does not fit the certificate {}",
                key.display(),
                cert.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client side: the webpki roots, plus the certificates of the PEM file `ca_cert`
/// when given (e.g. a private CA, or a self-signed host certificate).
pub fn client_config(ca_cert: Option<&Path>) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_cert {
        for cert in certificates(path, "CA certificate (--ca-cert)")? {
            roots
                .add(cert)
                .with_context(|| format!("the CA certificate {} cannot be used", path.display()))?;
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether `error` (or what caused it) is a failure to verify the peer's certificate:
/// retrying cannot fix it until the certificate or the trusted roots change.
pub fn is_certificate_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(rustls::Error::InvalidCertificate(_)) = error.downcast_ref::<rustls::Error>() {
            return true;
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && is_certificate_error(inner)
        {
            return true;
        }
        cause = error.source();
    }
    false
}
