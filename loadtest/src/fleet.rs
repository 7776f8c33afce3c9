//! The simulated fleet's names and identities.
//!
//! Device `i` is `dev<i>` in account `acct<i % accounts>`; its client id is its name and
//! its topics are `acct<k>/dev<i>/<subject>` (the seed's `account/device/subject`).
//! Certificates (ECDSA P-256, CN = device name, OU = account) are minted from a CA the
//! user gives, or obtained from fleetcore's admin API, once: they are cached in a
//! directory, one `<name>.pem` (certificate then key) per identity, and reused by later
//! runs with the same source.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use rcgen::{CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Client id and certificate CN of the backend (publisher / telemetry subscriber).
pub const BACKEND: &str = "loadtest-backend";

pub fn device_name(i: usize) -> String {
    format!("dev{i}")
}

pub fn account(i: usize, accounts: usize) -> String {
    format!("acct{}", i % accounts.max(1))
}

pub fn topic(i: usize, accounts: usize, subject: &str) -> String {
    format!("acct{}/dev{i}/{subject}", i % accounts.max(1))
}

/// Where certificates come from.
pub enum Source {
    /// Mint locally with this CA certificate and key (PEM files).
    Ca { cert: PathBuf, key: PathBuf },
    /// Ask fleetcore's admin API (plain HTTP): things with the `account` attribute, and
    /// certificates signed from local CSRs with `policy` attached.
    Admin {
        url: String,
        token: String,
        policy: String,
    },
}

/// A directory of cached identities.
pub struct Fleet {
    pub dir: PathBuf,
}

pub type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// FNV-1a, to recognise the source a cache was made from.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Fleet {
    /// Makes sure identities for devices `0..devices` and the backend exist in `dir`,
    /// minting or requesting only the missing ones. Returns how many were made.
    pub fn prepare(
        dir: &Path,
        source: &Source,
        devices: usize,
        accounts: usize,
    ) -> anyhow::Result<(Fleet, usize)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let marker = match source {
            Source::Ca { cert, .. } => {
                let pem =
                    std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
                format!("ca {:016x} accounts {accounts}\n", fnv(&pem))
            }
            Source::Admin { url, policy, .. } => {
                format!("admin {url} policy {policy} accounts {accounts}\n")
            }
        };
        let marker_file = dir.join("SOURCE");
        let old = std::fs::read_to_string(&marker_file).unwrap_or_default();
        if old != marker {
            // Another CA, another account layout: the cached identities are useless.
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "pem") {
                    std::fs::remove_file(&path)?;
                }
            }
            std::fs::write(&marker_file, &marker)?;
        }
        let fleet = Fleet { dir: dir.into() };
        let mut missing: Vec<Option<usize>> = (0..devices)
            .filter(|&i| !fleet.path(&device_name(i)).exists())
            .map(Some)
            .collect();
        if !fleet.path(BACKEND).exists() {
            missing.push(None);
        }
        if missing.is_empty() {
            return Ok((fleet, 0));
        }
        let started = Instant::now();
        eprintln!(
            "minting {} identities into {} ...",
            missing.len(),
            dir.display()
        );
        match source {
            Source::Ca { cert, key } => fleet.mint(cert, key, &missing, accounts)?,
            Source::Admin { url, token, policy } => {
                fleet.via_admin(url, token, policy, &missing, accounts)?
            }
        }
        eprintln!(
            "minted {} identities in {:.1} s",
            missing.len(),
            started.elapsed().as_secs_f64()
        );
        Ok((fleet, missing.len()))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    /// The certificate chain and key of `name`.
    pub fn load(&self, name: &str) -> anyhow::Result<Identity> {
        let pem = std::fs::read(self.path(name))
            .with_context(|| format!("reading {}", self.path(name).display()))?;
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("certificates of {name}"))?;
        let key = PrivateKeyDer::from_pem_slice(&pem).with_context(|| format!("key of {name}"))?;
        if chain.is_empty() {
            bail!("no certificate for {name}");
        }
        Ok((chain, key))
    }

    fn subject(name: &str, ou: &str) -> anyhow::Result<CertificateParams> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationalUnitName, ou);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        Ok(params)
    }

    fn who(i: Option<usize>, accounts: usize) -> (String, String) {
        match i {
            Some(i) => (device_name(i), account(i, accounts)),
            None => (BACKEND.to_owned(), "backend".to_owned()),
        }
    }

    fn mint(
        &self,
        ca_cert: &Path,
        ca_key: &Path,
        which: &[Option<usize>],
        accounts: usize,
    ) -> anyhow::Result<()> {
        let ca_pem = std::fs::read_to_string(ca_cert)
            .with_context(|| format!("reading {}", ca_cert.display()))?;
        let key_pem = std::fs::read_to_string(ca_key)
            .with_context(|| format!("reading {}", ca_key.display()))?;
        let ca_key = KeyPair::from_pem(&key_pem).context("parsing the client CA key")?;
        let issuer =
            Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("parsing the client CA cert")?;
        for &i in which {
            let (name, ou) = Self::who(i, accounts);
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let cert = Self::subject(&name, &ou)?.signed_by(&key, &issuer)?;
            let pem = format!("{}{}", cert.pem(), key.serialize_pem());
            std::fs::write(self.path(&name), pem)?;
        }
        Ok(())
    }

    fn via_admin(
        &self,
        url: &str,
        token: &str,
        policy: &str,
        which: &[Option<usize>],
        accounts: usize,
    ) -> anyhow::Result<()> {
        let mut http = Http::connect(url, token)?;
        let doc = agent_policy();
        let backend_policy = format!("{policy}-loadtest-backend");
        let backend_doc = serde_json::json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]
        });
        for (name, document) in [(policy, doc), (backend_policy.as_str(), backend_doc)] {
            let (status, body) = http.request(
                "POST",
                "/policies",
                &serde_json::json!({"name": name, "document": document}),
            )?;
            if status != 201 && status != 409 {
                bail!("creating policy {name}: HTTP {status}: {body}");
            }
        }
        for &i in which {
            let (name, acct) = Self::who(i, accounts);
            let (status, body) = http.request(
                "POST",
                "/things",
                &serde_json::json!({"name": name, "attributes": {"account": acct}}),
            )?;
            if status != 201 && status != 409 {
                bail!("creating thing {name}: HTTP {status}: {body}");
            }
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let csr = Self::subject(&name, &acct)?
                .serialize_request(&key)?
                .pem()?;
            let pol = if i.is_some() {
                policy
            } else {
                backend_policy.as_str()
            };
            let (status, body) = http.request(
                "POST",
                "/certificates/from-csr",
                &serde_json::json!({"csr_pem": csr, "thing": name, "policies": [pol]}),
            )?;
            if status != 201 {
                bail!("certificate for {name}: HTTP {status}: {body}");
            }
            let v: serde_json::Value = serde_json::from_str(&body)?;
            let cert = v["certificate_pem"]
                .as_str()
                .ok_or_else(|| anyhow!("no certificate_pem in {body}"))?;
            std::fs::write(self.path(&name), format!("{cert}\n{}", key.serialize_pem()))?;
        }
        Ok(())
    }
}

