//! The peer RPCs without the network: wire messages checked and turned into
//! donor-store calls, and the donor's answers turned back into messages.
//! The transport only moves frames; everything a peer can get wrong is
//! caught here, where it can be tested on plain values.

use bytes::Bytes;
use ramster_protocol::PEER_BATCH_PAGES_MAX;
use ramster_protocol::peer::{
    self as wire, PeerErrorCode, PeerRequest, PeerResponse, peer_request, peer_response,
};

use super::donor::{AuditedPage, DonatedPage, DonorError, DonorStore, PageRef, PageStatus};
use crate::store::PageKey;

/// A request that is refused as a whole, with the code the peer sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RpcRefusal {
    pub code: PeerErrorCode,
    pub message: String,
}

impl RpcRefusal {
    pub fn new(code: PeerErrorCode, message: impl Into<String>) -> Self {
        RpcRefusal {
            code,
            message: message.into(),
        }
    }
}

impl From<DonorError> for RpcRefusal {
    fn from(e: DonorError) -> Self {
        let code = match e {
            DonorError::BatchTooLarge { .. } => PeerErrorCode::TooLarge,
            DonorError::InvalidPage { .. } => PeerErrorCode::Malformed,
            DonorError::UnknownOwner(_) => PeerErrorCode::UnknownOwner,
        };
        RpcRefusal::new(code, e.to_string())
    }
}

pub fn status_to_wire(s: PageStatus) -> wire::PageStatus {
    match s {
        PageStatus::Ok => wire::PageStatus::Ok,
        PageStatus::NoCapacity => wire::PageStatus::NoCapacity,
        PageStatus::Quota => wire::PageStatus::Quota,
        PageStatus::StaleVersion => wire::PageStatus::StaleVersion,
        PageStatus::NotFound => wire::PageStatus::NotFound,
        PageStatus::WrongIncarnation => wire::PageStatus::WrongIncarnation,
    }
}

/// `None` for UNSPECIFIED and values this build does not know: neither may
/// be read as a success.
pub fn status_from_wire(v: i32) -> Option<PageStatus> {
    Some(match wire::PageStatus::try_from(v).ok()? {
        wire::PageStatus::Unspecified => return None,
        wire::PageStatus::Ok => PageStatus::Ok,
        wire::PageStatus::NoCapacity => PageStatus::NoCapacity,
        wire::PageStatus::Quota => PageStatus::Quota,
        wire::PageStatus::StaleVersion => PageStatus::StaleVersion,
        wire::PageStatus::NotFound => PageStatus::NotFound,
        wire::PageStatus::WrongIncarnation => PageStatus::WrongIncarnation,
    })
}

pub fn key_to_wire(k: PageKey) -> wire::PageKey {
    wire::PageKey {
        space: k.space,
        object: k.object,
        index: k.index,
    }
}

fn key_from_wire(k: Option<&wire::PageKey>, item: usize) -> Result<PageKey, RpcRefusal> {
    let k = k.ok_or_else(|| {
        RpcRefusal::new(
            PeerErrorCode::Malformed,
            format!("page {item} of the batch has no key"),
        )
    })?;
    Ok(PageKey {
        space: k.space,
        object: k.object,
        index: k.index,
    })
}

/// An audited copy as the donor listed it; `None` without a key.
pub fn audited_from_wire(p: &wire::AuditedPage) -> Option<AuditedPage> {
    Some(AuditedPage {
        key: key_from_wire(p.key.as_ref(), 0).ok()?,
        version: p.version,
        placement: p.placement,
    })
}

pub fn page_to_wire(p: &DonatedPage) -> wire::DonatedPage {
    wire::DonatedPage {
        key: Some(key_to_wire(p.key)),
        version: p.version,
        checksum: p.checksum,
        compressed: p.compressed,
        data: p.data.clone(),
    }
}

pub fn ref_to_wire(r: &PageRef) -> wire::PageRef {
    wire::PageRef {
        key: Some(key_to_wire(r.key)),
        version: r.version,
    }
}

fn check_len(len: usize) -> Result<(), RpcRefusal> {
    if len > PEER_BATCH_PAGES_MAX {
        return Err(RpcRefusal::new(
            PeerErrorCode::TooLarge,
            format!("batch of {len} pages exceeds the limit of {PEER_BATCH_PAGES_MAX}"),
        ));
    }
    Ok(())
}

fn refs_from_wire(refs: &[wire::PageRef]) -> Result<Vec<PageRef>, RpcRefusal> {
    check_len(refs.len())?;
    refs.iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(PageRef {
                key: key_from_wire(r.key.as_ref(), i)?,
                version: r.version,
            })
        })
        .collect()
}

/// A request's owner must be the node the connection authenticated: an
/// owner only ever touches its own pages.
fn check_owner(owner: &str, peer: &str) -> Result<(), RpcRefusal> {
    if owner != peer {
        return Err(RpcRefusal::new(
            PeerErrorCode::NotOwner,
            format!("owner {owner:?} is not the authenticated peer {peer:?}"),
        ));
    }
    Ok(())
}

