//! The certificate authority: the CA and server certificate on disk, device certificates
//! issued from CSRs or with fresh keys, CRLs, and facts read from any certificate.
//!
//! The CA key is loaded once ([`Ca::load`]) and only ever used to sign. Device private keys
//! are never stored: [`Ca::sign_csr`] sees only the public key, and
//! [`Ca::create_keys_and_certificate`] hands its key back once.
//!
//! Every issued certificate carries its subject as fleetcore wants it, never as requested:
//! CN is the thing name, O and OU are copied from the CSR, and whatever extensions the CSR
//! asks for (CA, SANs, key usages) are ignored.

use crate::names::is_valid_thing_name;
use fleetcore_core::encoding::{hex, hex_decode, sha256_hex};
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration as StdDuration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::X509Name;

/// Common name of the CA that [`Ca::init`] creates.
pub const CA_COMMON_NAME: &str = "fleetcore CA";
/// Lifetime of the CA that [`Ca::init`] creates: ten years.
pub const CA_DAYS: u32 = 3650;
/// Lifetime of the server certificate: 825 days, the most Apple platforms accept.
pub const SERVER_DAYS: u32 = 825;
/// Issued certificates start this long before "now", so a device whose clock is a little
/// behind does not reject a certificate it has just received.
const BACKDATE: time::Duration = time::Duration::minutes(5);
/// Smallest RSA key accepted in a CSR (IoT Core and webpki both require 2048 bits).
const MIN_RSA_BITS: usize = 2048;

/// Where the CA and the server certificate live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaFiles {
    /// The CA certificate (PEM): devices and clients trust it.
    pub ca_cert: PathBuf,
    /// The CA private key (PKCS#8 PEM), mode 0600.
    pub ca_key: PathBuf,
    /// The server certificate (PEM) the TLS listeners present.
    pub server_cert: PathBuf,
    /// The server private key (PKCS#8 PEM), mode 0600.
    pub server_key: PathBuf,
}

impl CaFiles {
    /// The conventional names in one directory: `ca.pem`, `ca.key`, `server.pem`,
    /// `server.key`.
    pub fn in_dir(pki_dir: &Path) -> CaFiles {
        CaFiles {
            ca_cert: pki_dir.join("ca.pem"),
            ca_key: pki_dir.join("ca.key"),
            server_cert: pki_dir.join("server.pem"),
            server_key: pki_dir.join("server.key"),
        }
    }

    fn all(&self) -> [&Path; 4] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.server_cert,
            &self.server_key,
        ]
    }
}

/// Why a CA operation failed. Messages name the file, the input or the limit at fault.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read.
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: io::Error },
    /// A file or directory could not be written.
    #[error("cannot write {}: {reason}", path.display())]
    Write { path: PathBuf, reason: io::Error },
    /// [`Ca::init`] without `force` found a file it would replace.
    #[error("{} already exists: {} (use --force to replace)", file_name(path), path.display())]
    Exists { path: PathBuf },
    /// One of the CA's two files is there and the other is not.
    #[error(
        "incomplete CA: {} exists but {} does not (restore it, or use --force to create a new CA)",
        present.display(),
        missing.display()
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
    /// A file was read but its contents are unusable.
    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// The CSR could not be decoded.
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    /// The CSR was not signed by the key it carries.
    #[error("CSR signature does not verify")]
    CsrSignature,
    /// The text is not exactly one readable certificate.
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    /// A key type or signature algorithm fleetcore cannot use.
    #[error("unsupported {0}")]
    Unsupported(String),
    /// A thing name outside IoT Core's rules.
    #[error("invalid thing name {0:?}: 1 to 128 characters from a-z, A-Z, 0-9, ':', '_', '-'")]
    ThingName(String),
    /// [`Ca::init`] was given no server name.
    #[error("at least one server name (DNS name or IP address) is required")]
    NoServerName,
    /// A server name that is neither an IP address nor a DNS name.
    #[error("invalid server name {0:?}: expected a DNS name or an IP address")]
    ServerName(String),
    /// A requested validity that cannot be issued.
    #[error("invalid validity: {0}")]
    Validity(String),
    /// A serial number that is not hex.
    #[error("invalid serial number {0:?}: expected hex digits")]
    Serial(String),
    /// A time that X.509 cannot express.
    #[error("time out of range: {0}")]
    Time(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// rcgen refused to build or sign.
    #[error("cannot sign: {0}")]
    Sign(rcgen::Error),
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The CN of certificates made by fleet provisioning before their thing is known.
pub const PROVISIONED_CN: &str = "fleetcore provisioned device";

/// The CA that signs device certificates, loaded from its PEM files.
pub struct Ca {
    cert_pem: String,
    info: CertInfo,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Ca")
            .field("subject", &self.info.subject)
            .field("id", &self.info.id)
            .finish_non_exhaustive()
    }
}

/// A certificate fleetcore issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub pem: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// SHA-256 of the DER, lower-case hex: IoT Core's `certificateId`.
    pub id: String,
    /// Serial number, lower-case hex without colons (16 random bytes).
    pub serial: String,
    /// The subject CN: the thing name.
    pub subject_cn: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// A certificate revocation list signed by the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    /// PEM (`X509 CRL`).
    pub pem: String,
    /// DER, as served with `application/pkix-crl`.
    pub der: Vec<u8>,
}

/// Facts read from any certificate (used to register certificates made by the user's own
/// CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// SHA-256 of the DER, lower-case hex: IoT Core's `certificateId`.
    pub id: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// The subject as text, e.g. `CN=computer-a, OU=customer-b` (same form as the broker's).
    pub subject: String,
    /// The first CN of the subject, if any.
    pub subject_cn: Option<String>,
    /// The issuer as text.
    pub issuer: String,
    /// Serial number, lower-case hex without colons, as encoded in the certificate.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// True if basicConstraints says CA.
    pub is_ca: bool,
}

