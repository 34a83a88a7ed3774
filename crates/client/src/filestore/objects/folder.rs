//! A folder as an object store (`file:///dir`).
//!
//! Reads, lists and deletes go through OpenDAL's fs service. Writes do not:
//! in OpenDAL 0.57 its `write_with(..).if_not_exists(true)` either opens the
//! final path with `O_EXCL` and writes into it (a reader can see a partial
//! object) or, with `atomic_write_dir` set, checks that the path is absent
//! and later renames a staged file over it (two racing writers can both
//! "win", the second replacing the first). Neither is a create-only write.
//!
//! So [`Folder::create`] stages the bytes in `.tmp/` under the root, syncs
//! them to disk, and publishes them with `link(2)` (`std::fs::hard_link`),
//! which fails when the final path exists: exactly one of several racers
//! publishes, and the published file is complete. A filesystem without hard
//! links (FAT, exFAT, some network mounts) is refused as having no
//! conditional writes.
//!
//! A folder has no ETags: an object's version is the SHA-256 (hex) of its
//! content. [`Folder::replace`] compares that and then renames a staged file
//! over the object, under an advisory lock (`.tmp/replace.lock`). **It is
//! atomic only between processes of one machine on a local disk**, not
//! between devices that share the folder through a sync client (Dropbox,
//! Syncthing) or a network filesystem whose locks do not reach the other
//! machine. It is meant only for a hint object, whose loss costs a slower
//! sync, never data.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use opendal::{Operator, services::Fs};
use reqwest::Url;
use sha2::{Digest, Sha256};

use super::{Created, Object, ObjectError, Replaced, STAGING_DIR, from_opendal};

const DENIED_HINT: &str = "check that this user may read and write the folder";

/// A folder store.
pub(super) struct Folder {
    root: PathBuf,
    url: String,
    op: Operator,
}

