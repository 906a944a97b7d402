//! The audit bundle reader and verifier (`cella_audit::bundle`, `cella_audit::verify`) over
//! arbitrary tar bytes, both ways a bundle is verified: streamed from a file (`verify_tar`: the
//! tar index, then members read as needed) and held in memory (`Bundle::read`, then
//! `verify_bundle`). The two share every check, so they must agree on what verifies.
#![no_main]

use std::io::Cursor;

use cella_audit::bundle::Bundle;
use cella_audit::verify::{verify_bundle, verify_tar, Options, Trust};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The bundle's own keys: every structural check runs (a fuzzed bundle has no key to pin).
    let options = Options { trust: Trust::BundleKeys, threads: 1 };
    let streamed = verify_tar(Cursor::new(data), &options);
    let in_memory = Bundle::read(data).map(|bundle| verify_bundle(&bundle, &options));
    match (&streamed, &in_memory) {
        (Ok(a), Ok(Ok(b))) => assert_eq!(a, b, "the two verifications report differently"),
        (Ok(report), _) => panic!("verified streamed ({report}), not in memory: {in_memory:?}"),
        (Err(e), Ok(Ok(report))) => panic!("verified in memory ({report}), not streamed: {e}"),
        (Err(_), _) => {}
    }
});
