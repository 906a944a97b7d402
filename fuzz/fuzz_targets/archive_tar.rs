//! The artifact readers on a tar archive (ustar, pax `x`/`g` headers, GNU long names, links)
//! and what it holds, nested archives too: extracted and scanned as the guest does
//! ([`cella_fuzz::artifact`]), with the limits and path rules checked on what is accepted.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cella_fuzz::artifact(data, "artifact.tar");
});
