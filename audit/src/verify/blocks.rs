//! `events.jsonl` cut into blocks of whole lines for the verifier's workers: borrowed from a
//! bundle held in memory, or read from a file into a few reused buffers, so that verifying a
//! file takes memory bounded by the block size, not by the file.

use std::io::{self, Read};
use std::ops::Deref;
use std::sync::{mpsc, Arc};

/// Block size the verifier reads `events.jsonl` in: small enough that a block is still in the
/// core's cache when the hasher and a worker read it after the copy from the file (1 MiB did
/// measurably better than 4 MiB), large enough that handing blocks between threads costs nothing.
pub const BLOCK_SIZE: usize = 1 << 20;

/// A run of whole lines: each ends with `\n`, except perhaps the last line of the file.
#[derive(Debug, Clone)]
pub enum Block<'a> {
    /// A slice of a bundle held in memory.
    Borrowed(&'a [u8]),
    /// A buffer of a [`ReaderBlocks`]'s pool; it goes back to the pool when the last clone drops.
    Pooled(Arc<PooledBuffer>),
}

impl Deref for Block<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Block::Borrowed(bytes) => bytes,
            Block::Pooled(buffer) => &buffer.data[..buffer.len],
        }
    }
}

/// Where the verifier gets its blocks from, in file order.
pub trait BlockSource<'a>: Send {
    /// The next block; `None` at the end.
    fn next_block(&mut self) -> io::Result<Option<Block<'a>>>;
}

/// Length of the first block of `data`, which holds the rest of the file: its whole lines up to
/// `max` bytes. A line longer than that is read on `max` bytes at a time up to the first chunk
/// holding a newline, and the block ends at that chunk's last newline. The rest of the file
/// when it is shorter than the bytes looked at.
///
/// [`ReaderBlocks`] cuts a file the same way without knowing its length.
fn first_block_len(data: &[u8], max: usize) -> usize {
    let mut searched = 0;
    let mut limit = max;
    while data.len() >= limit {
        if let Some(nl) = last_newline(&data[searched..limit]) {
            return searched + nl + 1;
        }
        searched = limit;
        limit += max;
    }
    data.len()
}

fn last_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().rposition(|b| *b == b'\n')
}

/// Blocks borrowed from `events.jsonl` held in memory.
#[derive(Debug)]
pub struct SliceBlocks<'a> {
    rest: &'a [u8],
    max: usize,
}

impl<'a> SliceBlocks<'a> {
    /// Blocks of at most `max` bytes (or one line, when a line is longer).
    pub fn new(data: &'a [u8], max: usize) -> Self {
        Self { rest: data, max: max.max(1) }
    }
}

impl<'a> BlockSource<'a> for SliceBlocks<'a> {
    fn next_block(&mut self) -> io::Result<Option<Block<'a>>> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (block, rest) = self.rest.split_at(first_block_len(self.rest, self.max));
        self.rest = rest;
        Ok(Some(Block::Borrowed(block)))
    }
}

/// A pool buffer while it is in use: its first `len` bytes are the block.
#[derive(Debug)]
pub struct PooledBuffer {
    data: Vec<u8>,
    len: usize,
    home: mpsc::Sender<Vec<u8>>,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        // The pool may be gone already (the reader finished): then the buffer is freed.
        let _ = self.home.send(std::mem::take(&mut self.data));
    }
}

/// At most `max` buffers of `size` bytes, reused: taking one when all are in use waits until a
/// block is dropped.
#[derive(Debug)]
struct BufferPool {
    free: mpsc::Receiver<Vec<u8>>,
    home: mpsc::Sender<Vec<u8>>,
    made: usize,
    max: usize,
    size: usize,
}

impl BufferPool {
    fn new(size: usize, max: usize) -> Self {
        let (home, free) = mpsc::channel();
        Self { free, home, made: 0, max: max.max(1), size }
    }

    fn take(&mut self) -> Vec<u8> {
        if let Ok(buffer) = self.free.try_recv() {
            return buffer;
        }
        if self.made < self.max {
            self.made += 1;
            return vec![0; self.size];
        }
        // The pool holds a sender itself, so this waits for a buffer rather than failing.
        self.free.recv().unwrap_or_else(|_| vec![0; self.size])
    }

    fn give_back(&self, buffer: Vec<u8>) {
        let _ = self.home.send(buffer);
    }

    fn lend(&self, data: Vec<u8>, len: usize) -> Block<'static> {
        Block::Pooled(Arc::new(PooledBuffer { data, len, home: self.home.clone() }))
    }
}

/// Blocks read from a reader into a pool of buffers.
#[derive(Debug)]
pub struct ReaderBlocks<R> {
    reader: R,
    pool: BufferPool,
    block_size: usize,
    /// The start of a line read past the last newline of the previous block.
    carry: Vec<u8>,
}

impl<R: Read + Send> ReaderBlocks<R> {
    /// Reads `reader` in blocks of at most `block_size` bytes (or one line, when a line is
    /// longer), through at most `buffers` buffers.
    pub fn new(reader: R, block_size: usize, buffers: usize) -> Self {
        let block_size = block_size.max(1);
        Self { reader, pool: BufferPool::new(block_size, buffers), block_size, carry: Vec::new() }
    }

