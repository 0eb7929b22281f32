//! Blocking HTTP/1.1 against a node's admin endpoint: GET for `ramster
//! status` and `ramster health`, POST for `ramster cluster`, on std
//! sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, bail};

/// How long to wait for the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for the answer, per read.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the answer to a change, which waits on the Raft
/// leader (the node gives up after 20 s).
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read (a status of thousands of nodes is far smaller).
pub const ANSWER_BYTES_MAX: u64 = 16 << 20;

/// An answer: its status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// `HOST:PORT`, with an optional `http://` in front and `/` behind, as
/// people paste endpoints.
fn host_port(endpoint: &str) -> &str {
    let e = endpoint.trim();
    let e = e.strip_prefix("http://").unwrap_or(e);
    e.trim_end_matches('/')
}

fn resolve(endpoint: &str) -> anyhow::Result<Vec<SocketAddr>> {
    let hp = host_port(endpoint);
    let addrs: Vec<SocketAddr> = hp
        .to_socket_addrs()
        .with_context(|| format!("endpoint {endpoint:?} is not HOST:PORT"))?
        .collect();
    if addrs.is_empty() {
        bail!("endpoint {endpoint:?} resolves to no address");
    }
    Ok(addrs)
}

/// GETs `path` from `endpoint`.
pub fn get(endpoint: &str, path: &str) -> anyhow::Result<Answer> {
    get_first(&[endpoint.to_string()], path).map(|(_, a)| a)
}

/// POSTs to `path` (no body) at `endpoint`.
pub fn post(endpoint: &str, path: &str) -> anyhow::Result<Answer> {
    post_first(&[endpoint.to_string()], path).map(|(_, a)| a)
}

/// GETs `path` from the first of `endpoints` that takes a connection; that
/// endpoint and its answer.
pub fn get_first(endpoints: &[String], path: &str) -> anyhow::Result<(String, Answer)> {
    let (endpoint, stream) = connect_first(endpoints)?;
    let answer = exchange(stream, "GET", &endpoint, path, READ_TIMEOUT)?;
    Ok((endpoint, answer))
}

/// POSTs to `path` (no body) at the first of `endpoints` that takes a
/// connection; that endpoint and its answer. Only a refused connection
/// moves on to the next: a request sent may have been carried out, even
/// when its answer never came.
pub fn post_first(endpoints: &[String], path: &str) -> anyhow::Result<(String, Answer)> {
    let (endpoint, stream) = connect_first(endpoints)?;
    let answer = exchange(stream, "POST", &endpoint, path, CHANGE_TIMEOUT)?;
    Ok((endpoint, answer))
}

/// A connection to the first of `endpoints` that takes one, and that
/// endpoint.
fn connect_first(endpoints: &[String]) -> anyhow::Result<(String, TcpStream)> {
    let mut failures = Vec::new();
    for endpoint in endpoints {
        match connect(endpoint) {
            Ok(stream) => {
                for f in &failures {
                    eprintln!("ramster: {f}; asked {endpoint} instead");
                }
                return Ok((endpoint.clone(), stream));
            }
            Err(e) => failures.push(e),
        }
    }
    match failures.len() {
        0 => bail!("no endpoint to ask"),
        1 => Err(failures.pop().expect("one")),
        _ => bail!(
            "no endpoint answered: {}",
            failures
                .iter()
                .map(|e| format!("{e:#}"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
}

fn connect(endpoint: &str) -> anyhow::Result<TcpStream> {
    let mut last_error = None;
    for addr in resolve(endpoint)? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => {
                last_error = Some(anyhow::Error::new(e).context(format!("connecting to {addr}")))
            }
        }
    }
    Err(last_error.expect("at least one address was tried"))
}

fn exchange(
    mut stream: TcpStream,
    method: &str,
    endpoint: &str,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ramster/{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        host_port(endpoint),
        env!("CARGO_PKG_VERSION")
    );
    stream
        .write_all(request.as_bytes())
        .context("sending the request")?;
    let mut raw = Vec::new();
    stream
        .take(ANSWER_BYTES_MAX + 1)
        .read_to_end(&mut raw)
        .context("reading the answer")?;
    if raw.len() as u64 > ANSWER_BYTES_MAX {
        bail!("the answer is over {ANSWER_BYTES_MAX} bytes");
    }
    parse_answer(&raw)
}

/// Splits an answer into status and body, holding the body to its
/// `Content-Length` when there is one.
pub fn parse_answer(raw: &[u8]) -> anyhow::Result<Answer> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("not an HTTP answer (no end of head)");
    };
    let head = std::str::from_utf8(&raw[..split]).context("the answer's head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        bail!("not an HTTP answer: {status_line:?}");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 answer: {status_line:?}");
    }
    let status: u16 = code
        .parse()
        .with_context(|| format!("bad status in {status_line:?}"))?;
    let mut body = &raw[split + 4..];
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            let len: usize = value
                .trim()
                .parse()
                .with_context(|| format!("bad Content-Length {value:?}"))?;
            if body.len() < len {
                bail!("the answer was cut short: {} of {len} bytes", body.len());
            }
            body = &body[..len];
        }
    }
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers_and_holds_bodies_to_their_length() {
        let a =
            parse_answer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\n\r\nno\nextra")
                .unwrap();
        assert_eq!(a.status, 503);
        assert_eq!(a.body, "no\n");
        let a = parse_answer(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap();
        assert_eq!(a.body, "all of it");
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK").is_err());
    }

    #[test]
    fn endpoints_may_carry_a_scheme_and_a_slash() {
        assert_eq!(host_port("http://127.0.0.1:7801/"), "127.0.0.1:7801");
        assert_eq!(host_port(" 10.0.0.1:7801 "), "10.0.0.1:7801");
        assert!(resolve("127.0.0.1").is_err(), "no port");
    }

    #[test]
    fn a_closed_port_is_an_error_not_a_hang() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = get(&format!("127.0.0.1:{port}"), "/health/live").unwrap_err();
        assert!(format!("{e:#}").contains("connecting to"), "{e:#}");
    }

    #[test]
    fn the_first_endpoint_that_takes_a_connection_answers() {
        let closed = || {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("127.0.0.1:{port}")
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let live = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                .unwrap();
            String::from_utf8(head).unwrap()
        });
        let endpoints = [closed(), "nonsense".to_string(), live.clone()];
        let (who, answer) = get_first(&endpoints, "/health/live").unwrap();
        assert_eq!(
            (who, answer.status, answer.body.as_str()),
            (live, 200, "ok\n")
        );
        assert!(
            server
                .join()
                .unwrap()
                .starts_with("GET /health/live HTTP/1.1\r\n")
        );

        let (a, b) = (closed(), closed());
        let e = get_first(&[a.clone(), b.clone()], "/").unwrap_err();
        let e = format!("{e:#}");
        assert!(e.starts_with("no endpoint answered"), "{e}");
        assert!(e.contains(&a) && e.contains(&b), "{e}");
    }
}
