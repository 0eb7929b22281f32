//! Stores a page on a running node, loads it back and checks every byte,
//! invalidates it, and shows that a load then misses.
//!
//! ```text
//! cargo run -p ramster-client --example store_load -- --socket /tmp/n1/api.sock [--area 7]
//! ```
//!
//! The socket is `--socket PATH`, else `RAMSTER_API_SOCKET`. The area is
//! initialised first, which empties it: pick one no other client uses.
//! Exits 0 when every step went as the contract says, 1 on an error or a
//! page that came back wrong (or came back after it was invalidated), 2
//! when the node refused the store (allowed by the contract: the page stays
//! ours, and there is nothing to load).

use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use ramster_client::{Client, PAGE_BYTES, v1::Status};

const USAGE: &str = "usage: store_load [--socket PATH] [--area N]  (or RAMSTER_API_SOCKET=PATH)";

struct Args {
    socket: PathBuf,
    area: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut socket = std::env::var_os("RAMSTER_API_SOCKET").map(PathBuf::from);
    let mut area = 7;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--socket" => socket = Some(value()?.into()),
            "--area" => {
                let v = value()?;
                area = v.parse().map_err(|e| format!("--area {v}: {e}"))?;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unexpected argument {arg}\n{USAGE}")),
        }
    }
    let socket = socket.ok_or(format!("no socket given\n{USAGE}"))?;
    Ok(Args { socket, area })
}

/// A page that compresses as real memory does, not a same-filled one (the
/// node keeps those as one word): text with a counter in it.
fn page() -> Bytes {
    let mut page = Vec::with_capacity(PAGE_BYTES);
    let mut line = 0;
    while page.len() < PAGE_BYTES {
        page.extend_from_slice(format!("line {line} of the store_load example\n").as_bytes());
        line += 1;
    }
    page.truncate(PAGE_BYTES);
    Bytes::from(page)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    match run(&args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: &Args) -> Result<ExitCode, ramster_client::ClientError> {
    let (area, offset) = (args.area, 42);
    let client = Client::connect(&args.socket).await?;
    let welcome = client.welcome();
    println!(
        "connected to node {} at {} (protocol {}, pages of {} bytes)",
        welcome.node,
        args.socket.display(),
        welcome.version,
        welcome.page_bytes
    );

    client.init_area(area, false).await?;
    println!("init area {area}: empty");

    let stored = page();
    let status = client
        .store_pages(area, &[(offset, stored.clone())])
        .await?[0];
    println!(
        "store area {area} offset {offset}: {}",
        status.as_str_name()
    );
    if status != Status::Ok {
        println!("the node refused the page: it stays ours, and there is nothing to load");
        return Ok(ExitCode::from(2));
    }

    match client.load_pages(area, &[offset]).await?.remove(0) {
        Ok(loaded) if loaded == stored => {
            println!(
                "load area {area} offset {offset}: {} bytes, identical to what was stored",
                loaded.len()
            );
        }
        Ok(loaded) => {
            let first = loaded.iter().zip(stored.iter()).position(|(a, b)| a != b);
            eprintln!(
                "MISMATCH: load area {area} offset {offset} gave {} bytes, first difference at {first:?}",
                loaded.len()
            );
            return Ok(ExitCode::from(1));
        }
        Err(status) => {
            eprintln!(
                "MISMATCH: an accepted page did not load: {}",
                status.as_str_name()
            );
            return Ok(ExitCode::from(1));
        }
    }

    let dropped = client.invalidate_pages(area, &[offset]).await?;
    println!("invalidate area {area} offset {offset}: {dropped} page dropped");

    match client.load_pages(area, &[offset]).await?.remove(0) {
        Err(Status::NotFound) => {
            println!("load area {area} offset {offset} after invalidate: NOT_FOUND (a miss)");
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => {
            eprintln!(
                "load after invalidate: {} where NOT_FOUND was due",
                status.as_str_name()
            );
            Ok(ExitCode::from(1))
        }
        Ok(_) => {
            eprintln!("MISMATCH: an invalidated page loaded back");
            Ok(ExitCode::from(1))
        }
    }
}