    /// How many buffers were allocated so far.
    #[cfg(test)]
    pub fn buffers_made(&self) -> usize {
        self.pool.made
    }

    /// Reads into `buffer[filled..]` until it is full or the reader ends; returns the new fill.
    fn fill(&mut self, buffer: &mut [u8], mut filled: usize) -> io::Result<usize> {
        while filled < buffer.len() {
            match self.reader.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }
}

impl<'a, R: Read + Send> BlockSource<'a> for ReaderBlocks<R> {
    fn next_block(&mut self) -> io::Result<Option<Block<'a>>> {
        let mut buffer = self.pool.take();
        let mut limit = self.block_size;
        if buffer.len() < limit {
            buffer.resize(limit, 0);
        }
        // The carry holds no newline and is shorter than a block.
        let mut filled = self.carry.len();
        buffer[..filled].copy_from_slice(&self.carry);
        self.carry.clear();
        loop {
            let searched = filled;
            filled = self.fill(&mut buffer[..limit], filled)?;
            if filled < limit {
                break; // the end of the file: the last block is whatever is left
            }
            if let Some(nl) = last_newline(&buffer[searched..filled]) {
                let end = searched + nl + 1;
                self.carry.extend_from_slice(&buffer[end..filled]);
                filled = end;
                break;
            }
            // A line longer than a block: read on to its end.
            limit += self.block_size;
            if buffer.len() < limit {
                buffer.resize(limit, 0);
            }
        }
        if filled == 0 {
            self.pool.give_back(buffer);
            return Ok(None);
        }
        Ok(Some(self.pool.lend(buffer, filled)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect<'a>(mut source: impl BlockSource<'a>) -> Vec<Vec<u8>> {
        let mut blocks = Vec::new();
        while let Some(block) = source.next_block().unwrap() {
            blocks.push(block.to_vec());
        }
        blocks
    }

    /// A reader that hands out at most `step` bytes per read, as pipes and sockets may.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn check_blocks(data: &[u8], max: usize) {
        let from_slice = collect(SliceBlocks::new(data, max));
        for step in [1, 3, max, 1 << 20] {
            let from_reader = collect(ReaderBlocks::new(Trickle { data, step }, max, 2));
            assert_eq!(from_reader, from_slice, "step {step}, max {max}");
        }
        assert_eq!(from_slice.concat(), data);
        let last = from_slice.len().saturating_sub(1);
        for (i, block) in from_slice.iter().enumerate() {
            assert!(!block.is_empty());
            if i < last {
                assert_eq!(block.last(), Some(&b'\n'), "block {i} of {from_slice:?} ends mid-line");
            }
            let first_line = block.split_inclusive(|b| *b == b'\n').next().map_or(0, <[u8]>::len);
            assert!(block.len() <= max.max(first_line + max - 1), "block {i} too long for {max} bytes");
        }
    }

    #[test]
    fn blocks_hold_whole_lines_up_to_the_block_size() {
        let data = b"aaa\nbb\nc\ndddd\ne\n";
        check_blocks(data, 5);
        assert_eq!(collect(SliceBlocks::new(data, 5)), [&b"aaa\n"[..], b"bb\nc\n", b"dddd\n", b"e\n"]);
        // A boundary right after a newline, and the file's last line without one.
        assert_eq!(collect(SliceBlocks::new(b"ab\ncd\nef", 3)), [&b"ab\n"[..], b"cd\n", b"ef"]);
        check_blocks(b"ab\ncd\nef", 3);
        for max in 1..20 {
            check_blocks(b"x\n\nyy\nzzzzzzz\n\n", max);
            check_blocks(b"no newline at all", max);
        }
        assert!(collect(SliceBlocks::new(b"", 4)).is_empty());
        assert!(collect(ReaderBlocks::new(&b""[..], 4, 1)).is_empty());
    }

    #[test]
    fn a_line_longer_than_a_block_starts_a_block_of_its_own() {
        let data = b"a\nlong line here\nb\n";
        assert_eq!(collect(SliceBlocks::new(data, 4)), [&b"a\n"[..], b"long line here\n", b"b\n"]);
        check_blocks(data, 4);
    }

    #[test]
    fn reader_reuses_its_buffers_and_never_makes_more_than_allowed() {
        let data: Vec<u8> = (0..1000).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
        let mut blocks = ReaderBlocks::new(&data[..], 64, 3);
        // Dropping each block before taking the next: one buffer serves them all.
        while blocks.next_block().unwrap().is_some() {}
        assert_eq!(blocks.buffers_made(), 1);

        let mut blocks = ReaderBlocks::new(&data[..], 64, 3);
        let held: Vec<Block<'_>> = (0..3).map(|_| blocks.next_block().unwrap().unwrap()).collect();
        assert_eq!(blocks.buffers_made(), 3);
        assert!(held.iter().all(|b| b.len() <= 64));
        drop(held);
        let mut total = 3;
        while let Some(block) = blocks.next_block().unwrap() {
            assert!(block.len() <= 64 && block.ends_with(b"\n"));
            total += 1;
        }
        assert_eq!(blocks.buffers_made(), 3);
        assert!(total > 100);
    }
}
