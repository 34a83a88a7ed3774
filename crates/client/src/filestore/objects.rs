//! INTERIM (replaced by the OpenDAL-based layer): folder-only object store.

use std::path::PathBuf;

/// One object as read.
pub struct Object {
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its version.
    pub version: Option<String>,
}
/// Create-only result.
pub enum Created {
    /// Written.
    Written,
    /// Taken.
    Taken,
}
/// Replace result.
pub enum Replaced {
    /// Written.
    Written,
    /// Changed.
    Changed,
}
/// Errors.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// I/O.
    #[error("{0}")]
    Io(String),
    /// No conditional writes.
    #[error("{store}: {why}")]
    NoConditionalWrites {
        /// Store.
        store: String,
        /// Why.
        why: String,
    },
}
impl ObjectError {
    /// Retryable.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ObjectError::Io(_))
    }
}
/// Store.
#[derive(Clone)]
pub struct ObjectStore {
    root: PathBuf,
}
fn io(e: std::io::Error) -> ObjectError {
    ObjectError::Io(e.to_string())
}
impl ObjectStore {
    /// Open.
    pub fn open(url: &str) -> Result<ObjectStore, ObjectError> {
        let root = url.strip_prefix("file://").ok_or_else(|| ObjectError::Io(format!("bad url {url}")))?;
        Ok(ObjectStore { root: PathBuf::from(root) })
    }
    /// Describe.
    pub fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
    /// Read.
    pub async fn read(&self, path: &str) -> Result<Option<Object>, ObjectError> {
        match std::fs::read(self.root.join(path)) {
            Ok(bytes) => Ok(Some(Object { bytes, version: None })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }
    /// Create.
    pub async fn create(&self, path: &str, bytes: Vec<u8>) -> Result<Created, ObjectError> {
        let full = self.root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).map_err(io)?;
        let tmp = self.root.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        std::fs::write(&tmp, &bytes).map_err(io)?;
        let r = std::fs::hard_link(&tmp, &full);
        let _ = std::fs::remove_file(&tmp);
        match r {
            Ok(()) => Ok(Created::Written),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Created::Taken),
            Err(e) => Err(io(e)),
        }
    }
    /// Replace.
    pub async fn replace(&self, path: &str, bytes: Vec<u8>, _expected: Option<&str>) -> Result<Replaced, ObjectError> {
        let full = self.root.join(path);
        let tmp = self.root.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, &full).map_err(io)?;
        Ok(Replaced::Written)
    }
    /// List.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, ObjectError> {
        let mut out = Vec::new();
        match std::fs::read_dir(self.root.join(dir)) {
            Ok(rd) => {
                for e in rd {
                    out.push(e.map_err(io)?.file_name().to_string_lossy().into_owned());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        out.sort();
        Ok(out)
    }
    /// Delete.
    pub async fn delete(&self, path: &str) -> Result<(), ObjectError> {
        let _ = std::fs::remove_file(self.root.join(path));
        Ok(())
    }
    /// Probe.
    pub async fn probe(&self) -> Result<(), ObjectError> {
        Ok(())
    }
}
