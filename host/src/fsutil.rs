//! File writing that never leaves a half-written file or folder behind.
//!
//! Everything is first written under a temporary name in the same folder, `.<name>.tmp-<pid>`, then renamed
//! into place, so readers see either the old version or the whole new one. A process killed mid-write
//! leaves only such a temporary, which [`remove_stale_temps`] clears once its process is gone.
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary sibling `path` is written as before the rename: `.<name>.tmp-<pid>`.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes the folder `path` whole or not at all: `fill` writes into a temporary folder beside it, which then
/// replaces `path` (an existing `path` is moved aside first and removed after).
pub fn write_dir_atomic(path: &Path, fill: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let tmp = temp_sibling(path);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let result = (|| {
        fill(&tmp)?;
        let old = path.with_file_name(format!(".{}.old.tmp-{}", file_name(path), std::process::id()));
        let had_old = path.exists();
        if had_old {
            std::fs::rename(path, &old)?;
        }
        std::fs::rename(&tmp, path)?;
        if had_old {
            std::fs::remove_dir_all(&old)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Removes the temporaries (`*.tmp-<pid>`) in `dir` whose process is no longer running: what a killed
/// process left. Returns the names removed.
pub fn remove_stale_temps(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.rsplit_once(".tmp-").and_then(|(_, p)| p.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let p = e.path();
        let gone = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        if gone.is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Whether process `pid` is running on this machine.
pub fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if proc.join("self").exists() {
        return proc.join(pid.to_string()).exists();
    }
    // No procfs (macOS): `kill -0` asks without sending anything.
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// This machine's name, for lock files that say who holds them.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::process::Command::new("hostname").output().ok().and_then(|o| String::from_utf8(o.stdout).ok()))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_replaced_whole_and_dead_temps_are_swept() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("adapter");
        write_dir_atomic(&target, |t| Ok(std::fs::write(t.join("a"), "1")?)).unwrap();
        let failed = write_dir_atomic(&target, |t| {
            std::fs::write(t.join("a"), "2")?;
            anyhow::bail!("disk full")
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read_to_string(target.join("a")).unwrap(), "1", "a failed write keeps the old folder");
        write_dir_atomic(&target, |t| Ok(std::fs::write(t.join("b"), "3")?)).unwrap();
        assert!(!target.join("a").exists() && target.join("b").exists());
        // A temporary of a process that no longer runs (pid 0x7fffffff is never given out) is swept; ours stays.
        let dead = d.path().join(".adapter.tmp-2147483647");
        std::fs::create_dir_all(&dead).unwrap();
        let ours = temp_sibling(&d.path().join("x"));
        std::fs::write(&ours, "").unwrap();
        assert_eq!(remove_stale_temps(d.path()), vec![".adapter.tmp-2147483647".to_string()]);
        assert!(!dead.exists() && ours.exists());
    }
}
