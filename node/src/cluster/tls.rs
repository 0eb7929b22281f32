//! Identity between peers: a cluster CA, node certificates issued by it, and
//! the rustls configs that make every peer connection mutually
//! authenticated. A node's identity *is* its certificate: a peer that cannot
//! present one issued by the cluster CA gets no connection at all.
//!
//! Files, as `ramster cert` writes them:
//!
//! ```text
//! DIR/ca.crt            the cluster CA certificate
//! DIR/ca.key            the CA's private key: only `cert create-node` needs
//!                       it; keep it off the nodes
//! DIR/NAME/ca.crt       copy of the CA certificate (what the node trusts)
//! DIR/NAME/node.crt     the node's certificate: SAN = NAME + every --host,
//!                       EKU = ServerAuth + ClientAuth
//! DIR/NAME/node.key     the node's private key
//! ```
//!
//! A node is pointed at `DIR/NAME` and never sees the CA key. Only the ring
//! crypto provider is used; [`install_default_provider`] makes it the
//! process default before anything else touches rustls.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// File names inside a certs dir.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const NODE_CERT_FILE: &str = "node.crt";
pub const NODE_KEY_FILE: &str = "node.key";

/// How long a new CA is valid.
pub const CA_VALIDITY_DAYS: u64 = 3650;
/// How long a new node certificate is valid.
pub const NODE_VALIDITY_DAYS: u64 = 825;
/// Backdating of `not_before`, so peers whose clocks lag a little accept a
/// certificate issued just now.
const CLOCK_SKEW_SECS: u64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists already; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    #[error("{0:?} is not a valid node name: it must be a DNS name (letters, digits, '-', '.')")]
    BadName(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Makes ring the process-wide rustls provider. Call first thing in `main`:
/// with one provider in the tree rustls would pick it anyway, but being
/// explicit keeps a second one pulled in by some future crate from silently
/// changing the crypto.
pub fn install_default_provider() {
    // An error only means a provider is installed already (tests call this
    // many times); the configs below name ring explicitly regardless.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The provider every config here is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Replaces `path` with `contents` in one rename, so that a reader sees the
/// old file or the new one, never half of one.
fn write_replacing(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, secret)?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Writes `contents` to a new file; `secret` files are readable by the owner
/// only, from the moment they exist.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = fs::OpenOptions::new();
    opts.write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            CertError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))
}

fn validity(params: &mut CertificateParams, days: u64) {
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(CLOCK_SKEW_SECS)).into();
    params.not_after = (now + Duration::from_secs(days * 86_400)).into();
}

/// Checks that `name` can be a node name: it is what peers verify the
/// node's certificate against, so it must be a DNS name.
pub fn check_node_name(name: &str) -> Result<ServerName<'static>, CertError> {
    match ServerName::try_from(name.to_string()) {
        Ok(n @ ServerName::DnsName(_)) => Ok(n),
        _ => Err(CertError::BadName(name.to_string())),
    }
}

/// Creates the cluster CA in `dir` (`ca.crt`, `ca.key`). Refuses to replace
/// an existing CA: every node certificate issued by it would stop working.
pub fn create_ca(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertError::Exists(p.clone()));
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    // A name of its own per CA: a certificate from another cluster's CA then
    // fails as "unknown issuer" rather than as a bad signature.
    params.distinguished_name.push(
        DnType::CommonName,
        format!("ramster cluster CA {:016x}", rand::random::<u64>()),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok(())
}

/// Issues a certificate for node `name` from the CA in `dir`, valid for the
/// name and every host in `hosts` (DNS names or IP addresses), for both ends
/// of a connection. Writes `dir/name/{ca.crt,node.crt,node.key}`; returns
/// that directory.
pub fn create_node(dir: &Path, name: &str, hosts: &[String]) -> Result<PathBuf, CertError> {
    create_node_from(dir, dir, name, hosts)
}

/// How a node certificate is issued.
#[derive(Debug, Clone, Default)]
pub struct NodeCertOptions {
    /// More DNS names or IP addresses besides the node's name.
    pub hosts: Vec<String>,
    /// Valid for this many days ([`NODE_VALIDITY_DAYS`] if `None`).
    pub days: Option<u64>,
    /// Replace the certificate and key already there (a renewal): each file
    /// is swapped in whole, the key first; a running node presents the new
    /// pair on SIGHUP or at its next check of the files.
    pub renew: bool,
}

