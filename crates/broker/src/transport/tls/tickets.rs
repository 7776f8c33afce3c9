//! TLS 1.3 session tickets that survive a restart, bound to what a listener trusts.
//!
//! A full mutual-TLS handshake costs the broker most of a reconnection's CPU. With
//! resumption, a client that was connected before presents the ticket it was given
//! and the handshake skips the certificate exchange (key exchange still happens:
//! rustls resumes TLS 1.3 only in `psk_dhe_ke` mode, so traffic keeps forward secrecy).
//!
//! # Keys
//!
//! [`TicketKeys`] holds two random 256-bit master secrets, current and previous,
//! persisted in a file of their own (mode 0600, replaced atomically) so that tickets
//! issued before a restart still open after it. The current secret is replaced when
//! it is older than the rotation period; the previous one opens tickets until no
//! ticket it sealed can still be within its lifetime, and is then forgotten.
//! Whoever can read the file can mint tickets that resume as any client: it is as
//! sensitive as the CA key beside it.
//!
//! # Binding
//!
//! A listener's [`Ticketer`] seals with AES-256-GCM under a key derived (HKDF-SHA256)
//! from the master secret and a *binding*: a hash of the listener's name, whether its
//! client certificate is optional, its ALPN list and every CA certificate it trusts
//! (the CA file and the registered CAs). When any of these changes, the configuration
//! is rebuilt with another binding, and tickets issued before no longer open: a
//! session resumes only under the trust it was authenticated under.
//!
//! # Ticket
//!
//! `version (1) | master key id (8) | issued at, Unix seconds (8, big-endian) |
//! nonce (12) | sealed session (rustls's encoding) + tag (16)`. The first 17 bytes are
//! the AEAD's associated data. A ticket older than its lifetime is refused by the
//! server whatever the client believes. Only TLS 1.3 sessions are sealed: a TLS 1.2
//! client gets an empty ticket (no TLS 1.2 resumption, whose abbreviated handshake
//! would have no forward secrecy).

use fleetcore_core::encoding::hex;
use fleetcore_core::time::{now_secs, utc_text};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// The key file's name in the data directory.
pub const KEY_FILE: &str = "tls-ticket-keys";
const FILE_MAGIC: &[u8; 5] = b"fctk1";
const TICKET_VERSION: u8 = 1;
const KEY_ID_LEN: usize = 8;
const SECRET_LEN: usize = 32;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + 8;
const TAG_LEN: usize = 16;
/// How far in the future a ticket's issue time may be (clock steps).
const CLOCK_SKEW_SECS: u64 = 60;
const HKDF_INFO: &[u8] = b"fleetcore tls13 session ticket v1";

/// A master secret and when it was made.
#[derive(Clone, PartialEq, Eq)]
struct MasterKey {
    id: [u8; KEY_ID_LEN],
    created: u64,
    secret: [u8; SECRET_LEN],
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &hex(&self.id))
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct KeySet {
    current: MasterKey,
    previous: Option<MasterKey>,
}

/// Why the ticket keys cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS ticket keys {path}: {reason}")]
pub struct TicketKeyError {
    pub path: PathBuf,
    pub reason: String,
}

/// The broker's ticket master secrets, shared by every TLS listener.
pub struct TicketKeys {
    path: PathBuf,
    lifetime_secs: u64,
    rotation_secs: u64,
    keys: RwLock<KeySet>,
    rng: SystemRandom,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("path", &self.path)
            .field("lifetime_secs", &self.lifetime_secs)
            .field("rotation_secs", &self.rotation_secs)
            .field("keys", &*self.keys.read())
            .finish_non_exhaustive()
    }
}

impl TicketKeys {
    /// Loads the keys from `path`, or makes and writes new ones when the file is
    /// missing or unreadable as keys (tickets are disposable: the worst outcome is one
    /// full handshake per client). Keys past their time are rotated at once.
    /// `lifetime_secs` must not exceed `rotation_secs` (see `Config::validate`).
    pub fn open(
        path: &Path,
        lifetime_secs: u64,
        rotation_secs: u64,
    ) -> Result<TicketKeys, TicketKeyError> {
        Self::open_at(path, lifetime_secs, rotation_secs, now_secs())
    }

