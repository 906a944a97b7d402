//! The artifact readers on a zstd stream (frame headers and their window bound, skippable
//! frames, every block type through ruzstd, frame after frame) and what it holds: extracted and
//! scanned as the guest does ([`cella_fuzz::artifact`]), with the limits and path rules checked
//! on what is accepted.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cella_fuzz::artifact(data, "layer.tar.zst");
});