/// [`create_node`] with the CA read from `ca_dir` and the node's directory
/// made in `out_dir`, so that the CA key can live apart from what nodes see.
pub fn create_node_from(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    hosts: &[String],
) -> Result<PathBuf, CertError> {
    issue_node(
        ca_dir,
        out_dir,
        name,
        &NodeCertOptions {
            hosts: hosts.to_vec(),
            ..Default::default()
        },
    )
}

/// [`create_node_from`] with every option.
pub fn issue_node(
    ca_dir: &Path,
    out_dir: &Path,
    name: &str,
    options: &NodeCertOptions,
) -> Result<PathBuf, CertError> {
    let hosts = &options.hosts;
    check_node_name(name)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| CertError::BadFile {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let ca_params =
        CertificateParams::from_ca_cert_pem(&ca_pem).map_err(|e| CertError::BadFile {
            path: ca_cert_path.clone(),
            reason: e.to_string(),
        })?;
    // rcgen signs with an issuer `Certificate`; re-signing the CA's own
    // parameters with its key yields the same subject and key identifier.
    let issuer = ca_params.self_signed(&ca_key)?;

    let mut sans = vec![SanType::DnsName(
        name.try_into()
            .map_err(|_| CertError::BadName(name.into()))?,
    )];
    for h in hosts {
        match h.parse::<IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => {
                check_node_name(h)?;
                sans.push(SanType::DnsName(
                    h.as_str()
                        .try_into()
                        .map_err(|_| CertError::BadName(h.clone()))?,
                ));
            }
        }
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, options.days.unwrap_or(NODE_VALIDITY_DAYS));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer, &ca_key)?;

    let node_dir = out_dir.join(name);
    fs::create_dir_all(&node_dir).map_err(io_err(&node_dir))?;
    if options.renew {
        let have_ca = node_dir.join(CA_CERT_FILE);
        let have = fs::read_to_string(&have_ca).map_err(io_err(&have_ca))?;
        if have != ca_pem {
            return Err(CertError::BadFile {
                path: have_ca,
                reason: "another CA's certificate: a renewal keeps the node's CA".into(),
            });
        }
        write_replacing(&node_dir.join(NODE_KEY_FILE), &key.serialize_pem(), true)?;
        write_replacing(&node_dir.join(NODE_CERT_FILE), &cert.pem(), false)?;
    } else {
        write_new(&node_dir.join(NODE_KEY_FILE), &key.serialize_pem(), true)?;
        write_new(&node_dir.join(NODE_CERT_FILE), &cert.pem(), false)?;
        write_new(&node_dir.join(CA_CERT_FILE), &ca_pem, false)?;
    }
    Ok(node_dir)
}

/// What [`create_cluster`] did for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issued {
    /// A certificate was issued into this directory.
    New(PathBuf),
    /// The directory already held a certificate from this CA; left as it was.
    Kept(PathBuf),
}

/// Makes a whole cluster's certificates, and is safe to run again: creates
/// the CA in `ca_dir` unless it is there, then for each name issues
/// `out_dir/NAME/` unless it already holds a certificate from this CA. A
/// directory holding another CA's certificate, or only part of the files, is
/// an error rather than something to overwrite.
pub fn create_cluster(
    ca_dir: &Path,
    out_dir: &Path,
    names: &[String],
    hosts: &[String],
) -> Result<Vec<Issued>, CertError> {
    for name in names {
        check_node_name(name)?;
    }
    let (ca_cert_path, ca_key_path) = (ca_dir.join(CA_CERT_FILE), ca_dir.join(CA_KEY_FILE));
    match (ca_cert_path.exists(), ca_key_path.exists()) {
        (true, true) => {}
        (false, false) => create_ca(ca_dir)?,
        (true, false) => return Err(CertError::Exists(ca_cert_path)),
        (false, true) => return Err(CertError::Exists(ca_key_path)),
    }
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let mut done = Vec::with_capacity(names.len());
    for name in names {
        let node_dir = out_dir.join(name);
        let files = [NODE_CERT_FILE, NODE_KEY_FILE, CA_CERT_FILE].map(|f| node_dir.join(f));
        let present = files.iter().filter(|f| f.exists()).count();
        if present == 0 {
            create_node_from(ca_dir, out_dir, name, hosts)?;
            done.push(Issued::New(node_dir));
            continue;
        }
        if present < files.len() {
            return Err(CertError::BadFile {
                path: node_dir,
                reason: "holds only part of a node's certificate files; remove it to reissue"
                    .into(),
            });
        }
        let node_ca = &files[2];
        if fs::read_to_string(node_ca).map_err(io_err(node_ca))? != ca_pem {
            return Err(CertError::BadFile {
                path: node_ca.clone(),
                reason: format!(
                    "is not the CA in {}; remove the node's directory to reissue",
                    ca_dir.display()
                ),
            });
        }
        done.push(Issued::Kept(node_dir));
    }
    Ok(done)
}

