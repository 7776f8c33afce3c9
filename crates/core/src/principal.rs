//! Who is on the other end of a connection, as the TLS handshake proved it.
//!
//! The transport makes a [`ClientCert`] once, at the handshake; identity resolution and
//! policy variables read it, so nothing above the transport parses X.509 again.

use crate::encoding::{hex, sha256_hex};

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientCert {
    pub subject_cn: Option<String>,
    /// The subject as RFC 4514-like text, e.g. `CN=computer-a, O=customer-b`.
    pub subject: String,
    pub issuer: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Subject attributes by short name (CN, O, OU, C, ST, L, serialNumber...).
    pub attributes: Vec<(String, String)>,
    /// Issuer attributes by short name.
    pub issuer_attributes: Vec<(String, String)>,
    /// SHA-256 of the DER, lower-case hex: the certificate id (as IoT Core's certificateId).
    pub fingerprint: String,
}

impl ClientCert {
    /// Reads the end-entity certificate (already verified by rustls).
    pub fn from_der(der: &[u8]) -> Option<ClientCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let attributes = name_attributes(subject);
        let issuer_attributes = name_attributes(cert.issuer());
        let info = ClientCert {
            subject_cn: subject
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            subject: subject.to_string(),
            issuer: cert.issuer().to_string(),
            serial: hex(cert.raw_serial()),
            attributes,
            issuer_attributes,
            fingerprint: sha256_hex(der),
        };
        Some(info)
    }
}

fn name_attributes(name: &x509_parser::x509::X509Name) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for rdn in name.iter() {
        for atv in rdn.iter() {
            let short = x509_parser::objects::oid2abbrev(
                atv.attr_type(),
                x509_parser::objects::oid_registry(),
            )
            .map(str::to_owned)
            .unwrap_or_else(|_| atv.attr_type().to_id_string());
            if let Ok(v) = atv.as_str() {
                out.push((short, v.to_owned()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_and_fingerprint_are_lower_case_hex_of_the_certificate() {
        for serial in [
            vec![0x01],
            vec![0x00, 0xab, 0x0f, 0xf0, 0x7e],
            vec![0x5a; 20],
        ] {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "dev1");
            params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let der = cert.der();
            let info = ClientCert::from_der(der).unwrap();
            let (_, parsed) = x509_parser::parse_x509_certificate(der).unwrap();
            assert_eq!(
                info.serial,
                parsed.raw_serial_as_string().replace(':', ""),
                "{serial:?}"
            );
            let digest = ring::digest::digest(&ring::digest::SHA256, der);
            let expected: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(info.fingerprint, expected);
            assert_eq!(info.subject_cn.as_deref(), Some("dev1"));
        }
    }
}
