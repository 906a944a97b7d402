//! Turning rule-pack names and files into the compiled policy the runner receives. Packs are
//! parsed and validated here on the host (`cella-policies`); the runner only deserializes.

use std::path::Path;

use std::io::Read;

use cella_policies::rules::{builtin_pack, compile as compile_packs, load_pack_file, load_packs};

/// The largest compiled policy file read (`--compiled-policy`).
const MAX_COMPILED_POLICY: u64 = 64 << 20;

/// The serialized policy for the built-in `packs` plus an optional pack file, or the policy of
/// a `compiled` file.
///
/// Built-in packs alone are combined without compiling their regexes (the tests validate every
/// built-in pack; compiling them again would be most of a small scan's launch time). A pack file
/// from outside is validated in full, together with the built-in packs it joins. A compiled
/// policy is checked for its shape and format version only: whoever wrote it validated its
/// packs (the service, when they were uploaded), and the guest compiles each regex it uses.
pub fn compile(packs: &[String], file: Option<&Path>, compiled: Option<&Path>) -> Result<Vec<u8>, String> {
    if let Some(path) = compiled {
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_COMPILED_POLICY + 1).read_to_end(&mut bytes))
            .map_err(|e| format!("cannot read compiled policy {}: {e}", path.display()))?;
        if bytes.len() as u64 > MAX_COMPILED_POLICY {
            return Err(format!(
                "compiled policy {} is larger than {MAX_COMPILED_POLICY} bytes",
                path.display()
            ));
        }
        return cella_policies::rules::tenant::read_compiled(bytes)
            .map(|p| p.into_bytes())
            .map_err(|e| format!("{}: {}", path.display(), cella_vmm::error_chain(&e)));
    }
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
