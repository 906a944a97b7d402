//! The git history reader on a bundle (v2/v3 header, the pack's objects and deltas, commits,
//! trees and tags) and the scan of what it holds: extracted and scanned as the guest does
//! ([`cella_fuzz::artifact`]). Built with `--cfg fuzzing`, the pack's SHA-1 trailer is not
//! checked, so mutated packs reach the object and delta parsers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cella_fuzz::artifact(data, "repo.bundle");
});