/// What a node proves itself with and whom it trusts: its certificate chain
/// and key, and the cluster CA.
#[derive(Debug)]
pub struct NodeIdentity {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl NodeIdentity {
    /// Loads `ca.crt`, `node.crt` and `node.key` from a node's certs dir.
    pub fn load(certs_dir: &Path) -> Result<Self, CertError> {
        let bad = |path: PathBuf| {
            move |e: rustls_pki_types::pem::Error| CertError::BadFile {
                path,
                reason: e.to_string(),
            }
        };
        let ca_path = certs_dir.join(CA_CERT_FILE);
        let cert_path = certs_dir.join(NODE_CERT_FILE);
        let key_path = certs_dir.join(NODE_KEY_FILE);
        for p in [&ca_path, &cert_path, &key_path] {
            if !p.exists() {
                return Err(CertError::Io {
                    path: p.clone(),
                    source: std::io::ErrorKind::NotFound.into(),
                });
            }
        }
        let ca = CertificateDer::from_pem_file(&ca_path).map_err(bad(ca_path.clone()))?;
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .map_err(bad(cert_path.clone()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad(cert_path.clone()))?;
        if chain.is_empty() {
            return Err(CertError::BadFile {
                path: cert_path,
                reason: "no certificate in the file".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(bad(key_path))?;
        Ok(NodeIdentity { ca, chain, key })
    }

    /// Checks, as a peer would, that the node certificate chains to the CA,
    /// is usable for both ends of a connection (ServerAuth and ClientAuth)
    /// and is valid for `name`. A node runs this at start, so a wrong certs
    /// dir fails there with a clear error rather than at every peer.
    pub fn check(&self, name: &str) -> Result<(), CertError> {
        let bad = |reason: String| CertError::BadFile {
            path: PathBuf::from(NODE_CERT_FILE),
            reason,
        };
        let ee = webpki::EndEntityCert::try_from(&self.chain[0])
            .map_err(|e| bad(format!("not a usable certificate: {e}")))?;
        let anchor = webpki::anchor_from_trusted_cert(&self.ca)
            .map_err(|e| bad(format!("the CA certificate is not usable: {e}")))?;
        let algs = provider().signature_verification_algorithms.all;
        let now = rustls_pki_types::UnixTime::now();
        for (usage, what) in [
            (webpki::KeyUsage::server_auth(), "server"),
            (webpki::KeyUsage::client_auth(), "client"),
        ] {
            ee.verify_for_usage(
                algs,
                std::slice::from_ref(&anchor),
                &self.chain[1..],
                now,
                usage,
                None,
                None,
            )
            .map_err(|e| {
                bad(format!(
                    "not valid as a {what} certificate under the CA: {e}"
                ))
            })?;
        }
        if !cert_names_node(&self.chain[0], name) {
            return Err(bad(format!("not issued for node {name:?}")));
        }
        Ok(())
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, CertError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }

    /// When the node certificate stops being valid, in seconds since the
    /// Unix epoch; `None` if it cannot be read.
    pub fn not_after(&self) -> Option<i64> {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.chain[0]).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    /// The certificate and key as handshakes present them, swappable
    /// later ([`NodeKey::replace`]).
    pub fn node_key(&self) -> Result<Arc<NodeKey>, CertError> {
        Ok(Arc::new(NodeKey {
            ca: self.ca.clone(),
            current: RwLock::new(self.certified()?),
        }))
    }

    fn certified(&self) -> Result<(Arc<CertifiedKey>, Option<i64>), CertError> {
        // from_der refuses a key that is not the certificate's: files read
        // while being rewritten can pair a new certificate with an old key.
        let key = CertifiedKey::from_der(self.chain.clone(), self.key.clone_key(), &provider())?;
        Ok((Arc::new(key), self.not_after()))
    }

    /// The accepting side: TLS 1.3 only (QUIC requires it), and a client
    /// certificate issued by the cluster CA is mandatory.
    pub fn server_config(&self) -> Result<ServerConfig, CertError> {
        self.server_config_with(self.node_key()?)
    }

    /// [`NodeIdentity::server_config`], presenting what `key` holds at
    /// each handshake.
    pub fn server_config_with(&self, key: Arc<NodeKey>) -> Result<ServerConfig, CertError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots()?, provider()).build()?;
        Ok(ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(key))
    }

    /// Dialling a seed by address: the server must hold a certificate of
    /// the cluster CA (for any node; the name is checked after the hello),
    /// and we present ours.
    pub fn seed_client_config(&self) -> Result<ClientConfig, CertError> {
        self.seed_client_config_with(self.node_key()?)
    }

    pub fn seed_client_config_with(&self, key: Arc<NodeKey>) -> Result<ClientConfig, CertError> {
        Ok(ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyNodeOfCa {
                ca: self.ca.clone(),
                provider: provider(),
            }))
            .with_client_cert_resolver(key))
    }

