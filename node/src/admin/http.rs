//! Just enough HTTP/1.1 for scrapes, probes, `ramster status` and
//! `ramster cluster`: GET, HEAD and POST (parameters in the path and query),
//! one request per connection (`Connection: close`), no request bodies. A client gets [`READ_DEADLINE`] to send a head of at most
//! [`REQUEST_HEAD_BYTES_MAX`] bytes; at most [`CONNECTIONS_MAX`] are served
//! at once, the rest wait in the listen backlog. Parsing is a pure function
//! over bytes, tested without sockets.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info};

/// The largest request head read (request line and headers).
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// How long a client may take to send its request head, and to take the answer.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; a scraper and a few probes need a handful.
pub const CONNECTIONS_MAX: usize = 32;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    /// As GET, without the body.
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

/// Why a request head is not answered with a page.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("bad request: {0}")]
    Malformed(&'static str),
    #[error("request head over {REQUEST_HEAD_BYTES_MAX} bytes")]
    TooLarge,
    #[error("method {0} is not allowed; use GET, HEAD or POST")]
    MethodNotAllowed(String),
}

impl RequestError {
    pub fn response(&self) -> Response {
        let status = match self {
            RequestError::Malformed(_) => Status::BadRequest,
            RequestError::TooLarge => Status::HeadTooLarge,
            RequestError::MethodNotAllowed(_) => Status::MethodNotAllowed,
        };
        Response::text(status, format!("{self}\n"))
    }
}

/// Where the head ends (the index after its blank line), if it has.
/// Lines end in CRLF; a bare LF is accepted as well, as RFC 9112 allows.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line.is_empty() || line == b"\r" {
                return Some(i + 1);
            }
            line_start = i + 1;
        }
    }
    None
}

/// Parses a request head from what was read so far: `Ok(None)` while it is
/// incomplete (and still small enough to wait for).
pub fn parse_head(buf: &[u8]) -> Result<Option<Request>, RequestError> {
    let Some(end) = head_end(buf) else {
        return if buf.len() >= REQUEST_HEAD_BYTES_MAX {
            Err(RequestError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if end > REQUEST_HEAD_BYTES_MAX {
        return Err(RequestError::TooLarge);
    }
    let head = std::str::from_utf8(&buf[..end])
        .map_err(|_| RequestError::Malformed("head is not UTF-8"))?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed(
            "request line is not METHOD TARGET VERSION",
        ));
    };
    if !version.starts_with("HTTP/1.") || version.len() != "HTTP/1.1".len() {
        return Err(RequestError::Malformed("only HTTP/1.x is spoken"));
    }
    if !target.starts_with('/') {
        return Err(RequestError::Malformed("target is not an absolute path"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(RequestError::Malformed("method is not a token"));
    }
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, _value)) = line.split_once(':') else {
            return Err(RequestError::Malformed("header line without a colon"));
        };
        if name.is_empty()
            || name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(RequestError::Malformed("bad header name"));
        }
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        other => return Err(RequestError::MethodNotAllowed(other.to_string())),
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Some(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
    }))
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    Conflict,
    HeadTooLarge,
    Unavailable,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::Conflict => 409,
            Status::HeadTooLarge => 431,
            Status::Unavailable => 503,
        }
    }
    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::Conflict => "Conflict",
            Status::HeadTooLarge => "Request Header Fields Too Large",
            Status::Unavailable => "Service Unavailable",
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

    /// The bytes on the wire; a HEAD answer has the GET answer's headers
    /// and no body.
    pub fn encode(&self, method: Method) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status.code(),
            self.status.reason(),
            self.content_type,
            self.body.len()
        );
        if self.status == Status::MethodNotAllowed {
            out.push_str("Allow: GET, HEAD, POST\r\n");
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        if method != Method::Head {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// Serves `listener` until `shutdown` turns true, answering each request
/// with `route`.
pub async fn serve<F, A>(listener: TcpListener, route: F, mut shutdown: watch::Receiver<bool>)
where
    F: Fn(Request) -> A + Send + Sync + 'static,
    A: Future<Output = Response> + Send,
{
    let route = Arc::new(route);
    let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    while let Some(((stream, _), permit)) =
        crate::accept::next(&limit, || listener.accept(), &mut shutdown, "admin").await
    {
        let route = route.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, &*route).await {
                debug!(error = %e, "admin connection ended");
            }
            drop(permit);
        });
    }
    info!("admin server stopped accepting");
}

/// One request, one answer. The client gets [`READ_DEADLINE`] to send its
/// head and again to take the answer; the answer itself may take as long as
/// the route needs (a change waits on the Raft leader, within its own
/// bounds).
async fn serve_connection<F, A>(mut stream: TcpStream, route: &F) -> std::io::Result<()>
where
    F: Fn(Request) -> A,
    A: Future<Output = Response>,
{
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "client too slow");
    let head = tokio::time::timeout(READ_DEADLINE, read_head(&mut stream))
        .await
        .map_err(|_| timed_out())?;
    let (response, method) = match head? {
        None => return Ok(()),
        Some(Ok(req)) => {
            let method = req.method;
            (route(req).await, method)
        }
        Some(Err(e)) => (e.response(), Method::Get),
    };
    tokio::time::timeout(READ_DEADLINE, async {
        stream.write_all(&response.encode(method)).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| timed_out())?
}

