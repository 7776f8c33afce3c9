//! Provisioning templates: parsing, validation and evaluation (to be written).
