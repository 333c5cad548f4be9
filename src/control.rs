//! The control API: HTTP/1.1 on the control unix socket, and optionally on TCP (`--http`), with TLS
//! whose certificate files are swapped in on change. What needs the launcher's state is asked of the
//! supervisor as a request with a reply channel; this module only speaks HTTP (and keeps its own
//! `--http` certificate current).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::oneshot;

use crate::certs::{ReloadingCert, TlsPair};
use crate::metrics::Metrics;
use crate::reload::Refusal;
use crate::status::Status;
use crate::watch::{self, WatchSpec};

/// Where the control API listens.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub socket: PathBuf,
    pub http: Option<String>,
    pub http_tls: Option<TlsPair>,
    pub http_token: Option<PathBuf>,
    /// How long the `--http` certificate files must be quiet before they are re-read.
    pub debounce: Duration,
}

/// A question for the supervisor, with where to send the answer.
#[derive(Debug)]
pub enum ControlRequest {
    Status(oneshot::Sender<Status>),
    /// Start the drain (if not started); answer true once drained, false when it timed out.
    Shutdown(oneshot::Sender<bool>),
    /// A reload: the new epoch, or why it did not happen.
    Reload(oneshot::Sender<Result<u32, Refusal>>),
}

/// Hands a request to the supervisor; false once the supervisor is gone.
pub type Ask = Arc<dyn Fn(ControlRequest) -> bool + Send + Sync>;

/// The HTTP status that tells a client why a reload did not happen.
fn refusal_status(refusal: &Refusal) -> StatusCode {
    match refusal {
        Refusal::ShuttingDown | Refusal::Blocked(_) | Refusal::NotEnvoy => StatusCode::CONFLICT,
        Refusal::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Refusal::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Binds the control socket (and `--http`) and serves them from tasks of their own.
pub async fn start(settings: &ControlSettings, ask: Ask, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    use anyhow::Context;
    let token = match &settings.http_token {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read --http-token {}", file.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let api = ControlApi { ask, metrics, token: token.clone().map(Arc::from) };
    let listener = bind_unix(&settings.socket)?;
    tracing::info!("control API on unix:{}", settings.socket.display());
    tokio::spawn(api.clone().serve_unix(listener));
    let Some(address) = &settings.http else { return Ok(()) };
    let listener =
        tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot bind --http {address}"))?;
    let local = listener.local_addr().context("--http address")?;
    let acceptor = match &settings.http_tls {
        Some(pair) => Some(https_acceptor(pair.clone(), settings.debounce)?),
        None => None,
    };
    if settings.http_tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!("--http {local} is not loopback and has no TLS: the control API is readable by the network");
    }
    if token.is_none() && !local.ip().is_loopback() {
        tracing::warn!("--http {local} has no --http-token: anyone who reaches it can shut Envoy down");
    }
    tracing::info!("control API on {}://{local}", if acceptor.is_some() { "https" } else { "http" });
    tokio::spawn(api.serve_tcp(listener, acceptor));
    Ok(())
}

/// The TLS side of `--http`: the certificate is re-read whenever its files change, and a bad new
/// pair is refused while the old one stays in use.
fn https_acceptor(pair: TlsPair, debounce: Duration) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    let cert = ReloadingCert::load(pair).map_err(|e| anyhow::anyhow!("--http-tls: {e}"))?;
    let spec = WatchSpec { envoy_command: None, extra: cert.files(), debounce };
    let watched = cert.clone();
    watch::start(spec, move |files| {
        match watched.reload() {
            Ok(()) => tracing::info!("--http: new certificate in use (changed: {files:?})"),
            Err(reason) => tracing::error!("--http: new certificate refused, the old one stays: {reason}"),
        }
        true
    })
    .context("cannot watch the --http certificate")?;
    cert.acceptor().map_err(|e| anyhow::anyhow!("--http-tls: {e}"))
}

/// The HTTP side of the control API, shared by every listener.
#[derive(Clone)]
struct ControlApi {
    ask: Ask,
    metrics: Arc<Metrics>,
    /// Bearer token required on TCP for the endpoints that change something.
    token: Option<Arc<str>>,
}

impl ControlApi {
    async fn ask<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> ControlRequest) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        if !(self.ask)(request(tx)) {
            return None;
        }
        rx.await.ok()
    }

    async fn handle(&self, request: Request<Incoming>, over_tcp: bool) -> Response<Full<Bytes>> {
        let (method, path) = (request.method().clone(), request.uri().path().to_string());
        let changes_something = matches!(path.as_str(), "/shutdown" | "/reload");
        if over_tcp && changes_something && !self.authorized(&request) {
            return text(StatusCode::UNAUTHORIZED, "a valid Authorization: Bearer token is required\n");
        }
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (Method::GET, "/ready") => match self.ask(ControlRequest::Status).await {
                Some(status) if status.ready => text(StatusCode::OK, "ready\n"),
                Some(status) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {}\n", status.state)),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: stopping\n"),
            },
            (Method::GET | Method::POST, "/shutdown") => match self.ask(ControlRequest::Shutdown).await {
                Some(true) => text(StatusCode::OK, "drained\n"),
                _ => text(StatusCode::SERVICE_UNAVAILABLE, "the drain ended before the connections did\n"),
            },
            (Method::POST, "/reload") => match self.ask(ControlRequest::Reload).await {
                Some(Ok(epoch)) => json(StatusCode::OK, &serde_json::json!({ "epoch": epoch })),
                Some(Err(refusal)) => {
                    json(refusal_status(&refusal), &serde_json::json!({ "error": refusal.to_string() }))
                }
                None => text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"),
            },
            (Method::GET, "/status") => match self.ask(ControlRequest::Status).await {
                Some(status) => json(StatusCode::OK, &status),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"),
            },
            (Method::GET, "/metrics") => {
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.render())));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            (_, "/healthz" | "/ready" | "/shutdown" | "/reload" | "/status" | "/metrics") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else { return true };
        let given = request.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|v| constant_time_eq(v.trim(), token))
    }

    /// Serves the control socket until the runtime ends.
    async fn serve_unix(self, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => self.spawn_connection(stream, false),
                Err(e) => tracing::warn!("control socket: accept failed: {e}"),
            }
        }
    }

    /// Serves `--http`, with TLS when `tls` is given.
    async fn serve_tcp(self, listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("--http: accept failed: {e}");
                    continue;
                }
            };
            match &tls {
                None => self.spawn_connection(stream, true),
                Some(acceptor) => {
                    let (api, acceptor) = (self.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        match acceptor.accept(stream).await {
                            Ok(stream) => api.spawn_connection(stream, true),
                            Err(e) => tracing::debug!("--http: TLS handshake failed: {e}"),
                        }
                    });
                }
            }
        }
    }

    fn spawn_connection<S>(&self, stream: S, over_tcp: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let api = self.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.handle(request, over_tcp).await) }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

/// Binds the control socket: parent directory created, a stale socket replaced, mode 0600.
fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
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
    Ok(listener)
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// Compares without stopping at the first difference, so timing does not tell how much matched.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq("secret", "secret"));
        assert!(!constant_time_eq("secret", "secreT"));
        assert!(!constant_time_eq("secret", "secret2"));
    }
}
