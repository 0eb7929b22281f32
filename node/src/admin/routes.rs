//! Which path answers what.

use super::exposition;
use super::http::{Method, Request, Response, Status};
use super::{AdminContext, ChangeError, MemberAction};

pub const METRICS_PATH: &str = "/metrics";
pub const HEALTH_LIVE_PATH: &str = "/health/live";
pub const HEALTH_READY_PATH: &str = "/health/ready";
pub const STATUS_PATH: &str = "/v1/status";
/// `POST /v1/members/NAME/{drain,activate,remove}[?force]`.
pub const MEMBERS_PATH: &str = "/v1/members/";
/// `POST /v1/donate?bytes=N`: what this node donates from now on.
pub const DONATE_PATH: &str = "/v1/donate";
/// `POST /v1/capacity?bytes=N`: this node's store capacity from now on.
pub const CAPACITY_PATH: &str = "/v1/capacity";

/// Answers one request: changes (POST) may wait on the cluster, reads never.
pub async fn answer(ctx: &AdminContext, req: &Request) -> Response {
    match req.method {
        Method::Post => change(ctx, req).await,
        Method::Get | Method::Head => route(ctx, req),
    }
}

/// A change to a member, made through the Raft leader.
async fn change(ctx: &AdminContext, req: &Request) -> Response {
    if req.path == DONATE_PATH || req.path == CAPACITY_PATH {
        let Some(bytes) = req.value("bytes").and_then(|v| v.parse::<u64>().ok()) else {
            return Response::text(
                Status::BadRequest,
                format!("{} needs ?bytes=N (a number of bytes)\n", req.path),
            );
        };
        let done = if req.path == DONATE_PATH {
            ctx.set_donation(bytes)
        } else {
            ctx.set_capacity(bytes)
        };
        return changed(done);
    }
    let Some((node, action)) = member_action(req) else {
        if [
            METRICS_PATH,
            HEALTH_LIVE_PATH,
            HEALTH_READY_PATH,
            STATUS_PATH,
        ]
        .contains(&req.path.as_str())
        {
            return Response::text(
                Status::MethodNotAllowed,
                format!("{} is read with GET\n", req.path),
            );
        }
        return Response::text(
            Status::NotFound,
            format!(
                "not found; changes are POST {MEMBERS_PATH}NAME/drain, /activate, /remove[?force] or /replace\n"
            ),
        );
    };
    changed(ctx.change_member(node, action).await)
}

/// A change's answer: what was done, or why not.
fn changed(done: Result<String, ChangeError>) -> Response {
    match done {
        Ok(done) => Response::text(Status::Ok, format!("{done}\n")),
        Err(ChangeError::Refused(why)) => Response::text(Status::Conflict, format!("{why}\n")),
        Err(ChangeError::Unavailable(why)) => {
            Response::text(Status::Unavailable, format!("{why}\n"))
        }
    }
}

/// `NAME` and the action of a members path.
fn member_action(req: &Request) -> Option<(&str, MemberAction)> {
    let rest = req.path.strip_prefix(MEMBERS_PATH)?;
    let (node, verb) = rest.split_once('/')?;
    if node.is_empty() || node.contains('/') {
        return None;
    }
    let action = match verb {
        "drain" => MemberAction::Drain,
        "activate" => MemberAction::Activate,
        "remove" => MemberAction::Remove {
            force: req.flag("force"),
        },
        "replace" => MemberAction::Replace,
        _ => return None,
    };
    Some((node, action))
}

