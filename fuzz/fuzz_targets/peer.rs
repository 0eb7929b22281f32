//! The peer protocol's decoders, as a donor meets them: arbitrary bytes, cut
//! into pieces as a QUIC stream may deliver them, go through `split_frame`,
//! then decode as a `PeerHello` (checked by the handshake), as a
//! `PeerRequest` (applied to a small donor store, answer encoded), as a
//! `PeerResponse`, and as a JSON Raft message. Nothing may panic, and the
//! donor's accounting must hold after every input.
//!
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run peer -- -max_len=16384

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use parking_lot::Mutex;
use ramster_node::cluster::donor::{DonorConfig, DonorStore};
use ramster_node::cluster::membership::RaftRequest;
use ramster_node::cluster::rpc;
use ramster_protocol::peer::{PeerHello, PeerRequest, PeerResponse};
use ramster_protocol::{FRAME_BYTES_MAX, frame, peer_handshake};

/// Small enough that puts run into no_capacity and quotas quickly.
const DONATION_BYTES: u64 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, wire)) = data.split_first() else {
        return;
    };
    let piece = usize::from(cut).max(1);
    let donor = Mutex::new(DonorStore::new(DonorConfig::with_donation(DONATION_BYTES)));
    let mut buf = BytesMut::new();
    for chunk in wire.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            match frame::split_frame(&mut buf, FRAME_BYTES_MAX) {
                Ok(Some(body)) => {
                    if let Ok(hello) = frame::decode::<PeerHello>(body.clone()) {
                        let _ = peer_handshake::accept(&hello, "donor", 1);
                    }
                    if let Ok(req) = frame::decode::<PeerRequest>(body.clone()) {
                        if let Some(ramster_protocol::peer::peer_request::Kind::Raft(m)) = &req.kind
                        {
                            let _ = serde_json::from_slice::<RaftRequest>(&m.body);
                        }
                        // The authenticated peer is "owner": requests naming
                        // it are applied, others refused.
                        let resp = rpc::handle(&donor, "owner", req);
                        let mut out = BytesMut::new();
                        let _ = frame::encode(&resp, &mut out);
                        donor.lock().check_invariants();
                    }
                    let _ = frame::decode::<PeerResponse>(body);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
