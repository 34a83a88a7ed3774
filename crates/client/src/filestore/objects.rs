//! The object-store layer of the file store mode: read, create-only write,
//! compare-and-swap replace, list and delete of small objects in a folder, on
//! a WebDAV server or in an S3 bucket.
//!
//! The sync algorithm on top relies on two primitives, and a store that does
//! not really give them is refused ([`ObjectStore::probe`]):
//!
//! - [`ObjectStore::create`] is a **create-only write**: of N devices that
//!   create the same path at once, exactly one gets [`Created::Written`].
//!   HTTP stores get `If-None-Match: *`; a folder publishes a staged file
//!   with a hard link, which never replaces.
//! - [`ObjectStore::replace`] is a **compare-and-swap**: it writes only if the
//!   object's version (its ETag on HTTP stores) is still the one the caller
//!   read (`If-Match`).
//!
//! Storage access goes through Apache OpenDAL where it offers what is needed.
//! It does not everywhere, and the modules say why: `folder.rs` publishes
//! created objects itself (OpenDAL's fs service either exposes partial files
//! or checks existence apart from the rename), and `webdav.rs` sends its own
//! conditional PUTs and GETs (OpenDAL's webdav service has no conditional
//! writes and returns no ETag with a read).
//!
//! A store is opened from a URL — `file:///dir`, `webdav://host[:port]/path`
//! (`webdavs://` for https) or `s3://bucket/prefix` — and credentials from the
//! environment ([`StoreEnv`]).

mod folder;
mod probe;
mod s3;
mod webdav;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;

/// How long one storage request may take before it fails as
/// [`ObjectError::Timeout`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The name of the folder, under a store's root, where a folder store stages
/// objects before publishing them. Paths under it are refused.
pub const STAGING_DIR: &str = ".tmp";

/// The environment variable with the WebDAV user name.
pub const ENV_STORE_USER: &str = "DELTASYNC_STORE_USER";
/// The environment variable with the WebDAV password.
pub const ENV_STORE_PASSWORD: &str = "DELTASYNC_STORE_PASSWORD";
/// The environment variable with the S3 endpoint (for a store other than AWS).
pub const ENV_AWS_ENDPOINT_URL: &str = "AWS_ENDPOINT_URL";
/// The environment variable with the S3 access key id.
pub const ENV_AWS_ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
/// The environment variable with the S3 secret access key.
pub const ENV_AWS_SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
/// The environment variable with the S3 region.
pub const ENV_AWS_REGION: &str = "AWS_REGION";
/// The environment variable with the S3 region, when [`ENV_AWS_REGION`] is unset.
pub const ENV_AWS_DEFAULT_REGION: &str = "AWS_DEFAULT_REGION";

/// One object as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// The object's content.
    pub bytes: Vec<u8>,
    /// The token [`ObjectStore::replace`] compares: the ETag on HTTP stores
    /// (`None` when the server sends none), the SHA-256 (hex) of the content
    /// in a folder.
    pub version: Option<String>,
}

/// The outcome of a create-only write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The object did not exist and now holds the given bytes.
    Written,
    /// The path already held an object; it was left as it was.
    Taken,
}

/// The outcome of a compare-and-swap replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replaced {
    /// The object held the expected version and now holds the given bytes.
    Written,
    /// The object's version was not the expected one (or it exists when it was
    /// expected absent, or is absent when a version was expected); it was left
    /// as it was.
    Changed,
}