pub fn route(ctx: &AdminContext, req: &Request) -> Response {
    if req.path.starts_with(MEMBERS_PATH) {
        return Response::text(
            Status::MethodNotAllowed,
            "changes to members are POST requests\n",
        );
    }
    match req.path.as_str() {
        METRICS_PATH => Response {
            status: Status::Ok,
            content_type: exposition::CONTENT_TYPE,
            body: ctx.metrics_text().into_bytes(),
        },
        HEALTH_LIVE_PATH => Response::text(Status::Ok, "ok\n"),
        HEALTH_READY_PATH => match ctx.ready() {
            Ok(()) => Response::text(Status::Ok, "ready\n"),
            Err(reason) => Response::text(Status::Unavailable, format!("not ready: {reason}\n")),
        },
        STATUS_PATH => {
            let mut body = serde_json::to_vec_pretty(&ctx.status())
                .expect("the status is plain data and always serialises");
            body.push(b'\n');
            Response {
                status: Status::Ok,
                content_type: "application/json",
                body,
            }
        }
        _ => Response::text(
            Status::NotFound,
            format!(
                "not found; try {METRICS_PATH}, {HEALTH_LIVE_PATH}, {HEALTH_READY_PATH} or {STATUS_PATH}\n"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{ChangeError, ClusterView, MetricsWriter, Phase};
    use super::*;
    use crate::admin::exposition::Family;
    use crate::cluster::status::{ClusterStatus, HealthLevel};
    use crate::frontend::Frontend;
    use crate::frontend::nbd::Exports;
    use crate::metrics::NodeMetrics;
    use crate::store::{PageStore, StoreConfig};

    fn get(path: &str) -> Request {
        Request {
            method: Method::Get,
            path: path.into(),
            query: String::new(),
        }
    }

    fn context(cluster: Option<Arc<dyn ClusterView>>) -> AdminContext {
        let store = Arc::new(PageStore::new(StoreConfig::with_capacity(8 << 20)));
        let fe = Arc::new(Frontend::new("n1", store));
        let exports = Arc::new(Exports::open(&[], fe.clone(), std::path::Path::new("/")).unwrap());
        AdminContext::new(fe, Arc::new(NodeMetrics::default()), exports, cluster)
    }

    #[test]
    fn a_standalone_node_reports_itself_and_is_ready_once_serving() {
        let ctx = context(None);
        assert_eq!(route(&ctx, &get(HEALTH_LIVE_PATH)).status, Status::Ok);
        let r = route(&ctx, &get(HEALTH_READY_PATH));
        assert_eq!(r.status, Status::Unavailable);
        assert_eq!(r.body, b"not ready: the node is starting\n");
        ctx.set_phase(Phase::Serving);
        assert_eq!(route(&ctx, &get(HEALTH_READY_PATH)).status, Status::Ok);

        let r = route(&ctx, &get(STATUS_PATH));
        assert_eq!(r.content_type, "application/json");
        let s: ClusterStatus = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(s.nodes.len(), 1);
        assert_eq!(s.nodes[0].name, "n1");
        assert_eq!(s.nodes[0].raft_role, "none");
        assert_eq!((s.nodes_up, s.nodes_total), (1, 1));
        assert_eq!(s.capacity_bytes, 8 << 20);
        assert_eq!(s.health.status, HealthLevel::Ok);

        ctx.set_phase(Phase::Stopping);
        assert_eq!(
            route(&ctx, &get(HEALTH_READY_PATH)).status,
            Status::Unavailable
        );
        assert_eq!(route(&ctx, &get("/nope")).status, Status::NotFound);
        let m = route(&ctx, &get(METRICS_PATH));
        assert_eq!(m.content_type, exposition::CONTENT_TYPE);
    }

    struct FakeCluster;

    static PEERS: Family = Family::gauge("ramster_peers", "Peers known.");

    impl ClusterView for FakeCluster {
        fn status(&self) -> ClusterStatus {
            let mut s = context(None).standalone_status();
            s.cluster_id = "c1".into();
            let mut other = s.nodes[0].clone();
            other.name = "n2".into();
            s.nodes.push(other);
            s
        }
        fn ready(&self) -> Result<(), String> {
            Err("no leader yet".into())
        }
        fn write_metrics(&self, out: &mut MetricsWriter) {
            out.sample(&PEERS, &[], 1u64);
        }
        fn change_member(&self, node: &str, action: MemberAction) -> crate::admin::ChangeFuture {
            let answer = match (node, action) {
                ("n2", MemberAction::Remove { force: false }) => {
                    Err(ChangeError::Refused("n2 still holds pages".into()))
                }
                ("n2", a) => Ok(format!("n2: {a:?}")),
                ("gone", _) => Err(ChangeError::Unavailable("no leader".into())),
                (other, _) => Err(ChangeError::Refused(format!("no member is named {other}"))),
            };
            Box::pin(std::future::ready(answer))
        }
        fn set_donation(&self, bytes: u64) -> Result<String, ChangeError> {
            Ok(format!("donates {bytes}"))
        }
        fn capacity_changed(&self) {}
    }

    fn post(target: &str) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method: Method::Post,
            path: path.into(),
            query: query.into(),
        }
    }

    #[tokio::test]
    async fn member_changes_are_posts_answered_by_what_the_leader_did() {
        let ctx = context(Some(Arc::new(FakeCluster)));
        let text = |r: Response| (r.status, String::from_utf8(r.body).unwrap());
        assert_eq!(
            text(answer(&ctx, &post("/v1/members/n2/drain")).await),
            (Status::Ok, "n2: Drain\n".into())
        );
        assert_eq!(
            text(answer(&ctx, &post("/v1/members/n2/remove?force=1")).await),
            (Status::Ok, "n2: Remove { force: true }\n".into())
        );
        assert_eq!(
            text(answer(&ctx, &post("/v1/members/n2/replace")).await),
            (Status::Ok, "n2: Replace\n".into())
        );
        assert_eq!(
            answer(&ctx, &post("/v1/members/n2/remove")).await.status,
            Status::Conflict
        );
        assert_eq!(
            answer(&ctx, &post("/v1/members/n9/activate")).await.status,
            Status::Conflict
        );
        assert_eq!(
            answer(&ctx, &post("/v1/members/gone/drain")).await.status,
            Status::Unavailable
        );
        assert_eq!(
            answer(&ctx, &post("/metrics")).await.status,
            Status::MethodNotAllowed
        );
        for bad in [
            "/v1/members/n2/explode",
            "/v1/members//drain",
            "/v1/members/n2",
            "/nope",
        ] {
            assert_eq!(
                answer(&ctx, &post(bad)).await.status,
                Status::NotFound,
                "{bad}"
            );
        }
        assert_eq!(
            answer(&ctx, &get("/v1/members/n2/drain")).await.status,
            Status::MethodNotAllowed,
            "a GET changes nothing"
        );
        assert_eq!(
            text(answer(&ctx, &post("/v1/donate?bytes=4096")).await),
            (Status::Ok, "donates 4096\n".into())
        );
        for bad in ["/v1/donate", "/v1/donate?bytes=4MiB", "/v1/donate?bytes=-1"] {
            assert_eq!(
                answer(&ctx, &post(bad)).await.status,
                Status::BadRequest,
                "{bad}"
            );
        }
        let standalone = context(None);
        assert_eq!(
            answer(&standalone, &post("/v1/members/n2/drain"))
                .await
                .status,
            Status::Conflict
        );
    }

    #[tokio::test]
    async fn the_store_capacity_is_changed_by_a_post_within_what_it_started_with() {
        let ctx = context(None);
        let text = |r: Response| (r.status, String::from_utf8(r.body).unwrap());
        assert_eq!(
            text(answer(&ctx, &post("/v1/capacity?bytes=4194304")).await),
            (
                Status::Ok,
                "n1 has a capacity of 4194304 bytes (at most 8388608 from --capacity); it holds 0, 0 above it\n"
                    .into()
            )
        );
        let stats = || ctx.frontend.store().stats();
        assert_eq!(stats().capacity_bytes, 4 << 20);
        for refused in ["/v1/capacity?bytes=16777216", "/v1/capacity?bytes=4096"] {
            let (status, why) = text(answer(&ctx, &post(refused)).await);
            assert_eq!(status, Status::Conflict, "{refused}: {why}");
        }
        for bad in ["/v1/capacity", "/v1/capacity?bytes=1GiB"] {
            assert_eq!(
                answer(&ctx, &post(bad)).await.status,
                Status::BadRequest,
                "{bad}"
            );
        }
        assert_eq!(
            stats().capacity_bytes,
            4 << 20,
            "refused changes change nothing"
        );
    }

    #[test]
    fn a_cluster_view_answers_and_its_status_is_assessed() {
        let ctx = context(Some(Arc::new(FakeCluster)));
        ctx.set_phase(Phase::Serving);
        let r = route(&ctx, &get(HEALTH_READY_PATH));
        assert_eq!(r.status, Status::Unavailable);
        assert_eq!(r.body, b"not ready: no leader yet\n");
        let s = ctx.status();
        assert_eq!(s.cluster_id, "c1");
        assert_eq!(s.nodes_total, 2);
        assert_eq!(s.health.status, HealthLevel::Err, "two nodes, no leader");
        let text = ctx.metrics_text();
        assert!(
            text.contains("# TYPE ramster_peers gauge\nramster_peers 1\n"),
            "{text}"
        );
    }
}
