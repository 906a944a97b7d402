//! Turning rule-pack names and files into the compiled policy the runner receives. Packs are
//! parsed and validated here on the host (`cella-policies`); the runner only deserializes.

use std::path::Path;

use cella_policies::rules::{builtin_pack, compile as compile_packs, load_pack_file, load_packs};

/// The serialized policy for the built-in `packs` plus an optional pack file.
///
/// Built-in packs alone are combined without compiling their regexes (the tests validate every
/// built-in pack; compiling them again would be most of a small scan's launch time). A pack file
/// from outside is validated in full, together with the built-in packs it joins.
pub fn compile(packs: &[String], file: Option<&Path>) -> Result<Vec<u8>, String> {
    let names: Vec<&str> = packs.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).collect();
    let Some(path) = file else {
        return load_packs(&names).map(|p| p.into_bytes()).map_err(|e| cella_vmm::error_chain(&e));
    };
    let mut loaded = Vec::new();
    for name in names {
        loaded.push(builtin_pack(name).map_err(|e| cella_vmm::error_chain(&e))?);
    }
    loaded.push(load_pack_file(path).map_err(|e| cella_vmm::error_chain(&e))?);
    compile_packs(&loaded).map(|p| p.into_bytes()).map_err(|e| cella_vmm::error_chain(&e))
}