impl Folder {
    /// Opens the folder named by a `file://` URL, creating it if missing.
    pub(super) fn open(url: &Url) -> Result<Folder, String> {
        if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
            return Err("a file:// URL must name a local folder (file:///dir)".to_string());
        }
        let root = url.to_file_path().map_err(|()| "the folder must be an absolute path".to_string())?;
        let root_str = root.to_str().ok_or("the folder's path must be UTF-8")?;
        let op = Operator::new(Fs::default().root(root_str))
            .map_err(|e| format!("cannot open the folder {}: {e}", root.display()))?
            .finish();
        Ok(Folder { url: format!("file://{}", root.display()), root, op })
    }

    /// Deletes staged files older than `older_than` (left by a writer that
    /// died between staging and linking); the replace lock stays.
    pub(super) fn clean_staging(&self, older_than: std::time::Duration) -> Result<u64, ObjectError> {
        let staging = self.root.join(STAGING_DIR);
        let entries = match std::fs::read_dir(&staging) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(self.io_error("clean", e)),
        };
        let mut deleted = 0;
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > older_than);
            if old && entry.file_name() != "replace.lock" && std::fs::remove_file(entry.path()).is_ok() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    pub(super) fn describe(&self) -> String {
        self.url.clone()
    }

    fn error(&self, op: &'static str, e: opendal::Error) -> ObjectError {
        from_opendal(self.describe(), op, DENIED_HINT, e)
    }

    fn io_error(&self, op: &'static str, e: std::io::Error) -> ObjectError {
        match e.kind() {
            ErrorKind::PermissionDenied => {
                ObjectError::Denied { store: self.describe(), hint: format!("{DENIED_HINT} ({e})") }
            }
            ErrorKind::NotFound => ObjectError::Unreachable { store: self.describe(), detail: e.to_string() },
            _ => ObjectError::Io { store: self.describe(), op, detail: e.to_string(), retryable: false },
        }
    }

    pub(super) async fn read(&self, path: &str) -> Result<Option<Object>, ObjectError> {
        match self.op.read(path).await {
            Ok(buffer) => {
                let bytes = buffer.to_vec();
                Ok(Some(Object { version: Some(version_of(&bytes)), bytes }))
            }
            Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.error("read", e)),
        }
    }

    pub(super) async fn create(&self, path: &str, bytes: Vec<u8>) -> Result<Created, ObjectError> {
        let (root, path) = (self.root.clone(), path.to_string());
        let outcome = tokio::task::spawn_blocking(move || publish(&root, &path, &bytes)).await;
        self.published("create", outcome)
    }

    pub(super) async fn replace(
        &self,
        path: &str,
        bytes: Vec<u8>,
        expected: Option<&str>,
    ) -> Result<Replaced, ObjectError> {
        let (root, path, expected) = (self.root.clone(), path.to_string(), expected.map(str::to_string));
        let outcome = tokio::task::spawn_blocking(move || -> Result<Result<Replaced, Published>, std::io::Error> {
            let lock = open_staging(&root)?;
            let lock = OpenOptions::new().create(true).truncate(false).write(true).open(lock.join("replace.lock"))?;
            lock.lock()?;
            let target = root.join(&path);
            let current = match std::fs::read(&target) {
                Ok(current) => Some(current),
                Err(e) if e.kind() == ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            match (expected, current) {
                (None, None) => Ok(publish(&root, &path, &bytes)?.map(|created| match created {
                    Created::Written => Replaced::Written,
                    Created::Taken => Replaced::Changed,
                })),
                (Some(expected), Some(current)) if version_of(&current) == expected => {
                    let staged = stage(&root, &bytes)?;
                    let renamed = std::fs::rename(&staged, &target);
                    if renamed.is_err() {
                        let _ = std::fs::remove_file(&staged);
                    }
                    renamed?;
                    sync_dir(target.parent());
                    Ok(Ok(Replaced::Written))
                }
                _ => Ok(Ok(Replaced::Changed)),
            }
        })
        .await;
        self.published("replace", outcome)
    }

    /// Turns the outcome of a blocking publish into the caller's result.
    fn published<T>(
        &self,
        op: &'static str,
        outcome: Result<Result<Result<T, Published>, std::io::Error>, tokio::task::JoinError>,
    ) -> Result<T, ObjectError> {
        match outcome {
            Ok(Ok(Ok(done))) => Ok(done),
            Ok(Ok(Err(Published::NoHardLinks(e)))) => Err(ObjectError::NoConditionalWrites {
                store: self.describe(),
                why: format!(
                    "the folder refused a hard link ({e}): its filesystem has no hard links (FAT, exFAT, some network mounts) or the folder is not writable; deltasync publishes each new object with a hard link because a link never replaces an existing one"
                ),
            }),
            Ok(Err(e)) => Err(self.io_error(op, e)),
            Err(e) => Err(ObjectError::Io { store: self.describe(), op, detail: e.to_string(), retryable: false }),
        }
    }

    pub(super) async fn list(&self, dir: &str) -> Result<Vec<String>, ObjectError> {
        super::list_files(&self.op, dir).await.map_err(|e| self.error("list", e))
    }

    pub(super) async fn delete(&self, path: &str) -> Result<(), ObjectError> {
        super::delete_file(&self.op, path).await.map_err(|e| self.error("delete", e))
    }

    pub(super) async fn remove_empty_dir(&self, dir: &str) -> Result<(), ObjectError> {
        let dir = self.root.join(dir);
        tokio::task::spawn_blocking(move || std::fs::remove_dir(dir))
            .await
            .map_err(|e| ObjectError::Io {
                store: self.describe(),
                op: "delete",
                detail: e.to_string(),
                retryable: false,
            })?
            .map_err(|e| self.io_error("delete", e))
    }
}

/// Why a publish failed in a way the caller must hear about as such.
enum Published {
    /// The filesystem has no hard links.
    NoHardLinks(std::io::Error),
}

/// An object's version in a folder: the SHA-256 (hex) of its content.
fn version_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The staging folder under `root`, created if missing.
fn open_staging(root: &Path) -> std::io::Result<PathBuf> {
    let staging = root.join(STAGING_DIR);
    std::fs::create_dir_all(&staging)?;
    Ok(staging)
}

/// Writes `bytes` to a fresh file in the staging folder and syncs it to disk.
fn stage(root: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let staged = open_staging(root)?.join(uuid::Uuid::new_v4().to_string());
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&staged)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(staged)
}

/// Stages `bytes` and publishes them at `path` unless something is there.
fn publish(root: &Path, path: &str, bytes: &[u8]) -> std::io::Result<Result<Created, Published>> {
    let target = root.join(path);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let staged = stage(root, bytes)?;
    let linked = std::fs::hard_link(&staged, &target);
    let _ = std::fs::remove_file(&staged);
    match linked {
        Ok(()) => {
            sync_dir(target.parent());
            Ok(Ok(Created::Written))
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(Ok(Created::Taken)),
        // link(2) answers EPERM or EOPNOTSUPP on a filesystem without hard
        // links; the staged file was just written, so the folder is writable.
        Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::Unsupported) => {
            Ok(Err(Published::NoHardLinks(e)))
        }
        Err(e) => Err(e),
    }
}

/// Syncs a directory's entries to disk, best effort (a published name should
/// survive a crash; not every filesystem can sync a directory).
fn sync_dir(dir: Option<&Path>) {
    if let Some(dir) = dir
        && let Ok(handle) = File::open(dir)
    {
        let _ = handle.sync_all();
    }
}
