//! One launcher per runtime directory: an exclusive flock on `RUNTIME_DIR/sesame.lock`, taken before
//! anything is written there and held for the launcher's life (the kernel drops it when the launcher
//! exits, however it exits, so a crash leaves no stale lock). The holder writes its pid into the
//! file, so that a second launcher can say who holds the directory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::files::create_private_dir;

/// Held while the launcher runs; dropping it releases the directory.
#[derive(Debug)]
pub struct RuntimeLock {
    _file: Flock<File>,
}

/// Locks `dir` for this launcher, or says which launcher holds it. Creates `dir` (private) if needed.
pub fn lock_runtime_dir(dir: &Path) -> anyhow::Result<RuntimeLock> {
    create_private_dir(dir)?;
    let path = dir.join("sesame.lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => {
            let mut holder: &File = &locked;
            holder
                .set_len(0)
                .and_then(|()| writeln!(holder, "{}", std::process::id()))
                .with_context(|| format!("cannot write the lock file {}", path.display()))?;
            Ok(RuntimeLock { _file: locked })
        }
        Err((_, Errno::EWOULDBLOCK)) => {
            // The holder writes its pid just after it locks: a launcher that lost a race by a
            // hair may read the file before that.
            let mut pid = String::new();
            for _ in 0..20 {
                pid = std::fs::read_to_string(&path).unwrap_or_default().trim().to_string();
                if !pid.is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let pid = if pid.is_empty() { "unknown" } else { pid.as_str() };
            anyhow::bail!("runtime directory {} is in use by sesame (pid {pid})", dir.display())
        }
        Err((_, e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_released_one_is_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = dir.path().join("run");
        let held = lock_runtime_dir(&runtime).expect("first lock");
        let err = lock_runtime_dir(&runtime).expect_err("held");
        let expected =
            format!("runtime directory {} is in use by sesame (pid {})", runtime.display(), std::process::id());
        assert_eq!(err.to_string(), expected);
        drop(held);
        lock_runtime_dir(&runtime).expect("released");
    }
}