/// What went wrong talking to an object store. Every message names the store
/// (its URL without credentials) and says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// The store URL cannot be used.
    #[error(
        "invalid store URL {url:?}: {why} (use file:///dir, webdav://host[:port]/path, webdavs://host[:port]/path or s3://bucket/prefix)"
    )]
    InvalidUrl {
        /// The URL as given, without its password.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// An object path given by the caller cannot be used.
    #[error("invalid object path {path:?}: {why}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// The store could not be reached (connection refused, DNS, TLS, a folder
    /// that is not mounted). Transient.
    #[error("cannot reach the store {store}: {detail}; check that it is running and the URL is right")]
    Unreachable {
        /// The store, without credentials.
        store: String,
        /// What the network or the operating system said.
        detail: String,
    },
    /// A request did not finish within [`REQUEST_TIMEOUT`]. Transient.
    #[error("the store {store} did not answer a {op} within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout {
        /// The store, without credentials.
        store: String,
        /// What was being done (`read`, `create`, …).
        op: &'static str,
    },
    /// The store refused the credentials (HTTP 401 or 403, a folder's
    /// permissions).
    #[error("the store {store} refused access: {hint}")]
    Denied {
        /// The store, without credentials.
        store: String,
        /// Which settings to check.
        hint: String,
    },
    /// The store does not honour conditional writes, so syncing through it
    /// could silently lose a change.
    #[error(
        "deltasync will not sync through {store}: it does not honour conditional writes ({why}), so two devices writing at the same time could silently lose a change. Use a store that does: an S3 bucket (AWS S3, or a server with conditional PutObject), a folder on a local disk, a WebDAV server that passes this check, or a deltasync server"
    )]
    NoConditionalWrites {
        /// The store, without credentials.
        store: String,
        /// Which check failed.
        why: String,
    },
    /// The store answered with a status this layer does not expect.
    #[error("the store {store} answered {status} to a {op}: {detail}")]
    Status {
        /// The store, without credentials.
        store: String,
        /// What was being done.
        op: &'static str,
        /// The HTTP status.
        status: u16,
        /// The start of the response body, or the reason phrase.
        detail: String,
    },
    /// Any other failure of the storage (a full disk, an unexpected answer).
    #[error("the store {store} failed a {op}: {detail}")]
    Io {
        /// The store, without credentials.
        store: String,
        /// What was being done.
        op: &'static str,
        /// What the storage said.
        detail: String,
        /// Whether the same request may succeed later.
        retryable: bool,
    },
}

impl ObjectError {
    /// Whether the same request may succeed if tried again later: network
    /// failures, timeouts, HTTP 5xx, 423 Locked and 429 Too Many Requests.
    pub fn is_retryable(&self) -> bool {
        match self {
            ObjectError::Unreachable { .. } | ObjectError::Timeout { .. } => true,
            ObjectError::Status { status, .. } => *status >= 500 || *status == 423 || *status == 429,
            ObjectError::Io { retryable, .. } => *retryable,
            ObjectError::InvalidUrl { .. }
            | ObjectError::InvalidPath { .. }
            | ObjectError::Denied { .. }
            | ObjectError::NoConditionalWrites { .. } => false,
        }
    }
}

/// The environment a store is opened with: the credential variables
/// ([`ENV_STORE_USER`], [`ENV_STORE_PASSWORD`], the `AWS_*` ones). Taken from
/// the process with [`StoreEnv::from_process`], or given explicitly with
/// [`StoreEnv::from_pairs`] (tests, or an app that keeps credentials
/// elsewhere), so that opening a store never depends on global state the
/// caller did not choose. Empty values count as unset. Its `Debug` output
/// hides the values.
#[derive(Clone, Default)]
pub struct StoreEnv {
    vars: BTreeMap<String, String>,
}

impl StoreEnv {
    /// Every variable a store reads.
    pub const VARS: [&'static str; 7] = [
        ENV_STORE_USER,
        ENV_STORE_PASSWORD,
        ENV_AWS_ENDPOINT_URL,
        ENV_AWS_ACCESS_KEY_ID,
        ENV_AWS_SECRET_ACCESS_KEY,
        ENV_AWS_REGION,
        ENV_AWS_DEFAULT_REGION,
    ];

