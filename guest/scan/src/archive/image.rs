//! Container images: a `docker save` archive or an OCI image layout (as a tar) is scanned like
//! any tar, each layer blob opened as the nested (gzip'd) tar it is; meanwhile the image's own
//! JSON (`manifest.json`, `index.json`, manifests, configs) is kept and every layer's entries
//! noted. Once the walk is done, [`attribute`] reads the manifests: each finding in a layer is
//! given its path in the image, the image, the layer (index and digest) and the history step
//! (`created_by`) that added it, and is marked when a later layer deletes it (a whiteout:
//! `.wh.NAME`, or an opaque `.wh..wh..opq` folder) or replaces it. Deleted files are still in
//! the image (any `docker save` or registry pull has them), so they are reported.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;

use serde::Serialize;
use serde_json::Value;

use crate::engine::Engine;
use crate::finding::{Finding, Report};

/// JSON files of an image kept while walking it (configs and manifests are small).
const MAX_JSON: usize = 4 << 20;
/// A reader keeps at most this much of a file for [`Capture::keep`] (one byte more than it
/// keeps, so an overlong file is told apart).
pub(crate) const MAX_KEPT: usize = MAX_JSON;
/// At most this much image JSON is kept in all.
const MAX_JSON_TOTAL: usize = 32 << 20;

/// The image a finding came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageOrigin {
    /// The image: its tags (`repo:tag`, comma-separated), else its manifest's digest.
    pub image: String,
    /// The layer (1 = the base), and its digest or archive path.
    pub layer: u32,
    pub layer_digest: String,
    /// The build step that made the layer (`created_by` of the config's history), if told.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// A later layer deletes (whiteout) or replaces this file: it is not in the running
    /// container, but it is in the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_in_layer: Option<u32>,
}

/// What an artifact's images held (the summary's `image`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ImageSummary {
    /// The images (tags or digests).
    pub images: Vec<String>,
    /// Layers read.
    pub layers: u64,
    /// Files in them (whiteouts not counted).
    pub files: u64,
    /// Findings in files a later layer deletes or replaces.
    pub findings_removed: u64,
}

impl core::fmt::Display for ImageSummary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "image: {}: {} layers, {} files", self.images.join(", "), self.layers, self.files)?;
        if self.findings_removed > 0 {
            write!(
                f,
                "; {} findings in files a later layer deletes (still in the image)",
                self.findings_removed
            )?;
        }
        Ok(())
    }
}

/// What the walk keeps for [`attribute`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Capture {
    /// Top-level JSON files by path.
    json: BTreeMap<String, Vec<u8>>,
    json_total: usize,
    /// Entries inside top-level archives: (archive path, path inside).
    entries: Vec<(String, String)>,
}

impl Capture {
    /// Whether the top-level file at `path` may be image JSON worth keeping.
    pub(crate) fn wants(&self, path: &str) -> bool {
        !path.contains("!/")
            && self.json_total < MAX_JSON_TOTAL
            && (matches!(path, "manifest.json" | "index.json")
                || path.starts_with("blobs/")
                || (path.ends_with(".json") && !path.contains('/'))
                || path.ends_with("/json"))
    }

    /// Keeps `bytes` of `path` if they are a JSON object or array (and small).
    pub(crate) fn keep(&mut self, path: &str, bytes: &[u8]) {
        let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
        if bytes.len() > MAX_JSON || !matches!(start.map(|i| bytes[i]), Some(b'{' | b'[')) {
            return;
        }
        self.json_total += bytes.len();
        self.json.insert(String::from(path), bytes.to_vec());
    }

    /// Notes an entry `inner` of the top-level archive `outer` (`outer!/inner`).
    pub(crate) fn note(&mut self, path: &str) {
        if let Some((outer, inner)) = path.split_once("!/") {
            if !inner.contains("!/") {
                self.entries.push((String::from(outer), String::from(inner)));
            }
        }
    }

    fn json(&self, path: &str) -> Option<Value> {
        serde_json::from_slice(self.json.get(path)?).ok()
    }
}

