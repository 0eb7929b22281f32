//! The peer handshake: the dialling node's first frame is a [`PeerHello`], the
//! answer a [`PeerWelcome`]. The name in the hello is only a claim; the
//! transport checks it against the certificate the peer authenticated with.

use crate::peer::{PeerHello, PeerWelcome};
use crate::{FRAME_BYTES_MAX, PEER_BATCH_PAGES_MAX, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

/// The magic a `PeerHello` must carry.
pub const PEER_MAGIC: &str = "ramster-peer";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerHandshakeError {
    #[error("bad magic {0:?}: not a ramster peer")]
    BadMagic(String),
    #[error("the hello names no node")]
    NoName,
    #[error(
        "no common peer protocol version: peer speaks {peer_min}..={peer_max}, we speak {ours_min}..={ours_max}"
    )]
    NoCommonVersion {
        peer_min: u32,
        peer_max: u32,
        ours_min: u32,
        ours_max: u32,
    },
}

/// The hello this build sends.
pub fn hello(node: &str, incarnation: u64) -> PeerHello {
    PeerHello {
        magic: PEER_MAGIC.to_string(),
        node: node.to_string(),
        incarnation,
        min_version: PROTOCOL_VERSION_MIN,
        max_version: PROTOCOL_VERSION,
    }
}

/// Checks a hello and returns the welcome to answer with.
pub fn accept(
    hello: &PeerHello,
    node: &str,
    incarnation: u64,
) -> Result<PeerWelcome, PeerHandshakeError> {
    if hello.magic != PEER_MAGIC {
        return Err(PeerHandshakeError::BadMagic(hello.magic.clone()));
    }
    if hello.node.is_empty() {
        return Err(PeerHandshakeError::NoName);
    }
    let Some(version) = crate::handshake::common_version(hello.min_version, hello.max_version)
    else {
        return Err(PeerHandshakeError::NoCommonVersion {
            peer_min: hello.min_version,
            peer_max: hello.max_version,
            ours_min: PROTOCOL_VERSION_MIN,
            ours_max: PROTOCOL_VERSION,
        });
    };
    Ok(PeerWelcome {
        version,
        node: node.to_string(),
        incarnation,
        max_frame_bytes: FRAME_BYTES_MAX as u32,
        max_batch_pages: PEER_BATCH_PAGES_MAX as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_build_agrees() {
        let w = accept(&hello("n1", 7), "n2", 9).unwrap();
        assert_eq!(w.version, PROTOCOL_VERSION);
        assert_eq!(w.node, "n2");
        assert_eq!(w.incarnation, 9);
    }

    #[test]
    fn refuses_foreign_magic_nameless_and_future_peers() {
        let mut h = hello("n1", 1);
        h.magic = "ramster".into();
        assert!(matches!(
            accept(&h, "n2", 1),
            Err(PeerHandshakeError::BadMagic(_))
        ));
        let h = hello("", 1);
        assert_eq!(accept(&h, "n2", 1), Err(PeerHandshakeError::NoName));
        let mut h = hello("n1", 1);
        h.min_version = PROTOCOL_VERSION + 1;
        h.max_version = PROTOCOL_VERSION + 3;
        assert!(matches!(
            accept(&h, "n2", 1),
            Err(PeerHandshakeError::NoCommonVersion { .. })
        ));
    }
}
