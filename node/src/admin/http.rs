//! The admin endpoint's HTTP/1.1, served by hyper: GET, HEAD and POST
//! (parameters in the path and query, no request bodies), with keep-alive.
//! Limits: a client gets [`READ_DEADLINE`] to send each request head (and
//! an idle kept-alive connection is closed after as long), a head is at
//! most [`REQUEST_HEAD_BYTES_MAX`] bytes (431 beyond), a connection lives
//! at most [`CONNECTION_LIFETIME_MAX`], and at most [`CONNECTIONS_MAX`] are
//! served at once while the rest wait in the listen backlog. What is ours
//! is small and tested without sockets: a request's path and query as
//! [`Request`], and the answer as [`Response`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue, ORIGIN};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info};

/// The largest request head read (request line and headers).
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// How long a client may take to send a request head; also how long a
/// kept-alive connection may sit idle.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long one connection is served at most, however busy: then it is
/// closed after the answer in progress. A change waits on the Raft leader
/// for 20 s at most.
pub const CONNECTION_LIFETIME_MAX: Duration = Duration::from_secs(60);
/// Connections served at once; a scraper and a few probes need a handful.
pub const CONNECTIONS_MAX: usize = 32;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    /// As GET; hyper leaves the body out.
    Head,
    /// A change (`ramster cluster`), its parameters in the path and query.
    Post,
}

/// A request the server will answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path, without the query string.
    pub path: String,
    /// What followed `?`, if anything.
    pub query: String,
}

impl Request {
    /// A request for `target` (a path, with or without `?query`).
    pub fn new(method: Method, target: &str) -> Request {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        Request {
            method,
            path: path.to_string(),
            query: query.to_string(),
        }
    }

    /// The value of `name` in the query, if it is there.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .find_map(|pair| pair.split_once('=').filter(|(k, _)| *k == name))
            .map(|(_, v)| v)
    }

    /// Whether the query has `name` set to `1`, `true` or nothing at all.
    pub fn flag(&self, name: &str) -> bool {
        self.query
            .split('&')
            .any(|pair| match pair.split_once('=') {
                None => pair == name,
                Some((k, v)) => k == name && matches!(v, "" | "1" | "true"),
            })
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    Forbidden,
    Conflict,
    PayloadTooLarge,
    Unavailable,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::Forbidden => 403,
            Status::Conflict => 409,
            Status::PayloadTooLarge => 413,
            Status::Unavailable => 503,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: Status, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }
}

/// What hyper's request becomes: ours to route, or an answer already.
fn accept(req: &hyper::Request<Incoming>) -> Result<Request, Response> {
    let method = match *req.method() {
        hyper::Method::GET => Method::Get,
        hyper::Method::HEAD => Method::Head,
        hyper::Method::POST => Method::Post,
        ref other => {
            return Err(Response::text(
                Status::MethodNotAllowed,
                format!("method {other} is not allowed; use GET, HEAD or POST\n"),
            ));
        }
    };
    // A browser sends Origin with every POST it makes for a page, and
    // `ramster cluster` and curl send none: so a page a browser opened on
    // any site cannot change the cluster through a node on localhost.
    if method == Method::Post && req.headers().contains_key(ORIGIN) {
        return Err(Response::text(
            Status::Forbidden,
            "changes are not taken from browsers (the request has an Origin header)\n",
        ));
    }
    // Parameters travel in the query; a body would be read by nobody.
    if !req.body().is_end_stream() && req.body().size_hint().upper() != Some(0) {
        return Err(Response::text(
            Status::PayloadTooLarge,
            "request bodies are not taken; parameters go in the query\n",
        ));
    }
    let uri = req.uri();
    let mut target = uri.path().to_string();
    if let Some(q) = uri.query() {
        target.push('?');
        target.push_str(q);
    }
    Ok(Request::new(method, &target))
}

