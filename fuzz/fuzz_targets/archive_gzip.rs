//! The artifact readers on a gzip stream (header fields, raw deflate through miniz_oxide, the
//! CRC-32 and size trailer) and what it holds: extracted and scanned as the guest does
//! ([`cella_fuzz::artifact`]), with the limits and path rules checked on what is accepted.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cella_fuzz::artifact(data, "artifact.tar.gz");
});
