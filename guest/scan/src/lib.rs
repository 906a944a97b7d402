//! Cella's scan engine: finds secrets, personal data and licenses in a tenant's artifact. It runs
//! inside the microVM (`no_std` + `alloc`), and natively on the host for benchmarks.
#![no_std]
#![forbid(unsafe_code)]
