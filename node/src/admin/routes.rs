//! Which path answers what.

use super::AdminContext;
use super::exposition;
use super::http::{Request, Response, Status};

pub const METRICS_PATH: &str = "/metrics";
pub const HEALTH_LIVE_PATH: &str = "/health/live";
pub const HEALTH_READY_PATH: &str = "/health/ready";
pub const STATUS_PATH: &str = "/v1/status";

pub fn route(ctx: &AdminContext, req: &Request) -> Response {
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

    use super::super::{ClusterView, MetricsWriter, Phase};
    use super::*;
    use crate::admin::exposition::Family;
    use crate::admin::http::Method;
    use crate::cluster::status::{ClusterStatus, HealthLevel};
    use crate::frontend::Frontend;
    use crate::frontend::nbd::Exports;
    use crate::metrics::NodeMetrics;
    use crate::store::{PageStore, StoreConfig};

    fn get(path: &str) -> Request {
        Request {
            method: Method::Get,
            path: path.into(),
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
            text.ends_with("# TYPE ramster_peers gauge\nramster_peers 1\n"),
            "{text}"
        );
    }
}
