//! The snapshot state file (`snapshot::format::decode`): read as the file's raw bytes, and as a
//! body wrapped in a valid header and checksum (`format::encode_raw`) so that the fuzzer reaches
//! the JSON body behind the SHA-256. A state that decodes encodes to a file that decodes again
//! to the same encoding.
#![no_main]

use std::path::Path;

use cella_vmm::snapshot::format::{decode, encode, encode_raw, FORMAT_VERSION, VMM_VERSION};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let file = if mode % 2 == 0 { rest.to_vec() } else { encode_raw(FORMAT_VERSION, VMM_VERSION, rest) };
    let path = Path::new("state.bin");
    if let Ok(state) = decode(path, &file) {
        let again = encode(&state);
        let back = decode(path, &again).expect("a re-encoded state decodes");
        assert_eq!(encode(&back), again, "a state survives encoding twice");
    }
});
