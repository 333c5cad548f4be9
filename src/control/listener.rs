//! The control API's listeners, built so that a flood cannot starve them: each listener serves at
//! most `MAX_CONNECTIONS` at once (the control socket and `--http` each have their own share, so
//! one keeps working while the other is flooded), a connection that does not send a whole request
//! head within `HEADER_READ_TIMEOUT` (slowloris, trickling, or idle between keep-alive requests) is
//! closed, so is a TLS client that does not finish its handshake within `TLS_HANDSHAKE_TIMEOUT`,
//! and accept errors (out of file descriptors, say) are backed off and logged at most once a second.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::ControlApi;

/// Open connections one listener serves at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 128;
/// Time a client has to send a request's head, counted from the connection's start or the end of
/// the previous response: it also ends idle keep-alive connections.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a `--http` TLS client has to finish its handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after an accept error that says the process or the system is out of a resource: retrying
/// at once would spin (the pending connection stays pending).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the control socket until the runtime ends.
pub async fn serve_unix(api: ControlApi, listener: UnixListener) {
    let mut gate = Gate::new("control socket");
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Some(permit) = gate.admit() {
                        spawn_connection(api.clone(), stream, false, permit);
                    }
                }
                Err(e) => gate.accept_failed(e).await,
            },
            _ = gate.report_due() => gate.report(),
        }
    }
}

/// Serves `--http`, with TLS when `tls` is given.
pub async fn serve_tcp(api: ControlApi, listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    let mut gate = Gate::new("--http");
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = gate.report_due() => {
                gate.report();
                continue;
            }
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                gate.accept_failed(e).await;
                continue;
            }
        };
        let Some(permit) = gate.admit() else { continue };
        match &tls {
            None => spawn_connection(api.clone(), stream, true, permit),
            Some(acceptor) => {
                let (api, acceptor) = (api.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => spawn_connection(api, stream, true, permit),
                        Ok(Err(e)) => tracing::debug!("--http: TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("--http: no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}"),
                    }
                });
            }
        }
    }
}

/// Serves one connection; its permit is returned when it ends.
fn spawn_connection<S>(api: ControlApi, stream: S, over_tcp: bool, permit: OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        let _activity = crate::memory::Activity;
        let (ends_by, mut end) = tokio::sync::watch::channel(None);
        let service = service_fn(move |request| {
            let (api, ends_by) = (api.clone(), ends_by.clone());
            async move { Ok::<_, std::convert::Infallible>(api.handle(request, over_tcp, &ends_by).await) }
        });
        let serving = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        // hyper stops polling an answer's body while its client does not read: only dropping the
        // connection ends an answer that must be bounded as a whole.
        let served = tokio::select! {
            served = serving => served,
            () = reached(&mut end) => {
                tracing::debug!("control connection: an answer outlived its bound; connection closed");
                return;
            }
        };
        if let Err(e) = served {
            tracing::debug!("control connection: {e}");
        }
    });
}

/// Resolves once the end set for a connection has passed; pending while none is set.
async fn reached(end: &mut tokio::sync::watch::Receiver<Option<Instant>>) {
    loop {
        let set = *end.borrow_and_update();
        match set {
            Some(at) => return tokio::time::sleep_until(at).await,
            // The senders live as long as the connection: an error means it is over.
            None if end.changed().await.is_err() => return std::future::pending().await,
            None => {}
        }
    }
}

/// What one listener admits, and how it reports what it cannot.
struct Gate {
    name: &'static str,
    permits: Arc<Semaphore>,
    refused: Throttle,
    failed: Throttle,
    /// The last accept error, for the report.
    last_error: String,
}

impl Gate {
    fn new(name: &'static str) -> Gate {
        Gate {
            name,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            refused: Throttle::default(),
            failed: Throttle::default(),
            last_error: String::new(),
        }
    }

