//! The artifact readers on a zip archive (end record, central directory, local headers, stored
//! and deflated entries, symlinks) and what it holds: extracted and scanned as the guest does
//! ([`cella_fuzz::artifact`]), with the limits and path rules checked on what is accepted.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cella_fuzz::artifact(data, "artifact.zip");
});
