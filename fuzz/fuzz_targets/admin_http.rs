//! The admin endpoint's request-head parser on arbitrary bytes, fed as the
//! server reads them: growing prefixes of one connection's bytes. Nothing
//! may panic; once a prefix gets an answer (a request or an error), every
//! longer one gets the same, so where the reads happen to split the bytes
//! never changes what is served; a request it accepts is one of the three
//! methods with an absolute path, and written back out it parses the same.
//!
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run admin_http -- -max_len=9000

#![no_main]

use libfuzzer_sys::fuzz_target;
use ramster_node::admin::http::{Method, REQUEST_HEAD_BYTES_MAX, parse_head};

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut decided = None;
    let mut end = 0;
    while end < bytes.len() {
        end = (end + step).min(bytes.len());
        let got = parse_head(&bytes[..end]);
        match (&decided, got) {
            (None, Ok(None)) => assert!(end < REQUEST_HEAD_BYTES_MAX),
            (None, got) => decided = Some(got),
            (Some(first), got) => assert_eq!(first, &got, "a longer read changed the answer"),
        }
    }
    if let Some(Ok(Some(req))) = decided {
        assert!(req.path.starts_with('/'));
        let method = match req.method {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
        };
        let query = if req.query.is_empty() {
            String::new()
        } else {
            format!("?{}", req.query)
        };
        let again = format!("{method} {}{query} HTTP/1.1\r\n\r\n", req.path);
        if again.len() <= REQUEST_HEAD_BYTES_MAX {
            assert_eq!(parse_head(again.as_bytes()), Ok(Some(req)));
        }
    }
});
