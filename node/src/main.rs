fn main() {
    // Before anything can touch rustls: ring, and only ring.
    ramster_node::cluster::tls::install_default_provider();
    if let Err(e) = ramster_node::cli::run() {
        eprintln!("ramster: {e:#}");
        std::process::exit(2);
    }
}