    /// The variables of [`StoreEnv::VARS`] as this process has them.
    pub fn from_process() -> StoreEnv {
        StoreEnv::from_pairs(
            StoreEnv::VARS.iter().filter_map(|name| std::env::var(name).ok().map(|value| (*name, value))),
        )
    }

    /// An environment of exactly these variables.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> StoreEnv {
        let vars = pairs.into_iter().map(|(k, v)| (k.into(), v.into())).filter(|(_, v)| !v.is_empty()).collect();
        StoreEnv { vars }
    }

    /// The variable's value, when set and not empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }
}

impl fmt::Debug for StoreEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.vars.keys()).finish()
    }
}

/// A handle on one object store. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct ObjectStore {
    backend: Arc<Backend>,
}

enum Backend {
    Folder(folder::Folder),
    S3(s3::S3Store),
    WebDav(webdav::WebDav),
}

impl fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ObjectStore").field(&self.describe()).finish()
    }
}

impl ObjectStore {
    /// Opens the store at `url` with credentials from this process's
    /// environment ([`StoreEnv::from_process`]). Nothing is sent yet: the
    /// first request (or [`ObjectStore::probe`]) finds out whether the store
    /// answers.
    pub fn open(url: &str) -> Result<ObjectStore, ObjectError> {
        ObjectStore::open_with(url, &StoreEnv::from_process())
    }

    /// Opens the store at `url` with credentials from `env` only.
    ///
    /// - `file:///dir`: a folder (created if missing).
    /// - `webdav://host[:port]/path`, `webdavs://…` (https): user and
    ///   password from [`ENV_STORE_USER`] and [`ENV_STORE_PASSWORD`], else
    ///   from the URL's user info.
    /// - `s3://bucket/prefix`: endpoint, keys and region from the `AWS_*`
    ///   variables; the region defaults to `us-east-1`.
    pub fn open_with(url: &str, env: &StoreEnv) -> Result<ObjectStore, ObjectError> {
        let invalid = |why: &str| ObjectError::InvalidUrl { url: redact(url), why: why.to_string() };
        let parsed = Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        let backend = match parsed.scheme() {
            "file" => Backend::Folder(folder::Folder::open(&parsed).map_err(|why| invalid(&why))?),
            "webdav" | "webdavs" => Backend::WebDav(webdav::WebDav::open(&parsed, env).map_err(|why| invalid(&why))?),
            "s3" => Backend::S3(s3::S3Store::open(&parsed, env).map_err(|why| invalid(&why))?),
            other => return Err(invalid(&format!("unknown scheme {other:?}"))),
        };
        Ok(ObjectStore { backend: Arc::new(backend) })
    }

    /// The store's URL without credentials, for messages.
    pub fn describe(&self) -> String {
        match &*self.backend {
            Backend::Folder(b) => b.describe(),
            Backend::S3(b) => b.describe(),
            Backend::WebDav(b) => b.describe(),
        }
    }

    /// Reads the object at `path`; `None` when there is none.
    pub async fn read(&self, path: &str) -> Result<Option<Object>, ObjectError> {
        check_path(path)?;
        self.deadline("read", async {
            match &*self.backend {
                Backend::Folder(b) => b.read(path).await,
                Backend::S3(b) => b.read(path).await,
                Backend::WebDav(b) => b.read(path).await,
            }
        })
        .await
    }

    /// Writes `bytes` at `path` only if no object is there, atomically: of
    /// several devices creating the same path at once exactly one gets
    /// [`Created::Written`], and a reader never sees a partial object.
    /// Missing parent directories are created.
    pub async fn create(&self, path: &str, bytes: Vec<u8>) -> Result<Created, ObjectError> {
        check_path(path)?;
        self.deadline("create", async {
            match &*self.backend {
                Backend::Folder(b) => b.create(path, bytes).await,
                Backend::S3(b) => b.create(path, bytes).await,
                Backend::WebDav(b) => b.create(path, bytes).await,
            }
        })
        .await
    }

