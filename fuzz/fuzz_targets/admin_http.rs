//! What the admin endpoint does with a request hyper has parsed: any
//! target (path and query) under each method, routed against a standalone
//! node. Nothing may panic; reads answer 200, 404, 405 or 503 and change
//! nothing; a change is refused unless it names one of the change paths
//! with its parameters; and the store's capacity changes only through
//! `/v1/capacity`, never beyond what it started with. HTTP itself (heads,
//! limits, keep-alive) is hyper's.
//!
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run admin_http -- -max_len=600

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use ramster_node::admin::AdminContext;
use ramster_node::admin::http::{Method, Request};
use ramster_node::frontend::Frontend;
use ramster_node::frontend::nbd::Exports;
use ramster_node::metrics::NodeMetrics;
use ramster_node::store::{PageStore, StoreConfig};

const CAPACITY: u64 = 8 << 20;

fn context() -> &'static AdminContext {
    static CTX: OnceLock<AdminContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let store = Arc::new(PageStore::new(StoreConfig::with_capacity(CAPACITY)));
        let fe = Arc::new(Frontend::new("fuzz", store));
        let exports = Arc::new(Exports::open(&[], fe.clone(), std::path::Path::new("/")).unwrap());
        AdminContext::new(fe, Arc::new(NodeMetrics::default()), exports, None)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(target) = std::str::from_utf8(rest) else {
        return;
    };
    let target = format!("/{}", target.trim_start_matches('/'));
    let method = match which % 3 {
        0 => Method::Get,
        1 => Method::Head,
        _ => Method::Post,
    };
    let req = Request::new(method, &target);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let ctx = context();
    let answer = rt.block_on(ctx.answer(&req));
    let code = answer.status.code();
    let capacity = ctx.status().capacity_bytes;
    assert!(capacity <= CAPACITY, "capacity grew to {capacity}");
    match method {
        Method::Get | Method::Head => {
            assert!([200, 404, 405, 503].contains(&code), "{target}: {code}");
        }
        Method::Post => {
            if code == 200 {
                assert!(
                    req.path == "/v1/capacity",
                    "{target} changed something on a standalone node"
                );
            }
        }
    }
});
