//! An S3 bucket as an object store (`s3://bucket/prefix`), through OpenDAL's
//! s3 service, which sends `If-None-Match: *` for
//! `write_with(..).if_not_exists(true)` and `If-Match` for
//! `write_with(..).if_match(etag)` on PutObject (AWS S3 honours both since
//! 2024; so does moto 5.2). A refused condition (412) comes back as
//! OpenDAL's `ConditionNotMatch`.
//!
//! Endpoint, keys and region come from [`StoreEnv`]'s `AWS_*` variables only:
//! OpenDAL's own loading of `~/.aws` files and instance metadata is turned
//! off, so what a store uses is what the caller passed.

use opendal::{ErrorKind, Operator, services::S3};
use reqwest::Url;

use super::{
    Created, ENV_AWS_ACCESS_KEY_ID, ENV_AWS_DEFAULT_REGION, ENV_AWS_ENDPOINT_URL, ENV_AWS_REGION,
    ENV_AWS_SECRET_ACCESS_KEY, Object, ObjectError, Replaced, StoreEnv, from_opendal,
};

const DENIED_HINT: &str =
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_REGION, AWS_ENDPOINT_URL for a store other than AWS)";

/// How often a read starts over when the object changes between its stat and
/// its read.
const READ_ATTEMPTS: usize = 5;

/// An S3 store.
pub(super) struct S3Store {
    url: String,
    op: Operator,
}

impl S3Store {
    /// Opens the bucket and prefix named by an `s3://` URL.
    pub(super) fn open(url: &Url, env: &StoreEnv) -> Result<S3Store, String> {
        let bucket =
            url.host_str().filter(|b| !b.is_empty()).ok_or("an s3:// URL must name a bucket (s3://bucket/prefix)")?;
        let prefix = url.path().trim_matches('/');
        let region = env.get(ENV_AWS_REGION).or(env.get(ENV_AWS_DEFAULT_REGION)).unwrap_or("us-east-1");
        let mut builder = S3::default()
            .bucket(bucket)
            .root(&format!("/{prefix}"))
            .region(region)
            .disable_config_load()
            .disable_ec2_metadata();
        let endpoint = env.get(ENV_AWS_ENDPOINT_URL);
        if let Some(endpoint) = endpoint {
            builder = builder.endpoint(endpoint);
        }
        if let Some(key) = env.get(ENV_AWS_ACCESS_KEY_ID) {
            builder = builder.access_key_id(key);
        }
        if let Some(secret) = env.get(ENV_AWS_SECRET_ACCESS_KEY) {
            builder = builder.secret_access_key(secret);
        }
        let op = Operator::new(builder).map_err(|e| format!("cannot open the bucket: {e}"))?.finish();
        let mut described = format!("s3://{bucket}/{prefix}");
        if let Some(endpoint) = endpoint {
            described.push_str(&format!(" at {endpoint}"));
        }
        Ok(S3Store { url: described, op })
    }

    pub(super) fn describe(&self) -> String {
        self.url.clone()
    }

    fn error(&self, op: &'static str, e: opendal::Error) -> ObjectError {
        from_opendal(self.describe(), op, DENIED_HINT, e)
    }

    /// Reads the object and its ETag as one consistent pair: the ETag from a
    /// HEAD, then a GET with `If-Match` on it; when the object changed in
    /// between, the read starts over.
    pub(super) async fn read(&self, path: &str) -> Result<Option<Object>, ObjectError> {
        for _ in 0..READ_ATTEMPTS {
            let meta = match self.op.stat(path).await {
                Ok(meta) => meta,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(self.error("read", e)),
            };
            let version = meta.etag().map(str::to_string);
            let read = match &version {
                Some(etag) => self.op.read_with(path).if_match(etag).await,
                None => self.op.read(path).await,
            };
            match read {
                Ok(buffer) => return Ok(Some(Object { bytes: buffer.to_vec(), version })),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
                Err(e) if e.kind() == ErrorKind::ConditionNotMatch => continue,
                Err(e) => return Err(self.error("read", e)),
            }
        }
        Err(ObjectError::Io {
            store: self.describe(),
            op: "read",
            detail: format!("{path} changed during each of {READ_ATTEMPTS} reads"),
            retryable: true,
        })
    }

    pub(super) async fn create(&self, path: &str, bytes: Vec<u8>) -> Result<Created, ObjectError> {
        match self.op.write_with(path, bytes).if_not_exists(true).await {
            Ok(_) => Ok(Created::Written),
            Err(e) if e.kind() == ErrorKind::ConditionNotMatch => Ok(Created::Taken),
            Err(e) => Err(self.error("create", e)),
        }
    }

    pub(super) async fn replace(
        &self,
        path: &str,
        bytes: Vec<u8>,
        expected: Option<&str>,
    ) -> Result<Replaced, ObjectError> {
        let written = match expected {
            Some(etag) => self.op.write_with(path, bytes).if_match(etag).await,
            None => self.op.write_with(path, bytes).if_not_exists(true).await,
        };
        match written {
            Ok(_) => Ok(Replaced::Written),
            // S3 answers 404 to If-Match on an absent key.
            Err(e) if matches!(e.kind(), ErrorKind::ConditionNotMatch | ErrorKind::NotFound) => Ok(Replaced::Changed),
            Err(e) => Err(self.error("replace", e)),
        }
    }

    pub(super) async fn list(&self, dir: &str) -> Result<Vec<String>, ObjectError> {
        super::list_files(&self.op, dir).await.map_err(|e| self.error("list", e))
    }

    pub(super) async fn delete(&self, path: &str) -> Result<(), ObjectError> {
        super::delete_file(&self.op, path).await.map_err(|e| self.error("delete", e))
    }
}
