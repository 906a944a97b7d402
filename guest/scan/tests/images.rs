//! Container images built by the test, layer by layer: a `docker save` archive and an OCI
//! image layout. Each finding in a layer is reported at its path in the image with the image,
//! its layer and the build step that made it; a file a later layer deletes (a whiteout) or
//! replaces is still reported, marked so; zstd layers are read like gzip ones.

mod common;
mod sarif_checks;

use cella_scan::{Limits, Report};
use common::*;
use miniz_oxide::deflate::compress_to_vec;
use sha2::{Digest, Sha256};

fn sha(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    out.extend(compress_to_vec(data, 6));
    out.extend(crc32(data).to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out
}

const KEY_DELETED: &str = "tok_aaaaaaaaaaaaaaaa";
const KEY_KEPT: &str = "tok_bbbbbbbbbbbbbbbb";
const KEY_LAYER2: &str = "tok_cccccccccccccccc";
const KEY_REPLACED: &str = "tok_dddddddddddddddd";
const KEY_CONFIG: &str = "tok_eeeeeeeeeeeeeeee";
const KEY_LAYER3: &str = "tok_ffffffffffffffff";

/// The layers (as stored: the second gzip'd, the third zstd) and the config.
fn layers_and_config() -> (Vec<Vec<u8>>, Vec<u8>) {
    let deleted = format!("A={KEY_DELETED}\n");
    let kept = format!("B={KEY_KEPT}\n");
    let replaced = format!("D={KEY_REPLACED}\n");
    let layer1 = tar(&[
        file("etc/app/config.env", deleted.as_bytes()),
        file("etc/keep.txt", kept.as_bytes()),
        file("srv/old.txt", replaced.as_bytes()),
        file("usr/bin/tool", b"\x7fELF nothing here"),
    ]);
    let new = format!("C={KEY_LAYER2}\n");
    let layer2 = gzip(&tar(&[
        file("etc/app/.wh.config.env", b""),
        file("opt/new.env", new.as_bytes()),
        file("srv/old.txt", b"now empty\n"),
    ]));
    let extra = format!("F={KEY_LAYER3}\n");
    let layer3 = zstd_stored(&tar(&[file("srv/extra.env", extra.as_bytes())]));
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["API_TOKEN={KEY_CONFIG}"]}},
        "rootfs":{{"type":"layers","diff_ids":[]}},
        "history":[{{"created_by":"ADD rootfs.tar /"}},{{"created_by":"ENV A=1","empty_layer":true}},
        {{"created_by":"RUN rm /etc/app/config.env"}},{{"created_by":"COPY extra /"}}]}}"#
    );
    (vec![layer1, layer2, layer3], config.into_bytes())
}

fn docker_save() -> Vec<u8> {
    let (layers, config) = layers_and_config();
    let blob = |d: &[u8]| format!("blobs/sha256/{}", sha(d));
    let manifest = format!(
        r#"[{{"Config":"{}","RepoTags":["acme/app:1.0"],"Layers":["{}","{}","{}"]}}]"#,
        blob(&config),
        blob(&layers[0]),
        blob(&layers[1]),
        blob(&layers[2])
    );
    let names: Vec<String> = layers.iter().map(|l| blob(l)).collect();
    let config_name = blob(&config);
    tar(&[
        file(&config_name, &config),
        file(&names[0], &layers[0]),
        file(&names[1], &layers[1]),
        file(&names[2], &layers[2]),
        file("manifest.json", manifest.as_bytes()),
        file("repositories", br#"{"acme/app":{"1.0":"x"}}"#),
    ])
}

fn oci_layout() -> Vec<u8> {
    let (layers, config) = layers_and_config();
    let desc = |d: &[u8], media: &str| {
        format!(r#"{{"mediaType":"{media}","digest":"sha256:{}","size":{}}}"#, sha(d), d.len())
    };
    let manifest = format!(
        r#"{{"schemaVersion":2,"config":{},"layers":[{},{},{}]}}"#,
        desc(&config, "application/vnd.oci.image.config.v1+json"),
        desc(&layers[0], "application/vnd.oci.image.layer.v1.tar"),
        desc(&layers[1], "application/vnd.oci.image.layer.v1.tar+gzip"),
        desc(&layers[2], "application/vnd.oci.image.layer.v1.tar+zstd"),
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"acme/app:oci"}}}}]}}"#,
        sha(manifest.as_bytes()),
        manifest.len()
    );
    let blob = |d: &[u8]| format!("blobs/sha256/{}", sha(d));
    let names =
        [blob(&config), blob(&layers[0]), blob(&layers[1]), blob(&layers[2]), blob(manifest.as_bytes())];
    tar(&[
        file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        file("index.json", index.as_bytes()),
        file(&names[0], &config),
        file(&names[1], &layers[0]),
        file(&names[2], &layers[1]),
        file(&names[3], &layers[2]),
        file(&names[4], manifest.as_bytes()),
    ])
}