/// What the serving node tells about itself in a heartbeat answer.
/// The donor's part of a heartbeat to `to`: what it would take, what it
/// holds, and how much of `to`'s pages it wants back.
pub fn heartbeat_of(donor: &DonorStore, to: &str) -> wire::Heartbeat {
    wire::Heartbeat {
        reclaim_bytes: donor.reclaim_from(to),
        spare_bytes: donor.spare_bytes(),
        donated_bytes: donor.donated_bytes(),
        held_pages: donor.usage(None).pages,
        load_permille: donor.load_permille(),
        donate_bytes: donor.config().donate_bytes,
        ..Default::default()
    }
}

/// Applies one request from the authenticated peer `peer` to the donor store.
pub fn handle(
    donor: &parking_lot::Mutex<DonorStore>,
    peer: &str,
    req: PeerRequest,
) -> PeerResponse {
    let id = req.id;
    let kind = match apply(donor, peer, req) {
        Ok(kind) => kind,
        Err(r) => peer_response::Kind::Error(wire::PeerError {
            code: r.code as i32,
            message: r.message,
        }),
    };
    PeerResponse {
        id,
        kind: Some(kind),
    }
}

fn statuses(s: Vec<PageStatus>) -> Vec<i32> {
    s.into_iter().map(|s| status_to_wire(s) as i32).collect()
}