    fn open_at(
        path: &Path,
        lifetime_secs: u64,
        rotation_secs: u64,
        now: u64,
    ) -> Result<TicketKeys, TicketKeyError> {
        let err = |reason: String| TicketKeyError {
            path: path.into(),
            reason,
        };
        let rng = SystemRandom::new();
        let loaded = match std::fs::read(path) {
            Ok(bytes) => match decode_file(&bytes) {
                Some(keys) => Some(keys),
                None => {
                    tracing::warn!(path = %path.display(), "TLS ticket key file unreadable as keys; making new ones (clients do one full handshake)");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(err(e.to_string())),
        };
        if loaded.is_some() {
            warn_if_readable_by_others(path);
        }
        let (keys, dirty) = match loaded {
            Some(k) => (k, false),
            None => (
                KeySet {
                    current: new_master(&rng, now).map_err(err)?,
                    previous: None,
                },
                true,
            ),
        };
        let tk = TicketKeys {
            path: path.into(),
            lifetime_secs,
            rotation_secs,
            keys: RwLock::new(keys),
            rng,
        };
        let rotated = tk.rotate_if_due(now, false).map_err(err)?;
        if dirty && !rotated {
            write_file(path, &tk.keys.read()).map_err(|e| err(e.to_string()))?;
        }
        Ok(tk)
    }

    /// How long a ticket opens after it was issued, in seconds.
    pub fn lifetime_secs(&self) -> u64 {
        self.lifetime_secs
    }

    /// Replaces the current secret when it is older than the rotation period, and
    /// forgets the previous one once no ticket it sealed can be alive. Writes the file
    /// when anything changed. Returns whether it did.
    fn rotate_if_due(&self, now: u64, log: bool) -> Result<bool, String> {
        {
            let k = self.keys.read();
            if !self.due(&k, now) {
                return Ok(false);
            }
        }
        let mut k = self.keys.write();
        if !self.due(&k, now) {
            return Ok(false);
        }
        if now >= k.current.created.saturating_add(self.rotation_secs) {
            let fresh = new_master(&self.rng, now)?;
            let old = std::mem::replace(&mut k.current, fresh);
            // The retired secret still opens tickets issued up to now, for one lifetime.
            k.previous = Some(old);
        }
        if k.previous
            .as_ref()
            .is_some_and(|_| now >= k.current.created.saturating_add(self.lifetime_secs))
        {
            k.previous = None;
        }
        if let Err(e) = write_file(&self.path, &k) {
            // The keys in memory stay in force; tickets will not survive a restart.
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write TLS ticket keys; tickets issued from now on will not resume after a restart");
        }
        if log {
            tracing::info!(key = %hex(&k.current.id), "TLS ticket key rotated");
        }
        Ok(true)
    }

    fn due(&self, k: &KeySet, now: u64) -> bool {
        now >= k.current.created.saturating_add(self.rotation_secs)
            || (k.previous.is_some() && now >= k.current.created.saturating_add(self.lifetime_secs))
    }

    /// The ticketer of a listener whose binding is `binding` (see [`binding`]).
    pub fn ticketer(self: &Arc<Self>, binding: [u8; 32]) -> Ticketer {
        Ticketer {
            keys: self.clone(),
            binding,
            derived: RwLock::new(Vec::new()),
        }
    }
}

fn new_master(rng: &SystemRandom, now: u64) -> Result<MasterKey, String> {
    let mut id = [0u8; KEY_ID_LEN];
    let mut secret = [0u8; SECRET_LEN];
    rng.fill(&mut id)
        .and_then(|_| rng.fill(&mut secret))
        .map_err(|_| "the system random number generator failed".to_string())?;
    Ok(MasterKey {
        id,
        created: now,
        secret,
    })
}

fn encode_file(k: &KeySet) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + 2 * (KEY_ID_LEN + 8 + SECRET_LEN));
    out.extend_from_slice(FILE_MAGIC);
    let keys: Vec<&MasterKey> = std::iter::once(&k.current).chain(&k.previous).collect();
    out.push(keys.len() as u8);
    for m in keys {
        out.extend_from_slice(&m.id);
        out.extend_from_slice(&m.created.to_be_bytes());
        out.extend_from_slice(&m.secret);
    }
    out
}

fn decode_file(bytes: &[u8]) -> Option<KeySet> {
    let rest = bytes.strip_prefix(FILE_MAGIC)?;
    let (&n, mut rest) = rest.split_first()?;
    const ONE: usize = KEY_ID_LEN + 8 + SECRET_LEN;
    if !(1..=2).contains(&n) || rest.len() != n as usize * ONE {
        return None;
    }
    let mut keys = Vec::new();
    while !rest.is_empty() {
        let (one, tail) = rest.split_at(ONE);
        keys.push(MasterKey {
            id: one[..KEY_ID_LEN].try_into().ok()?,
            created: u64::from_be_bytes(one[KEY_ID_LEN..KEY_ID_LEN + 8].try_into().ok()?),
            secret: one[KEY_ID_LEN + 8..].try_into().ok()?,
        });
        rest = tail;
    }
    let mut keys = keys.into_iter();
    Some(KeySet {
        current: keys.next()?,
        previous: keys.next(),
    })
}

