//! Keeps the control socket where the clients look for it. A tmp cleaner, or the removal of
//! `$XDG_RUNTIME_DIR` at logout, can delete it (with the whole runtime directory): the launcher
//! then binds it again (and takes the directory's lock again), and says what was lost. It watches
//! the directory (inotify): no wake-up while nothing happens.

use std::path::{Path, PathBuf};

use tokio::task::JoinHandle;

use super::ControlApi;
use super::listener::{self, ControlSocket};
use crate::inotify::DirWatcher;

/// How long a removal has to finish before the socket is bound again.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// Watches `socket`'s directory; when the socket is gone, binds it again and serves it in place of
/// `serving`. When the directory is the runtime directory, its lock is taken again with it.
pub fn keep(
    api: ControlApi,
    socket: ControlSocket,
    runtime_dir: PathBuf,
    serving: JoinHandle<()>,
) -> std::io::Result<()> {
    let Some(dir) = socket.path.parent().map(Path::to_path_buf) else { return Ok(()) };
    let watcher = DirWatcher::new()?;
    watcher.watch(&dir)?;
    // Started after the socket was bound (once epoch 0 is spawned): a removal in between was not
    // seen by the watcher, so it is looked for once.
    let mut look_now = !socket.is_there();
    tokio::spawn(async move {
        let mut serving = serving;
        let mut _lock = None;
        loop {
            // Any event in the directory: whether the socket is still ours decides.
            if !std::mem::take(&mut look_now)
                && let Err(e) = watcher.next().await
            {
                tracing::warn!("cannot watch {} any more ({e}): a removed socket is not bound again", dir.display());
                return;
            }
            if socket.is_there() {
                continue;
            }
            // A removal is seldom one event (`rm -rf` empties the directory, then removes it):
            // let it finish, or the socket is bound into a directory about to go. The events it
            // leaves queued cost one more look each.
            tokio::time::sleep(SETTLE).await;
            if socket.is_there() {
                continue;
            }
            let dir_was_removed = !dir.exists();
            if dir_was_removed && dir == runtime_dir {
                // Off the runtime thread: a contended lock waits a moment for the holder's pid.
                let dir_to_lock = runtime_dir.clone();
                let locked = tokio::task::spawn_blocking(move || crate::lock::lock_runtime_dir(&dir_to_lock)).await;
                match locked.unwrap_or_else(|e| Err(anyhow::anyhow!("the lock task failed: {e}"))) {
                    Ok(lock) => _lock = Some(lock),
                    Err(e) => {
                        tracing::error!(
                            "the runtime directory {} was removed and cannot be locked again: {e:#}",
                            dir.display()
                        );
                        continue;
                    }
                }
            }
            match listener::bind_unix(&socket.path) {
                Ok((listener, bound)) => {
                    serving.abort();
                    serving = tokio::spawn(listener::serve_unix(api.clone(), listener));
                    socket.inode.store(
                        bound.inode.load(std::sync::atomic::Ordering::Relaxed),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    if let Err(e) = watcher.watch(&dir) {
                        tracing::warn!("cannot watch {} again: {e}", dir.display());
                    }
                    if dir_was_removed {
                        tracing::warn!(
                            "the directory {} was removed: created again, with the control socket{}; the rest of it is \
                             lost (Envoy's admin socket, if it was there, comes back with the next hot restart; the base \
                             id is kept in memory)",
                            dir.display(),
                            if dir == runtime_dir { " and the lock" } else { "" }
                        );
                    } else {
                        tracing::warn!("the control socket {} was removed: bound again", socket.path.display());
                    }
                }
                Err(e) => tracing::error!(
                    "the control socket {} was removed and cannot be bound again: {e:#}",
                    socket.path.display()
                ),
            }
        }
    });
    Ok(())
}
