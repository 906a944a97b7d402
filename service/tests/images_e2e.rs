//! Container images end to end: `cella serve` and `cella scan --image` as real processes, a
//! real (jailed, as root) microVM, a `docker save`-style archive built by the test (a base
//! layer holding a key, a later layer deleting it with a whiteout and adding another). Each
//! finding comes back at its path in the image with its layer and build step, the deleted one
//! marked; `--image` on an archive that holds no image fails with a clear message.

use std::path::Path;
use std::process::Output;

use sqlx::PgPool;

mod common;
#[path = "../../guest/scan/tests/sarif_checks/mod.rs"]
mod sarif_checks;

use common::{cella, test_db_url, Scratch, Serve, Server};
use sarif_checks::checked_sarif;

fn serve(data: &Path, db: &str) -> Server {
    let jailed = if common::is_root() { "1" } else { "0" };
    Serve::new(data)
        .db(Some(db))
        .envs(&[("CELLA_JAILED", jailed), ("CELLA_LEASE_SECS", "2"), ("CELLA_DRAIN_SECS", "1")])
        .start()
}

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A blob name for `data` (the scanner does not check digests; a real image's are SHA-256).
fn digest(data: &[u8]) -> String {
    let h =
        data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}").repeat(4)
}

#[sqlx::test(migrations = "../migrations")]
async fn an_image_is_scanned_layer_by_layer_and_a_deleted_key_is_still_found(pool: PgPool) {
    let dir = Scratch::new("images-e2e");
    let server = serve(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let o = cella(&data, None, &["tenant", "create", "img"]);
    assert!(o.status.success(), "{}", text(&o));
    let key = String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("API key "))
        .unwrap()
        .trim()
        .to_owned();

    let deleted = "STRIPE_KEY=sk_live_4eC39HqLyjWDarjtT1zdp7dc\n";
    let added = "STRIPE_KEY=sk_live_9fD48IrMzkXEbskuU2aeq8ed\n";
    let base = tar_of(&[("etc/app/payments.env", deleted.as_bytes()), ("usr/share/doc/readme", b"docs\n")]);
    let top = tar_of(&[("etc/app/.wh.payments.env", b""), ("srv/app.env", added.as_bytes())]);
    let config =
        br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]},
        "history":[{"created_by":"ADD base.tar /"},{"created_by":"RUN rm /etc/app/payments.env"}]}"#;
    let blob = |d: &[u8]| format!("blobs/sha256/{}", digest(d));
    let manifest = format!(
        r#"[{{"Config":"{}","RepoTags":["shop/api:2.1"],"Layers":["{}","{}"]}}]"#,
        blob(config),
        blob(&base),
        blob(&top)
    );
    let image = tar_of(&[
        (&blob(config), config),
        (&blob(&base), &base),
        (&blob(&top), &top),
        ("manifest.json", manifest.as_bytes()),
    ]);
    let archive = dir.join("api.tar");
    std::fs::write(&archive, &image).unwrap();

    let sarif = dir.join("image.sarif");
    let o = cella(
        &data,
        Some(&key),
        &["scan", "--image", archive.to_str().unwrap(), "--sarif", sarif.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("image: shop/api:2.1: 2 layers"), "{}", text(&o));
    assert!(text(&o).contains("etc/app/payments.env:1 [layer 1, deleted in 2]"), "{}", text(&o));
    let log = checked_sarif(&sarif);
    let mut placed: Vec<String> = log["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ruleId"] == "stripe-secret-key")
        .map(|r| {
            let uri = r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].as_str().unwrap();
            let i = &r["properties"]["image"];
            format!("{uri} {} {} {} {}", i["image"], i["layer"], i["createdBy"], i["removedInLayer"])
        })
        .collect();
    placed.sort();
    assert_eq!(
        placed,
        [
            r#"etc/app/payments.env "shop/api:2.1" 1 "ADD base.tar /" 2"#,
            r#"srv/app.env "shop/api:2.1" 2 "RUN rm /etc/app/payments.env" null"#,
        ]
    );

    // --image on an archive that holds no image says so.
    let plain = dir.join("plain.tar");
    std::fs::write(&plain, tar_of(&[("a.txt", b"hello\n")])).unwrap();
    let o = cella(&data, Some(&key), &["scan", "--image", plain.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("holds no container image"), "{}", text(&o));
}
