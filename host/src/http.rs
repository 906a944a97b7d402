//! The little HTTP/1.1 the control socket speaks: one request per connection (the server
//! always answers `Connection: close`), a request line, headers, and a body of exactly
//! `Content-Length` bytes, at most [`MAX_BODY`]. Parsing is strict: CRLF line ends, no header
//! folding, no chunked bodies, one `Content-Length`, and no bytes that are not ASCII in the
//! head. The client half reads responses the same way.

use std::io::{Read, Write};

/// The most a request or response head (request line and headers) may take.
pub const MAX_HEAD: usize = 8 << 10;
/// The most a request body may take (`413` beyond it).
pub const MAX_BODY: usize = 64 << 10;
/// The most a response body may take (a run report is a few hundred bytes).
pub const MAX_RESPONSE_BODY: usize = 1 << 20;

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The peer closed before sending anything: not an error worth an answer.
    #[error("the connection closed before a request arrived")]
    Closed,
    /// Malformed (answered with 400).
    #[error("{0}")]
    Malformed(String),
    /// Head or body over the limit (answered with 413).
    #[error("{0}")]
    TooLarge(String),
    #[error("cannot read the request")]
    Io(#[source] std::io::Error),
}

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// A response to write.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// A JSON body (none for 204).
    pub body: Option<Vec<u8>>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        Response { status, body: Some(serde_json::to_vec(value).unwrap_or_default()), allow: None }
    }

    pub fn no_content() -> Self {
        Response { status: 204, body: None, allow: None }
    }

    /// An error with `{"fault_message": message}`.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        Response::json(status, &serde_json::json!({ "fault_message": message.into() }))
    }
}

/// The standard reason phrase for the statuses this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes `response`, closing the exchange (`Connection: close`).
pub fn write_response(out: &mut impl Write, response: &Response) -> std::io::Result<()> {
    let mut head =
        format!("HTTP/1.1 {} {}\r\nConnection: close\r\n", response.status, reason(response.status));
    if let Some(allow) = response.allow {
        head.push_str(&format!("Allow: {allow}\r\n"));
    }
    match &response.body {
        Some(body) => {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            ));
            let mut all = head.into_bytes();
            all.extend_from_slice(body);
            out.write_all(&all)?;
        }
        None => {
            head.push_str("\r\n");
            out.write_all(head.as_bytes())?;
        }
    }
    out.flush()
}

/// Reads until the end of the head; returns the head and whatever body bytes came with it.
fn read_head(input: &mut impl Read) -> Result<(String, Vec<u8>), HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            if end > MAX_HEAD {
                return Err(HttpError::TooLarge(format!("the request head is over {MAX_HEAD} bytes")));
            }
            let rest = buf.split_off(end + 4);
            buf.truncate(end);
            if !buf.is_ascii() {
                return Err(HttpError::Malformed("the request head holds bytes that are not ASCII".into()));
            }
            let head = String::from_utf8(buf).map_err(|_| HttpError::Malformed("not ASCII".into()))?;
            return Ok((head, rest));
        }
        // No blank line yet: refuse once none could still end the head within the limit (the
        // last 3 bytes may begin one), so the answer does not depend on how the bytes arrive.
        if buf.len() >= MAX_HEAD + 4 {
            return Err(HttpError::TooLarge(format!("the request head is over {MAX_HEAD} bytes")));
        }
        // A bare LF would leave the head unterminated until the client's timeout: refuse it now.
        if buf.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r')) {
            return Err(HttpError::Malformed("lines must end with CRLF, not a bare LF".into()));
        }
        let n = match input.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HttpError::Io(e)),
        };
        if n == 0 {
            return Err(if buf.is_empty() {
                HttpError::Closed
            } else {
                HttpError::Malformed("the connection closed in the middle of the request head".into())
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Headers as `(lowercased name, value)`.
type Headers<'a> = Vec<(String, &'a str)>;

/// Splits the head into its first line and its headers.
fn parse_head(head: &str) -> Result<(&str, Headers<'_>), HttpError> {
    let bad = |why: String| HttpError::Malformed(why);
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut headers = Vec::new();
    for line in lines {
        if line.contains('\n') || line.contains('\r') {
            return Err(bad("header lines must end with CRLF".into()));
        }
        if line.starts_with([' ', '\t']) {
            return Err(bad("folded header lines are not accepted".into()));
        }
        let (name, value) =
            line.split_once(':').ok_or_else(|| bad(format!("header line without a colon: {line:?}")))?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(bad(format!("bad header name {name:?}")));
        }
        headers.push((name.to_ascii_lowercase(), value.trim_matches([' ', '\t'])));
    }
    if first.contains('\n') || first.contains('\r') {
        return Err(bad("the request line must end with CRLF".into()));
    }
    Ok((first, headers))
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The body length the headers announce (none: 0). Refuses chunked bodies and repeats.
fn content_length(headers: &[(String, &str)], max: usize) -> Result<usize, HttpError> {
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(HttpError::Malformed("Transfer-Encoding is not supported; send Content-Length".into()));
    }
    let mut lengths = headers.iter().filter(|(n, _)| n == "content-length").map(|(_, v)| *v);
    let Some(value) = lengths.next() else { return Ok(0) };
    if lengths.next().is_some() {
        return Err(HttpError::Malformed("more than one Content-Length".into()));
    }
    if value.is_empty() || value.len() > 12 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Malformed(format!("bad Content-Length {value:?}")));
    }
    let len: usize =
        value.parse().map_err(|_| HttpError::Malformed(format!("bad Content-Length {value:?}")))?;
    if len > max {
        return Err(HttpError::TooLarge(format!("a body of {len} bytes is over the {max}-byte limit")));
    }
    Ok(len)
}

