//! The NBD handshake and command parsers on arbitrary bytes, driven the way
//! the server drives them: client flags, then options until one fails or
//! the bytes run out; the same bytes as a stream of transmission requests,
//! each checked against an export. Nothing may panic, every parser must
//! consume what it claims and no more, and an incomplete request must say
//! how many bytes it still lacks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ramster_node::frontend::nbd::proto;

/// Feeds `buf` through `parse` message by message; bounded because each
/// message consumes at least one byte.
fn drain<T>(
    mut buf: &[u8],
    header_bytes: usize,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, proto::ProtoError>,
    mut each: impl FnMut(&T),
) {
    for _ in 0..=buf.len() {
        match parse(buf) {
            Ok(Some((value, used))) => {
                assert!(used >= header_bytes && used <= buf.len());
                each(&value);
                buf = &buf[used..];
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, used))) = proto::parse_client_flags(data) {
        drain(
            &data[used..],
            proto::OPTION_HEADER_BYTES,
            proto::parse_option,
            |o| {
                // Answering what was parsed must not panic either.
                let mut out = bytes::BytesMut::new();
                match o {
                    proto::OptionRequest::Info(r) | proto::OptionRequest::Go(r) => {
                        assert!(r.name.len() <= proto::EXPORT_NAME_BYTES_MAX);
                        proto::encode_info_name(&mut out, proto::OPT_GO, &r.name);
                    }
                    proto::OptionRequest::ExportName(name) => {
                        proto::encode_rep_server(&mut out, name)
                    }
                    proto::OptionRequest::Malformed { option, reason } => {
                        proto::encode_option_error(
                            &mut out,
                            *option,
                            proto::REP_ERR_INVALID,
                            reason,
                        )
                    }
                    _ => {}
                }
            },
        );
    }
    drain(
        data,
        proto::OPTION_HEADER_BYTES,
        proto::parse_option,
        |_| {},
    );
    drain(
        data,
        proto::REQUEST_HEADER_BYTES,
        proto::parse_request,
        |r| {
            let _ = proto::check_request(r, 1 << 30);
            let _ = proto::check_request(r, u64::MAX);
        },
    );
    // What the server waits for when a request is incomplete: never zero
    // (it must read on), and never more than the request still lacks.
    if let Ok(None) = proto::parse_request(data) {
        let missing = proto::request_bytes_missing(data);
        assert!(missing >= 1);
        assert!(data.len() + missing <= proto::REQUEST_HEADER_BYTES + proto::REQUEST_BYTES_MAX);
    }
});
