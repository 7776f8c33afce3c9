//! The seam for just-in-time provisioning: a certificate the TLS handshake accepted
//! (it chains to a registered CA) but the registry does not know is handed, at its
//! first CONNECT, to whoever provisions such certificates (the provisioning service),
//! before the registry resolves it.

use std::future::Future;
use std::pin::Pin;

/// Provisions an unknown certificate at its first connection.
pub trait JustInTime: Send + Sync {
    /// Registers the certificate (`der`, the end-entity certificate as the client sent
    /// it) and runs what its CA asks for, for the connection `client_id`. `Ok(true)`:
    /// provisioned, the registry knows it now; `Ok(false)`: not for this provisioner
    /// (no template for its CA), the connection is refused as unregistered; `Err`: why
    /// provisioning failed, told to the client.
    fn provision<'a>(
        &'a self,
        der: &'a [u8],
        client_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>>;
}