/// Each finding as `path:line layer N (removed in M) created_by`, sorted.
fn placed(r: &Report) -> Vec<String> {
    let mut out: Vec<String> = r
        .findings
        .iter()
        .map(|f| match &f.image {
            Some(i) => format!(
                "{}:{} layer {}{} {}",
                f.path,
                f.line,
                i.layer,
                i.removed_in_layer.map(|l| format!(" removed in {l}")).unwrap_or_default(),
                i.created_by.as_deref().unwrap_or("-")
            ),
            None => format!("{}:{} not in a layer", f.path, f.line),
        })
        .collect();
    out.sort();
    out
}

fn check(report: &Report, image: &str, config_path: &str) {
    assert_eq!(
        placed(report),
        [
            format!("{config_path}:1 not in a layer"),
            "etc/app/config.env:1 layer 1 removed in 2 ADD rootfs.tar /".to_owned(),
            "etc/keep.txt:1 layer 1 ADD rootfs.tar /".to_owned(),
            "opt/new.env:1 layer 2 RUN rm /etc/app/config.env".to_owned(),
            "srv/extra.env:1 layer 3 COPY extra /".to_owned(),
            "srv/old.txt:1 layer 1 removed in 2 ADD rootfs.tar /".to_owned(),
        ]
    );
    let summary = report.image.as_ref().expect("an image summary");
    assert_eq!(
        (summary.images.as_slice(), summary.layers, summary.findings_removed),
        ([image.to_owned()].as_slice(), 3, 2)
    );
    // Every layer was read, the zstd one too.
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    // Fingerprints follow the path in the image, not the layer's digest.
    let keep = report.findings.iter().find(|f| f.path == "etc/keep.txt").unwrap();
    let loose = scan(format!("B={KEY_KEPT}\n").as_bytes(), "etc/keep.txt").unwrap();
    assert_eq!(keep.location_fingerprint, loose.findings[0].location_fingerprint);
    // SARIF: the layer in each result's properties and message, both writers alike, valid.
    let details = cella_scan::sarif::RunDetails::default();
    let value = cella_scan::sarif::to_value(&policy(), report, &details);
    assert_eq!(
        cella_scan::sarif::to_json(&policy(), report, &details),
        serde_json::to_string_pretty(&value).unwrap()
    );
    assert_eq!(sarif_checks::schema_errors(&value), Vec::<String>::new());
    let results = value["runs"][0]["results"].as_array().unwrap();
    let gone = results.iter().find(|r| r["properties"]["image"]["removedInLayer"] == 2).unwrap();
    assert_eq!(gone["properties"]["image"]["image"], image);
    assert!(gone["message"]["text"].as_str().unwrap().contains("deleted by layer 2, but still in the image"));
}

#[test]
fn a_docker_save_archive_is_scanned_layer_by_layer() {
    let data = docker_save();
    let report = scan_with(&data, "app.tar", &Limits::default()).unwrap();
    let (_, config) = layers_and_config();
    check(&report, "acme/app:1.0", &format!("blobs/sha256/{}", sha(&config)));
}

#[test]
fn an_oci_image_layout_is_scanned_layer_by_layer() {
    let data = oci_layout();
    let report = scan_with(&data, "app-oci.tar", &Limits::default()).unwrap();
    let (_, config) = layers_and_config();
    check(&report, "acme/app:oci", &format!("blobs/sha256/{}", sha(&config)));
}

#[test]
fn a_tar_that_only_looks_like_an_image_is_a_tar() {
    // A manifest naming layers that are not there, and a broken index: plain files.
    let secret = format!("{SECRET}\n");
    let data = tar(&[
        file("manifest.json", br#"[{"Config":"c.json","Layers":["missing/layer.tar"]}]"#),
        file("index.json", b"{ not json"),
        file("notes.txt", secret.as_bytes()),
    ]);
    let report = scan(&data, "x.tar").unwrap();
    assert_eq!(triples(&report), ["notes.txt:1:test-token"]);
    assert!(report.findings[0].image.is_none());
    assert!(report.image.is_none(), "{:?}", report.image);
}