fn into_hyper(r: Response) -> hyper::Response<Full<Bytes>> {
    let mut out = hyper::Response::new(Full::new(Bytes::from(r.body)));
    *out.status_mut() =
        hyper::StatusCode::from_u16(r.status.code()).expect("every Status is a valid code");
    let headers = out.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    if r.status == Status::MethodNotAllowed {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
    }
    out
}

/// Serves `listener` until `shutdown` turns true, answering each request
/// with `route`. Connections open then are closed once their answer in
/// progress is written.
pub async fn serve<F, A>(listener: TcpListener, route: F, mut shutdown: watch::Receiver<bool>)
where
    F: Fn(Request) -> A + Send + Sync + 'static,
    A: Future<Output = Response> + Send + 'static,
{
    let route = Arc::new(route);
    let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(READ_DEADLINE)
        .max_header_size(REQUEST_HEAD_BYTES_MAX)
        .keep_alive(true);
    let http = Arc::new(http);
    while let Some(((stream, _), permit)) =
        crate::accept::next(&limit, || listener.accept(), &mut shutdown, "admin").await
    {
        let (route, http, mut stop) = (route.clone(), http.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let route = route.clone();
                async move {
                    let answer = match accept(&req) {
                        Ok(ours) => route(ours).await,
                        Err(refused) => refused,
                    };
                    Ok::<_, Infallible>(into_hyper(answer))
                }
            });
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => Some(ended),
                _ = stop.wait_for(|s| *s) => None,
                _ = tokio::time::sleep(CONNECTION_LIFETIME_MAX) => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                debug!(error = %e, "admin connection ended");
            }
            drop(permit);
        });
    }
    info!("admin server stopped accepting");
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn a_target_splits_into_path_and_query() {
        let r = Request::new(Method::Post, "/v1/members/n2/remove?force=1&x");
        assert_eq!(r.path, "/v1/members/n2/remove");
        assert!(r.flag("force") && r.flag("x") && !r.flag("y"));
        let r = Request::new(Method::Get, "/v1/donate?bytes=4096&bytes=1");
        assert_eq!(r.value("bytes"), Some("4096"));
        assert_eq!(r.value("none"), None);
        assert_eq!(Request::new(Method::Get, "/metrics").query, "");
    }

    proptest::proptest! {
        #[test]
        fn any_target_splits_without_losing_a_byte(target in "[ -~]{0,80}") {
            let r = Request::new(Method::Get, &target);
            let again = if r.query.is_empty() && !target.contains('?') {
                r.path.clone()
            } else {
                format!("{}?{}", r.path, r.query)
            };
            proptest::prop_assert_eq!(again, target);
        }
    }

    /// Starts the server on loopback with a route that echoes the path; the
    /// blocking client side runs on its own thread.
    fn with_server(check: impl FnOnce(std::net::SocketAddr) + Send + 'static) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop_tx, stop_rx) = watch::channel(false);
            let server = tokio::spawn(serve(
                listener,
                |req: Request| async move {
                    Response::text(Status::Ok, format!("you asked for {}\n", req.path))
                },
                stop_rx,
            ));
            tokio::task::spawn_blocking(move || check(addr))
                .await
                .unwrap();
            stop_tx.send(true).unwrap();
            server.await.unwrap();
        });
    }

    fn read_answer(s: &mut std::net::TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if head.starts_with("HTTP/1.1") && (body.len() >= len || head.contains("HEAD")) {
                    break;
                }
            }
        }
        String::from_utf8(got).unwrap()
    }

    #[test]
    fn serves_over_tcp_with_keep_alive_and_refuses_what_it_does_not_speak() {
        with_server(|addr| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // The head in two pieces, then a second request on the same
            // connection.
            s.write_all(b"GET /x HTTP/1.1\r\nHo").unwrap();
            s.write_all(b"st: y\r\n\r\n").unwrap();
            let a = read_answer(&mut s);
            assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
            assert!(a.ends_with("\r\n\r\nyou asked for /x\n"), "{a}");
            s.write_all(b"GET /y?z=1 HTTP/1.1\r\nHost: y\r\n\r\n")
                .unwrap();
            let a = read_answer(&mut s);
            assert!(a.ends_with("you asked for /y\n"), "{a}");

            let ask = |bytes: &[u8]| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(bytes).unwrap();
                let mut a = String::new();
                let _ = s.read_to_string(&mut a);
                a
            };
            let a = ask(b"BREW /pot HTTP/1.1\r\nHost: y\r\nConnection: close\r\n\r\n");
            assert!(a.starts_with("HTTP/1.1 405 "), "{a}");
            assert!(
                a.to_ascii_lowercase()
                    .contains("\r\nallow: get, head, post\r\n"),
                "{a}"
            );
            let a = ask(b"POST /v1/donate HTTP/1.1\r\nHost: y\r\nContent-Length: 5\r\n\r\nhello");
            assert!(a.starts_with("HTTP/1.1 413 "), "{a}");
            let a = ask(b"POST /v1/donate?bytes=1 HTTP/1.1\r\nHost: y\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            assert!(
                a.starts_with("HTTP/1.1 200 "),
                "an empty body is no body: {a}"
            );
            let a = ask(b"POST /v1/donate?bytes=1 HTTP/1.1\r\nHost: localhost\r\nOrigin: http://example.com\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            assert!(a.starts_with("HTTP/1.1 403 "), "a browser's POST: {a}");
            let a = ask(b"GET /x HTTP/1.1\r\nHost: y\r\nOrigin: http://example.com\r\nConnection: close\r\n\r\n");
            assert!(a.starts_with("HTTP/1.1 200 "), "reads change nothing: {a}");
            let a = ask(b"HEAD /x HTTP/1.1\r\nHost: y\r\nConnection: close\r\n\r\n");
            assert!(a.starts_with("HTTP/1.1 200 "), "{a}");
            assert!(a.ends_with("\r\n\r\n"), "HEAD has no body: {a}");
            assert!(a.to_ascii_lowercase().contains("content-length: 17"), "{a}");
            let a = ask(b"GET /metrics HTTP/1.1\r\n\r\n\x00garbage");
            assert!(
                a.starts_with("HTTP/1.1 200 ") || a.starts_with("HTTP/1.1 400 "),
                "{a}"
            );
            let a = ask(b"NOT HTTP AT ALL\r\n\r\n");
            assert!(a.starts_with("HTTP/1.1 400 ") || a.is_empty(), "{a}");
        });
    }

    #[test]
    fn oversized_heads_get_431_and_silent_clients_are_hung_up_on() {
        with_server(|addr| {
            let mut head = b"GET /metrics HTTP/1.1\r\n".to_vec();
            while head.len() < REQUEST_HEAD_BYTES_MAX + 1024 {
                head.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
            }
            head.extend_from_slice(b"\r\n");
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.write_all(&head);
            let mut a = String::new();
            let _ = s.read_to_string(&mut a);
            assert!(a.starts_with("HTTP/1.1 431 "), "{a}");

            // Half a head, then silence: closed after the deadline.
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(READ_DEADLINE * 3)).unwrap();
            s.write_all(b"GET /metrics HT").unwrap();
            let started = std::time::Instant::now();
            let mut buf = Vec::new();
            let got = s.read_to_end(&mut buf);
            assert!(got.is_ok(), "closed, not timed out on our side: {got:?}");
            assert!(started.elapsed() < READ_DEADLINE * 3);

            // An idle kept-alive connection is closed as well.
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(READ_DEADLINE * 3)).unwrap();
            s.write_all(b"GET /a HTTP/1.1\r\nHost: y\r\n\r\n").unwrap();
            let a = read_answer(&mut s);
            assert!(a.starts_with("HTTP/1.1 200 "), "{a}");
            let mut rest = Vec::new();
            let got = s.read_to_end(&mut rest);
            assert!(got.is_ok() && rest.is_empty(), "{got:?} {rest:?}");
        });
    }
}
