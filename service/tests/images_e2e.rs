//! Container images end to end: `cella serve` and `cella scan --image` as real processes, a
//! real (jailed, as root) microVM, a `docker save`-style archive built by the test (a base
//! layer holding a key, a later layer deleting it with a whiteout and adding another, a third
//! layer compressed by the real `zstd` adding a third). Each
//! finding comes back at its path in the image with its layer and build step, the deleted one
//! marked; `--image` on an archive that holds no image fails with a clear message.

use std::process::Output;

use sqlx::PgPool;

mod common;
#[path = "../../guest/scan/tests/sarif_checks/mod.rs"]
mod sarif_checks;

use common::{cella, serve_jailed, tenant_key, test_db_url, Scratch};
use sarif_checks::checked_sarif;

/// `data` compressed by the `zstd` command (scripts/setup.sh installs it), as a stream.
fn zstd(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("zstd")
        .args(["-q", "-c", "-3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the zstd command (apt-get install zstd; scripts/setup.sh installs it)");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
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
    let server = serve_jailed(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant_key(&data, "img");

    let deleted = "STRIPE_KEY=sk_live_4eC39HqLyjWDarjtT1zdp7dc\n";
    let added = "STRIPE_KEY=sk_live_9fD48IrMzkXEbskuU2aeq8ed\n";
    let base =
        common::tar(&[("etc/app/payments.env", deleted.as_bytes()), ("usr/share/doc/readme", b"docs\n")]);
    let top = common::tar(&[("etc/app/.wh.payments.env", b""), ("srv/app.env", added.as_bytes())]);
    let tool = "STRIPE_KEY=sk_live_2aB59JsNalYFctlvV3bfr9fe\n";
    let compressed = zstd(&common::tar(&[("opt/tool.env", tool.as_bytes())]));
    let config =
        br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]},
        "history":[{"created_by":"ADD base.tar /"},{"created_by":"RUN rm /etc/app/payments.env"},
        {"created_by":"COPY tool.env /opt/"}]}"#;
    let blob = |d: &[u8]| format!("blobs/sha256/{}", digest(d));
    let manifest = format!(
        r#"[{{"Config":"{}","RepoTags":["shop/api:2.1"],"Layers":["{}","{}","{}"]}}]"#,
        blob(config),
        blob(&base),
        blob(&top),
        blob(&compressed)
    );
    let image = common::tar(&[
        (&blob(config), config),
        (&blob(&base), &base),
        (&blob(&top), &top),
        (&blob(&compressed), &compressed),
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
    assert!(text(&o).contains("image: shop/api:2.1: 3 layers"), "{}", text(&o));
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
            r#"opt/tool.env "shop/api:2.1" 3 "COPY tool.env /opt/" null"#,
            r#"srv/app.env "shop/api:2.1" 2 "RUN rm /etc/app/payments.env" null"#,
        ]
    );

    // --image on an archive that holds no image says so.
    let plain = dir.join("plain.tar");
    std::fs::write(&plain, common::tar(&[("a.txt", b"hello\n")])).unwrap();
    let o = cella(&data, Some(&key), &["scan", "--image", plain.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("holds no container image"), "{}", text(&o));
}