    /// The dialling side: the server must prove the name we dial with a
    /// certificate from the cluster CA, and we present ours.
    pub fn client_config(&self) -> Result<ClientConfig, CertError> {
        self.client_config_with(self.node_key()?)
    }

    pub fn client_config_with(&self, key: Arc<NodeKey>) -> Result<ClientConfig, CertError> {
        Ok(ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_cert_resolver(key))
    }
}

/// The node's certificate and key as every handshake presents them, both
/// accepting and dialling. Replacing them (a renewed certificate, read on
/// SIGHUP or when the files change) takes effect at the next handshake;
/// connections already up keep their session.
pub struct NodeKey {
    /// The CA the configs trust: a replacement must come from it, since
    /// the verifiers built at start trust nothing else.
    ca: CertificateDer<'static>,
    current: RwLock<(Arc<CertifiedKey>, Option<i64>)>,
}

/// Seconds from now until the Unix time `t` (negative once past).
pub fn seconds_until(t: i64) -> i64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    t - now
}

/// What [`NodeKey::replace`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replaced {
    /// The files hold the certificate presented already.
    Unchanged,
    /// Presented from the next handshake on; valid until `not_after`.
    Renewed { not_after: Option<i64> },
}

impl NodeKey {
    /// Presents `identity` from now on, once it passes the checks a peer
    /// makes (chains to the same CA, usable both ways, names `node`).
    pub fn replace(&self, identity: &NodeIdentity, node: &str) -> Result<Replaced, CertError> {
        if identity.ca != self.ca {
            return Err(CertError::BadFile {
                path: PathBuf::from(CA_CERT_FILE),
                reason: "another CA than the one this node started with; a new CA needs a \
                         restart (and every peer to trust it)"
                    .into(),
            });
        }
        if self.current.read().0.cert == identity.chain {
            return Ok(Replaced::Unchanged);
        }
        identity.check(node)?;
        let (key, not_after) = identity.certified()?;
        *self.current.write() = (key, not_after);
        Ok(Replaced::Renewed { not_after })
    }

    /// When the certificate presented stops being valid (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        self.current.read().1
    }

    /// Seconds until the certificate presented expires (negative after).
    pub fn seconds_left(&self) -> Option<i64> {
        self.not_after().map(seconds_until)
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.current.read().0.clone()
    }
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for NodeKey {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }
}

impl rustls::client::ResolvesClientCert for NodeKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepts a server certificate that chains to the cluster CA as a server
/// certificate, whatever name it is for: used to dial a seed by address
/// before its node name is known. The caller then checks that the
/// certificate is valid for the name the peer's welcome gives.
#[derive(Debug)]
struct AnyNodeOfCa {
    ca: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for AnyNodeOfCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let bad = |e: webpki::Error| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        };
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(bad)?;
        let anchor = webpki::anchor_from_trusted_cert(&self.ca).map_err(bad)?;
        ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            std::slice::from_ref(&anchor),
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(bad)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// TLS for `--insecure` clusters: a throwaway self-signed certificate, no
/// client certificates, and a client that accepts any server. Traffic is
/// still encrypted but nobody is authenticated: anyone who reaches the port
/// can put, read and release pages. For a laptop demo only; the transport
/// logs a warning whenever it is used.
pub fn insecure_configs(node: &str) -> Result<(ServerConfig, ClientConfig), CertError> {
    check_node_name(node)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![node.to_string()])?;
    validity(&mut params, NODE_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    let key = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| CertError::BadFile {
        path: PathBuf::from("(generated key)"),
        reason: e.to_string(),
    })?;
    let server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)?;
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider())))
        .with_no_client_auth();
    Ok((server, client))
}