    /// A permit for one more connection, or None (the connection is dropped, so closed) when the
    /// listener serves as many as it may.
    fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none()
            && let Some(count) = self.refused.hit()
        {
            self.report_refused(count);
        }
        permit
    }

    fn report_refused(&self, count: u64) {
        tracing::warn!("{}: {count} connections closed at once: {MAX_CONNECTIONS} are open already", self.name);
    }

    fn report_failed(&self, count: u64) {
        tracing::warn!("{}: accept failed {count} times since the last report: {}", self.name, self.last_error);
    }

    /// When the counts held back since the last report are due; never while none are.
    async fn report_due(&self) {
        match [self.refused.due(), self.failed.due()].into_iter().flatten().min() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Reports what was held back, so that the last burst is counted too.
    fn report(&mut self) {
        if let Some(count) = self.refused.flush() {
            self.report_refused(count);
        }
        if let Some(count) = self.failed.flush() {
            self.report_failed(count);
        }
    }

    async fn accept_failed(&mut self, e: io::Error) {
        self.last_error = e.to_string();
        if let Some(count) = self.failed.hit() {
            self.report_failed(count);
        }
        let out_of_resources =
            matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
        if out_of_resources {
            tokio::time::sleep(ACCEPT_BACKOFF).await;
        }
    }
}

/// Counts a repeated event and says when to report it: the first time, then at most once a second,
/// with how many happened since the last report.
#[derive(Debug, Default)]
struct Throttle {
    last_report: Option<Instant>,
    count: u64,
}

const REPORT_EVERY: Duration = Duration::from_secs(1);

impl Throttle {
    fn hit(&mut self) -> Option<u64> {
        self.count += 1;
        if self.last_report.is_some_and(|at| at.elapsed() < REPORT_EVERY) {
            return None;
        }
        self.flush()
    }

    /// When the events held back are to be reported.
    fn due(&self) -> Option<Instant> {
        (self.count > 0).then(|| self.last_report.map_or_else(Instant::now, |at| at + REPORT_EVERY))
    }

    /// Reports now what was held back, if anything.
    fn flush(&mut self) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        self.last_report = Some(Instant::now());
        Some(std::mem::take(&mut self.count))
    }
}

/// Binds the control socket: parent directory created, a stale socket replaced, mode 0600.
pub fn bind_unix(path: &Path) -> anyhow::Result<(UnixListener, ControlSocket)> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        crate::files::create_private_dir(parent)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot replace {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    let inode = std::fs::symlink_metadata(path).with_context(|| format!("cannot stat {}", path.display()))?.ino();
    let socket = ControlSocket { path: path.to_path_buf(), inode: Arc::new(std::sync::atomic::AtomicU64::new(inode)) };
    Ok((listener, socket))
}

/// The control socket's file, as bound (and bound again, should it be removed): removed when the
/// launcher exits, unless something else has been put at its path meanwhile.
#[derive(Debug, Clone)]
pub struct ControlSocket {
    pub path: PathBuf,
    pub inode: Arc<std::sync::atomic::AtomicU64>,
}

impl ControlSocket {
    /// Whether the file at the path is still the socket the launcher bound.
    pub fn is_there(&self) -> bool {
        let inode = self.inode.load(std::sync::atomic::Ordering::Relaxed);
        std::fs::symlink_metadata(&self.path).is_ok_and(|meta| meta.ino() == inode)
    }

    pub fn remove(self) {
        let ours = self.is_there();
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("cannot remove the control socket {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_throttle_reports_at_most_once_a_second_with_the_count() {
        let mut throttle = Throttle::default();
        assert_eq!(throttle.hit(), Some(1), "the first one is reported");
        for _ in 0..999 {
            assert_eq!(throttle.hit(), None);
        }
        let due = throttle.due().expect("999 held back");
        assert_eq!(due - Instant::now(), REPORT_EVERY);
        tokio::time::advance(REPORT_EVERY).await;
        assert_eq!(throttle.flush(), Some(999), "the held-back burst is reported when due");
        assert_eq!(throttle.due(), None);
        assert_eq!(throttle.hit(), None, "within a second of that report");
        tokio::time::advance(REPORT_EVERY).await;
        assert_eq!(throttle.hit(), Some(2), "then the count since the last report");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_ends_when_an_answer_sets_its_end_and_never_without() {
        let (ends_by, mut end) = tokio::sync::watch::channel(None);
        let started = Instant::now();
        let waiting = tokio::spawn(async move { reached(&mut end).await });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!waiting.is_finished(), "no end set: the connection lives on");
        ends_by.send_replace(Some(Instant::now() + Duration::from_secs(10)));
        waiting.await.expect("reached");
        assert_eq!(started.elapsed(), Duration::from_secs(3610));
    }
}