/// Writes the keys to a temporary file created with mode 0600 beside `path`,
/// syncs it, renames it over `path` and syncs the directory.
fn write_file(path: &Path, k: &KeySet) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(&encode_file(k))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(md) = std::fs::metadata(path) {
            if md.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{:o}", md.permissions().mode() & 0o777), "TLS ticket key file is readable by others; whoever reads it can resume as any client (chmod 600)");
            }
        }
    }
}

/// What a listener's tickets are bound to; see the module documentation.
/// `listener` names the listener (kind and address); `cas` are the DER certificates
/// it trusts for client authentication, in any order.
pub fn binding(
    listener: &str,
    client_cert_optional: bool,
    alpn: &[Vec<u8>],
    cas: &[&[u8]],
) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    field(b"fleetcore ticket binding v1");
    field(listener.as_bytes());
    field(&[u8::from(client_cert_optional)]);
    field(&(alpn.len() as u64).to_be_bytes());
    for p in alpn {
        field(p);
    }
    // The trust store is a set: sorted and without duplicates.
    let mut cas: Vec<&[u8]> = cas.to_vec();
    cas.sort_unstable();
    cas.dedup();
    field(&(cas.len() as u64).to_be_bytes());
    for ca in cas {
        field(ca);
    }
    let digest = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// A listener's `rustls::server::ProducesTickets`: seals and opens its tickets.
pub struct Ticketer {
    keys: Arc<TicketKeys>,
    binding: [u8; 32],
    /// AEAD keys derived for (master key id), at most the two live ones.
    derived: RwLock<Vec<([u8; KEY_ID_LEN], Arc<LessSafeKey>)>>,
}

impl fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticketer")
            .field("binding", &hex(&self.binding))
            .finish_non_exhaustive()
    }
}

impl Ticketer {
    fn aead_key(&self, m: &MasterKey) -> Arc<LessSafeKey> {
        if let Some((_, k)) = self.derived.read().iter().find(|(id, _)| *id == m.id) {
            return k.clone();
        }
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &self.binding).extract(&m.secret);
        let okm = prk
            .expand(&[HKDF_INFO], &AES_256_GCM)
            .expect("HKDF output of one AES-256 key is within bounds");
        let key = Arc::new(LessSafeKey::new(UnboundKey::from(okm)));
        let mut d = self.derived.write();
        if d.len() >= 2 {
            d.remove(0);
        }
        d.push((m.id, key.clone()));
        key
    }

    fn seal_at(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        if !is_tls13_session(plain) {
            return None;
        }
        if let Err(e) = self.keys.rotate_if_due(now, true) {
            tracing::warn!(error = %e, "TLS ticket key rotation failed; no ticket issued");
            return None;
        }
        let master = self.keys.keys.read().current.clone();
        let key = self.aead_key(&master);
        let mut nonce = [0u8; NONCE_LEN];
        self.keys.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(HEADER_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.push(TICKET_VERSION);
        out.extend_from_slice(&master.id);
        out.extend_from_slice(&now.to_be_bytes());
        let header: [u8; HEADER_LEN] = out[..HEADER_LEN].try_into().ok()?;
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(header),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn open_at(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < HEADER_LEN + NONCE_LEN + TAG_LEN || ticket[0] != TICKET_VERSION {
            return None;
        }
        let (header, rest) = ticket.split_at(HEADER_LEN);
        let id: [u8; KEY_ID_LEN] = header[1..1 + KEY_ID_LEN].try_into().ok()?;
        let issued = u64::from_be_bytes(header[1 + KEY_ID_LEN..].try_into().ok()?);
        if issued > now.saturating_add(CLOCK_SKEW_SECS)
            || now >= issued.saturating_add(self.keys.lifetime_secs)
        {
            return None;
        }
        let master = {
            let k = self.keys.keys.read();
            if k.current.id == id {
                k.current.clone()
            } else {
                // A retired secret opens tickets for one lifetime after its retirement.
                let p = k.previous.as_ref().filter(|p| p.id == id)?;
                if now >= k.current.created.saturating_add(self.keys.lifetime_secs) {
                    return None;
                }
                p.clone()
            }
        };
        let key = self.aead_key(&master);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain_len = key
            .open_in_place(nonce, Aad::from(header), &mut body)
            .ok()?
            .len();
        body.truncate(plain_len);
        Some(body)
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.keys.lifetime_secs).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, now_secs())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(cipher, now_secs())
    }
}