/// Reads the rest of a `len`-byte body of which `have` arrived with the head.
fn read_body(input: &mut impl Read, mut have: Vec<u8>, len: usize) -> Result<Vec<u8>, HttpError> {
    have.truncate(len);
    let start = have.len();
    have.resize(len, 0);
    let mut filled = start;
    while filled < len {
        match input.read(&mut have[filled..]) {
            Ok(0) => {
                return Err(HttpError::Malformed(format!(
                    "the body ended after {filled} of the {len} bytes Content-Length announced"
                )))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HttpError::Io(e)),
        }
    }
    Ok(have)
}

/// Reads one request.
pub fn read_request(input: &mut impl Read) -> Result<Request, HttpError> {
    let (head, rest) = read_head(input)?;
    let (line, headers) = parse_head(&head)?;
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, path, version] = parts[..] else {
        return Err(HttpError::Malformed(format!("bad request line {line:?}: want `METHOD /path HTTP/1.1`")));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::Malformed(format!("bad method {method:?}")));
    }
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HttpError::Malformed(format!("bad request target {path:?}: want an absolute path")));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Malformed(format!(
            "unsupported protocol {version:?}: this server speaks HTTP/1.1"
        )));
    }
    let len = content_length(&headers, MAX_BODY)?;
    let body = read_body(input, rest, len)?;
    Ok(Request { method: method.to_owned(), path: path.to_owned(), body })
}

