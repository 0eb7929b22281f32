use std::process::ExitCode;

fn main() -> ExitCode {
    // Before anything can touch rustls: ring, and only ring.
    ramster_node::cluster::tls::install_default_provider();
    match ramster_node::cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ramster: {e:#}");
            ExitCode::from(2)
        }
    }
}