/// Whether rustls's encoding of a server session is of a TLS 1.3 session: an
/// optional SNI (flag byte, then a length-prefixed name), then the protocol version.
fn is_tls13_session(plain: &[u8]) -> bool {
    let at = match plain.first() {
        Some(0) => 1,
        Some(1) => match plain.get(1) {
            Some(&len) => 2 + len as usize,
            None => return false,
        },
        _ => return false,
    };
    plain.get(at..at + 2) == Some(&[0x03, 0x04][..])
}

/// What the handshake said about resumption: set on a connection whose TLS session
/// was resumed from a ticket, so rustls did not verify a client certificate this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// The end of the validity period of the client certificate the session was
    /// authenticated with, Unix seconds (`i64::MIN` if it cannot be read: counts as
    /// expired); `None` when the session had no client certificate.
    pub cert_not_after: Option<i64>,
}

impl Resumed {
    /// Why the resumed session may not be used at `now` (Unix seconds), if it may not.
    pub fn refusal(&self, now: i64) -> Option<String> {
        match self.cert_not_after {
            Some(i64::MIN) => {
                Some("the client certificate of the resumed TLS session cannot be read".into())
            }
            Some(t) if now > t => Some(format!(
                "the client certificate of the resumed TLS session expired at {} (Unix {t}); reconnect with a valid certificate",
                utc_text(u64::try_from(t).unwrap_or(0))
            )),
            _ => None,
        }
    }
}

