//! A small HTTP/1.1 client over a unix socket or TCP, for Envoy's admin API and the launcher's own
//! control socket. Every request opens its own connection (a stale keep-alive connection to an admin
//! that moved to a new epoch would fail) and is bounded by a timeout, so a hung peer never hangs us.
//! The one exception is a `KeptConnection`, used only when no new connection can be made.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// Where an HTTP peer listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String, u16),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(host, port) if host.contains(':') => write!(f, "[{host}]:{port}"),
            Endpoint::Tcp(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    /// `unix:PATH` or a path (anything with a '/') for a unix socket, `HOST:PORT` for TCP.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(path.into()));
        }
        if text.contains('/') {
            return Ok(Endpoint::Unix(text.into()));
        }
        let (host, port) =
            text.rsplit_once(':').ok_or_else(|| format!("address '{text}' is neither a path nor HOST:PORT"))?;
        let port = port.parse().map_err(|_| format!("address '{text}' has no valid port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(Endpoint::Tcp(if host.is_empty() { "127.0.0.1".into() } else { host.into() }, port))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0} unreachable: {1}")]
    Connect(Endpoint, std::io::Error),
    #[error("{0} did not answer within {1:?}")]
    Timeout(Endpoint, Duration),
    #[error("{0}: {1}")]
    Http(Endpoint, hyper::Error),
    #[error("{0} answered {2} to {1}")]
    Status(Endpoint, String, StatusCode),
    #[error("{0} sent an unreadable answer to {1}: {2}")]
    Body(Endpoint, String, String),
}

#[derive(Debug, Clone)]
pub struct HttpClient {
    endpoint: Endpoint,
    timeout: Duration,
    /// Asked when the endpoint takes no new connection.
    kept: Option<KeptConnection>,
    /// Only the kept connection is asked: the address now belongs to another process.
    kept_only: bool,
    /// Requests sent through this client and its clones (what a drain cost Envoy's admin).
    sent: Arc<AtomicU32>,
}

/// One HTTP/1.1 connection opened while the peer listened and kept idle (no traffic, no timer):
/// Envoy closes its admin listener when a hot-restart child starts, but not the connections that
/// are already open, so an epoch whose child died after that is still reachable through one.
#[derive(Debug, Clone, Default)]
pub struct KeptConnection(Arc<tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>>>);

impl KeptConnection {
    /// Opens it to `endpoint`, unless it is open already.
    pub async fn open(&self, endpoint: &Endpoint) -> Result<(), HttpError> {
        let mut kept = self.0.lock().await;
        if kept.as_ref().is_some_and(|sender| !sender.is_closed()) {
            return Ok(());
        }
        let connect_error = |e| HttpError::Connect(endpoint.clone(), e);
        let http_error = |e| HttpError::Http(endpoint.clone(), e);
        let sender = match endpoint {
            Endpoint::Unix(socket) => {
                let stream = connect_unix(socket).await.map_err(connect_error)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http_error)?;
                tokio::spawn(connection);
                sender
            }
            Endpoint::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port)).await.map_err(connect_error)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http_error)?;
                tokio::spawn(connection);
                sender
            }
        };
        *kept = Some(sender);
        Ok(())
    }

    /// One request on it; None when it is not open (or the peer closed it).
    async fn request(
        &self,
        endpoint: &Endpoint,
        method: Method,
        path: &str,
    ) -> Option<Result<(StatusCode, Bytes), HttpError>> {
        let mut kept = self.0.lock().await;
        let sender = kept.as_mut().filter(|sender| !sender.is_closed())?;
        let http_error = |e| HttpError::Http(endpoint.clone(), e);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .ok()?;
        let result = async {
            sender.ready().await.map_err(http_error)?;
            let response = sender.send_request(request).await.map_err(http_error)?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(http_error)?.to_bytes();
            Ok((status, body))
        }
        .await;
        Some(result)
    }
}

impl HttpClient {
    pub fn new(endpoint: Endpoint, timeout: Duration) -> Self {
        HttpClient { endpoint, timeout, kept: None, kept_only: false, sent: Arc::default() }
    }

