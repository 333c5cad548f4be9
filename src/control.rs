//! The control API: HTTP/1.1 on the control unix socket, and optionally on TCP (`--http`), with TLS
//! whose certificate files are swapped in on change. What needs the launcher's state is asked of the
//! supervisor as an event with a reply channel; this module only speaks HTTP.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::certs::{self, TlsPair};
use crate::metrics::Metrics;
use crate::supervisor::Event;

/// A question for the supervisor, with where to send the answer.
#[derive(Debug)]
pub enum ControlRequest {
    Status(oneshot::Sender<Status>),
    /// Start the drain (if not started); answer true once drained, false when it timed out.
    Shutdown(oneshot::Sender<bool>),
    /// A validated hot restart: the new epoch, or the HTTP status and the reason it did not happen.
    Reload(oneshot::Sender<Result<u32, (u16, String)>>),
}

/// What `/status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// starting, running, draining or stopping.
    pub state: &'static str,
    /// The current epoch is LIVE and no drain is under way.
    pub ready: bool,
    pub degraded: Option<String>,
    pub current_epoch: u32,
    pub epochs: Vec<EpochStatus>,
    /// The step of the hot restart under way, if any.
    pub restart: Option<&'static str>,
    pub last_reload: Option<ReloadStatus>,
    pub drain: Option<DrainStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochStatus {
    pub epoch: u32,
    pub pid: i32,
    pub started_unix: u64,
    pub live: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// success, refused or failed.
    pub result: &'static str,
    pub detail: String,
    pub at_unix: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrainStatus {
    pub elapsed_seconds: f64,
    pub connections: Option<u64>,
}

/// The HTTP side of the control API, shared by every listener.
#[derive(Clone)]
pub struct ControlApi {
    events: UnboundedSender<Event>,
    metrics: Arc<Metrics>,
    /// Bearer token required on TCP for the endpoints that change something.
    token: Option<Arc<str>>,
}

impl ControlApi {
    pub fn new(events: UnboundedSender<Event>, metrics: Arc<Metrics>, token: Option<String>) -> Self {
        ControlApi { events, metrics, token: token.map(Arc::from) }
    }

    async fn ask<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> ControlRequest) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.events.send(Event::Control(request(tx))).ok()?;
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
                Some(Err((status, reason))) => {
                    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    json(status, &serde_json::json!({ "error": reason }))
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
    pub async fn serve_unix(self, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => self.spawn_connection(stream, false),
                Err(e) => tracing::warn!("control socket: accept failed: {e}"),
            }
        }
    }

    /// Serves `--http`, with TLS when `tls` is given.
    pub async fn serve_tcp(self, listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
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
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        crate::demo::create_private_dir(parent)?;
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

/// The `--http` certificate: handed out per handshake, swapped when its files change, kept when the
/// new ones are bad.
#[derive(Debug)]
pub struct ReloadingCert {
    pair: TlsPair,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn load(pair: TlsPair) -> Result<Arc<ReloadingCert>, String> {
        let key = Self::read(&pair)?;
        Ok(Arc::new(ReloadingCert { pair, current: RwLock::new(key) }))
    }

    fn read(pair: &TlsPair) -> Result<Arc<CertifiedKey>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        certs::check_pair(pair, std::time::SystemTime::now())?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pair.cert)
            .and_then(|certs| certs.collect())
            .map_err(|e| format!("certificate {}: {e}", pair.cert.display()))?;
        let key =
            PrivateKeyDer::from_pem_file(&pair.key).map_err(|e| format!("private key {}: {e}", pair.key.display()))?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("private key {}: {e}", pair.key.display()))?;
        Ok(Arc::new(CertifiedKey::new(chain, key)))
    }

    /// Re-reads the files; a bad pair is refused and the current one kept.
    pub fn reload(&self) -> Result<(), String> {
        let key = Self::read(&self.pair)?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = key;
        Ok(())
    }

    pub fn files(&self) -> Vec<PathBuf> {
        vec![self.pair.cert.clone(), self.pair.key.clone()]
    }

    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone())
    }
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
