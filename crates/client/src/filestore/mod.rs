//! Syncing through a plain file store (a folder, WebDAV, S3) with no server.
//!
//! [`objects`] reads and writes the store's objects, with the conditional
//! writes the algorithm needs; [`transport`] answers the engine's requests
//! from them, running the rules of `deltasync_engine::file_store`.

pub mod metered;
pub mod objects;
pub mod replicated;
pub mod transport;

pub use metered::Traffic;
pub use transport::FileStoreApi;

/// Whether `url` names a file store rather than a server: `file://`,
/// `webdav://`, `webdavs://` or `s3://`.
pub fn is_store_url(url: &str) -> bool {
    ["file://", "webdav://", "webdavs://", "s3://"].iter().any(|s| url.starts_with(s))
}
