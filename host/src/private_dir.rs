//! Data directories only their owner can read: message bodies, tokens and handler
//! components live there. A data directory is created 0700 and everything in it 0600
//! (0700 for folders); one found looser at start (made by an older clawq, or by hand) is
//! tightened, with a log line.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result};

/// The mode of a data directory and of the folders in it.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file in a data directory.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (mode 0700) if missing, tightens it and what it holds if they are
/// readable by others, and makes every file and folder this process creates from now on
/// private to its owner (umask 077): the SQLite databases with their `-wal` and `-shm`
/// files, tokens, handler files.
pub fn prepare(dir: &Path) -> Result<()> {
    // SAFETY: umask only sets the process's file mode creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    let tightened = tighten(dir).with_context(|| {
        format!(
            "restricting the permissions of data directory {}",
            dir.display()
        )
    })?;
    if tightened > 0 {
        tracing::warn!(
            data_dir = %dir.display(),
            "tightened the permissions of {tightened} files and folders of the data directory \
             (readable by others): folders are now 0700, files 0600"
        );
    }
    Ok(())
}

/// Restricts `path` and everything under it to its owner; returns how many needed it.
fn tighten(path: &Path) -> std::io::Result<usize> {
    let metadata = std::fs::symlink_metadata(path)?;
    if metadata.file_type().is_symlink() {
        return Ok(0);
    }
    let wanted = if metadata.is_dir() {
        DIR_MODE
    } else {
        FILE_MODE
    };
    let mode = metadata.permissions().mode() & 0o777;
    let mut tightened = 0;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & wanted))?;
        tightened += 1;
    }
    if metadata.is_dir() {
        for entry in std::fs::read_dir(path)? {
            tightened += tighten(&entry?.path())?;
        }
    }
    Ok(tightened)
}
