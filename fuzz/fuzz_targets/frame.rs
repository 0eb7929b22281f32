//! The native API's decoder, from the first byte a client sends to the
//! response it gets: arbitrary bytes, cut into pieces as a socket may deliver
//! them, go through `split_frame`, then decode as the handshake's `Hello` and
//! as a `Request`; every request that decodes is executed on a small front
//! end, as the server would, and its response encoded. Nothing may panic.
//!
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run frame -- -max_len=16384

#![no_main]

use std::sync::Arc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ramster_node::frontend::{Frontend, api};
use ramster_node::metrics::NodeMetrics;
use ramster_node::store::{PageStore, StoreConfig};
use ramster_protocol::{BATCH_OPS_MAX, FRAME_BYTES_MAX, frame, handshake, shape, v1};

/// Small enough that stores run into `no_capacity` and eviction quickly.
const STORE_CAPACITY_BYTES: u64 = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, wire)) = data.split_first() else {
        return;
    };
    // The first byte picks the piece size, so partial headers and bodies
    // arriving in several reads are explored too.
    let piece = usize::from(cut).max(1);

    // A fresh front end per input keeps every crash reproducible from its
    // input alone. Area 1 persistent, area 2 writethrough, pools 0 and 1
    // exist, so ops reach the store instead of stopping at "unknown".
    let frontend = Arc::new(Frontend::new(
        "fuzz",
        Arc::new(PageStore::new(StoreConfig::with_capacity(
            STORE_CAPACITY_BYTES,
        ))),
    ));
    let metrics = Arc::new(NodeMetrics::default());
    // With no cluster nothing waits on a donor, so one thread runs it all.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    frontend.init_area(1, false).expect("area 1 is in range");
    frontend.init_area(2, true).expect("area 2 is in range");
    frontend.new_pool(false);
    frontend.new_pool(true);

    let mut buf = BytesMut::new();
    for chunk in wire.chunks(piece) {
        buf.extend_from_slice(chunk);
        // Each frame takes at least its header off the buffer, so this ends.
        loop {
            match frame::split_frame(&mut buf, FRAME_BYTES_MAX) {
                Ok(Some(body)) => {
                    assert!(!body.is_empty() && body.len() <= FRAME_BYTES_MAX);
                    if let Ok(hello) = frame::decode::<v1::Hello>(body.clone()) {
                        let _ = handshake::accept(&hello, "fuzz");
                    }
                    // The server refuses larger batches before decoding.
                    let shape = shape::request_shape(&body);
                    if shape.is_ok_and(|s| s.ops <= BATCH_OPS_MAX)
                        && let Ok(request) = frame::decode::<v1::Request>(body)
                    {
                        let ops = request.ops.len();
                        let response = runtime.block_on(api::execute(
                            frontend.clone(),
                            metrics.clone(),
                            runtime.handle().clone(),
                            request,
                        ));
                        // A request is answered op by op, or refused
                        // whole (its answer could outgrow a frame).
                        if response.error.is_none() {
                            assert_eq!(response.results.len(), ops);
                        }
                        let mut out = BytesMut::new();
                        frame::encode(&response, &mut out)
                            .expect("the reckoning keeps answers under the frame limit");
                    }
                }
                Ok(None) => break,
                // The stream position is lost: the server closes here.
                Err(_) => return,
            }
        }
    }
});
