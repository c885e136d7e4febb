//! Mutual TLS by pinned certificates. Each host has its own key pair and is given the
//! one certificate its peer must present; there is no CA and no name checking, the pin
//! is the trust. A peer presenting any other certificate is refused in the handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

/// The one ALPN protocol both ends speak; a change of wire protocol bumps it too.
pub const ALPN: &[u8] = b"tandem-replication/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // The cause is in the message and not a `source`: whoever prints the chain would
    // otherwise show it twice.
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("cannot write {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error("{path} holds no {what} (expected PEM, as `tandem keygen` writes)")]
    Missing { path: String, what: &'static str },
    #[error("cannot generate a key pair: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// This host's certificate and private key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

/// The file `tandem keygen` writes the key pair into (key and certificate, mode 0600).
pub const KEY_FILE: &str = "key.pem";
/// The file it writes the certificate alone into, to give to the peer.
pub const CERT_FILE: &str = "cert.pem";

/// Generates a key pair with a self-signed certificate into `dir`, and returns the
/// certificate's fingerprint.
pub fn keygen(dir: &Path) -> Result<String, TlsError> {
    let write_err = |path: &Path| {
        let path = path.display().to_string();
        move |error| TlsError::Write { path, error }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let made = rcgen::generate_simple_self_signed(vec!["tandem".to_string()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert_pem = made.cert.pem();
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    write_private(&key_path, format!("{}{}", made.signing_key.serialize_pem(), cert_pem).as_bytes())
        .map_err(write_err(&key_path))?;
    std::fs::write(&cert_path, &cert_pem).map_err(write_err(&cert_path))?;
    Ok(fingerprint(made.cert.der()))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A throwaway identity held only in memory, for benchmarks and tests.
pub fn ephemeral() -> Result<Identity, TlsError> {
    let made = rcgen::generate_simple_self_signed(vec!["tandem".to_string()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(made.signing_key.serialize_pem().as_bytes())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok(Identity { cert: made.cert.der().clone(), key })
}

/// SHA-256 of a certificate, as `SHA256:` and colon-separated hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let hex: Vec<String> = Sha256::digest(cert.as_ref()).iter().map(|b| format!("{b:02X}")).collect();
    format!("SHA256:{}", hex.join(":"))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read { path: path.display().to_string(), error })
}

/// Loads this host's identity from a key file written by [`keygen`].
pub fn load_identity(key_file: &Path) -> Result<Identity, TlsError> {
    let pem = read(key_file)?;
    let missing = |what| TlsError::Missing { path: key_file.display().to_string(), what };
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| missing("private key"))?;
    let cert = CertificateDer::from_pem_slice(&pem).map_err(|_| missing("certificate"))?;
    Ok(Identity { cert, key })
}

/// Loads the certificate the peer must present.
pub fn load_peer_cert(cert_file: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let pem = read(cert_file)?;
    CertificateDer::from_pem_slice(&pem)
        .map_err(|_| TlsError::Missing { path: cert_file.display().to_string(), what: "certificate" })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS for the side that connects (the primary): presents `own`, accepts only `peer`.
pub fn client_config(own: Identity, peer: CertificateDer<'static>) -> Result<rustls::ClientConfig, TlsError> {
    client(own, vec![peer], ALPN)
}

/// TLS for the side that listens (the standby): presents `own`, requires `peer`.
pub fn server_config(own: Identity, peer: CertificateDer<'static>) -> Result<rustls::ServerConfig, TlsError> {
    server(own, vec![peer], ALPN)
}

/// TLS for a host that asks the witness: presents `own`, accepts only the witness's
/// certificate. A separate ALPN keeps a replication peer and a witness from taking
/// each other for what they are not.
pub fn witness_client_config(own: Identity, witness: CertificateDer<'static>) -> Result<rustls::ClientConfig, TlsError> {
    client(own, vec![witness], WITNESS_ALPN)
}

/// TLS for the witness: presents `own`, requires one of the cluster's `hosts`.
pub fn witness_server_config(own: Identity, hosts: Vec<CertificateDer<'static>>) -> Result<rustls::ServerConfig, TlsError> {
    server(own, hosts, WITNESS_ALPN)
}

/// The witness's ALPN protocol.
pub const WITNESS_ALPN: &[u8] = b"tandem-witness/1";

fn client(own: Identity, peers: Vec<CertificateDer<'static>>, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { peers, provider }))
        .with_client_auth_cert(vec![own.cert], own.key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

fn server(own: Identity, peers: Vec<CertificateDer<'static>>, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(Pinned { peers, provider }))
        .with_single_cert(vec![own.cert], own.key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Accepts only the pinned certificates, and checks the handshake was signed by the
/// key of the one presented.
#[derive(Debug)]
struct Pinned {
    peers: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.peers.iter().any(|p| p.as_ref() == presented.as_ref()) {
            return Ok(());
        }
        let pinned: Vec<String> = self.peers.iter().map(|p| fingerprint(p)).collect();
        Err(rustls::Error::General(format!(
            "the peer presented certificate {}, not the pinned {}",
            fingerprint(presented),
            pinned.join(" or ")
        )))
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
