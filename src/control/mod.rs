//! The control API: HTTP/1.1 on the control unix socket, and optionally on TCP (`--http`), with TLS
//! whose certificate files are swapped in on change. What needs the launcher's state is asked of the
//! supervisor as a request with a reply channel; this module only speaks HTTP (and keeps its own
//! `--http` certificate current).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::certs::{ReloadingCert, TlsPair};
use crate::health::Health;
use crate::http::Endpoint;
use crate::metrics::Metrics;
use crate::outcome::Refusal;
use crate::status::Status;
use crate::watch::{self, WatchSpec};

mod admin_window;
mod keeper;
mod listener;
mod probes;

pub use listener::ControlSocket;

/// Where the control API listens.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub socket: PathBuf,
    /// The runtime directory: when it is removed with the socket, its lock is taken again.
    pub runtime_dir: PathBuf,
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
    /// `cold`: a cold handover to a new Envoy family rather than a hot restart.
    Reload {
        reply: oneshot::Sender<Result<u32, Refusal>>,
        cold: bool,
    },
    /// Where the serving epoch's admin answers now, or why there is none to read.
    EnvoyAdmin(oneshot::Sender<Result<Endpoint, NoAdmin>>),
}

/// Why Envoy's admin cannot be read through the control API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoAdmin {
    #[error("the command is not Envoy: there is no admin to read")]
    NotEnvoy,
    #[error("the admin address of Envoy's epoch {epoch} is not known yet")]
    NotKnownYet { epoch: u32 },
}

/// An answer's body: whole (ours), or passed on as it arrives (Envoy's, through `/envoy/...`).
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Where a connection's end is set when one of its answers must be bounded as a whole.
type ConnectionEnd = tokio::sync::watch::Sender<Option<Instant>>;

/// Hands a request to the supervisor; false once the supervisor is gone.
pub type Ask = Arc<dyn Fn(ControlRequest) -> bool + Send + Sync>;