/// Accepts any server certificate (still checking that the server holds
/// its key, so the session is at least encrypted to whoever answered).
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Whether `cert` (DER) is valid for the node name `name`: the check that
/// ties the name a peer claims in its hello to the certificate it proved.
pub fn cert_names_node(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = check_node_name(name) else {
        return false;
    };
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee.verify_is_valid_for_subject_name(&server_name).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One TLS handshake in memory; the certificate the server presented.
    fn presented(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>, name: &str) -> Vec<u8> {
        let mut c = rustls::ClientConnection::new(
            client.clone(),
            ServerName::try_from(name.to_string()).unwrap(),
        )
        .unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
            if !c.is_handshaking() && !s.is_handshaking() {
                return c.peer_certificates().unwrap()[0].to_vec();
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn a_renewed_certificate_is_presented_from_the_next_handshake_on() {
        install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path();
        create_ca(ca).unwrap();
        let node_dir = create_node(ca, "n1", &[]).unwrap();
        let first = NodeIdentity::load(&node_dir).unwrap();
        let key = first.node_key().unwrap();
        let server = Arc::new(first.server_config_with(key.clone()).unwrap());
        let client = Arc::new(first.client_config().unwrap());
        assert_eq!(presented(&server, &client, "n1"), first.chain[0].to_vec());
        assert_eq!(key.replace(&first, "n1").unwrap(), Replaced::Unchanged);

        let renew = NodeCertOptions {
            days: Some(30),
            renew: true,
            ..Default::default()
        };
        issue_node(ca, ca, "n1", &renew).unwrap();
        let renewed = NodeIdentity::load(&node_dir).unwrap();
        assert_ne!(renewed.chain, first.chain);
        let Replaced::Renewed { not_after } = key.replace(&renewed, "n1").unwrap() else {
            panic!("not renewed");
        };
        let days = seconds_until(not_after.unwrap()) / 86_400;
        assert!((29..=30).contains(&days), "{days} days");
        assert_eq!(key.not_after(), not_after);
        // The same server config: its resolver answers with the new pair.
        // (A fresh client: one that resumes its earlier session gets no
        // certificate in the handshake.)
        let client = Arc::new(first.client_config().unwrap());
        assert_eq!(presented(&server, &client, "n1"), renewed.chain[0].to_vec());
    }

    #[test]
    fn a_renewal_that_would_not_pass_at_start_is_refused_and_the_key_kept() {
        install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let (ca, other_ca) = (dir.path().join("ca"), dir.path().join("other"));
        create_ca(&ca).unwrap();
        create_ca(&other_ca).unwrap();
        let node_dir = create_node(&ca, "n1", &[]).unwrap();
        let first = NodeIdentity::load(&node_dir).unwrap();
        let key = first.node_key().unwrap();
        let before = key.not_after();

        // Another CA: the verifiers built at start trust only the first.
        let foreign = NodeIdentity::load(&create_node(&other_ca, "n1", &[]).unwrap()).unwrap();
        let e = key.replace(&foreign, "n1").unwrap_err();
        assert!(e.to_string().contains("another CA"), "{e}");
        // Another node's certificate under the same CA.
        let n2 = NodeIdentity::load(&create_node(&ca, "n2", &[]).unwrap()).unwrap();
        let e = key.replace(&n2, "n1").unwrap_err();
        assert!(e.to_string().contains("not issued for node"), "{e}");
        // A key that is not the certificate's (files caught mid-rewrite).
        let mixed = NodeIdentity {
            key: n2.key.clone_key(),
            ..first.clone()
        };
        let renewed = NodeIdentity {
            chain: NodeIdentity::load(&{
                issue_node(
                    &ca,
                    &ca,
                    "n1",
                    &NodeCertOptions {
                        renew: true,
                        ..Default::default()
                    },
                )
                .unwrap()
            })
            .unwrap()
            .chain,
            ..mixed
        };
        assert!(key.replace(&renewed, "n1").is_err());
        assert_eq!(key.not_after(), before);
        // A renewal refuses a directory holding another CA's certificate.
        let e = issue_node(
            &other_ca,
            &ca,
            "n1",
            &NodeCertOptions {
                renew: true,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("another CA"), "{e}");
    }
}