    /// Asks `kept` alone, never the endpoint: a hot restart's older epoch, whose admin address its
    /// successor took over.
    pub fn kept_only(self, kept: KeptConnection) -> Self {
        HttpClient { kept: Some(kept), kept_only: true, ..self }
    }

    /// Falls back on `kept` when the endpoint takes no new connection.
    pub fn with_kept(self, kept: KeptConnection) -> Self {
        HttpClient { kept: Some(kept), ..self }
    }

    pub fn without_kept(self) -> Self {
        HttpClient { kept: None, kept_only: false, ..self }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Requests sent through this client and its clones since it was made.
    pub fn requests_sent(&self) -> u32 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Sends one request and returns the status and body.
    pub async fn request(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), HttpError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        tokio::time::timeout(self.timeout, self.request_unbounded(method, path))
            .await
            .map_err(|_| HttpError::Timeout(self.endpoint.clone(), self.timeout))?
    }

    /// A request that must answer 200.
    pub async fn expect_ok(&self, method: Method, path: &str) -> Result<Bytes, HttpError> {
        let (status, body) = self.request(method, path).await?;
        self.ok(path, status)?;
        Ok(body)
    }

    fn ok(&self, path: &str, status: StatusCode) -> Result<(), HttpError> {
        match status {
            StatusCode::OK => Ok(()),
            status => Err(HttpError::Status(self.endpoint.clone(), path.to_string(), status)),
        }
    }

    /// A GET that must answer 200, its body handed to `each` piece by piece as it arrives: an
    /// answer of megabytes is never held whole (gathered, each read mapped and faulted in a fresh
    /// block as large). Through the kept connection, when no new one can be made, it comes whole.
    pub async fn expect_ok_in_pieces(&self, path: &str, mut each: impl FnMut(&[u8])) -> Result<(), HttpError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let read = async {
            let no_new = if self.kept_only {
                self.kept_closed()
            } else {
                match self.read_in_pieces(path, &mut each).await {
                    Err(e @ HttpError::Connect(..)) => e,
                    read => return read,
                }
            };
            let (status, body) = self.through_kept(Method::GET, path, no_new).await?;
            self.ok(path, status)?;
            each(&body);
            Ok(())
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| HttpError::Timeout(self.endpoint.clone(), self.timeout))?
    }

    async fn read_in_pieces(&self, path: &str, each: &mut impl FnMut(&[u8])) -> Result<(), HttpError> {
        let (response, _connection) = self.send(Method::GET, path).await?;
        self.ok(path, response.status())?;
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| HttpError::Http(self.endpoint.clone(), e))?;
            if let Some(data) = frame.data_ref() {
                each(data);
            }
        }
        Ok(())
    }

    /// An error for an answer that could not be read.
    pub fn unreadable(&self, path: &str, body: &[u8]) -> HttpError {
        HttpError::Body(self.endpoint.clone(), path.into(), String::from_utf8_lossy(body).into())
    }

    async fn request_unbounded(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), HttpError> {
        if self.kept_only {
            return self.through_kept(method, path, self.kept_closed()).await;
        }
        match self.request_new(method.clone(), path).await {
            Err(e @ HttpError::Connect(..)) => self.through_kept(method, path, e).await,
            result => result,
        }
    }

    /// The request through the kept connection, when no new one is made: `no_new` when there is
    /// none, or it is closed.
    async fn through_kept(
        &self,
        method: Method,
        path: &str,
        no_new: HttpError,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        match &self.kept {
            Some(kept) => kept.request(&self.endpoint, method, path).await.unwrap_or(Err(no_new)),
            None => Err(no_new),
        }
    }

    fn kept_closed(&self) -> HttpError {
        HttpError::Connect(self.endpoint.clone(), std::io::Error::other("the kept connection is closed"))
    }

    async fn request_new(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), HttpError> {
        let (response, _connection) = self.send(method, path).await?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| HttpError::Http(self.endpoint.clone(), e))?;
        Ok((status, body.to_bytes()))
    }

    /// Sends a GET and returns the response once its head has arrived (within the timeout), with
    /// its body still to be read as the peer sends it: a proxy passes it on without holding all of
    /// it. Whoever reads the body bounds how long that takes.
    pub async fn get_streamed(&self, path: &str) -> Result<Response<StreamedBody>, HttpError> {
        let (response, connection) = tokio::time::timeout(self.timeout, self.send(Method::GET, path))
            .await
            .map_err(|_| HttpError::Timeout(self.endpoint.clone(), self.timeout))??;
        Ok(response.map(|body| StreamedBody { body, _connection: connection }))
    }

    /// Connects, sends one request and returns the response head, its body unread.
    async fn send(&self, method: Method, path: &str) -> Result<(Response<Incoming>, Connection), HttpError> {
        let connect_error = |e| HttpError::Connect(self.endpoint.clone(), e);
        match &self.endpoint {
            Endpoint::Unix(socket) => {
                let stream = connect_unix(socket).await.map_err(connect_error)?;
                self.exchange(stream, method, path).await
            }
            Endpoint::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port)).await.map_err(connect_error)?;
                self.exchange(stream, method, path).await
            }
        }
    }

    async fn exchange<S>(
        &self,
        stream: S,
        method: Method,
        path: &str,
    ) -> Result<(Response<Incoming>, Connection), HttpError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let http_error = |e| HttpError::Http(self.endpoint.clone(), e);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http_error)?;
        // The connection task ends with the response (Connection: close) or when its guard is dropped.
        let connection = Connection(tokio::spawn(connection).abort_handle());
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| HttpError::Body(self.endpoint.clone(), path.to_string(), e.to_string()))?;
        let response = sender.send_request(request).await.map_err(http_error)?;
        Ok((response, connection))
    }
}

