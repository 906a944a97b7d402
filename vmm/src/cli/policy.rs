//! Turning rule-pack names and files into the compiled policy the runner receives. Packs are
//! parsed and validated here on the host (`cella-policies`); the runner only deserializes.

use std::path::Path;

use cella_policies::rules::{builtin_pack, compile as compile_packs, load_pack_file};

/// The serialized policy for the built-in `packs` plus an optional pack file.
pub fn compile(packs: &[String], file: Option<&Path>) -> Result<Vec<u8>, String> {
    let mut loaded = Vec::new();
    for name in packs.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        loaded.push(builtin_pack(name).map_err(|e| cella_vmm::error_chain(&e))?);
    }
    if let Some(path) = file {
        loaded.push(load_pack_file(path).map_err(|e| cella_vmm::error_chain(&e))?);
    }
    compile_packs(&loaded).map(|p| p.into_bytes()).map_err(|e| cella_vmm::error_chain(&e))
}
