//! File store mode: syncing a user's data through a plain object store (a folder, WebDAV or S3) with no deltasync server.

pub mod objects;
