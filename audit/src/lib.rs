//! Cella's audit log: per-tenant hash chains (plus one chain for operator/admin events), signed
//! Merkle checkpoints, export bundles and the offline verifier.
//!
//! - [`event`]: the event model and its canonical encoding ([`canonical`], RFC 8785); an event's
//!   hash is SHA-256 of those bytes and each event names the previous one's hash.
//! - [`store`]: PostgreSQL. [`store::append`] writes an event inside the caller's transaction
//!   (the one making the state change), serialized per chain by a head row;
//!   [`store::cut_checkpoint`] and [`store::run_checkpointer`] sign tree heads every N events or
//!   T seconds, whichever comes first.
//! - [`merkle`]: RFC 6962 trees, inclusion and consistency proofs; [`checkpoint`]: signed tree
//!   heads (Ed25519, ring); [`keys`]: key files (0600) and public keys; [`config`]: the key
//!   path and checkpoint policy as the service configures them.
//! - [`export`] and [`bundle`]: the tar bundle; [`verify`]: the offline verifier;
//!   [`proof`]: single-event inclusion proofs; [`ocsf`]: the optional SIEM mapping.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod canonical;
pub mod checkpoint;
pub mod config;
pub mod event;
#[cfg(feature = "db")]
pub mod export;
pub mod hash;
pub mod keys;
pub mod merkle;
pub mod ocsf;
pub mod proof;
#[cfg(feature = "db")]
pub mod store;
pub mod verify;

pub use checkpoint::{Checkpoint, CheckpointPolicy};
pub use event::{Actor, Chain, NewEvent, Resource, TenantId};
pub use keys::{PublicKey, SigningKey};
#[cfg(feature = "db")]
pub use store::{append, Appended};