    /// Replaces the object at `path` only if its version is still `expected`
    /// (`None`: only if there is no object), else [`Replaced::Changed`].
    /// As atomic as the store's `If-Match`: on S3, yes; on a WebDAV server,
    /// only if [`ObjectStore::probe`] passed (and see its limits); in a folder,
    /// only between processes of one machine (see `folder.rs`: meant for a
    /// hint object only).
    pub async fn replace(&self, path: &str, bytes: Vec<u8>, expected: Option<&str>) -> Result<Replaced, ObjectError> {
        check_path(path)?;
        self.deadline("replace", async {
            match &*self.backend {
                Backend::Folder(b) => b.replace(path, bytes, expected).await,
                Backend::S3(b) => b.replace(path, bytes, expected).await,
                Backend::WebDav(b) => b.replace(path, bytes, expected).await,
            }
        })
        .await
    }

    /// The names (not paths) of the objects directly under `dir` (`""` for the
    /// root), sorted; empty when `dir` does not exist. Sub-directories are not
    /// listed.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, ObjectError> {
        let dir = dir.trim_end_matches('/');
        if !dir.is_empty() {
            check_path(dir)?;
        }
        let mut names = self
            .deadline("list", async {
                match &*self.backend {
                    Backend::Folder(b) => b.list(dir).await,
                    Backend::S3(b) => b.list(dir).await,
                    Backend::WebDav(b) => b.list(dir).await,
                }
            })
            .await?;
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Deletes the object at `path`; an absent object is fine.
    pub async fn delete(&self, path: &str) -> Result<(), ObjectError> {
        check_path(path)?;
        self.deadline("delete", async {
            match &*self.backend {
                Backend::Folder(b) => b.delete(path).await,
                Backend::S3(b) => b.delete(path).await,
                Backend::WebDav(b) => b.delete(path).await,
            }
        })
        .await
    }

    /// Deletes what a crashed writer can leave behind and nothing reads: on a
    /// folder, staged files in `.tmp/` older than `older_than` (a create
    /// stages its bytes there before linking them to their name). Other
    /// stores write whole objects in one request and leave nothing. Returns
    /// how many were deleted.
    pub async fn clean_orphans(&self, older_than: std::time::Duration) -> Result<u64, ObjectError> {
        match &*self.backend {
            Backend::Folder(b) => b.clean_staging(older_than),
            Backend::S3(_) | Backend::WebDav(_) => Ok(0),
        }
    }

    /// Checks, before anything is synced, that the store's conditional writes
    /// really work. Under `probe/<random uuid>/` it checks that a second
    /// create of a path is refused and leaves the first's bytes; that reads
    /// return a version; that a replace with a wrong version, or expecting no
    /// object where one is, is refused and changes nothing; that a replace
    /// with the current version is written (a second one with that, now
    /// stale, version should be refused: a store that accepts it, as wsgidav
    /// does within a second, is only warned of with `tracing`, since the file
    /// store replaces only its head hint); and that of 4 concurrent creates of a
    /// fresh path exactly one is written, 8 times. Then it deletes its
    /// objects. A store whose check is not atomic can pass the races by luck:
    /// a passed probe is evidence, not proof (docs/file-store-servers.md).
    /// Fails with [`ObjectError::NoConditionalWrites`] naming the check that
    /// failed.
    pub async fn probe(&self) -> Result<(), ObjectError> {
        probe::run(self).await
    }

    /// Removes the (now empty) directory `dir` and nothing else, best effort:
    /// the probe's clean-up.
    async fn remove_empty_dir(&self, dir: &str) {
        let _ = self
            .deadline("delete", async {
                match &*self.backend {
                    Backend::Folder(b) => b.remove_empty_dir(dir).await,
                    Backend::S3(_) => Ok(()),
                    Backend::WebDav(b) => b.remove_empty_dir(dir).await,
                }
            })
            .await;
    }