/// A response as the client reads it.
#[derive(Debug)]
pub struct ClientResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Reads one response (the client side): status line, headers, `Content-Length` body (or
/// none for 204).
pub fn read_response(input: &mut impl Read) -> Result<ClientResponse, HttpError> {
    let (head, rest) = read_head(input)?;
    let (line, headers) = parse_head(&head)?;
    let mut parts = line.splitn(3, ' ');
    let (version, status) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !version.starts_with("HTTP/1.") || status.len() != 3 {
        return Err(HttpError::Malformed(format!("bad status line {line:?}")));
    }
    let status: u16 =
        status.parse().map_err(|_| HttpError::Malformed(format!("bad status line {line:?}")))?;
    let len = if status == 204 { 0 } else { content_length(&headers, MAX_RESPONSE_BODY)? };
    let body = read_body(input, rest, len)?;
    Ok(ClientResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut &raw[..])
    }

    #[test]
    fn reads_a_request_with_a_body() {
        let req = parse(b"PATCH /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n{\"state\":\"paused\"}")
            .unwrap();
        assert_eq!(req.method, "PATCH");
        assert_eq!(req.path, "/vm");
        assert_eq!(req.body, br#"{"state":"paused"}"#);
        let req = parse(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
        assert!(req.body.is_empty());
    }

    #[test]
    fn refuses_malformed_requests() {
        for raw in [
            &b"GET /vm\r\n\r\n"[..],
            b"get /vm HTTP/1.1\r\n\r\n",
            b"GET vm HTTP/1.1\r\n\r\n",
            b"GET /vm HTTP/2\r\n\r\n",
            b"GET  /vm HTTP/1.1\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET /vm HTTP/1.1\nHost: x\r\n\r\n",
            b"PUT /actions HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            b"PUT /actions HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"PUT /actions HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
            b"GET /vm HTTP/1.1\r\nX: \xff\r\n\r\n",
            b"GET /vm HTT",
        ] {
            let e = parse(raw).unwrap_err();
            assert!(matches!(e, HttpError::Malformed(_)), "{:?}: {e:?}", String::from_utf8_lossy(raw));
        }
        assert!(matches!(parse(b""), Err(HttpError::Closed)));
    }

    #[test]
    fn refuses_oversize_heads_and_bodies() {
        let big = format!("PUT /actions HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(matches!(parse(big.as_bytes()), Err(HttpError::TooLarge(_))));
        let long = format!("GET /vm HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD + 10));
        assert!(matches!(parse(long.as_bytes()), Err(HttpError::TooLarge(_))));
        let at_limit =
            format!("PUT /actions HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n{}", "a".repeat(MAX_BODY));
        assert_eq!(parse(at_limit.as_bytes()).unwrap().body.len(), MAX_BODY);
    }

    /// Hands out its bytes in pieces of the given sizes, then the rest at once.
    struct Pieces<'a>(&'a [u8], Vec<usize>);

    impl Read for Pieces<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let want = if self.1.is_empty() { usize::MAX } else { self.1.remove(0) };
            let n = want.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_head_up_to_the_limit_is_accepted_however_its_bytes_arrive() {
        // The control_http fuzz target checks that a request reads the same whole and in pieces:
        // a head of 8190 bytes got a 413 when 8193 bytes were buffered before its blank line was
        // complete (fuzz/corpus/control_http/crash-head-8190-in-pieces).
        for head_len in MAX_HEAD - 2..=MAX_HEAD {
            let start = "GET /vm HTTP/1.1\r\nX-Pad: ";
            let raw = format!("{start}{}\r\n\r\n", "a".repeat(head_len - start.len()));
            for extra in 1..=3 {
                let mut pieces = vec![1024; MAX_HEAD / 1024];
                pieces.push(extra);
                let req = read_request(&mut Pieces(raw.as_bytes(), pieces)).unwrap();
                assert_eq!((req.method.as_str(), req.path.as_str()), ("GET", "/vm"), "{head_len} {extra}");
            }
        }
    }

    #[test]
    fn a_head_over_the_limit_is_refused_however_its_bytes_arrive() {
        let start = "GET /vm HTTP/1.1\r\nX-Pad: ";
        let raw = format!("{start}{}\r\n\r\n", "a".repeat(MAX_HEAD + 1 - start.len()));
        for extra in 1..=5 {
            let mut pieces = vec![1024; MAX_HEAD / 1024];
            pieces.push(extra);
            let e = read_request(&mut Pieces(raw.as_bytes(), pieces)).unwrap_err();
            assert!(matches!(e, HttpError::TooLarge(_)), "{extra}: {e:?}");
        }
    }

    #[test]
    fn responses_round_trip() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::fault(409, "busy")).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
        let back = read_response(&mut &out[..]).unwrap();
        assert_eq!(back.status, 409);
        assert_eq!(back.body, br#"{"fault_message":"busy"}"#);
        let mut out = Vec::new();
        write_response(&mut out, &Response::no_content()).unwrap();
        assert_eq!(read_response(&mut &out[..]).unwrap().status, 204);
    }
}
