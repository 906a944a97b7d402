//! `cella-proto` on the guest side, over bytes the host sends: the runner's frame decoder, a
//! scan job (`Job`), session requests (`SessionRequest`) with the attachment each one needs,
//! and what the runner builds from them: a grep pattern compiled with the runner's limits and
//! run over a small index, a policy (`Engine::from_policy_json`) used for a scan of the index
//! and for a redacted read (`mask_findings`), and added content (`Index::add_artifact`). The
//! request loop follows `guest/runner/src/rt/modes/session.rs`, which runs only in the guest.
#![no_main]

use cella_proto::{self as proto, Kind, SessionRequest};
use cella_scan::index::{mask_findings, Grep, GrepLimits, Index, MaskedView};
use cella_scan::{normalize_entry_path, Engine, Limits, Report, SliceSource};

/// Content an index may hold (the runner's is half the guest heap).
const INDEX_BUDGET: u64 = 1 << 20;

/// A grep over the raw text (`allow`) and, with a masking policy that loads, over the masked
/// view (`redact`, `deny`): the same caps hold either way.
fn grep(index: &Index, pattern: &str, max_matches: u32, path_prefix: Option<&str>, policy: Option<&[u8]>) {
    if max_matches == 0 || max_matches > proto::GREP_MAX_MATCHES {
        return;
    }
    let limits = GrepLimits { max_pattern: proto::GREP_MAX_PATTERN, ..GrepLimits::default() };
    let Ok(mut grep) = Grep::new(pattern, &limits) else { return };
    let mut view = None;
    if let Some(Ok(mut engine)) = policy.map(Engine::from_policy_json) {
        let mut masked = MaskedView::new();
        if masked.extend(index, &mut engine).is_ok() {
            view = Some(masked);
        }
    }
    for view in [None, view.as_ref()] {
        let found = index.grep(&mut grep, view, path_prefix, max_matches as usize, proto::GREP_MAX_LINE);
        assert!(
            found.matches.len() <= max_matches as usize,
            "{} matches over {max_matches}",
            found.matches.len()
        );
        for m in &found.matches {
            assert!(m.text.len() <= proto::GREP_MAX_LINE, "a line of {} bytes", m.text.len());
            assert!(m.line >= 1 && m.column >= 1, "line {} column {}", m.line, m.column);
        }
    }
}

fn read(index: &Index, path: &str, policy: Option<&[u8]>) {
    let (Some(file), Some(policy)) = (index.get(path), policy) else { return };
    let Ok(mut engine) = Engine::from_policy_json(policy) else { return };
    if let Ok(Some((masked, _))) = mask_findings(&mut engine, path, &file.bytes) {
        assert_eq!(masked.len(), file.bytes.len(), "masking keeps the length");
    }
}

fn scan(index: &Index, policy: Option<&[u8]>, limits: &Limits) {
    let Some(Ok(mut engine)) = policy.map(Engine::from_policy_json) else { return };
    let mut report = Report::default();
    if index.scan(&mut engine, limits, &mut report).is_ok() {
        let _ =
            cella_scan::sarif::to_json(engine.policy(), &report, &cella_scan::sarif::RunDetails::default());
        let _ = report.summary_json(engine.policy(), 0);
    }
}

fn add(index: &mut Index, name: &str, data: &[u8], limits: &Limits) {
    match normalize_entry_path(name) {
        Ok(normal) if normal == name && !name.contains('!') => {}
        _ => return,
    }
    let budget = INDEX_BUDGET.saturating_sub(index.bytes());
    let before = index.bytes();
    if let Ok(added) = index.add_artifact(&mut SliceSource(data), name, &format!("{name}/"), limits, budget) {
        assert_eq!(index.bytes(), before + added.bytes, "index bytes after an add");
        assert!(index.bytes() <= INDEX_BUDGET, "the index grew past its budget");
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = cella_fuzz::artifact_limits();
    let mut index = Index::new();
    let text = b"user: admin\npassword = \"hunter2-hunter2\"\ncontact alice@example.com\n";
    index
        .add_artifact(&mut SliceSource(text), "notes.txt", "", &limits, INDEX_BUDGET)
        .expect("the base index");

    let mut decoder = proto::Decoder::default();
    decoder.push(data);
    let mut pending: Option<(Kind, Vec<u8>)> = None;
    loop {
        let (kind, payload) = match pending.take() {
            Some(frame) => frame,
            None => match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(_) => return,
            },
        };
        match kind {
            Kind::Job => {
                let _ = proto::decode_json::<proto::Job>(&payload);
                continue;
            }
            Kind::SessionRequest => {}
            _ => continue,
        }
        let Ok(request) = proto::decode_json::<SessionRequest>(&payload) else { continue };
        let attachment = match request.attachment() {
            None => None,
            Some(needed) => match decoder.next_frame() {
                Ok(Some((got, bytes))) if got == needed => Some(bytes),
                Ok(Some(other)) => {
                    pending = Some(other);
                    continue;
                }
                Ok(None) | Err(_) => return,
            },
        };
        match &request {
            SessionRequest::Grep { pattern, max_matches, path_prefix } => {
                grep(&index, pattern, *max_matches, path_prefix.as_deref(), attachment.as_deref())
            }
            SessionRequest::Read { path, .. } => read(&index, path, attachment.as_deref()),
            SessionRequest::Scan { .. } => scan(&index, attachment.as_deref(), &limits),
            SessionRequest::Add { name } => add(&mut index, name, &attachment.unwrap_or_default(), &limits),
            SessionRequest::Stats => {}
            SessionRequest::Stop => return,
        }
    }
});
