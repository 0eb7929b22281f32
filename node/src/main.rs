fn main() {
    if let Err(e) = ramster_node::cli::run() {
        eprintln!("ramster: {e:#}");
        std::process::exit(2);
    }
}
