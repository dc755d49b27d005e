//! One writer at a time per run folder: `lorahost.pid` in the folder, locked while a command writes there.
//!
//! The lock is the operating system's (`flock`), taken without waiting: of two runs started together
//! exactly one gets it, and the other stops at once, naming the holder's pid and host from the file. The
//! system releases it when its process dies however it dies, so a `kill -9` leaves no lock to clear by hand:
//! the next run takes the folder over (saying so when the file still names the dead process) and removes
//! the temporaries the killed run left.
use anyhow::{bail, Context};
use std::fs::{File, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

pub const LOCK_FILE: &str = "lorahost.pid";

/// Held while a command writes into a run folder; released (and its file emptied) when dropped.
#[derive(Debug)]
pub struct RunLock {
    file: File,
}

impl RunLock {
    /// Takes the lock of `run_dir` (created if missing) for the command `what` (`run`, `check`).
    pub fn acquire(run_dir: &Path, what: &str) -> anyhow::Result<RunLock> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let path = run_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut holder = String::new();
        let locked = file.try_lock();
        let _ = file.read_to_string(&mut holder);
        let field = |k: &str| holder.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix('=')).unwrap_or("?").to_string();
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => bail!(
                "{} is in use by process {} on host `{}` (`{}`): one run folder takes one writer at a time. Wait \
                 for it, stop it, or give this run another `[run] output`",
                run_dir.display(),
                field("pid"),
                field("host"),
                field("command"),
            ),
            Err(TryLockError::Error(e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
        if !holder.trim().is_empty() {
            eprintln!("note: taking over {} from process {} on `{}`, which ended without releasing it", run_dir.display(), field("pid"), field("host"));
        }
        let me = format!("pid={}\nhost={}\ncommand=lorahost {what}\n", std::process::id(), crate::fsutil::host_name());
        (|| {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(me.as_bytes())?;
            file.sync_all()
        })()
        .with_context(|| format!("writing {}", path.display()))?;
        for dir in [run_dir.to_path_buf(), run_dir.join("checkpoints")] {
            for name in crate::fsutil::remove_stale_temps(&dir) {
                eprintln!("note: removed {}, left by a run that was killed", dir.join(name).display());
            }
        }
        Ok(RunLock { file })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Emptied rather than removed: removing would let a waiting process lock the old, unlinked file
        // while a third creates a new one.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}
