//! An exclusive lock on a data directory, held for as long as a process uses it: two
//! processes on one directory would deliver or post the same messages twice.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Holds `<dir>/<file>` locked until dropped (or until the process dies: the operating
/// system releases the lock then). The file records the pid of the holder.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock `<dir>/<file>` at once, for a `what` (such as "host"); fails with an
    /// error naming the directory, and the pid holding it when known, if another process
    /// holds it.
    pub fn take(dir: &Path, file: &str, what: &str) -> Result<DirLock> {
        let path = dir.join(file);
        let mut lock = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let holder = match lock.read_to_string(&mut holder) {
                    Ok(_) if !holder.trim().is_empty() => format!(" (pid {})", holder.trim()),
                    _ => String::new(),
                };
                bail!(
                    "another {what} is already running with the data directory {}{holder}",
                    dir.display()
                )
            }
            Err(TryLockError::Error(error)) => {
                return Err(error).with_context(|| format!("locking {}", path.display()));
            }
        }
        let pid = std::process::id();
        lock.set_len(0)
            .and_then(|()| lock.rewind())
            .and_then(|()| writeln!(lock, "{pid}"))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(DirLock { _file: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_naming_the_directory_and_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::take(dir.path(), "x.lock", "thing").unwrap();
        let err = DirLock::take(dir.path(), "x.lock", "thing").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "another thing is already running with the data directory {} (pid {})",
                dir.path().display(),
                std::process::id()
            )
        );
        drop(first);
        DirLock::take(dir.path(), "x.lock", "thing").expect("free again");
    }
}
