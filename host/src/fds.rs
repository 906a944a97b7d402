//! Descriptors over the control socket (`SCM_RIGHTS`): the client sends them with the first
//! bytes of its request, the API thread collects them as it reads the request.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The most descriptors one request may carry.
pub const MAX_FDS: usize = 4;

/// Room for one more descriptor than allowed, so a request with too many is seen as such.
const RECV_FDS: usize = MAX_FDS + 1;

/// Control-message space for `n` descriptors (`CMSG_SPACE`), in u64 words so it is aligned.
const fn cmsg_words(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    let bytes = unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) } as usize;
    bytes.div_ceil(8)
}

/// Sends `bytes` with `fds` attached; returns how many bytes went (the descriptors go with
/// the first byte).
pub fn send_with_fds(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let mut cmsg = [0u64; cmsg_words(MAX_FDS)];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        if fds.len() > MAX_FDS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors for one request"));
        }
        let data_len = std::mem::size_of_val(fds);
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
        // SAFETY: msg_control points at `cmsg`, large enough for one header and MAX_FDS
        // descriptors, so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for `fds`.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(data_len as u32) as usize;
            let data = libc::CMSG_DATA(header).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at live buffers (`iov` over `bytes`, `cmsg`) for the call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A reader over a connection that keeps the descriptors that arrive with its bytes.
#[derive(Debug)]
pub struct FdReader<'a> {
    stream: &'a UnixStream,
    pub fds: Vec<OwnedFd>,
    /// More descriptors came than fit (or the kernel cut them short): refuse the request.
    pub too_many: bool,
}

impl<'a> FdReader<'a> {
    pub fn new(stream: &'a UnixStream) -> Self {
        FdReader { stream, fds: Vec::new(), too_many: false }
    }
}

impl Read for FdReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut cmsg = [0u64; cmsg_words(RECV_FDS)];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        // SAFETY: `msg` points at live buffers (`iov` over `buf`, `cmsg`) for the call.
        let n = unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            self.too_many = true;
        }
        // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed
        // control messages; each SCM_RIGHTS one holds (cmsg_len - CMSG_LEN(0)) / 4 new
        // descriptors this process now owns.
        unsafe {
            let mut header = libc::CMSG_FIRSTHDR(&msg);
            while !header.is_null() {
                if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                    let count =
                        ((*header).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                    let data = libc::CMSG_DATA(header).cast::<RawFd>();
                    for i in 0..count {
                        self.fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                header = libc::CMSG_NXTHDR(&msg, header);
            }
        }
        if self.fds.len() > MAX_FDS {
            self.too_many = true;
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_arrive_with_the_bytes_and_too_many_are_noticed() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, _y) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        assert_eq!(send_with_fds(&a, b"hello", &[x.as_fd(), file.as_fd()]).unwrap(), 5);
        (&a).write_all(b" world").unwrap();
        drop(a);
        let mut reader = FdReader::new(&b);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello world");
        assert_eq!(reader.fds.len(), 2);
        assert!(!reader.too_many);
        // The second is the file: it reads as one.
        let mut got = std::fs::File::from(reader.fds.pop().unwrap());
        let mut elf = [0u8; 4];
        got.read_exact(&mut elf).unwrap();
        assert_eq!(&elf, b"\x7fELF");

        let (a, b) = UnixStream::pair().unwrap();
        let many: Vec<_> = (0..MAX_FDS).map(|_| x.as_fd()).collect();
        send_with_fds(&a, b"1", &many).unwrap();
        send_with_fds(&a, b"2", &[x.as_fd()]).unwrap();
        drop(a);
        let mut reader = FdReader::new(&b);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert!(reader.too_many, "{} descriptors", reader.fds.len());
    }
}
