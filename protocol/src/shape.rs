//! What decoding a request would cost, read off its wire form before
//! anything is allocated.
//!
//! prost builds a `Request` whole: every op becomes an element of a `Vec`,
//! however few bytes it took on the wire. An empty op is two bytes there
//! and a few dozen in memory, so a frame of nothing but empty ops would
//! cost many times its own size. [`request_shape`] walks the top-level
//! fields of a frame body (keys, varints, lengths; nothing is copied and
//! nothing inside an op is looked at) and counts the ops, so that the
//! server can refuse a request of too many before decoding it.
//!
//! The walk accepts every body prost accepts and counts exactly the ops
//! prost would decode; a body it refuses, prost refuses too. `Request` has
//! no other repeated field, and unknown fields cost prost nothing (it
//! skips them), so the op count is the whole of what a request's decoding
//! can allocate beyond the frame itself.

use crate::frame::FrameError;

/// Field numbers of `Request` (see `proto/ramster/v1/client.proto`).
const REQUEST_ID_FIELD: u32 = 1;
const REQUEST_OPS_FIELD: u32 = 2;

/// Protobuf wire types.
const WIRE_VARINT: u64 = 0;
const WIRE_FIXED64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_GROUP_START: u64 = 3;
const WIRE_GROUP_END: u64 = 4;
const WIRE_FIXED32: u64 = 5;

/// Most bytes of a varint (a full `u64`).
const VARINT_BYTES_MAX: usize = 10;

/// A request's id and op count, as its decoding would find them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestShape {
    /// The request's id (the last one given, as prost keeps it; 0 if none).
    pub id: u64,
    /// The ops the request carries.
    pub ops: usize,
}

/// Walks the top-level fields of a `Request` body without allocating.
pub fn request_shape(body: &[u8]) -> Result<RequestShape, FrameError> {
    let mut shape = RequestShape { id: 0, ops: 0 };
    let mut rest = body;
    // Groups are a long-deprecated wire form that prost skips as unknown
    // fields; fields inside them are not the request's.
    let mut group_depth = 0usize;
    while !rest.is_empty() {
        let key = varint(&mut rest)?;
        if key > u64::from(u32::MAX) {
            return Err(malformed("field key out of range"));
        }
        let field = (key >> 3) as u32;
        let wire = key & 7;
        if field == 0 {
            return Err(malformed("field number 0"));
        }
        let top_level = group_depth == 0;
        match wire {
            WIRE_VARINT => {
                let value = varint(&mut rest)?;
                if top_level && field == REQUEST_ID_FIELD {
                    shape.id = value;
                } else if top_level && field == REQUEST_OPS_FIELD {
                    return Err(malformed("ops is not a varint"));
                }
            }
            WIRE_LEN => {
                let len = varint(&mut rest)?;
                if len > rest.len() as u64 {
                    return Err(malformed("a field runs past the end of the frame"));
                }
                rest = &rest[len as usize..];
                if top_level && field == REQUEST_ID_FIELD {
                    return Err(malformed("id is not a varint"));
                }
                if top_level && field == REQUEST_OPS_FIELD {
                    shape.ops += 1;
                }
            }
            WIRE_FIXED64 | WIRE_FIXED32 => {
                let len = if wire == WIRE_FIXED64 { 8 } else { 4 };
                if rest.len() < len {
                    return Err(malformed("a field runs past the end of the frame"));
                }
                rest = &rest[len..];
                if top_level && (field == REQUEST_ID_FIELD || field == REQUEST_OPS_FIELD) {
                    return Err(malformed("a field of the wrong wire type"));
                }
            }
            WIRE_GROUP_START => group_depth += 1,
            WIRE_GROUP_END if !top_level => group_depth -= 1,
            WIRE_GROUP_END => return Err(malformed("a group ends that never started")),
            _ => return Err(malformed("unknown wire type")),
        }
    }
    if group_depth > 0 {
        return Err(malformed("a group never ends"));
    }
    Ok(shape)
}

/// Takes one varint off the front of `rest`, refusing what prost refuses:
/// one that runs past the end, or past 64 bits.
fn varint(rest: &mut &[u8]) -> Result<u64, FrameError> {
    let mut value = 0u64;
    for (i, &b) in rest.iter().take(VARINT_BYTES_MAX).enumerate() {
        if i == VARINT_BYTES_MAX - 1 && b > 1 {
            return Err(malformed("a varint past 64 bits"));
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            *rest = &rest[i + 1..];
            return Ok(value);
        }
    }
    Err(malformed("a varint runs past the end of the frame"))
}

