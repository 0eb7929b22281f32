//! A ramster node: a compressed page store (the zcache part), the frontswap
//! and cleancache contracts on top of it, and the native API through which
//! clients reach them.

pub mod accept;
pub mod admin;
pub mod cli;
pub mod cluster;
pub mod frontend;
pub mod metrics;
pub mod poll;
pub mod store;
#[cfg(test)]
mod tidy;

/// Creates `dir` and its missing parents readable by this user alone:
/// a data dir holds swapped-out pages, keys and the API socket. Folders
/// that exist already keep the mode their operator gave them.
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}
