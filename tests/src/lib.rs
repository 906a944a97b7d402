//! End-to-end tests for Cella: they start the real binaries against the real `/dev/kvm`.
//! Shared helpers for the test files in `tests/tests/`.
