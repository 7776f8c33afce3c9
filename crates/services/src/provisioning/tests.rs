//! Provisioning service tests.