impl Ca {
    /// Creates an ECDSA P-256 CA (CN "fleetcore CA", 10 years) and a server certificate
    /// signed by it (CN = first SAN, SANs from `sans`: DNS names and IP addresses given as
    /// strings, e.g. `["localhost", "127.0.0.1"]`, 825 days, EKU serverAuth).
    ///
    /// Writes the four files; key files get mode 0600 from their creation. Refuses to
    /// overwrite existing files (the error names the first one found) unless `force`, in
    /// which case each file is replaced atomically.
    pub fn init(files: &CaFiles, sans: &[String], force: bool) -> Result<Ca, CaError> {
        let server_names = server_names(sans)?;
        if !force {
            for path in files.all() {
                if exists(path)? {
                    return Err(CaError::Exists { path: path.into() });
                }
            }
        }

        let now = now()?;
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        // Path length 0: this CA signs only end-entity certificates.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        params.not_before = now - BACKDATE;
        params.not_after = add_days(now, CA_DAYS)?;
        let ca_cert = params.self_signed(&ca_key).map_err(CaError::Sign)?;
        let ca_key_pem = ca_key.serialize_pem();
        // Build the CA exactly as `load` would, so a fresh CA and a loaded one are the same.
        let ca = Ca::from_pem(ca_cert.pem(), &ca_key_pem, &files.ca_cert, &files.ca_key)?;

        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, sans[0].as_str());
        let mut params =
            ca.leaf_params(subject, SERVER_DAYS, ExtendedKeyUsagePurpose::ServerAuth)?;
        params.subject_alt_names = server_names;
        let server_cert = params
            .signed_by(&server_key, &ca.issuer)
            .map_err(CaError::Sign)?;