/// One image: its name, its layers (archive paths, in order) and each layer's build step.
struct Image {
    name: String,
    layers: Vec<String>,
    created_by: Vec<Option<String>>,
}

/// `sha256:abc` as the OCI layout's blob path `blobs/sha256/abc`.
fn blob_path(digest: &str) -> Option<String> {
    let (algorithm, hex) = digest.split_once(':')?;
    let ok =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    (ok(algorithm) && ok(hex)).then(|| alloc::format!("blobs/{algorithm}/{hex}"))
}

/// The non-empty steps of a config's `history`, one per layer.
fn steps(config: Option<Value>, layers: usize) -> Vec<Option<String>> {
    let mut out: Vec<Option<String>> = config
        .as_ref()
        .and_then(|c| c["history"].as_array())
        .map(|h| {
            h.iter()
                .filter(|step| step["empty_layer"] != Value::Bool(true))
                .map(|step| step["created_by"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    out.resize(layers, None);
    out
}

/// The images an archive's captured JSON describes: `manifest.json` (`docker save`), else
/// the OCI layout's `index.json` (nested indexes followed one level).
fn images(capture: &Capture) -> Vec<Image> {
    let mut out = Vec::new();
    if let Some(Value::Array(entries)) = capture.json("manifest.json") {
        for entry in entries {
            let layers: Vec<String> = entry["Layers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_str().map(String::from))
                .collect();
            let tags: Vec<&str> =
                entry["RepoTags"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let config = entry["Config"].as_str().unwrap_or_default();
            let name = if tags.is_empty() { String::from(config) } else { tags.join(", ") };
            let created_by = steps(capture.json(config), layers.len());
            out.push(Image { name, layers, created_by });
        }
        return out;
    }
    let Some(index) = capture.json("index.json") else { return out };
    let mut manifests: Vec<(String, Value)> = Vec::new();
    for m in index["manifests"].as_array().into_iter().flatten() {
        let Some(digest) = m["digest"].as_str() else { continue };
        let Some(doc) = blob_path(digest).and_then(|p| capture.json(&p)) else { continue };
        let name = m["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .or_else(|| m["annotations"]["io.containerd.image.name"].as_str())
            .map_or_else(|| String::from(digest), String::from);
        if doc["manifests"].is_array() {
            // An image index (several platforms): each of its manifests.
            for inner in doc["manifests"].as_array().into_iter().flatten() {
                let Some(d) = inner["digest"].as_str() else { continue };
                if let Some(doc) = blob_path(d).and_then(|p| capture.json(&p)) {
                    let platform = inner["platform"]["architecture"].as_str().unwrap_or("?");
                    manifests.push((alloc::format!("{name} ({platform})"), doc));
                }
            }
        } else {
            manifests.push((name, doc));
        }
    }
    for (name, doc) in manifests {
        let layers: Vec<String> = doc["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["digest"].as_str().and_then(blob_path))
            .collect();
        let config = doc["config"]["digest"].as_str().and_then(blob_path).and_then(|p| capture.json(&p));
        let created_by = steps(config, layers.len());
        out.push(Image { name, layers, created_by });
    }
    out
}

/// The folder part of a path (`a/b/c` → `a/b/`, `c` → ``).
fn folder(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..=i])
}

/// Whether the whiteout entry `wh` (a path inside a layer) deletes `path`.
fn deletes(wh: &str, path: &str) -> bool {
    let dir = folder(wh);
    let name = &wh[dir.len()..];
    if name == ".wh..wh..opq" {
        // An opaque folder: everything the lower layers had in it.
        return dir.is_empty() || path.starts_with(dir);
    }
    let Some(target) = name.strip_prefix(".wh.") else { return false };
    let deleted = alloc::format!("{dir}{target}");
    path == deleted || path.strip_prefix(deleted.as_str()).is_some_and(|rest| rest.starts_with('/'))
}

/// Gives the findings in image layers their image paths and origins (see the module
/// documentation). Does nothing if the artifact held no image.
pub(crate) fn attribute(report: &mut Report, engine: &mut Engine) {
    let Some(capture) = report.image_capture.take() else { return };
    let images = images(&capture);
    // An image is one whose layers are in the archive: a stray `manifest.json` is a file.
    let present: BTreeSet<&str> = capture.entries.iter().map(|(outer, _)| outer.as_str()).collect();
    if !images.iter().any(|i| i.layers.iter().any(|l| present.contains(l.as_str()))) {
        return;
    }
    // Layer archive path → (image, layer index from 1, build step); the first image naming a
    // shared layer names it.
    let mut layer_of: BTreeMap<&str, (usize, u32)> = BTreeMap::new();
    for (i, image) in images.iter().enumerate() {
        for (n, layer) in image.layers.iter().enumerate() {
            layer_of.entry(layer.as_str()).or_insert((i, n as u32 + 1));
        }
    }
    // Each layer's files and whiteouts.
    let mut files: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut whiteouts: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut file_count = 0u64;
    for (outer, inner) in &capture.entries {
        if !layer_of.contains_key(outer.as_str()) {
            continue;
        }
        let name = &inner[folder(inner).len()..];
        if name.starts_with(".wh.") {
            whiteouts.entry(outer).or_default().push(inner);
        } else {
            files.entry(outer).or_default().insert(inner);
            file_count += 1;
        }
    }
    let removed_in = |image: &Image, layer: u32, path: &str| -> Option<u32> {
        image.layers.iter().enumerate().skip(layer as usize).find_map(|(n, later)| {
            let gone = whiteouts.get(later.as_str()).is_some_and(|w| w.iter().any(|wh| deletes(wh, path)))
                || files.get(later.as_str()).is_some_and(|f| f.contains(path));
            gone.then_some(n as u32 + 1)
        })
    };
    let mut removed = 0u64;
    let mut by_file: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (k, f) in report.findings.iter_mut().enumerate() {
        let Some((outer, inner)) = f.path.split_once("!/") else { continue };
        let Some(&(i, layer)) = layer_of.get(outer) else { continue };
        let image = &images[i];
        let origin = ImageOrigin {
            image: image.name.clone(),
            layer,
            layer_digest: String::from(
                outer.rsplit('/').next().filter(|_| outer.starts_with("blobs/")).unwrap_or(outer),
            ),
            created_by: image.created_by.get(layer as usize - 1).cloned().flatten(),
            removed_in_layer: removed_in(image, layer, inner),
        };
        removed += u64::from(origin.removed_in_layer.is_some());
        f.path = String::from(inner);
        f.image = Some(Box::new(origin));
        by_file.entry(alloc::format!("{}\0{}", layer, f.path)).or_default().push(k);
    }
    // Fingerprints follow the image path (stable across rebuilds that change layer digests).
    for (key, indexes) in by_file {
        let path = key.split_once('\0').map_or("", |(_, p)| p);
        let mut group: Vec<Finding> = indexes.iter().map(|&k| report.findings[k].clone()).collect();
        engine.renumber(path, &mut group);
        for (k, f) in indexes.into_iter().zip(group) {
            report.findings[k] = f;
        }
    }
    report.image = Some(ImageSummary {
        images: images.iter().map(|i| i.name.clone()).collect(),
        layers: layer_of.len() as u64,
        files: file_count,
        findings_removed: removed,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteouts_delete_files_folders_and_opaque_folders() {
        assert!(deletes("etc/.wh.secret.env", "etc/secret.env"));
        assert!(!deletes("etc/.wh.secret.env", "etc/secret.env.bak"));
        assert!(deletes("etc/.wh.app", "etc/app/config.env"));
        assert!(!deletes("etc/.wh.app", "etc/application.env"));
        assert!(deletes("etc/app/.wh..wh..opq", "etc/app/x"));
        assert!(!deletes("etc/app/.wh..wh..opq", "etc/other"));
        assert!(deletes(".wh.root.txt", "root.txt"));
    }

    #[test]
    fn digests_become_blob_paths_and_odd_ones_do_not() {
        assert_eq!(blob_path("sha256:abc123").as_deref(), Some("blobs/sha256/abc123"));
        assert_eq!(blob_path("sha256:../../x"), None);
        assert_eq!(blob_path("nocolon"), None);
    }
}
