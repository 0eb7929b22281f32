//! Length-delimited frames: a 4-byte little-endian length, then that many
//! bytes of one protobuf message.
//!
//! Decoding is split as in a parser over a buffer: [`split_frame`] looks at
//! what has been read so far and either returns a complete frame, asks for
//! more bytes, or fails; it never allocates beyond the frame itself, grows
//! its buffer with the bytes that arrived rather than with the length a
//! header claims, and never trusts a length past
//! [`FRAME_BYTES_MAX`](crate::FRAME_BYTES_MAX).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Bytes of the length prefix.
pub const HEADER_BYTES: usize = 4;

/// Room a partly read frame gets at least when its buffer grows.
const GROW_MIN_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Takes one complete frame body off the front of `buf`, or returns `Ok(None)`
/// when more bytes are needed. On error the connection is beyond repair (the
/// stream position is lost) and must be answered and closed.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if buf.len() < HEADER_BYTES + len {
        // Grow with what has arrived, not with what the header claims: a
        // peer that sends a large length and stalls pins no more than
        // twice what it sent. Doubling keeps the copies of a large frame
        // to about its size.
        let missing = HEADER_BYTES + len - buf.len();
        buf.reserve(missing.min(buf.len().max(GROW_MIN_BYTES)));
        return Ok(None);
    }
    buf.advance(HEADER_BYTES);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Decodes one message from a frame body. Byte fields slice `body` (no copy).
pub fn decode<M: Message + Default>(body: Bytes) -> Result<M, FrameError> {
    M::decode(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Appends `msg` as one frame to `out`.
pub fn encode<M: Message>(msg: &M, out: &mut BytesMut) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > crate::FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge {
            len,
            max: crate::FRAME_BYTES_MAX,
        });
    }
    out.reserve(HEADER_BYTES + len);
    out.put_u32_le(len as u32);
    msg.encode(out)
        .expect("reserved exactly encoded_len bytes above");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1;

    #[test]
    fn round_trips_a_request_in_pieces() {
        let req = v1::Request {
            id: 7,
            ops: vec![v1::Op {
                kind: Some(v1::op::Kind::Store(v1::Store {
                    area: 1,
                    offset: 42,
                    page: Bytes::from(vec![9u8; crate::PAGE_BYTES]),
                })),
            }],
        };
        let mut wire = BytesMut::new();
        encode(&req, &mut wire).unwrap();
        // Feed the bytes one at a time: a frame is only returned when whole.
        let mut buf = BytesMut::new();
        let mut got = None;
        for b in wire.iter() {
            assert!(got.is_none());
            buf.put_u8(*b);
            got = split_frame(&mut buf, crate::FRAME_BYTES_MAX).unwrap();
        }
        let back: v1::Request = decode(got.unwrap()).unwrap();
        assert_eq!(back, req);
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_a_length_past_the_limit_before_reading_it() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(u32::MAX);
        assert_eq!(
            split_frame(&mut buf, 1024),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 1024
            })
        );
    }

    #[test]
    fn a_header_that_claims_a_large_frame_reserves_only_what_arrived() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(crate::FRAME_BYTES_MAX as u32);
        buf.put_slice(&[1; 100]);
        assert_eq!(split_frame(&mut buf, crate::FRAME_BYTES_MAX), Ok(None));
        assert!(
            buf.capacity() <= 2 * GROW_MIN_BYTES,
            "{} bytes reserved for 104 received",
            buf.capacity()
        );
        // As bytes arrive, the room grows with them, never past twice
        // what arrived (plus the minimum step).
        for _ in 0..10_000 {
            let more = (buf.capacity() - buf.len()).min(crate::FRAME_BYTES_MAX + 4 - buf.len());
            buf.put_bytes(2, more.max(1));
            if let Some(body) = split_frame(&mut buf, crate::FRAME_BYTES_MAX).unwrap() {
                assert_eq!(body.len(), crate::FRAME_BYTES_MAX);
                return;
            }
            assert!(buf.capacity() <= 2 * buf.len() + 2 * GROW_MIN_BYTES);
        }
        panic!("the frame never completed");
    }

    #[test]
    fn refuses_an_empty_frame() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(split_frame(&mut buf, 1024), Err(FrameError::Empty));
    }

    #[test]
    fn garbage_body_is_a_malformed_error_not_a_panic() {
        let body = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(
            decode::<v1::Request>(body),
            Err(FrameError::Malformed(_))
        ));
    }

    mod arbitrary_bytes {
        use super::*;
        use proptest::prelude::*;

        /// A frame header claiming `len` bytes, then whatever follows: steers
        /// the random inputs past the length check into the decoders.
        fn framed() -> impl Strategy<Value = Vec<u8>> {
            (0u32..2048, proptest::collection::vec(any::<u8>(), 0..2048)).prop_map(|(len, body)| {
                let mut wire = len.to_le_bytes().to_vec();
                wire.extend(body);
                wire
            })
        }

        proptest! {
            /// Whatever arrives, in whatever pieces, the decoder answers with
            /// frames, "need more" or an error: never a panic, never a frame
            /// past the limit, never more bytes than were given.
            #[test]
            fn split_and_decode_never_panic(
                wire in prop_oneof![proptest::collection::vec(any::<u8>(), 0..4096), framed()],
                cuts in proptest::collection::vec(1usize..512, 1..16),
                max in 1usize..4096,
            ) {
                let mut buf = BytesMut::new();
                let mut fed = 0;
                let mut taken = 0;
                let mut pieces = cuts.iter().cycle();
                'feed: while fed < wire.len() {
                    let n = (*pieces.next().expect("cycle")).min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                    // Each frame consumes at least a header, so this ends.
                    loop {
                        match split_frame(&mut buf, max) {
                            Ok(Some(body)) => {
                                prop_assert!(!body.is_empty() && body.len() <= max);
                                taken += HEADER_BYTES + body.len();
                                let _ = decode::<v1::Request>(body.clone());
                                let _ = decode::<v1::Hello>(body);
                            }
                            Ok(None) => break,
                            Err(_) => break 'feed,
                        }
                    }
                }
                prop_assert!(taken <= fed);
                prop_assert_eq!(taken + buf.len(), fed);
            }

            /// A message that was encoded decodes back whole, however the
            /// stream is cut.
            #[test]
            fn encoded_requests_come_back_whole(
                id in any::<u64>(),
                offsets in proptest::collection::vec(any::<u64>(), 0..32),
                cut in 1usize..64,
            ) {
                let req = v1::Request {
                    id,
                    ops: offsets
                        .iter()
                        .map(|&offset| v1::Op {
                            kind: Some(v1::op::Kind::Load(v1::Load { area: 1, offset })),
                        })
                        .collect(),
                };
                let mut wire = BytesMut::new();
                encode(&req, &mut wire).unwrap();
                let mut buf = BytesMut::new();
                let mut got = Vec::new();
                for piece in wire.chunks(cut) {
                    buf.extend_from_slice(piece);
                    while let Some(body) = split_frame(&mut buf, crate::FRAME_BYTES_MAX).unwrap() {
                        got.push(decode::<v1::Request>(body).unwrap());
                    }
                }
                prop_assert_eq!(got, vec![req]);
            }
        }
    }
}
