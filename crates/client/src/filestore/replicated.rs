//! Folders that a sync tool replicates between computers (Dropbox,
//! Syncthing, Resilio Sync, the Nextcloud and ownCloud desktop clients).
//!
//! A create-only write on such a folder is atomic on this computer only:
//! another device writes the same segment name on its own copy, and the tool
//! later keeps one of the two (the other becomes a "conflicted copy"). Every
//! rule of the file store rests on one writer per segment, so such a folder
//! is refused before the first write, with the marker that gave it away.
//! Devices should share such data through the tool's WebDAV or S3 side, or a
//! deltasync server, instead.

use std::path::{Path, PathBuf};

/// Files or folders a sync tool keeps at the root of what it replicates,
/// with the tool's name.
const MARKERS: &[(&str, &str)] = &[
    (".dropbox", "Dropbox"),
    (".dropbox.cache", "Dropbox"),
    (".stfolder", "Syncthing"),
    (".sync/ID", "Resilio Sync"),
    (".nextcloudsync.log", "the Nextcloud desktop client"),
    (".owncloudsync.log", "the ownCloud desktop client"),
];

/// The sync tool that replicates `folder` (or one of its parents), with the
/// marker found, if any. The Nextcloud and ownCloud clients' journal
/// databases (`._sync_*.db`, `.sync_*.db`) count as markers too.
pub fn replicated_by(folder: &Path) -> Option<(&'static str, PathBuf)> {
    for dir in folder.ancestors() {
        for (marker, tool) in MARKERS {
            let path = dir.join(marker);
            if path.exists() {
                return Some((tool, path));
            }
        }
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if (name.starts_with("._sync_") || name.starts_with(".sync_")) && name.ends_with(".db") {
                return Some(("the Nextcloud or ownCloud desktop client", entry.path()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_in_a_parent_folder_is_found_and_a_plain_folder_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("apps/tasks");
        std::fs::create_dir_all(&store).unwrap();
        assert_eq!(replicated_by(&store), None);
        std::fs::create_dir(dir.path().join("apps/.stfolder")).unwrap();
        let (tool, marker) = replicated_by(&store).unwrap();
        assert_eq!(tool, "Syncthing");
        assert_eq!(marker, dir.path().join("apps/.stfolder"));
        std::fs::write(store.join("._sync_0a1b.db"), b"").unwrap();
        assert_eq!(replicated_by(&store).unwrap().0, "the Nextcloud or ownCloud desktop client");
    }
}