/// Reads until a whole request head parses (or cannot); `None` if the
/// client closed before a whole head arrived: nobody to answer.
async fn read_head(
    stream: &mut TcpStream,
) -> std::io::Result<Option<Result<Request, RequestError>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        match parse_head(&buf) {
            Ok(Some(req)) => return Ok(Some(Ok(req))),
            Ok(None) => {}
            Err(e) => return Ok(Some(Err(e))),
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request {
        Request {
            method: Method::Get,
            path: path.into(),
            query: String::new(),
        }
    }

    #[test]
    fn parses_get_and_head_with_headers() {
        let r = parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").unwrap();
        assert_eq!(r, Some(get("/metrics")));
        let r = parse_head(b"HEAD /health/live?verbose=1 HTTP/1.0\n\n").unwrap();
        assert_eq!(
            r,
            Some(Request {
                method: Method::Head,
                path: "/health/live".into(),
                query: "verbose=1".into(),
            })
        );
        let r = parse_head(b"POST /v1/members/n2/remove?force=1&x HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.method, Method::Post);
        assert!(r.flag("force") && r.flag("x") && !r.flag("y"));
    }

    #[test]
    fn waits_for_the_rest_of_the_head() {
        assert_eq!(parse_head(b""), Ok(None));
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
            Ok(None)
        );
    }

    #[test]
    fn bad_requests_are_refused_with_400() {
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics SPDY/1.1\r\n\r\n",
            b"G:T /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"\r\n",
        ] {
            let e = parse_head(bad).unwrap_err();
            assert!(matches!(e, RequestError::Malformed(_)), "{bad:?}: {e:?}");
            assert_eq!(e.response().status.code(), 400);
        }
    }

    #[test]
    fn other_methods_get_405_with_allow() {
        let e = parse_head(b"PUT /metrics HTTP/1.1\r\n\r\n").unwrap_err();
        assert_eq!(e, RequestError::MethodNotAllowed("PUT".into()));
        let wire = String::from_utf8(e.response().encode(Method::Get)).unwrap();
        assert!(
            wire.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{wire}"
        );
        assert!(wire.contains("\r\nAllow: GET, HEAD, POST\r\n"), "{wire}");
    }

    /// What the server does with a connection's bytes: parse every prefix
    /// it has read, `step` bytes more each time, until one is decided.
    fn decide(bytes: &[u8], step: usize) -> Option<Result<Option<Request>, RequestError>> {
        let mut end = 0;
        while end < bytes.len() {
            end = (end + step).min(bytes.len());
            match parse_head(&bytes[..end]) {
                Ok(None) => assert!(end < REQUEST_HEAD_BYTES_MAX),
                decided => return Some(decided),
            }
        }
        None
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Random heads (request-line-like and not), read in pieces of any
        /// size: no panic, and the answer is the one the whole buffer gets,
        /// however the reads split it.
        #[test]
        fn random_heads_get_one_answer_however_they_are_read(
            line in "(GET|HEAD|POST|PUT|G:T|)( /[a-z/?=&%\\x00-\\x7f]{0,40}|[a-z]{0,5})( HTTP/1\\.[01]| HTTP/2| x)?(\r?\n[A-Za-z -]{0,12}(: ?[ -~]{0,20})?){0,4}\r?\n\r?\n",
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            step in 1usize..40,
        ) {
            let mut bytes = line.into_bytes();
            bytes.extend_from_slice(&junk);
            let whole = parse_head(&bytes);
            match decide(&bytes, step) {
                Some(decided) => proptest::prop_assert_eq!(&decided, &whole),
                None => proptest::prop_assert_eq!(&whole, &Ok(None)),
            }
            if let Ok(Some(req)) = whole {
                proptest::prop_assert!(req.path.starts_with('/'));
            }
        }

        #[test]
        fn random_bytes_never_panic_the_parser(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700),
            step in 1usize..64,
        ) {
            let whole = parse_head(&bytes);
            if let Some(decided) = decide(&bytes, step) {
                proptest::prop_assert_eq!(decided, whole);
            }
        }
    }

    #[test]
    fn an_oversized_head_is_refused() {
        let mut head = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while head.len() < REQUEST_HEAD_BYTES_MAX {
            head.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        // Without its end, and with it.
        assert_eq!(parse_head(&head), Err(RequestError::TooLarge));
        head.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&head), Err(RequestError::TooLarge));
        assert_eq!(RequestError::TooLarge.response().status.code(), 431);
    }

    #[test]
    fn answers_close_the_connection_and_head_has_no_body() {
        let r = Response::text(Status::Ok, "ok\n");
        let get = String::from_utf8(r.encode(Method::Get)).unwrap();
        assert_eq!(
            get,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 3\r\nConnection: close\r\n\r\nok\n"
        );
        let head = String::from_utf8(r.encode(Method::Head)).unwrap();
        assert!(head.ends_with("Connection: close\r\n\r\n"), "{head}");
    }

    #[tokio::test]
    async fn serves_over_tcp_and_hangs_up_on_slow_clients_politely() {
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
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The head in two pieces.
        s.write_all(b"GET /x HTTP/1.1\r\nHo").await.unwrap();
        s.write_all(b"st: y\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nyou asked for /x\n"), "{answer}");

        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"BREW /pot HTTP/1.1\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");

        stop_tx.send(true).unwrap();
        server.await.unwrap();
    }
}