/// The task that drives one client connection: aborted when dropped, so that a response abandoned
/// half-read (its reader gone, or out of time) never leaves the connection open.
struct Connection(tokio::task::AbortHandle);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A response body read as the peer sends it; its connection is closed when it is dropped.
pub struct StreamedBody {
    body: Incoming,
    _connection: Connection,
}

impl hyper::body::Body for StreamedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Connects to a unix socket; a path starting with '@' names one in the abstract namespace, as
/// in Envoy's `pipe.path`.
async fn connect_unix(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    if let Some(name) = path.as_os_str().as_bytes().strip_prefix(b"@") {
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        // A local connect either succeeds or fails at once; it does not wait on a network.
        let stream = std::os::unix::net::UnixStream::connect_addr(&address)?;
        stream.set_nonblocking(true)?;
        return UnixStream::from_std(stream);
    }
    UnixStream::connect(path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!("/run/a.sock".parse(), Ok(Endpoint::Unix("/run/a.sock".into())));
        assert_eq!("unix:a.sock".parse(), Ok(Endpoint::Unix("a.sock".into())));
        assert_eq!("127.0.0.1:9901".parse(), Ok(Endpoint::Tcp("127.0.0.1".into(), 9901)));
        assert_eq!("[::1]:9901".parse(), Ok(Endpoint::Tcp("::1".into(), 9901)));
        assert_eq!(":9901".parse(), Ok(Endpoint::Tcp("127.0.0.1".into(), 9901)));
        assert!("localhost".parse::<Endpoint>().is_err());
        assert!("localhost:http".parse::<Endpoint>().is_err());
    }

    #[tokio::test]
    async fn a_hung_peer_times_out_and_a_missing_one_fails_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("hung.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let _accepting = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let client = HttpClient::new(Endpoint::Unix(socket), Duration::from_millis(200));
        let err = client.request(Method::GET, "/").await.expect_err("hung");
        assert!(matches!(err, HttpError::Timeout(..)), "{err}");

        let missing = HttpClient::new(Endpoint::Unix(dir.path().join("missing.sock")), Duration::from_secs(1));
        let err = missing.request(Method::GET, "/").await.expect_err("missing");
        assert!(matches!(err, HttpError::Connect(..)), "{err}");
    }

    #[tokio::test]
    async fn connects_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sesame-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let listener = std::os::unix::net::UnixListener::bind_addr(&address).expect("bind abstract");
        let connected = connect_unix(Path::new(&format!("@{name}"))).await;
        assert!(connected.is_ok(), "{connected:?}");
        assert!(listener.accept().is_ok());
    }
}