    async fn deadline<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, ObjectError>>,
    ) -> Result<T, ObjectError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
            Ok(result) => result,
            Err(_) => Err(ObjectError::Timeout { store: self.describe(), op }),
        }
    }
}

/// Refuses object paths that could escape the store's root or that the store
/// keeps for itself.
fn check_path(path: &str) -> Result<(), ObjectError> {
    let invalid = |why: &str| ObjectError::InvalidPath { path: path.to_string(), why: why.to_string() };
    if path.is_empty() {
        return Err(invalid("it is empty"));
    }
    if path.starts_with('/') || path.ends_with('/') {
        return Err(invalid("it must be relative (like log/1.json), with no leading or trailing '/'"));
    }
    if path.contains('\\') || path.contains('\0') {
        return Err(invalid("it holds a backslash or a NUL character"));
    }
    for segment in path.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(invalid("it has an empty, '.' or '..' segment"));
        }
    }
    if path.split('/').next() == Some(STAGING_DIR) {
        return Err(invalid("the store keeps .tmp/ for staging"));
    }
    Ok(())
}

/// The URL with any password replaced, for messages.
fn redact(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_string(),
        },
    }
}

/// Maps an OpenDAL error (other than the `NotFound` and `ConditionNotMatch`
/// that callers handle) to an [`ObjectError`].
fn from_opendal(store: String, op: &'static str, denied_hint: &str, e: opendal::Error) -> ObjectError {
    use opendal::ErrorKind;
    match e.kind() {
        ErrorKind::PermissionDenied => ObjectError::Denied { store, hint: format!("{denied_hint} ({e})") },
        ErrorKind::RateLimited => ObjectError::Status { store, op, status: 429, detail: e.to_string() },
        _ if e.is_temporary() => ObjectError::Unreachable { store, detail: e.to_string() },
        _ => ObjectError::Io { store, op, detail: e.to_string(), retryable: false },
    }
}

/// The names of the files directly under `dir` through OpenDAL (an absent
/// folder lists as empty): the same for every backend that lists with it.
async fn list_files(op: &opendal::Operator, dir: &str) -> Result<Vec<String>, opendal::Error> {
    let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    let entries = match op.list(&prefix).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == opendal::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(entries
        .into_iter()
        .filter(|entry| entry.metadata().is_file() && entry.path() != prefix)
        .map(|entry| entry.name().to_string())
        .collect())
}

/// Deletes `path` through OpenDAL; an absent one is fine.
async fn delete_file(op: &opendal::Operator, path: &str) -> Result<(), opendal::Error> {
    match op.delete(path).await {
        Err(e) if e.kind() != opendal::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_escape_or_use_the_staging_dir_are_refused() {
        for bad in ["", "/a", "a/", "a//b", "../a", "a/./b", ".tmp/x", "a\\b"] {
            assert!(matches!(check_path(bad), Err(ObjectError::InvalidPath { .. })), "{bad:?} was accepted");
        }
        for good in ["meta.json", "log/00000000000000000001.json", "a/.tmpx/b"] {
            assert!(check_path(good).is_ok(), "{good:?} was refused");
        }
    }

    #[test]
    fn redact_hides_the_password() {
        assert_eq!(redact("webdav://me:secret@host/dav"), "webdav://me:***@host/dav");
        assert!(!redact("not a url me:secret@host").contains("secret"));
    }

    #[test]
    fn store_env_ignores_empty_values_and_hides_them_in_debug() {
        let env = StoreEnv::from_pairs([(ENV_STORE_USER, "u"), (ENV_STORE_PASSWORD, "")]);
        assert_eq!(env.get(ENV_STORE_USER), Some("u"));
        assert_eq!(env.get(ENV_STORE_PASSWORD), None);
        let with_secret = StoreEnv::from_pairs([(ENV_AWS_SECRET_ACCESS_KEY, "hunter2")]);
        assert!(!format!("{with_secret:?}").contains("hunter2"));
    }
}