        // The CA certificate goes last: while it is missing, `load_or_init` reports an
        // incomplete CA instead of loading half of one.
        write_file(&files.ca_key, ca_key_pem.as_bytes(), 0o600, force)?;
        write_file(
            &files.server_key,
            server_key.serialize_pem().as_bytes(),
            0o600,
            force,
        )?;
        write_file(
            &files.server_cert,
            server_cert.pem().as_bytes(),
            0o644,
            force,
        )?;
        write_file(&files.ca_cert, ca.cert_pem.as_bytes(), 0o644, force)?;
        Ok(ca)
    }

    /// Loads an existing CA from `files.ca_cert` and `files.ca_key` (the server files are
    /// the listeners' business). The key must be PKCS#8 and match the certificate, and the
    /// certificate must be a CA; the error names the missing or bad file.
    pub fn load(files: &CaFiles) -> Result<Ca, CaError> {
        let cert_pem = read_text(&files.ca_cert)?;
        let key_pem = read_text(&files.ca_key)?;
        Ca::from_pem(cert_pem, &key_pem, &files.ca_cert, &files.ca_key)
    }

    /// [`Ca::init`] if no CA exists yet (neither CA file), else [`Ca::load`]; returns the CA
    /// and whether it was just created. Refuses to guess when only one CA file exists.
    pub fn load_or_init(files: &CaFiles, sans: &[String]) -> Result<(Ca, bool), CaError> {
        let cert = exists(&files.ca_cert)?;
        let key = exists(&files.ca_key)?;
        match (cert, key) {
            (false, false) => Ca::init(files, sans, false).map(|ca| (ca, true)),
            (true, true) => Ca::load(files).map(|ca| (ca, false)),
            (true, false) => Err(CaError::Incomplete {
                present: files.ca_cert.clone(),
                missing: files.ca_key.clone(),
            }),
            (false, true) => Err(CaError::Incomplete {
                present: files.ca_key.clone(),
                missing: files.ca_cert.clone(),
            }),
        }
    }

    /// Replaces the server certificate and key (`files.server_cert`, `.server_key`) with
    /// new ones for `sans` (DNS names and IP addresses; the first is the CN), signed by
    /// this CA, 825 days, as [`Ca::init`] makes them. Each file is replaced atomically,
    /// the key first; the CA itself, and so every device certificate, is unchanged.
    /// Returns the new certificate's details.
    pub fn reissue_server(&self, files: &CaFiles, sans: &[String]) -> Result<CertInfo, CaError> {
        let server_names = server_names(sans)?;
        let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, sans[0].as_str());
        let mut params =
            self.leaf_params(subject, SERVER_DAYS, ExtendedKeyUsagePurpose::ServerAuth)?;
        params.subject_alt_names = server_names;
        let server_cert = params
            .signed_by(&server_key, &self.issuer)
            .map_err(CaError::Sign)?;
        let pem = server_cert.pem();
        let info = inspect_pem(&pem)?;
        write_file(
            &files.server_key,
            server_key.serialize_pem().as_bytes(),
            0o600,
            true,
        )?;
        write_file(&files.server_cert, pem.as_bytes(), 0o644, true)?;
        Ok(info)
    }

    /// The CA certificate, PEM: what devices and clients must trust.
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Facts about the CA certificate (its id, subject, validity).
    pub fn ca_info(&self) -> &CertInfo {
        &self.info
    }

    /// Signs a device CSR (PEM). The CSR's signature is verified; the issued certificate's
    /// subject is CN=`thing_name` plus the CSR's O and OU if present (at most one of each),
    /// with EKU clientAuth, validity `days` and a random 16-byte serial. Extensions the CSR
    /// requests are ignored. The private key never leaves the device.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        thing_name: &str,
        days: u32,
    ) -> Result<IssuedCert, CaError> {
        check_thing_name(thing_name)?;
        self.sign_csr_named(csr_pem, Some(thing_name), days)
    }

    /// Signs a device CSR as fleet provisioning does (CreateCertificateFromCsr): the
    /// thing is not known yet, so the subject keeps the CSR's CN, which must follow the
    /// thing-name rules (a CSR without a CN gets [`PROVISIONED_CN`]), and its O and OU.
    /// Otherwise as [`Ca::sign_csr`].
    pub fn sign_csr_as_requested(&self, csr_pem: &str, days: u32) -> Result<IssuedCert, CaError> {
        self.sign_csr_named(csr_pem, None, days)
    }

    fn sign_csr_named(
        &self,
        csr_pem: &str,
        thing_name: Option<&str>,
        days: u32,
    ) -> Result<IssuedCert, CaError> {
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| CaError::BadCsr(format!("no PEM certificate request: {e}")))?;
        let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CaError::BadCsr("trailing bytes after the request".into()));
        }
        let info = &csr.certification_request_info;
        let spki = &info.subject_pki;
        // Before the signature: ring refuses short RSA keys as "does not verify", which
        // would hide the real reason.
        if let Ok(PublicKey::RSA(rsa)) = spki.parsed() {
            if rsa.key_size() < MIN_RSA_BITS {
                return Err(CaError::Unsupported(format!(
                    "RSA key of {} bits in CSR (at least {MIN_RSA_BITS} required)",
                    rsa.key_size()
                )));
            }
        }
        match csr.verify_signature() {
            Ok(()) => {}
            Err(X509Error::SignatureVerificationError) => return Err(CaError::CsrSignature),
            Err(X509Error::SignatureUnsupportedAlgorithm) => {
                return Err(CaError::Unsupported(format!(
                    "CSR signature algorithm {}",
                    csr.signature_algorithm.algorithm
                )))
            }
            Err(e) => return Err(CaError::BadCsr(e.to_string())),
        }

        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|_| {
            CaError::Unsupported(format!(
                "CSR key type {} (ECDSA P-256/P-384, Ed25519 or RSA expected)",
                spki.algorithm.algorithm
            ))
        })?;
        // rcgen re-encodes the key; make sure the certificate carries the device's exact key.
        if public_key.subject_public_key_info() != spki.raw {
            return Err(CaError::Unsupported(format!(
                "CSR key encoding ({})",
                spki.algorithm.algorithm
            )));
        }

        let mut subject = DistinguishedName::new();
        if let Some(o) = single_attribute(info.subject.iter_organization(), "O")? {
            subject.push(DnType::OrganizationName, o);
        }
        if let Some(ou) = single_attribute(info.subject.iter_organizational_unit(), "OU")? {
            subject.push(DnType::OrganizationalUnitName, ou);
        }
        let cn = match thing_name {
            Some(name) => name.to_owned(),
            None => match single_attribute(info.subject.iter_common_name(), "CN")? {
                Some(cn) => {
                    check_thing_name(&cn)?;
                    cn
                }
                None => PROVISIONED_CN.to_owned(),
            },
        };
        subject.push(DnType::CommonName, cn);
        let params = self.leaf_params(subject, days, ExtendedKeyUsagePurpose::ClientAuth)?;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(CaError::Sign)?;
        issued(cert.pem(), cert.der().to_vec())
    }

    /// Creates an ECDSA P-256 key pair and a certificate for `thing_name` (CN, EKU
    /// clientAuth, validity `days`). Returns the certificate and the private key as PKCS#8
    /// PEM; the key is returned once and never stored.
    pub fn create_keys_and_certificate(
        &self,
        thing_name: &str,
        days: u32,
    ) -> Result<(IssuedCert, String), CaError> {
        check_thing_name(thing_name)?;
        self.create_keys_with_cn(thing_name, days)
    }

    /// As [`Ca::create_keys_and_certificate`] for fleet provisioning
    /// (CreateKeysAndCertificate), where the thing is not known yet: the CN is
    /// [`PROVISIONED_CN`] (IoT Core writes "AWS IoT Certificate"), and the thing is
    /// bound through the client id and the attachment made at RegisterThing.
    pub fn create_provisioning_keys(&self, days: u32) -> Result<(IssuedCert, String), CaError> {
        self.create_keys_with_cn(PROVISIONED_CN, days)
    }

    fn create_keys_with_cn(
        &self,
        thing_name: &str,
        days: u32,
    ) -> Result<(IssuedCert, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, thing_name);
        let params = self.leaf_params(subject, days, ExtendedKeyUsagePurpose::ClientAuth)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CaError::Sign)?;
        let issued = issued(cert.pem(), cert.der().to_vec())?;
        Ok((issued, key.serialize_pem()))
    }

    /// A CRL signed by the CA listing `revoked` (serial as lower-case hex, as in
    /// [`IssuedCert::serial`], and revocation time), with this_update = now, next_update =
    /// now + 1 day and CRL number `number` (it must grow with every new CRL).
    pub fn crl(&self, revoked: &[(String, SystemTime)], number: u64) -> Result<Crl, CaError> {
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at)| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&parse_serial(serial)?),
                    revocation_time: to_offset(*at)?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;
        let now = now()?;
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: add_days(now, 1)?,
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).map_err(CaError::Sign)?;
        Ok(Crl {
            pem: crl.pem().map_err(CaError::Sign)?,
            der: crl.der().to_vec(),
        })
    }

    /// Builds a CA from its certificate and key PEM; the paths only name the files in errors.
    fn from_pem(
        cert_pem: String,
        key_pem: &str,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Ca, CaError> {
        let bad_cert = |reason: String| CaError::BadFile {
            path: cert_path.into(),
            reason,
        };
        let bad_key = |reason: String| CaError::BadFile {
            path: key_path.into(),
            reason,
        };

        let der = single_certificate(&cert_pem).map_err(|e| bad_cert(e.to_string()))?;
        let info = inspect_der(der.clone()).map_err(|e| bad_cert(e.to_string()))?;
        if !info.is_ca {
            return Err(bad_cert(
                "not a CA certificate (basicConstraints CA:TRUE is missing)".into(),
            ));
        }
        {
            let cert = parse_certificate(&der).map_err(|e| bad_cert(e.to_string()))?;
            // rcgen keeps one value per attribute type; a multi-valued RDN cannot be copied.
            if cert.subject().iter().any(|rdn| rdn.iter().count() != 1) {
                return Err(bad_cert(
                    "the subject has a multi-valued RDN, which fleetcore cannot reproduce".into(),
                ));
            }
        }

        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| bad_key(format!("no private key found ({e})")))?;
        if !matches!(key, PrivateKeyDer::Pkcs8(_)) {
            return Err(bad_key(format!(
                "the key is not PKCS#8; convert it with `openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.pk8` and use that file",
                key_path.display()
            )));
        }
        let key = KeyPair::try_from(&key).map_err(|e| {
            bad_key(format!(
                "unusable private key ({e}); ECDSA P-256/P-384, Ed25519 or RSA expected"
            ))
        })?;
        let cert_spki = parse_certificate(&der)
            .map_err(|e| bad_cert(e.to_string()))?
            .public_key()
            .raw
            .to_vec();
        if key.subject_public_key_info() != cert_spki {
            return Err(bad_key(format!(
                "this key does not belong to the certificate in {}",
                cert_path.display()
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(der.as_slice()), key)
            .map_err(|e| bad_cert(format!("cannot use as issuer: {e}")))?;
        let ca = Ca {
            cert_pem,
            info,
            issuer,
        };
        ca.check_issuer_name().map_err(bad_cert)?;
        Ok(ca)
    }

    /// rcgen rebuilds the issuer name from the parsed certificate; TLS finds a device's CA
    /// by comparing names byte for byte, so a name that does not survive the round trip
    /// would make every issued certificate unverifiable. Sign a throwaway certificate and
    /// compare.
    fn check_issuer_name(&self) -> Result<(), String> {
        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from(1u64));
        let probe = params
            .signed_by(self.issuer.key(), &self.issuer)
            .map_err(|e| format!("cannot sign with this CA: {e}"))?;
        let probe = parse_certificate(probe.der()).map_err(|e| e.to_string())?;
        let ca = parse_certificate(&self.info.der).map_err(|e| e.to_string())?;
        if probe.issuer().as_raw() != ca.subject().as_raw() {
            return Err(
                "the subject name cannot be reproduced exactly (duplicate attribute types or unusual string types)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Parameters shared by every end-entity certificate this CA issues.
    fn leaf_params(
        &self,
        subject: DistinguishedName,
        days: u32,
        eku: ExtendedKeyUsagePurpose,
    ) -> Result<CertificateParams, CaError> {
        if days == 0 {
            return Err(CaError::Validity("at least 1 day is required".into()));
        }
        let now = now()?;
        let not_after = add_days(now, days)?;
        let ca_not_after = to_offset(self.info.not_after)?;
        if not_after > ca_not_after {
            return Err(CaError::Validity(format!(
                "{days} days would outlast the CA certificate, which expires on {}",
                date(ca_not_after)
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = now - BACKDATE;
        params.not_after = not_after;
        Ok(params)
    }
}

/// A DER certificate as PEM (64-column base64 lines).
pub fn certificate_pem(der: &[u8]) -> String {
    let b64 = fleetcore_core::encoding::b64_encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Reads the facts of a certificate given as PEM; exactly one certificate is expected.
pub fn inspect_pem(pem: &str) -> Result<CertInfo, CaError> {
    inspect_der(single_certificate(pem)?)
}

/// True if `cert_pem` names `issuer_pem`'s subject as its issuer and its signature verifies
/// with `issuer_pem`'s public key. Only the signature is checked, not validity or whether
/// the issuer is a CA. An error means it cannot be told (unreadable input, an algorithm
/// ring does not verify).
pub fn is_signed_by(cert_pem: &str, issuer_pem: &str) -> Result<bool, CaError> {
    let cert_der = single_certificate(cert_pem)?;
    let issuer_der = single_certificate(issuer_pem)?;
    let cert = parse_certificate(&cert_der)?;
    let issuer = parse_certificate(&issuer_der)?;
    if cert.issuer().as_raw() != issuer.subject().as_raw() {
        return Ok(false);
    }
    match cert.verify_signature(Some(issuer.public_key())) {
        Ok(()) => Ok(true),
        Err(X509Error::SignatureVerificationError) => Ok(false),
        Err(X509Error::SignatureUnsupportedAlgorithm) => Err(CaError::Unsupported(format!(
            "signature algorithm {} with an issuer key of type {}",
            cert.signature_algorithm.algorithm,
            issuer.public_key().algorithm.algorithm
        ))),
        Err(e) => Err(CaError::BadCertificate(e.to_string())),
    }
}

fn issued(pem: String, der: Vec<u8>) -> Result<IssuedCert, CaError> {
    let info = inspect_der(der)?;
    Ok(IssuedCert {
        pem,
        id: info.id,
        serial: info.serial,
        subject_cn: info.subject_cn.unwrap_or_default(),
        not_after: info.not_after,
        der: info.der,
    })
}

/// Reads the facts of a certificate given as DER.
pub fn inspect_der(der: Vec<u8>) -> Result<CertInfo, CaError> {
    let cert = parse_certificate(&der)?;
    let validity = cert.validity();
    let not_before = to_system(validity.not_before.to_datetime())?;
    let not_after = to_system(validity.not_after.to_datetime())?;
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| CaError::BadCertificate(format!("basicConstraints: {e}")))?
        .is_some_and(|bc| bc.value.ca);
    let info = CertInfo {
        id: sha256_hex(&der),
        subject: cert.subject().to_string(),
        subject_cn: first_cn(cert.subject()),
        issuer: cert.issuer().to_string(),
        serial: hex(cert.raw_serial()),
        not_before,
        not_after,
        is_ca,
        der: Vec::new(),
    };
    drop(cert);
    Ok(CertInfo { der, ..info })
}

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, CaError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CaError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::BadCertificate(
            "trailing bytes after the certificate".into(),
        ));
    }
    Ok(cert)
}

/// The DER of the only certificate in `pem`.
fn single_certificate(pem: &str) -> Result<Vec<u8>, CaError> {
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| CaError::BadCertificate(format!("PEM: {e}")))?;
        certs.push(cert);
    }
    match certs.len() {
        1 => Ok(certs.remove(0).to_vec()),
        0 => Err(CaError::BadCertificate("no PEM certificate found".into())),
        n => Err(CaError::BadCertificate(format!(
            "expected exactly one certificate, found {n}"
        ))),
    }
}

fn first_cn(name: &X509Name<'_>) -> Option<String> {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

/// The value of an attribute that may appear at most once in a CSR subject.
fn single_attribute<'a, 'b: 'a>(
    mut values: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'b>>,
    short: &str,
) -> Result<Option<String>, CaError> {
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(CaError::BadCsr(format!(
            "the subject has several {short} attributes; at most one is supported"
        )));
    }
    let value = first
        .as_str()
        .map_err(|_| CaError::BadCsr(format!("the subject's {short} is not a text string")))?;
    Ok(Some(value.to_owned()))
}

fn check_thing_name(name: &str) -> Result<(), CaError> {
    if is_valid_thing_name(name) {
        Ok(())
    } else {
        Err(CaError::ThingName(name.into()))
    }
}

fn server_names(sans: &[String]) -> Result<Vec<SanType>, CaError> {
    if sans.is_empty() {
        return Err(CaError::NoServerName);
    }
    sans.iter()
        .map(|name| {
            if let Ok(ip) = name.parse() {
                return Ok(SanType::IpAddress(ip));
            }
            let valid = !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_'));
            if !valid {
                return Err(CaError::ServerName(name.clone()));
            }
            let dns = name
                .as_str()
                .try_into()
                .map_err(|_| CaError::ServerName(name.clone()))?;
            Ok(SanType::DnsName(dns))
        })
        .collect()
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    // Positive (top bit clear) and a non-zero first byte, so DER keeps all 16 bytes.
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 1;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

fn parse_serial(text: &str) -> Result<Vec<u8>, CaError> {
    let mut digits: String = text.chars().filter(|&c| c != ':').collect();
    if digits.len() % 2 == 1 {
        digits.insert(0, '0');
    }
    hex_decode(&digits)
        .filter(|bytes| !bytes.is_empty())
        .ok_or_else(|| CaError::Serial(text.into()))
}

fn now() -> Result<OffsetDateTime, CaError> {
    to_offset(SystemTime::now())
}

fn add_days(t: OffsetDateTime, days: u32) -> Result<OffsetDateTime, CaError> {
    t.checked_add(time::Duration::days(i64::from(days)))
        // X.509 GeneralizedTime has four year digits.
        .filter(|end| end.year() <= 9999)
        .ok_or_else(|| CaError::Validity(format!("{days} days reaches past the year 9999")))
}

fn to_offset(t: SystemTime) -> Result<OffsetDateTime, CaError> {
    let nanos = match t.duration_since(UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).ok(),
        Err(before) => i128::try_from(before.duration().as_nanos())
            .ok()
            .map(|n| -n),
    };
    nanos
        .and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(n).ok())
        .ok_or_else(|| CaError::Time(format!("{t:?}")))
}

fn to_system(t: OffsetDateTime) -> Result<SystemTime, CaError> {
    let secs = t.unix_timestamp();
    let at = if secs >= 0 {
        UNIX_EPOCH.checked_add(StdDuration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(StdDuration::from_secs(secs.unsigned_abs()))
    };
    at.ok_or_else(|| CaError::Time(t.to_string()))
}

fn date(t: OffsetDateTime) -> String {
    format!("{}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

fn exists(path: &Path) -> Result<bool, CaError> {
    // symlink_metadata: a dangling link still occupies the name.
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(reason) => Err(CaError::Read {
            path: path.into(),
            reason,
        }),
    }
}

fn read_text(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|reason| CaError::Read {
        path: path.into(),
        reason,
    })
}

/// Writes `contents` to `path` with `mode` set at creation, so a key is never readable by
/// others, not even for an instant. Without `replace` an existing file is an error; with it
/// the file is written beside and renamed over the old one.
fn write_file(path: &Path, contents: &[u8], mode: u32, replace: bool) -> Result<(), CaError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |reason| CaError::Write { path, reason }
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write_err(dir))?;

    let target = if replace {
        let mut name = std::ffi::OsString::from(".");
        name.push(path.file_name().unwrap_or_default());
        name.push(".tmp");
        let tmp = dir.join(name);
        if exists(&tmp)? {
            fs::remove_file(&tmp).map_err(write_err(&tmp))?;
        }
        tmp
    } else {
        path.to_path_buf()
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&target)
        .map_err(|reason| {
            if reason.kind() == io::ErrorKind::AlreadyExists && !replace {
                CaError::Exists { path: path.into() }
            } else {
                CaError::Write {
                    path: target.clone(),
                    reason,
                }
            }
        })?;
    file.write_all(contents).map_err(write_err(&target))?;
    file.sync_all().map_err(write_err(&target))?;
    drop(file);
    if replace {
        fs::rename(&target, path).map_err(write_err(path))?;
    }
    // Make the new directory entry durable too.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P384_SHA384, PKCS_ED25519};
    use x509_parser::extensions::GeneralName;
    use x509_parser::revocation_list::CertificateRevocationList;

    fn sans() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into()]
    }

    fn new_ca() -> (tempfile::TempDir, CaFiles, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::in_dir(&dir.path().join("pki"));
        let ca = Ca::init(&files, &sans(), false).unwrap();
        (dir, files, ca)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        parse_certificate(der).unwrap()
    }

    fn csr(params: &CertificateParams, key: &KeyPair) -> String {
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn csr_for(cn: &str, ou: Option<&str>, key: &KeyPair) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(ou) = ou {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, ou);
        }
        csr(&params, key)
    }

    fn pem_of(label: &str, der: &[u8]) -> String {
        // Re-encode DER as PEM for tests that tamper with the bytes.
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    /// A self-signed CA that is not fleetcore's, with the same name to make the test hard.
    fn rogue_ca(cn: &str) -> (CertificateParams, KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        (params, key, pem)
    }

    fn ou_of(cert: &X509Certificate<'_>) -> Vec<String> {
        cert.subject()
            .iter_organizational_unit()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn init_writes_four_files_with_private_keys_0600() {
        let (_dir, files, ca) = new_ca();
        for path in files.all() {
            assert!(path.is_file(), "{} missing", path.display());
        }
        assert_eq!(mode(&files.ca_key), 0o600);
        assert_eq!(mode(&files.server_key), 0o600);
        assert_eq!(fs::read_to_string(&files.ca_cert).unwrap(), ca.ca_pem());
        let info = inspect_pem(ca.ca_pem()).unwrap();
        assert!(info.is_ca);
        assert_eq!(info.subject, "CN=fleetcore CA");
        let years = info
            .not_after
            .duration_since(info.not_before)
            .unwrap()
            .as_secs()
            / (365 * 86400);
        assert_eq!(years, 10);
        let der = single_certificate(ca.ca_pem()).unwrap();
        let cert = parse(&der);
        assert_eq!(
            cert.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        // Keys are PKCS#8.
        assert!(fs::read_to_string(&files.ca_key)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn init_refuses_to_overwrite_without_force() {
        let (_dir, files, ca) = new_ca();
        let err = Ca::init(&files, &sans(), false).unwrap_err();
        assert!(matches!(&err, CaError::Exists { path } if path == &files.ca_cert));
        let msg = err.to_string();
        assert!(msg.starts_with("ca.pem already exists: "), "{msg}");
        assert!(msg.contains(&files.ca_cert.display().to_string()), "{msg}");
        assert!(msg.ends_with("(use --force to replace)"), "{msg}");
        assert_eq!(fs::read_to_string(&files.ca_cert).unwrap(), ca.ca_pem());

        // A single leftover file is enough to refuse, and nothing is written.
        fs::remove_file(&files.ca_cert).unwrap();
        fs::remove_file(&files.ca_key).unwrap();
        fs::remove_file(&files.server_cert).unwrap();
        let err = Ca::init(&files, &sans(), false).unwrap_err();
        assert!(matches!(&err, CaError::Exists { path } if path == &files.server_key));
        assert!(!files.ca_cert.exists() && !files.ca_key.exists());
    }

    #[test]
    fn init_with_force_replaces_everything_and_keeps_keys_private() {
        let (_dir, files, old) = new_ca();
        fs::set_permissions(&files.ca_key, fs::Permissions::from_mode(0o644)).unwrap();
        let new = Ca::init(&files, &sans(), true).unwrap();
        assert_ne!(old.ca_pem(), new.ca_pem());
        assert_eq!(fs::read_to_string(&files.ca_cert).unwrap(), new.ca_pem());
        assert_eq!(mode(&files.ca_key), 0o600);
        assert_eq!(mode(&files.server_key), 0o600);
        let server = fs::read_to_string(&files.server_cert).unwrap();
        assert!(is_signed_by(&server, new.ca_pem()).unwrap());
        assert!(!is_signed_by(&server, old.ca_pem()).unwrap());
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(files.ca_cert.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 4, "{names:?}");
    }

    #[test]
    fn init_refuses_bad_server_names_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::in_dir(dir.path());
        assert!(matches!(
            Ca::init(&files, &[], false),
            Err(CaError::NoServerName)
        ));
        let err = Ca::init(&files, &["bad name".to_string()], false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid server name \"bad name\": expected a DNS name or an IP address"
        );
        assert!(!files.ca_cert.exists() && !files.ca_key.exists());
    }

    #[test]
    fn load_round_trips() {
        let (_dir, files, ca) = new_ca();
        let loaded = Ca::load(&files).unwrap();
        assert_eq!(loaded.ca_pem(), ca.ca_pem());
        assert_eq!(loaded.ca_info(), ca.ca_info());
        // The loaded CA signs with the same key and name as the one created.
        let (cert, _) = loaded
            .create_keys_and_certificate("computer-a", 30)
            .unwrap();
        assert!(is_signed_by(&cert.pem, ca.ca_pem()).unwrap());
        let der = single_certificate(ca.ca_pem()).unwrap();
        assert_eq!(
            parse(&cert.der).issuer().as_raw(),
            parse(&der).subject().as_raw()
        );
    }

    #[test]
    fn load_names_the_missing_file() {
        let (_dir, files, _ca) = new_ca();
        fs::remove_file(&files.ca_key).unwrap();
        let msg = Ca::load(&files).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!(
                "cannot read {}: No such file or directory",
                files.ca_key.display()
            )),
            "{msg}"
        );
    }

    #[test]
    fn load_refuses_a_key_that_is_not_the_cas() {
        let (_dir, files, _ca) = new_ca();
        fs::copy(&files.server_key, &files.ca_key).unwrap();
        let err = Ca::load(&files).unwrap_err();
        assert!(matches!(&err, CaError::BadFile { path, .. } if path == &files.ca_key));
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn load_refuses_a_certificate_that_is_not_a_ca() {
        let (_dir, files, _ca) = new_ca();
        fs::copy(&files.server_cert, &files.ca_cert).unwrap();
        fs::copy(&files.server_key, &files.ca_key).unwrap();
        let err = Ca::load(&files).unwrap_err();
        assert!(matches!(&err, CaError::BadFile { path, .. } if path == &files.ca_cert));
        assert!(err.to_string().contains("not a CA certificate"), "{err}");
    }

    #[test]
    fn load_refuses_garbage_naming_the_file() {
        let (_dir, files, _ca) = new_ca();
        fs::write(&files.ca_cert, "hello").unwrap();
        let err = Ca::load(&files).unwrap_err();
        assert!(matches!(&err, CaError::BadFile { path, .. } if path == &files.ca_cert));
        assert!(
            err.to_string().contains("no PEM certificate found"),
            "{err}"
        );
    }

    #[test]
    fn load_accepts_an_operators_own_ca_and_issues_certificates_that_chain() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::in_dir(dir.path());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CountryName,
            rcgen::DnValue::PrintableString("DE".try_into().unwrap()),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme GmbH");
        params
            .distinguished_name
            .push(DnType::CommonName, "Acme Device CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_pem = params.self_signed(&key).unwrap().pem();
        fs::write(&files.ca_cert, &ca_pem).unwrap();
        fs::write(&files.ca_key, key.serialize_pem()).unwrap();

        let ca = Ca::load(&files).unwrap();
        let (cert, _) = ca.create_keys_and_certificate("computer-a", 30).unwrap();
        assert!(is_signed_by(&cert.pem, &ca_pem).unwrap());
        let crl = ca
            .crl(&[(cert.serial.clone(), SystemTime::now())], 1)
            .unwrap();
        let (_, crl) = CertificateRevocationList::from_der(&crl.der).unwrap();
        let der = single_certificate(&ca_pem).unwrap();
        assert_eq!(crl.issuer().as_raw(), parse(&der).subject().as_raw());
    }

    #[test]
    fn load_or_init_creates_then_loads() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::in_dir(dir.path());
        let (created, was_created) = Ca::load_or_init(&files, &sans()).unwrap();
        assert!(was_created);
        let (loaded, was_created) = Ca::load_or_init(&files, &sans()).unwrap();
        assert!(!was_created);
        assert_eq!(created.ca_pem(), loaded.ca_pem());
    }

    #[test]
    fn load_or_init_refuses_half_a_ca() {
        let (_dir, files, _ca) = new_ca();
        fs::remove_file(&files.ca_key).unwrap();
        let err = Ca::load_or_init(&files, &sans()).unwrap_err();
        assert!(
            matches!(&err, CaError::Incomplete { missing, .. } if missing == &files.ca_key),
            "{err}"
        );
        // The certificate left behind is not replaced.
        assert!(files.ca_cert.exists());
    }

    #[test]
    fn server_certificate_is_signed_by_the_ca_and_names_the_server() {
        let (_dir, files, ca) = new_ca();
        let server_pem = fs::read_to_string(&files.server_cert).unwrap();
        assert!(is_signed_by(&server_pem, ca.ca_pem()).unwrap());

        let der = single_certificate(&server_pem).unwrap();
        let cert = parse(&der);
        assert_eq!(first_cn(cert.subject()).as_deref(), Some("localhost"));
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names.len(), 2);
        assert!(san
            .general_names
            .contains(&GeneralName::DNSName("localhost")));
        assert!(san
            .general_names
            .contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        let info = inspect_pem(&server_pem).unwrap();
        let days = info
            .not_after
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs()
            / 86400;
        assert_eq!(days, u64::from(SERVER_DAYS) - 1);

        // The server key belongs to the server certificate.
        let key = KeyPair::from_pem(&fs::read_to_string(&files.server_key).unwrap()).unwrap();
        assert_eq!(key.subject_public_key_info(), cert.public_key().raw);
    }

    #[test]
    fn sign_csr_issues_for_the_thing_keeping_ou() {
        let (_dir, _files, ca) = new_ca();
        let device_key = KeyPair::generate().unwrap();
        let csr_pem = csr_for("something-else", Some("customer-b"), &device_key);
        let issued = ca.sign_csr(&csr_pem, "computer-a", 365).unwrap();

        let cert = parse(&issued.der);
        assert_eq!(first_cn(cert.subject()).as_deref(), Some("computer-a"));
        assert_eq!(cert.subject().iter_common_name().count(), 1);
        assert_eq!(ou_of(&cert), ["customer-b"]);
        assert_eq!(issued.subject_cn, "computer-a");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        assert!(is_signed_by(&issued.pem, ca.ca_pem()).unwrap());
        assert_eq!(issued.id, sha256_hex(&issued.der));
        assert_eq!(issued.serial, hex(cert.raw_serial()));
        assert_eq!(issued.serial.len(), 32);
        assert_ne!(
            issued.serial,
            ca.sign_csr(&csr_pem, "computer-a", 365).unwrap().serial
        );
        // The device's own key, untouched.
        assert_eq!(
            cert.public_key().raw,
            device_key.subject_public_key_info().as_slice()
        );
        assert_eq!(inspect_pem(&issued.pem).unwrap().der, issued.der);
        let days = issued
            .not_after
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs()
            / 86400;
        assert_eq!(days, 364);
    }

    #[test]
    fn sign_csr_refuses_a_broken_signature() {
        let (_dir, _files, ca) = new_ca();
        let key = KeyPair::generate().unwrap();
        let pem = csr_for("something-else", Some("customer-b"), &key);
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // Still a well-formed request, but not the one that was signed.
        let at = der.windows(10).position(|w| w == b"customer-b").unwrap();
        der[at] = b'x';
        let tampered = pem_of("CERTIFICATE REQUEST", &der);
        let err = ca.sign_csr(&tampered, "computer-a", 365).unwrap_err();
        assert!(matches!(err, CaError::CsrSignature), "{err}");
        assert_eq!(err.to_string(), "CSR signature does not verify");
        // The untampered request still goes through.
        ca.sign_csr(&pem, "computer-a", 365).unwrap();
    }

    #[test]
    fn sign_csr_ignores_requested_ca_flag_and_names() {
        let (_dir, _files, ca) = new_ca();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let issued = ca.sign_csr(&csr(&params, &key), "computer-a", 30).unwrap();
        let cert = parse(&issued.der);
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        assert!(cert.subject_alternative_name().unwrap().is_none());
        assert!(!cert.key_usage().unwrap().unwrap().value.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(cert.subject().to_string(), "CN=computer-a");
    }

    #[test]
    fn sign_csr_keeps_p384_and_ed25519_keys_exactly() {
        let (_dir, _files, ca) = new_ca();
        for alg in [&PKCS_ECDSA_P384_SHA384, &PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            let issued = ca
                .sign_csr(&csr_for("x", None, &key), "computer-a", 30)
                .unwrap();
            assert_eq!(
                parse(&issued.der).public_key().raw,
                key.subject_public_key_info().as_slice(),
                "{alg:?}"
            );
            assert!(is_signed_by(&issued.pem, ca.ca_pem()).unwrap());
        }
    }

    #[test]
    fn sign_csr_keeps_o_and_refuses_several_ous() {
        let (_dir, _files, ca) = new_ca();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme");
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "customer-b");
        let issued = ca.sign_csr(&csr(&params, &key), "computer-a", 30).unwrap();
        assert_eq!(
            parse(&issued.der).subject().to_string(),
            "O=Acme, OU=customer-b, CN=computer-a"
        );

        // A second OU under its OID, which rcgen otherwise merges.
        params
            .distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 11]), "customer-c");
        let err = ca
            .sign_csr(&csr(&params, &key), "computer-a", 30)
            .unwrap_err();
        assert!(err.to_string().contains("several OU"), "{err}");
    }

    #[test]
    fn sign_csr_refuses_bad_input() {
        let (_dir, _files, ca) = new_ca();
        let key = KeyPair::generate().unwrap();
        let pem = csr_for("x", None, &key);
        for name in ["", "has space", "a/b", &"x".repeat(129)] {
            assert!(
                matches!(ca.sign_csr(&pem, name, 30), Err(CaError::ThingName(_))),
                "{name:?}"
            );
        }
        ca.sign_csr(&pem, "Thing_1:a-b", 30).unwrap();
        assert!(matches!(
            ca.sign_csr(&pem, "computer-a", 0),
            Err(CaError::Validity(_))
        ));
        // Longer than the CA lives.
        let err = ca.sign_csr(&pem, "computer-a", CA_DAYS + 1).unwrap_err();
        assert!(err.to_string().contains("outlast the CA"), "{err}");
        assert!(matches!(
            ca.sign_csr(&pem, "computer-a", u32::MAX),
            Err(CaError::Validity(_))
        ));
        assert!(matches!(
            ca.sign_csr("not a csr", "computer-a", 30),
            Err(CaError::BadCsr(_))
        ));
        let garbage = pem_of("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00");
        assert!(matches!(
            ca.sign_csr(&garbage, "computer-a", 30),
            Err(CaError::BadCsr(_))
        ));
    }

    #[test]
    fn sign_csr_accepts_openssl_requests_rcgen_cannot_parse() {
        // A P-384 key signed with SHA-256 and a requested subjectKeyIdentifier: rcgen's own
        // CSR reader refuses the extension and would pick the curve from the hash.
        let (_dir, _files, ca) = new_ca();
        let pem = include_str!("../testdata/openssl-p384-sha256-ski.csr");
        let issued = ca.sign_csr(pem, "computer-a", 30).unwrap();
        let cert = parse(&issued.der);
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
        assert_eq!(
            cert.public_key().raw,
            csr.certification_request_info.subject_pki.raw
        );
        assert_eq!(
            cert.subject().to_string(),
            "O=Acme, OU=customer-b, CN=computer-a"
        );
        assert!(is_signed_by(&issued.pem, ca.ca_pem()).unwrap());

        let rsa = ca
            .sign_csr(
                include_str!("../testdata/openssl-rsa2048.csr"),
                "computer-b",
                30,
            )
            .unwrap();
        assert!(is_signed_by(&rsa.pem, ca.ca_pem()).unwrap());
        let err = ca
            .sign_csr(
                include_str!("../testdata/openssl-rsa1024.csr"),
                "computer-c",
                30,
            )
            .unwrap_err();
        assert!(
            matches!(err, CaError::Unsupported(_)) && err.to_string().contains("1024 bits"),
            "{err}"
        );
    }

    #[test]
    fn load_reads_an_openssl_ca_once_its_key_is_pkcs8() {
        let dir = tempfile::tempdir().unwrap();
        let files = CaFiles::in_dir(dir.path());
        let ca_pem = include_str!("../testdata/openssl-ca.pem");
        fs::write(&files.ca_cert, ca_pem).unwrap();
        fs::write(
            &files.ca_key,
            include_str!("../testdata/openssl-ca.sec1.key"),
        )
        .unwrap();
        let err = Ca::load(&files).unwrap_err();
        assert!(matches!(&err, CaError::BadFile { path, .. } if path == &files.ca_key));
        assert!(err.to_string().contains("openssl pkcs8 -topk8"), "{err}");

        fs::write(
            &files.ca_key,
            include_str!("../testdata/openssl-ca.pk8.key"),
        )
        .unwrap();
        let ca = Ca::load(&files).unwrap();
        assert_eq!(
            ca.ca_info().subject,
            "C=DE, O=Example Org, CN=fleetcore dev CA"
        );
        let (cert, _) = ca.create_keys_and_certificate("computer-a", 30).unwrap();
        assert!(is_signed_by(&cert.pem, ca_pem).unwrap());
        let crl = ca
            .crl(&[(cert.serial.clone(), SystemTime::now())], 1)
            .unwrap();
        let (_, crl) = CertificateRevocationList::from_der(&crl.der).unwrap();
        let der = single_certificate(ca_pem).unwrap();
        crl.verify_signature(parse(&der).public_key()).unwrap();
        assert_eq!(crl.issuer().as_raw(), parse(&der).subject().as_raw());
    }

    #[test]
    fn create_keys_and_certificate_returns_the_matching_key() {
        let (_dir, _files, ca) = new_ca();
        let (issued, key_pem) = ca.create_keys_and_certificate("computer-a", 365).unwrap();
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let key = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        let cert = parse(&issued.der);
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        assert_eq!(issued.subject_cn, "computer-a");
        assert_eq!(cert.subject().to_string(), "CN=computer-a");
        assert!(
            cert.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .client_auth
        );
        assert!(is_signed_by(&issued.pem, ca.ca_pem()).unwrap());
        assert_eq!(issued.id, sha256_hex(&issued.der));

        // And the key really signs for that certificate.
        let msg = b"proof of possession";
        let signature = rcgen::SigningKey::sign(&key, msg).unwrap();
        let spki = cert.public_key();
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &spki.subject_public_key.data,
        )
        .verify(msg, &signature)
        .unwrap();
    }

    #[test]
    fn crl_lists_revoked_serials_signed_by_the_ca() {
        let (_dir, _files, ca) = new_ca();
        let (a, _) = ca.create_keys_and_certificate("computer-a", 30).unwrap();
        let (b, _) = ca.create_keys_and_certificate("computer-b", 30).unwrap();
        let revoked_at = UNIX_EPOCH + StdDuration::from_secs(1_750_000_000);
        let crl = ca
            .crl(
                &[
                    (a.serial.clone(), revoked_at),
                    (b.serial.clone(), revoked_at),
                ],
                7,
            )
            .unwrap();
        assert!(crl.pem.starts_with("-----BEGIN X509 CRL-----"));

        let (rest, parsed) = CertificateRevocationList::from_der(&crl.der).unwrap();
        assert!(rest.is_empty());
        let ca_der = single_certificate(ca.ca_pem()).unwrap();
        let ca_cert = parse(&ca_der);
        assert_eq!(parsed.issuer().as_raw(), ca_cert.subject().as_raw());
        parsed.verify_signature(ca_cert.public_key()).unwrap();
        let serials: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| hex(r.raw_serial()))
            .collect();
        assert_eq!(serials, [a.serial.clone(), b.serial.clone()]);
        for r in parsed.iter_revoked_certificates() {
            assert_eq!(r.revocation_date.timestamp(), 1_750_000_000);
        }
        assert_eq!(
            parsed.crl_number().map(|n| n.to_string()).as_deref(),
            Some("7")
        );
        let this = parsed.last_update().timestamp();
        let next = parsed.next_update().unwrap().timestamp();
        assert_eq!(next - this, 86400);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((this - now).abs() < 60);

        // The PEM carries the same CRL.
        let from_pem =
            rustls_pki_types::CertificateRevocationListDer::from_pem_slice(crl.pem.as_bytes())
                .unwrap();
        assert_eq!(from_pem.as_ref(), crl.der.as_slice());

        // Another CA's key does not verify it.
        let (_, _, rogue_pem) = rogue_ca(CA_COMMON_NAME);
        let rogue_der = single_certificate(&rogue_pem).unwrap();
        assert!(parsed
            .verify_signature(parse(&rogue_der).public_key())
            .is_err());
    }

    #[test]
    fn crl_may_be_empty_and_refuses_bad_serials() {
        let (_dir, _files, ca) = new_ca();
        let crl = ca.crl(&[], 1).unwrap();
        let (_, parsed) = CertificateRevocationList::from_der(&crl.der).unwrap();
        assert_eq!(parsed.iter_revoked_certificates().count(), 0);
        let err = ca
            .crl(&[("xyz".to_string(), SystemTime::now())], 2)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid serial number \"xyz\": expected hex digits"
        );
        // Colon-separated and upper-case serials are read as the same number.
        let crl = ca
            .crl(&[("0A:FF".to_string(), SystemTime::now())], 3)
            .unwrap();
        let (_, parsed) = CertificateRevocationList::from_der(&crl.der).unwrap();
        let serials: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| hex(r.raw_serial()))
            .collect();
        assert_eq!(serials, ["0aff"]);
    }

    #[test]
    fn inspect_pem_reads_a_certificate_from_another_ca() {
        let (_dir, _files, ca) = new_ca();
        // Same CA name as fleetcore's: only the signature tells them apart.
        let (rogue_params, rogue_key, rogue_pem) = rogue_ca(CA_COMMON_NAME);
        let rogue = Issuer::new(rogue_params, rogue_key);
        let device_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "customer-b");
        params
            .distinguished_name
            .push(DnType::CommonName, "computer-z");
        params.serial_number = Some(SerialNumber::from_slice(&[0x01, 0x02, 0x03]));
        let cert = params.signed_by(&device_key, &rogue).unwrap();
        let pem = cert.pem();

        let info = inspect_pem(&pem).unwrap();
        assert_eq!(info.subject, "OU=customer-b, CN=computer-z");
        assert_eq!(info.subject_cn.as_deref(), Some("computer-z"));
        assert_eq!(info.issuer, "CN=fleetcore CA");
        assert_eq!(info.serial, "010203");
        assert_eq!(info.id, sha256_hex(cert.der()));
        assert_eq!(info.der, cert.der().as_ref());
        assert!(!info.is_ca);
        assert!(info.not_before < info.not_after);

        assert!(!is_signed_by(&pem, ca.ca_pem()).unwrap());
        assert!(is_signed_by(&pem, &rogue_pem).unwrap());
        // A differently named CA is not the issuer either.
        let (_, _, other_pem) = rogue_ca("other CA");
        assert!(!is_signed_by(&pem, &other_pem).unwrap());
        assert!(inspect_pem(&rogue_pem).unwrap().is_ca);
    }

    #[test]
    fn inspect_pem_wants_exactly_one_certificate() {
        let (_dir, files, ca) = new_ca();
        let two = format!(
            "{}{}",
            ca.ca_pem(),
            fs::read_to_string(&files.server_cert).unwrap()
        );
        let err = inspect_pem(&two).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid certificate: expected exactly one certificate, found 2"
        );
        assert!(matches!(inspect_pem(""), Err(CaError::BadCertificate(_))));
        let key_only = fs::read_to_string(&files.ca_key).unwrap();
        assert!(matches!(
            inspect_pem(&key_only),
            Err(CaError::BadCertificate(_))
        ));
        let garbage = pem_of("CERTIFICATE", b"\x30\x03\x02\x01\x00");
        assert!(matches!(
            inspect_pem(&garbage),
            Err(CaError::BadCertificate(_))
        ));
    }

    #[test]
    fn ca_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Ca>();
        let (_dir, _files, ca) = new_ca();
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }
}
