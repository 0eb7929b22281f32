//! The version handshake: the client's first frame is a [`Hello`], the
//! server's first frame a [`Welcome`] naming the version both will speak.

use crate::v1::{Hello, Welcome};
use crate::{BATCH_OPS_MAX, FRAME_BYTES_MAX, PAGE_BYTES, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};

/// The magic a `Hello` must carry.
pub const MAGIC: &str = "ramster";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("bad magic {0:?}: not a ramster client")]
    BadMagic(String),
    #[error(
        "no common protocol version: client speaks {client_min}..={client_max}, server {server_min}..={server_max}"
    )]
    NoCommonVersion {
        client_min: u32,
        client_max: u32,
        server_min: u32,
        server_max: u32,
    },
}

/// The `Hello` this build sends.
pub fn hello(client: &str) -> Hello {
    Hello {
        magic: MAGIC.to_string(),
        min_version: PROTOCOL_VERSION_MIN,
        max_version: PROTOCOL_VERSION,
        client: client.to_string(),
    }
}

/// The newest version both this build and a peer speaking `min..=max`
/// speak, if any. Shared by the client and peer handshakes.
pub fn common_version(min: u32, max: u32) -> Option<u32> {
    let version = max.min(PROTOCOL_VERSION);
    (version >= min.max(PROTOCOL_VERSION_MIN)).then_some(version)
}

/// Server side: checks a `Hello` and answers with the `Welcome` to send.
pub fn accept(hello: &Hello, node: &str) -> Result<Welcome, HandshakeError> {
    if hello.magic != MAGIC {
        return Err(HandshakeError::BadMagic(hello.magic.clone()));
    }
    let Some(version) = common_version(hello.min_version, hello.max_version) else {
        return Err(HandshakeError::NoCommonVersion {
            client_min: hello.min_version,
            client_max: hello.max_version,
            server_min: PROTOCOL_VERSION_MIN,
            server_max: PROTOCOL_VERSION,
        });
    };
    Ok(Welcome {
        version,
        node: node.to_string(),
        max_frame_bytes: FRAME_BYTES_MAX as u32,
        max_batch_ops: BATCH_OPS_MAX as u32,
        page_bytes: PAGE_BYTES as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_build_agrees_on_current_version() {
        let w = accept(&hello("t"), "n1").unwrap();
        assert_eq!(w.version, PROTOCOL_VERSION);
        assert_eq!(w.page_bytes, 4096);
    }

    #[test]
    fn future_only_client_is_refused() {
        let mut h = hello("t");
        h.min_version = PROTOCOL_VERSION + 1;
        h.max_version = PROTOCOL_VERSION + 5;
        assert!(matches!(
            accept(&h, "n1"),
            Err(HandshakeError::NoCommonVersion { .. })
        ));
    }

    #[test]
    fn wrong_magic_is_refused() {
        let mut h = hello("t");
        h.magic = "GET / HTTP/1.1".into();
        assert!(matches!(accept(&h, "n1"), Err(HandshakeError::BadMagic(_))));
    }
}
