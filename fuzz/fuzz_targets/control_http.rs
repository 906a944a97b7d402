//! The VMM control socket's HTTP/1.1 parser (`control::http`): requests as the API thread reads
//! them, routed to an action or refused (`control::routes`), the answer written and read back by
//! the client's parser; and responses as `ControlClient` reads them. The peer's bytes arrive in
//! pieces the fuzzer chooses: a request is accepted or refused the same whatever the pieces.
#![no_main]

use cella_fuzz::Chunked;
use cella_vmm::control::http::{read_request, read_response, write_response, HttpError, Response};
use cella_vmm::control::http::{MAX_BODY, MAX_RESPONSE_BODY};
use cella_vmm::control::routes::{for_http_error, route};

/// The answer goes out and the client reads back the same status and body.
fn answer(response: &Response) {
    let mut out = Vec::new();
    write_response(&mut out, response).expect("writing to memory");
    let back = read_response(&mut &out[..]).expect("the client reads what the server writes");
    assert_eq!(back.status, response.status);
    assert_eq!(back.body, response.body.clone().unwrap_or_default());
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&side, rest)) = data.split_first() else { return };
    if side % 2 == 1 {
        if let Ok(response) = read_response(&mut Chunked::new(rest)) {
            assert!(response.body.len() <= MAX_RESPONSE_BODY);
        }
        return;
    }
    let pieces = read_request(&mut Chunked::new(rest));
    let (n, whole_input) = match rest.split_first() {
        Some((n, tail)) => (usize::from(n % 17).min(tail.len()), tail),
        None => (0, rest),
    };
    let whole = read_request(&mut &whole_input[n..]);
    match (&pieces, &whole) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the same request read in pieces and whole"),
        (Ok(_), Err(e)) => panic!("read in pieces, refused whole: {e:?}"),
        (Err(e), Ok(_)) => panic!("read whole, refused in pieces: {e:?}"),
        (Err(_), Err(_)) => {}
    }
    match pieces {
        Ok(request) => {
            assert!(request.body.len() <= MAX_BODY, "a body of {} bytes", request.body.len());
            assert!(request.path.starts_with('/'), "path {:?}", request.path);
            match route(&request) {
                Ok(_action) => {}
                Err(refusal) => answer(&refusal),
            }
        }
        Err(HttpError::Closed | HttpError::Io(_)) => {}
        Err(e) => answer(&for_http_error(&e)),
    }
});