/// Whether this connection resumed a session and, if so, what the CONNECT checks need.
pub fn resumed(conn: &rustls::CommonState) -> Option<Resumed> {
    if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
        return None;
    }
    let cert_not_after = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|der| {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, c)| c.validity().not_after.timestamp())
                .unwrap_or(i64::MIN)
        });
    Some(Resumed { cert_not_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(dir: &Path, lifetime: u64, rotation: u64, now: u64) -> Arc<TicketKeys> {
        Arc::new(TicketKeys::open_at(&dir.join(KEY_FILE), lifetime, rotation, now).unwrap())
    }

    /// A TLS 1.3 session as rustls encodes it (with and without SNI).
    fn session(sni: Option<&str>) -> Vec<u8> {
        let mut v = match sni {
            Some(s) => {
                let mut v = vec![1, s.len() as u8];
                v.extend_from_slice(s.as_bytes());
                v
            }
            None => vec![0],
        };
        v.extend_from_slice(&[0x03, 0x04, 0x13, 0x01]);
        v.extend_from_slice(&[0xab; 48]);
        v
    }

    #[test]
    fn ticket_opens_under_same_binding_only_and_within_its_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_700_000_000;
        let k = keys(dir.path(), 100, 1000, now);
        let a = k.ticketer([1; 32]);
        let b = k.ticketer([2; 32]);
        let plain = session(Some("localhost"));
        let t = a.seal_at(&plain, now).unwrap();
        assert_eq!(a.open_at(&t, now + 99).as_deref(), Some(&plain[..]));
        assert_eq!(
            b.open_at(&t, now),
            None,
            "another binding opened the ticket"
        );
        assert_eq!(a.open_at(&t, now + 100), None, "opened after its lifetime");
        assert_eq!(a.open_at(&t, now - 61), None, "issued in the future");
        // Any flipped bit (header included) is refused.
        for i in 0..t.len() {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert_eq!(a.open_at(&bad, now), None, "byte {i}");
        }
        assert_eq!(a.open_at(&t[..t.len() - 1], now), None);
        assert_eq!(a.open_at(&[], now), None);
    }

    #[test]
    fn only_tls13_sessions_are_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let k = keys(dir.path(), 100, 1000, 5000);
        let t = k.ticketer([0; 32]);
        assert!(t.seal_at(&session(None), 5000).is_some());
        assert!(t.seal_at(&session(Some("a.example")), 5000).is_some());
        let mut tls12 = session(None);
        tls12[2] = 0x03;
        assert_eq!(t.seal_at(&tls12, 5000), None);
        assert_eq!(t.seal_at(&[], 5000), None);
        assert_eq!(t.seal_at(&[1], 5000), None);
    }

    #[test]
    fn keys_survive_reopen_rotate_and_retire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let t0 = 1_000_000;
        let plain = session(None);
        let k = keys(dir.path(), 100, 1000, t0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let old = k.ticketer([7; 32]).seal_at(&plain, t0 + 950).unwrap();
        drop(k);
        // Reopened (a restart): the same secret opens the old ticket.
        let k = keys(dir.path(), 100, 1000, t0 + 960);
        assert!(k.ticketer([7; 32]).open_at(&old, t0 + 960).is_some());
        // Sealing past the rotation period makes a new current key; the old ticket
        // still opens with the previous one, also after another restart.
        let new = k.ticketer([7; 32]).seal_at(&plain, t0 + 1000).unwrap();
        assert_ne!(new[1..9], old[1..9], "no rotation");
        let k = keys(dir.path(), 100, 1000, t0 + 1001);
        let tk = k.ticketer([7; 32]);
        assert!(tk.open_at(&old, t0 + 1001).is_some());
        assert!(tk.open_at(&new, t0 + 1001).is_some());
        // One lifetime after the rotation the previous secret is gone, from the file too.
        assert!(tk.seal_at(&plain, t0 + 1100).is_some());
        let on_disk = decode_file(&std::fs::read(&path).unwrap()).unwrap();
        assert!(on_disk.previous.is_none());
        assert_eq!(on_disk, *k.keys.read());
        // A garbled file is replaced with new keys.
        std::fs::write(&path, b"garbage").unwrap();
        let k2 = keys(dir.path(), 100, 1000, t0 + 1101);
        assert!(k2.ticketer([7; 32]).open_at(&new, t0 + 1050).is_none());
        assert!(decode_file(&std::fs::read(&path).unwrap()).is_some());
    }

    #[test]
    fn binding_is_a_set_of_cas_and_covers_every_field() {
        let base = binding("tls 0.0.0.0:8883", false, &[], &[b"ca1", b"ca2"]);
        assert_eq!(
            base,
            binding("tls 0.0.0.0:8883", false, &[], &[b"ca2", b"ca1", b"ca1"])
        );
        for other in [
            binding("tls 0.0.0.0:8884", false, &[], &[b"ca1", b"ca2"]),
            binding("tls 0.0.0.0:8883", true, &[], &[b"ca1", b"ca2"]),
            binding(
                "tls 0.0.0.0:8883",
                false,
                &[b"mqtt".to_vec()],
                &[b"ca1", b"ca2"],
            ),
            binding("tls 0.0.0.0:8883", false, &[], &[b"ca1"]),
            binding("tls 0.0.0.0:8883", false, &[], &[b"ca1", b"ca2", b"ca3"]),
        ] {
            assert_ne!(base, other);
        }
    }

    /// Two handshakes in memory between a listener configuration with resumption and a
    /// client with a session store of its own, speaking only `version`; returns how
    /// the second went.
    fn second_handshake(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> rustls::HandshakeKind {
        use rustls::pki_types::ServerName;
        let pki = crate::transport::tls::TestPki::new();
        let server = pki.server_config(&crate::transport::tls::TlsOptions {
            resumption: Some(crate::transport::tls::Resumption {
                keys: keys(pki.dir.path(), 3600, 3600, now_secs()),
                listener: "tls test".into(),
            }),
            ..Default::default()
        });
        let mut client = pki.client_config(&[version]);
        client.resumption = rustls::client::Resumption::store(Arc::new(
            rustls::client::ClientSessionMemoryCache::new(8),
        ));
        let client = Arc::new(client);
        let name = ServerName::try_from("localhost").unwrap();
        let mut kind = None;
        for _ in 0..2 {
            let mut c = rustls::ClientConnection::new(client.clone(), name.clone()).unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            crate::transport::tls::handshake_in_memory(&mut c, &mut s);
            kind = s.handshake_kind();
        }
        kind.unwrap()
    }

    #[test]
    fn tls13_resumes_and_tls12_never_does() {
        assert_eq!(
            second_handshake(&rustls::version::TLS13),
            rustls::HandshakeKind::Resumed
        );
        assert_eq!(
            second_handshake(&rustls::version::TLS12),
            rustls::HandshakeKind::Full
        );
    }

    #[test]
    fn resumed_session_with_expired_certificate_is_refused() {
        let r = Resumed {
            cert_not_after: Some(1000),
        };
        assert_eq!(r.refusal(1000), None);
        assert!(r.refusal(1001).unwrap().contains("expired"));
        assert!(Resumed {
            cert_not_after: Some(i64::MIN)
        }
        .refusal(0)
        .is_some());
        assert_eq!(
            Resumed {
                cert_not_after: None
            }
            .refusal(i64::MAX),
            None
        );
    }
}
