//! The verifier's parallel stage. One thread reads blocks and deals them out in turn to the
//! workers, which parse and hash their events; another hashes the whole stream for the
//! manifest; the caller's thread takes the workers' results back in file order.
//!
//! Memory stays bounded: the block source bounds the blocks in flight, and each worker can
//! be at most [`RESULTS_AHEAD`] results ahead of the caller.

use std::io;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use ring::digest;

use super::blocks::{Block, BlockSource};
use crate::hash::Hash;

/// Results a worker may hold that the caller has not taken yet.
const RESULTS_AHEAD: usize = 2;

/// Size and SHA-256 of a whole stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamDigest {
    pub bytes: u64,
    pub sha256: Hash,
}

/// Hashes blocks in order until the sender hangs up or `stop` is set.
fn hash_blocks(blocks: mpsc::Receiver<Block<'_>>, stop: &AtomicBool) -> StreamDigest {
    let mut context = digest::Context::new(&digest::SHA256);
    let mut bytes = 0u64;
    for block in blocks {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        context.update(&block);
        bytes += block.len() as u64;
    }
    let mut sha256 = [0; 32];
    sha256.copy_from_slice(context.finish().as_ref());
    StreamDigest { bytes, sha256 }
}

/// Reads every block and sends it to worker `k % workers.len()` and to the hasher.
fn deal_blocks<'a>(
    source: &mut dyn BlockSource<'a>,
    workers: &[mpsc::Sender<Block<'a>>],
    hasher: &mpsc::Sender<Block<'a>>,
    stop: &AtomicBool,
) -> io::Result<()> {
    for worker in workers.iter().cycle() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Some(block) = source.next_block()? else { break };
        if hasher.send(block.clone()).is_err() || worker.send(block).is_err() {
            break;
        }
    }
    Ok(())
}

/// Parses each block it gets until the caller stops taking results.
fn work<'a, T: Send>(
    blocks: mpsc::Receiver<Block<'a>>,
    results: mpsc::SyncSender<T>,
    parse: &(dyn Fn(&[u8]) -> T + Sync),
) {
    for block in blocks {
        let parsed = parse(&block);
        drop(block); // back to the pool before waiting on the caller
        if results.send(parsed).is_err() {
            break;
        }
    }
}

/// Runs `parse` over `source`'s blocks on `workers` threads and hands the results to `take` in
/// block order until it breaks. Returns the size and SHA-256 of the whole stream, or `None`
/// when `take` stopped early.
pub fn run<'a, T: Send>(
    source: &mut dyn BlockSource<'a>,
    workers: usize,
    parse: &(dyn Fn(&[u8]) -> T + Sync),
    take: &mut dyn FnMut(T) -> ControlFlow<()>,
) -> io::Result<Option<StreamDigest>> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (to_hasher, hasher_blocks) = mpsc::channel();
        let stop = &stop;
        let hasher = s.spawn(move || hash_blocks(hasher_blocks, stop));
        let mut to_workers = Vec::with_capacity(workers.max(1));
        let mut from_workers = Vec::with_capacity(workers.max(1));
        for _ in 0..workers.max(1) {
            let (to_worker, blocks) = mpsc::channel();
            let (results, from_worker) = mpsc::sync_channel(RESULTS_AHEAD);
            s.spawn(move || work(blocks, results, parse));
            to_workers.push(to_worker);
            from_workers.push(from_worker);
        }
        let dealer = s.spawn(move || deal_blocks(source, &to_workers, &to_hasher, stop));
        // Worker k % n got block k; when it hangs up before that, the blocks have run out.
        let mut finished = true;
        for from_worker in from_workers.iter().cycle() {
            let Ok(result) = from_worker.recv() else { break };
            if take(result).is_break() {
                finished = false;
                stop.store(true, Ordering::Relaxed);
                break;
            }
        }
        drop(from_workers);
        let dealt = dealer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let digest = hasher.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        dealt?;
        Ok(finished.then_some(digest))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::blocks::{ReaderBlocks, SliceBlocks};

    fn lines_of(block: &[u8]) -> Vec<String> {
        block
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into())
            .collect()
    }

    fn data() -> Vec<u8> {
        (0..5000).flat_map(|i| format!("line {i}\n").into_bytes()).collect()
    }

    #[test]
    fn results_come_back_in_file_order_with_the_whole_stream_hashed() {
        let data = data();
        for workers in [1, 2, 3] {
            let mut seen = Vec::new();
            let mut source = ReaderBlocks::new(&data[..], 100, 2 * workers + 2);
            let digest = run(&mut source, workers, &lines_of, &mut |lines| {
                seen.extend(lines);
                ControlFlow::Continue(())
            })
            .unwrap();
            assert_eq!(seen, lines_of(&data));
            assert_eq!(
                digest,
                Some(StreamDigest { bytes: data.len() as u64, sha256: crate::hash::sha256(&data) })
            );
        }
    }

    #[test]
    fn stopping_early_ends_every_thread_and_gives_no_digest() {
        let data = data();
        let mut taken = 0;
        let mut source = SliceBlocks::new(&data, 64);
        let digest = run(&mut source, 2, &lines_of, &mut |_| {
            taken += 1;
            if taken == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!((taken, digest), (3, None));
    }

    #[test]
    fn a_read_error_is_returned() {
        struct Failing;
        impl io::Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let mut source = ReaderBlocks::new(Failing, 64, 2);
        let err = run(&mut source, 2, &lines_of, &mut |_| ControlFlow::Continue(())).unwrap_err();
        assert_eq!(err.to_string(), "disk on fire");
    }
}
