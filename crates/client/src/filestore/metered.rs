//! Counts what a device asks of its file store: requests and bytes each
//! way. The cost rules of the file store (a sync with nothing new is one
//! small read; a one-field edit uploads under a kilobyte) are checked against
//! these counts, and the benchmarks report them.

use std::sync::atomic::{AtomicU64, Ordering};

use super::objects::{Created, Object, ObjectError, ObjectStore, Replaced};

/// What a device asked of its store so far (the conditional-write probe not included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Reads, found or not.
    pub reads: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Writes (create-only and compare-and-swap), taken ones included.
    pub writes: u64,
    /// Bytes sent in writes.
    pub bytes_written: u64,
    /// Listings and deletes.
    pub other: u64,
}

impl Traffic {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            reads: self.reads - earlier.reads,
            bytes_read: self.bytes_read - earlier.bytes_read,
            writes: self.writes - earlier.writes,
            bytes_written: self.bytes_written - earlier.bytes_written,
            other: self.other - earlier.other,
        }
    }
}

/// An [`ObjectStore`] whose requests are counted.
pub struct Metered {
    objects: ObjectStore,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    other: AtomicU64,
}

impl Metered {
    /// Counts the requests made to `objects`.
    pub fn new(objects: ObjectStore) -> Metered {
        Metered {
            objects,
            reads: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            other: AtomicU64::new(0),
        }
    }

    /// The counts so far.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            reads: self.reads.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }

    /// The store's URL without credentials.
    pub fn describe(&self) -> String {
        self.objects.describe()
    }

    /// [`ObjectStore::read`], counted.
    pub async fn read(&self, path: &str) -> Result<Option<Object>, ObjectError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let object = self.objects.read(path).await?;
        if let Some(o) = &object {
            self.bytes_read.fetch_add(o.bytes.len() as u64, Ordering::Relaxed);
        }
        Ok(object)
    }

    /// [`ObjectStore::create`], counted.
    pub async fn create(&self, path: &str, bytes: Vec<u8>) -> Result<Created, ObjectError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.objects.create(path, bytes).await
    }

    /// [`ObjectStore::replace`], counted.
    pub async fn replace(&self, path: &str, bytes: Vec<u8>, expected: Option<&str>) -> Result<Replaced, ObjectError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.objects.replace(path, bytes, expected).await
    }

    /// [`ObjectStore::list`], counted.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, ObjectError> {
        self.other.fetch_add(1, Ordering::Relaxed);
        self.objects.list(dir).await
    }

    /// [`ObjectStore::delete`], counted.
    pub async fn delete(&self, path: &str) -> Result<(), ObjectError> {
        self.other.fetch_add(1, Ordering::Relaxed);
        self.objects.delete(path).await
    }

    /// [`ObjectStore::clean_orphans`], counted with the listings.
    pub async fn clean_orphans(&self, older_than: std::time::Duration) -> Result<u64, ObjectError> {
        self.other.fetch_add(1, Ordering::Relaxed);
        self.objects.clean_orphans(older_than).await
    }

    /// [`ObjectStore::probe`] (not counted: it runs once per process, before the first write).
    pub async fn probe(&self) -> Result<(), ObjectError> {
        self.objects.probe().await
    }
}
