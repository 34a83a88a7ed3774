//! Background WAL checkpoints, and what the last real write said about the disk.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;

use super::map_err;
use crate::store::StoreError;

/// WAL pages past which the writer checkpoints by itself (a safety valve; the
/// checkpointer thread normally keeps the WAL far smaller).
pub(super) const WRITER_AUTOCHECKPOINT_PAGES: i64 = 20_000;
/// How long the checkpointer lets commits accumulate before copying them.
const CHECKPOINT_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// Copies committed WAL frames into the database file on its own thread and
/// connection, so that the writer never stops to do it between commits. A
/// checkpoint moves data that is already durable in the WAL: acknowledgements
/// do not wait for it.
pub(super) struct Checkpointer {
    wake: std::sync::mpsc::SyncSender<()>,
    thread: JoinHandle<()>,
}

/// Whether the disk takes writes, as the last real write said: set by a
/// group commit or checkpoint that failed, cleared by a commit of pushes or a
/// checkpoint that succeeded. A no-op commit (the health probe) can succeed
/// on a full disk, because its frame fits in WAL space already allocated, so
/// it neither sets nor clears this; the checkpoint that follows it does.
#[derive(Clone, Default)]
pub(super) struct WriteFailure(Arc<Mutex<Option<String>>>);

impl WriteFailure {
    pub(super) fn set(&self, error: String) {
        *self.0.lock().expect("write failure lock") = Some(error);
    }

    pub(super) fn clear(&self) {
        *self.0.lock().expect("write failure lock") = None;
    }

    pub(super) fn get(&self) -> Option<String> {
        self.0.lock().expect("write failure lock").clone()
    }
}

impl Checkpointer {
    pub(super) fn start(path: &Path, failure: WriteFailure) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open SQLite database {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(map_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(map_err)?;
        let (wake, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("deltasync-checkpoint".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    std::thread::sleep(CHECKPOINT_DELAY);
                    while rx.try_recv().is_ok() {}
                    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        Ok(()) => failure.clear(),
                        Err(e) => {
                            tracing::warn!(error = %e, "WAL checkpoint failed; it will be retried after the next commit");
                            failure.set(format!("the WAL checkpoint failed: {e}"));
                        }
                    }
                }
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            })
            .map_err(|e| StoreError::Internal(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Checkpointer { wake, thread })
    }

    /// Says that a commit added frames to the WAL.
    pub(super) fn committed(&self) {
        let _ = self.wake.try_send(());
    }

    /// Runs a last checkpoint and stops the thread.
    pub(super) fn finish(self) {
        drop(self.wake);
        let _ = self.thread.join();
    }
}