/// The HTTP status that tells a client why a reload did not happen.
fn refusal_status(refusal: &Refusal) -> StatusCode {
    match refusal {
        Refusal::ShuttingDown | Refusal::Blocked(_) | Refusal::NotEnvoy => StatusCode::CONFLICT,
        // The caller's input: fix the files and ask again.
        Refusal::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Refusal::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        // Nothing wrong with the input: sesame could not judge it, or not in time.
        Refusal::Fault(_) => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// What keeps the control socket bound, started by `Keeper::start` once epoch 0 is spawned: its
/// inotify watcher costs a thread and a round trip to it, which Envoy's start need not wait for.
pub struct Keeper {
    api: ControlApi,
    socket: ControlSocket,
    runtime_dir: PathBuf,
    serving: tokio::task::JoinHandle<()>,
}

impl Keeper {
    pub fn start(self) {
        if let Err(e) = keeper::keep(self.api, self.socket, self.runtime_dir, self.serving) {
            tracing::warn!("cannot watch the control socket's directory ({e}): a removed socket is not bound again");
        }
    }
}

/// Binds the control socket (and `--http`) and serves them from tasks of their own (which run once
/// the caller yields to the runtime). Whatever can refuse the start (a socket or address that
/// cannot be bound, a TLS pair that does not load) is done here; the keeper is left to the caller.
pub async fn start(
    settings: &ControlSettings,
    ask: Ask,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(ControlSocket, Keeper)> {
    use anyhow::Context;
    let token = match &settings.http_token {
        Some(file) => Some(read_token(file)?),
        None => None,
    };
    let api = ControlApi { ask, metrics, token: token.clone().map(Arc::from), health: Arc::new(Health::default()) };
    probes::spawn_watchdog(api.clone());
    let (listener, socket) = listener::bind_unix(&settings.socket)?;
    tracing::info!("control API on unix:{}", settings.socket.display());
    let serving = tokio::spawn(listener::serve_unix(api.clone(), listener));
    let keeper =
        Keeper { api: api.clone(), socket: socket.clone(), runtime_dir: settings.runtime_dir.clone(), serving };
    let Some(address) = &settings.http else { return Ok((socket, keeper)) };
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
    tokio::spawn(listener::serve_tcp(api, listener, acceptor));
    Ok((socket, keeper))
}

/// The TLS side of `--http`: the certificate is re-read whenever its files change, and a bad new
/// pair is refused while the old one stays in use.
fn https_acceptor(pair: TlsPair, debounce: Duration) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    let cert = ReloadingCert::load(pair).map_err(|e| anyhow::anyhow!("--http-tls: {e}"))?;
    let spec = WatchSpec { envoy_command: None, extra: cert.files(), debounce, debounce_max: debounce * 10 };
    let watched = cert.clone();
    watch::start(spec, None, move |files| {
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
    /// Envoy's health, probed when asked.
    health: Arc<Health>,
}

impl ControlApi {
    async fn ask<T>(&self, request: impl FnOnce(oneshot::Sender<T>) -> ControlRequest) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        if !(self.ask)(request(tx)) {
            return None;
        }
        rx.await.ok()
    }

    async fn handle(&self, request: Request<Incoming>, over_tcp: bool, ends_by: &ConnectionEnd) -> Response<Body> {
        let (method, path) = (request.method().clone(), request.uri().path().to_string());
        if path.starts_with("/envoy/") {
            // Reads, as /status and /metrics are: no token over --http.
            return match (admin_window::admin_path(request.uri()), method) {
                (None, _) => {
                    let readable = admin_window::READABLE.map(|path| format!("/envoy{path}")).join(", ");
                    text(StatusCode::NOT_FOUND, &format!("not found: the readable Envoy pages are {readable}\n"))
                }
                (Some(admin_path), Method::GET) => self.admin_window(&admin_path, ends_by).await,
                (Some(_), _) => {
                    text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: /envoy/ is read-only (GET)\n")
                }
            };
        }
        let changes_something = matches!(path.as_str(), "/shutdown" | "/reload");
        if over_tcp && changes_something && !self.authorized(&request) {
            return text(StatusCode::UNAUTHORIZED, "a valid Authorization: Bearer token is required\n");
        }
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => match self.liveness().await {
                Ok(()) => text(StatusCode::OK, "ok\n"),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{why}\n")),
            },
            (Method::GET, "/ready") => match self.checked_status().await {
                Some(status) if status.ready => text(StatusCode::OK, "ready\n"),
                Some(status) => {
                    let why = status.not_ready.unwrap_or_else(|| status.state.to_string());
                    text(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {why}\n"))
                }
                None => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: stopping\n"),
            },
            (Method::GET | Method::POST, "/shutdown") => match self.ask(ControlRequest::Shutdown).await {
                Some(true) => text(StatusCode::OK, "drained\n"),
                _ => text(StatusCode::SERVICE_UNAVAILABLE, "the drain ended before the connections did\n"),
            },
            (Method::POST, "/reload") => {
                match self.ask(|reply| ControlRequest::Reload { reply, cold: cold(&request) }).await {
                    Some(Ok(epoch)) => json(StatusCode::OK, &serde_json::json!({ "epoch": epoch })),
                    Some(Err(refusal)) => {
                        json(refusal_status(&refusal), &serde_json::json!({ "error": refusal.to_string() }))
                    }
                    None => text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"),
                }
            }
            (Method::GET, "/status") => match self.checked_status().await {
                Some(status) => json(StatusCode::OK, &status),
                None => text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"),
            },
            (Method::GET, "/metrics") => {
                let mut response = Response::new(whole(Bytes::from(self.metrics.render())));
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
        let header = request.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        header.and_then(bearer_token).is_some_and(|given| constant_time_eq(given, token))
    }
}

/// `?cold=true` (or `?cold`, `?cold=1`) on `/reload`.
fn cold(request: &Request<Incoming>) -> bool {
    let query = request.uri().query().unwrap_or_default();
    query.split('&').any(|pair| matches!(pair, "cold" | "cold=true" | "cold=1"))
}

/// A body we hold whole.
fn whole(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(whole(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
    response
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(whole(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// The `--http-token` file's token; an empty one is an error, not a token nobody can send.
fn read_token(file: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read --http-token {}", file.display()))?;
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("--http-token {} is empty: it must hold the token", file.display());
    }
    Ok(token.to_string())
}

/// The credentials of an `Authorization: Bearer TOKEN` header; the scheme is case-insensitive
/// (RFC 7235).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, credentials) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim())
}

/// Compares `given` with `token` in a time that depends on neither where they differ nor how long
/// `given` is: every byte of the token is compared, whatever was sent.
fn constant_time_eq(given: &str, token: &str) -> bool {
    let given = given.as_bytes();
    let mut differ = given.len() ^ token.len();
    for (i, expected) in token.bytes().enumerate() {
        differ |= usize::from(given.get(i).copied().unwrap_or(0) ^ expected);
    }
    differ == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq("secret", "secret"));
        assert!(!constant_time_eq("secreT", "secret"));
        assert!(!constant_time_eq("secret2", "secret"));
        assert!(!constant_time_eq("secre", "secret"));
        assert!(!constant_time_eq("", "secret"));
        assert!(!constant_time_eq("secret\0", "secret"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn an_empty_token_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, " \n\t\n").expect("write");
        let err = read_token(&file).expect_err("empty");
        assert_eq!(err.to_string(), format!("--http-token {} is empty: it must hold the token", file.display()));
        std::fs::write(&file, "s3cret\n").expect("write");
        assert_eq!(read_token(&file).expect("token"), "s3cret");
    }
}
