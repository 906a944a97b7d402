//! `cella-proto` on the host side, over bytes a runner sends: a scan job's stream as the job
//! server reads it (`job::decode_runner_stream`: hello, then an error or SARIF and summary; the
//! summary then parsed as `cella-vmm scan` does), a session reply as the session client reads
//! it (`session_client::decode_reply`: response, then the frames it announces), and the frame
//! decoder fed the same bytes whole and in pieces (the frames must not depend on the split).
#![no_main]

use cella_proto::Decoder;
use cella_vmm::job::{decode_runner_stream, ScanOutcome};
use cella_vmm::session_client::decode_reply;

/// Frames until the stream runs out or breaks the framing (and that error).
fn frames(decoder: &mut Decoder) -> Vec<Result<(cella_proto::Kind, Vec<u8>), cella_proto::ProtoError>> {
    let mut out = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => out.push(Ok(frame)),
            Ok(None) => return out,
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&selector, wire)) = data.split_first() else { return };
    match selector % 3 {
        0 => {
            if let Ok(ScanOutcome::Completed { summary, .. }) = decode_runner_stream(wire) {
                let _ = serde_json::from_slice::<serde_json::Value>(&summary);
            }
        }
        1 => {
            if let Ok(reply) = decode_reply(wire) {
                assert_eq!(reply.frames.len(), reply.response.frames as usize, "frames announced and read");
                let _ = serde_json::to_value(&reply.response.result);
            }
        }
        _ => {
            let mut whole = Decoder::default();
            whole.push(wire);
            let expected = frames(&mut whole);
            let mut pieces = Decoder::default();
            let mut got = Vec::new();
            let step = usize::from(selector / 3) + 1;
            for piece in wire.chunks(step) {
                pieces.push(piece);
                got.extend(frames(&mut pieces));
                if got.last().is_some_and(Result::is_err) {
                    break;
                }
            }
            assert_eq!(got, expected, "frames read in pieces of {step} bytes differ from the whole");
        }
    }
});
