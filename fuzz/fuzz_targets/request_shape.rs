//! The walk that counts a request's ops before it is decoded: on any bytes
//! it never panics, and wherever prost decodes a request, the walk saw its
//! id and every one of its ops (so the server's refusal of too many ops
//! can be trusted, and a request it lets through decodes as counted).
//!
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run request_shape -- -max_len=65536

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use ramster_protocol::shape::{RequestShape, request_shape};
use ramster_protocol::v1;

fuzz_target!(|body: &[u8]| {
    let walked = request_shape(body);
    if let Ok(request) = v1::Request::decode(body) {
        assert_eq!(
            walked,
            Ok(RequestShape {
                id: request.id,
                ops: request.ops.len(),
            })
        );
    }
});
