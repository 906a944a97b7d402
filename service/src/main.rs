//! `cella`: the HTTPS API, tenants and keys, the PostgreSQL queue, workers, sessions, the admin
//! API and the CLI client. Arrives with the service issue; until then it only explains itself.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("cella: the service is not built yet; use `cella-vmm run` to launch a microVM");
    std::process::exit(2);
}