fn apply(
    donor: &parking_lot::Mutex<DonorStore>,
    peer: &str,
    req: PeerRequest,
) -> Result<peer_response::Kind, RpcRefusal> {
    use peer_response::Kind as R;
    let Some(kind) = req.kind else {
        return Err(RpcRefusal::new(
            PeerErrorCode::Malformed,
            "request without a kind (sent by a newer build?)",
        ));
    };
    Ok(match kind {
        peer_request::Kind::PutPages(put) => {
            check_owner(&put.owner, peer)?;
            check_len(put.pages.len())?;
            let pages = put
                .pages
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    Ok(DonatedPage {
                        key: key_from_wire(p.key.as_ref(), i)?,
                        version: p.version,
                        checksum: p.checksum,
                        compressed: p.compressed,
                        data: p.data,
                    })
                })
                .collect::<Result<Vec<_>, RpcRefusal>>()?;
            let s = donor
                .lock()
                .put(&put.owner, put.incarnation, put.placement, &pages)?;
            R::PutPages(wire::PutPagesResult {
                statuses: statuses(s),
            })
        }
        peer_request::Kind::GetPages(get) => {
            check_owner(&get.owner, peer)?;
            let refs = refs_from_wire(&get.pages)?;
            let got = donor.lock().get(&get.owner, get.incarnation, &refs)?;
            R::GetPages(wire::GetPagesResult {
                pages: got
                    .into_iter()
                    .map(|g| match g {
                        Ok(p) => wire::GotPage {
                            status: wire::PageStatus::Ok as i32,
                            version: p.version,
                            checksum: p.checksum,
                            compressed: p.compressed,
                            data: p.data,
                        },
                        Err(s) => wire::GotPage {
                            status: status_to_wire(s) as i32,
                            version: 0,
                            checksum: 0,
                            compressed: false,
                            data: Bytes::new(),
                        },
                    })
                    .collect(),
            })
        }
        peer_request::Kind::ReleasePages(rel) => {
            check_owner(&rel.owner, peer)?;
            let refs = refs_from_wire(&rel.pages)?;
            let s = donor
                .lock()
                .release(&rel.owner, rel.incarnation, rel.placement, &refs)?;
            R::ReleasePages(wire::ReleasePagesResult {
                statuses: statuses(s),
            })
        }
        peer_request::Kind::ReleaseOwner(rel) => {
            check_owner(&rel.owner, peer)?;
            let (status, released_pages) =
                match donor.lock().release_owner(&rel.owner, rel.incarnation) {
                    Ok(n) => (PageStatus::Ok, n),
                    Err(s) => (s, 0),
                };
            R::ReleaseOwner(wire::ReleaseOwnerResult {
                status: status_to_wire(status) as i32,
                released_pages,
            })
        }
        peer_request::Kind::AuditPages(audit) => {
            check_owner(&audit.owner, peer)?;
            let max = usize::try_from(audit.max).unwrap_or(usize::MAX);
            check_len(max)?;
            let step = donor.lock().audit(
                &audit.owner,
                audit.incarnation,
                audit.floor,
                audit.cursor,
                max,
            )?;
            R::AuditPages(match step {
                Ok(step) => wire::AuditPagesResult {
                    status: wire::PageStatus::Ok as i32,
                    pages: step
                        .pages
                        .iter()
                        .map(|p| wire::AuditedPage {
                            key: Some(key_to_wire(p.key)),
                            version: p.version,
                            placement: p.placement,
                        })
                        .collect(),
                    // Position 0 never continues a listing (see `audit`).
                    next: step.next.unwrap_or(0),
                },
                Err(s) => wire::AuditPagesResult {
                    status: status_to_wire(s) as i32,
                    ..Default::default()
                },
            })
        }
        peer_request::Kind::Heartbeat(_) => R::Heartbeat(heartbeat_of(&donor.lock(), peer)),
        // Membership requests are the control handler's; without one the
        // node is not (yet) a member of anything.
        peer_request::Kind::Raft(_)
        | peer_request::Kind::Join(_)
        | peer_request::Kind::ChangeNode(_) => {
            return Err(RpcRefusal::new(
                PeerErrorCode::Unavailable,
                "membership is not running on this node",
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::donor::DonorConfig;
    use parking_lot::Mutex;

    fn donor() -> Mutex<DonorStore> {
        Mutex::new(DonorStore::new(DonorConfig::with_donation(1 << 20)))
    }

    fn put(owner: &str, pages: Vec<wire::DonatedPage>) -> PeerRequest {
        PeerRequest {
            id: 9,
            kind: Some(peer_request::Kind::PutPages(wire::PutPages {
                owner: owner.into(),
                incarnation: 1,
                pages,
                placement: 1,
            })),
        }
    }

    fn error_of(resp: &PeerResponse) -> Option<(PeerErrorCode, &str)> {
        match &resp.kind {
            Some(peer_response::Kind::Error(e)) => {
                Some((PeerErrorCode::try_from(e.code).unwrap(), e.message.as_str()))
            }
            _ => None,
        }
    }

    #[test]
    fn a_peer_cannot_put_pages_in_another_owners_name() {
        let d = donor();
        let page = wire::DonatedPage {
            key: Some(wire::PageKey::default()),
            version: 1,
            checksum: 0,
            compressed: true,
            data: Bytes::from_static(b"x"),
        };
        let resp = handle(&d, "mallory", put("alice", vec![page]));
        assert_eq!(resp.id, 9);
        let (code, msg) = error_of(&resp).unwrap();
        assert_eq!(code, PeerErrorCode::NotOwner);
        assert!(msg.contains("alice"), "{msg}");
        assert_eq!(d.lock().donated_bytes(), 0);
    }

    #[test]
    fn a_page_without_a_key_or_with_a_bad_length_is_malformed() {
        let d = donor();
        let keyless = wire::DonatedPage {
            key: None,
            version: 1,
            checksum: 0,
            compressed: true,
            data: Bytes::from_static(b"x"),
        };
        let resp = handle(&d, "a", put("a", vec![keyless]));
        assert_eq!(error_of(&resp).unwrap().0, PeerErrorCode::Malformed);
        let short_raw = wire::DonatedPage {
            key: Some(wire::PageKey::default()),
            version: 1,
            checksum: 0,
            compressed: false,
            data: Bytes::from_static(b"not a page"),
        };
        let resp = handle(&d, "a", put("a", vec![short_raw]));
        let (code, msg) = error_of(&resp).unwrap();
        assert_eq!(code, PeerErrorCode::Malformed);
        assert!(msg.contains("uncompressed"), "{msg}");
        let resp = handle(&d, "a", PeerRequest { id: 3, kind: None });
        assert_eq!(error_of(&resp).unwrap().0, PeerErrorCode::Malformed);
    }

    #[test]
    fn oversized_batches_and_unknown_owners_are_refused_by_code() {
        let d = donor();
        let refs = vec![wire::PageRef::default(); PEER_BATCH_PAGES_MAX + 1];
        let get = |pages| PeerRequest {
            id: 1,
            kind: Some(peer_request::Kind::GetPages(wire::GetPages {
                owner: "a".into(),
                incarnation: 1,
                pages,
            })),
        };
        assert_eq!(
            error_of(&handle(&d, "a", get(refs))).unwrap().0,
            PeerErrorCode::TooLarge
        );
        let one = vec![wire::PageRef {
            key: Some(wire::PageKey::default()),
            version: 1,
        }];
        assert_eq!(
            error_of(&handle(&d, "a", get(one))).unwrap().0,
            PeerErrorCode::UnknownOwner
        );
    }

    #[test]
    fn unspecified_and_unknown_statuses_never_read_as_ok() {
        assert_eq!(status_from_wire(0), None);
        assert_eq!(status_from_wire(999), None);
        assert_eq!(status_from_wire(1), Some(PageStatus::Ok));
        for s in [
            PageStatus::Ok,
            PageStatus::NoCapacity,
            PageStatus::Quota,
            PageStatus::StaleVersion,
            PageStatus::NotFound,
            PageStatus::WrongIncarnation,
        ] {
            assert_eq!(status_from_wire(status_to_wire(s) as i32), Some(s));
        }
    }
}
