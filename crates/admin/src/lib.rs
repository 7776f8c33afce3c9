//! fleetcore's control plane.
//!
//! # Layout
//! - [`ca`]: the certificate authority. Creates or loads the CA and the server certificate
//!   ([`ca::Ca::load_or_init`]), signs device CSRs ([`ca::Ca::sign_csr`], IoT Core's
//!   `CreateCertificateFromCsr`), creates keys and certificates
//!   ([`ca::Ca::create_keys_and_certificate`], `CreateKeysAndCertificate`), signs CRLs
//!   ([`ca::Ca::crl`]), and reads certificates made elsewhere ([`ca::inspect_pem`],
//!   [`ca::is_signed_by`]) so they can be registered.

#![forbid(unsafe_code)]

pub mod ca;