/// The seed's agent policy for registry listeners: a device connects as its thing and
/// reaches `<account attribute>/<thing>/...` only.
pub fn agent_policy() -> serde_json::Value {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect",
             "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": "arn:aws:iot:*:*:topicfilter/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*"},
            {"Effect": "Allow", "Action": ["iot:Receive", "iot:Publish"],
             "Resource": "arn:aws:iot:*:*:topic/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*"}
        ]
    })
}

/// Just enough HTTP/1.1 for the admin API: JSON requests on one kept-alive connection.
pub(crate) struct Http {
    host: String,
    token: String,
    reader: BufReader<TcpStream>,
}

impl Http {
    pub(crate) fn connect(url: &str, token: &str) -> anyhow::Result<Http> {
        let hostport = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("admin URL must be http://host:port (got {url})"))?
            .trim_end_matches('/');
        let stream =
            TcpStream::connect(hostport).with_context(|| format!("connecting to {hostport}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        Ok(Http {
            host: hostport.to_owned(),
            token: token.trim().to_owned(),
            reader: BufReader::new(stream),
        })
    }

    pub(crate) fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<(u16, String)> {
        let body = body.to_string();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            self.token,
            body.len()
        );
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad HTTP status line {line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    length = v.parse::<usize>().ok();
                } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line)?;
                let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| anyhow!("bad chunk size {line:?}"))?;
                let mut chunk = vec![0; n + 2];
                self.reader.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&chunk[..n]);
            }
        } else {
            let mut chunk = vec![0; length.unwrap_or(0)];
            self.reader.read_exact(&mut chunk)?;
            out = chunk;
        }
        Ok((status, String::from_utf8_lossy(&out).into_owned()))
    }
}

/// A CA, a server certificate for `names` and nothing else: what `compare.sh` and the
/// handshake benchmark need. Returns (ca cert PEM, ca key PEM, server cert PEM, server key PEM).
pub fn make_test_pki(names: &[&str]) -> anyhow::Result<(String, String, String, String)> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fleetcore-loadtest CA");
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut sp = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    sp.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("localhost"),
    );
    sp.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server = sp.signed_by(&server_key, &issuer)?;
    Ok((ca_pem, ca_key_pem, server.pem(), server_key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_seed() {
        assert_eq!(topic(42_042, 1000, "orders"), "acct42/dev42042/orders");
        assert_eq!(account(7, 0), "acct0");
    }

    #[test]
    fn mint_cache_and_load() {
        let dir = std::env::temp_dir().join(format!("fleetcore-loadtest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, ca_key, _, _) = make_test_pki(&["localhost"]).unwrap();
        std::fs::write(dir.join("ca.crt"), ca).unwrap();
        std::fs::write(dir.join("ca.key.txt"), ca_key).unwrap();
        let source = Source::Ca {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key.txt"),
        };
        let fdir = dir.join("fleet");
        let (fleet, made) = Fleet::prepare(&fdir, &source, 3, 2).unwrap();
        assert_eq!(made, 4); // 3 devices + backend
        let (chain, _key) = fleet.load("dev2").unwrap();
        assert_eq!(chain.len(), 1);
        // A rerun mints only what is missing.
        assert_eq!(Fleet::prepare(&fdir, &source, 5, 2).unwrap().1, 2);
        // Another account layout invalidates the cache.
        assert_eq!(Fleet::prepare(&fdir, &source, 5, 3).unwrap().1, 6);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