fn malformed(why: &str) -> FrameError {
    FrameError::Malformed(why.to_string())
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes, BytesMut};
    use prost::Message;

    use super::*;
    use crate::v1::{self, op::Kind};
    use crate::{BATCH_OPS_MAX, FRAME_BYTES_MAX, frame};

    fn load(offset: u64) -> v1::Op {
        v1::Op {
            kind: Some(Kind::Load(v1::Load { area: 1, offset })),
        }
    }

    #[test]
    fn counts_the_ops_of_an_encoded_request() {
        let req = v1::Request {
            id: u64::MAX,
            ops: (0..100).map(load).collect(),
        };
        assert_eq!(
            request_shape(&req.encode_to_vec()),
            Ok(RequestShape {
                id: u64::MAX,
                ops: 100
            })
        );
        assert_eq!(request_shape(&[]), Ok(RequestShape { id: 0, ops: 0 }));
    }

    #[test]
    fn a_frame_of_empty_ops_shows_every_op_before_decoding() {
        // Key of field 2, length-delimited; length 0: an empty op.
        let mut body = BytesMut::new();
        body.put_slice(&[0x08, 7]);
        while body.len() + 2 <= FRAME_BYTES_MAX {
            body.put_slice(&[0x12, 0]);
        }
        let shape = request_shape(&body).unwrap();
        assert_eq!(shape.id, 7);
        assert_eq!(shape.ops, (FRAME_BYTES_MAX - 2) / 2);
        assert!(shape.ops > 2_000 * BATCH_OPS_MAX);
    }

    #[test]
    fn unknown_fields_and_groups_are_skipped_as_prost_skips_them() {
        let mut body = load_request_bytes();
        // Field 9 of every wire type, and a group holding a field 2.
        body.extend_from_slice(&[0x48, 0x96, 0x01]); // varint
        body.extend_from_slice(&[0x49, 1, 2, 3, 4, 5, 6, 7, 8]); // fixed64
        body.extend_from_slice(&[0x4a, 2, 0xaa, 0xbb]); // bytes
        body.extend_from_slice(&[0x4d, 1, 2, 3, 4]); // fixed32
        body.extend_from_slice(&[0x4b, 0x12, 0, 0x4c]); // group { 2: "" }
        let decoded = v1::Request::decode(&body[..]).unwrap();
        assert_eq!(
            request_shape(&body),
            Ok(RequestShape {
                id: decoded.id,
                ops: decoded.ops.len()
            })
        );
        assert_eq!(decoded.ops.len(), 1);
    }

    fn load_request_bytes() -> Vec<u8> {
        v1::Request {
            id: 3,
            ops: vec![load(9)],
        }
        .encode_to_vec()
    }

    #[test]
    fn refuses_what_prost_refuses() {
        let cut = load_request_bytes();
        let bad: [&[u8]; 8] = [
            &cut[..cut.len() - 1], // a field cut short
            &[0x08],               // a key without its value
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
            ], // 65 bits
            &[0x10, 1],            // ops as a varint
            &[0x0a, 0],            // id as bytes
            &[0x00, 1],            // field 0
            &[0x4c],               // a group that never started
            &[0x4e, 1],            // wire type 6
        ];
        for body in bad {
            assert!(
                v1::Request::decode(body).is_err(),
                "prost accepts {body:x?}"
            );
            assert!(
                matches!(request_shape(body), Err(FrameError::Malformed(_))),
                "{body:x?}"
            );
        }
    }

    #[test]
    fn the_walk_and_frame_decoding_agree_on_a_round_trip() {
        let req = v1::Request {
            id: 5,
            ops: (0..BATCH_OPS_MAX as u64).map(load).collect(),
        };
        let mut wire = BytesMut::new();
        frame::encode(&req, &mut wire).unwrap();
        let body: Bytes = frame::split_frame(&mut wire, FRAME_BYTES_MAX)
            .unwrap()
            .unwrap();
        assert_eq!(request_shape(&body).unwrap().ops, BATCH_OPS_MAX);
        assert_eq!(frame::decode::<v1::Request>(body).unwrap(), req);
    }

    mod arbitrary_bytes {
        use super::*;
        use proptest::prelude::*;

        /// Bodies made mostly of well-formed top-level fields, so that the
        /// walk gets past the first bytes.
        fn fields() -> impl Strategy<Value = Vec<u8>> {
            let field = (
                1u64..12,
                0u64..6,
                proptest::collection::vec(any::<u8>(), 0..12),
            )
                .prop_map(|(number, wire, tail)| {
                    let mut f = vec![(number << 3 | wire) as u8];
                    if wire == WIRE_LEN {
                        f.push(tail.len() as u8);
                    }
                    f.extend(tail);
                    f
                });
            proptest::collection::vec(field, 0..24).prop_map(|fs| fs.concat())
        }

        proptest! {
            /// Whatever the bytes, the walk never panics, and wherever
            /// prost decodes a request the walk saw its id and every op.
            #[test]
            fn the_walk_agrees_with_prost(
                body in prop_oneof![proptest::collection::vec(any::<u8>(), 0..256), fields()],
            ) {
                let walked = request_shape(&body);
                if let Ok(req) = v1::Request::decode(&body[..]) {
                    prop_assert_eq!(walked, Ok(RequestShape { id: req.id, ops: req.ops.len() }));
                }
            }
        }
    }
}
