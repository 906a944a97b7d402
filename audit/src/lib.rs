//! Cella's audit log: per-tenant hash chains, signed Merkle checkpoints, export bundles and the
//! offline verifier. Arrives with the audit issue.
#![forbid(unsafe_code)]
